"""Reward-model throughput: our loop (rlhf_core.reward) against TRL's RewardTrainer, side by side in one process.

    python benchmarks/reward_vs_trl.py [--data hh|demo] [--steps 40] [--batch-size 16] [--max-length 256]
                                       [--threads 1] [--json]

Same for both trainers:
  * model: one reward model (build_reward_model(backbone, our_settings(args), seed), default the packaged pretrained
    all-MiniLM-L6-v2 encoder with our initial scalar head) built once; each trainer gets a deep copy of it (same
    backbone weights, same head), fp32, CPU;
  * data: the HH-RLHF harmless sample (read_valid_pairs, the pipeline's ingest + validation) or the project's demo
    pairs, tokenised once with our encode_pairs (prompt/response as a sentence pair, over-long pairs keep the end of
    the prompt, max_length); trimmed to a multiple of the batch size so that every batch is full. TRL gets these
    token ids pre-tokenised (chosen_ids / rejected_ids columns, which its _prepare_dataset leaves alone), plus, by
    default, our token_type_ids through a thin wrapper around its own DataCollatorForPreference (its collator only
    builds input_ids + attention_mask; a BERT-style encoder would otherwise see segment 0 for the response too):
    both trainers feed the model identical tensors. --trl-token-types none leaves TRL's collator as shipped;
  * batches: ours are length-bucketed (the project's loop: shuffle, sort inside mega-batches of 50 batches, shuffle
    the batches); with --trl-order same (default) TRL gets that exact batch sequence (rows laid out in our batch
    order, sequential sampler), so both train on identical batches; --trl-order random leaves TRL on its default
    random sampler (more padding per batch). --ours-batches random runs our loop on random batches (bucket_factor=1:
    no sorting across batches), the apples-to-apples setting for TRL's random sampler;
  * optimisation: per-device batch B pairs (2B sequences: chosen and rejected in one forward pass, both), grad
    accumulation 1, lr 3e-5, linear schedule, no lr warm-up (HF's warm-up ramp is step/W, ours (step+1)/W: with
    --lr-warmup-ratio > 0 the first W steps' lr differ slightly), AdamW (torch.optim.AdamW, weight decay 0.01 off
    biases/LayerNorm, both), grad-norm clip 1.0, fp32, same step count; loss: Bradley-Terry -log sigmoid(r_c - r_r),
    mean over the pairs of the batch, no reward centring (ours center_coef=0, TRL center_rewards_coefficient=None);
    TRL defaults that would make its run a different one are switched off: bf16 (RewardConfig default on, even on
    CPU), activation/gradient checkpointing (TRL's default gradient_checkpointing=True, which transformers 5 turns
    into activation_checkpointing=True), fused AdamW (default optim "adamw_torch_fused"), and disable_dropout
    (RewardConfig default True: TRL zeroes every dropout; our loop trains with the backbone's dropout, 0.1 for
    MiniLM) -- --dropout off disables it on both sides instead.

Timing: the first --warmup-steps optimiser steps are excluded for both; the timed window runs from the end of
step W to the end of the last step (data collation, forward, backward, clip, optimiser, scheduler and per-step
logging included; model building and tokenisation excluded). train() wall time (setup + all steps) is reported as
well. "final loss" = mean of the per-step training losses over the last 10 steps.

Needs an idle machine: with 2 cores, a busy neighbour process slows a 2-thread torch run several-fold; the cpu/wall
column shows it, and a warning is printed when it drops. --threads 1 is far less sensitive to that.
"""

from __future__ import annotations

import copy
import dataclasses
import tempfile
import time
from pathlib import Path

import common  # first: puts the repository root on sys.path
from common import (
    HH_FILE,
    SHARED_DATA,
    add_common_args,
    add_trainer_args,
    best_run,
    check_warmup_steps,
    drop_printer,
    dropout_ps,
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
    unwrapped_optimizer,
    warn_if_busy,
)

