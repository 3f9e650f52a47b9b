"""S3 access: retries with backoff, then one clear line when the store is unreachable; the sensor's bookkeeping."""

import json
import subprocess
import sys
from pathlib import Path

from prefect import flow

from rlhf_core.config import S3Config
from rlhf_core.errors import UserError
from rlhf_core.services import free_ports
from rlhf_core.storage import new_s3_objects, s3_client, s3_download


def test_unreachable_store_retries_then_fails_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    port = free_ports(1)[0]  # nothing listens there
    cfg = S3Config(endpoint_url=f"http://127.0.0.1:{port}")
    client = s3_client(cfg)
    attempts = []
    client.meta.events.register("before-send", lambda **kw: attempts.append(1))
    try:
        client.head_object(Bucket="b", Key="k")
    except Exception as exc:  # noqa: BLE001
        assert type(exc).__name__ == "EndpointConnectionError"
    assert len(attempts) >= 5  # retried (botocore standard mode: exponential backoff with jitter)
    try:
        s3_download("s3://b/data.jsonl", tmp_path, cfg)
        raise AssertionError("no error")
    except UserError as err:
        assert str(err).startswith(
            "s3://b/data.jsonl: S3 error (EndpointConnectionError"
        ) and "\n" not in str(err)
    assert not list(tmp_path.rglob("*.part"))  # nothing half-written
    cli = subprocess.run(
        [str(Path(sys.executable).parent / "rlhf"), "data", "validate", "s3://b/data.jsonl"],
        capture_output=True,
        text=True,
        timeout=120,
        env={
            "PATH": "/usr/bin:/bin",
            "AWS_ACCESS_KEY_ID": "k",
            "AWS_SECRET_ACCESS_KEY": "s",
            "RLHF_S3_ENDPOINT_URL": cfg.endpoint_url,
            "HOME": str(tmp_path),
        },
    )
    assert (
        cli.returncode == 2
        and cli.stderr.strip().count("\n") == 0
        and "Could not connect" in cli.stderr
    )
    assert "Traceback" not in cli.stderr


def test_new_objects_since_the_last_look(s3_env):
    client = s3_env.client()
    cfg = S3Config(endpoint_url=s3_env.endpoint_url)
    for key in ("watch/a.jsonl", "watch/notes.txt", "watch/.b.jsonl.part"):
        client.put_object(Bucket="prefs", Key=key, Body=b"{}\n")
    first, state = new_s3_objects("s3://prefs/watch/", cfg, None)
    assert first == ["s3://prefs/watch/a.jsonl"]  # data files only; no hidden partial uploads
    again, state = new_s3_objects("s3://prefs/watch/", cfg, state)
    assert again == []
    client.put_object(Bucket="prefs", Key="watch/c.csv.gz", Body=b"x")
    client.put_object(Bucket="prefs", Key="watch/sub/d.parquet", Body=b"x")
    later, state = new_s3_objects("s3://prefs/watch/", cfg, state)
    assert sorted(later) == ["s3://prefs/watch/c.csv.gz", "s3://prefs/watch/sub/d.parquet"]
    assert new_s3_objects("s3://prefs/watch/", cfg, state)[0] == []
    client.put_object(
        Bucket="prefs", Key="watch/a.jsonl", Body=b'{"new": 1}\n'
    )  # the same file again, other content
    assert new_s3_objects("s3://prefs/watch/", cfg, state)[0] == ["s3://prefs/watch/a.jsonl"]
    _, narrow = new_s3_objects("s3://prefs/watch/", cfg, state, lookback_s=0)
    assert len(narrow["recent"]) <= 3  # only what is inside the look-back window is remembered


HOLD = (
    "import sys, time; from rlhf_core.storage import work_dir_lock\n"
    "with work_dir_lock(sys.argv[1], 'the holder test'):\n"
    "    print('held', flush=True); time.sleep(600)\n"
)


def test_one_run_per_work_dir(tmp_path):
    """A second run on a busy work dir fails at once with one line naming the holder; the lock
    dies with its holder (kill -9 too); one process may take it again."""
    import os
    import signal

    import pytest

    from rlhf_core.storage import work_dir_lock

    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(tmp_path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError) as busy:
            with work_dir_lock(tmp_path):
                pass
        msg = str(busy.value)
        assert f"is in use by the holder test (pid {holder.pid} on " in msg and "\n" not in msg
        from tests.test_cli import rlhf  # the CLI: refused before Prefect touches the work dir

        r = rlhf("run", "--set", f"run.work_dir={tmp_path}", cwd=Path(__file__).parent.parent)
        assert r.returncode != 0 and "is in use by the holder test" in r.stderr + r.stdout
        assert not (tmp_path / "prefect").exists()
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    with work_dir_lock(tmp_path, "me"):
        with work_dir_lock(tmp_path, "me again"):  # re-entrant: the CLI, then its flow
            pass


