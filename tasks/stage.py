"""What every stage shares: a declaration that keys and types it, its output folder, its MLflow
child run, the cache, and clean failure.

A stage is a function `fn(ctx, **inputs) -> SomeResult` decorated with `@stage(name, code=...)`.
Its cache key is computed from its inputs alone: upstream results by their keys, config sections
by their values (and the content of the files they name), plain values as they are, plus the
source of the code it runs. The flow calls `fn(tracking, **inputs)` and gets the typed result,
from the work or from the cache; it never builds a key or looks into a folder.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, TypeVar

import mlflow
from prefect import get_run_logger, task
from prefect.context import TaskRunContext
from prefect.filesystems import LocalFileSystem
from prefect.serializers import Serializer
from prefect.states import Failed, State
from prefect.transactions import get_transaction
from pydantic import BaseModel, ConfigDict

from rlhf_core.config import PROJECT_ROOT, S3Config, Section, stable_hash
from rlhf_core.errors import UserError
from rlhf_core.provenance import files_version
from rlhf_core.redaction import redact_url
from rlhf_core.storage import s3_client, source_fingerprint
from tasks.tracking import TrackingContext, log_cached_stage, stage_run


class StageResult(BaseModel):
    """What a stage returns: where its outputs are, what it measured, and its key (the digest
    downstream stages key on)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    stage: str
    key: str
    out_dir: str
    mlflow_run_id: str = ""
    metrics: dict[str, float] = {}
    summary_files: list[str] = []  # logged again to the child run of a cached run


R = TypeVar("R", bound=StageResult)


def _result_classes() -> dict[str, type[StageResult]]:
    found, todo = {}, [StageResult]
    while todo:
        cls = todo.pop()
        found[cls.__name__] = cls
        todo += cls.__subclasses__()
    return found


class StageResultSerializer(Serializer):
    """Stage results as plain JSON. Prefect pickles results by default, and unpickling a cached
    result that someone could write to is code execution; here only known result classes are
    rebuilt from plain data."""

    type: Literal["rlhf-stage-json"] = "rlhf-stage-json"

    def dumps(self, obj: Any) -> bytes:
        if isinstance(obj, StageResult):
            return json.dumps(
                {"kind": type(obj).__name__, "data": obj.model_dump(mode="json")}
            ).encode()
        return json.dumps({"kind": None, "data": obj}).encode()

    def loads(self, blob: bytes) -> Any:
        record = json.loads(blob)
        if record["kind"] is None:
            return record["data"]
        return _result_classes()[record["kind"]].model_validate(record["data"])


class StageFailed(Exception):
    def __init__(self, state: State):
        super().__init__(state.message)
        self.state = state

    @classmethod
    def because(cls, message: str) -> StageFailed:
        return cls(Failed(message=message))


@dataclass
class StageContext:
    """Handed to a stage function: its key, output folder and MLflow child run."""

    name: str
    key: str
    out_dir: Path
    tracking: TrackingContext
    run: Any  # mlflow.ActiveRun

    @property
    def checkpoints(self) -> Path:
        """Outlives a killed run: the next run of the same key resumes from it."""
        return self.out_dir.with_name(self.out_dir.name + ".checkpoints")

    @property
    def work_dir(self) -> Path:
        return Path(self.tracking.work_dir)

    def result(self, cls: type[R], **fields: Any) -> R:
        return cls(
            stage=self.name,
            key=self.key,
            out_dir=str(self.out_dir),
            mlflow_run_id=self.run.info.run_id,
            **fields,
        )


PROJECT_PACKAGES = ("rlhf_core", "tasks")


def code_version(*parts: ModuleType | Path, root: Path = PROJECT_ROOT) -> str:
    """Hash of the code a stage runs: each module given and every project module it imports,
    transitively (import_closure), plus shipped files such as the default constitution. Editing
    any of it invalidates the stage's cache, and the stages after it (their keys hold its key)."""
    modules = [Path(p.__file__) for p in parts if isinstance(p, ModuleType)]
    data = [p for p in parts if isinstance(p, Path)]
    return files_version(modules, data, root, PROJECT_PACKAGES)


@functools.lru_cache(maxsize=256)
def _fingerprint(path: str, endpoint: str | None, stamp: tuple) -> str:
    return source_fingerprint(path, S3Config(endpoint_url=endpoint))


def _file_identity(path: str, endpoint: str | None) -> str:
    """Content digest of a file, folder or S3 object a setting names; a name that is not a
    path (a hub id, 'minilm', 'policy') stands for itself."""
    if path.startswith("s3://"):
        return _fingerprint(path, endpoint, (path,))
    p = Path(path).expanduser()
    if not p.exists():
        return path
    # the digest is recomputed when any file's stat changes (a folder's own mtime does not move
    # when a file in it is rewritten)
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    stamp = tuple((str(f), st.st_mtime_ns, st.st_size) for f in files for st in [f.stat()])
    return _fingerprint(str(p.resolve()), None, stamp)