common.env_defaults(TOKENIZERS_PARALLELISM="false")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from rlhf_core.config import RewardConfig  # noqa: E402
from rlhf_core.reward.model import RewardModel, build_reward_model  # noqa: E402
from rlhf_core.reward.trainer import PairSet, RewardTrainer, encode_pairs  # noqa: E402
from rlhf_core.training import length_bucketed_batches  # noqa: E402


# -- shared setup ---------------------------------------------------------------------------------
def our_settings(args) -> RewardConfig:
    # log_every=1: per-step loss and a per-step timestamp through on_log (TRL logs every step too); no evaluation,
    # no checkpoints; mixed_precision="no": fp32, as TRL's side; the whole model trained, pooled as the
    # classifier pools (TRL's RewardTrainer does both).
    return RewardConfig(
        backbone=args.backbone,
        max_length=args.max_length,
        freeze_backbone=False,
        pooling="model",
        dtype="fp32",
        device="cpu",
        max_steps=args.steps,
        batch_size=args.batch_size,
        grad_accum=1,
        lr=args.lr,
        weight_decay=0.01,
        warmup_ratio=args.lr_warmup_ratio,
        schedule="linear",
        max_grad_norm=1.0,
        log_every=1,
        eval_every=10**9,
        checkpoint_every=10**9,
        early_stopping_patience=None,
        bucket_factor=50 if args.ours_batches == "bucketed" else 1,
        mixed_precision="no",
        center_coef=0.0,
    )


def pair_lengths(pairs: PairSet) -> list[int]:
    return [
        max(len(c), len(r)) for c, r in zip(pairs.chosen, pairs.rejected)
    ]  # what RewardTrainer buckets by


def our_batch_order(pairs: PairSet, settings: RewardConfig, seed: int) -> list[list[int]]:
    """The pair indices of each optimiser step of our loop (grad_accum=1), replaying its deterministic order."""
    lengths = pair_lengths(pairs)
    out, epoch = [], 0
    while len(out) < settings.max_steps:
        out += length_bucketed_batches(
            lengths, settings.batch_size, settings.bucket_factor, seed, epoch
        )
        epoch += 1
    return out[: settings.max_steps]


def batch_counts(pairs: PairSet, batch: list[int]) -> tuple[int, int, int]:
    """(pairs, non-pad tokens, padded positions) of one batch: chosen + rejected right-padded to one width."""
    lens = [len(pairs.chosen[i]) for i in batch] + [len(pairs.rejected[i]) for i in batch]
    return len(batch), sum(lens), len(lens) * max(lens)


