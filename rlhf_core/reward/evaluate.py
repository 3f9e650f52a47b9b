"""Reward-model evaluation that catches a bad reward model, and the gate before PPO.

Pairwise accuracy (overall, per label source, per length bucket), ROC-AUC of the reward difference,
calibration of sigmoid(r_c - r_r), reward distributions, and how much the reward just measures length.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from rlhf_core.metrics import (
    accuracy,
    apply_checks,
    calibration_curve,
    expected_calibration_error,
    roc_auc,
    wilson_interval,
)
from rlhf_core.plots import histogram_plot, reliability_plot
from rlhf_core.reward.model import RewardModel
from rlhf_core.reward.trainer import labelled_pairs

LENGTH_CORR_WARNING = 0.5  # |corr(reward, length)| above this is flagged in the report


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, float)))


def pair_metrics(r_chosen: np.ndarray, r_rejected: np.ndarray, n_bins: int = 10) -> dict:
    """Metrics of rewards on pairs whose first response is the preferred one.

    AUC and calibration need both outcomes, so every other pair is presented swapped
    (score r_b - r_a, truth 'a is not preferred'); accuracy is orientation-free."""
    r_c, r_r = np.asarray(r_chosen, float), np.asarray(r_rejected, float)
    n = len(r_c)
    if not n:
        return {
            "n_pairs": 0,
            "accuracy": float("nan"),
            "auc": float("nan"),
            "ece": float("nan"),
            "calibration": [],
        }
    diff = r_c - r_r
    flip = np.arange(n) % 2 == 1
    shown = np.where(flip, -diff, diff)
    truth = ~flip
    p = sigmoid(shown)
    acc = accuracy(sigmoid(diff), np.ones(n, bool))
    return {
        "n_pairs": int(n),
        "accuracy": acc,
        "accuracy_ci95": wilson_interval(acc * n, n),
        "auc": roc_auc(shown, truth),
        "ece": expected_calibration_error(p, truth, n_bins),
        "calibration": calibration_curve(p, truth, n_bins),
        "mean_reward_gap": float(diff.mean()),
    }


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 2 or x.std() == 0 or y.std() == 0:
        return 0.0
    return float(np.corrcoef(x, y)[0, 1])


def length_buckets(lengths: np.ndarray) -> np.ndarray:
    """short / medium / long by tertiles of the pair's mean response length."""
    if len(lengths) < 3:
        return np.full(len(lengths), "all", dtype=object)
    lo, hi = np.quantile(lengths, [1 / 3, 2 / 3])
    return np.where(lengths <= lo, "short", np.where(lengths <= hi, "medium", "long")).astype(
        object
    )


@dataclass
class RewardEvaluation:
    split: str
    metrics: dict  # flat, MLflow-ready
    report: dict  # nested, for report.json
    r_chosen: np.ndarray
    r_rejected: np.ndarray


def evaluate_reward_model(
    rm: RewardModel, df: pd.DataFrame, split: str = "test", batch_size: int = 64, n_bins: int = 10
) -> RewardEvaluation:
    df = labelled_pairs(df)
    p_chosen = df["p_chosen"].fillna(1.0).to_numpy(float) if "p_chosen" in df else np.ones(len(df))
    ties = p_chosen == 0.5
    df = df[~ties].reset_index(drop=True)
    p_chosen = p_chosen[~ties]
    prompts = df["prompt"].tolist()
    s_c = rm.score(prompts, df["chosen"].tolist(), batch_size)
    s_r = rm.score(prompts, df["rejected"].tolist(), batch_size)
    # a p_chosen below 0.5 means the row's 'rejected' is the preferred one
    swap = p_chosen < 0.5
    r_c, r_r = np.where(swap, s_r, s_c), np.where(swap, s_c, s_r)
    overall = pair_metrics(r_c, r_r, n_bins)
    report = {"split": split, **overall, "ties_excluded": int(ties.sum())}

    sources = (
        df["label_source"].to_numpy(str) if "label_source" in df else np.full(len(df), "human")
    )
    report["by_label_source"] = {
        src: _brief(pair_metrics(r_c[sources == src], r_r[sources == src], n_bins))
        for src in sorted(set(sources))
    }
    len_c, len_r = df["chosen"].str.len().to_numpy(float), df["rejected"].str.len().to_numpy(float)
    buckets = length_buckets((len_c + len_r) / 2)
    report["by_length_bucket"] = {
        b: _brief(pair_metrics(r_c[buckets == b], r_r[buckets == b], n_bins))
        for b in ("short", "medium", "long", "all")
        if (buckets == b).any()
    }
    pref_len, other_len = np.where(swap, len_r, len_c), np.where(swap, len_c, len_r)
    corr = pearson(np.concatenate([s_c, s_r]), np.concatenate([len_c, len_r]))
    report["length"] = {
        "reward_length_correlation": corr,
        # how far "the longer answer wins" gets on this data: a reward model should beat it
        "longer_wins_accuracy": float(
            np.mean(np.where(pref_len == other_len, 0.5, pref_len > other_len))
        )
        if len(df)
        else float("nan"),
        "flagged": bool(abs(corr) > LENGTH_CORR_WARNING),
    }
    report["rewards"] = {
        "chosen_mean": float(r_c.mean()) if len(df) else float("nan"),
        "chosen_std": float(r_c.std()) if len(df) else float("nan"),
        "rejected_mean": float(r_r.mean()) if len(df) else float("nan"),
        "rejected_std": float(r_r.std()) if len(df) else float("nan"),
    }
    metrics = {
        f"{split}_{k}": float(overall[k])
        for k in ("accuracy", "auc", "ece", "mean_reward_gap")
        if k in overall
    }
    metrics[f"{split}_n_pairs"] = float(overall["n_pairs"])
    metrics[f"{split}_length_correlation"] = corr
    metrics[f"{split}_longer_wins_accuracy"] = report["length"]["longer_wins_accuracy"]
    for src, m in report["by_label_source"].items():
        metrics[f"{split}_accuracy_{src}"] = m["accuracy"]
    for b, m in report["by_length_bucket"].items():
        metrics[f"{split}_accuracy_{b}"] = m["accuracy"]
    return RewardEvaluation(split, metrics, report, r_c, r_r)


