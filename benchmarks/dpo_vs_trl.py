"""DPO throughput: our trainer (rlhf_core.dpo) against TRL's DPOTrainer, side by side in one process.

    python benchmarks/dpo_vs_trl.py [--preset small|tiny] [--steps 30] [--batch-size 8] [--warmup-steps 3]
                                    [--order both|same|random] [--repeat 1] [--threads 1] [--json]

Two modes (--order both, the default, runs both; throughput is reported in preference pairs per second and as
ratios ours / TRL):

  "identical batches" (--order same): both trainers do the same work.
  * model: one scratch model (build_scratch_model(texts, dir, preset, arch, seed)) built once into a temp dir;
    each trainer gets a fresh copy loaded with load_causal_lm (fp32, CPU) after the same torch.manual_seed; the
    reference policy is those same initial weights on both sides (ours: the policy before training; TRL:
    ref_model=None with precompute_ref_log_probs=True, i.e. the policy before training too). Dropout: the scratch
    GPT-2 has resid/embd/attn dropout 0 (Llama: attention_dropout 0), so TRL's disable_dropout=True (its default,
    kept) changes nothing and dropout is moot on both sides (dropout_p in the output);
  * data: generate_demo_pairs(n, seed=0) (prompt, chosen, rejected; n defaults to steps x batch size, one epoch, so
    each pair is trained on once and both trainers precompute reference log-probs for the same pairs), tokenised
    once with our ChatFormat through encode_pairs (hard labels: p_chosen = 1). TRL 1.12's DPOTrainer has no
    pre-tokenised input (its _prepare_dataset always runs extract_prompt + tokenisation on text columns), so it gets
    text: prompt = ChatFormat.prompt_text(prompt), chosen/rejected = ChatFormat.response_text(...) (TRL appends the
    EOS token text); the token ids it prepares (prompt_ids / chosen_ids / rejected_ids) are then checked pair by pair
    against ours ("same tokens"), and every batch TRL's collator builds is compared tensor for tensor with the batch
    our collate_pairs builds for that step ("identical batches");
  * batches: TRL gets our length-bucketed batch sequence (the dataset rows laid out in our batch order and a
    sequential sampler), B pairs per step, 2B sequences (chosen rows then rejected rows) in one forward pass, both;
  * reference log-probs: precomputed before training on both sides (ours always: reference_logps, batches of B
    pairs sorted by length; TRL: precompute_ref_log_probs=True, batches of B pairs in dataset order, i.e. our
    training batches). Both precomputations are checked against each other (max |diff| of the per-pair log-probs);
  * loss: plain DPO, -log sigmoid(beta * h), beta 0.1, mean over the pairs of the batch (ours loss="sigmoid";
    TRL loss_type=["sigmoid"]);
  * optimisation: grad accumulation 1, lr --lr (default 5e-4: large enough that the losses leave log 2 within a few
    steps, so that the loss check means something), cosine, no lr warm-up, AdamW (torch.optim.AdamW, weight decay 0
    (our DPOConfig default), non-fused, both), grad-norm clip 1.0, fp32 (ours mixed_precision="no"; TRL bf16=False),
    no activation/gradient checkpointing (TRL default on: switched off), no padding-free (TRL default off), same
    step count. The per-step training losses of the two runs are compared: with the same tokens, batches, weights
    and optimiser they agree to float rounding (max |diff| <= --loss-tol, default 1e-4, reported as agree / DIFFER).
    One difference is left in: our loop swaps GPT-2's seven-op tanh GELU for PyTorch's fused kernel of the same
    formula (rlhf_core.models.fused), part of our trainer's speed; as in build_dpo_trainer, our reference log-probs
    are computed with the fused kernel too (relative differences from TRL's of order 1e-7 in fp32).

  "as a user runs it" (--order random): each trainer on its own defaults.
  * same model, data and tokens as above; TRL on its default random sampler (batches of random pairs: more padding
    than our length bucketing);
  * ours: DPOConfig() values except max_steps and batch_size (loss "soft", which is DPO on hard labels; lr 1e-5,
    5% warm-up, cosine, weight decay 0, mixed_precision "auto": bf16 autocast on a CPU with AMX, fp32 otherwise);
  * TRL: DPOConfig defaults for everything a user would not change on a CPU: precompute_ref_log_probs=False (a
    second, frozen copy of the model runs a reference forward pass in every step), gradient checkpointing on, bf16 on,
    optim "adamw_torch_fused", lr 1e-6, linear schedule, loss_type ["sigmoid"], disable_dropout. The output lists
    every default kept. All of them run on a CPU (bf16 autocast, fused AdamW and checkpointing included), so
    nothing is switched off; transformers itself turns dataloader_pin_memory off without a GPU.
  * the benchmark harness sets for TRL in both modes: max_steps, per-device batch, max_length (= ours; our
    encode_pairs keeps the end of an over-long prompt, TRL's collator the start, so a pair truncated by either
    would fail the same-tokens check; "truncated" in the output counts ours), use_cpu, seed, a loss log at every step (logging_steps=1), no saving, reporting or
    progress bars; for ours in both modes a log line at every step (log_every=1) and no evaluation or checkpoints.

Timing: the first --warmup-steps optimiser steps are excluded for both; the timed window runs from the end of step
W to the end of the last step (data collation, forward passes -- with TRL's defaults the reference forward pass too
--, backward, clip, optimiser, scheduler and per-step logging included). Reported as well: the reference
log-prob precomputation ("ref s": ours reference_logps, TRL _precompute_ref_logps inside its constructor, 0 when
TRL does not precompute), train() wall time, and their sum ("ref+train s", the pairs/s column "total"). Model
building, tokenisation and TRL's dataset preparation are excluded. Tokens are counted from the batches each trainer
actually consumed: tokens = non-pad tokens of the 2B sequences, response tokens = chosen + rejected tokens.
"final loss" = mean of the per-step training losses over the last 10 steps.

Needs an idle machine: with 2 cores, a busy neighbour process slows a 2-thread torch run several-fold (OpenMP
threads wait for each other); the cpu/wall column shows it, and a warning is printed when it drops. --threads 1
is far less sensitive to that.
"""

