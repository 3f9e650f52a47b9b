"""S3 access: retries with backoff, then one clear line when the store is unreachable; the sensor's bookkeeping."""

import subprocess
import sys
from pathlib import Path

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
