"""Bradley-Terry pairwise losses.

Hard label (the chosen response is better):  -log sigmoid(r_c - r_r - margin)
Soft label p = P(chosen better), e.g. from an AI judge:  -(p log sigmoid(d) + (1 - p) log sigmoid(-d))
With p = 1 the soft form is the hard one, so one function covers both; a margin applies to hard labels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(
    r_chosen: torch.Tensor,
    r_rejected: torch.Tensor,
    p_chosen: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    center_coef: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pair losses (weighted) and their sum; `center_coef` adds coef * (r_c + r_r)^2, which keeps
    rewards centred on zero (the loss itself only sees differences)."""
    d = r_chosen - r_rejected
    if margin is not None:
        d = d - margin
    if p_chosen is None:
        per_pair = -F.logsigmoid(d)
    else:
        per_pair = -(p_chosen * F.logsigmoid(d) + (1.0 - p_chosen) * F.logsigmoid(-d))
    if center_coef:
        per_pair = per_pair + center_coef * (r_chosen + r_rejected) ** 2
    if weight is not None:
        per_pair = per_pair * weight
    return per_pair, per_pair.sum()
