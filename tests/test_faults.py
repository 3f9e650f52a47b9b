"""Fault injection on the whole pipeline: `kill -9` of `rlhf run` (the process group: the CLI,
Prefect's ephemeral server, everything) during SFT, reward training, PPO and evaluation, one after
the other on one work dir; the run that finally completes must end with exactly the metrics of an
uninterrupted run of the same seed. And the S3 result store stopped in the middle of a run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

from tests.helpers import FINE_TUNED

pytestmark = pytest.mark.slow
RLHF = str(Path(sys.executable).parent / "rlhf")

TINY = {
    "run": {"name": "faults"},
    "model": {"preset": "tiny"},
    "tracking": {"experiment_name": "faults"},
    "data": {"demo": {"n_prompts": 300, "n_heldout": 16}},
    "sft": {"max_steps": 40, "batch_size": 8, "eval_every": 20, "checkpoint_every": 5},
    "labels": {"max_pairs": 64},
    "reward": {
        **FINE_TUNED,
        "max_steps": 40,
        "batch_size": 8,
        "lr": 1e-4,
        "max_length": 96,
        "eval_every": 20,
        "checkpoint_every": 5,
        "norm_prompts": 4,
        "norm_max_new_tokens": 6,
        "gate": {"min_accuracy": 0.0},
    },
    "ppo": {
        "iterations": 8,
        "batch_size": 4,
        "mini_batch_size": 4,
        "micro_batch_size": 4,
        "max_new_tokens": 8,
        "checkpoint_every": 1,
        "eval_every": None,
    },
    "evaluate": {
        "max_prompts": 16,
        "perplexity_examples": 8,
        "safety": {"max_prompts": 4},
        "best_of_n": [1, 2],
        "best_of_n_prompts": 4,
    },
    "registry": {"gate": {"min_win_rate": 0.0, "min_score_gain": None}},
}


def watch(proc: subprocess.Popen) -> list[str]:
    """The process's output lines as they come (read on a thread, so the pipe never fills)."""
    lines: list[str] = []

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.decode(errors="replace"))

    threading.Thread(target=read, daemon=True).start()
    return lines


# (where the kill lands, what shows the stage is under way)
KILLS = [
    ("sft", lambda work, out: any(work.glob("stages/sft/*.checkpoints/step-*"))),
    ("reward", lambda work, out: any(work.glob("stages/reward-train/*.checkpoints/step-*"))),
    ("ppo", lambda work, out: any(work.glob("stages/ppo/*.checkpoints/iter-*"))),
    # its first phase done, the others to come: mid-evaluation, not while it writes its outputs
    ("evaluate", lambda work, out: any("evaluate: " in line for line in out)),
]


