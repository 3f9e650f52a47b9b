"""Baselines a tuned policy must beat, and a length-controlled win rate.

Best-of-n: sample n answers from the reference policy, keep the one the reward model scores
highest. Its KL from the reference has a closed form (Stiennon et al. 2020; Gao et al. 2022):

    KL_bon(n) = log n - (n - 1) / n

so PPO can be compared with the simplest use of the same reward model at matched KL.

Length-controlled win rate (after AlpacaEval's length-controlled win rate, Dubois et al. 2024):
fit the judge's outcomes y_i in {0, 1/2, 1} with a logistic model

    P(tuned wins | d_i) = sigmoid(a + b * d_i),   d_i = tanh((len_tuned_i - len_ref_i) / s)

(s: the standard deviation of the length differences) and report sigmoid(a), the win rate at
equal length: a judge that simply likes longer (or shorter) answers no longer counts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from rlhf_core.evaluation.metrics import WinRate


def best_of_n_kl(n: int) -> float:
    """Analytic KL(best-of-n || reference) per response, in nats."""
    if n < 1:
        raise ValueError(f"best-of-n needs n >= 1, got {n}")
    return math.log(n) - (n - 1) / n


def best_of_n_indices(scores: np.ndarray, ns: Sequence[int]) -> dict[int, np.ndarray]:
    """scores (prompts, n_max): for each n, the index of the highest-scored of the first n samples."""
    scores = np.asarray(scores, float)
    if max(ns) > scores.shape[1]:
        raise ValueError(f"best-of-{max(ns)} needs {max(ns)} samples, got {scores.shape[1]}")
    return {n: scores[:, :n].argmax(1) for n in ns}


def length_controlled_win_rate(
    outcomes: Sequence[float],
    len_a: Sequence[float],
    len_b: Sequence[float],
    iterations: int = 50,
) -> float:
    """sigmoid(a) of the logistic fit above (Newton's method on the two parameters, a small ridge on
    b keeps it finite when length separates the outcomes perfectly)."""
    y = np.asarray(outcomes, float)
    if not len(y):
        return float("nan")
    d = np.asarray(len_a, float) - np.asarray(len_b, float)
    scale = d.std()
    x = np.tanh(d / scale) if scale > 0 else np.zeros_like(d)
    X = np.stack([np.ones_like(x), x], 1)
    ridge = np.diag([1e-6, 1e-2])
    w = np.zeros(2)
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(X @ w)))
        grad = X.T @ (p - y) + ridge @ w
        hess = (X * (p * (1 - p))[:, None]).T @ X + ridge
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return float(1.0 / (1.0 + math.exp(-w[0])))


def outcomes(p_a_better: np.ndarray, identical: Sequence[bool], tie_margin: float) -> np.ndarray:
    """Per-comparison outcome of A: 1 win, 0.5 tie, 0 loss (the same rule as win_rate)."""
    p = np.asarray(p_a_better, float)
    tie = np.asarray(identical, bool) | (np.abs(p - 0.5) <= tie_margin)
    return np.where(tie, 0.5, (p > 0.5).astype(float))


def best_of_n_rows(
    wins: dict[int, WinRate], scores: dict[int, float], reference_score: float
) -> list[dict]:
    """Report rows: n, analytic KL, judged win rate over the reference's own sample, proxy score."""
    return [
        {
            "n": n,
            "kl": best_of_n_kl(n),
            "win_rate": wins[n].win_rate,
            "ci_low": wins[n].ci_low,
            "ci_high": wins[n].ci_high,
            "score_mean": scores[n],
            "score_gain": scores[n] - reference_score,
        }
        for n in sorted(wins)
    ]
