"""Sampling responses with a KV cache, and the sequence bookkeeping every PPO forward pass shares.

Prompts are left-padded, so every response starts at the same column; position ids count real
tokens only, so padding never shifts a prompt's positions. Log-probabilities of the sampled tokens
come from the sampling pass itself (logits / temperature), which saves a forward pass per rollout.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf_core.ppo.core import response_mask


@dataclass
class Batch:
    queries: torch.Tensor  # (B, P) left-padded prompt ids
    query_mask: torch.Tensor  # (B, P) bool
    responses: torch.Tensor  # (B, R) sampled ids, pad after EOS
    mask: torch.Tensor  # (B, R) bool: response tokens up to and including EOS

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.queries, self.responses], 1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.query_mask, self.mask], 1)

    @property
    def position_ids(self) -> torch.Tensor:
        return positions(self.attention_mask)

    def select(self, idx: torch.Tensor) -> Batch:
        return Batch(self.queries[idx], self.query_mask[idx], self.responses[idx], self.mask[idx])


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(1) - 1).clamp(min=0)


def left_pad(
    sequences: list[list[int]], pad_id: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.bool)
    for i, s in enumerate(sequences):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = True
    return ids.to(device), mask.to(device)


def response_logits(model, batch: Batch, **kwargs):
    """The model's logits for every response position (and the raw output, for hidden states).

    The LM head runs on the response positions only when the model allows it (`logits_to_keep`): prompt logits
    are never used, and skipping them saves their vocabulary-wide matmul forward and backward."""
    ids = batch.input_ids.masked_fill(
        ~batch.attention_mask, 0
    )  # pad ids may be out of an embedding's range
    r = batch.responses.size(1)
    keep = {"logits_to_keep": r + 1} if _accepts_logits_to_keep(model) else {}
    out = model(
        input_ids=ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
        **keep,
        **kwargs,
    )
    return out.logits[:, -(r + 1) : -1], out


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability reaches top_p (nucleus sampling)."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove = cumulative - sorted_logits.softmax(-1) >= top_p  # tokens entirely beyond the nucleus
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)


def draw(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row from softmax(logits / T) restricted to the top-p nucleus, by inverting its CDF with one
    uniform number per row; also returns the full tempered log-probabilities. (Gumbel-max draws a random number per
    vocabulary entry: at 16 x 2000 logits on this CPU it took 710 us a step, torch.multinomial 790 us, this 97 us.)"""
    logp_all = F.log_softmax(logits.float() / temperature, -1)
    weights = top_p_filter(
        logp_all, top_p
    ).exp()  # 0 outside the nucleus; a zero weight is never drawn
    cdf = weights.double().cumsum(-1)  # float64: no drift over a 150k vocabulary
    u = (
        torch.rand((cdf.size(0), 1), generator=generator, device=cdf.device, dtype=torch.float64)
        * cdf[:, -1:]
    )
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.size(1) - 1)
    return tokens, logp_all


