"""A held-out judge watches PPO: gold and proxy scores against the distance from the reference.

At a check the policy and the reference answer the same validation prompts (prompts PPO never
trains on, apart from the final evaluation's) with the same sampling noise, and

    gold  = judged win rate of the policy over the reference   (ties count half)
    proxy = mean normalised reward-model score of the policy's answers
    KL    = mean over answers of sum_t KL(pi(.|x, y<t) || pi_ref(.|x, y<t))   (exact, full vocabulary)

Reward over-optimisation (Gao et al. 2022) shows as proxy rising with sqrt(KL) while gold
flattens or falls; the trainer keeps the checkpoint with the best gold.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import torch

from rlhf_core.evaluation.metrics import token_kl
from rlhf_core.evaluation.policy import Generations, PolicyEvaluator
from rlhf_core.ppo.rollout import response_logits

ReferenceModel = Callable[[], AbstractContextManager]  # yields the reference policy


class JudgeMonitor:
    """Calls return {val_win_rate, val_win_rate_ci_low, val_win_rate_ci_high, val_score,
    val_score_reference, val_kl}; the reference's answers are sampled once."""

    def __init__(self, evaluator: PolicyEvaluator):
        self.ev = evaluator
        self.reference: Generations | None = None
        self.reference_score: float | None = None

    def _score(self, gens: Generations) -> float:
        raw = self.ev.rm.score(gens.prompts, gens.texts, batch_size=self.ev.s.batch_size)
        return float(np.mean(self.ev.rm.normalise(raw)))

    @torch.no_grad()
    def __call__(
        self,
        policy,
        tokenizer,
        reference_model: ReferenceModel,
        sampler=None,
        reference_sampler: ReferenceModel | None = None,
    ) -> dict[str, float]:
        """sampler and reference_sampler: faster models to sample from than the policy and
        reference_model (the trainer's merged copy, holding the adapter or only the base weights);
        the KL is measured on the policy and reference themselves."""
        ev = self.ev
        if self.reference is None:
            with (reference_sampler or reference_model)() as reference:
                self.reference = ev.generate(reference, tokenizer, ev.prompts, "monitor: reference")
            self.reference_score = self._score(self.reference)
        gens = ev.generate(
            sampler if sampler is not None else policy, tokenizer, ev.prompts, "monitor: policy"
        )
        win, _ = ev.compare_texts(gens.prompts, gens.texts, self.reference.texts)
        per_response = []
        for batch in gens.batches:
            with ev.amp(policy):
                logits_p = response_logits(policy, batch)[0].float()
                with reference_model() as reference:
                    logits_q = response_logits(reference, batch)[0].float()
            per_response += (
                token_kl(logits_p, logits_q, batch.mask, ev.s.temperature).sum(1).tolist()
            )
        return {
            "val_win_rate": win.win_rate,
            "val_win_rate_ci_low": win.ci_low,
            "val_win_rate_ci_high": win.ci_high,
            "val_score": self._score(gens),
            "val_score_reference": float(self.reference_score),
            "val_kl": float(np.mean(per_response)),
        }
