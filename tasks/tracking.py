"""MLflow bookkeeping: one parent run per pipeline run, one child run per stage."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient
from pydantic import BaseModel

from rlhf_core.config import PROJECT_ROOT, PipelineConfig

TRACKED_PACKAGES = (
    "torch",
    "transformers",
    "datasets",
    "accelerate",
    "peft",
    "trl",
    "prefect",
    "mlflow",
    "pandera",
    "pandas",
    "pyarrow",
    "boto3",
    "pydantic",
    "rlhf-pipeline",
)


class TrackingContext(BaseModel):
    """What a task needs to log into the pipeline's MLflow run (passed as a task parameter)."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    config_hash: str
    work_dir: str
    result_storage: str
    s3_endpoint: str | None = None


def package_versions() -> dict[str, str]:
    out = {}
    for name in TRACKED_PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _quiet_mlflow_db_logs() -> None:
    for name in ("alembic", "alembic.runtime.migration", "mlflow.store.db.utils"):
        logging.getLogger(name).setLevel(logging.WARNING)


def _flat_params(obj: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat_params(v, f"{prefix}{k}."))
    else:
        out[prefix.rstrip(".")] = json.dumps(obj) if isinstance(obj, (list, tuple)) else str(obj)
    return out


def work_dir_tag(cfg: PipelineConfig) -> str:
    return f"{socket.gethostname()}:{Path(cfg.work_dir).resolve()}"


def close_abandoned_runs(cfg: PipelineConfig) -> int:
    """Runs of this work dir still RUNNING were left by a run killed before it could close them:
    the caller holds the work dir's lock, so no live run owns them. Mark them KILLED, with their
    stage runs, so that MLflow's run list tells the truth. Returns how many were closed."""
    _quiet_mlflow_db_logs()
    client = MlflowClient(cfg.mlflow_tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return 0
    todo = client.search_runs(
        experiments,
        f"tags.`rlhf.work_dir` = '{work_dir_tag(cfg)}' and attributes.status = 'RUNNING'",
        max_results=1000,
    )
    closed = 0
    while todo:
        run = todo.pop()
        client.set_tag(run.info.run_id, "rlhf.abandoned", "closed by the next run on its work dir")
        client.set_terminated(run.info.run_id, status="KILLED")
        closed += 1
        todo += client.search_runs(
            [run.info.experiment_id],
            f"tags.`mlflow.parentRunId` = '{run.info.run_id}' and attributes.status = 'RUNNING'",
            max_results=1000,
        )
    return closed


def start_pipeline_run(
    cfg: PipelineConfig, run_name: str, tags: dict[str, str] | None = None
) -> TrackingContext:
    """The pipeline's MLflow parent run. Call it holding the work dir's lock (work_dir_lock)."""
    _quiet_mlflow_db_logs()
    mlflow.set_tracking_uri(cfg.mlflow_tracking_uri)
    client = MlflowClient()
    exp = client.get_experiment_by_name(cfg.tracking.experiment_name)
    experiment_id = (
        exp.experiment_id
        if exp
        else client.create_experiment(
            cfg.tracking.experiment_name, artifact_location=cfg.mlflow_artifact_location
        )
    )
    config_hash = cfg.config_hash()
    run = client.create_run(
        experiment_id,
        run_name=run_name,
        tags={
            "rlhf.config_hash": config_hash,
            "rlhf.git_commit": git_commit(),
            "rlhf.kind": "pipeline",
            "rlhf.method": cfg.run.method,
            "rlhf.work_dir": work_dir_tag(cfg),
            **(tags or {}),
        },
    )
    rid = run.info.run_id
    params = _flat_params(cfg.logged())
    for batch_start in range(0, len(params), 100):
        items = list(params.items())[batch_start : batch_start + 100]
        client.log_batch(rid, params=[mlflow.entities.Param(k, v[:6000]) for k, v in items])
    client.log_text(rid, cfg.to_yaml(), "config/resolved_config.yaml")
    client.log_dict(
        rid,
        {"config_hash": config_hash, "git_commit": git_commit(), "packages": package_versions()},
        "config/environment.json",
    )
    return TrackingContext(
        tracking_uri=cfg.mlflow_tracking_uri,
        experiment_id=experiment_id,
        parent_run_id=rid,
        config_hash=config_hash,
        work_dir=str(cfg.work_dir),
        result_storage=cfg.result_storage,
        s3_endpoint=cfg.s3.endpoint_url or os.environ.get("RLHF_S3_ENDPOINT_URL"),
    )


def finish_pipeline_run(ctx: TrackingContext, status: str) -> None:
    mlflow.set_tracking_uri(ctx.tracking_uri)
    MlflowClient().set_terminated(ctx.parent_run_id, status=status)


@contextlib.contextmanager
def stage_run(ctx: TrackingContext, stage: str, stage_key: str) -> Iterator[mlflow.ActiveRun]:
    """A child run of the pipeline run for one stage; FAILED if the stage raises."""
    _quiet_mlflow_db_logs()
    mlflow.set_tracking_uri(ctx.tracking_uri)
    with mlflow.start_run(
        experiment_id=ctx.experiment_id,
        run_name=stage,
        nested=True,
        parent_run_id=ctx.parent_run_id,
        tags={
            "rlhf.stage": stage,
            "rlhf.stage_key": stage_key,
            "rlhf.config_hash": ctx.config_hash,
        },
    ) as run:
        yield run


def log_cached_stage(
    ctx: TrackingContext,
    stage: str,
    key: str,
    cached_from_run: str,
    metrics: dict[str, float],
    summary_files: list[str],
) -> str:
    """A stage Prefect served from cache still gets a child run, so every pipeline run shows every
    stage's metrics side by side; it points at the run that did the work."""
    mlflow.set_tracking_uri(ctx.tracking_uri)
    client = MlflowClient()
    run = client.create_run(
        ctx.experiment_id,
        run_name=f"{stage} (cached)",
        tags={
            "mlflow.parentRunId": ctx.parent_run_id,
            "rlhf.stage": stage,
            "rlhf.stage_key": key,
            "rlhf.cached_from_run": cached_from_run,
            "rlhf.config_hash": ctx.config_hash,
        },
    )
    if metrics:
        now = int(time.time() * 1000)
        client.log_batch(
            run.info.run_id,
            metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items()],
        )
    for path in summary_files:
        if Path(path).exists():
            client.log_artifact(run.info.run_id, path)
    client.set_terminated(run.info.run_id)
    return run.info.run_id