def input_digest(
    value: Any, endpoint: str | None = None, ignore: frozenset[str] = frozenset()
) -> Any:
    """What of an input goes into a cache key."""
    if isinstance(value, StageResult):
        return value.key
    if isinstance(value, Section):
        out = {}
        for name, field in type(value).model_fields.items():
            if name in ignore:
                continue
            v = getattr(value, name)
            extra = field.json_schema_extra or {}
            if isinstance(v, str) and isinstance(extra, dict) and extra.get("input_file"):
                out[name] = [v, _file_identity(v, endpoint)]
            else:
                out[name] = input_digest(v, endpoint)
        return out
    if isinstance(value, (list, tuple)):
        return [input_digest(v, endpoint) for v in value]
    if isinstance(value, dict):
        return {k: input_digest(v, endpoint) for k, v in value.items()}
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return value


@functools.cache
def result_storage_block(basepath: str, s3_endpoint: str | None = None) -> str:
    """Prefect wants result storage as a saved block: one per configured location, a folder or
    s3://bucket/prefix. S3 credentials stay in the environment (the block stores the endpoint)."""
    name = f"rlhf-results-{stable_hash([basepath, s3_endpoint], 10)}"
    if basepath.startswith("s3://"):
        from prefect_aws import AwsCredentials, S3Bucket
        from prefect_aws.client_parameters import AwsClientParameters

        from rlhf_core.storage import split_s3_uri

        bucket, prefix = split_s3_uri(basepath)
        params = (
            AwsClientParameters(endpoint_url=s3_endpoint) if s3_endpoint else AwsClientParameters()
        )
        S3Bucket(
            bucket_name=bucket,
            bucket_folder=prefix.rstrip("/"),
            credentials=AwsCredentials(aws_client_parameters=params),
        ).save(name, overwrite=True)
        return f"s3-bucket/{name}"
    LocalFileSystem(basepath=basepath).save(name, overwrite=True)
    return f"local-file-system/{name}"


