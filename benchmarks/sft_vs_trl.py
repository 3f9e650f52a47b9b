"""SFT throughput: our own loop (rlhf_core.sft) against TRL's SFTTrainer, side by side in one process.

    python benchmarks/sft_vs_trl.py [--preset small|tiny] [--steps 40] [--warmup-steps 3] [--repeat 1] [--json]

Same for both trainers:
  * model: one scratch model (build_scratch_model(texts, dir, preset, arch, seed)) built once into a temp dir;
    each trainer gets a fresh copy loaded with load_causal_lm (fp32, CPU) after the same torch.manual_seed;
  * data: generate_demo_pairs(n, seed=0) as prompt -> chosen, tokenised once with our ChatFormat.encode via
    encode_examples(max_length); TRL gets the result pre-tokenised (input_ids + completion_mask columns,
    completion_only_loss=True), so both see identical tokens and put the loss on response tokens only;
  * batches: with --order same (default) TRL gets our length-bucketed batch sequence (the dataset rows laid out
    in our batch order and a sequential sampler), so both train on exactly the same batches; --order random
    leaves TRL on its default random sampler (more padding per batch than our length bucketing);
  * optimisation: per-device batch 16, grad accumulation 1, lr 1e-3, cosine, no lr warm-up, AdamW
    (torch.optim.AdamW, weight decay 0.01 off biases/norms, both), grad-norm clip 1.0, fp32, CPU, same step count;
    defaults that would make TRL's run a different one are switched off: bf16 (SFTConfig default on, even on CPU),
    activation/gradient checkpointing (SFTConfig default on), fused AdamW (default optim "adamw_torch_fused";
    ours is the plain torch.optim.AdamW), packing and padding-free. TRL keeps its default loss_type="chunked_nll"
    (same maths as "nll": lm_head and cross-entropy only on loss tokens, in checkpointed 256-token chunks);
    --trl-loss-type nll uses the plain HF loss instead, --trl-nll-row adds it as an extra row.

Timing: the first --warmup-steps optimiser steps are excluded for both; the timed window runs from the end of
step W to the end of the last step (data collation, forward, backward, clip, optimiser, scheduler and per-step
logging included). train() wall time (setup + all steps) is reported as well. Tokens are counted the same way for
both, from the batches each trainer actually consumed: input tokens = non-pad tokens, response tokens = tokens
carrying loss. "final loss" = mean of the per-step training losses over the last 10 steps.

Needs an idle machine: with 2 cores, a busy neighbour process slows a 2-thread torch run several-fold (OpenMP
threads wait for each other); the cpu/wall column shows it, and a warning is printed when it drops. --threads 1
is far less sensitive to that.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import common  # first: puts the repository root on sys.path
from common import (
    add_common_args,
    add_trainer_args,
    best_run,
    check_warmup_steps,
    drop_printer,
    key_values,
    lib_versions,
    loss_stats,
    machine_state,
    prepare_run,
    print_json,
    print_runs,
    print_table,
    run_order,
    step_logger,
    timed_window,
    timing_callback,
    timing_notes,
    trl_config_check,
    trl_losses,
    trl_train_kwargs,
    warn_if_busy,
)

common.env_defaults(TOKENIZERS_PARALLELISM="false")

import torch  # noqa: E402

from rlhf_core.config import SFTConfig  # noqa: E402
from rlhf_core.data.demo import generate_demo_pairs  # noqa: E402
from rlhf_core.models.chat import ChatFormat  # noqa: E402
from rlhf_core.models.loading import load_causal_lm  # noqa: E402
from rlhf_core.models.scratch import build_scratch_model  # noqa: E402
from rlhf_core.sft import IGNORE, SFTTrainer, encode_examples  # noqa: E402
from rlhf_core.training import length_bucketed_batches  # noqa: E402


# -- shared setup ---------------------------------------------------------------------------------
def our_settings(args) -> SFTConfig:
    # log_every=1: per-step loss and a per-step timestamp through on_log (TRL logs every step too).
    return SFTConfig(
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=1,
        lr=args.lr,
        warmup_ratio=0.0,
        schedule="cosine",
        log_every=1,
        eval_every=10**9,
        checkpoint_every=10**9,
        early_stopping_patience=None,
        max_length=args.max_length,
    )


def our_batch_order(examples, settings: SFTConfig, seed: int) -> list[list[int]]:
    """The example indices of each optimiser step of our loop (grad_accum=1), replaying its deterministic order."""
    lengths = [len(e) for e in examples]
    out, epoch = [], 0
    while len(out) < settings.max_steps:
        out += length_bucketed_batches(
            lengths, settings.batch_size, settings.bucket_factor, seed, epoch
        )
        epoch += 1
    return out[: settings.max_steps]


def batch_counts(examples, batch: list[int]) -> tuple[int, int, int]:
    """(non-pad input tokens, response tokens, padded positions) of one right-padded batch."""
    lens = [len(examples[i]) for i in batch]
    return (
        sum(lens),
        sum(len(examples[i]) - examples[i].n_prompt for i in batch),
        len(batch) * max(lens),
    )


def summarise(
    name: str,
    step_times: list[tuple[float, float]],
    counts: list[tuple[int, int, int]],
    losses: list[float],
    warmup: int,
    train_s: float,
) -> dict:
    n, window, cpu = timed_window(name, step_times, warmup)
    timed = counts[warmup:]
    steps = len(timed)
    tokens = sum(c[0] for c in timed)
    response = sum(c[1] for c in timed)
    padded = sum(c[2] for c in timed)
    return {
        "tokens_per_s": tokens / window,
        "response_tokens_per_s": response / window,
        "steps_per_s": steps / window,
        "timed_s": window,
        "timed_steps": steps,
        "train_s": train_s,
        "tokens": tokens,
        "response_tokens": response,
        "padding_fraction": 1.0 - tokens / max(1, padded),
        "cpu_per_wall": cpu / window,
        **loss_stats(losses),
        "steps": n,
    }


# -- ours -----------------------------------------------------------------------------------------
def run_ours(model_dir: str, examples, args) -> dict:
    torch.manual_seed(args.seed)
    loaded = load_causal_lm(model_dir, dtype="fp32", device="cpu", eval_mode=False)
    settings = our_settings(args)
    stamps: list[tuple[float, float]] = []
    losses: list[float] = []
    on_log = step_logger(stamps, losses)
    trainer = SFTTrainer(
        loaded.model,
        loaded.tokenizer,
        examples,
        [],
        settings,
        seed=args.seed,
        checkpoint_dir=None,
        on_log=on_log,
        progress=False,
    )
    t0 = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t0
    counts = [batch_counts(examples, b) for b in our_batch_order(examples, settings, args.seed)]
    assert result.steps == len(stamps) == len(counts), (result.steps, len(stamps), len(counts))
    # cross-check of the replayed order: our loop's own count of loss tokens
    assert result.train_tokens == sum(c[1] for c in counts), (
        result.train_tokens,
        sum(c[1] for c in counts),
    )
    out = summarise("ours", stamps, counts, losses, args.warmup_steps, train_s)
    out["per_step_counts"] = counts
    return out


# -- TRL ------------------------------------------------------------------------------------------
class _CountingCollator:
    """Wraps TRL's collator; records the token counts of every batch it builds, in order."""

    def __init__(self, inner):
        self.inner, self.counts = inner, []

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch["attention_mask"]
        labels = batch["labels"]
        self.counts.append(
            (int(mask.sum()), int((labels[:, 1:] != IGNORE).sum()), int(mask.numel()))
        )
        return batch


