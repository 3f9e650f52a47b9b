"""Helpers shared by the benchmark scripts (one copy of each; the scripts import this module).

Importing it puts the repository root first on sys.path, so the scripts import it before any
rlhf_core module. It imports neither torch nor transformers at import time: environment defaults
(env_defaults) can still be set before those load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHARED_DATA = Path(os.environ.get("RLHF_SHARED_DATA", ROOT.parent / "shared" / "data"))
HH_FILE = "hh-rlhf-harmless-base.sample.jsonl.gz"
LOSS_WINDOW = 10  # "final loss" = mean of the per-step training losses over the last 10 steps


# -- environment ----------------------------------------------------------------------------------
def env_defaults(**values: str) -> None:
    """os.environ.setdefault for each; call before importing torch / tokenizers / trl."""
    for key, value in values.items():
        os.environ.setdefault(key, value)


@contextlib.contextmanager
def patched_env(values: dict[str, str]) -> Iterator[None]:
    """Sets the variables for the duration of the block, then restores (or removes) them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- command line ---------------------------------------------------------------------------------
def make_parser(doc: str | None) -> argparse.ArgumentParser:
    """An argument parser described by the first line of the script's docstring."""
    return argparse.ArgumentParser(description=doc.splitlines()[0] if doc else None)


def add_common_args(ap: argparse.ArgumentParser, seed: bool = False, threads: bool = False) -> None:
    """--seed (default 0) and --threads when asked for, --json always."""
    if seed:
        ap.add_argument("--seed", type=int, default=0)
    if threads:
        ap.add_argument(
            "--threads",
            type=int,
            default=None,
            help="torch.set_num_threads (default: torch's choice)",
        )
    ap.add_argument("--json", action="store_true")


def add_trainer_args(
    ap: argparse.ArgumentParser, warmup_steps: int, lr: float, batch_help: str | None = None
) -> None:
    """The step/batch flags of the trainer-vs-TRL benchmarks; check them with check_warmup_steps."""
    ap.add_argument("--steps", type=int, default=40, help="optimiser steps for each trainer")
    ap.add_argument(
        "--warmup-steps",
        type=int,
        default=warmup_steps,
        help="first steps excluded from timing (both trainers)",
    )
    ap.add_argument("--batch-size", type=int, default=16, help=batch_help)
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="runs; even runs go TRL then ours, odd runs ours then TRL",
    )


def check_warmup_steps(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.warmup_steps < 1 or args.steps <= args.warmup_steps + 1:
        ap.error(
            "need 1 <= --warmup-steps < --steps - 1 (the timed window starts at the end of a step)"
        )


def run_order(names: list[str], rep: int) -> list[str]:
    """Round `rep` of interleaved runs: the order reversed every other round."""
    return names if rep % 2 == 0 else names[::-1]


# -- torch / Hugging Face -------------------------------------------------------------------------
def set_threads(args: argparse.Namespace) -> None:
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)


def prepare_run(args: argparse.Namespace) -> float:
    """Silences the HF progress bars, applies --threads; returns the 1-minute load average."""
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    set_threads(args)
    return os.getloadavg()[0]


def lib_versions() -> dict[str, str]:
    import torch
    import transformers
    import trl

    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
    }


def dropout_ps(*models) -> list[float]:
    """The distinct dropout probabilities in the models."""
    import torch

    return sorted(
        {float(m.p) for model in models for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    )


def measure_peak(reps: int = 4, dtype=None) -> dict:
    """Best torch.mm rate in `dtype` (default fp32) at the current thread count, GFLOP/s."""
    import torch

    dtype = torch.float32 if dtype is None else dtype
    out = {}
    for n in (1024, 2048):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        torch.mm(a, b)  # warm-up
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - t)
        out[f"mm{n}_gflops"] = 2 * n**3 / best / 1e9
    out["peak_gflops"] = max(out.values())
    return out


