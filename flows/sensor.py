"""The data-arrival sensor: list an S3 prefix on a short interval, remember what it has seen (a Prefect
Variable per prefix), and emit one `rlhf.data.arrived` event per new preference file. The pipeline
deployment's trigger turns each event into a run on that file."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.events import emit_event
from prefect.variables import Variable

from rlhf_core.config import S3Config, stable_hash
from rlhf_core.storage import new_s3_objects

DATA_EVENT = "rlhf.data.arrived"


def state_variable(prefix: str) -> str:
    return f"rlhf_sensor_{stable_hash(prefix, 12)}"


def prime(prefix: str, s3: S3Config) -> int:
    """Mark what is already under the prefix as seen (at deploy time), so only files that land later start runs."""
    name = state_variable(prefix)
    if Variable.get(name, default=None) is not None:
        return 0
    existing, state = new_s3_objects(prefix, s3, None)
    Variable.set(name, state, overwrite=True)
    return len(existing)


@flow(name="rlhf-data-sensor", log_prints=True)
def data_sensor(prefix: str, s3: dict | None = None) -> list[str]:
    cfg = S3Config.model_validate(s3 or {})
    name = state_variable(prefix)
    previous = Variable.get(name, default=None)
    if (
        previous is None
    ):  # never primed, or the variable was lost: record what is there, start nothing for it
        get_run_logger().warning(f"no sensor state for {prefix}: taking what is there now as seen")
        prime(prefix, cfg)
        return []
    new, state = new_s3_objects(prefix, cfg, previous)
    for uri in new:  # emitted before the state is saved: a crash in between re-announces rather than loses a file
        emit_event(
            event=DATA_EVENT,
            resource={"prefect.resource.id": f"rlhf.data.{uri}", "prefect.resource.name": uri},
            payload={"uri": uri},
        )
        get_run_logger().info(f"new preference data: {uri}")
    Variable.set(name, state, overwrite=True)
    return new
