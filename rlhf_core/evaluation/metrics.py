"""Policy-evaluation metrics with known answers: diversity and collapse, exact KL, judged win rate."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from rlhf_core.metrics import wilson_interval

_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams over all n-grams across the responses (Li et al., 2016); 0 when there are none."""
    grams = [g for t in texts for g in ngrams(words(t), n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(texts: Sequence[str], n: int = 3) -> float:
    """Share of responses in which some word n-gram occurs more than once (degenerate loops)."""
    if not texts:
        return 0.0
    return float(
        np.mean([any(c > 1 for c in Counter(ngrams(words(t), n)).values()) for t in texts])
    )


def duplicate_rate(texts: Sequence[str]) -> float:
    """Share of responses that repeat another prompt's response word for word (mode collapse)."""
    if not texts:
        return 0.0
    counts = Counter(t.strip() for t in texts)
    return float(sum(c for c in counts.values() if c > 1) / len(texts))


def token_kl(
    logits_p: torch.Tensor, logits_q: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Exact KL(p || q) at each position, summed over the vocabulary (no sampling estimate): (B, T), 0 where masked."""
    logp = F.log_softmax(logits_p.float() / temperature, -1)
    logq = F.log_softmax(logits_q.float() / temperature, -1)
    return (logp.exp() * (logp - logq)).sum(-1) * mask


@dataclass
class WinRate:
    """Judged comparison of policy A against policy B on the same prompts: a tie counts half."""

    n: int
    wins: int
    ties: int
    losses: int
    win_rate: float
    ci_low: float
    ci_high: float

    def as_dict(self) -> dict:
        return asdict(self)


def win_rate(
    p_a_better: Sequence[float],
    identical: Sequence[bool] | None = None,
    tie_margin: float = 0.0,
    z: float = 1.96,
) -> WinRate:
    """From the judge's P(A better than B): a win above 0.5 + tie_margin, a loss below 0.5 - tie_margin,
    a tie in between or when the two responses are identical; Wilson interval with ties as half wins."""
    p = np.asarray(p_a_better, float)
    same = np.zeros(len(p), bool) if identical is None else np.asarray(identical, bool)
    tie = same | (np.abs(p - 0.5) <= tie_margin)
    wins = int(((p > 0.5) & ~tie).sum())
    ties = int(tie.sum())
    losses = len(p) - wins - ties
    n = len(p)
    rate = (wins + 0.5 * ties) / n if n else float("nan")
    low, high = wilson_interval(wins + 0.5 * ties, n, z)
    return WinRate(n, wins, ties, losses, rate, low, high)
