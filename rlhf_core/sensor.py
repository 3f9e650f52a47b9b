"""The data sensor's bookkeeping: which preference files under an S3 prefix have started a
pipeline run, and which of those runs to start again.

Its state lives in the bucket beside the data (`s3://<bucket>/.rlhf/sensor/<prefix digest>.json`;
hidden keys are never taken for data), so it has no size limit:

    {"since": newest LastModified seen, "recent": [key#etag seen within the look-back window],
     "runs": {key#etag: {"uri", "run_id", "attempt", "key"}}}   # runs not yet completed

Two runs never start for one file: a run is started under an idempotency key made of the file's
identity and the attempt, so a sensor that dies after starting a run and before saving its state
finds the same run again on its next tick instead of starting another one. A run that ends
FAILED or CRASHED is started again (a new attempt, a new key) up to `retries` times.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from rlhf_core.config import S3Config, stable_hash
from rlhf_core.storage import new_s3_files, s3_client, s3_error, split_s3_uri

STATE_PREFIX = ".rlhf/sensor/"
RETRY_STATES = {"FAILED", "CRASHED"}
DONE_STATES = {"COMPLETED", "CANCELLED", "CANCELLING"}  # a person cancelled: not retried

StartRun = Callable[[str, str], str]  # (data URI, idempotency key) -> flow run id
RunState = Callable[[str], str]  # flow run id -> its state type (COMPLETED, FAILED, ...)


def state_location(prefix_uri: str) -> tuple[str, str]:
    bucket, _ = split_s3_uri(prefix_uri)
    return bucket, f"{STATE_PREFIX}{stable_hash(prefix_uri, 16)}.json"


def load_state(prefix_uri: str, cfg: S3Config) -> dict | None:
    """The sensor's state for the prefix; None before the first look."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = state_location(prefix_uri)
    try:
        body = s3_client(cfg).get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise s3_error(f"s3://{bucket}/{key}", exc) from None
    except BotoCoreError as exc:
        raise s3_error(f"s3://{bucket}/{key}", exc) from None
    return json.loads(body)


def save_state(prefix_uri: str, cfg: S3Config, state: dict) -> None:
    """One PUT: S3 replaces an object whole, so a reader sees the old state or the new one."""
    from botocore.exceptions import BotoCoreError, ClientError

    bucket, key = state_location(prefix_uri)
    try:
        s3_client(cfg).put_object(Bucket=bucket, Key=key, Body=json.dumps(state).encode())
    except (ClientError, BotoCoreError) as exc:
        raise s3_error(f"s3://{bucket}/{key}", exc) from None


def prime(prefix_uri: str, cfg: S3Config) -> int:
    """Take what is under the prefix now as seen (at deploy time): only files that land later
    start runs. Returns how many were there; an existing state is kept."""
    if load_state(prefix_uri, cfg) is not None:
        return 0
    existing, listing = new_s3_files(prefix_uri, cfg, None)
    save_state(prefix_uri, cfg, {**listing, "runs": {}})
    return len(existing)


def run_key(identity: str, attempt: int) -> str:
    return f"rlhf-data:{stable_hash(identity, 24)}:{attempt}"


def tick(
    prefix_uri: str,
    cfg: S3Config,
    state: dict,
    start_run: StartRun,
    run_state: RunState,
    retries: int,
    log: Callable[[str], None] = print,
) -> tuple[list[str], dict]:
    """One look: a run for each new file, a new attempt for each failed run with retries left.
    Returns (the URIs runs were started for, the new state); the caller saves the state."""
    new, listing = new_s3_files(prefix_uri, cfg, state)
    runs = {k: dict(v) for k, v in state.get("runs", {}).items()}
    started = []
    for ident, run in list(runs.items()):
        status = run_state(run["run_id"])
        if status in DONE_STATES:
            del runs[ident]
        elif status in RETRY_STATES:
            if run["attempt"] > retries:
                log(f"{run['uri']}: run {run['run_id']} {status.lower()}; no retries left")
                del runs[ident]
                continue
            key = run_key(ident, run["attempt"] + 1)
            run.update(attempt=run["attempt"] + 1, key=key, run_id=start_run(run["uri"], key))
            log(f"{run['uri']}: run {status.lower()}, attempt {run['attempt']} is {run['run_id']}")
            started.append(run["uri"])
    for uri, ident in new:
        if ident in runs:  # re-announced within the window while its run is under way
            continue
        key = run_key(ident, 1)
        runs[ident] = {"uri": uri, "key": key, "attempt": 1, "run_id": start_run(uri, key)}
        log(f"new preference data: {uri} -> run {runs[ident]['run_id']}")
        started.append(uri)
    return started, {**listing, "runs": runs}
