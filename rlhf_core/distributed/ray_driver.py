"""Run a learner on a Ray cluster with Ray Train's `TorchTrainer` (distributed.backend: ray):

    python -m rlhf_core.distributed.ray_driver JOB.json

The driver connects to the cluster (distributed.ray_address, else RAY_ADDRESS), and Ray Train
starts distributed.num_processes workers and their torch.distributed process group; each worker
runs the same job as a process that `accelerate launch` starts (worker.run_job), so the learner,
its checkpoints and its result are the same. The workers' output reaches this driver's stdout
(Ray forwards it), where the launcher reads rank 0's events as it does for local processes.

The job's work folder must be one that every worker can reach (one machine, or a shared volume).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

FAILURE = "RLHF_FAILURE "  # the driver's one-line account of a failed learner


def _train_loop(job: dict) -> None:
    """One Ray Train worker: Ray has set up torch.distributed; Accelerate joins its group."""
    import ray.train

    from rlhf_core.distributed.worker import run_job

    context = ray.train.get_context()
    # what `distributed.current()` and Accelerate read to know this process's place
    os.environ.update(
        {
            "WORLD_SIZE": str(context.get_world_size()),
            "RANK": str(context.get_world_rank()),
            "LOCAL_RANK": str(context.get_local_rank()),
            "LOCAL_WORLD_SIZE": str(context.get_local_world_size()),
        }
    )
    run_job(job, context.get_world_rank())


def main(job_file: str) -> None:
    import ray
    import torch
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rlhf_core.config import DistributedConfig

    job = json.loads(Path(job_file).read_text())
    settings = DistributedConfig.model_validate(job["distributed"])
    work = Path(job["work"])
    gpu = settings.gpus_per_process > 0
    threads = settings.threads_per_process or 1
    env = {
        "RLHF_DIST_TIMEOUT_S": str(settings.timeout_s),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(threads),
        **({} if gpu else {"ACCELERATE_USE_CPU": "true"}),
    }
    ray.init(
        address=settings.ray_address or os.environ.get("RAY_ADDRESS") or "auto",
        runtime_env={"env_vars": env},
        log_to_driver=True,
    )
    try:
        trainer = TorchTrainer(
            _train_loop,
            train_loop_config=job,
            scaling_config=ScalingConfig(
                num_workers=settings.num_processes,
                use_gpu=gpu,
                resources_per_worker={"CPU": threads}
                | ({"GPU": settings.gpus_per_process} if gpu else {}),
            ),
            torch_config=TorchConfig(
                backend="nccl" if gpu and torch.cuda.is_available() else "gloo",
                timeout_s=settings.timeout_s,
            ),
            run_config=RunConfig(
                name=f"rlhf-{job['kind']}",
                storage_path=str(work / "ray"),
                failure_config=FailureConfig(max_failures=0),  # a rerun resumes instead
            ),
        )
        trainer.fit()
    except Exception as exc:  # noqa: BLE001 - the launcher turns this into the stage's one line
        first = (str(exc) or type(exc).__name__).strip().splitlines()
        print(FAILURE + (first[0] if first else type(exc).__name__), flush=True)
        sys.exit(1)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main(sys.argv[1])
