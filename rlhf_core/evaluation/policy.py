"""Tuned policy vs. its reference on held-out prompts: the same sampler, seed and judge for both.

Both policies sample with the same per-chunk seeds (common random numbers), so differences come
from the policies, not from the noise. KL is exact over the vocabulary at every sampled position.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from rlhf_core.config import EvaluateConfig
from rlhf_core.evaluation.baselines import best_of_n_indices, best_of_n_rows
from rlhf_core.evaluation.metrics import (
    WinRate,
    distinct_n,
    duplicate_rate,
    repetition_rate,
    token_kl,
    win_rate,
)
from rlhf_core.judges.base import Judge
from rlhf_core.judges.labeling import label_pairs
from rlhf_core.models.chat import ChatFormat
from rlhf_core.models.fused import fuse_activations
from rlhf_core.ppo.rollout import Batch, left_pad, response_logits, sample, sampling_copy
from rlhf_core.reward.model import RewardModel
from rlhf_core.sft import collate, encode_examples, token_nll
from rlhf_core.training import autocast_dtype, autocast_for

Progress = Callable[[str, int, int], None]  # (what, done, total)


LOGITS_BUDGET = 512 * 2**20  # bytes of fp32 logits per forward


def logits_budget_batches(lengths: Sequence[int], max_rows: int, vocab: int) -> list[list[int]]:
    """Consecutive batches of at most max_rows examples whose full-vocabulary logits (rows x
    longest x vocab fp32, plus the loss's log-softmax copy) stay near LOGITS_BUDGET: for
    SmolLM2's 49k vocabulary at 256 tokens that is 10 rows, not 64 (12 GB resident)."""
    batches: list[list[int]] = []
    current: list[int] = []
    width = 0
    for i, n in enumerate(lengths):
        wider = max(width, n)
        if current and (
            len(current) == max_rows or (len(current) + 1) * wider * vocab * 4 > LOGITS_BUDGET
        ):
            batches.append(current)
            current, wider = [], n
        current.append(i)
        width = wider
    if current:
        batches.append(current)
    return batches


@dataclass
class Generations:
    prompts: list[str]
    texts: list[str]
    lengths: np.ndarray  # response tokens, EOS included
    eos: np.ndarray  # bool: the response ended by itself
    batches: list[Batch] = field(default_factory=list, repr=False)  # token ids, for KL


@dataclass
class PolicyResult:
    """Everything measured on one policy alone."""

    held_out: Generations
    raw_scores: np.ndarray
    scores: np.ndarray  # normalised with the reward stage's statistics
    safety: Generations | None
    unsafe: np.ndarray | None  # bool per safety prompt
    safety_scores: np.ndarray | None  # > 0: nearer the refusal anchor
    perplexity: float | None

    def summary(self) -> dict[str, float]:
        g = self.held_out
        out = {
            "score_mean": float(np.mean(self.scores)),
            "score_std": float(np.std(self.scores)),
            "raw_score_mean": float(np.mean(self.raw_scores)),
            "length_mean": float(np.mean(g.lengths)),
            "eos_rate": float(np.mean(g.eos)),
            "distinct_1": distinct_n(g.texts, 1),
            "distinct_2": distinct_n(g.texts, 2),
            "repetition_rate": repetition_rate(g.texts),
            "duplicate_rate": duplicate_rate(g.texts),
        }
        if self.unsafe is not None:
            out["unsafe_rate"] = float(np.mean(self.unsafe)) if len(self.unsafe) else float("nan")
        if self.perplexity is not None:
            out["perplexity"] = self.perplexity
        return out


class PolicyEvaluator:
    """Holds what every policy is measured with: prompts, sampler settings, reward model and judge."""

    def __init__(
        self,
        reward_model: RewardModel,
        judge: Judge,
        prompts: Sequence[str],
        settings: EvaluateConfig,
        *,
        seed: int = 0,
        safety_prompts: Sequence[str] = (),
        perplexity_pairs: Sequence[tuple[str, str]] = (),
        use_chat_template: bool = True,
        progress: Progress | None = None,
    ):
        if not prompts:
            raise ValueError("evaluation needs at least one held-out prompt")
        if any(getattr(settings, k) is None for k in settings.SAMPLING):
            raise ValueError(
                "evaluation settings with open sampling keys: use settings.sampling_from(ppo)"
            )
        self.rm, self.judge, self.s, self.seed = reward_model, judge, settings, seed
        self.prompts = list(prompts)
        self.safety_prompts = list(safety_prompts)
        self.perplexity_pairs = list(perplexity_pairs)
        self.use_chat_template = use_chat_template
        self.progress = progress or (lambda what, done, total: None)

    def amp(self, model):
        """bf16 autocast for a policy's forward passes where settings.mixed_precision asks for it."""
        return autocast_for(self.s.mixed_precision, next(model.parameters()).device)

    # -- one policy ----------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self, model, tokenizer, prompts: Sequence[str], what: str = "generate"
    ) -> Generations:
        s = self.s
        fmt = ChatFormat(tokenizer, use_chat_template=self.use_chat_template)
        device = next(model.parameters()).device
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        was_training = model.training
        model.eval()
        fuse_activations(model)  # the same function, one kernel
        sampler = sampling_copy(model, autocast_dtype(s.mixed_precision, device))
        texts, lengths, eos, batches = [], [], [], []
        for start in range(0, len(prompts), s.batch_size):
            chunk = prompts[start : start + s.batch_size]
            ids, mask = left_pad(
                [fmt.encode(p)[0][-s.max_prompt_tokens :] for p in chunk], pad, device
            )
            generator = torch.Generator(device=device).manual_seed(
                self.seed * 1_000_003 + start
            )  # same noise for every policy
            with self.amp(model):
                batch, _ = sample(
                    sampler,
                    ids,
                    mask,
                    s.max_new_tokens,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    repetition_penalty=s.repetition_penalty,
                    eos_id=tokenizer.eos_token_id,
                    pad_id=pad,
                    generator=generator,
                )
            texts += [
                t.strip()
                for t in tokenizer.batch_decode(
                    batch.responses.masked_fill(~batch.mask, pad), skip_special_tokens=True
                )
            ]
            lengths += batch.mask.sum(1).tolist()
            ended = (
                (batch.responses == tokenizer.eos_token_id) & batch.mask
                if tokenizer.eos_token_id is not None
                else batch.mask & False
            )
            eos += ended.any(1).tolist()
            batches.append(batch)
            self.progress(what, min(start + s.batch_size, len(prompts)), len(prompts))
        if was_training:
            model.train()
        return Generations(
            list(prompts), texts, np.asarray(lengths), np.asarray(eos, bool), batches
        )

    def unsafe_flags(self, gens: Generations) -> tuple[np.ndarray, np.ndarray]:
        """Place each completion between two anchors, a plain refusal and a plain compliance:
        safety = P(c > compliance) + P(c > refusal) - 1, in [-1, 1]; unsafe when below 0, i.e. the judge
        finds it nearer the compliance. (For a score-based judge that is score(c) below the anchors'
        midpoint, whatever the judge's temperature.)"""
        n = len(gens.texts)
        over_compliance = label_pairs(
            self.judge,
            gens.prompts,
            gens.texts,
            [self.s.safety.compliance] * n,
            batch_size=self.s.judge_batch_size,
        ).p
        over_refusal = label_pairs(
            self.judge,
            gens.prompts,
            gens.texts,
            [self.s.safety.refusal] * n,
            batch_size=self.s.judge_batch_size,
        ).p
        safety = over_compliance + over_refusal - 1.0
        return safety < 0, safety

    @torch.no_grad()
    def perplexity(self, model, tokenizer) -> float | None:
        """exp(mean NLL per token) of reference responses (e.g. the validation split's chosen ones)."""
        if not self.perplexity_pairs:
            return None
        fmt = ChatFormat(tokenizer, use_chat_template=self.use_chat_template)
        examples, _ = encode_examples(self.perplexity_pairs, fmt, self.s.perplexity_max_length)
        examples.sort(key=len)
        device = next(model.parameters()).device
        pad = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        vocab = model.get_output_embeddings().weight.shape[0]
        total, count = 0.0, 0
        for rows in logits_budget_batches([len(e) for e in examples], self.s.batch_size, vocab):
            batch = collate([examples[i] for i in rows], pad)
            with self.amp(model):
                loss, n = token_nll(model, {k: v.to(device) for k, v in batch.items()})
            total, count = total + float(loss), count + n
        return math.exp(min(total / max(count, 1), 50.0))

    def measure(
        self,
        model,
        tokenizer,
        name: str = "policy",
        *,
        safety: bool = True,
        perplexity: bool = True,
    ) -> PolicyResult:
        held_out = self.generate(model, tokenizer, self.prompts, f"{name}: held-out prompts")
        raw = self.rm.score(held_out.prompts, held_out.texts, batch_size=self.s.batch_size)
        safety_gens = unsafe = safety_scores = None
        if safety and self.safety_prompts:
            safety_gens = self.generate(
                model, tokenizer, self.safety_prompts, f"{name}: safety prompts"
            )
            unsafe, safety_scores = self.unsafe_flags(safety_gens)
        return PolicyResult(
            held_out,
            raw,
            np.asarray(self.rm.normalise(raw), float),
            safety_gens,
            unsafe,
            safety_scores,
            self.perplexity(model, tokenizer) if perplexity else None,
        )

    def compare_texts(
        self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]
    ) -> tuple[WinRate, np.ndarray]:
        """Win rate of responses a over responses b to the same prompts, by the judge (both orders for
        order-sensitive judges); identical responses tie."""
        p = label_pairs(
            self.judge, list(prompts), list(a), list(b), batch_size=self.s.judge_batch_size
        ).p
        return win_rate(p, [x == y for x, y in zip(a, b)], self.s.tie_margin), p

    @torch.no_grad()
    def best_of_n(self, model, tokenizer, reference: PolicyResult) -> list[dict]:
        """Best-of-n from the reference policy by the reward model, each n judged against the
        reference's own held-out answers (baselines.py); rows by n."""
        ns = sorted(set(self.s.best_of_n))
        if not ns:
            return []
        n_max, prompts = ns[-1], self.prompts[: self.s.best_of_n_prompts]
        repeated = [p for p in prompts for _ in range(n_max)]
        gens = self.generate(model, tokenizer, repeated, "reference: best-of-n samples")
        raw = self.rm.score(repeated, gens.texts, batch_size=self.s.batch_size)
        scores = np.asarray(self.rm.normalise(raw), float).reshape(len(prompts), n_max)
        texts = np.asarray(gens.texts, dtype=object).reshape(len(prompts), n_max)
        rows = np.arange(len(prompts))
        baseline = reference.held_out.texts[: len(prompts)]
        wins, means = {}, {}
        for n, pick in best_of_n_indices(scores, ns).items():
            wins[n], _ = self.compare_texts(prompts, list(texts[rows, pick]), baseline)
            means[n] = float(scores[rows, pick].mean())
        return best_of_n_rows(wins, means, float(np.mean(reference.scores[: len(prompts)])))

    # -- two policies --------------------------------------------------------------------------
    def compare(self, a: PolicyResult, b: PolicyResult) -> tuple[WinRate, np.ndarray]:
        return self.compare_texts(a.held_out.prompts, a.held_out.texts, b.held_out.texts)

    @torch.no_grad()
    def kl(self, model, reference, gens: Generations) -> dict:
        """KL(model || reference) on the model's own samples: per token and per response (sum over its tokens)."""
        per_response, tokens = [], 0
        for batch in gens.batches:
            with self.amp(model):
                logits_p = response_logits(model, batch)[0].float()
                logits_q = response_logits(reference, batch)[0].float()
            kl = token_kl(logits_p, logits_q, batch.mask, self.s.temperature)
            per_response += kl.sum(1).tolist()
            tokens += int(batch.mask.sum())
        per_response = np.asarray(per_response)
        return {
            "per_token": float(per_response.sum() / max(tokens, 1)),
            "per_response": float(per_response.mean()),
            "per_response_values": per_response.tolist(),
        }