def _brief(m: dict) -> dict:
    return {k: m[k] for k in ("n_pairs", "accuracy", "accuracy_ci95", "auc", "ece") if k in m}


def write_plots(ev: RewardEvaluation, out_dir: Path) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [
        reliability_plot(
            ev.report["calibration"],
            out_dir / f"{ev.split}_calibration.png",
            f"Reward model calibration ({ev.split})",
            "sigmoid(r_a - r_b)",
        ),
        histogram_plot(
            {"chosen": ev.r_chosen, "rejected": ev.r_rejected},
            out_dir / f"{ev.split}_reward_histogram.png",
            f"Rewards of chosen vs rejected ({ev.split})",
            "reward",
        ),
        histogram_plot(
            {"r_chosen - r_rejected": ev.r_chosen - ev.r_rejected},
            out_dir / f"{ev.split}_reward_gap.png",
            f"Reward gap ({ev.split}); right of 0 = correct",
            "r_chosen - r_rejected",
        ),
    ]


@dataclass
class GateResult:
    passed: bool
    failures: list[str]
    checks: list[dict]

    @property
    def message(self) -> str:
        return (
            "reward model gate failed: " + "; ".join(self.failures)
            if self.failures
            else "reward model gate passed"
        )


def check_gate(
    metrics: dict,
    min_accuracy: float | None,
    max_ece: float | None = None,
    max_abs_length_corr: float | None = None,
    split: str = "test",
) -> GateResult:
    """Each configured threshold against the split's metric; a failure names the metric and the threshold."""
    checks = []
    if min_accuracy is not None:
        checks.append(
            {
                "metric": f"{split}_accuracy",
                "value": metrics[f"{split}_accuracy"],
                "op": ">=",
                "threshold": min_accuracy,
                "config_key": "reward.gate.min_accuracy",
            }
        )
    if max_ece is not None:
        checks.append(
            {
                "metric": f"{split}_ece",
                "value": metrics[f"{split}_ece"],
                "op": "<=",
                "threshold": max_ece,
                "config_key": "reward.gate.max_ece",
            }
        )
    if max_abs_length_corr is not None:
        checks.append(
            {
                "metric": f"|{split}_length_correlation|",
                "value": abs(metrics[f"{split}_length_correlation"]),
                "op": "<=",
                "threshold": max_abs_length_corr,
                "config_key": "reward.gate.max_abs_length_corr",
            }
        )
    failures = apply_checks(checks)
    return GateResult(not failures, failures, checks)


def markdown_summary(
    reports: dict[str, dict], gate: GateResult | None, title: str = "Reward model"
) -> str:
    """Per split (name -> report of evaluate_reward_model): the headline table, length warnings, breakdowns, gate."""
    lines = [
        f"### {title}",
        "",
        "| split | pairs | accuracy (95% CI) | AUC | ECE | corr(reward, length) | longer-wins baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    for split, r in reports.items():
        lo, hi = r.get("accuracy_ci95", (float("nan"), float("nan")))
        lines.append(
            f"| {split} | {r['n_pairs']} | {r['accuracy']:.3f} ({lo:.3f}-{hi:.3f}) | {r['auc']:.3f} | {r['ece']:.3f} | "
            f"{r['length']['reward_length_correlation']:+.2f} | {r['length']['longer_wins_accuracy']:.3f} |"
        )
    for split, r in reports.items():
        if r["length"]["flagged"]:
            lines.append(
                f"\n**Warning ({split})**: the reward correlates with response length "
                f"({r['length']['reward_length_correlation']:+.2f}); it may mostly measure length."
            )
    if reports:
        split, last = list(reports.items())[-1]
        by_src = ", ".join(
            f"{k}: {v['accuracy']:.3f} (n={v['n_pairs']})"
            for k, v in last["by_label_source"].items()
        )
        by_len = ", ".join(f"{k}: {v['accuracy']:.3f}" for k, v in last["by_length_bucket"].items())
        lines += ["", f"- {split} accuracy by label source: {by_src}", f"- by length: {by_len}"]
    if gate is not None:
        lines += ["", f"**Gate: {'passed' if gate.passed else 'FAILED'}**"]
        lines += [
            f"- {c['metric']} = {c['value']:.4f} {c['op']} {c['threshold']:g}: {'ok' if c['passed'] else 'fail'}"
            for c in gate.checks
        ]
    return "\n".join(lines)
