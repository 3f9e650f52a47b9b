"""The labelling stage as plain functions: build the judge, label pairs, merge with human labels."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from rlhf_core.config import GenerateConfig, JudgeConfig, LabelsConfig
from rlhf_core.errors import UserError
from rlhf_core.judges.base import Judge
from rlhf_core.judges.constitution import load_constitution
from rlhf_core.judges.labeling import LabelCache, Progress, agreement_report, label_pairs


def build_judge(cfg: JudgeConfig) -> Judge:
    """The configured judge (each backend reads its own keys of the section)."""
    constitution = load_constitution(cfg.constitution)
    if cfg.backend == "embedding":
        from rlhf_core.judges.embedding import EmbeddingJudge

        return EmbeddingJudge(constitution, cfg)
    if cfg.backend == "hf":
        from rlhf_core.judges.hf import HFJudge

        return HFJudge(constitution, cfg)
    if cfg.backend == "openai":
        from rlhf_core.judges.openai_compat import OpenAIJudge

        return OpenAIJudge(constitution, cfg)
    raise ValueError(f"unknown judge backend {cfg.backend!r}")


def merge_labels(train: pd.DataFrame, p_ai: np.ndarray, cfg: LabelsConfig) -> pd.DataFrame:
    """The training labels the reward model sees, by the configured merge policy. Unlabelled pairs
    always take the AI label, oriented so that 'chosen' is the judge's winner."""
    out = _merge_labelled(train, p_ai, cfg)
    none = (train["label_source"] == "none").to_numpy()
    if none.any():
        swap = none & (p_ai < 0.5)
        out.loc[swap, ["chosen", "rejected"]] = out.loc[swap, ["rejected", "chosen"]].to_numpy()
        out.loc[none, "p_chosen"] = np.where(p_ai[none] < 0.5, 1.0 - p_ai[none], p_ai[none])
        out.loc[none, "label_source"] = "ai"
    return out


def _merge_labelled(train: pd.DataFrame, p_ai: np.ndarray, cfg: LabelsConfig) -> pd.DataFrame:
    out = train.copy()
    if cfg.merge == "ai":
        out["p_chosen"] = p_ai
        out["label_source"] = "ai"
    elif cfg.merge == "weighted":
        human = (out["label_source"] == "human").to_numpy()
        out["p_chosen"] = np.where(
            human, cfg.ai_weight * p_ai + (1 - cfg.ai_weight) * out["p_chosen"].to_numpy(), p_ai
        )
        out.loc[~human, "label_source"] = "ai"
    return out  # "human": human labels win; the AI labels were measured against them only