def disable_dropout(model: torch.nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0


def summarise(
    name: str,
    step_times: list[tuple[float, float]],
    counts: list[tuple[int, int, int]],
    losses: list[float],
    warmup: int,
    train_s: float,
) -> dict:
    n, window, cpu = timed_window(name, step_times, warmup)
    timed = counts[warmup:n]
    pairs = sum(c[0] for c in timed)
    tokens = sum(c[1] for c in timed)
    padded = sum(c[2] for c in timed)
    return {
        "pairs_per_s": pairs / window,
        "tokens_per_s": tokens / window,
        "steps_per_s": len(timed) / window,
        "timed_s": window,
        "timed_steps": len(timed),
        "timed_pairs": pairs,
        "timed_tokens": tokens,
        "steps": n,
        "total_pairs": sum(c[0] for c in counts[:n]),
        "train_s": train_s,
        "padding_fraction": 1.0 - tokens / max(1, padded),
        "cpu_per_wall": cpu / window,
        **loss_stats(losses),
    }


# -- ours -----------------------------------------------------------------------------------------
def run_ours(template: RewardModel, pairs: PairSet, args) -> dict:
    torch.manual_seed(args.seed)
    rm = dataclasses.replace(template, model=copy.deepcopy(template.model))
    if args.dropout == "off":
        disable_dropout(rm.model)
    settings = our_settings(args)
    stamps: list[tuple[float, float]] = []
    losses: list[float] = []
    on_log = step_logger(stamps, losses)
    trainer = RewardTrainer(
        rm,
        pairs,
        None,
        settings,
        seed=args.seed,
        checkpoint_dir=None,
        on_log=on_log,
        progress=False,
    )
    t0 = time.perf_counter()
    result = trainer.train(resume=False)
    train_s = time.perf_counter() - t0
    order = our_batch_order(pairs, settings, args.seed)
    counts = [batch_counts(pairs, b) for b in order]
    assert result.steps == len(stamps) == len(counts), (result.steps, len(stamps), len(counts))
    assert result.train_units == sum(c[0] for c in counts), (
        result.train_units,
        sum(c[0] for c in counts),
    )
    out = summarise("ours", stamps, counts, losses, args.warmup_steps, train_s)
    out["batches"] = (
        "length-bucketed (bucket_factor=50)"
        if args.ours_batches == "bucketed"
        else "random (bucket_factor=1: no length sorting across batches)"
    )
    out["loop_pairs_per_s_incl_first_steps"] = (
        result.units_per_s
    )  # our loop's own figure, over all steps
    out["config_check"] = {
        "optimizer": type(trainer.optimizer).__name__,
        "optimizer_fused": bool(trainer.optimizer.param_groups[0].get("fused")),
        "autocast": str(trainer.autocast),
        "param_dtype": str(next(rm.model.parameters()).dtype),
        "dropout_p": dropout_ps(rm.model),
        "torch_threads": torch.get_num_threads(),
    }
    out["per_step_counts"] = counts
    return out


# -- TRL ------------------------------------------------------------------------------------------
class _Collator:
    """TRL's own DataCollatorForPreference, plus (optionally) our token_type_ids padded the same way; records the
    (pairs, non-pad tokens, padded positions) of every batch it builds, in order."""

    def __init__(self, inner, token_types: bool):
        self.inner, self.token_types, self.counts = inner, token_types, []

    def __call__(self, features):
        batch = self.inner(features)
        if self.token_types:
            types = [f["chosen_token_type_ids"] for f in features] + [
                f["rejected_token_type_ids"] for f in features
            ]
            tt = torch.zeros_like(batch["input_ids"])
            for i, t in enumerate(types):
                tt[i, : len(t)] = torch.as_tensor(t)
            batch["token_type_ids"] = tt
        mask = batch["attention_mask"]
        self.counts.append((len(features), int(mask.sum()), int(mask.numel())))
        return batch


def trl_rows(pairs: PairSet, order: list[list[int]] | None) -> list[int]:
    return [i for b in order for i in b] if order is not None else list(range(len(pairs)))


def trl_dataset(pairs: PairSet, rows: list[int], token_types: bool):
    """Pre-tokenised rows in TRL 1.12's layout: chosen_ids / rejected_ids (the legacy chosen_input_ids /
    rejected_input_ids are renamed with a FutureWarning); a `margin` column only when our data has margins."""
    from datasets import Dataset

    cols = {
        "chosen_ids": [pairs.chosen[i].input_ids for i in rows],
        "rejected_ids": [pairs.rejected[i].input_ids for i in rows],
    }
    if token_types:
        cols["chosen_token_type_ids"] = [pairs.chosen[i].token_type_ids for i in rows]
        cols["rejected_token_type_ids"] = [pairs.rejected[i].token_type_ids for i in rows]
    if np.any(pairs.margin != 0):
        cols["margin"] = [float(pairs.margin[i]) for i in rows]
    return Dataset.from_dict(cols)


def run_trl(template: RewardModel, pairs: PairSet, args, out_dir: str) -> dict:
    from trl import RewardConfig
    from trl import RewardTrainer as TRLRewardTrainer

    order = (
        our_batch_order(pairs, our_settings(args), args.seed) if args.trl_order == "same" else None
    )
    rows = trl_rows(pairs, order)
    token_types = args.trl_token_types == "ours" and pairs.chosen[0].token_type_ids is not None
    dataset = trl_dataset(pairs, rows, token_types)

    stamps: list[tuple[float, float]] = []
    settings = our_settings(args)
    config = RewardConfig(
        **trl_train_kwargs(args, out_dir, sequential=order is not None),
        lr_scheduler_type="linear",
        warmup_steps=int(
            settings.warmup_ratio * args.steps
        ),  # an int: ours is int(ratio * total); a float would be ceil
        disable_dropout=args.dropout == "off",
        center_rewards_coefficient=None,
        # TRL *drops* longer pairs (no truncation); ours are already <= max_length
        max_length=args.max_length,
        # our extra token-type columns must survive to the collator (TRL keeps only
        # chosen_ids/rejected_ids/margin)
        remove_unused_columns=not token_types,
    )
    torch.manual_seed(args.seed)
    model = copy.deepcopy(template.model)
    tokenizer = copy.deepcopy(template.tokenizer)  # TRL sets pad_token on it
    trainer = TRLRewardTrainer(
        model=model, args=config, train_dataset=dataset, processing_class=tokenizer
    )
    drop_printer(trainer)
    trainer.add_callback(timing_callback(stamps))
    collator = _Collator(trainer.data_collator, token_types)
    trainer.data_collator = collator

    # identical-tokens check: TRL's prepared dataset (after its max_length filter) must hold exactly our ids
    prepared = trainer.train_dataset
    ids_match = len(prepared) == len(rows) and all(
        c == pairs.chosen[i].input_ids and r == pairs.rejected[i].input_ids
        for c, r, i in zip(prepared["chosen_ids"], prepared["rejected_ids"], rows)
    )

    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    optimizer = unwrapped_optimizer(trainer)
    trl_decay = {
        n
        for n, p in trainer.model.named_parameters()
        if any(p is q for g in optimizer.param_groups if g["weight_decay"] > 0 for q in g["params"])
    }
    ours_decay = {n for n, p in trainer.model.named_parameters() if p.requires_grad and p.ndim >= 2}
    checks = {
        **trl_config_check(trainer),
        "warmup_steps": config.warmup_steps,
        "dropout_p": dropout_ps(trainer.model),
        "weight_decay_params_match_ours": trl_decay == ours_decay,
        "token_type_ids": "ours (collator wrapper)"
        if token_types
        else "none (TRL collator as shipped)",
        "sampler": config.train_sampling_strategy,
        "torch_threads": torch.get_num_threads(),
    }
    losses = trl_losses(trainer)
    counts = collator.counts[: len(stamps)]  # the dataloader may have built one batch ahead
    out = summarise("trl", stamps, counts, losses, args.warmup_steps, train_s)
    out["token_ids_identical_to_ours"] = ids_match
    out["batches"] = (
        "our batch sequence (sequential sampler)" if order is not None else "TRL random sampler"
    )
    out["config_check"] = checks
    out["per_step_counts"] = counts
    return out


# -- data -----------------------------------------------------------------------------------------
def load_frame(args) -> tuple[pd.DataFrame, str]:
    if args.data == "hh":
        from rlhf_core.config import DataConfig
        from rlhf_core.data.dataset import read_valid_pairs

        path = SHARED_DATA / HH_FILE
        frame, _ = read_valid_pairs(str(path), DataConfig())
        return frame, str(path)
    from rlhf_core.data.demo import generate_demo_pairs

    n = args.n_pairs or 1024
    return pd.DataFrame(generate_demo_pairs(n, seed=0)), f"generate_demo_pairs({n}, seed=0)"


def trim(pairs: PairSet, n: int) -> PairSet:
    return PairSet(
        pairs.chosen[:n],
        pairs.rejected[:n],
        pairs.p_chosen[:n],
        pairs.margin[:n],
        pairs.weight[:n],
        pairs.label_source[:n],
    )


# -- driver ---------------------------------------------------------------------------------------
def main() -> None:
    ap = common.make_parser(__doc__)
    ap.add_argument(
        "--data",
        default="hh",
        choices=["hh", "demo"],
        help=f"hh: {HH_FILE} from the shared data folder ($RLHF_SHARED_DATA); demo: generate_demo_pairs",
    )
    ap.add_argument(
        "--n-pairs",
        type=int,
        default=None,
        help="use the first N pairs (demo: generate N; default 1024)",
    )
    ap.add_argument(
        "--backbone",
        default="minilm",
        help="reward backbone (default: the packaged MiniLM encoder)",
    )
    add_trainer_args(ap, warmup_steps=2, lr=3e-5, batch_help="pairs per optimiser step")
    ap.add_argument(
        "--lr-warmup-ratio", type=float, default=0.0, help="linear lr warm-up, both (default none)"
    )
    ap.add_argument(
        "--dropout",
        default="on",
        choices=["on", "off"],
        help="on: the backbone's own dropout, both (our loop's behaviour); off: none, both (TRL's default)",
    )
    ap.add_argument(
        "--ours-batches",
        default="bucketed",
        choices=["bucketed", "random"],
        help="bucketed: our loop's length-bucketed batches; random: bucket_factor=1 (random batches)",
    )
    ap.add_argument(
        "--trl-order",
        default="same",
        choices=["same", "random"],
        help="same: TRL trains on our exact batch sequence; random: TRL's default random sampler",
    )
    ap.add_argument(
        "--trl-token-types",
        default="ours",
        choices=["ours", "none"],
        help="ours: TRL's collator plus our token_type_ids (identical model inputs); none: TRL as shipped",
    )
    add_common_args(ap, seed=True, threads=True)
    args = ap.parse_args()
    check_warmup_steps(ap, args)
    load_start = prepare_run(args)
    versions = lib_versions()

    frame, data_source = load_frame(args)
    settings = our_settings(args)
    template = build_reward_model(args.backbone, settings, seed=args.seed)
    n_params = sum(p.numel() for p in template.model.parameters())
    t_enc = time.perf_counter()
    pairs = encode_pairs(template, frame, settings)
    encode_s = time.perf_counter() - t_enc
    n = min(len(pairs), args.n_pairs or len(pairs))
    n -= (
        n % args.batch_size
    )  # full batches only: TRL's sequential sampler must cut our batches where we do
    if n < args.batch_size:
        raise SystemExit(
            f"only {len(pairs)} labelled pairs: fewer than one batch of {args.batch_size}"
        )
    pairs = trim(pairs, n)
    if np.any(pairs.p_chosen != 1.0) or np.any(pairs.weight != 1.0):
        raise SystemExit(
            "soft labels / per-source weights in the data: TRL's RewardTrainer has neither"
        )
    at_max = sum(
        1 for c, r in zip(pairs.chosen, pairs.rejected) if max(len(c), len(r)) >= args.max_length
    )

    results: dict[str, list[dict]] = {"ours": [], "trl": []}
    with tempfile.TemporaryDirectory(prefix="reward-vs-trl-") as tmp:
        for rep in range(args.repeat):
            for who in run_order(["trl", "ours"], rep):
                if who == "ours":
                    results["ours"].append(run_ours(template, pairs, args))
                else:
                    results["trl"].append(
                        run_trl(template, pairs, args, str(Path(tmp) / f"trl-{rep}"))
                    )

    same_batches = args.trl_order == "same" and all(
        r["per_step_counts"] == o["per_step_counts"]
        for r, o in zip(results["trl"], results["ours"])
    )
    summary = {
        name: best_run(runs, "pairs_per_s", "token_ids_identical_to_ours")
        for name, runs in results.items()
    }
    min_cpu = min(s["cpu_per_wall"] for s in summary.values())
    machine = machine_state(load_start, min_cpu)
    threads = machine["torch_threads"]
    setup = {
        "backbone": args.backbone,
        "model": type(template.model).__name__,
        "reward_kind": template.kind,
        "parameters": n_params,
        "data": args.data,
        "data_source": data_source,
        "pairs": n,
        "pairs_at_max_length": at_max,
        "encode_s": encode_s,
        "steps": args.steps,
        "warmup_steps_excluded": args.warmup_steps,
        "batch_size_pairs": args.batch_size,
        "grad_accum": 1,
        "lr": args.lr,
        "schedule": "linear",
        "lr_warmup_ratio": args.lr_warmup_ratio,
        "weight_decay": 0.01,
        "max_grad_norm": 1.0,
        "max_length": args.max_length,
        "dropout": args.dropout,
        "dtype": "fp32",
        "device": "cpu",
        "loss": "Bradley-Terry, mean over pairs, no centring, no margin"
        if not np.any(pairs.margin)
        else "Bradley-Terry with margin, mean over pairs, no centring",
        "ours_batches": args.ours_batches,
        "trl_order": args.trl_order,
        "trl_token_types": args.trl_token_types,
        "identical_batches": same_batches,
        **machine,
        "repeat": args.repeat,
        **timing_notes(args.warmup_steps, args.steps),
        "aggregate": "best (highest pairs/s) of --repeat runs per trainer; all runs in runs_pairs_per_s",
        "versions": versions,
    }
    ratio = summary["ours"]["pairs_per_s"] / summary["trl"]["pairs_per_s"]
    if args.json:
        print_json({"setup": setup, **summary, "ratio_pairs_per_s": ratio})
        return
    print(
        f"Reward-model throughput, {args.backbone} ({type(template.model).__name__}, {n_params / 1e6:.1f}M params), "
        f"{args.data} data: {n} pairs ({at_max} at max_length {args.max_length}), batch {args.batch_size} pairs, "
        f"{args.steps} steps, fp32 CPU, {threads} threads, dropout {args.dropout}, "
        f"torch {versions['torch']}, transformers {versions['transformers']}, "
        f"trl {versions['trl']}"
    )
    same = f" (identical batches: {same_batches})" if args.trl_order == "same" else ""
    print(
        f"timing: {setup['timing']} (first {args.warmup_steps} steps excluded, both); "
        f"ours: {summary['ours']['batches']}; trl: {summary['trl']['batches']}{same}"
    )
    header = (
        f"{'':<6}{'pairs/s':>9}{'tokens/s':>10}{'steps/s':>9}{'steps':>7}{'pairs':>7}{'timed s':>9}"
        f"{'train() s':>11}{'pad frac':>10}{'cpu/wall':>10}{'first loss':>12}{'final loss':>12}"
    )
    print_table(
        header,
        (
            f"{name:<6}{s['pairs_per_s']:>9.2f}{s['tokens_per_s']:>10.0f}{s['steps_per_s']:>9.3f}"
            f"{s['steps']:>7d}{s['total_pairs']:>7d}{s['timed_s']:>9.2f}{s['train_s']:>11.2f}"
            f"{s['padding_fraction']:>10.3f}{s['cpu_per_wall']:>10.2f}{s['first_loss']:>12.4f}"
            f"{s['final_loss']:>12.4f}"
            for name, s in summary.items()
        ),
    )
    print(
        f"ratio (ours / trl): pairs/s {ratio:.3f}   (steps, pairs = all steps run; rates over the timed steps)"
    )
    if not summary["trl"]["token_ids_identical_to_ours"]:
        print(
            "WARNING: TRL's prepared dataset differs from our token ids (filtered or re-tokenised)"
        )
    for name in ("ours", "trl"):
        print(f"{name}: " + key_values(summary[name]["config_check"]))
    warn_if_busy(machine)
    if args.repeat > 1:
        print_runs(summary, "pairs_per_s", "pairs/s", ".2f")


if __name__ == "__main__":
    main()
