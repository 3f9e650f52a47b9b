"""Metrics with known answers, shared by labelling (agreement) and reward-model evaluation."""

from __future__ import annotations

import numpy as np


def accuracy(p: np.ndarray, truth: np.ndarray) -> float:
    """Fraction where the prediction (p > 0.5) matches the binary truth; p == 0.5 counts half."""
    p, truth = np.asarray(p, float), np.asarray(truth, bool)
    if not len(p):
        return float("nan")
    hit = np.where(p == 0.5, 0.5, (p > 0.5) == truth)
    return float(np.mean(hit))


def cohen_kappa(a: np.ndarray, b: np.ndarray) -> float:
    """Agreement of two binary raters beyond chance: (p_o - p_e) / (1 - p_e)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    if not len(a):
        return float("nan")
    p_o = float(np.mean(a == b))
    p_e = float(np.mean(a) * np.mean(b) + np.mean(~a) * np.mean(~b))
    return 1.0 if p_e == 1.0 else (p_o - p_e) / (1.0 - p_e)


def roc_auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """Probability that a random positive outscores a random negative (ties count half)."""
    scores, truth = np.asarray(scores, float), np.asarray(truth, bool)
    n_pos, n_neg = int(truth.sum()), int((~truth).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def calibration_curve(p: np.ndarray, truth: np.ndarray, n_bins: int = 10) -> list[dict]:
    """Per equal-width bin of predicted probability: count, mean prediction, observed frequency."""
    p, truth = np.asarray(p, float), np.asarray(truth, float)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    idx = np.clip(np.digitize(p, edges[1:-1], right=False), 0, n_bins - 1)
    out = []
    for b in range(n_bins):
        m = idx == b
        out.append(
            {
                "bin_low": float(edges[b]),
                "bin_high": float(edges[b + 1]),
                "count": int(m.sum()),
                "mean_predicted": float(p[m].mean()) if m.any() else None,
                "observed": float(truth[m].mean()) if m.any() else None,
            }
        )
    return out


def expected_calibration_error(p: np.ndarray, truth: np.ndarray, n_bins: int = 10) -> float:
    """Sum over bins of (bin share) x |mean predicted - observed|."""
    n = len(p)
    if not n:
        return float("nan")
    return float(
        sum(
            b["count"] / n * abs(b["mean_predicted"] - b["observed"])
            for b in calibration_curve(p, truth, n_bins)
            if b["count"]
        )
    )


def wilson_interval(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Confidence interval of a proportion (Wilson score); ties counted as half successes are fine."""
    if n <= 0:
        return float("nan"), float("nan")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return float(centre - half), float(centre + half)


_OPS = {
    ">=": lambda v, t: v >= t,
    "<=": lambda v, t: v <= t,
    ">": lambda v, t: v > t,
    "<": lambda v, t: v < t,
}


def apply_checks(checks: list[dict]) -> list[str]:
    """Each check {metric, value, op, threshold, config_key} gets 'passed'; returns one line per failure,
    naming the metric, its value, what it needed and the config key that sets it (NaN always fails)."""
    failures = []
    for c in checks:
        c["passed"] = bool(not np.isnan(c["value"]) and _OPS[c["op"]](c["value"], c["threshold"]))
        if not c["passed"]:
            failures.append(
                f"{c['metric']} = {c['value']:.4f}, needs {c['op']} {c['threshold']:g} ({c['config_key']})"
            )
    return failures
