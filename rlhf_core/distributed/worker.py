"""One process of a learner that `rlhf_core.distributed.launch` started through `accelerate launch`
(or that Ray Train started: ray_driver.py):

    python -m rlhf_core.distributed.worker JOB.json

Every process runs the job's entry (launch.ENTRIES: the learner module's `distributed_job`),
which builds the same trainer from the job and trains its share of each batch; rank 0 alone
reports metrics (as event lines on stdout), writes the model and `result.json`. A process that
fails writes its error to `errors/rank-N.txt` for the launcher's one-line message.
"""

from __future__ import annotations

import ctypes
import importlib
import json
import os
import signal
import sys
from pathlib import Path

from rlhf_core import distributed
from rlhf_core.errors import UserError

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """torchrun starts its workers in sessions of their own, so a kill -9 of the pipeline's process
    group would miss them: the kernel kills this process when its launcher dies."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died before prctl took hold
        sys.exit(1)


def run_job(job: dict, rank: int) -> None:
    """This process's part of the job; rank 0 writes result.json once every process is done."""
    work = Path(job["work"])
    print(f"worker rank {rank} pid {os.getpid()}", flush=True)
    try:
        dist = distributed.current()
        module, name = job["entry"].split(":")  # named, not imported: see launch.ENTRIES
        out = getattr(importlib.import_module(module), name)(job, dist)
        dist.barrier()  # rank 0's files are whole before any process reports success
        if out is not None:
            tmp = work / "result.json.tmp"
            tmp.write_text(json.dumps(out))
            tmp.replace(work / "result.json")
    except BaseException as exc:  # noqa: BLE001 - every failure becomes the launcher's one line
        message = str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"
        (work / "errors").mkdir(exist_ok=True)
        (work / "errors" / f"rank-{rank}.txt").write_text(
            message.splitlines()[0] if message else type(exc).__name__
        )
        raise


def main(job_file: str) -> None:
    _die_with_parent()
    run_job(json.loads(Path(job_file).read_text()), int(os.environ.get("RANK", "0")))


if __name__ == "__main__":
    main(sys.argv[1])
