"""Where a learner runs: one process (`Single`), or one of N processes that Accelerate started
(`Accelerated`, DDP through `Accelerator.prepare_model`).

A training loop asks `current()` once and then uses the same few operations either way: wrap the
model for the forward, take its share of a micro-batch, sum a number over the processes, hold the
others at a barrier. With one process each is the identity, so the single-process path is the code
that ran before.

Equal results for N processes and one, with the same global batch: every process draws the same
batch plan (same seed), takes rows rank, rank + N, ... of each micro-batch, and backpropagates
world * (its summed loss) / (the global step's units); DDP averages the gradients over the
processes, so the step's gradient is (sum over all rows of the loss) / units, as in one process.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Sequence
from datetime import timedelta

import torch

EVENT = "RLHF_EVENT "  # a worker's line that carries an event for the launcher, not text


def report_metrics(step: int, metrics: dict) -> None:
    """Rank 0's on_log in a worker: an event line the launcher hands to the stage's on_log."""
    print(EVENT + json.dumps({"step": step, "metrics": metrics}), flush=True)


def report_samples(step: int, rows: list[dict]) -> None:
    """Rank 0's on_samples in a worker (sample tables of the on-policy methods)."""
    print(EVENT + json.dumps({"step": step, "samples": rows}), flush=True)


def sharded_rows(dist, items: Sequence, compute) -> torch.Tensor:
    """compute(items) -> one row per item, split over the processes: each computes items rank,
    rank + N, ... and every process receives all the rows, in the items' order."""
    if dist.world == 1:
        return compute(list(items))
    mine = list(items[dist.rank :: dist.world])
    parts = dist.gather(compute(mine) if mine else None)
    first = next(p for p in parts if p is not None)
    out = torch.empty((len(items), *first.shape[1:]), dtype=first.dtype)
    for rank, part in enumerate(parts):
        if part is not None:
            out[rank :: dist.world] = part
    return out


def worker_hooks(dist) -> dict:
    """What a trainer in a worker process takes: rank 0 alone reports, no progress bars."""
    return {"on_log": report_metrics if dist.is_main else None, "progress": False}


def saved_result(dist, model, tokenizer, out_dir: str, result, **extra) -> dict | None:
    """The end of a worker's job: rank 0 writes the trained model and returns what the launcher
    hands back to the stage; the other processes return None."""
    if not dist.is_main:
        return None
    from dataclasses import asdict
    from pathlib import Path

    from rlhf_core.models.loading import save_model

    save_model(model, tokenizer, Path(out_dir))
    return {"result": asdict(result), "world_size": dist.world, **extra}


class Single:
    """The learner is this process."""

    rank, world, is_main = 0, 1, True

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def shard(self, indices: Sequence[int]) -> list[int]:
        return list(indices)

    def sum(self, value: float) -> float:
        return value

    def barrier(self) -> None:
        pass

    def broadcast(self, obj):
        return obj

    def gather(self, obj) -> list:
        return [obj]

    def no_sync(self, wrapped: torch.nn.Module, sync: bool):
        return contextlib.nullcontext()


class Accelerated:
    """One of `world` learner processes; Accelerate set up the process group (gloo on CPU)."""

    def __init__(self, timeout_s: int):
        from accelerate import Accelerator, InitProcessGroupKwargs

        self.acc = Accelerator(
            cpu=not torch.cuda.is_available(),
            kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))],
        )
        self.rank, self.world = self.acc.process_index, self.acc.num_processes
        self.is_main = self.acc.is_main_process

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        # device placement stays the caller's; DDP only wraps (on CPU: gloo all-reduce)
        return self.acc.prepare_model(model, device_placement=False)

    def shard(self, indices: Sequence[int]) -> list[int]:
        return list(indices)[self.rank :: self.world]

    def sum(self, value: float) -> float:
        t = torch.tensor([value], dtype=torch.float64, device=self.acc.device)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def barrier(self) -> None:
        self.acc.wait_for_everyone()

    def broadcast(self, obj):
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj], from_process=0)[0]

    def gather(self, obj) -> list:
        out = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def no_sync(self, wrapped: torch.nn.Module, sync: bool):
        return contextlib.nullcontext() if sync else self.acc.no_sync(wrapped)


@functools.cache
def current() -> Single | Accelerated:
    """This process's place: `Accelerated` when a launcher started several (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return Accelerated(int(os.environ.get("RLHF_DIST_TIMEOUT_S", "1800")))
    return Single()
