"""`rlhf stack up|status|down` for real: SeaweedFS, MLflow server, Prefect server and a process worker on loopback."""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from rlhf_core.data.demo import generate_demo_pairs
from rlhf_core.services import free_ports
from rlhf_core.stack import Started, _http_ok, basic_auth, is_ours, load_credentials
from tests.helpers import FINE_TUNED

pytestmark = pytest.mark.slow
RLHF = str(Path(sys.executable).parent / "rlhf")
TINY_PIPELINE = {
    "model": {"preset": "tiny"},
    "tracking": {"experiment_name": "stack-test"},
    "data": {"demo": {"n_prompts": 300, "n_heldout": 12}},
    "sft": {
        "max_steps": 8,
        "batch_size": 8,
        "eval_every": 4,
        "checkpoint_every": 4,
        "n_samples": 1,
        "sample_max_new_tokens": 6,
    },
    "labels": {"max_pairs": 80},
    "reward": {
        **FINE_TUNED,
        "max_steps": 8,
        "batch_size": 8,
        "lr": 1e-4,
        "max_length": 96,
        "eval_every": 4,
        "norm_prompts": 4,
        "norm_max_new_tokens": 6,
        "gate": {"min_accuracy": 0.0},
    },
    "ppo": {
        "iterations": 2,
        "batch_size": 4,
        "mini_batch_size": 4,
        "micro_batch_size": 4,
        "max_new_tokens": 6,
        "checkpoint_every": 2,
    },
    "evaluate": {"max_prompts": 8, "perplexity_examples": 8, "safety": {"max_prompts": 2}},
}


ARTIFACTS = Path(
    os.environ.get("RLHF_TEST_ARTIFACTS", Path(__file__).resolve().parent.parent / "test-artifacts")
)


def browse(
    url: str,
    png: Path,
    expect: str,
    *,
    headers: dict[str, str] | None = None,
    local_storage: dict[str, str] | None = None,
    timeout: float = 90.0,
) -> str:
    """Open a page in headless Chromium (Debian's package; `make test` installs it) driven over the
    DevTools protocol, logged in the way a person would be (an Authorization header for MLflow's
    basic auth, the Prefect UI's stored password): wait until `expect` shows, save a screenshot,
    return the DOM."""
    import base64
    import re
    import tempfile
    import urllib.request
    from urllib.parse import urlsplit

    from websockets.sync.client import connect

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        pytest.fail(
            "headless Chromium not found: apt-get install chromium (make test installs it when it can)"
        )
    png.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        log = Path(profile) / "chromium.log"
        with open(log, "w") as fh:
            proc = subprocess.Popen(
                [
                    chromium,
                    "--headless=new",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-dev-shm-usage",
                    "--window-size=1400,900",
                    "--remote-debugging-port=0",
                    f"--user-data-dir={profile}/data",
                    "about:blank",
                ],
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its renderers go with it
            )
        try:
            deadline = time.monotonic() + 30
            while not (
                found := re.search(r"DevTools listening on ws://[^:]+:(\d+)/", log.read_text())
            ):
                assert time.monotonic() < deadline and proc.poll() is None, log.read_text()[-2000:]
                time.sleep(0.2)
            with urllib.request.urlopen(f"http://127.0.0.1:{found[1]}/json/list") as resp:
                page = next(t for t in json.load(resp) if t["type"] == "page")
            with connect(page["webSocketDebuggerUrl"], max_size=None) as ws:
                calls = iter(range(1, 1_000_000))

                def cdp(method: str, **params) -> dict:
                    n = next(calls)
                    ws.send(json.dumps({"id": n, "method": method, "params": params}))
                    while (msg := json.loads(ws.recv(timeout=60))).get("id") != n:
                        pass
                    assert "error" not in msg, (method, msg["error"])
                    return msg["result"]

                def dom() -> str:
                    expr = "document.documentElement.outerHTML"
                    return cdp("Runtime.evaluate", expression=expr)["result"].get("value", "")

                cdp("Network.enable")
                if headers:
                    cdp("Network.setExtraHTTPHeaders", headers=headers)
                if local_storage:
                    parts = urlsplit(url)
                    cdp("Page.navigate", url=f"{parts.scheme}://{parts.netloc}/robots.txt")
                    time.sleep(1)
                    for k, v in local_storage.items():
                        cdp("Runtime.evaluate", expression=f"localStorage.setItem({k!r}, {v!r})")
                cdp("Page.navigate", url=url)
                deadline = time.monotonic() + timeout
                while expect not in (text := dom()) and time.monotonic() < deadline:
                    time.sleep(1)
                time.sleep(2)  # let the page finish drawing
                shot = cdp("Page.captureScreenshot", format="png")["data"]
                png.write_bytes(base64.b64decode(shot))
                return dom() if expect not in text else text
        finally:
            os.killpg(proc.pid, 9)
            proc.wait()