def penalise_repeats(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's repetition penalty (Keskar et al. 2019), as transformers applies it: for every token
    already in the row (prompt or response), z' = z / penalty where z > 0, else z * penalty;
    other logits unchanged. `seen` is a [rows, vocab] bool mask."""
    if penalty == 1.0:
        return logits
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


_KEEPS_LOGITS: dict[type, bool] = {}


def _accepts_logits_to_keep(model) -> bool:
    """Whether forward takes `logits_to_keep` (transformers causal LMs); a PEFT wrapper passes it on to its base."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    kind = type(base)
    if kind not in _KEEPS_LOGITS:
        try:
            _KEEPS_LOGITS[kind] = "logits_to_keep" in inspect.signature(base.forward).parameters
        except (TypeError, ValueError):
            _KEEPS_LOGITS[kind] = False
    return _KEEPS_LOGITS[kind]


class CompiledDecoding:
    """The decode step (one token per row against a static KV cache) compiled once with torch.compile.

    Eager decoding spends most of a small model's step in Python and transformers' per-layer bookkeeping;
    compiled, those go (on this 2-core CPU: 1.1 -> 0.6 ms a step for a 2 x 128 GPT-2, at ~10 s of compilation
    per run). Shapes are fixed by the batch size and `max_len` (prompt + new tokens), so the weights can change
    between calls without recompiling; the prompt prefill stays eager (its width varies). If compilation or a
    compiled call fails (no C++ compiler, a model torch.compile cannot take), decoding falls back to eager for
    the rest of the run, with one warning."""

    def __init__(self, model, max_len: int):
        self.model, self.max_len = model, max_len
        self.step = torch.compile(model, dynamic=False)
        self.failure: str | None = None

    def disable(self, error: BaseException) -> None:
        import warnings

        self.failure = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        warnings.warn(
            f"compiled decoding is off for this run, decoding eagerly instead ({self.failure})",
            stacklevel=3,
        )


def sampling_copy(model, dtype: torch.dtype | None):
    """The model to sample texts from under autocast to `dtype`: a copy holding `dtype` weights, or
    the model itself when there is no autocast or its weights already are `dtype`. Autocast casts
    every linear layer's input and output at every decode step: 64 x 48 tokens of SmolLM2-135M took
    7.7 s under autocast, 5.5 s on bf16 weights. The copy drifts a little (KL 0.10 per response on
    32 x 48 tokens, against 0.04 between autocast and fp32), so it serves samples that are only
    texts (evaluation, judged checks, label pairs), never PPO's rollouts (merged.py); scoring
    passes (KL, perplexity) keep the original weights."""
    if dtype is None or next(model.parameters()).dtype == dtype:
        return model
    import copy

    # requires_grad stays on (sampling runs under no_grad): measured here, 64 x 48 tokens of
    # SmolLM2 on bf16 weights took 6.0 s with it and 15.1 s without.
    return copy.deepcopy(model).to(dtype).eval().requires_grad_(True)


@torch.no_grad()
def sample(
    model,
    queries: torch.Tensor,
    query_mask: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    eos_id: int | None,
    pad_id: int,
    generator: torch.Generator | None = None,
    compiled: CompiledDecoding | None = None,
    repetition_penalty: float = 1.0,
) -> tuple[Batch, torch.Tensor]:
    """Sample up to max_new_tokens per prompt (stopping a row at EOS); returns the batch and the
    behaviour log-probabilities log softmax(logits / temperature)[token] (0 after EOS).

    A repetition penalty above 1 (penalise_repeats) changes which tokens are drawn, not the
    log-probabilities returned: those stay the policy's own, so ratios and KL are the policy's.

    Each token is drawn by inverting the CDF (`draw`): the same distribution as torch.multinomial at a
    fraction of its CPU cost. With `compiled` (and prompt + new tokens within its max_len) the decode
    steps run compiled against a static cache; the tokens and log-probabilities are the same up to float
    rounding."""
    args = (
        model,
        queries,
        query_mask,
        max_new_tokens,
        temperature,
        top_p,
        eos_id,
        pad_id,
        generator,
        repetition_penalty,
    )
    if (
        compiled is not None
        and compiled.failure is None
        and queries.size(1) + max_new_tokens <= compiled.max_len
    ):
        state = generator.get_state() if generator is not None else None
        try:
            return _sample(*args, compiled)
        except Exception as error:  # noqa: BLE001 - any compile/runtime failure: decode eagerly from the same state
            compiled.disable(error)
            if generator is not None:
                generator.set_state(state)
    return _sample(*args, None)


def _sample(
    model,
    queries,
    query_mask,
    max_new_tokens,
    temperature,
    top_p,
    eos_id,
    pad_id,
    generator,
    repetition_penalty: float,
    compiled: CompiledDecoding | None,
) -> tuple[Batch, torch.Tensor]:
    from transformers import DynamicCache, StaticCache

    B, P = queries.shape
    device = queries.device
    keep = (
        {"logits_to_keep": 1} if _accepts_logits_to_keep(model) else {}
    )  # no LM head over the whole prompt
    if compiled is None:
        attn = query_mask.long()
        cache = DynamicCache()
        prefill_mask = attn
    else:  # the mask spans the whole static cache; positions not yet written stay 0
        attn = torch.zeros((B, compiled.max_len), dtype=torch.long, device=device)
        attn[:, :P] = query_mask.long()
        cache = StaticCache(config=model.config, max_cache_len=compiled.max_len)
        prefill_mask = attn[:, :P]
        keep["cache_position"] = torch.arange(P, device=device)
    out = model(
        input_ids=queries.masked_fill(~query_mask, 0),
        attention_mask=prefill_mask,
        position_ids=positions(query_mask),
        past_key_values=cache,
        use_cache=True,
        **keep,
    )
    next_pos = query_mask.long().sum(1, keepdim=True)
    logits = out.logits[:, -1]
    tokens, logps = [], []
    done = torch.zeros(B, dtype=torch.bool, device=device)
    seen = None
    if repetition_penalty != 1.0:  # the tokens each row holds so far: its prompt, then its answer
        seen = torch.zeros((B, logits.size(-1)), dtype=torch.bool, device=device)
        rows, cols = query_mask.nonzero(as_tuple=True)
        seen[rows, queries[rows, cols]] = True
    for step in range(max_new_tokens):
        if seen is None:
            tok, logp_all = draw(logits, temperature, top_p, generator)
        else:
            tok, _ = draw(
                penalise_repeats(logits, seen, repetition_penalty), temperature, top_p, generator
            )
            logp_all = F.log_softmax(logits.float() / temperature, -1)
            seen.scatter_(1, tok.unsqueeze(1), True)
        valid = ~done
        tok = torch.where(done, torch.full_like(tok, pad_id), tok)
        tokens.append(tok)
        logps.append(logp_all.gather(-1, tok.unsqueeze(1)).squeeze(1).masked_fill(done, 0.0))
        if eos_id is not None:
            done = done | (tok == eos_id)
        if step == max_new_tokens - 1 or bool(done.all()):
            break  # no forward pass for a token that will never be sampled
        if compiled is None:
            attn = torch.cat([attn, valid.long().unsqueeze(1)], 1)
            out = model(
                input_ids=tok.unsqueeze(1),
                attention_mask=attn,
                position_ids=next_pos,
                past_key_values=cache,
                use_cache=True,
            )
        else:
            attn[:, P + step] = valid.long()
            out = compiled.step(
                input_ids=tok.unsqueeze(1),
                attention_mask=attn,
                position_ids=next_pos,
                past_key_values=cache,
                use_cache=True,
                cache_position=torch.full((1,), P + step, device=device),
            )
        next_pos = next_pos + 1
        logits = out.logits[:, -1]
    responses = torch.stack(tokens, 1)
    mask = response_mask(responses, eos_id)
    responses = responses.masked_fill(~mask, pad_id)
    return Batch(queries, query_mask, responses, mask), torch.stack(logps, 1) * mask
