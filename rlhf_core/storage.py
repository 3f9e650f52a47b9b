"""Files and object stores: atomic writes, content fingerprints, and S3 through boto3.

S3 credentials come only from the environment / boto3's usual chain and are never logged.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from rlhf_core.config import S3Config
from rlhf_core.errors import UnusableInputError, UserError


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Write a folder's files in a hidden staging folder and move them in only on success,
    so a failure never leaves half-written artifacts behind."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        yield staging
        if not final.exists():
            os.replace(staging, final)
        else:
            for item in staging.iterdir():
                target = final / item.name
                if target.is_dir():
                    shutil.rmtree(target)
                os.replace(item, target)
            staging.rmdir()
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


_HELD: dict[Path, int] = {}  # work dirs this process holds: path -> depth (the lock is re-entrant)


@contextlib.contextmanager
def work_dir_lock(work_dir: Path, what: str = "a pipeline run") -> Iterator[None]:
    """One run per work dir at a time: an exclusive lock on <work_dir>/.lock (released by the OS
    when the holder dies, even by kill -9). A second run fails at once with one line naming the
    holder; the same process may take it again (the CLI, then the flow inside it)."""
    work_dir = Path(work_dir).resolve()
    if work_dir in _HELD:
        _HELD[work_dir] += 1
        try:
            yield
        finally:
            _HELD[work_dir] -= 1
        return
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / ".lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "{}"
            try:
                h = json.loads(holder)
                since = time.strftime("%H:%M:%S", time.localtime(h["since"]))
                by = f"{h['what']} (pid {h['pid']} on {h['host']}, since {since})"
            except (ValueError, KeyError, TypeError):
                by = "another process"
            raise UserError(
                f"{work_dir} is in use by {by}: wait for it to finish, or set another run.work_dir"
            ) from None
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.time(),
            "what": what,
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        _HELD[work_dir] = 1
        try:
            yield
        finally:
            del _HELD[work_dir]
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def file_digest(path: Path, block: int = 1 << 23) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            h.update(chunk)
    return h.hexdigest()


def split_s3_uri(uri: str) -> tuple[str, str]:
    rest = uri.removeprefix("s3://")
    bucket, _, key = rest.partition("/")
    if not bucket or not key:
        raise UserError(f"{uri}: expected s3://bucket/key")
    return bucket, key


def s3_client(cfg: S3Config):
    import boto3
    from botocore.config import Config

    # A fresh session reads the credentials from the environment now (boto3's default session keeps the first ones).
    return boto3.session.Session().client(
        "s3",
        endpoint_url=cfg.endpoint_url or os.environ.get("RLHF_S3_ENDPOINT_URL") or None,
        region_name=cfg.region or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        config=Config(
            retries={"max_attempts": 5, "mode": "standard"}, connect_timeout=5, read_timeout=60
        ),
    )


def s3_error(uri: str, exc: Exception) -> UserError:
    code = getattr(exc, "response", {}).get("Error", {}).get("Code", "")
    if code in ("404", "NoSuchKey", "NotFound"):
        return UnusableInputError(f"{uri}: no such object")
    if code in ("NoSuchBucket",):
        return UnusableInputError(f"{uri}: no such bucket")
    return UnusableInputError(f"{uri}: S3 error ({code or type(exc).__name__}: {exc})")


def s3_fingerprint(uri: str, cfg: S3Config) -> str:
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_uri(uri)
    try:
        head = s3_client(cfg).head_object(Bucket=bucket, Key=key)
    except (ClientError, BotoCoreError) as exc:
        raise s3_error(uri, exc) from None
    return hashlib.sha256(
        f"{uri}|{head.get('ETag')}|{head.get('ContentLength')}".encode()
    ).hexdigest()


def s3_download(uri: str, cache_dir: Path, cfg: S3Config) -> Path:
    """Stream an object to a local cache file named by its ETag (downloaded once, atomically)."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = split_s3_uri(uri)
    fingerprint = s3_fingerprint(uri, cfg)[:16]
    target = Path(cache_dir) / fingerprint / Path(key).name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        s3_client(cfg).download_file(bucket, key, str(tmp))
        os.replace(tmp, target)
    except (ClientError, BotoCoreError) as exc:
        raise s3_error(uri, exc) from None
    finally:
        tmp.unlink(missing_ok=True)
    return target


def source_fingerprint(path: str, cfg: S3Config) -> str:
    """Content identity of a source, for cache keys: file bytes, folder files, or the S3 ETag."""
    if path.startswith("s3://"):
        return s3_fingerprint(path, cfg)
    if path.startswith("hf://"):
        return hashlib.sha256(path.encode()).hexdigest()
    p = Path(path)
    if p.is_file():
        return file_digest(p)
    if p.is_dir():
        h = hashlib.sha256()
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode())
            h.update(file_digest(f).encode())
        return h.hexdigest()
    raise UnusableInputError(f"{path}: no such file")


DATA_SUFFIXES = (
    ".jsonl",
    ".ndjson",
    ".json",
    ".csv",
    ".parquet",
    ".jsonl.gz",
    ".ndjson.gz",
    ".json.gz",
    ".csv.gz",
)


def new_s3_objects(
    prefix_uri: str, cfg: S3Config, state: dict | None, lookback_s: float = 3600.0
) -> tuple[list[str], dict]:
    """Preference files under an S3 prefix that are new since `state` (what the previous call returned):
    (their s3:// URIs, oldest first; the new state). See new_s3_files."""
    new, state = new_s3_files(prefix_uri, cfg, state, lookback_s)
    return [uri for uri, _ in new], state


def new_s3_files(
    prefix_uri: str, cfg: S3Config, state: dict | None, lookback_s: float = 3600.0
) -> tuple[list[tuple[str, str]], dict]:
    """(s3:// URI, identity) of each preference file under an S3 prefix that is new since `state`,
    oldest first, and the new state. The identity is key and ETag, so a file uploaded again with
    other content counts as new. The state keeps the newest LastModified seen and the objects
    modified within `lookback_s` before it: S3 dates a multipart upload by its start, so a slow
    upload may appear after a newer one and still be caught."""
    from datetime import datetime, timedelta

    from botocore.exceptions import BotoCoreError, ClientError

    bucket, prefix = split_s3_uri(prefix_uri)
    found = []
    try:
        for page in (
            s3_client(cfg).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        ):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if not key.lower().endswith(DATA_SUFFIXES) or "/." in f"/{key}":
                    continue  # not a data file, or a hidden/partial upload
                found.append(
                    (obj["LastModified"], key, f"{key}#{obj.get('ETag', '').strip(chr(34))}")
                )
    except (ClientError, BotoCoreError) as exc:
        raise s3_error(prefix_uri, exc) from None
    window = timedelta(seconds=lookback_s)
    since = datetime.fromisoformat(state["since"]) if state and state.get("since") else None
    recent = set(state.get("recent", [])) if state else set()
    new = sorted(
        (t, k, ident)
        for t, k, ident in found
        if ident not in recent and (since is None or t >= since - window)
    )
    newest = max([t for t, _, _ in found] + ([since] if since else []), default=None)
    keep = sorted(ident for t, _, ident in found if newest is not None and t >= newest - window)
    return [(f"s3://{bucket}/{k}", ident) for _, k, ident in new], {
        "since": newest.isoformat() if newest else None,
        "recent": keep,
    }