def trl_dataset(examples, order: list[list[int]] | None):
    """Pre-tokenised rows for TRL: input_ids + completion_mask (TRL 1.12 turns these into labels, -100 where the
    mask is 0, only when completion_only_loss=True; a prompt_ids/completion_ids layout is not recognised)."""
    from datasets import Dataset

    rows = [i for b in order for i in b] if order is not None else range(len(examples))
    return Dataset.from_dict(
        {
            "input_ids": [examples[i].input_ids for i in rows],
            "completion_mask": [
                [0] * examples[i].n_prompt + [1] * (len(examples[i]) - examples[i].n_prompt)
                for i in rows
            ],
        }
    )


def run_trl(model_dir: str, examples, args, out_dir: str, loss_type: str) -> dict:
    from trl import SFTConfig
    from trl import SFTTrainer as TRLSFTTrainer

    order = (
        our_batch_order(examples, our_settings(args), args.seed) if args.order == "same" else None
    )
    if order is not None and any(len(b) != args.batch_size for b in order):
        raise SystemExit("--order same needs full batches (use --n a multiple of --batch-size)")
    dataset = trl_dataset(examples, order)

    stamps: list[tuple[float, float]] = []
    config = SFTConfig(
        **trl_train_kwargs(args, out_dir, sequential=order is not None),
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_length=args.max_length,
        packing=False,
        padding_free=False,
        loss_type=loss_type,
        # must be explicit: with None, TRL enables completion-only loss only for text
        # "prompt"/"completion" columns, and a pre-tokenised input_ids dataset would train on the
        # full sequence
        completion_only_loss=True,
    )
    torch.manual_seed(args.seed)
    loaded = load_causal_lm(model_dir, dtype="fp32", device="cpu", eval_mode=False)
    trainer = TRLSFTTrainer(
        model=loaded.model, args=config, train_dataset=dataset, processing_class=loaded.tokenizer
    )
    drop_printer(trainer)
    trainer.add_callback(timing_callback(stamps))
    counter = _CountingCollator(trainer.data_collator)
    trainer.data_collator = counter

    # completion-only check: TRL's prepared labels must be exactly our response tokens
    prepared = trainer.train_dataset
    want = [examples[i] for b in order for i in b] if order is not None else examples
    labels_match = len(prepared) == len(want) and all(
        lab == [IGNORE] * e.n_prompt + e.input_ids[e.n_prompt :] and ids == e.input_ids
        for lab, ids, e in zip(prepared["labels"], prepared["input_ids"], want)
    )

    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    checks = trl_config_check(trainer)
    losses = trl_losses(trainer)
    counts = counter.counts[: len(stamps)]  # the dataloader may have built one batch ahead
    out = summarise(f"trl[{loss_type}]", stamps, counts, losses, args.warmup_steps, train_s)
    out["labels_completion_only_and_match_ours"] = labels_match
    out["loss_type"] = loss_type
    out["config_check"] = checks
    out["per_step_counts"] = counts
    return out