# -- timing ---------------------------------------------------------------------------------------
def stamp() -> tuple[float, float]:
    """(wall clock, CPU time of this process): CPU/wall well under the thread count means other
    processes got the cores (on 2 cores, one busy neighbour can slow a 2-thread OpenMP run
    several-fold)."""
    return time.perf_counter(), time.process_time()


def step_logger(stamps: list[tuple[float, float]], losses: list[float]):
    """An on_log callback for our trainers: at every step that logs a training loss, appends a
    stamp() and the loss."""

    def on_log(step: int, metrics: dict) -> None:
        if "train_loss" in metrics:
            stamps.append(stamp())
            losses.append(metrics["train_loss"])

    return on_log


def timed_window(
    name: str, step_times: list[tuple[float, float]], warmup: int
) -> tuple[int, float, float]:
    """(steps recorded, wall seconds, CPU seconds) from the end of step `warmup` to the last."""
    n = len(step_times)
    if n <= warmup:
        raise SystemExit(f"{name}: only {n} steps recorded, need more than --warmup-steps={warmup}")
    window = step_times[-1][0] - step_times[warmup - 1][0]
    cpu = step_times[-1][1] - step_times[warmup - 1][1]
    return n, window, cpu


def loss_stats(losses: list[float]) -> dict:
    return {
        "first_loss": losses[0] if losses else None,
        "final_loss": statistics.fmean(losses[-LOSS_WINDOW:]) if losses else None,
    }


def timing_notes(warmup_steps: int, steps: int) -> dict:
    """What the timed window and "final loss" of timed_window / loss_stats are, for the output."""
    return {
        "timing": f"steps {warmup_steps + 1}..{steps}: end of step {warmup_steps} "
        "to end of last step",
        "final_loss": f"mean per-step train loss over the last {LOSS_WINDOW} steps",
    }


def best_run(runs: list[dict], rate: str, all_key: str) -> dict:
    """The fastest (by `rate`) of the --repeat runs (the least disturbed by anything else on the
    machine), as timeit does; `all_key` (a check) is true only if it held in every run."""
    best = max(runs, key=lambda r: r[rate])
    out = {k: v for k, v in best.items() if k != "per_step_counts"}
    if all_key in best:
        out[all_key] = all(r[all_key] for r in runs)
    if len(runs) > 1:
        out[f"runs_{rate}"] = [r[rate] for r in runs]
        out["runs_cpu_per_wall"] = [r["cpu_per_wall"] for r in runs]
        out["runs_final_loss"] = [r["final_loss"] for r in runs]
    return out


def print_runs(summary: dict[str, dict], rate: str, label: str, fmt: str) -> None:
    """Every --repeat run's `rate` (formatted with `fmt`) and CPU/wall, per trainer."""
    for name, s in summary.items():
        runs = ", ".join(
            f"{x:{fmt}} (cpu/wall {c:.2f})"
            for x, c in zip(s[f"runs_{rate}"], s["runs_cpu_per_wall"])
        )
        print(f"{name} {label} per run: {runs}; best shown above")


def machine_state(load_start: float, min_cpu: float) -> dict:
    """Threads, load and whether other processes took the cores (CPU/wall < 0.8 x threads)."""
    import torch

    threads = torch.get_num_threads()
    return {
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "loadavg_1m_start": load_start,
        "loadavg_1m_end": os.getloadavg()[0],
        "min_cpu_per_wall": min_cpu,
        "machine_busy": min_cpu < 0.8 * threads,
    }


def warn_if_busy(machine: dict, what: str = "ratio", lead: str = "") -> None:
    if not machine["machine_busy"]:
        return
    print(
        f"{lead}WARNING: CPU/wall fell to {machine['min_cpu_per_wall']:.2f} with "
        f"{machine['torch_threads']} threads: other processes were using the cores (1-min load "
        f"{machine['loadavg_1m_start']:.1f} at start, {machine['loadavg_1m_end']:.1f} at end); "
        f"the numbers and the {what} are unreliable, run again on an idle machine "
        "(or try --threads 1)"
    )


