"""`rlhf stack up|status|down` for real: SeaweedFS, MLflow server, Prefect server and a process worker on loopback."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlhf_core.services import free_ports
from rlhf_core.stack import Started, _http_ok, is_ours

pytestmark = pytest.mark.slow
RLHF = str(Path(sys.executable).parent / "rlhf")
TINY_PIPELINE = {
    "model": {"preset": "tiny"}, "tracking": {"experiment_name": "stack-test"},
    "data": {"demo": {"n_prompts": 300, "n_heldout": 12}},
    "sft": {"max_steps": 8, "batch_size": 8, "eval_every": 4, "checkpoint_every": 4, "n_samples": 1, "sample_max_new_tokens": 6},
    "labels": {"max_pairs": 80},
    "reward": {"max_steps": 8, "batch_size": 8, "lr": 1e-4, "max_length": 96, "eval_every": 4, "norm_prompts": 4, "norm_max_new_tokens": 6,
               "gate": {"min_accuracy": 0.0}},
    "ppo": {"iterations": 2, "batch_size": 4, "mini_batch_size": 4, "micro_batch_size": 4, "max_new_tokens": 6, "checkpoint_every": 2},
    "evaluate": {"max_prompts": 8, "perplexity_examples": 8, "safety": {"max_prompts": 2}},
}


def rlhf(*args: str, env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([RLHF, *args], capture_output=True, text=True, env=env, timeout=timeout)


def test_stack_up_status_down(tmp_path):
    s3, mlflow_port, prefect_port = free_ports(3, with_grpc=True)
    sets = ["--set", f"run.work_dir={tmp_path / 'work'}", "--set", f"stack.s3_port={s3}", "--set", f"stack.mlflow_port={mlflow_port}",
            "--set", f"stack.prefect_port={prefect_port}", "--set", "stack.work_pool=test-pool"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}

    missing = rlhf("stack", "up", *sets, env=env)
    assert missing.returncode == 2 and "AWS_ACCESS_KEY_ID" in missing.stderr and "Traceback" not in missing.stderr

    env.update(AWS_ACCESS_KEY_ID="stack-test", AWS_SECRET_ACCESS_KEY="stack-test-secret")
    state_file = tmp_path / "work" / "stack" / "stack.json"
    try:
        up = rlhf("stack", "up", *sets, env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"export PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api" in up.stdout
        started = {k: Started(**v) for k, v in json.loads(state_file.read_text())["services"].items()}
        assert set(started) == {"s3", "mlflow", "prefect", "worker"} and all(is_ours(s) for s in started.values())
        assert all(Path(s.log).exists() for s in started.values())

        status = rlhf("stack", "status", *sets, env=env)
        assert status.returncode == 0 and status.stdout.count("healthy") == 4, status.stdout
        again = rlhf("stack", "up", *sets, env=env)  # idempotent: nothing restarted
        assert again.returncode == 0 and again.stderr.count("already running") == 4
        assert json.loads(state_file.read_text())["services"]["mlflow"]["pid"] == started["mlflow"].pid

        # MLflow through its server stores artifacts in the S3 bucket (proxied: the client has no S3 settings)
        script = ("import mlflow, tempfile, pathlib; mlflow.set_tracking_uri('http://127.0.0.1:%d');"
                  "r = mlflow.start_run(); p = pathlib.Path(tempfile.mkdtemp()) / 'x.txt'; p.write_text('hello');"
                  "mlflow.log_artifact(str(p)); mlflow.end_run(); print(r.info.artifact_uri)") % mlflow_port
        client_env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
        logged = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=client_env, timeout=120)
        assert logged.returncode == 0, logged.stderr[-2000:]
        import boto3

        s3c = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{s3}", aws_access_key_id="stack-test",
                           aws_secret_access_key="stack-test-secret", region_name="us-east-1")
        keys = [o["Key"] for o in s3c.list_objects_v2(Bucket="rlhf", Prefix="mlflow/").get("Contents", [])]
        assert any(k.endswith("/artifacts/x.txt") for k in keys), keys

        # the whole pipeline (tiny) against the stack: Prefect server, MLflow server, artifacts and models in S3
        config = tmp_path / "tiny.yaml"
        config.write_text(yaml.safe_dump(TINY_PIPELINE | {"run": {"name": "stack", "work_dir": str(tmp_path / "pipeline")}}))
        run_env = {**env, "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api", "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
                   "RLHF_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3}"}
        run = rlhf("run", "--config", str(config), env=run_env, timeout=900)
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "temporary server" not in run.stdout + run.stderr  # the stack's Prefect server, not ephemeral mode
        ok, flow_runs = _http_ok(f"http://127.0.0.1:{prefect_port}/api/flow_runs/filter", "POST", {})
        assert ok and [r["state_type"] for r in flow_runs] == ["COMPLETED"]
        keys = [o["Key"] for page in s3c.get_paginator("list_objects_v2").paginate(Bucket="rlhf", Prefix="mlflow/")
                for o in page.get("Contents", [])]
        assert any(k.endswith("/artifacts/evaluation/report.md") for k in keys)
        assert any(k.endswith("/artifacts/MLmodel") and "/models/" in k for k in keys)  # the registered models' files
        import mlflow

        client = mlflow.MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        assert [str(v.version) for v in client.search_model_versions("name = 'rlhf-policy'")] == ["1"]
        assert not (tmp_path / "pipeline" / "artifacts").exists()  # nothing went to the local artifact folder
    finally:
        down = rlhf("stack", "down", *sets, env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not state_file.exists()
    assert not any(is_ours(s) for s in started.values())  # every process group we started is gone
    status = rlhf("stack", "status", *sets, env=env)
    assert status.returncode == 1 and "down" in status.stdout