# -- driver ---------------------------------------------------------------------------------------
def main() -> None:
    ap = common.make_parser(__doc__)
    ap.add_argument("--n", type=int, default=1024, help="demo pairs (prompt -> chosen)")
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    add_trainer_args(ap, warmup_steps=3, lr=1e-3)
    ap.add_argument(
        "--order",
        default="same",
        choices=["same", "random"],
        help="same: TRL trains on our exact batch sequence; random: TRL's default random sampler",
    )
    ap.add_argument(
        "--trl-loss-type",
        default="chunked_nll",
        choices=["chunked_nll", "nll"],
        help="TRL loss implementation (chunked_nll is TRL 1.x's default)",
    )
    ap.add_argument(
        "--trl-nll-row", action="store_true", help="add an extra row: TRL with loss_type='nll'"
    )
    add_common_args(ap, seed=True, threads=True)
    args = ap.parse_args()
    check_warmup_steps(ap, args)
    load_start = prepare_run(args)
    versions = lib_versions()

    rows = generate_demo_pairs(args.n, seed=0)
    texts = (
        [r["prompt"] for r in rows] + [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    )
    trl_rows = [("trl", args.trl_loss_type)]
    if args.trl_nll_row and args.trl_loss_type != "nll":
        trl_rows.append(("trl (loss_type=nll)", "nll"))
    results: dict[str, list[dict]] = {"ours": [], **{name: [] for name, _ in trl_rows}}
    with tempfile.TemporaryDirectory(prefix="sft-vs-trl-") as tmp:
        model_dir = str(
            build_scratch_model(texts, Path(tmp) / "model", args.preset, args.arch, seed=args.seed)
        )
        probe = load_causal_lm(model_dir, dtype="fp32", device="cpu")
        n_params = sum(p.numel() for p in probe.model.parameters())
        examples, stats = encode_examples(
            [(r["prompt"], r["chosen"]) for r in rows], ChatFormat(probe.tokenizer), args.max_length
        )
        del probe
        for rep in range(args.repeat):
            for who in run_order(["trl", "ours"], rep):
                if who == "ours":
                    results["ours"].append(run_ours(model_dir, examples, args))
                    continue
                for name, loss_type in trl_rows:
                    results[name].append(
                        run_trl(model_dir, examples, args, str(Path(tmp) / f"trl-{rep}"), loss_type)
                    )

    same_batches = all(
        r["per_step_counts"] == o["per_step_counts"]
        for name, _ in trl_rows
        for r, o in zip(results[name], results["ours"])
    )
    summary = {
        name: best_run(runs, "tokens_per_s", "labels_completion_only_and_match_ours")
        for name, runs in results.items()
    }
    min_cpu = min(s["cpu_per_wall"] for s in summary.values())  # of the runs reported
    machine = machine_state(load_start, min_cpu)
    setup = {
        "preset": args.preset,
        "arch": args.arch,
        "parameters": n_params,
        "examples": stats.examples,
        "truncated": stats.truncated,
        "n_pairs": args.n,
        "steps": args.steps,
        "warmup_steps_excluded": args.warmup_steps,
        "batch_size": args.batch_size,
        "grad_accum": 1,
        "lr": args.lr,
        "schedule": "cosine",
        "lr_warmup": 0,
        "max_length": args.max_length,
        "dtype": "fp32",
        "device": "cpu",
        **machine,
        "order": args.order,
        "identical_batches": args.order == "same" and same_batches,
        "repeat": args.repeat,
        **timing_notes(args.warmup_steps, args.steps),
        "aggregate": "best (highest tokens/s) of --repeat runs per trainer; all runs in runs_tokens_per_s",
        "versions": versions,
    }
    ratio = summary["ours"]["tokens_per_s"] / summary["trl"]["tokens_per_s"]
    ratio_resp = summary["ours"]["response_tokens_per_s"] / summary["trl"]["response_tokens_per_s"]
    if args.json:
        out = {
            "setup": setup,
            **summary,
            "ratio_tokens_per_s": ratio,
            "ratio_response_tokens_per_s": ratio_resp,
        }
        print_json(out)
        return
    print(
        f"SFT throughput, {args.preset}/{args.arch} ({n_params / 1e6:.1f}M params), {stats.examples} examples, "
        f"batch {args.batch_size}, {args.steps} steps, fp32 CPU, {torch.get_num_threads()} threads, "
        f"torch {versions['torch']}, transformers {versions['transformers']}, "
        f"trl {versions['trl']}"
    )
    same = f" (identical batches: {same_batches})" if args.order == "same" else ""
    print(
        f"timing: {setup['timing']} (first {args.warmup_steps} steps excluded, both); batch order: {args.order}{same}"
    )
    header = (
        f"{'':<22}{'tokens/s':>10}{'resp tok/s':>12}{'steps/s':>9}{'timed s':>9}{'train() s':>11}"
        f"{'pad frac':>10}{'cpu/wall':>10}{'first loss':>12}{'final loss':>12}"
    )
    print_table(
        header,
        (
            f"{name:<22}{s['tokens_per_s']:>10.0f}{s['response_tokens_per_s']:>12.0f}"
            f"{s['steps_per_s']:>9.3f}{s['timed_s']:>9.2f}{s['train_s']:>11.2f}"
            f"{s['padding_fraction']:>10.3f}{s['cpu_per_wall']:>10.2f}{s['first_loss']:>12.4f}"
            f"{s['final_loss']:>12.4f}"
            for name, s in summary.items()
        ),
    )
    print(f"ratio (ours / trl): tokens/s {ratio:.3f}, response tokens/s {ratio_resp:.3f}")
    for name, _ in trl_rows:
        if not summary[name]["labels_completion_only_and_match_ours"]:
            print(
                f"WARNING: {name}: TRL's prepared labels differ from ours (not completion-only on the same tokens)"
            )
        checks = key_values(summary[name]["config_check"])
        print(f"{name}: loss_type={summary[name]['loss_type']}, {checks}")
    warn_if_busy(machine)
    if args.repeat > 1:
        print_runs(summary, "tokens_per_s", "tokens/s", ".0f")


if __name__ == "__main__":
    main()
