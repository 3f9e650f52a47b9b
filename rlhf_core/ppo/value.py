"""Value models: per-token state values on the policy's tokens.

- `reward`: a copy of the reward model (backbone + scalar head) when it reads the policy's tokens;
- `policy`: a separate critic built from the reference policy's backbone with a fresh scalar head;
- `shared`: a scalar head on the policy's own last hidden state (one backbone: cheapest).
"""

from __future__ import annotations

import copy
import math

import torch

from rlhf_core.ppo.rollout import Batch
from rlhf_core.training import FP32Linear


class ValueHead(torch.nn.Module):
    def __init__(self, hidden: int, seed: int = 0):
        super().__init__()
        self.linear = FP32Linear(hidden, 1)
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.linear.weight.copy_(
                torch.randn(self.linear.weight.shape, generator=g) / math.sqrt(hidden + 1)
            )
            self.linear.bias.zero_()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden).squeeze(-1)


class ValueModel(torch.nn.Module):
    """A transformer backbone (no LM head) and a scalar head, read at every response position."""

    def __init__(self, backbone: torch.nn.Module, head: torch.nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, batch: Batch) -> torch.Tensor:
        ids = batch.input_ids.masked_fill(~batch.attention_mask, 0)
        hidden = self.backbone(
            input_ids=ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).last_hidden_state
        p = batch.queries.size(1)
        out = self.head(hidden[:, p - 1 : -1])
        return out.squeeze(-1) if out.dim() == 3 else out


def value_from_reward_model(reward_model: torch.nn.Module) -> ValueModel:
    """Backbone and head of a causal sequence classifier (GPT-2/Llama style `score` head), copied."""
    backbone = copy.deepcopy(getattr(reward_model, reward_model.base_model_prefix))
    return ValueModel(backbone, copy.deepcopy(reward_model.score)).train(False)


def value_from_causal_lm(policy: torch.nn.Module, seed: int = 0) -> ValueModel:
    backbone = copy.deepcopy(getattr(policy, policy.base_model_prefix))
    return ValueModel(backbone, ValueHead(policy.config.hidden_size, seed)).train(False)
