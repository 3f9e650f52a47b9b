"""The evaluation stage as plain functions: settings from config, the evaluator, tuned vs. reference."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from rlhf_core.config import EvaluateConfig, JudgeConfig
from rlhf_core.evaluation.policy import PolicyEvaluator, Progress
from rlhf_core.evaluation.prompts import BUILTIN_HARMFUL_PROMPTS, load_prompts
from rlhf_core.evaluation.report import build_report
from rlhf_core.judges.rlaif import build_judge
from rlhf_core.models.loading import load_causal_lm
from rlhf_core.reward.model import load_reward_model


def heldout_prompts(cfg: EvaluateConfig, default_file: str) -> list[str]:
    return load_prompts(cfg.prompts or default_file, "evaluate.prompts")[: cfg.max_prompts]


def safety_prompts(cfg: EvaluateConfig, demo_heldout_file: str | None) -> tuple[list[str], str]:
    """(harmful prompts, where they came from): the configured file, the demo's harmful held-out prompts, or the built-in list."""
    s = cfg.safety
    if not s.enabled:
        return [], "disabled"
    if s.prompts:
        return load_prompts(s.prompts, "evaluate.safety.prompts")[: s.max_prompts], s.prompts
    if demo_heldout_file:
        frame = pd.read_json(demo_heldout_file, lines=True)
        if "kind" in frame and (frame["kind"] == "harmful").any():
            return frame.loc[frame["kind"] == "harmful", "prompt"].tolist()[
                : s.max_prompts
            ], "demo held-out (harmful)"
    return list(BUILTIN_HARMFUL_PROMPTS)[: s.max_prompts], "built-in list"


def perplexity_pairs(val_file: str, limit: int) -> list[tuple[str, str]]:
    if limit <= 0:
        return []
    val = pd.read_parquet(val_file, columns=["prompt", "chosen"]).head(limit)
    return list(zip(val["prompt"], val["chosen"]))


def build_evaluator(
    reward_dir: str,
    judge_cfg: JudgeConfig,
    prompts: Sequence[str],
    settings: EvaluateConfig,
    *,
    seed: int = 0,
    safety: Sequence[str] = (),
    perplexity: Sequence[tuple[str, str]] = (),
    device: str = "auto",
    use_chat_template: bool = True,
    progress: Progress | None = None,
) -> PolicyEvaluator:
    rm = load_reward_model(reward_dir, device=device)
    return PolicyEvaluator(
        rm,
        build_judge(judge_cfg),
        prompts,
        settings,
        seed=seed,
        safety_prompts=safety,
        perplexity_pairs=perplexity,
        use_chat_template=use_chat_template,
        progress=progress,
    )


def evaluate_tuned(
    evaluator: PolicyEvaluator,
    tuned_dir: str,
    reference_dir: str,
    device: str = "auto",
    n_samples: int = 12,
):
    """Tuned vs. reference: (report, tuned result, reference result)."""
    tuned = load_causal_lm(tuned_dir, device=device)
    reference = load_causal_lm(reference_dir, device=device)
    t = evaluator.measure(tuned.model, tuned.tokenizer, "tuned")
    r = evaluator.measure(reference.model, reference.tokenizer, "reference")
    win, p = evaluator.compare(t, r)
    safety_win = None
    if (
        t.safety is not None
    ):  # paired, on the harmful prompts: is the tuned policy judged worse there?
        safety_win, _ = evaluator.compare_texts(t.safety.prompts, t.safety.texts, r.safety.texts)
    kl = evaluator.kl(tuned.model, reference.model, t.held_out)
    best_of_n = evaluator.best_of_n(reference.model, reference.tokenizer, r)
    report = build_report(
        t, r, win, p, kl, n_samples, safety_win, best_of_n, evaluator.s.tie_margin
    )
    return report, t, r
