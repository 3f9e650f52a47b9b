"""The on-policy loop of PPO, RLOO and GRPO: rollout -> scores -> advantages -> clipped updates.

PPO: KL-penalised per-token rewards, a value model and GAE, KL control. RLOO: the same rewards
summed per answer, each answer's baseline the other answers to its prompt. GRPO: scores
normalised within each prompt's group, the KL to the reference a k3 term in the loss. Online DPO:
two answers per prompt, a judge's preference between them, the DPO loss against the reference.
Optionally a judge checks the policy and the best check is kept.

Every iteration is a pure function of (weights, optimiser states, KL controller, RNG states,
iteration index): a checkpoint holds exactly those, so a killed run resumes to the same result.

On N processes (rlhf_core.distributed) the result is one process's with the same global batch:
rollout chunks of generation_batch_size answers are drawn with their own seeds (seed, iteration,
chunk), chunk c by process c mod N, and every process receives all of them, so advantages,
whitening, KL statistics and the KL controller see the whole batch; each mini-batch's
micro-batches are split the same way, DDP sums their gradients; one process judges (online DPO's
pairs, the held-out checks) and tells the others.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhf_core import distributed
from rlhf_core.config import KLPenaltyConfig, PolicyGradientConfig, stable_hash
from rlhf_core.dpo.core import dpo_loss
from rlhf_core.errors import UserError
from rlhf_core.models.chat import ChatFormat
from rlhf_core.models.fused import fuse_activations
from rlhf_core.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    grpo_advantages,
    grpo_token_loss,
    kl_estimate,
    logprobs_and_entropy,
    logprobs_from_logits,
    masked_mean,
    masked_whiten,
    policy_loss,
    rloo_advantages,
    token_rewards,
    value_loss,
)
from rlhf_core.ppo.merged import MergedSampler, is_lora
from rlhf_core.ppo.rollout import Batch, CompiledDecoding, left_pad, response_logits, sample
from rlhf_core.ppo.value import ValueHead, ValueModel
from rlhf_core.provenance import module_code_version
from rlhf_core.reward.ensemble import EnsembleRewardModel, aggregate
from rlhf_core.reward.model import RewardModel
from rlhf_core.training import (
    autocast_context,
    autocast_dtype,
    checkpoint_folder,
    cpu_copy,
    latest_checkpoint,
    load_weights,
    set_aside_if_foreign,
    untie,
    weights_signature,
)


class PPODiverged(UserError):
    """A guard stopped training (NaN/inf, or KL beyond its hard limit); the last good checkpoint is kept."""


@dataclass
class PPOResult:
    iterations: int
    resumed_from: int | None
    episodes: int
    episodes_per_s: float
    history: list[dict] = field(default_factory=list)
    selected_iteration: int | None = None  # the judged check whose weights the policy holds
    stopped_early: bool = False
    resume_note: str | None = None  # why a checkpoint found was not resumed
    world_size: int = 1  # the processes that trained


LogFn = Callable[[int, dict], None]
SamplesFn = Callable[[int, list[dict]], None]
# (policy, tokenizer, reference-policy context) -> metrics with "val_win_rate" (see monitor.py)
MonitorFn = Callable[[Any, Any, Callable[[], AbstractContextManager]], dict]
# (prompts, answers a, answers b) -> P(a better than b) per pair: online DPO's judge
PreferenceFn = Callable[[list[str], list[str], list[str]], np.ndarray]


class PPOTrainer:
    def __init__(
        self,
        policy,
        tokenizer,
        reward_model: RewardModel,
        prompts: Sequence[str],
        settings: PolicyGradientConfig,
        *,
        seed: int = 0,
        reference=None,
        value_model: ValueModel | ValueHead | None = None,
        use_chat_template: bool = True,
        checkpoint_dir: Path | None = None,
        on_log: LogFn | None = None,
        on_samples: SamplesFn | None = None,
        monitor: MonitorFn | None = None,
        preference: PreferenceFn | None = None,
        progress: bool = True,
    ):
        if not prompts:
            raise UserError("PPO needs at least one training prompt")
        if preference is None and settings.advantage == "online_dpo":
            raise ValueError("online DPO needs a judge's preference function")
        self.preference = preference
        if value_model is None and settings.advantage == "gae":
            raise ValueError("GAE needs a value model (or a ValueHead on the policy)")
        s = self.s = settings
        self.seed = seed
        if (
            s.mini_batch_size > s.batch_size
            or s.batch_size % s.mini_batch_size
            or s.mini_batch_size % s.micro_batch_size
        ):
            raise UserError(
                f"ppo batch sizes: batch_size ({s.batch_size}) must be a multiple of mini_batch_size "
                f"({s.mini_batch_size}), which must be a multiple of micro_batch_size ({s.micro_batch_size})"
            )
        self.policy, self.tokenizer, self.rm, self.value = (
            policy,
            tokenizer,
            reward_model,
            value_model,
        )
        self.shared_value = isinstance(value_model, ValueHead)
        self.reference = reference  # None: the policy with its LoRA adapter disabled
        if reference is None and not hasattr(policy, "disable_adapter"):
            raise ValueError("no reference model and the policy has no adapter to disable")
        self.device = next(policy.parameters()).device
        self.autocast = autocast_dtype(s.mixed_precision, self.device)
        # one optimiser step per rollout: the update starts from the sampling weights, so the old
        # log-probs are the update's own (detached; ratio exactly 1) and need no pass of their own
        self.one_step = s.ppo_epochs == 1 and s.mini_batch_size == s.batch_size
        # the rollout's full forward pass of the policy: the shared value head reads its states;
        # under bf16, PPO's and RLOO's KL penalty (and any later epoch's ratio) needs log-probs
        # from the same kind of pass as the reference's, while GRPO's and online DPO's rollout KL
        # is only logged and one step takes its old log-probs from the update
        exact = isinstance(s, KLPenaltyConfig) or not self.one_step
        self.rollout_forward = self.shared_value or bool(self.autocast and exact)
        self.fmt = ChatFormat(tokenizer, use_chat_template=use_chat_template)
        self.prompts = list(prompts)
        self.prompt_ids = [self.fmt.encode(p)[0][-s.max_prompt_tokens :] for p in self.prompts]
        self.eos_id = tokenizer.eos_token_id if settings.stop_at_eos else None
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self.rm_reads_policy_tokens = reward_model.reads_tokens_of(tokenizer)
        reward_models = [r.model for r in getattr(reward_model, "members", [reward_model])]
        for m in (policy, value_model, *reward_models, reference):  # None: absent
            if m is not None:
                m.eval()  # dropout off everywhere: the ratio must be 1 before the first update
                if s.fuse_activations:
                    fuse_activations(m)
        if reference is not None:
            reference.requires_grad_(False)
        reward_model.model.requires_grad_(False)
        # of the starting weights, so taken before any update; only checkpoints need it
        self.fingerprint = self._fingerprint(reward_models) if checkpoint_dir else None
        self.policy_params = [p for p in policy.parameters() if p.requires_grad]
        self.value_params = (
            [p for p in value_model.parameters() if p.requires_grad] if value_model else []
        )
        self.policy_opt = torch.optim.AdamW(
            self.policy_params, lr=s.lr, weight_decay=s.weight_decay
        )
        self.value_opt = (
            torch.optim.AdamW(self.value_params, lr=s.value_lr or s.lr, weight_decay=s.weight_decay)
            if value_model is not None
            else None
        )
        self.kl_ctl = (
            AdaptiveKLController(s.beta, s.target_kl, s.kl_horizon)
            if isinstance(s, KLPenaltyConfig) and s.adaptive_kl
            else FixedKLController(s.beta)
        )
        self.merged = MergedSampler(policy) if s.merged_sampling and is_lora(policy) else None
        if self.merged is not None and s.fuse_activations:
            fuse_activations(self.merged.model)
        self.compiled = (
            CompiledDecoding(self.sampler(), s.max_prompt_tokens + s.max_new_tokens)
            if s.compile_generation
            else None
        )
        self.shuffle_gen = torch.Generator().manual_seed(seed + 1)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.on_log = on_log or (lambda it, m: None)
        self.on_samples = on_samples
        self.monitor = monitor
        self.progress = progress
        self.dist = distributed.current()
        # the update's forward: DDP's wrapper when several processes learn together
        self.forward_model = self.dist.wrap(_TrainForward(self))
        self.iteration = 0
        self.history: list[dict] = []
        self.best: dict | None = None  # {"iteration", "val_win_rate"} of the best judged check
        self.best_state: dict[str, torch.Tensor] | None = None  # its trainable policy weights
        self.checks_since_best = 0

    def amp(self):
        """bf16 autocast for every forward pass when configured; losses, log-probs and optimiser stay fp32."""
        return autocast_context(self.device, self.autocast)

    # -- data ---------------------------------------------------------------------------------
    def prompt_indices(self, iteration: int) -> list[int]:
        """The iteration's prompts: epochs of seeded permutations, so the data position is the iteration
        number; each prompt samples_per_prompt times in a row (a group)."""
        n, k = len(self.prompts), self.s.samples_per_prompt
        b = self.s.batch_size // k
        out, start = [], iteration * b
        while len(out) < b:
            epoch, offset = divmod(start + len(out), n)
            order = np.random.default_rng([self.seed, epoch]).permutation(n)
            out += order[offset : offset + b - len(out)].tolist()
        return [i for i in out for _ in range(k)]

    # -- rollout ------------------------------------------------------------------------------
    def sampler(self):
        """The model that samples: the policy, or its merged copy synced to the current adapter."""
        return self.merged.sync() if self.merged is not None else self.policy

    @contextmanager
    def reference_model(self) -> Iterator[Any]:
        """The frozen reference: its own copy, or the policy with the LoRA adapter disabled."""
        if self.reference is not None:
            yield self.reference
        else:
            with self.policy.disable_adapter():
                yield self.policy

    @contextmanager
    def reference_sampler(self) -> Iterator[Any]:
        """The reference for sampling: with merged sampling and an adapter reference, the merged copy
        holding the base weights (as fast as the policy's sampling), re-synced afterwards."""
        if self.merged is None or self.reference is not None:
            with self.reference_model() as reference:
                yield reference
            return
        try:
            yield self.merged.sync(adapter=False)
        finally:
            self.merged.sync()

    @torch.no_grad()
    def _reference_logits(self, batch: Batch) -> torch.Tensor:
        with self.reference_model() as reference:
            return response_logits(reference, batch)[0]

    def _values(self, batch: Batch, policy_output=None) -> torch.Tensor:
        if not self.shared_value:
            return self.value(batch)
        hidden = policy_output.hidden_states[-1]
        p = batch.queries.size(1)
        return self.value(hidden[:, p - 1 : -1])

    @torch.no_grad()
    def score(self, batch: Batch, prompt_idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw reward-model scores, members' disagreement): decoded and re-tokenised when the reward
        model has its own tokenizer. An ensemble gives its aggregate of normalised member scores and
        their std per response (zeros for a single model)."""
        rm = self.rm
        ensemble = isinstance(rm, EnsembleRewardModel)
        if self.rm_reads_policy_tokens:
            items = [
                rm.encode_ids(self.prompt_ids[i], batch.responses[j][batch.mask[j]].tolist())
                for j, i in enumerate(prompt_idx)
            ]
            if ensemble:
                members = rm.member_scores_encoded(items, batch_size=len(items))
            else:
                raw = rm.score_encoded(items, batch_size=len(items))
        else:
            texts = self.tokenizer.batch_decode(
                batch.responses.masked_fill(~batch.mask, self.pad_id), skip_special_tokens=True
            )
            prompts, responses = [self.prompts[i] for i in prompt_idx], [t.strip() for t in texts]
            if ensemble:
                members = rm.member_scores(prompts, responses, batch_size=len(texts))
            else:
                raw = rm.score(prompts, responses, batch_size=len(texts))
        if ensemble:
            raw, std = aggregate(members, rm.how, rm.coef), members.std(0)
        else:
            std = np.zeros(len(raw))
        as_tensor = lambda x: torch.as_tensor(x, dtype=torch.float32, device=self.device)  # noqa: E731
        return as_tensor(raw), as_tensor(std)

    def chunk_generator(self, start: int) -> torch.Generator:
        """The sampling noise of the rollout chunk that starts at answer `start` of this iteration:
        the same whichever process draws it."""
        seed = np.random.SeedSequence([self.seed, self.iteration, start]).generate_state(1)[0]
        return torch.Generator(device=self.device).manual_seed(int(seed))

    @torch.no_grad()
    def rollout(self, prompt_idx: list[int]) -> dict:
        s, d = self.s, self.dist
        chunks, sampler = [], self.sampler()
        starts = range(0, len(prompt_idx), s.generation_batch_size)
        for start in starts[d.rank :: d.world]:
            idx = prompt_idx[start : start + s.generation_batch_size]
            queries, qmask = left_pad([self.prompt_ids[i] for i in idx], self.pad_id, self.device)
            with self.amp():
                batch, logprobs = sample(
                    sampler,
                    queries,
                    qmask,
                    s.max_new_tokens,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    repetition_penalty=s.repetition_penalty,
                    eos_id=self.eos_id,
                    pad_id=self.pad_id,
                    generator=self.chunk_generator(start),
                    compiled=self.compiled,
                )
                ref_logprobs = (
                    logprobs_from_logits(
                        self._reference_logits(batch), batch.responses, s.temperature
                    )
                    * batch.mask
                )
                policy_out = None
                if self.rollout_forward:
                    logits, policy_out = response_logits(
                        self.policy, batch, output_hidden_states=self.shared_value
                    )
                    if (
                        self.autocast
                    ):  # in bf16, cached decoding and a full forward round differently: the
                        # update's ratio must start at 1, so old log-probs come from the same kind of pass
                        logprobs = (
                            logprobs_from_logits(logits, batch.responses, s.temperature)
                            * batch.mask
                        )
                values = (
                    self._values(batch, policy_out).float()
                    if self.value is not None
                    else torch.zeros_like(logprobs)
                )
            raw, disagreement = self.score(batch, idx)  # outside the policy's autocast: the reward
            # model scores under its own precision (RewardModel.amp), as in evaluation
            chunks.append(
                {
                    "batch": batch,
                    "logprobs": logprobs,
                    "ref_logprobs": ref_logprobs,
                    "values": values * batch.mask,
                    "raw_scores": raw,
                    "disagreement": disagreement,
                }
            )
        if d.world > 1:  # every process gets every chunk, in the order one process draws them
            moved = [{k: _to(v, "cpu") for k, v in c.items()} for c in chunks]
            by_rank = d.gather(moved)
            chunks = [
                {k: _to(v, self.device) for k, v in by_rank[i % d.world][i // d.world].items()}
                for i in range(len(starts))
            ]
        return _concat_rollouts(chunks, self.pad_id)

    # -- one iteration ------------------------------------------------------------------------
    def step(self) -> dict:
        s = self.s
        t0 = time.perf_counter()
        idx = self.prompt_indices(self.iteration)
        r = self.rollout(idx)
        batch, mask = r["batch"], r["batch"].mask
        eos = self.tokenizer.eos_token_id
        has_eos = (
            ((batch.responses == eos) & mask).any(1)
            if eos is not None
            else torch.zeros_like(mask[:, 0])
        )
        raw = r["raw_scores"]
        scores = self.rm.normalise(raw) if s.normalise_reward else raw
        if s.reward_clip is not None:
            scores = scores.clamp(-s.reward_clip, s.reward_clip)
        if s.missing_eos_penalty is not None:
            scores = scores - s.missing_eos_penalty * (~has_eos).float()
        penalised = isinstance(s, KLPenaltyConfig)  # PPO, RLOO: the KL is in the reward
        kl = kl_estimate(r["logprobs"], r["ref_logprobs"], s.kl_estimator if penalised else "k1")
        kl = kl * mask
        preferences = None
        if s.advantage == "online_dpo":  # the judge's P(first answer > second) of each pair
            texts = [t.strip() for t in self._decode(batch)]
            p = self.dist.broadcast(  # one process asks the judge (and writes its cache)
                self.preference([self.prompts[i] for i in idx[::2]], texts[::2], texts[1::2])
                if self.dist.is_main
                else None
            )
            preferences = torch.as_tensor(p, dtype=torch.float32, device=self.device)
        advantages, returns, non_score = self._advantages(scores, kl, mask, r["values"])
        mean_kl = float(kl.sum(1).mean())
        self._guard(mean_kl, scores, "rollout")
        t_rollout = time.perf_counter() - t0

        stats = self.update(
            batch, r["logprobs"], r["values"], advantages, returns, r["ref_logprobs"], preferences
        )
        beta_used = self.kl_ctl.beta
        self.kl_ctl.update(mean_kl, s.batch_size)
        elapsed = time.perf_counter() - t0
        n_tokens = int(mask.sum())
        metrics = {
            "score_raw": float(raw.mean()),
            "score": float(scores.mean()),
            "score_std": float(scores.std()) if len(scores) > 1 else 0.0,
            **(
                {"judge_confidence": float((preferences - 0.5).abs().mean() * 2)}
                if preferences is not None
                else {}
            ),
            "reward_disagreement": float(r["disagreement"].mean()),
            "kl": mean_kl,
            "kl_per_token": float(masked_mean(kl, mask)),
            "non_score_reward": float(non_score.sum(1).mean()),
            "rlhf_reward": float(scores.mean()) + float(non_score.sum(1).mean()),
            "beta": beta_used,
            "entropy": stats.pop("entropy"),
            "response_length": float(mask.sum(1).float().mean()),
            "eos_rate": float(has_eos.float().mean()),
            **(
                {"explained_variance": explained_variance(r["values"], returns, mask)}
                if self.value is not None
                else {}
            ),
            **stats,
            "episodes_per_s": len(idx) / elapsed,
            "tokens_per_s": n_tokens / elapsed,
            "rollout_s": t_rollout,
            "update_s": elapsed - t_rollout,
        }
        weights = [p.detach() for p in self.policy_params + self.value_params]
        self._guard(metrics["policy_loss"] + metrics["value_loss"], weights, "update")
        if self.on_samples and s.sample_every and (self.iteration % s.sample_every == 0):
            texts = self._decode(batch)[: s.n_samples]
            self.on_samples(
                self.iteration + 1,
                [
                    {
                        "iteration": self.iteration + 1,
                        "prompt": self.prompts[i],
                        "response": t.strip(),
                        "score_raw": float(raw[j]),
                        "score": float(scores[j]),
                    }
                    for j, (i, t) in enumerate(zip(idx, texts))
                ],
            )
        return metrics

    def _advantages(self, scores, kl, mask, values):
        """(advantages, returns, the KL part of the reward), per token, by method."""
        s, zeros = self.s, torch.zeros_like(kl)
        if s.advantage == "online_dpo":  # the DPO loss uses the judge's preferences instead
            return zeros, zeros, zeros
        if s.advantage == "grpo":  # the KL is a loss term, not a reward
            sequence = grpo_advantages(scores, s.samples_per_prompt, s.scale_rewards)
            return sequence[:, None] * mask, zeros, zeros
        rewards, non_score = token_rewards(scores, kl, mask, self.kl_ctl.beta)
        if s.advantage == "rloo":  # one advantage per answer, on every one of its tokens
            sequence = rloo_advantages(rewards.sum(1), s.samples_per_prompt)
            if s.whiten_advantages:
                sequence = (sequence - sequence.mean()) / (sequence.std() + 1e-8)
            return sequence[:, None] * mask, zeros, non_score
        advantages, returns = gae(rewards, values, mask, s.gamma, s.lam)
        if s.whiten_advantages:
            advantages = masked_whiten(advantages, mask) * mask
        return advantages, returns, non_score

    def _decode(self, batch: Batch) -> list[str]:
        return self.tokenizer.batch_decode(
            batch.responses.masked_fill(~batch.mask, self.pad_id), skip_special_tokens=True
        )

    def _forward_train(self, mb: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log-probs of the sampled tokens, per-token entropy, values) under the current weights."""
        s = self.s
        if self.shared_value:
            logits, out = response_logits(self.policy, mb, output_hidden_states=True)
            values = self._values(mb, out)
        else:
            logits, _ = response_logits(self.policy, mb)
            values = self.value(mb) if self.value is not None else None
        logprobs, entropy = logprobs_and_entropy(
            logits, mb.responses, s.temperature, entropy_grad=s.entropy_coef > 0
        )
        return logprobs, entropy, values

    def _order(self) -> torch.Tensor:
        """The episodes in a shuffled order; online DPO keeps each pair together, first then second."""
        n = self.s.batch_size
        if self.s.advantage != "online_dpo":
            return torch.randperm(n, generator=self.shuffle_gen)
        pairs = torch.randperm(n // 2, generator=self.shuffle_gen)
        return torch.stack([2 * pairs, 2 * pairs + 1], dim=1).flatten()

    def _dpo_loss(self, logprobs, ref_logprobs, mask, preferences):
        """DPO on consecutive (first, second) rows: the first is 'chosen' with probability p."""
        s = self.s
        logp = (logprobs * mask).sum(1)
        ref = (ref_logprobs * mask).sum(1)
        n = mask.sum(1).float()
        return dpo_loss(
            logp[0::2], logp[1::2], ref[0::2], ref[1::2], s.beta, s.loss,
            preferences, n[0::2], n[1::2],
        )  # fmt: skip

    def _micro_loss(self, idx, mini_size, mini_tokens, logprobs, values, mask, t: dict):
        """This micro-batch's share of the optimiser step's loss, and what to log, by method.
        PPO, RLOO: the micro-batch's token mean weighted by its share of the step's answers; GRPO:
        normalised over the step (dapo: its tokens, grpo: its answers); online DPO: the mean over
        the step's pairs."""
        s, share = self.s, len(idx) / mini_size
        if s.advantage == "online_dpo":
            p_first = t["preferences"][idx[0::2] // 2]
            out = self._dpo_loss(logprobs, t["ref_logprobs"][idx], mask, p_first)
            agrees = (out.margins > 0) == (p_first > 0.5)
            return out.losses.sum() / (mini_size // 2), {
                "policy_loss": out.losses.mean(),
                "rewards_margin": (out.margins * (2 * p_first - 1)).mean(),
                "rewards_accuracy": agrees.float().mean(),
            }
        if s.advantage == "grpo":
            per_token, stats = grpo_token_loss(
                logprobs,
                t["old_logprobs"][idx],
                t["ref_logprobs"][idx],
                t["advantages"][idx],
                mask,
                s.cliprange,
                s.beta,
            )
            if s.loss_type == "dapo":
                loss = per_token.sum() / mini_tokens
            else:
                loss = (per_token.sum(1) / mask.sum(1).clamp(min=1)).sum() / mini_size
            return loss, {"policy_loss": masked_mean(per_token, mask), **stats}
        pg, stats = policy_loss(
            logprobs, t["old_logprobs"][idx], t["advantages"][idx], mask, s.cliprange
        )
        if values is None:
            return pg * share, {"policy_loss": pg, **stats}
        vf, vf_stats = value_loss(
            values.float(), t["old_values"][idx], t["returns"][idx], mask, s.cliprange_value
        )
        loss = (pg + s.vf_coef * vf) * share
        return loss, {"policy_loss": pg, "value_loss": vf, **stats, **vf_stats}

    def update(
        self,
        batch: Batch,
        old_logprobs,
        old_values,
        advantages,
        returns,
        ref_logprobs,
        preferences=None,
    ) -> dict:
        s, d = self.s, self.dist
        targets = {
            "old_logprobs": old_logprobs,
            "old_values": old_values,
            "advantages": advantages,
            "returns": returns,
            "ref_logprobs": ref_logprobs,
            "preferences": preferences,
        }
        sums: dict[str, float] = {}
        grad_norms: list[float] = []
        n = 0
        for _ in range(s.ppo_epochs):
            order = self._order()
            for mb_start in range(0, s.batch_size, s.mini_batch_size):
                mini = order[mb_start : mb_start + s.mini_batch_size]
                self.policy_opt.zero_grad(set_to_none=True)
                if self.value_opt:
                    self.value_opt.zero_grad(set_to_none=True)
                mini_tokens = batch.mask[mini.to(self.device)].sum().clamp(min=1)
                micro = [
                    mini[i : i + s.micro_batch_size]
                    for i in range(0, len(mini), s.micro_batch_size)
                ]
                mine = micro[d.rank :: d.world]
                # DDP averages over the processes: each backpropagates world x its share; one
                # without a micro-batch still joins the step, with a zero gradient
                scale = float(d.world) if mine else 0.0
                for j, part in enumerate(mine or micro[:1]):
                    idx = part.to(self.device)
                    mb = batch.select(idx)
                    with d.no_sync(self.forward_model, sync=j == max(len(mine), 1) - 1):
                        with self.amp():
                            logprobs, token_entropy, values = self.forward_model(mb)
                        if self.one_step:
                            old = targets["old_logprobs"]
                            targets["old_logprobs"] = old.index_copy(
                                0, idx, logprobs.detach().to(old.dtype)
                            )
                        m = mb.mask
                        step_loss, logged = self._micro_loss(
                            idx, len(mini), mini_tokens, logprobs, values, m, targets
                        )
                        entropy = masked_mean(token_entropy, m)
                        if s.entropy_coef > 0:
                            step_loss = step_loss - s.entropy_coef * entropy * len(idx) / len(mini)
                        (step_loss * scale if d.world > 1 else step_loss).backward()
                    if not mine:
                        continue
                    for k, v in {
                        "value_loss": torch.zeros(()),
                        **logged,
                        "entropy": entropy,
                    }.items():
                        sums[k] = sums.get(k, 0.0) + float(v.detach())
                    n += 1
                grad_norm = torch.nn.utils.clip_grad_norm_(
                    self.policy_params + self.value_params, s.max_grad_norm
                )
                self._guard(float(grad_norm), None, "update's gradients")  # before the weights
                grad_norms.append(float(grad_norm))
                self.policy_opt.step()
                if self.value_opt:
                    self.value_opt.step()
        if d.world > 1:  # the means over every process's micro-batches
            parts = d.gather((sums, n))
            keys = set().union(*(p for p, _ in parts))
            sums = {k: sum(p.get(k, 0.0) for p, _ in parts) for k in sorted(keys)}
            n = sum(count for _, count in parts)
        return {
            **{k: v / max(1, n) for k, v in sums.items()},
            "grad_norm": float(np.mean(grad_norms)),
        }

    def _guard(self, value: float, tensors: torch.Tensor | list | None, where: str) -> None:
        """Stop on NaN/inf (or a KL beyond ppo.kl_hard_limit), naming the last good checkpoint: a
        checkpoint is good once the rollout after it passed. A failed rollout condemns the weights
        it sampled from (the latest iteration's), so their checkpoints are set aside and a rerun
        resumes from the good one."""
        tensors = [tensors] if isinstance(tensors, torch.Tensor) else tensors or []
        finite = math.isfinite(value) and all(bool(torch.isfinite(t).all()) for t in tensors)
        too_far = (
            where == "rollout" and self.s.kl_hard_limit is not None and value > self.s.kl_hard_limit
        )
        if finite and not too_far:
            return
        # every process sees the same numbers and stops; one sets the bad checkpoints aside
        last = self.dist.broadcast(
            self._keep_good_checkpoints(self.iteration if where == "rollout" else None)
            if self.dist.is_main
            else None
        )
        keep = (
            f" (last good checkpoint: {last})"
            if last
            else " (no checkpoint passed its next rollout: a rerun starts from the reference)"
        )
        if not finite:
            raise PPODiverged(
                f"PPO stopped at iteration {self.iteration + 1}: non-finite values in the {where}{keep}"
            )
        raise PPODiverged(
            f"PPO stopped at iteration {self.iteration + 1}: KL {value:.3f} exceeds ppo.kl_hard_limit "
            f"{self.s.kl_hard_limit:g}{keep}"
        )

    def _keep_good_checkpoints(self, bad_from: int | None) -> Path | None:
        """Set aside (renamed diverged-iter-*, not deleted) checkpoints of iteration >= bad_from;
        return the latest one left."""
        if self.checkpoint_dir and bad_from is not None:
            for ckpt in self.checkpoint_dir.glob("iter-*"):
                if int(ckpt.name.split("-")[1]) >= bad_from:
                    aside = ckpt.with_name("diverged-" + ckpt.name)
                    shutil.rmtree(aside, ignore_errors=True)
                    os.replace(ckpt, aside)
        return self.latest_checkpoint()

    # -- checkpoints --------------------------------------------------------------------------
    def _fingerprint(self, reward_models: list) -> str:
        """A checkpoint is resumed only by the run that wrote it: the same settings, seed, prompts
        and code, and the same starting policy, value model, reference and reward model(s)."""
        members = getattr(self.rm, "members", [self.rm])
        return stable_hash(
            {
                "settings": self.s.model_dump(mode="json"),
                "code": module_code_version(sys.modules[__name__]),
                "seed": self.seed,
                "prompts": stable_hash(self.prompts),
                "models": [
                    None if m is None else weights_signature(m)
                    for m in (self.policy, self.value, self.reference, *reward_models)
                ],
                "reward_normalisation": [getattr(r, "normalisation", None) for r in members],
            }
        )

    def save_checkpoint(self) -> Path | None:
        if not self.checkpoint_dir:
            return None
        name = f"iter-{self.iteration:06d}"
        if self.dist.is_main:  # the processes hold the same weights and states
            self._write_checkpoint(name)
        self.dist.barrier()
        return self.checkpoint_dir / name

    def _write_checkpoint(self, name: str) -> None:
        with checkpoint_folder(self.checkpoint_dir, name, "iter-", self.s.keep_checkpoints) as tmp:
            save_file(untie(cpu_copy(self.policy)), tmp / "policy.safetensors")
            if self.value is not None:
                save_file(untie(cpu_copy(self.value)), tmp / "value.safetensors")
            if self.best_state is not None:
                save_file(self.best_state, tmp / "best_policy.safetensors")
            torch.save(
                {
                    "policy_opt": self.policy_opt.state_dict(),
                    "value_opt": self.value_opt.state_dict() if self.value_opt else None,
                    "shuffle_gen": self.shuffle_gen.get_state(),
                },
                tmp / "trainer.pt",
            )
            (tmp / "state.json").write_text(
                json.dumps(
                    {
                        "iteration": self.iteration,
                        "kl_ctl": self.kl_ctl.state_dict(),
                        "history": self.history,
                        "best": self.best,
                        "checks_since_best": self.checks_since_best,
                        "settings": self.s.model_dump(mode="json"),
                        "seed": self.seed,
                        "fingerprint": self.fingerprint,
                    }
                )
            )

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoint_dir, "iter-")

    def load_checkpoint(self, path: Path) -> None:
        load_weights(self.policy, path / "policy.safetensors", self.device)
        if self.value is not None:
            load_weights(self.value, path / "value.safetensors", self.device)
        blob = torch.load(path / "trainer.pt", weights_only=True)
        self.policy_opt.load_state_dict(blob["policy_opt"])
        if self.value_opt:
            self.value_opt.load_state_dict(blob["value_opt"])
        self.shuffle_gen.set_state(blob["shuffle_gen"])
        state = json.loads((path / "state.json").read_text())
        self.iteration, self.history = state["iteration"], state["history"]
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.best, self.checks_since_best = state.get("best"), state.get("checks_since_best", 0)
        if (path / "best_policy.safetensors").exists():
            self.best_state = load_file(path / "best_policy.safetensors")

    # -- judged checks ------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        """The weights training changes (a LoRA adapter, or all of them), copied to the CPU."""
        return {
            n: p.detach().to("cpu", copy=True).contiguous()
            for n, p in self.policy.named_parameters()
            if p.requires_grad
        }

    def check(self) -> dict:
        """One judged check (monitor.py); remembers the weights when the win rate is the best yet.
        One process judges; the others, holding the same weights, take its numbers."""
        metrics = self.dist.broadcast(
            self.monitor(
                self.policy,
                self.tokenizer,
                self.reference_model,
                self.sampler(),
                self.reference_sampler,
            )
            if self.dist.is_main
            else None
        )
        rate = metrics["val_win_rate"]
        if self.best is None or rate > self.best["val_win_rate"]:
            self.best = {"iteration": self.iteration, "val_win_rate": rate}
            self.best_state = self._trainable_state()
            self.checks_since_best = 0
        else:
            self.checks_since_best += 1
        return metrics

    def _due(self) -> bool:
        every = self.s.eval_every
        return (
            self.monitor is not None
            and every is not None
            and (self.iteration % every == 0 or self.iteration == self.s.iterations)
        )

    def _patience_spent(self) -> bool:
        patience = self.s.early_stopping_patience
        return patience is not None and self.checks_since_best >= patience

    def select_best(self) -> int | None:
        """Load the best judged check's weights (ppo.select best_judged); returns its iteration."""
        if self.s.select != "best_judged" or self.best_state is None:
            return None
        params = dict(self.policy.named_parameters())
        with torch.no_grad():
            for name, value in self.best_state.items():
                params[name].copy_(value.to(params[name].device))
        return self.best["iteration"]

    # -- the loop -----------------------------------------------------------------------------
    def train(self, resume: bool = True) -> PPOResult:
        from tqdm.auto import tqdm

        resumed_from, note = None, None
        if resume and (ckpt := self.latest_checkpoint()):
            note = self.dist.broadcast(  # one process decides, the others follow
                set_aside_if_foreign(ckpt, self.fingerprint) if self.dist.is_main else None
            )
            if note is None:
                self.load_checkpoint(ckpt)
                resumed_from = self.iteration
        s = self.s
        bar = tqdm(
            total=s.iterations,
            initial=self.iteration,
            desc=type(s).__name__.removesuffix("Config").lower(),
            unit="it",
            disable=None if self.progress and self.dist.is_main else True,
            dynamic_ncols=True,
        )
        t0, start_iter = time.perf_counter(), self.iteration
        stopped = False
        while self.iteration < s.iterations and not (stopped := self._patience_spent()):
            metrics = self.step()
            self.iteration += 1
            if self._due():
                metrics |= self.check()
            self.history.append({"iteration": self.iteration, **metrics})
            self.on_log(self.iteration, metrics)
            bar.update(1)
            bar.set_postfix(
                score=f"{metrics['score']:.3f}",
                kl=f"{metrics['kl']:.2f}",
                eps=f"{metrics['episodes_per_s']:.1f}",
            )
            if (
                self.iteration % s.checkpoint_every == 0
                or self.iteration == s.iterations
                or self._patience_spent()
            ):
                self.save_checkpoint()
        bar.close()
        selected = self.select_best()
        elapsed = time.perf_counter() - t0
        done = self.iteration - start_iter
        return PPOResult(
            iterations=self.iteration,
            resumed_from=resumed_from,
            episodes=self.iteration * s.batch_size,
            episodes_per_s=done * s.batch_size / max(elapsed, 1e-9),
            history=self.history,
            selected_iteration=selected,
            stopped_early=stopped,
            resume_note=note,
            world_size=self.dist.world,
        )


class _TrainForward(torch.nn.Module):
    """The update's forward (PPOTrainer._forward_train) as one module holding every trained
    weight (policy, and a value model or head), for DDP to wrap."""

    def __init__(self, trainer: PPOTrainer):
        super().__init__()
        self.policy = trainer.policy
        self.value = trainer.value if trainer.value_params else None
        self.run = trainer._forward_train

    def forward(self, mb: Batch):
        return self.run(mb)


def _to(value, device):
    """A rollout chunk's entry (a tensor, or a Batch of tensors) on `device`."""
    if isinstance(value, Batch):
        return Batch(*(_to(t, device) for t in vars(value).values()))
    return value.to(device)


def _concat_rollouts(chunks: list[dict], pad_id: int) -> dict:
    """Join rollout chunks whose prompt and response widths differ (prompts pad left, responses right)."""
    if len(chunks) == 1:
        return chunks[0]
    P = max(c["batch"].queries.size(1) for c in chunks)
    R = max(c["batch"].responses.size(1) for c in chunks)

    def left(x, width, value):
        return torch.nn.functional.pad(x, (width - x.size(1), 0), value=value)

    def right(x, width, value):
        return torch.nn.functional.pad(x, (0, width - x.size(1)), value=value)

    batch = Batch(
        torch.cat([left(c["batch"].queries, P, pad_id) for c in chunks]),
        torch.cat([left(c["batch"].query_mask, P, False) for c in chunks]),
        torch.cat([right(c["batch"].responses, R, pad_id) for c in chunks]),
        torch.cat([right(c["batch"].mask, R, False) for c in chunks]),
    )
    out = {
        "batch": batch,
        "raw_scores": torch.cat([c["raw_scores"] for c in chunks]),
        "disagreement": torch.cat([c["disagreement"] for c in chunks]),
    }
    for k in ("logprobs", "ref_logprobs", "values"):
        out[k] = torch.cat([right(c[k], R, 0.0) for c in chunks])
    return out
