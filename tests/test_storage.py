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
