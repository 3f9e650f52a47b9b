"""The data-arrival sensor: list an S3 prefix on a short interval and start a pipeline run on each
new preference file (rlhf_core/sensor.py keeps the books: no file gets two runs, a failed run is
started again up to deploy.run_retries times). Each start is also an `rlhf.data.arrived` event in
Prefect's event feed."""

from __future__ import annotations

from uuid import UUID

from prefect import flow, get_run_logger
from prefect.events import emit_event

from rlhf_core import sensor
from rlhf_core.config import S3Config

DATA_EVENT = "rlhf.data.arrived"


@flow(name="rlhf-data-sensor", log_prints=True)
def data_sensor(
    prefix: str,
    s3: dict | None = None,
    deployment: str = "rlhf-pipeline/nightly",
    retries: int = 2,
) -> list[str]:
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment

    cfg = S3Config.model_validate(s3 or {})
    logger = get_run_logger()
    state = sensor.load_state(prefix, cfg)
    if state is None:  # never primed, or the state was lost: what is there now counts as seen
        logger.warning(f"no sensor state for {prefix}: taking what is there now as seen")
        sensor.prime(prefix, cfg)
        return []

    def start(uri: str, key: str) -> str:
        run = run_deployment(
            deployment,
            parameters={"data_path": uri},
            idempotency_key=key,  # the same key finds the run already started
            timeout=0,
            as_subflow=False,
        )
        emit_event(
            event=DATA_EVENT,
            resource={"prefect.resource.id": f"rlhf.data.{uri}", "prefect.resource.name": uri},
            payload={"uri": uri, "flow_run_id": str(run.id), "idempotency_key": key},
        )
        return str(run.id)

    with get_client(sync_client=True) as client:  # one connection for every run looked up

        def run_state(run_id: str) -> str:
            run = client.read_flow_run(UUID(run_id))
            return run.state.type.value if run.state else "PENDING"

        started, state = sensor.tick(prefix, cfg, state, start, run_state, retries, logger.info)
    sensor.save_state(prefix, cfg, state)
    return started