def test_checkpoint_writers_never_share_a_staging_folder(tmp_path):
    from rlhf_core.training import checkpoint_folder

    with checkpoint_folder(tmp_path, "step-00000005", "step-", 2) as a:
        with checkpoint_folder(tmp_path, "step-00000005", "step-", 2) as b:
            assert a != b
            (b / "w").write_text("b")
        (a / "w").write_text("a")
    assert (tmp_path / "step-00000005" / "w").read_text() == "a"
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000005"]


@flow(name="sensor-target")
def sensor_target(data_path: str) -> None:
    """What the sensor's runs would run (they stay scheduled: no worker here)."""


def _flow_runs(deployment_id) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

    runs, page = [], None
    with get_client(sync_client=True) as client:
        while page is None or len(page) == 200:  # the API's largest page
            page = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id])),
                limit=200,
                offset=len(runs),
            )
            runs += page
    return runs


def test_the_sensor_starts_one_run_per_file_and_retries_failed_runs(prefect_harness, s3_env):
    """500 files under the watched prefix (a state far beyond a Prefect Variable's 5,000
    characters): one pipeline run each, on the real Prefect server and S3 store; looking again,
    or after a crash between starting runs and saving the state, starts none twice; a failed run
    is started again deploy.run_retries times, then left alone."""
    from prefect.client.orchestration import get_client
    from prefect.states import Completed, Failed

    from flows.sensor import data_sensor
    from rlhf_core import sensor

    deployment_id = sensor_target.to_deployment(name="runs").apply()
    prefix, cfg = "s3://prefs/burst/", S3Config(endpoint_url=s3_env.endpoint_url)
    s3 = {"endpoint_url": s3_env.endpoint_url}
    client = s3_env.client()
    client.put_object(Bucket="prefs", Key="burst/old.jsonl", Body=b"{}\n")
    assert sensor.prime(prefix, cfg) == 1  # there before deploying: no run
    for i in range(500):
        client.put_object(Bucket="prefs", Key=f"burst/f{i:03d}.jsonl", Body=f"{i}\n".encode())
    run = dict(prefix=prefix, s3=s3, deployment="sensor-target/runs", retries=1)

    before_save = sensor.load_state(prefix, cfg)
    started = data_sensor(**run)
    assert len(started) == 500 and len(set(started)) == 500
    state = sensor.load_state(prefix, cfg)
    assert len(json.dumps(state)) > 5000 and len(state["runs"]) == 500
    assert data_sensor(**run) == []  # nothing new
    sensor.save_state(prefix, cfg, before_save)  # as if the first look died before saving
    assert len(data_sensor(**run)) == 500  # announced again...
    runs = _flow_runs(deployment_id)
    assert len(runs) == 500  # ...but no file has two runs
    assert {r.parameters["data_path"] for r in runs} == {
        f"s3://prefs/burst/f{i:03d}.jsonl" for i in range(500)
    }

    # one run fails, the others complete: only the failed one starts again, once (retries=1)
    by_path = {r.parameters["data_path"]: r for r in runs}
    failing = "s3://prefs/burst/f007.jsonl"
    with get_client(sync_client=True) as c:
        for path, r in by_path.items():
            c.set_flow_run_state(r.id, Failed() if path == failing else Completed(), force=True)
    assert data_sensor(**run) == [failing]
    runs = _flow_runs(deployment_id)
    retry = [
        r for r in runs if r.parameters["data_path"] == failing and r.id != by_path[failing].id
    ]
    assert len(runs) == 501 and len(retry) == 1
    assert list(sensor.load_state(prefix, cfg)["runs"]) == [
        next(i for i in state["runs"] if state["runs"][i]["uri"] == failing)
    ]
    with get_client(sync_client=True) as c:
        c.set_flow_run_state(retry[0].id, Failed(), force=True)
    assert data_sensor(**run) == []  # no retries left: given up, and said so
    assert len(_flow_runs(deployment_id)) == 501 and sensor.load_state(prefix, cfg)["runs"] == {}