def rlhf(*args: str, env: dict, timeout: float = 400) -> subprocess.CompletedProcess:
    return subprocess.run([RLHF, *args], capture_output=True, text=True, env=env, timeout=timeout)


def wait_for_run(api: str, data_path: str, timeout: float, auth: dict) -> dict:
    """The pipeline run started for data_path, once it is in a final state."""
    deadline = time.monotonic() + timeout
    body = {
        "flow_runs": {"state": {"type": {"any_": ["COMPLETED", "FAILED", "CRASHED", "CANCELLED"]}}}
    }
    while time.monotonic() < deadline:
        ok, runs = _http_ok(f"{api}/flow_runs/filter", "POST", body, headers=auth)
        found = [r for r in runs if r["parameters"].get("data_path") == data_path] if ok else []
        if found:
            return found[0]
        time.sleep(5)
    raise AssertionError(f"no finished pipeline run for {data_path} after {timeout:.0f}s")


def test_stack_deploy_and_a_data_arrival_run(tmp_path, monkeypatch):
    """The issue's integration test: stack up, deploy, upload a preference file, the trigger's run completes on the
    worker; Prefect, MLflow (through its server) and S3 hold the results; stack down leaves nothing behind."""
    s3, mlflow_port, prefect_port = free_ports(3, with_grpc=True)
    sets = [
        "--set",
        f"run.work_dir={tmp_path / 'work'}",
        "--set",
        f"stack.s3_port={s3}",
        "--set",
        f"stack.mlflow_port={mlflow_port}",
        "--set",
        f"stack.prefect_port={prefect_port}",
        "--set",
        "stack.work_pool=test-pool",
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "AWS_"))}

    # a shell's cloud keys are never the store's: up generates the store's own
    env.update(AWS_ACCESS_KEY_ID="shell-key", AWS_SECRET_ACCESS_KEY="shell-secret")
    state_file = tmp_path / "work" / "stack" / "stack.json"
    try:
        up = rlhf("stack", "up", *sets, env=env)
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"export PREFECT_API_URL=http://127.0.0.1:{prefect_port}/api" in up.stdout
        started = {
            k: Started(**v) for k, v in json.loads(state_file.read_text())["services"].items()
        }
        assert set(started) == {"s3", "mlflow", "prefect", "worker"} and all(
            is_ours(s) for s in started.values()
        )
        assert all(Path(s.log).exists() for s in started.values())

        # nothing answers without the credentials `up` generated (a 0600 file in the work dir)
        creds_file = tmp_path / "work" / "stack" / "credentials.env"
        assert creds_file.stat().st_mode & 0o777 == 0o600
        creds = load_credentials(creds_file)
        api = f"http://127.0.0.1:{prefect_port}/api"
        prefect_auth = basic_auth(creds["PREFECT_API_AUTH_STRING"])
        mlflow_auth = basic_auth(
            f"{creds['MLFLOW_TRACKING_USERNAME']}:{creds['MLFLOW_TRACKING_PASSWORD']}"
        )
        mlflow_api = f"http://127.0.0.1:{mlflow_port}/api/2.0/mlflow/experiments/search"
        for url, body, right in (
            (f"{api}/flow_runs/filter", {}, prefect_auth),
            (mlflow_api, {"max_results": 1}, mlflow_auth),
        ):
            for wrong in ({}, basic_auth("rlhf:wrong")):
                answer = _http_ok(url, "POST", body, headers=wrong)
                assert not answer[0] and "401" in str(answer[1]), (url, answer)
            assert _http_ok(url, "POST", body, headers=right)[0], url
        # and no other web page may script the Prefect API from a browser
        preflight = subprocess.run(
            [
                "curl",
                "-s",
                "-i",
                "-X",
                "OPTIONS",
                "-H",
                "Origin: http://evil.example",
                "-H",
                "Access-Control-Request-Method: POST",
                f"{api}/flow_runs/filter",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        ).stdout.lower()
        assert "access-control-allow-origin" not in preflight, preflight

        status = rlhf("stack", "status", *sets, env=env)
        assert status.returncode == 0 and status.stdout.count("healthy") == 4, status.stdout
        again = rlhf("stack", "up", *sets, env=env)  # idempotent: nothing restarted
        assert again.returncode == 0 and again.stderr.count("already running") == 4
        assert (
            json.loads(state_file.read_text())["services"]["mlflow"]["pid"] == started["mlflow"].pid
        )

        # MLflow through its server stores artifacts in the S3 bucket (proxied: the client has no S3 settings)
        script = (
            f"import mlflow, tempfile, pathlib; mlflow.set_tracking_uri('http://127.0.0.1:{mlflow_port}');"
            "r = mlflow.start_run(); p = pathlib.Path(tempfile.mkdtemp()) / 'x.txt'; p.write_text('hello');"
            "mlflow.log_artifact(str(p)); mlflow.end_run(); print(r.info.artifact_uri)"
        )
        client_env = {k: v for k, v in env.items() if not k.startswith("AWS_")} | {
            k: v for k, v in creds.items() if k.startswith("MLFLOW_")
        }
        logged = subprocess.run(
            [sys.executable, "-c", script],
            capture_output=True,
            text=True,
            env=client_env,
            timeout=120,
        )
        assert logged.returncode == 0, logged.stderr[-2000:]
        import boto3

        def s3_client(key: str, secret: str):
            return boto3.client(
                "s3",
                endpoint_url=f"http://127.0.0.1:{s3}",
                aws_access_key_id=key,
                aws_secret_access_key=secret,
                region_name="us-east-1",
            )

        assert creds["AWS_ACCESS_KEY_ID"].startswith("rlhf-")
        s3c = s3_client(creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"])
        keys = [
            o["Key"]
            for o in s3c.list_objects_v2(Bucket="rlhf", Prefix="mlflow/").get("Contents", [])
        ]
        assert any(k.endswith("/artifacts/x.txt") for k in keys), keys
        with pytest.raises(Exception, match="SignatureDoesNotMatch|AccessDenied|Forbidden"):
            s3_client(creds["AWS_ACCESS_KEY_ID"], "not-the-secret").list_objects_v2(Bucket="rlhf")
        with pytest.raises(
            Exception, match="InvalidAccessKeyId|SignatureDoesNotMatch|AccessDenied"
        ):
            s3_client("shell-key", "shell-secret").list_objects_v2(Bucket="rlhf")

        # deploy; a preference file lands under the watched prefix; the sensor's event starts a pipeline run for it
        # on the worker, which completes against the stack's servers
        config = tmp_path / "tiny.yaml"
        config.write_text(
            yaml.safe_dump(
                TINY_PIPELINE
                | {
                    "run": {"name": "stack", "work_dir": str(tmp_path / "pipeline")},
                    "tracking": {
                        "experiment_name": "stack-test",
                        "result_storage": "s3://rlhf/prefect-results",
                    },
                }
            )
        )
        run_env = {
            **env,
            **creds,
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mlflow_port}",
            "RLHF_S3_ENDPOINT_URL": f"http://127.0.0.1:{s3}",
        }
        deployed = rlhf(
            "deploy",
            "--config",
            str(config),
            *sets,
            "--set",
            "deploy.watch_prefix=s3://rlhf/incoming/",
            "--set",
            "deploy.sensor_interval_s=10",
            env=run_env,
            timeout=300,
        )
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        ok, deployments = _http_ok(f"{api}/deployments/filter", "POST", {}, headers=prefect_auth)
        nightly = next(d for d in deployments if d["name"] == "nightly")
        assert (
            nightly["schedules"][0]["schedule"]["cron"] == "0 2 * * *"
            and nightly["global_concurrency_limit"]["limit"] == 1
        )
        assert nightly["work_pool_name"] == "test-pool"

        uri = "s3://rlhf/incoming/batch-001.jsonl"
        rows = generate_demo_pairs(300, seed=7)
        s3c.put_object(
            Bucket="rlhf",
            Key="incoming/batch-001.jsonl",
            Body="\n".join(
                json.dumps({k: r[k] for k in ("prompt", "chosen", "rejected")}) for r in rows
            ).encode(),
        )
        run = wait_for_run(api, uri, timeout=600, auth=prefect_auth)
        assert run["state_type"] == "COMPLETED", run["state"]
        assert run["deployment_id"] == nightly["id"]

        import mlflow

        for k, v in creds.items():
            if k.startswith("MLFLOW_"):
                monkeypatch.setenv(k, v)
        client = mlflow.MlflowClient(f"http://127.0.0.1:{mlflow_port}")
        experiment = client.get_experiment_by_name("stack-test")
        stages = {
            r.data.tags.get("rlhf.stage") for r in client.search_runs([experiment.experiment_id])
        }
        assert {
            "ingest",
            "validate",
            "split",
            "sft",
            "label",
            "reward-train",
            "reward-eval",
            "ppo",
            "evaluate",
            "register",
        } <= stages
        parent = client.search_runs([experiment.experiment_id], "tags.`rlhf.kind` = 'pipeline'")[0]
        assert parent.info.artifact_uri.startswith(
            "mlflow-artifacts:"
        )  # proxied through the server
        keys = [
            o["Key"]
            for page in s3c.get_paginator("list_objects_v2").paginate(
                Bucket="rlhf", Prefix="mlflow/"
            )
            for o in page.get("Contents", [])
        ]
        assert any(k.endswith(f"{parent.info.run_id}/artifacts/evaluation/report.md") for k in keys)
        assert any(
            k.endswith("/artifacts/MLmodel") and "/models/" in k for k in keys
        )  # the registered models' files
        assert [str(v.version) for v in client.search_model_versions("name = 'rlhf-policy'")] == [
            "1"
        ]
        assert not (
            tmp_path / "pipeline" / "artifacts"
        ).exists()  # nothing went to a local artifact folder
        results = s3c.list_objects_v2(Bucket="rlhf", Prefix="prefect-results/").get("KeyCount", 0)
        assert results >= 10  # every stage's cached result (tracking.result_storage: s3://...)
        assert not (tmp_path / "pipeline" / "results").exists()

        # what a person sees, logged in: the flow run in the Prefect UI and the pipeline run in the
        # MLflow UI (headless Chromium)
        import base64

        password = base64.b64encode(creds["PREFECT_API_AUTH_STRING"].encode()).decode()
        pages = {
            "prefect-flow-run": (
                f"http://127.0.0.1:{prefect_port}/runs/flow-run/{run['id']}",
                run["name"],
                {"local_storage": {"prefect-password": password}},
            ),
            "mlflow-run": (
                f"http://127.0.0.1:{mlflow_port}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}",
                parent.info.run_name,
                {"headers": mlflow_auth},
            ),
        }
        for name, (url, expected_text, login) in pages.items():
            png = ARTIFACTS / f"{name}.png"
            dom = browse(url, png, expected_text, **login)
            assert expected_text in dom, f"{url} does not show {expected_text!r}"
            assert png.stat().st_size > 20_000  # a rendered page, not a blank one
    finally:
        down = rlhf("stack", "down", *sets, env=env)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not state_file.exists()
    assert not any(is_ours(s) for s in started.values())  # every process group we started is gone
    status = rlhf("stack", "status", *sets, env=env)
    assert status.returncode == 1 and "down" in status.stdout
