"""One process of a learner that `rlhf_core.distributed.launch` started through `accelerate launch`:

    python -m rlhf_core.distributed.worker JOB.json

Every process builds the same trainer from the job and trains its share of each batch; rank 0
alone reports metrics (as event lines on stdout), writes the model and `result.json`. A process
that fails writes its error to `errors/rank-N.txt` for the launcher's one-line message.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
from dataclasses import asdict
from pathlib import Path

from rlhf_core import distributed
from rlhf_core.distributed.launch import EVENT
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


def _report(step: int, metrics: dict) -> None:
    print(EVENT + json.dumps({"step": step, "metrics": metrics}), flush=True)


def run_sft(job: dict, dist) -> dict | None:
    from rlhf_core.config import ModelConfig, SFTConfig
    from rlhf_core.models.loading import save_model
    from rlhf_core.sft import build_sft_trainer, sft_counts

    trainer, stats = build_sft_trainer(
        job["base_model"],
        job["train"],
        job["val"],
        ModelConfig.model_validate(job["model"]),
        SFTConfig.model_validate(job["sft"]),
        job["seed"],
        checkpoint_dir=Path(job["checkpoint_dir"]),
        on_log=_report if dist.is_main else None,
        progress=False,
    )
    counts = sft_counts(trainer, stats)
    result = trainer.train()
    if not dist.is_main:
        return None
    save_model(trainer.model, trainer.tokenizer, Path(job["model_out"]))
    return {"result": asdict(result), "counts": counts, "world_size": dist.world}


KINDS = {"sft": run_sft}


def main(job_file: str) -> None:
    _die_with_parent()
    job = json.loads(Path(job_file).read_text())
    work = Path(job["work"])
    rank = int(os.environ.get("RANK", "0"))
    print(f"worker rank {rank} pid {os.getpid()}", flush=True)
    try:
        dist = distributed.current()
        out = KINDS[job["kind"]](job, dist)
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


if __name__ == "__main__":
    main(sys.argv[1])