from __future__ import annotations

import math
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
    dropout_ps,
    key_values,
    lib_versions,
    loss_stats,
    machine_state,
    patched_env,
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

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from rlhf_core.config import DPOConfig  # noqa: E402
from rlhf_core.data.demo import generate_demo_pairs  # noqa: E402
from rlhf_core.dpo.learner import (  # noqa: E402
    DPOTrainer,
    collate_pairs,
    encode_pairs,
    reference_logps,
)
from rlhf_core.models.chat import ChatFormat  # noqa: E402
from rlhf_core.models.fused import fuse_activations  # noqa: E402
from rlhf_core.models.loading import load_causal_lm  # noqa: E402
from rlhf_core.models.scratch import build_scratch_model  # noqa: E402
from rlhf_core.training import autocast_dtype, autocast_for, length_bucketed_batches  # noqa: E402

MODES = {"same": "identical batches", "random": "as a user runs it"}
BETA = 0.1  # DPOConfig and TRL DPOConfig default


# -- shared setup ---------------------------------------------------------------------------------
def our_settings(args, mode: str) -> DPOConfig:
    """Ours: the identical-batches settings, or DPOConfig() defaults (step count and batch size apart).
    log_every=1: per-step loss and a per-step timestamp through on_log (TRL logs every step too)."""
    harness = dict(
        max_steps=args.steps,
        batch_size=args.batch_size,
        log_every=1,
        eval_every=10**9,
        checkpoint_every=10**9,
        early_stopping_patience=None,
        max_length=args.max_length,
    )
    if mode == "random":
        return DPOConfig(**harness)
    return DPOConfig(
        **harness,
        grad_accum=1,
        lr=args.lr,
        warmup_ratio=0.0,
        schedule="cosine",
        weight_decay=0.0,
        max_grad_norm=1.0,
        mixed_precision="no",
        loss="sigmoid",
        beta=BETA,
    )


def our_batch_order(lengths: list[int], settings: DPOConfig, seed: int) -> list[list[int]]:
    """The example indices of each optimiser step of our loop (grad_accum=1), replaying its deterministic order."""
    out, epoch = [], 0
    while len(out) < settings.max_steps:
        out += length_bucketed_batches(
            lengths, settings.batch_size, settings.bucket_factor, seed, epoch
        )
        epoch += 1
    return out[: settings.max_steps]


