"""The PPO maths as small pure functions on (batch, response_length) tensors, each tested with known answers.

Conventions: `mask` is True on real response tokens (up to and including EOS), False on padding
after EOS; every mean over tokens is a masked mean.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8
) -> torch.Tensor:
    """(x - mean) / std over all masked entries of the batch; shift_mean=False keeps the mean."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def _tempered_log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = logits.float()
    return F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)


def logprobs_from_logits(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """log p(token) under softmax(logits / temperature): the distribution the tokens were sampled from."""
    return _tempered_log_softmax(logits, temperature).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def logprobs_and_entropy(
    logits: torch.Tensor, tokens: torch.Tensor, temperature: float = 1.0, entropy_grad: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both from one log-softmax over the vocabulary; the entropy carries gradients only when asked (a bonus)."""
    logp = _tempered_log_softmax(logits, temperature)
    chosen = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        lp = logp if entropy_grad else logp.detach()
        entropy = -(lp.exp() * lp).sum(-1)
    return chosen, entropy


def response_mask(responses: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """True up to and including the first EOS (everything when there is none)."""
    idx = torch.arange(responses.size(1), device=responses.device).expand_as(responses)
    if eos_id is None:
        return torch.ones_like(responses, dtype=torch.bool)
    is_eos = responses == eos_id
    first = torch.where(
        is_eos.any(1),
        is_eos.float().argmax(1),
        torch.full_like(is_eos[:, 0], responses.size(1), dtype=torch.long),
    )
    return idx <= first.unsqueeze(1)


def kl_estimate(
    logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1"
) -> torch.Tensor:
    """Per-token KL(policy || reference) from samples of the policy (Schulman's k1 / k3).

    k1 = log p - log q (unbiased, can be negative); k3 = (q/p - 1) - log(q/p) (unbiased, never negative)."""
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k3":
        return log_ratio.exp() - 1 - log_ratio
    raise ValueError(f"kl estimator {estimator!r}: expected k1 or k3")


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real response token (0 for an empty row)."""
    return (mask.long().cumsum(1).argmax(1)).clamp(min=0)


def token_rewards(
    scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -beta * KL_t on every response token, plus the sequence score at its last token."""
    non_score = -beta * kl * mask
    rewards = non_score.clone()
    rows = torch.arange(rewards.size(0), device=rewards.device)
    rewards[rows, last_token_index(mask)] += scores
    return rewards, non_score


def rloo_advantages(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """Leave-one-out baselines (RLOO, Ahmadian et al. 2024) for sequence rewards in groups of k
    consecutive samples of one prompt:

    A_i = R_i - (sum_{j in group} R_j - R_i) / (k - 1)  =  k / (k - 1) * (R_i - mean_group R)

    The prompt's own difficulty cancels, so no value model is needed."""
    if k < 2 or rewards.numel() % k:
        raise ValueError(f"RLOO needs groups of k >= 2 samples, got k={k} for {rewards.numel()}")
    groups = rewards.view(-1, k)
    baseline = (groups.sum(1, keepdim=True) - groups) / (k - 1)
    return (groups - baseline).reshape(rewards.shape)


def grpo_advantages(
    scores: torch.Tensor, k: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Group-relative advantages (GRPO, Shao et al. 2024) for groups of k consecutive samples:

    A_i = (R_i - mean_group R) / (std_group R + eps)   (scale "group"; std unbiased, as TRL's)

    scale "batch" divides by the std over the whole batch instead, "none" not at all (Dr. GRPO)."""
    if k < 2 or scores.numel() % k:
        raise ValueError(f"GRPO needs groups of k >= 2 samples, got k={k} for {scores.numel()}")
    groups = scores.view(-1, k)
    centred = (groups - groups.mean(1, keepdim=True)).reshape(scores.shape)
    if scale == "group":
        return centred / (groups.std(1).repeat_interleave(k) + eps)
    if scale == "batch":
        return centred / (scores.std() + eps)
    if scale == "none":
        return centred
    raise ValueError(f"scale {scale!r}: expected group, batch or none")


def grpo_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    ref_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
    beta: float = 0.04,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's per-token loss (aggregated by the caller, see loss_type):

    l_t = -min(r_t A, clip(r_t, 1 - eps, 1 + eps) A) + beta * k3_t,  r_t = exp(log p_t - log p_old_t),
    k3_t = exp(log q_t - log p_t) - (log q_t - log p_t) - 1  with q the reference."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    # padding has no reference log-prob (0): exp(0 - log p(pad)) would overflow to inf, and
    # inf * 0 is NaN in the loss
    kl = kl_estimate(logprobs.masked_fill(~mask, 0.0), ref_logprobs.masked_fill(~mask, 0.0), "k3")
    loss = torch.max(unclipped, clipped) + beta * kl
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
            "kl_k3": masked_mean(kl, mask),
        }
    return loss * mask, stats


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over each response; padding after EOS has no value or reward.

    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},  returns = A + V."""
    m = mask.to(values.dtype)
    values, rewards = values * m, rewards * m
    last = torch.zeros_like(values[:, 0])
    advantages = torch.zeros_like(values)
    length = values.size(1)
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        advantages[:, t] = last
    return advantages, advantages + values


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate: mean over tokens of max(-A r, -A clip(r, 1 - eps, 1 + eps))."""
    log_ratio = logprobs - old_logprobs
    ratio = log_ratio.exp()
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip, 1.0 + clip)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask),
            "ratio": masked_mean(ratio, mask),
        }
    return loss, stats


def value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    clip: float = 0.2,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean of max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2)."""
    clipped_values = old_values + (values - old_values).clamp(-clip, clip)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"value_clipfrac": masked_mean((clipped > unclipped).float(), mask)}
    return loss, stats


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 no better than a constant."""
    var_r = masked_var(returns, mask)
    return float(1 - masked_var(returns - values, mask) / var_r) if var_r > 0 else float("nan")


class FixedKLController:
    def __init__(self, beta: float):
        self.beta = beta

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict) -> None:
        self.beta = state["beta"]


class AdaptiveKLController(FixedKLController):
    """Ziegler et al. (2019): beta <- beta * (1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon)."""

    def __init__(self, beta: float, target: float, horizon: int):
        super().__init__(beta)
        self.target, self.horizon = target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.beta *= 1 + error * n_steps / self.horizon
