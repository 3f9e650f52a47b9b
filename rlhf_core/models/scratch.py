"""An offline starter policy: a small causal LM built from a preset, with a byte-level BPE
tokenizer trained on the training text, saved as a normal HF folder that every later stage
loads like any other checkpoint."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

SPECIAL = {"bos": "<|bos|>", "eos": "<|eos|>", "pad": "<|pad|>", "unk": "<|unk|>"}


@dataclass(frozen=True)
class Preset:
    vocab_size: int
    hidden: int
    layers: int
    heads: int
    context: int


PRESETS = {
    "tiny": Preset(
        vocab_size=2000, hidden=192, layers=3, heads=4, context=256
    ),  # ~1.8M parameters: tests
    "small": Preset(
        vocab_size=6000, hidden=384, layers=6, heads=6, context=512
    ),  # ~13M parameters: the demo
}


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer(add_prefix_space=False)
    bpe.train_from_iterator(
        texts,
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=list(SPECIAL.values()),
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        bos_token=SPECIAL["bos"],
        eos_token=SPECIAL["eos"],
        pad_token=SPECIAL["pad"],
        unk_token=SPECIAL["unk"],
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def model_config(preset: Preset, arch: str, tokenizer):
    from transformers import GPT2Config, LlamaConfig

    ids = {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=len(tokenizer),
            n_positions=preset.context,
            n_embd=preset.hidden,
            n_layer=preset.layers,
            n_head=preset.heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            **ids,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=preset.hidden,
            intermediate_size=preset.hidden * 8 // 3,
            num_hidden_layers=preset.layers,
            num_attention_heads=preset.heads,
            num_key_value_heads=preset.heads,
            max_position_embeddings=preset.context,
            tie_word_embeddings=True,
            **ids,
        )
    raise ValueError(f"unknown architecture {arch!r} (expected gpt2 or llama)")


def build_scratch_model(
    texts: Iterable[str], out_dir: Path, preset: str = "small", arch: str = "gpt2", seed: int = 0
) -> Path:
    """Train the tokenizer on `texts`, initialise the model from `seed`, save both to out_dir."""
    from transformers import AutoModelForCausalLM

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (expected one of {', '.join(PRESETS)})")
    p = PRESETS[preset]
    tokenizer = train_tokenizer(texts, p.vocab_size)
    tokenizer.model_max_length = p.context
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(p, arch, tokenizer))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
