"""Loading, LoRA and chat formatting on small real models the code builds itself."""

import json
import shutil

import pytest
import torch

from rlhf_core.config import LoraSection
from rlhf_core.errors import UserError
from rlhf_core.models.chat import ChatFormat, stop_at_end_of_turn, transcript_messages
from rlhf_core.models.loading import add_lora, load_causal_lm, load_sequence_classifier, save_model
from rlhf_core.models.scratch import PRESETS


def logits(model, tok, text="Hello there, how do I bake bread?"):
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_scratch_model_is_a_normal_hf_folder_and_round_trips(arch, tiny_gpt2, tiny_llama, tmp_path):
    src = {"gpt2": tiny_gpt2, "llama": tiny_llama}[arch]
    files = {p.name for p in src.iterdir()}
    assert "model.safetensors" in files and "tokenizer.json" in files and "config.json" in files
    assert not any(f.endswith(".bin") for f in files)
    a = load_causal_lm(str(src), device="cpu")
    n = sum(p.numel() for p in a.model.parameters())
    assert 1_000_000 <= n <= 3_000_000  # the 'tiny' preset
    assert json.loads((src / "config.json").read_text())["model_type"] == (
        "gpt2" if arch == "gpt2" else "llama"
    )
    save_model(a.model, a.tokenizer, tmp_path / "copy")
    b = load_causal_lm(str(tmp_path / "copy"), device="cpu")
    assert torch.equal(logits(a.model, a.tokenizer), logits(b.model, b.tokenizer))
    assert a.tokenizer.eos_token_id is not None and a.tokenizer.pad_token_id is not None
    assert a.tokenizer.padding_side == "left"


def test_small_preset_size():
    p = PRESETS["small"]
    # embeddings + 12 h^2 per layer: the demo model is 10-30M parameters
    approx = p.vocab_size * p.hidden + p.context * p.hidden + p.layers * 12 * p.hidden**2
    assert 10e6 <= approx <= 30e6


def test_load_errors_are_one_line(tmp_path, tiny_gpt2, monkeypatch):
    with pytest.raises(UserError, match="no such model folder"):
        load_causal_lm(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no config.json"):
        load_causal_lm(str(tmp_path / "empty"))
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_gpt2, pickled)
    (pickled / "model.safetensors").unlink()
    torch.save({}, pickled / "pytorch_model.bin")
    with pytest.raises(UserError, match="pickled .bin weights are refused"):
        load_causal_lm(str(pickled))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="hub is offline"):
        load_causal_lm("some-org/some-model")
    with pytest.raises(UserError, match="fp16 is not supported on CPU"):
        load_causal_lm(str(tiny_gpt2), dtype="fp16", device="cpu")


def test_bf16_load(tiny_gpt2):
    m = load_causal_lm(str(tiny_gpt2), dtype="bf16", device="cpu").model
    assert next(m.parameters()).dtype == torch.bfloat16


