"""A local causal LM as judge: the constitution as a multiple-choice question; P(A) from the
normalised log-probabilities of the choice tokens (no sampling). Optional chain of thought:
a greedy rationale first, then the choice."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from rlhf_core.config import JudgeConfig
from rlhf_core.errors import UserError
from rlhf_core.judges.base import Judge, judge_prompt
from rlhf_core.judges.constitution import Constitution
from rlhf_core.models.chat import ChatFormat
from rlhf_core.models.loading import load_causal_lm


def choice_token_ids(tokenizer, letter: str) -> list[int]:
    """Every single-token spelling of a choice ('A', ' A'): their probabilities are summed."""
    ids = set()
    for text in (letter, " " + letter):
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(toks) == 1:
            ids.add(toks[0])
    if not ids:
        raise ValueError(f"the judge's tokenizer has no single token for {letter!r}")
    return sorted(ids)


class HFJudge(Judge):
    judge_id = "hf"
    order_sensitive = True

    def __init__(
        self,
        constitution: Constitution,
        settings: JudgeConfig,
        seed: int = 0,
    ):
        s = settings
        if not s.model_path:
            raise UserError("labels.judge.model_path: the hf judge needs a causal LM folder")
        super().__init__(constitution, s.principles, seed)
        model_path, device, dtype, batch_size = s.model_path, s.device, s.dtype, s.batch_size
        chain_of_thought, rationale_tokens, max_length = (
            s.chain_of_thought,
            s.rationale_tokens,
            s.max_length,
        )
        use_chat_template, trust_remote_code = s.use_chat_template, s.trust_remote_code
        loaded = load_causal_lm(
            model_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code
        )
        self.model, self.tokenizer, self.device = loaded.model, loaded.tokenizer, loaded.device
        self.fmt = ChatFormat(self.tokenizer, use_chat_template=use_chat_template)
        self.repetition_penalty = s.repetition_penalty
        self.batch_size, self.cot, self.rationale_tokens = (
            batch_size,
            chain_of_thought,
            rationale_tokens,
        )
        self.ids_a, self.ids_b = (
            choice_token_ids(self.tokenizer, "A"),
            choice_token_ids(self.tokenizer, "B"),
        )
        cfg = self.model.config
        limit = (
            getattr(cfg, "n_positions", None)
            or getattr(cfg, "max_position_embeddings", None)
            or max_length
        )
        # room for the rationale and its closing words when thinking first
        self.max_length = min(max_length, limit) - (
            rationale_tokens + 16 if chain_of_thought else 0
        )
        self.version = f"1:{model_path}:cot={int(chain_of_thought)}"

    def _contexts(self, prompts, a, b) -> list[list[int]]:
        out = []
        for p, x, y in zip(prompts, a, b):
            ids = self.fmt.encode(
                judge_prompt(self.constitution, p, x, y, self.principles_for(p, x, y))
            )[0]
            out.append(
                ids[-self.max_length :]
            )  # keep the question at the end if the request is very long
        return out

    def _left_pad(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=self.device
        )
        return ids, mask

    @torch.no_grad()
    def _with_rationale(self, contexts: list[list[int]]) -> list[list[int]]:
        ids, mask = self._left_pad(contexts)
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=self.rationale_tokens,
            do_sample=False,
            repetition_penalty=self.repetition_penalty,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        tail = self.tokenizer(" Therefore, the better response is", add_special_tokens=False)[
            "input_ids"
        ]
        result = []
        for ctx, row in zip(contexts, out[:, ids.shape[1] :].tolist()):
            rationale = [
                t
                for t in row
                if t not in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id)
            ]
            result.append(ctx + rationale + tail)
        return result

    @torch.no_grad()
    def prefer(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> np.ndarray:
        contexts = self._contexts(prompts, a, b)
        probs = []
        for start in range(0, len(contexts), self.batch_size):
            chunk = contexts[start : start + self.batch_size]
            if self.cot:
                chunk = self._with_rationale(chunk)
            ids, mask = self._left_pad(chunk)
            positions = (mask.cumsum(1) - 1).clamp(min=0)
            logits = (
                self.model(input_ids=ids, attention_mask=mask, position_ids=positions)
                .logits[:, -1]
                .float()
            )
            logp = torch.log_softmax(logits, -1)
            la = torch.logsumexp(logp[:, self.ids_a], -1)
            lb = torch.logsumexp(logp[:, self.ids_b], -1)
            probs.append(torch.sigmoid(la - lb).cpu().numpy())  # = P(A) / (P(A) + P(B))
        self.stats.comparisons += len(contexts)
        return np.concatenate(probs) if probs else np.zeros(0)