# -- TRL trainers ---------------------------------------------------------------------------------
def trl_train_kwargs(args: argparse.Namespace, out_dir: str, sequential: bool) -> dict:
    """The TrainingArguments both TRL runs (RewardConfig, SFTConfig) share: our step count, batch,
    lr and seed; non-fused torch AdamW, weight decay 0.01, clip 1.0, fp32 on the CPU, no
    checkpointing, a per-step loss log, no saving, evaluation, reporting or progress bars."""
    return dict(
        output_dir=out_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        optim="adamw_torch",
        weight_decay=0.01,
        max_grad_norm=1.0,
        # (gradient_checkpointing: old alias of activation_checkpointing)
        bf16=False,
        fp16=False,
        activation_checkpointing=False,
        use_cpu=True,
        train_sampling_strategy="sequential" if sequential else "random",
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_strategy="steps",
        logging_steps=1,
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
    )


def timing_callback(stamps: list[tuple[float, float]], train_begin: bool = False):
    """A TrainerCallback appending stamp() at the end of every step (and, if asked, at the start of
    train())."""
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_train_begin(self, a, state, control, **kw):
            if train_begin:
                stamps.append(stamp())

        def on_step_end(self, a, state, control, **kw):
            stamps.append(stamp())

    return Timing()


def drop_printer(trainer) -> None:
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # disable_tqdm=True would print every log line


def unwrapped_optimizer(trainer):
    return getattr(trainer.optimizer, "optimizer", trainer.optimizer)  # accelerate wraps it


def trl_config_check(trainer) -> dict:
    """What a TRL trainer actually runs with: optimiser, precision, checkpointing, scheduler."""
    optimizer = unwrapped_optimizer(trainer)
    model = trainer.model
    return {
        "optimizer": type(optimizer).__name__,
        "optimizer_fused": bool(optimizer.param_groups[0].get("fused")),
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "activation_checkpointing": bool(
            getattr(
                model,
                "is_activation_checkpointing",
                getattr(model, "is_gradient_checkpointing", False),
            )
        ),
        "param_dtype": str(next(model.parameters()).dtype),
        "lr_scheduler": type(trainer.lr_scheduler).__name__,
    }


def trl_losses(trainer) -> list[float]:
    """The per-step training losses TRL logged (the final summary entry left out)."""
    return [
        h["loss"] for h in trainer.state.log_history if "loss" in h and "train_runtime" not in h
    ]


# -- output ---------------------------------------------------------------------------------------
def rounded(x):
    """Floats to 5 significant digits (not decimals: lr 3e-5 must not print as 0.0), through
    dicts, lists and tuples."""
    if isinstance(x, float):
        return float(f"{x:.5g}")
    if isinstance(x, dict):
        return {k: rounded(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [rounded(v) for v in x]
    return x


def print_json(obj) -> None:
    print(json.dumps(rounded(obj)))


def print_table(header: str, rows: Iterable[str]) -> None:
    print(header)
    print("-" * len(header))
    for row in rows:
        print(row)


def key_values(d: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


def print_result(out: dict, as_json: bool, key_width: int) -> None:
    """The result as one JSON line, or as `key: value` lines (keys right-aligned)."""
    if as_json:
        print(json.dumps(out))
    else:
        for k, v in out.items():
            print(f"{k:>{key_width}}: {v}")


# -- MLflow ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def mlflow_run(tracking_uri: str, experiment: str, run_name: str):
    """Sets the tracking URI and experiment, then runs the block inside a new run."""
    import mlflow

    if tracking_uri.startswith("sqlite:///"):  # a fresh checkout has no .rlhf/ yet
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        yield run


def log_numeric_metrics(values: dict, exclude: Iterable[str] = ()) -> None:
    """Every int/float value (bools as 0/1) as an MLflow metric, except the keys in `exclude`."""
    import mlflow

    skip = set(exclude)
    mlflow.log_metrics(
        {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and k not in skip}
    )