def pair_counts(examples, batch: list[int]) -> tuple[int, int, int, int]:
    """(pairs, non-pad tokens, response tokens, padded positions) of one batch as collate_pairs builds it."""
    rows = [(e.prompt, e.chosen) for e in (examples[i] for i in batch)] + [
        (e.prompt, e.rejected) for e in (examples[i] for i in batch)
    ]
    lens = [len(p) + len(r) for p, r in rows]
    return len(batch), sum(lens), sum(len(r) for _, r in rows), len(rows) * max(lens)


def summarise(
    name: str,
    step_times: list[tuple[float, float]],
    counts: list[tuple[int, int, int, int]],
    losses: list[float],
    warmup: int,
    ref_s: float,
    train_s: float,
) -> dict:
    n, window, cpu = timed_window(name, step_times, warmup)
    timed = counts[warmup:]
    pairs = sum(c[0] for c in timed)
    tokens = sum(c[1] for c in timed)
    response = sum(c[2] for c in timed)
    padded = sum(c[3] for c in timed)
    all_pairs = sum(c[0] for c in counts)
    return {
        "pairs_per_s": pairs / window,
        "pairs_per_s_total": all_pairs / (ref_s + train_s),
        "tokens_per_s": tokens / window,
        "response_tokens_per_s": response / window,
        "steps_per_s": len(timed) / window,
        "timed_s": window,
        "timed_steps": len(timed),
        "ref_s": ref_s,
        "train_s": train_s,
        "ref_plus_train_s": ref_s + train_s,
        "pairs": pairs,
        "tokens": tokens,
        "padding_fraction": 1.0 - tokens / max(1, padded),
        "cpu_per_wall": cpu / window,
        **loss_stats(losses),
        "steps": n,
    }


# -- ours -----------------------------------------------------------------------------------------
def run_ours(model_dir: str, examples, args, mode: str) -> tuple[dict, dict]:
    """(summary, extras): extras hold what the checks need (losses, batches, reference log-probs)."""
    torch.manual_seed(args.seed)
    loaded = load_causal_lm(model_dir, dtype="fp32", device="cpu", eval_mode=False)
    settings = our_settings(args, mode)
    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = next(loaded.model.parameters()).device

    def amp():
        return autocast_for(settings.mixed_precision, device)

    # as build_dpo_trainer does: the fused kernels, reference log-probs of every training pair, then
    # the trainer
    t0 = time.perf_counter()
    fuse_activations(loaded.model)
    ref = reference_logps(loaded.model, examples, pad, settings.batch_size, amp)
    ref_s = time.perf_counter() - t0
    stamps: list[tuple[float, float]] = []
    losses: list[float] = []
    trainer = DPOTrainer(
        loaded.model,
        tok,
        examples,
        [],
        ref,
        torch.zeros((0, 2)),
        settings,
        seed=args.seed,
        checkpoint_dir=None,
        on_log=step_logger(stamps, losses),
        progress=False,
    )
    t1 = time.perf_counter()
    result = trainer.train()
    train_s = time.perf_counter() - t1
    order = our_batch_order([len(e) for e in examples], settings, args.seed)
    counts = [pair_counts(examples, b) for b in order]
    assert result.steps == len(stamps) == len(counts), (result.steps, len(stamps), len(counts))
    # cross-check of the replayed order: our loop's own count of pairs trained on
    assert result.train_units == sum(c[0] for c in counts), (result.train_units, counts)
    out = summarise("ours", stamps, counts, losses, args.warmup_steps, ref_s, train_s)
    autocast = autocast_dtype(settings.mixed_precision, device)
    out.update(
        ref_pairs=len(examples),
        dropout_p=dropout_ps(loaded.model),
        settings={
            "loss": settings.loss,
            "beta": settings.beta,
            "lr": settings.lr,
            "warmup_ratio": settings.warmup_ratio,
            "schedule": settings.schedule,
            "weight_decay": settings.weight_decay,
            "mixed_precision": settings.mixed_precision,
            "autocast": str(autocast).removeprefix("torch.") if autocast else "none (fp32)",
            "optimizer": "AdamW (torch.optim, non-fused)",
            "reference": "precomputed",
        },
    )
    extras = {"losses": losses, "order": order, "counts": counts, "ref": ref, "pad": pad}
    return out, extras