def test_lora_off_and_on(tiny_gpt2, tmp_path):
    base = load_causal_lm(str(tiny_gpt2), device="cpu", eval_mode=False)
    ref_logits = logits(base.model, base.tokenizer)
    total = sum(p.numel() for p in base.model.parameters())
    lora = add_lora(base.model, LoraSection(enabled=True, r=4, alpha=8))
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    assert 0 < trainable < total * 0.2

    # a few steps so the adapter is not the identity any more
    opt = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-2)
    ids = base.tokenizer("Explain photosynthesis simply.", return_tensors="pt")
    for _ in range(3):
        loss = lora(**ids, labels=ids["input_ids"]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    lora.eval()
    tuned = logits(lora, base.tokenizer)
    assert not torch.allclose(tuned, ref_logits)
    with lora.disable_adapter():  # the reference policy: same weights, adapter off
        assert torch.allclose(logits(lora, base.tokenizer), ref_logits, atol=1e-6)

    # merged and saved, it loads as a plain model equal to the adapted one
    save_model(lora, base.tokenizer, tmp_path / "merged")
    merged = load_causal_lm(str(tmp_path / "merged"), device="cpu")
    assert not (tmp_path / "merged" / "adapter_config.json").exists()
    assert torch.allclose(logits(merged.model, merged.tokenizer), tuned, atol=1e-4)


def test_sequence_classifier_from_causal_checkpoint(tiny_gpt2):
    rm = load_sequence_classifier(str(tiny_gpt2), device="cpu")
    ids = rm.tokenizer(["a b c", "hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = rm.model(**ids).logits
    assert out.shape == (2, 1)


def test_plain_chat_format_known_answer(tiny_gpt2):
    tok = load_causal_lm(str(tiny_gpt2), device="cpu").tokenizer
    fmt = ChatFormat(tok)
    assert not fmt.has_template
    assert (
        fmt.prompt_text("How do I boil an egg?") == "\n\nHuman: How do I boil an egg?\n\nAssistant:"
    )
    assert fmt.response_text("  Put it in water.  ") == " Put it in water."
    # HH-RLHF transcripts already end in the assistant marker and are used as they are
    hh = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    assert fmt.prompt_text(hh) == hh
    p_ids, r_ids = fmt.encode("How do I boil an egg?", "Put it in water.")
    assert r_ids[-1] == tok.eos_token_id
    assert (
        tok.decode(p_ids + r_ids[:-1])
        == "\n\nHuman: How do I boil an egg?\n\nAssistant: Put it in water."
    )


def test_chat_template_used_when_present(tiny_gpt2):
    tok = load_causal_lm(str(tiny_gpt2), device="cpu").tokenizer
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    fmt = ChatFormat(tok)
    assert fmt.has_template
    assert fmt.prompt_text("Hi") == "<|user|>Hi<|assistant|>"
    assert fmt.response_text(" Hello ") == "Hello"
    assert not ChatFormat(tok, use_chat_template=False).has_template
    # an HH-RLHF transcript becomes the template's own turns, not one user message
    hh = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: bye\n\nAssistant:"
    assert fmt.prompt_text(hh) == "<|user|>hi<|assistant|>hello<|user|>bye<|assistant|>"


def test_transcript_messages_known_answers():
    assert transcript_messages(
        "\n\nHuman: a\n\nHuman: b\n\nAssistant: c\n\nHuman: d\n\nAssistant:"
    ) == [
        {"role": "user", "content": "a\n\nb"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "d"},
    ]
    assert transcript_messages("How do I boil an egg?") is None
    assert transcript_messages("Human: a\n\nAssistant: done") is None  # no open assistant turn
    assert transcript_messages("Human: Assistant:") is None  # nothing the user said


def test_eos_becomes_the_templates_end_of_turn_token(tiny_gpt2):
    tok = load_causal_lm(str(tiny_gpt2), device="cpu").tokenizer
    eos = tok.eos_token
    tok.add_special_tokens({"additional_special_tokens": ["<|end|>"]})
    tok.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    stop_at_end_of_turn(tok)
    assert tok.eos_token == "<|end|>" and tok.eos_token_id == tok.convert_tokens_to_ids("<|end|>")
    _, response_ids = ChatFormat(tok).encode("Hi", "Hello")
    assert response_ids[-1] == tok.eos_token_id
    # a turn that ends in plain text leaves the tokenizer's EOS alone
    tok.eos_token = eos
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    stop_at_end_of_turn(tok)
    assert tok.eos_token == eos


def test_a_checkpoint_that_does_not_fit_the_model_is_refused(tiny_gpt2, tmp_path):
    """Resume never half-loads: a weights file missing tensors (or holding strangers) is one line."""
    from safetensors.torch import save_file

    from rlhf_core.training import cpu_copy, load_weights, untie

    model = load_causal_lm(str(tiny_gpt2), device="cpu").model
    state = cpu_copy(model)
    save_file(untie(state), tmp_path / "whole.safetensors")
    load_weights(model, tmp_path / "whole.safetensors", "cpu")  # tied weights saved twice: fine
    save_file(untie({k: v for k, v in state.items() if ".h.0." not in k}), tmp_path / "part.st")
    with pytest.raises(UserError, match=r"part\.st does not fit the model \(missing \d+ tensors"):
        load_weights(model, tmp_path / "part.st", "cpu")
    save_file(untie({**state, "extra.weight": torch.zeros(2)}), tmp_path / "more.st")
    with pytest.raises(UserError, match="unexpected 1"):
        load_weights(model, tmp_path / "more.st", "cpu")
