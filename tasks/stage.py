"""What every stage task shares: its cache key, its output folder, and clean failure."""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from prefect import task
from prefect.states import Failed

from rlhf_core.config import stable_hash
from rlhf_core.errors import UserError


def code_version(*modules: ModuleType | Callable) -> str:
    """Hash of the source of the code a stage runs: editing it invalidates the stage's cache."""
    h = hashlib.sha256()
    for m in modules:
        h.update(inspect.getsource(m).encode())
    return h.hexdigest()[:12]


def make_stage_key(stage: str, input_digest: str, section: Any, code: str) -> str:
    """(input digest, config-section hash, task code version) -> the stage's cache key."""
    return f"{stage}-{stable_hash([input_digest, stable_hash(section), code], 20)}"


def cache_key_from_param(_context, parameters: dict) -> str:
    return parameters["stage_key"]


# Every stage: cached on its stage_key, result persisted so a re-run reuses it.
stage_task = task(cache_key_fn=cache_key_from_param, persist_result=True)


def stage_dir(work_dir: str | Path, stage: str, stage_key: str) -> Path:
    return Path(work_dir) / "stages" / stage / stage_key


def user_errors_fail_cleanly(fn: Callable) -> Callable:
    """A user's mistake ends the task Failed with a one-line message instead of a traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            return Failed(message=str(exc))

    return wrapper


def quiet_transformers() -> None:
    """No weight-loading reports or download bars in stage logs."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def metrics_logger(stage: str, keys: tuple[str, ...], total: int | None = None, every: int = 1):
    """on_log callback: every metric to the active MLflow run, and a readable line in the stage's
    log every `every` calls (a tqdm bar only shows on a terminal, not in Prefect's logs)."""
    import mlflow
    from prefect import get_run_logger

    logger = get_run_logger()

    def on_log(step: int, metrics: dict) -> None:
        mlflow.log_metrics(metrics, step=step)
        shown = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k in keys)
        if shown and (step % every == 0 or step == total or "eval_loss" in metrics or "eval_accuracy" in metrics):
            logger.info(f"{stage} {step}{f'/{total}' if total else ''}: {shown}")

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