# -- TRL ------------------------------------------------------------------------------------------
class _CountingCollator:
    """Wraps TRL's collator; records the counts and input ids of every batch it builds, in order."""

    def __init__(self, inner):
        self.inner, self.counts, self.ids = inner, [], []

    def __call__(self, features):
        batch = self.inner(features)
        mask = batch["attention_mask"]
        self.counts.append(
            (
                len(features),
                int(mask.sum()),
                int(batch["completion_mask"].sum()),
                int(mask.numel()),
            )
        )
        self.ids.append(batch["input_ids"])  # a reference, no copy: checked after training
        return batch


def timed_trl_trainer():
    """TRL's DPOTrainer, timing its reference log-prob precomputation (nothing else changed)."""
    from trl import DPOTrainer as TRLDPOTrainer

    class TimedDPOTrainer(TRLDPOTrainer):
        precompute_s = 0.0

        def _precompute_ref_logps(self, dataset, name, batch_size):
            t0 = time.perf_counter()
            try:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            finally:
                self.precompute_s += time.perf_counter() - t0

    return TimedDPOTrainer


def trl_rows(args, examples, mode: str) -> list[int]:
    """The pair indices of TRL's dataset rows: our batch sequence laid out (same) or all pairs in order (random)."""
    if mode == "random":
        return list(range(len(examples)))
    order = our_batch_order([len(e) for e in examples], our_settings(args, mode), args.seed)
    if any(len(b) != args.batch_size for b in order):
        raise SystemExit("--order same needs full batches (use --n a multiple of --batch-size)")
    return [i for b in order for i in b]


def trl_config(args, out_dir: str, mode: str):
    from trl import DPOConfig as TRLDPOConfig

    if mode == "same":
        return TRLDPOConfig(
            **{**trl_train_kwargs(args, out_dir, sequential=True), "weight_decay": 0.0},
            lr_scheduler_type="cosine",
            warmup_steps=0,
            max_length=args.max_length,
            padding_free=False,
            precompute_ref_log_probs=True,
            loss_type=["sigmoid"],
            beta=BETA,
        )
    # as a user runs it: TRL's defaults, plus what the harness needs
    return TRLDPOConfig(
        output_dir=out_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        max_length=args.max_length,
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )


def trl_defaults_kept(config) -> dict:
    """The TRL settings a user on a CPU would leave alone, as the run used them."""
    return {
        "precompute_ref_log_probs": config.precompute_ref_log_probs,
        "activation_checkpointing": config.activation_checkpointing,
        "bf16": config.bf16,
        "optim": str(getattr(config.optim, "value", config.optim)),
        "learning_rate": config.learning_rate,
        "lr_scheduler_type": str(
            getattr(config.lr_scheduler_type, "value", config.lr_scheduler_type)
        ),
        "warmup_steps": config.warmup_steps,
        "weight_decay": config.weight_decay,
        "loss_type": list(config.loss_type),
        "beta": config.beta,
        "disable_dropout": config.disable_dropout,
        "padding_free": config.padding_free,
        "use_liger_kernel": config.use_liger_kernel,
        "torch_compile": config.torch_compile,
        "dataloader_pin_memory": config.dataloader_pin_memory,
        "train_sampling_strategy": config.train_sampling_strategy,
    }


