"""Point Prefect and MLflow at the configured locations before either is imported.

Defaults need no server: Prefect's ephemeral mode with its home in the work dir, MLflow on a
SQLite file with a local artifact folder.
"""

from __future__ import annotations

import os

from rlhf_core.config import PipelineConfig


def configure_environment(cfg: PipelineConfig) -> None:
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    env = os.environ
    # Only fill what the user has not chosen: an exported PREFECT_API_URL still wins over ephemeral mode.
    if cfg.tracking.prefect_api_url:
        env["PREFECT_API_URL"] = cfg.tracking.prefect_api_url
    env.setdefault("PREFECT_HOME", str(cfg.prefect_home))
    env.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    env.setdefault("PREFECT_CLOUD_ENABLE_ORCHESTRATION_TELEMETRY", "false")
    env.setdefault("PREFECT_TELEMETRY_ENABLE_RESOURCE_METRICS", "false")
    env.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # 2 slow cores
    env.setdefault("PREFECT_RESULTS_PERSIST_BY_DEFAULT", "true")
    env.setdefault(
        "PREFECT_RESULTS_DEFAULT_SERIALIZER", "json"
    )  # never pickle (see tasks/stage.py)
    # results of tasks that are not stages (the flow's own summary); never an s3:// string, which
    # Prefect would take for a relative folder "s3:" in the current directory
    local = cfg.result_storage
    if local.startswith("s3://"):
        local = str(cfg.work_dir / "results")
    env.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", local)
    env.setdefault("MLFLOW_TRACKING_URI", cfg.mlflow_tracking_uri)
    env.setdefault("HF_HUB_OFFLINE", "1")  # offline by default; users who are online can unset it
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault(
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"
    )  # one bar per small download floods the stage logs
