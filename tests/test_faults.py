"""Fault injection on the whole pipeline: `kill -9` of `rlhf run` (the process group: the CLI,
Prefect's ephemeral server, everything) during SFT, reward training, PPO and evaluation, one after
the other on one work dir; the run that finally completes must end with exactly the metrics of an
uninterrupted run of the same seed."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient

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

# (where the kill lands, what shows the stage is under way)
KILLS = [
    ("sft", "stages/sft/*.checkpoints/step-*"),
    ("reward", "stages/reward-train/*.checkpoints/step-*"),
    ("ppo", "stages/ppo/*.checkpoints/iter-*"),
    ("evaluate", "stages/evaluate/*"),
]


def start(config: Path, work: Path, extra_env: dict | None = None) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(extra_env or {})
    return subprocess.Popen(
        [RLHF, "run", "--config", str(config), "--set", f"run.work_dir={work}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,  # its process group: the CLI and whatever it started
    )


def final_metrics(work: Path) -> dict:
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
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
    for stage, marker in KILLS:
        victim = start(config, work)
        deadline = time.monotonic() + 900
        while not any(work.glob(marker)):
            if victim.poll() is not None:
                pytest.fail(
                    f"the run ended before {stage}: {victim.stdout.read().decode()[-3000:]}"
                )
            assert time.monotonic() < deadline, f"no sign of {stage} after 900 s"
            time.sleep(0.05)
        os.killpg(victim.pid, signal.SIGKILL)
        victim.wait()
    rerun = start(config, work)
    out = rerun.communicate(timeout=900)[0].decode()
    assert rerun.returncode == 0, out[-3000:]
    got = final_metrics(work)
    assert got.keys() == expected.keys()
    differ = {k: (expected[k], got[k]) for k in expected if expected[k] != got[k]}
    assert not differ, differ