def relabel(
    train: pd.DataFrame,
    judge: Judge,
    cfg: LabelsConfig,
    cache: LabelCache | None,
    progress: Progress | None = None,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Judge the human-labelled pairs: (training table after merge, per-pair labels, report).
    With labels.max_pairs a seeded random subset is judged; the other pairs keep their labels."""
    full = train
    if cfg.max_pairs and cfg.max_pairs < len(train):
        pick = np.sort(np.random.default_rng(seed).choice(len(train), cfg.max_pairs, replace=False))
        train = train.iloc[pick].reset_index(drop=True)
    prompts, chosen, rejected = (
        train["prompt"].tolist(),
        train["chosen"].tolist(),
        train["rejected"].tolist(),
    )
    outcome = label_pairs(
        judge,
        prompts,
        chosen,
        rejected,
        cache=cache,
        both_orders=cfg.judge.both_orders,
        batch_size=cfg.judge.batch_size,
        progress=progress,
    )
    per_pair = pd.DataFrame(
        {
            "prompt": prompts,
            "chosen": chosen,
            "rejected": rejected,
            "p_ai": outcome.p,
            "p_forward": outcome.p_forward,
            "p_human": train["p_chosen"].to_numpy(),
        }
    )
    if outcome.p_backward is not None:
        per_pair["p_backward"] = outcome.p_backward
    labelled = (train["label_source"] != "none").to_numpy()
    report = {
        "mode": "relabel",
        "merge": cfg.merge,
        **_outcome_stats(outcome, judge),
        "unlabelled_pairs": int((~labelled).sum()),
    }
    if labelled.any():  # agreement is measured where a human (or earlier) label exists
        report["agreement"] = agreement_report(
            outcome.p[labelled], train["p_chosen"].to_numpy()[labelled]
        )
    principles = _principle_report(judge, prompts, chosen, rejected)
    if principles:
        report["principles"] = principles
    table = merge_labels(train, outcome.p, cfg)
    if len(train) < len(full):
        report["judged_pairs"], report["kept_pairs"] = len(train), len(full) - len(train)
        rest = np.ones(len(full), bool)
        rest[pick] = False
        table = pd.concat([table, full[rest]], ignore_index=True)
    return table, per_pair, report


def generate_pairs(
    policy_dir: str,
    prompts: Sequence[str],
    cfg: GenerateConfig,
    seed: int,
    device: str = "auto",
    use_chat_template: bool = True,
) -> list[tuple[str, str, str]]:
    """k = cfg.samples_per_prompt samples of the policy per prompt, every two of them a pair
    (k(k-1)/2 per prompt); identical or empty pairs are left out. Sampled with PPO's sampler
    (KV cache, batch_size rows at a time), seeded per batch."""
    from itertools import combinations

    import torch

    from rlhf_core.models.chat import ChatFormat
    from rlhf_core.models.fused import fuse_activations
    from rlhf_core.models.loading import load_causal_lm
    from rlhf_core.ppo.rollout import left_pad, sample, sampling_copy
    from rlhf_core.training import autocast_dtype, autocast_for

    lm = load_causal_lm(policy_dir, device=device)
    model, tok = lm.model.eval(), lm.tokenizer
    fuse_activations(model)
    model = sampling_copy(model, autocast_dtype(cfg.mixed_precision, lm.device))
    fmt = ChatFormat(tok, use_chat_template=use_chat_template)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    k, pairs = cfg.samples_per_prompt, []
    step = max(1, cfg.batch_size // k)  # prompts per generation batch of about batch_size rows
    for start in range(0, len(prompts), step):
        batch = list(prompts[start : start + step])
        ids, mask = left_pad([fmt.encode(p)[0] for p in batch for _ in range(k)], pad, lm.device)
        generator = torch.Generator(device=lm.device).manual_seed(seed * 1_000_003 + start)
        with torch.no_grad(), autocast_for(cfg.mixed_precision, lm.device):
            out, _ = sample(
                model,
                ids,
                mask,
                cfg.max_new_tokens,
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                repetition_penalty=cfg.repetition_penalty,
                eos_id=tok.eos_token_id,
                pad_id=pad,
                generator=generator,
            )
        texts = tok.batch_decode(
            out.responses.masked_fill(~out.mask, pad), skip_special_tokens=True
        )
        for j, prompt in enumerate(batch):
            samples = [t.strip() for t in texts[j * k : (j + 1) * k]]
            pairs += [(prompt, a, b) for a, b in combinations(samples, 2) if a and b and a != b]
    return pairs


def label_generated(
    pairs: list[tuple[str, str, str]],
    judge: Judge,
    cfg: LabelsConfig,
    cache: LabelCache | None,
    progress: Progress | None = None,
    source: str = "generated",
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Judge new pairs: the winner becomes 'chosen' with p_chosen = P(winner is better)."""
    prompts, a, b = ([x[i] for x in pairs] for i in range(3))
    outcome = label_pairs(
        judge,
        prompts,
        a,
        b,
        cache=cache,
        both_orders=cfg.judge.both_orders,
        batch_size=cfg.judge.batch_size,
        progress=progress,
    )
    a_wins = outcome.p >= 0.5
    table = pd.DataFrame(
        {
            "prompt": pd.Series(prompts, dtype="str"),
            "chosen": pd.Series(np.where(a_wins, a, b), dtype="str"),
            "rejected": pd.Series(np.where(a_wins, b, a), dtype="str"),
            "label_source": pd.Series(["ai"] * len(prompts), dtype="str"),
            "p_chosen": np.where(a_wins, outcome.p, 1.0 - outcome.p),
            "margin": np.full(len(prompts), np.nan),
            "source": pd.Series([source] * len(prompts), dtype="str"),
            "source_row": np.arange(1, len(prompts) + 1, dtype="int64"),
        }
    )
    per_pair = pd.DataFrame({"prompt": prompts, "a": a, "b": b, "p_ai": outcome.p})
    return table, per_pair, {"mode": "generate", **_outcome_stats(outcome, judge)}


def _outcome_stats(outcome, judge: Judge) -> dict:
    p = outcome.p
    stats = {
        "judge": judge.label_version,
        "n_pairs": int(len(p)),
        "judged": outcome.judged,
        "cache_hits": outcome.cache_hits,
        "seconds": round(outcome.seconds, 3),
        "pairs_per_s": round(outcome.pairs_per_s, 2),
        "position_consistency": outcome.position_consistency,
        "label_distribution": {
            "mean_p": float(np.mean(p)) if len(p) else None,
            "histogram": np.histogram(p, bins=10, range=(0, 1))[0].tolist(),
        },
    }
    judge_stats = judge.stats
    stats["judge_stats"] = {
        "requests": judge_stats.requests,
        "retries": judge_stats.retries,
        "errors": judge_stats.errors,
        "prompt_tokens": judge_stats.prompt_tokens,
        "completion_tokens": judge_stats.completion_tokens,
    }
    return stats


def _principle_report(judge: Judge, prompts, a, b, limit: int = 2000) -> dict | None:
    scores = judge.principle_scores(prompts[:limit], a[:limit], b[:limit])
    if not scores:
        return None
    return {
        name: {"mean_diff": float(np.mean(v)), "prefers_first_rate": float(np.mean(v > 0))}
        for name, v in scores.items()
    }


def label_training_pairs(
    train_file: str,
    labels: LabelsConfig,
    seed: int,
    policy_dir: str | None,
    cache_path: Path,
    progress: Progress | None = None,
) -> tuple[Judge, pd.DataFrame, pd.DataFrame, dict]:
    """The label stage: (judge, training table for the reward model, per-pair labels, report).
    relabel: the judge labels the training pairs; generate: new pairs sampled from the SFT policy
    are labelled and added to the training pairs. Answers are cached across runs."""
    judge = build_judge(labels.judge)
    cache = LabelCache(cache_path)
    try:
        train = pd.read_parquet(train_file)
        table, per_pair, report = train, None, {}
        if labels.mode in ("relabel", "both"):
            table, per_pair, report = relabel(train, judge, labels, cache, progress, seed)
        if labels.mode in ("generate", "both"):
            if policy_dir is None:
                raise UserError(f"labels.mode '{labels.mode}' samples from the reference policy")
            prompts = train["prompt"].drop_duplicates().head(labels.generate.n_prompts).tolist()
            pairs = generate_pairs(policy_dir, prompts, labels.generate, seed)
            new, generated, on_policy = label_generated(pairs, judge, labels, cache, progress)
            table = pd.concat([table, new], ignore_index=True)
            if per_pair is None:
                per_pair, report = generated, on_policy
            else:  # relabelled pairs keep their columns; the sampled ones are reported apart
                report = {**report, "mode": "both", "generated": on_policy}
                per_pair = pd.concat(
                    [per_pair, generated.rename(columns={"a": "chosen", "b": "rejected"})],
                    ignore_index=True,
                )
    finally:
        cache.close()
    return judge, table, per_pair, report


def write_labelled(
    out_dir: Path,
    table: pd.DataFrame,
    per_pair: pd.DataFrame,
    report: dict,
    labels: LabelsConfig,
    judge: Judge,
) -> None:
    """train.parquet (the labels' provenance in its metadata), labels.parquet, report.json, plots/."""
    import pyarrow.parquet as pq

    from rlhf_core.data.dataset import to_normalised_arrow
    from rlhf_core.plots import histogram_plot, reliability_plot

    arrow = to_normalised_arrow(table)
    provenance = {
        b"rlhf.labels.merge": labels.merge.encode(),
        b"rlhf.labels.mode": labels.mode.encode(),
        b"rlhf.labels.judge": judge.label_version.encode(),
    }
    pq.write_table(
        arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), **provenance}),
        out_dir / "train.parquet",
    )
    per_pair.to_parquet(out_dir / "labels.parquet", index=False)
    (out_dir / "report.json").write_text(json.dumps(report, indent=2))
    plots = out_dir / "plots"
    plots.mkdir()
    histogram_plot(
        {"P(first better)": per_pair["p_ai"].to_numpy()},
        plots / "label_distribution.png",
        "AI label distribution",
        "P(chosen better)" if labels.mode == "relabel" else "P(a better)",
        bins=20,
        value_range=(0, 1),
    )
    if "agreement" in report:
        reliability_plot(
            report["agreement"]["calibration"],
            plots / "calibration.png",
            "AI labels vs human choice",
            "AI P(human's choice is better)",
        )


def label_metrics(report: dict, rows: int) -> dict[str, float]:
    metrics = {
        k: float(report[k])
        for k in ("n_pairs", "judged", "cache_hits", "pairs_per_s")
        if report.get(k) is not None
    }
    if report.get("position_consistency") is not None:
        metrics["position_consistency"] = report["position_consistency"]
    if "agreement" in report:
        metrics |= {
            f"agreement_{k}": float(report["agreement"][k])
            for k in ("accuracy", "cohen_kappa", "ece")
        }
    for name, stats in report.get("principles", {}).items():
        metrics[f"principle_{name}_prefers_chosen"] = stats["prefers_first_rate"]
    if "generated" in report:
        metrics["generated_pairs"] = float(report["generated"]["n_pairs"])
    metrics["rows_train_labelled"] = rows
    return metrics
