"""`rlhf deploy`: the pipeline deployment (nightly schedule, one run at a time) and, when a prefix is
watched, the data sensor that starts a pipeline run for each new file."""

from __future__ import annotations

import os

from rlhf_core.config import PROJECT_ROOT, PipelineConfig
from rlhf_core.errors import UserError

PIPELINE_ENTRYPOINT = "flows/pipeline.py:rlhf_pipeline"
SENSOR_ENTRYPOINT = "flows/sensor.py:data_sensor"


def ensure_work_pool(name: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists

    with get_client(sync_client=True) as client:
        try:
            client.create_work_pool(WorkPoolCreate(name=name, type="process"))
        except ObjectAlreadyExists:
            pass


def deploy(cfg: PipelineConfig) -> dict:
    from prefect import flow
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.schedules import Cron

    from rlhf_core.sensor import prime

    if not (cfg.tracking.prefect_api_url or os.environ.get("PREFECT_API_URL")):
        raise UserError(
            "rlhf deploy needs a Prefect server: start one (rlhf stack up) and export PREFECT_API_URL, "
            "or set tracking.prefect_api_url"
        )
    d = cfg.deploy
    pool = d.work_pool or cfg.stack.work_pool
    try:
        ensure_work_pool(pool)
    except Exception as exc:  # noqa: BLE001 - httpx/OS errors: the server is not there
        api = cfg.tracking.prefect_api_url or os.environ.get("PREFECT_API_URL")
        raise UserError(
            f"cannot reach the Prefect server at {api} ({type(exc).__name__}); is `rlhf stack up` running?"
        ) from None
    source = str(PROJECT_ROOT)
    pipeline = flow.from_source(source, PIPELINE_ENTRYPOINT)
    pipeline_id = pipeline.deploy(
        name=d.name,
        work_pool_name=pool,
        build=False,
        push=False,
        schedules=[Cron(d.cron, timezone=d.timezone)] if d.cron else None,
        concurrency_limit=ConcurrencyLimitConfig(
            limit=d.concurrency_limit, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE
        ),
        parameters={"config": cfg.model_dump(mode="json")},
        tags=["rlhf"],
        print_next_steps=False,
        description="Preference data -> SFT -> AI labels -> reward model -> PPO -> evaluation -> registry",
    )
    out = {
        "pipeline": {
            "id": str(pipeline_id),
            "name": f"rlhf-pipeline/{d.name}",
            "work_pool": pool,
            "cron": d.cron,
            "timezone": d.timezone,
            "concurrency_limit": d.concurrency_limit,
        }
    }
    if d.watch_prefix:
        already = prime(d.watch_prefix, cfg.s3)
        sensor = flow.from_source(source, SENSOR_ENTRYPOINT)
        sensor_id = sensor.deploy(
            name="watch",
            work_pool_name=pool,
            build=False,
            push=False,
            interval=d.sensor_interval_s,
            concurrency_limit=1,
            parameters={
                "prefix": d.watch_prefix,
                "s3": cfg.s3.model_dump(mode="json"),
                "deployment": f"rlhf-pipeline/{d.name}",
                "retries": d.run_retries,
            },
            tags=["rlhf"],
            print_next_steps=False,
            description=f"A pipeline run for each new preference file under {d.watch_prefix}",
        )
        out["sensor"] = {
            "id": str(sensor_id),
            "name": "rlhf-data-sensor/watch",
            "prefix": d.watch_prefix,
            "interval_s": d.sensor_interval_s,
            "already_there": already,
        }
    return out
