"""Start a learner as N processes with `accelerate launch` and wait for it.

The processes' output streams into `on_line`, line by line; rank 0's training metrics arrive
through `on_log` (the same callback a single-process trainer takes). A process that fails ends
the whole learner, and the launch fails with one line naming its rank and its error; no process
outlives the launch (the launcher is stopped on the way out, and each worker dies with its
parent: worker.py).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from rlhf_core.config import DistributedConfig
from rlhf_core.distributed import EVENT
from rlhf_core.distributed.ray_driver import FAILURE
from rlhf_core.errors import UserError

# what each kind of learner runs in every process, by name: a stage's cache key follows the code
# it imports, and a stage that trains SFT must not depend on the PPO trainer's code
ENTRIES = {
    "sft": "rlhf_core.sft:distributed_job",
    "reward": "rlhf_core.reward.trainer:distributed_job",
    "policy": "rlhf_core.ppo.build:distributed_job",
    "dpo": "rlhf_core.dpo.learner:distributed_job",
}


def launch_command(settings: DistributedConfig, job_file: Path) -> list[str]:
    """`accelerate launch` with every choice explicit (a user's default accelerate config is not
    read); with the ray backend, the driver that hands the job to Ray Train."""
    if settings.backend == "ray":
        if settings.strategy != "ddp":
            raise UserError(
                f"distributed.strategy {settings.strategy} with the ray backend: not supported yet "
                "(use ddp, or the local backend on one machine)"
            )
        return [sys.executable, "-m", "rlhf_core.distributed.ray_driver", str(job_file)]
    n = settings.num_processes
    threads = settings.threads_per_process or max(1, (os.cpu_count() or 1) // n)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(n),
        "--num_machines",
        "1",
        "--main_process_port",
        "0",  # a free port: two learners on one machine never collide
        "--mixed_precision",
        "no",  # the stage's own setting applies (training.autocast_for)
        "--dynamo_backend",
        "no",
        "--num_cpu_threads_per_process",
        str(threads),
    ]
    if settings.strategy != "ddp" and not torch.cuda.is_available():
        raise UserError(
            f"distributed.strategy {settings.strategy} needs GPUs (Accelerate runs FSDP and "
            "DeepSpeed on GPUs only); use ddp on CPU"
        )
    if settings.strategy == "ddp":
        if n > 1:  # torchrun's launcher; on CPU with ACCELERATE_USE_CPU: gloo. One process: as is
            cmd.append("--multi_gpu")
    elif settings.strategy == "fsdp":
        cmd.append("--use_fsdp")
        if settings.engine_config:
            cmd += ["--config_file", settings.engine_config]
    else:
        cmd.append("--use_deepspeed")
        if settings.engine_config:
            cmd += ["--deepspeed_config_file", settings.engine_config]
    return [*cmd, "-m", "rlhf_core.distributed.worker", str(job_file)]


def _failure(work: Path, lines: list[str], returncode: int) -> str:
    """One line: the first failing rank and its error."""
    errors = {
        int(p.stem.removeprefix("rank-")): p.read_text().strip()
        for p in (work / "errors").glob("rank-*.txt")
    }
    failure = next((ln for ln in reversed(lines) if ln.startswith(FAILURE)), None)
    text = "\n".join(lines[-300:])
    # torchrun names the first failure it saw: "Root Cause ... rank : 1 (local_rank: 1)
    # exitcode : -9"; the other processes failed after it, at a collective it never reached
    root = text[text.rfind("Root Cause") :] if "Root Cause" in text else ""
    rank = re.search(r"rank\s*:\s*(\d+)", root)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    if rank:
        r = int(rank.group(1))
        if r in errors:
            return f"rank {r} failed: {errors[r]}"
        if code:
            how = int(code.group(1))
            return f"rank {r} failed: " + (
                f"killed by signal {-how}" if how < 0 else f"exit code {how}"
            )
    if errors:
        r = min(errors)
        return f"rank {r} failed: {errors[r]}"
    if failure:  # Ray's account, when no rank could write its own
        return failure[len(FAILURE) :]
    return f"the launcher exited with code {returncode}"


def launch(
    kind: str,
    job: dict,
    work: Path,
    settings: DistributedConfig,
    *,
    on_line: Callable[[str], None],
    on_log: Callable[[int, dict], None],
    on_samples: Callable[[int, list[dict]], None] | None = None,
) -> dict:
    """Run the worker's `kind` on settings.num_processes processes; rank 0's result. Rank 0's
    metrics arrive through on_log, its sample tables (policy optimisation) through on_samples."""
    work.mkdir(parents=True, exist_ok=True)
    (work / "result.json").unlink(missing_ok=True)
    for stale in (work / "errors").glob("rank-*.txt"):
        stale.unlink()
    job_file = work / "job.json"
    job_file.write_text(
        json.dumps(
            {
                "kind": kind,
                "entry": ENTRIES[kind],
                "work": str(work),
                "distributed": settings.model_dump(mode="json"),
                **job,
            }
        )
    )
    env = os.environ | {
        "PYTHONUNBUFFERED": "1",
        "RLHF_DIST_TIMEOUT_S": str(settings.timeout_s),
        "RAY_DEDUP_LOGS": "0",  # Ray would fold the workers' identical lines into one
    }
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"
    lines: list[str] = []
    proc = subprocess.Popen(
        launch_command(settings, job_file),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    try:
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            at = line.find(EVENT)  # Ray prefixes its workers' lines with their names
            if at >= 0:
                event = json.loads(line[at + len(EVENT) :])
                if "samples" in event:
                    if on_samples is not None:
                        on_samples(event["step"], event["samples"])
                else:
                    on_log(event["step"], event["metrics"])
                continue
            lines.append(line)
            on_line(line)
        returncode = proc.wait()
    finally:
        if proc.poll() is None:  # interrupted: torchrun stops its workers on SIGTERM
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    if returncode != 0 or not (work / "result.json").exists():
        raise UserError(f"{kind}: {_failure(work, lines, returncode)}")
    return json.loads((work / "result.json").read_text())