def quiet_transformers() -> None:
    """No weight-loading reports or download bars in stage logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _cache_key(_context, parameters: dict) -> str:
    return parameters["key"]


def stage(
    name: str,
    *,
    code: tuple[Path, ...] = (),
    ignore: dict[str, set[str]] | None = None,
    folder: str | None = None,
) -> Callable:
    """Declare a pipeline stage (see the module docstring). `code`: shipped data files it reads
    (the code it runs is found from its module's imports: code_version); `ignore`: config fields a stage never reads, by parameter name
    (they stay out of its key); `folder`: its folder under <work_dir>/stages (default: name)."""
    ignored = {k: frozenset(v) for k, v in (ignore or {}).items()}

    def declare(fn: Callable[..., R]) -> Callable[..., R]:
        version = code_version(sys.modules[fn.__module__], *code)

        @task(
            name=name,
            cache_key_fn=_cache_key,
            persist_result=True,
            result_serializer=StageResultSerializer(),
        )
        def run(key: str, tracking: TrackingContext, inputs: dict) -> StageResult | State:
            quiet_transformers()
            out = Path(tracking.work_dir) / "stages" / (folder or name) / key
            try:
                with stage_run(tracking, name, key) as mlflow_run:
                    result = fn(StageContext(name, key, out, tracking, mlflow_run), **inputs)
                    store_result(result, tracking.result_storage)
                    return result
            except UserError as exc:  # a user's mistake: one line, no traceback
                # Prefect would store the returned state's empty result under the stage's key,
                # and the next run would take it for a cached result
                get_transaction().write_on_commit = False
                return Failed(message=str(exc))

        @functools.wraps(fn)
        def call(tracking: TrackingContext, **inputs: Any) -> R:
            digest = {
                k: input_digest(v, tracking.s3_endpoint, ignored.get(k, frozenset()))
                for k, v in sorted(inputs.items())
            }
            # outputs live in the work dir, so the key names it too
            key = f"{name}-{stable_hash([digest, version, tracking.work_dir], 20)}"
            return _run_cached(run, name, key, tracking, inputs)

        call.code_version = version
        call.ignored = ignored
        call.task = run
        return call

    return declare


# Seconds between tries to store a finished stage's result: a store that restarts is back in
# well under a minute, and a stage's work is worth that wait.
RESULT_WRITE_WAITS = (2.0, 5.0, 10.0, 20.0)


def store_result(result: StageResult, storage: str) -> None:
    """Write a finished stage's result to the result store now, retried, and fail the stage with
    one line if it cannot. Left to Prefect, a failed write is a logged traceback and the run goes
    on with the stage missing from the cache, to be redone by the next run. The record written
    here is the cache entry, so the task's transaction does not write it again."""
    store = TaskRunContext.get().result_store
    for wait in (*RESULT_WRITE_WAITS, None):
        try:
            store.write(obj=result, key=result.key)
            get_transaction().write_on_commit = False
            return
        except Exception as exc:  # noqa: BLE001 - any storage backend, any failure
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            if wait is None:
                raise UserError(
                    f"{result.stage}: finished, but its result could not be stored in "
                    f"{redact_url(storage)} ({why}); its outputs are in {result.out_dir}. "
                    "Bring the store back and run again: stages stored before it are not redone"
                ) from None
            get_run_logger().warning(
                f"{result.stage}: storing the result failed ({why}); again in {wait:g} s"
            )
            time.sleep(wait)


def check_result_store(storage: str, s3_endpoint: str | None) -> None:
    """A stage whose cache cannot be read would be recomputed (Prefect takes an unreadable cache
    for a miss), and then could not be stored: fail before the work, with one line."""
    if not storage.startswith("s3://"):
        return
    from botocore.exceptions import BotoCoreError, ClientError

    bucket = storage.removeprefix("s3://").split("/")[0]
    try:
        s3_client(S3Config(endpoint_url=s3_endpoint)).head_bucket(Bucket=bucket)
    except (ClientError, BotoCoreError) as exc:
        raise UserError(
            f"result store {redact_url(storage)} is unreachable "
            f"({type(exc).__name__}: {str(exc).splitlines()[0]}); bring it back and run again"
        ) from None


def _stored_record(storage: str, key: str, s3_endpoint: str | None) -> bytes | None:
    """The bytes stored under a result key, or None when there are none."""
    if not storage.startswith("s3://"):
        path = Path(storage) / key
        return path.read_bytes() if path.is_file() else None
    from botocore.exceptions import ClientError

    from rlhf_core.storage import split_s3_uri

    bucket, prefix = split_s3_uri(storage)
    name = f"{prefix.rstrip('/')}/{key}" if prefix.strip("/") else key
    try:
        obj = s3_client(S3Config(endpoint_url=s3_endpoint)).get_object(Bucket=bucket, Key=name)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
            return None
        raise
    return obj["Body"].read()


def check_stored_record(storage: str, key: str, s3_endpoint: str | None) -> None:
    """A stored result record names the serializer Prefect loads it with, pickle included, so
    whoever can write to the store could plant a pickle under a stage's key and run code at the
    next cache hit. A record that is not a stage's JSON is refused, with one line, before Prefect
    reads it."""
    raw = _stored_record(storage, key, s3_endpoint)
    if raw is None:
        return
    try:
        kind = json.loads(raw)["metadata"]["serializer"]["type"]
    except (ValueError, KeyError, TypeError):
        kind = None
    if kind != StageResultSerializer.model_fields["type"].default:
        raise UserError(
            f"the stored result {key} in {redact_url(storage)} is not a stage's JSON record "
            f"(serializer {kind!r}); it was not read. Whoever can write to the result store can "
            "run code through such a record: check who wrote it, delete it, and run again"
        )


def _run_cached(run, name: str, key: str, tracking: TrackingContext, inputs: dict) -> StageResult:
    """Run a stage task (served from cache when its key matches), and keep MLflow complete."""
    try:
        check_result_store(tracking.result_storage, tracking.s3_endpoint)
        check_stored_record(tracking.result_storage, key, tracking.s3_endpoint)
    except UserError as exc:
        raise StageFailed.because(f"{name}: {exc}") from None
    run = run.with_options(
        result_storage=result_storage_block(tracking.result_storage, tracking.s3_endpoint)
    )
    state = run(key=key, tracking=tracking, inputs=inputs, return_state=True)
    if state.is_completed() and state.name == "Cached":
        result = state.result()
        if Path(result.out_dir).exists():
            log_cached_stage(
                tracking,
                name,
                result.key,
                result.mlflow_run_id,
                result.metrics,
                result.summary_files,
            )
            return result
        get_run_logger().warning(f"{name}: cached output {result.out_dir} is gone; recomputing")
        state = run.with_options(refresh_cache=True)(
            key=key, tracking=tracking, inputs=inputs, return_state=True
        )
    if not state.is_completed():
        raise StageFailed(state)
    return state.result()


def metrics_logger(
    stage_name: str, keys: tuple[str, ...], total: int | None = None, every: int = 1
):
    """on_log callback: every metric to the active MLflow run, and a readable line in the stage's
    log every `every` calls (a tqdm bar only shows on a terminal, not in Prefect's logs)."""
    logger = get_run_logger()

    def on_log(step: int, metrics: dict) -> None:
        mlflow.log_metrics(metrics, step=step)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in keys)
        final = step == total or any(
            k in metrics for k in ("eval_loss", "eval_accuracy", "val_win_rate")
        )
        if shown and (step % every == 0 or final):
            logger.info(f"{stage_name} {step}{f'/{total}' if total else ''}: {shown}")

    return on_log


class _NoEmptyTraceback(logging.Filter):
    """Prefect logs a Failed state returned by a task with exc_info set but no exception,
    which prints 'NoneType: None'; a clean failure should be just its message."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[0] is None:
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_clean_failures() -> None:
    logger = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, _NoEmptyTraceback) for f in logger.filters):
        logger.addFilter(_NoEmptyTraceback())