def start(config: Path, work: Path, extra_env: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(extra_env or {})
    return subprocess.Popen(
        [RLHF, "run", "--config", str(config), "--set", f"run.work_dir={work}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=work.parent,
        start_new_session=True,  # its process group: the CLI and whatever it started
    )


def mlflow_client(work: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{work / 'mlflow.db'}")


def final_metrics(work: Path) -> dict:
    client = mlflow_client(work)
    exp = client.get_experiment_by_name("faults")
    runs = client.search_runs(
        [exp.experiment_id],
        "tags.`rlhf.kind` = 'pipeline' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    metrics = runs[0].data.metrics
    return {k: v for k, v in metrics.items() if k.startswith(("eval_", "reward_", "ppo_"))}


def test_kill_9_in_every_stage_then_the_same_result(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    straight = start(config, tmp_path / "straight")
    out = straight.communicate(timeout=900)[0].decode()
    assert straight.returncode == 0, out[-3000:]
    expected = final_metrics(tmp_path / "straight")
    assert "eval_win_rate" in expected and "eval_kl_per_response" in expected

    work = tmp_path / "killed"
    for stage, under_way in KILLS:
        victim = start(config, work)
        out = watch(victim)
        deadline = time.monotonic() + 900
        while not under_way(work, out):
            if victim.poll() is not None:
                time.sleep(0.5)  # the last lines
                pytest.fail(f"the run ended before {stage}: {''.join(out)[-3000:]}")
            assert time.monotonic() < deadline, f"no sign of {stage} after 900 s"
            time.sleep(0.05)
        assert victim.poll() is None, f"the run ended before the kill in {stage}"
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    assert not any(work.glob("stages/evaluate/*/report.json"))  # the kill was mid-evaluation
    rerun = start(config, work)
    out = rerun.communicate(timeout=900)[0].decode()
    assert rerun.returncode == 0, out[-3000:]
    got = final_metrics(work)
    assert got.keys() == expected.keys()
    differ = {k: (expected[k], got[k]) for k in expected if expected[k] != got[k]}
    assert not differ, differ

    # the killed runs' MLflow runs (pipeline and stage) are closed as KILLED by the next run
    runs = mlflow_client(work).search_runs(
        [mlflow_client(work).get_experiment_by_name("faults").experiment_id]
    )
    assert not [r.info.run_name for r in runs if r.info.status == "RUNNING"]
    killed = [r for r in runs if r.info.status == "KILLED"]
    assert sum(r.data.tags.get("rlhf.kind") == "pipeline" for r in killed) == len(KILLS)
    assert {r.data.tags.get("rlhf.stage") for r in killed} >= {"sft", "reward-train", "ppo"}


def test_result_store_stopped_mid_run(tmp_path):
    """SeaweedFS (the S3 result store) stopped during SFT: the run stops with one line naming the
    store, what was stored is whole, and after a restart the rerun does not redo the stored stages."""
    from rlhf_core.services import SeaweedS3

    store = SeaweedS3(tmp_path / "s3", "rlhf-test", "rlhf-test-secret", buckets=["results"]).start()
    env = {
        "AWS_ACCESS_KEY_ID": store.access_key,
        "AWS_SECRET_ACCESS_KEY": store.secret_key,
        "AWS_DEFAULT_REGION": "us-east-1",
        "RLHF_S3_ENDPOINT_URL": store.endpoint_url,
    }
    config = tmp_path / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            TINY | {"tracking": {**TINY["tracking"], "result_storage": "s3://results/prefect"}}
        )
    )
    work = tmp_path / "work"
    try:
        run = start(config, work, env)
        deadline = time.monotonic() + 900
        while not any(work.glob("stages/sft/*.checkpoints/step-*")):
            assert run.poll() is None, run.stdout.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no SFT checkpoint after 900 s"
            time.sleep(0.05)
        store.stop()
        out = run.communicate(timeout=900)[0].decode()
        assert run.returncode != 0, out[-3000:]
        assert "Traceback" not in out, out[-5000:]
        errors = [line for line in out.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and errors[0].startswith(
            "error: sft: finished, but its result could not be stored in s3://results/prefect ("
        ), out[-3000:]

        store.start()
        stored = [
            o["Key"] for o in store.client().list_objects_v2(Bucket="results").get("Contents", [])
        ]
        assert stored
        for key in stored:  # nothing half-written: every stored result is a whole record
            body = store.client().get_object(Bucket="results", Key=key)["Body"].read()
            assert json.loads(body).keys() == {"metadata", "result"}
        rerun = start(config, work, env)
        out = rerun.communicate(timeout=900)[0].decode()
        assert rerun.returncode == 0, out[-3000:]
        assert not (tmp_path / "s3:").exists()  # an s3:// URI taken for a local folder
    finally:
        store.stop()
    client = mlflow_client(work)
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    finished = [
        r
        for r in runs
        if r.data.tags.get("rlhf.kind") == "pipeline" and r.info.status == "FINISHED"
    ]
    assert len(finished) == 1
    children = {
        r.data.tags["rlhf.stage"]: r
        for r in runs
        if r.data.tags.get("mlflow.parentRunId") == finished[0].info.run_id
    }
    for name in (
        "demo-data",
        "ingest",
        "validate",
        "split",
        "init-policy",
    ):  # served from the store, not redone
        assert "rlhf.cached_from_run" in children[name].data.tags, name
    assert "rlhf.cached_from_run" not in children["sft"].data.tags


def test_canary_secrets_reach_nothing_a_run_writes(tmp_path, s3_env, served_model):
    """A whole `rlhf run` that really uses its secrets: stage results in S3 (the endpoint URL, with
    user-info, and the secret key from the environment), the data read from S3, an OpenAI-compatible judge (a real local
    `transformers serve`) whose key is OPENAI_API_KEY, and HF_TOKEN set. None of the values appears
    in the CLI's output, the work dir (stages, MLflow database and artifacts, the Prefect database
    and its journal) or the stored results."""
    url, judge_model = served_model
    canaries = {
        "OPENAI_API_KEY": "canary-openai-77c1",
        "HF_TOKEN": "canary-hf-d20e",
        "RLHF_S3_ENDPOINT_URL": s3_env.endpoint_url.replace("://", "://ops:canary-url-91aa@"),
    }
    needles = ["canary-openai-77c1", "canary-hf-d20e", "canary-url-91aa", s3_env.secret_key]
    constitution = tmp_path / "short.yaml"  # the served model reads 256 tokens at most
    constitution.write_text(
        yaml.safe_dump(
            {
                "name": "short",
                "intro": "Pick the better reply.",
                "principles": [{"name": "helpful", "text": "Prefer the more helpful reply."}],
            }
        )
    )
    judge = {
        "backend": "openai",
        "base_url": url,
        "model": judge_model,
        "constitution": str(constitution),
        "votes": 1,
        "concurrency": 2,
    }
    pairs = "".join(  # short: the judge's question must fit the served model
        json.dumps({"prompt": f"Name a color, {i}?", "chosen": f"Blue {i}.", "rejected": "No."})
        + "\n"
        for i in range(300)
    )
    s3_env.client().put_object(Bucket="prefs", Key="canary/pairs.jsonl", Body=pairs.encode())
    config = tmp_path / "canary.yaml"
    config.write_text(
        yaml.safe_dump(
            TINY
            | {
                "data": {"sources": [{"path": "s3://prefs/canary/pairs.jsonl"}]},
                "sft": {**TINY["sft"], "max_steps": 10, "eval_every": 10},
                "reward": {**TINY["reward"], "max_steps": 10, "eval_every": 10},
                "ppo": {**TINY["ppo"], "iterations": 2},
                "tracking": {**TINY["tracking"], "result_storage": "s3://prefs/canary-results"},
                "labels": {"max_pairs": 8, "judge": judge},
                "evaluate": {**TINY["evaluate"], "max_prompts": 4, "best_of_n": []},
            }
        )
    )
    work = tmp_path / "work"
    run = start(config, work, canaries)
    out = run.communicate(timeout=900)[0]
    assert run.returncode == 0, out.decode()[-3000:]
    client = mlflow_client(work)
    labels = client.search_runs(
        [client.get_experiment_by_name("faults").experiment_id], "tags.`rlhf.stage` = 'label'"
    )
    assert labels[0].data.params["judge_backend"] == "openai"  # the key was sent
    stored = s3_env.client().list_objects_v2(Bucket="prefs", Prefix="canary-results/")
    assert len(stored.get("Contents", [])) >= 5  # every stage's result went through the endpoint
    blobs = {"cli output": out}
    blobs |= {str(p): p.read_bytes() for p in work.rglob("*") if p.is_file()}
    blobs |= {
        o["Key"]: s3_env.client().get_object(Bucket="prefs", Key=o["Key"])["Body"].read()
        for o in stored["Contents"]
    }
    assert any(p.endswith("prefect.db") for p in blobs) and any("artifacts" in p for p in blobs)
    leaks = [(where, n) for where, blob in blobs.items() for n in needles if n.encode() in blob]
    assert not leaks


def test_two_runs_on_one_work_dir(tmp_path):
    """Two `rlhf run`s at once on one work dir: the second stops at once with one line naming
    the first, touching nothing; the first completes as if alone."""
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY | {"run": {**TINY["run"], "until": "sft"}}))
    work = tmp_path / "work"
    first = start(config, work)
    deadline = time.monotonic() + 600
    while not any(work.glob("stages/sft/*.checkpoints/step-*")):  # well inside the run
        assert first.poll() is None, first.stdout.read().decode()[-3000:]
        assert time.monotonic() < deadline, "no SFT checkpoint after 600 s"
        time.sleep(0.05)
    second = start(config, work)
    out = second.communicate(timeout=120)[0].decode()
    assert second.returncode != 0
    errors = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"is in use by rlhf run (faults) (pid {first.pid} on " in errors[0]
    assert "Traceback" not in out
    out = first.communicate(timeout=900)[0].decode()
    assert first.returncode == 0, out[-3000:]
    client = mlflow_client(work)
    runs = client.search_runs([client.get_experiment_by_name("faults").experiment_id])
    pipelines = [r for r in runs if r.data.tags.get("rlhf.kind") == "pipeline"]
    assert [r.info.status for r in pipelines] == ["FINISHED"]
