"""Learner throughput on 1 and N processes on this machine, and what the distributed path costs.

    python benchmarks/scaling.py [--processes 2] [--steps 30] [--warmup-steps 5] [--rounds 2]
                                 [--preset small] [--batch-size 16] [--json]

The same SFT job each time (a scratch model of --preset built once, the project's demo pairs,
batch --batch-size, --steps optimiser steps, no evaluation, no checkpoints), three ways, the rounds
interleaved (A B C A B C ...) so that a slow spell of the machine hits all three:

  in-process     build_sft_trainer + train() in this process: distributed.num_processes 1, the
                 default path of every stage (its distributed operations are the identity);
  1 launched     the job through rlhf_core.distributed.launch with num_processes 1: the worker
                 process that `accelerate launch` starts, on all the machine's threads;
  N launched     num_processes N: N processes, DDP over gloo on CPU, each on cores / N threads,
                 each taking every N-th row of each micro-batch (the same global batch).

steps/s: the optimiser steps after the first --warmup-steps, over the wall time between their log
events (one per step, received in this process as they happen). "overhead of the distributed
path": 1 launched against in-process (target <= 5%). Communication: the time of one all-reduce of
a float32 tensor the size of the model's gradients between the N processes (what DDP adds to
each step, in buckets; the probe is this script run under `accelerate launch --probe`), median of
20 after 3 warm-up ones.

On 2 cores expect no gain from 2 processes: each has half the threads, and the all-reduce comes on
top. The numbers say how much is lost; on a machine with more cores or GPUs the same
configuration splits real work.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import add_common_args, make_parser  # noqa: E402


def probe(n_params: int) -> None:
    """Run by each process under accelerate launch: time all-reduces of n_params floats."""
    import torch

    from rlhf_core import distributed

    dist = distributed.current()
    grad = torch.ones(n_params)
    times = []
    for i in range(23):
        dist.barrier()
        t = time.perf_counter()
        torch.distributed.all_reduce(grad)
        if i >= 3:
            times.append(time.perf_counter() - t)
    if dist.is_main:
        print("PROBE " + json.dumps({"allreduce_s": statistics.median(times)}), flush=True)


def main() -> None:
    ap = make_parser(__doc__)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup-steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--probe", type=int, default=None, help=argparse_hidden())
    add_common_args(ap)
    args = ap.parse_args()
    if args.probe is not None:
        probe(args.probe)
        return

    root = Path(tempfile.mkdtemp(prefix="scaling-"))
    try:
        run(args, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(args, root: Path) -> None:
    import pandas as pd

    from rlhf_core.config import DistributedConfig, ModelConfig, SFTConfig
    from rlhf_core.data.demo import generate_demo_pairs
    from rlhf_core.distributed.launch import launch
    from rlhf_core.models.scratch import build_scratch_model
    from rlhf_core.sft import build_sft_trainer

    rows = pd.DataFrame(generate_demo_pairs(args.steps * args.batch_size + 64, seed=0))
    rows = rows[["prompt", "chosen", "rejected"]].assign(label_source="human", p_chosen=1.0)
    train, val = root / "train.parquet", root / "val.parquet"
    rows.iloc[64:].to_parquet(train)
    rows.iloc[:8].to_parquet(val)
    texts = pd.concat([rows["prompt"], rows["chosen"], rows["rejected"]]).tolist()
    model_dir = build_scratch_model(texts, root / "model", preset=args.preset, seed=0)
    sft = SFTConfig(
        max_steps=args.steps,
        batch_size=args.batch_size,
        log_every=1,
        eval_every=10**6,
        checkpoint_every=10**6,
        early_stopping_patience=None,
        mixed_precision="no",
    )
    model = ModelConfig(device="cpu")

    def steps_per_s(arrivals: dict[int, float]) -> float:
        w, last = args.warmup_steps, max(arrivals)
        return (last - w) / (arrivals[last] - arrivals[w])

    def in_process() -> float:
        arrivals: dict[int, float] = {}
        trainer, _ = build_sft_trainer(
            str(model_dir),
            str(train),
            str(val),
            model,
            sft,
            0,
            on_log=lambda step, m: arrivals.setdefault(step, time.perf_counter()),
            progress=False,
        )
        trainer.train(resume=False)
        return steps_per_s(arrivals)

    def launched(n: int, tag: str) -> float:
        arrivals: dict[int, float] = {}
        work = root / f"run-{tag}"
        launch(
            "sft",
            {
                "base_model": str(model_dir),
                "train": str(train),
                "val": str(val),
                "model": model.model_dump(mode="json"),
                "sft": sft.model_dump(mode="json"),
                "seed": 0,
                "checkpoint_dir": str(work / "ckpt"),
                "model_out": str(work / "model"),
            },
            work / "learner",
            DistributedConfig(num_processes=n),
            on_line=lambda line: None,
            on_log=lambda step, m: arrivals.setdefault(step, time.perf_counter()),
        )
        return steps_per_s(arrivals)

    runs: dict[str, list[float]] = {
        "in-process": [],
        "1 launched": [],
        f"{args.processes} launched": [],
    }
    for r in range(args.rounds):
        runs["in-process"].append(in_process())
        runs["1 launched"].append(launched(1, f"1-{r}"))
        runs[f"{args.processes} launched"].append(launched(args.processes, f"n-{r}"))
        if not args.json:
            print(
                f"round {r + 1}: " + ", ".join(f"{k} {v[-1]:.3f} steps/s" for k, v in runs.items())
            )

    import subprocess

    import torch
    from transformers import AutoModelForCausalLM

    n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(model_dir).parameters())
    env = (
        os.environ | {"ACCELERATE_USE_CPU": "true"} if not torch.cuda.is_available() else os.environ
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(args.processes),
            "--num_machines",
            "1",
            "--main_process_port",
            "0",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--num_cpu_threads_per_process",
            str(max(1, (os.cpu_count() or 1) // args.processes)),
            __file__,
            "--probe",
            str(n_params),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    allreduce = json.loads(next(x for x in out.stdout.splitlines() if x.startswith("PROBE "))[6:])
    median = {k: statistics.median(v) for k, v in runs.items()}
    report = {
        "preset": args.preset,
        "parameters": n_params,
        "cores": os.cpu_count(),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "steps_per_s": runs,
        "median_steps_per_s": median,
        "distributed_path_overhead": 1 - median["1 launched"] / median["in-process"],
        f"speedup_{args.processes}_processes": median[f"{args.processes} launched"]
        / median["in-process"],
        "allreduce_s_per_step": allreduce["allreduce_s"],
        "allreduce_share_of_step": allreduce["allreduce_s"] * median[f"{args.processes} launched"],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"{args.preset} model, {n_params / 1e6:.1f}M parameters, {os.cpu_count()} cores, batch "
        f"{args.batch_size}: median steps/s " + ", ".join(f"{k} {v:.3f}" for k, v in median.items())
    )
    print(
        f"distributed path overhead {100 * report['distributed_path_overhead']:+.1f}% "
        f"(1 launched vs in-process); {args.processes} processes: "
        f"x{report[f'speedup_{args.processes}_processes']:.2f}; all-reduce of the gradients "
        f"{1000 * allreduce['allreduce_s']:.1f} ms per step "
        f"({100 * report['allreduce_share_of_step']:.0f}% of a {args.processes}-process step)"
    )


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