def run_trl(model_dir: str, examples, texts, args, out_dir: str, mode: str) -> tuple[dict, dict]:
    from datasets import Dataset

    rows = trl_rows(args, examples, mode)
    dataset = Dataset.from_dict(
        {
            "prompt": [texts[i][0] for i in rows],
            "chosen": [texts[i][1] for i in rows],
            "rejected": [texts[i][2] for i in rows],
        }
    )
    config = trl_config(args, out_dir, mode)
    stamps: list[tuple[float, float]] = []
    torch.manual_seed(args.seed)
    loaded = load_causal_lm(model_dir, dtype="fp32", device="cpu", eval_mode=False)
    with patched_env({"TQDM_DISABLE": "1"}):  # the precompute's progress bar
        trainer = timed_trl_trainer()(
            model=loaded.model,
            args=config,
            train_dataset=dataset,
            processing_class=loaded.tokenizer,
        )
    drop_printer(trainer)
    trainer.add_callback(timing_callback(stamps))
    counter = _CountingCollator(trainer.data_collator)
    trainer.data_collator = counter

    # the tokens TRL prepared from the text, pair by pair, against ours
    prepared = trainer.train_dataset
    want = [examples[i] for i in rows]
    mismatched = (
        sum(
            (p, c, r) != (e.prompt, e.chosen, e.rejected)
            for p, c, r, e in zip(
                prepared["prompt_ids"], prepared["chosen_ids"], prepared["rejected_ids"], want
            )
        )
        if len(prepared) == len(want)
        else len(want)
    )
    ref = None
    if "ref_chosen_logps" in prepared.column_names:
        ref = torch.stack(
            [
                torch.tensor(prepared["ref_chosen_logps"], dtype=torch.float32),
                torch.tensor(prepared["ref_rejected_logps"], dtype=torch.float32),
            ],
            dim=1,
        )

    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    losses = trl_losses(trainer)
    counts = counter.counts[: len(stamps)]  # the dataloader may have built one batch ahead
    ref_s = trainer.precompute_s
    out = summarise("trl", stamps, counts, losses, args.warmup_steps, ref_s, train_s)
    out.update(
        ref_pairs=len(prepared) if ref is not None else 0,
        reference="precomputed" if ref is not None else "frozen copy, forward pass every step",
        same_tokens=mismatched == 0,
        pairs_with_other_tokens=mismatched,
        dropout_p=dropout_ps(trainer.model),
        config_check=trl_config_check(trainer),
    )
    if mode == "random":
        out["defaults_kept"] = trl_defaults_kept(config)
    extras = {
        "losses": losses,
        "rows": rows,
        "counts": counts,
        "ids": counter.ids[: len(stamps)],
        "ref": ref,
    }
    return out, extras


# -- checks ---------------------------------------------------------------------------------------
def same_batches(examples, ours: dict, trl: dict) -> bool:
    """Every step: TRL's collated input_ids equal to what our collate_pairs builds for our batch of that step."""
    if len(ours["order"]) != len(trl["ids"]):
        return False
    return all(
        torch.equal(collate_pairs([examples[i] for i in b], ours["pad"])["input_ids"], ids)
        for b, ids in zip(ours["order"], trl["ids"])
    )


def compare(examples, ours: dict, trl: dict, tol: float) -> dict:
    """Identical-batches checks of one round: batches, per-step losses, reference log-probs."""
    a, b = ours["losses"], trl["losses"]
    diffs = [abs(x - y) for x, y in zip(a, b)]
    loss_diff = max(diffs) if diffs and len(a) == len(b) else math.inf
    ref_diff, ref_scale = math.inf, math.nan
    if trl["ref"] is not None:
        mine = ours["ref"][trl["rows"]]
        ref_diff = float((mine - trl["ref"]).abs().max())
        ref_scale = float(mine.abs().max())
    return {
        "identical_batches": same_batches(examples, ours, trl),
        "loss_max_abs_diff": loss_diff,
        "loss_diff_per_step": diffs,
        "losses_agree": loss_diff <= tol,
        "ref_logps_max_abs_diff": ref_diff,
        "ref_logps_max_abs": ref_scale,  # summed log-probs: the scale the difference is rounding of
    }


# -- driver ---------------------------------------------------------------------------------------
def main() -> None:
    ap = common.make_parser(__doc__)
    ap.add_argument(
        "--n", type=int, default=None, help="demo pairs (default: steps x batch size, one epoch)"
    )
    ap.add_argument("--preset", default="small", choices=["tiny", "small"])
    ap.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    add_trainer_args(
        ap, warmup_steps=3, lr=5e-4, batch_help="preference pairs per step (2x sequences)"
    )
    ap.set_defaults(steps=30, batch_size=8)
    ap.add_argument(
        "--order",
        default="both",
        choices=["both", "same", "random"],
        help="same: identical batches and settings; random: each trainer as a user runs it "
        "(TRL on its random sampler and defaults); both: the two, in turn",
    )
    ap.add_argument(
        "--loss-tol",
        type=float,
        default=1e-4,
        help="identical batches: the per-step losses agree when max |ours - TRL| <= this",
    )
    add_common_args(ap, seed=True, threads=True)
    args = ap.parse_args()
    check_warmup_steps(ap, args)
    if args.n is None:
        args.n = args.steps * args.batch_size
    load_start = prepare_run(args)
    versions = lib_versions()
    modes = ["same", "random"] if args.order == "both" else [args.order]

    rows = generate_demo_pairs(args.n, seed=0)
    corpus = (
        [r["prompt"] for r in rows] + [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    )
    results = {m: {"ours": [], "trl": []} for m in modes}
    checks: dict[str, list[dict]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="dpo-vs-trl-") as tmp:
        model_dir = str(
            build_scratch_model(corpus, Path(tmp) / "model", args.preset, args.arch, seed=args.seed)
        )
        probe = load_causal_lm(model_dir, dtype="fp32", device="cpu")
        n_params = sum(p.numel() for p in probe.model.parameters())
        fmt = ChatFormat(probe.tokenizer)
        df = pd.DataFrame([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
        examples, stats = encode_pairs(df, fmt, args.max_length)  # no p_chosen column: all 1.0
        texts = [
            (
                fmt.prompt_text(r["prompt"]),
                fmt.response_text(r["chosen"]),
                fmt.response_text(r["rejected"]),
            )
            for r in rows
        ]
        del probe
        for rep in range(args.repeat):
            for mode in modes:
                extras = {}
                for who in run_order(["trl", "ours"], rep):
                    if who == "ours":
                        summary, extras["ours"] = run_ours(model_dir, examples, args, mode)
                    else:
                        out_dir = str(Path(tmp) / f"trl-{mode}-{rep}")
                        summary, extras["trl"] = run_trl(
                            model_dir, examples, texts, args, out_dir, mode
                        )
                    results[mode][who].append(summary)
                if mode == "same":
                    checks[mode].append(
                        compare(examples, extras["ours"], extras["trl"], args.loss_tol)
                    )

    summary = {
        m: {who: best_run(runs, "pairs_per_s", "same_tokens") for who, runs in by.items()}
        for m, by in results.items()
    }
    min_cpu = min(s["cpu_per_wall"] for by in summary.values() for s in by.values())
    machine = machine_state(load_start, min_cpu)
    out_modes = {}
    for m in modes:
        ours, trl = summary[m]["ours"], summary[m]["trl"]
        entry = {
            "mode": MODES[m],
            "ours": ours,
            "trl": trl,
            "ratio_pairs_per_s": ours["pairs_per_s"] / trl["pairs_per_s"],
            "ratio_pairs_per_s_total": ours["pairs_per_s_total"] / trl["pairs_per_s_total"],
            "ratio_tokens_per_s": ours["tokens_per_s"] / trl["tokens_per_s"],
        }
        if checks[m]:  # over all rounds: the worst
            entry["identical_batches"] = all(c["identical_batches"] for c in checks[m])
            entry["loss_max_abs_diff"] = max(c["loss_max_abs_diff"] for c in checks[m])
            entry["losses_agree"] = all(c["losses_agree"] for c in checks[m])
            entry["ref_logps_max_abs_diff"] = max(c["ref_logps_max_abs_diff"] for c in checks[m])
            entry["ref_logps_max_abs"] = checks[m][0]["ref_logps_max_abs"]
            entry["loss_diff_per_step"] = checks[m][0]["loss_diff_per_step"]
        out_modes[m] = entry

    setup = {
        "preset": args.preset,
        "arch": args.arch,
        "parameters": n_params,
        "n_pairs": args.n,
        "pairs_encoded": stats.examples,
        "truncated": stats.truncated,
        "mean_pair_tokens": sum(len(e) for e in examples) / max(1, len(examples)),
        "steps": args.steps,
        "warmup_steps_excluded": args.warmup_steps,
        "batch_pairs": args.batch_size,
        "grad_accum": 1,
        "lr_same": args.lr,
        "loss_tol": args.loss_tol,
        "max_length": args.max_length,
        "device": "cpu",
        **machine,
        "order": args.order,
        "repeat": args.repeat,
        **timing_notes(args.warmup_steps, args.steps),
        "aggregate": "best (highest pairs/s) of --repeat runs per trainer and mode; all runs in "
        "runs_pairs_per_s",
        "versions": versions,
    }
    if args.json:
        print_json({"setup": setup, **out_modes})
        return

    print(
        f"DPO throughput, {args.preset}/{args.arch} ({n_params / 1e6:.1f}M params), {stats.examples} pairs "
        f"({stats.truncated} truncated, mean {setup['mean_pair_tokens']:.0f} tokens), batch {args.batch_size} pairs, "
        f"{args.steps} steps, CPU, {torch.get_num_threads()} threads, torch {versions['torch']}, "
        f"transformers {versions['transformers']}, trl {versions['trl']}"
    )
    print(f"timing: {setup['timing']} (first {args.warmup_steps} steps excluded, both)")
    header = (
        f"{'':<8}{'pairs/s':>9}{'total':>8}{'tokens/s':>10}{'timed s':>9}{'ref s':>8}{'train() s':>11}"
        f"{'ref+train s':>13}{'pad frac':>10}{'cpu/wall':>10}{'first loss':>12}{'final loss':>12}"
    )
    for m in modes:
        e = out_modes[m]
        print()
        print(f"== {MODES[m]} (--order {m}) ==")
        print_table(
            header,
            (
                f"{who:<8}{s['pairs_per_s']:>9.2f}{s['pairs_per_s_total']:>8.2f}{s['tokens_per_s']:>10.0f}"
                f"{s['timed_s']:>9.2f}{s['ref_s']:>8.2f}{s['train_s']:>11.2f}{s['ref_plus_train_s']:>13.2f}"
                f"{s['padding_fraction']:>10.3f}{s['cpu_per_wall']:>10.2f}{s['first_loss']:>12.4f}"
                f"{s['final_loss']:>12.4f}"
                for who, s in (("ours", e["ours"]), ("trl", e["trl"]))
            ),
        )
        print(
            f"ratio (ours / trl): pairs/s {e['ratio_pairs_per_s']:.3f} (timed window), "
            f"{e['ratio_pairs_per_s_total']:.3f} (ref + train()), tokens/s {e['ratio_tokens_per_s']:.3f}"
        )
        trl = e["trl"]
        if not trl["same_tokens"]:
            print(
                f"WARNING: TRL tokenised {trl['pairs_with_other_tokens']} pairs differently from ours: "
                "not the same data"
            )
        if m == "same":
            print(
                f"both: fp32, lr {args.lr:g} cosine, no warm-up, AdamW (non-fused, weight decay 0), clip 1.0, "
                f"loss sigmoid beta {BETA}, reference log-probs precomputed"
            )
            verdict = "agree" if e["losses_agree"] else "DIFFER"
            print(
                f"checks: same tokens {trl['same_tokens']}, identical batches {e['identical_batches']}, "
                f"per-step losses {verdict} (max |ours - trl| {e['loss_max_abs_diff']:.2e} over "
                f"{args.steps} steps, tolerance {args.loss_tol:.0e}), reference log-probs max |diff| "
                f"{e['ref_logps_max_abs_diff']:.2e} (of log-probs up to {e['ref_logps_max_abs']:.0f})"
            )
        else:
            print(f"ours: {key_values(e['ours']['settings'])}")
            print(
                "trl defaults kept (all run on this CPU, nothing switched off): "
                f"{key_values(trl['defaults_kept'])}"
            )
        print(f"trl runs with: reference {trl['reference']}, {key_values(trl['config_check'])}")
    warn_if_busy(machine)
    if args.repeat > 1:
        for m in modes:
            print(f"{MODES[m]}:")
            print_runs(summary[m], "pairs_per_s", "pairs/s", ".2f")


if __name__ == "__main__":
    main()
