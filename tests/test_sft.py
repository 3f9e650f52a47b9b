"""SFT: known answers for masking, loss, batching and schedules; learning; exact resume after a kill."""

import math

import pytest
import torch

from rlhf_core.config import SFTConfig
from rlhf_core.models.chat import ChatFormat
from rlhf_core.models.loading import load_causal_lm
from rlhf_core.sft import (
    IGNORE,
    Example,
    SFTTrainer,
    collate,
    encode_examples,
    generate_samples,
    token_nll,
)
from rlhf_core.training import length_bucketed_batches, lr_factor
from tests.helpers import assert_kill_and_resume_is_exact, demo_rows


def test_collate_masks_prompt_and_padding():
    batch = collate(
        [Example([5, 6, 7, 8, 2], n_prompt=3), Example([9, 10, 11], n_prompt=2)], pad_id=0
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2], [9, 10, 11, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [
        [IGNORE, IGNORE, IGNORE, 8, 2],
        [IGNORE, IGNORE, 11, IGNORE, IGNORE],
    ]


class FixedLogits(torch.nn.Module):
    """A model whose next-token distribution is known: uniform over V, except token 3 gets +10."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        logits[..., 3] = 10.0
        return type("Out", (), {"logits": logits})()


def test_token_nll_counts_only_response_tokens():
    v = 7
    batch = collate([Example([1, 2, 3, 4], n_prompt=2), Example([1, 3], n_prompt=1)], pad_id=0)
    loss, n = token_nll(FixedLogits(v), batch)
    z = math.log(math.exp(10) + v - 1)
    # labelled targets: 3, 4 (row 0) and 3 (row 1): two of them are token 3
    expected = 2 * (z - 10) + 1 * z
    assert n == 3
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_encode_truncates_and_drops(tiny_gpt2):
    tok = load_causal_lm(str(tiny_gpt2), device="cpu").tokenizer
    fmt = ChatFormat(tok)
    long_prompt = "word " * 200
    examples, stats = encode_examples(
        [("short question?", "short answer."), (long_prompt, "an answer that fits.")], fmt, 32
    )
    assert stats.examples == 2 and stats.truncated == 1 and stats.dropped == 0
    assert all(len(e) <= 32 for e in examples)
    assert (
        examples[1].n_prompt == 32 - len(fmt.encode("x", "an answer that fits.")[1])
        or examples[1].n_prompt >= 16
    )
    # the response keeps its EOS and is never cut to nothing while max_length allows it
    assert examples[0].input_ids[-1] == tok.eos_token_id
    _, stats = encode_examples([("q", "a " * 100)], fmt, 8)
    assert stats.examples == 1 and stats.truncated == 1


def test_length_bucketing_covers_everything_once_and_is_seeded():
    lengths = [(i * 37) % 101 for i in range(1000)]
    batches = length_bucketed_batches(lengths, batch_size=16, bucket_factor=4, seed=3, epoch=0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert batches == length_bucketed_batches(lengths, 16, 4, seed=3, epoch=0)
    assert batches != length_bucketed_batches(lengths, 16, 4, seed=3, epoch=1)
    # bucketing pads less than random batches
    spread = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches)
    unbucketed = length_bucketed_batches(lengths, 16, 0, seed=3, epoch=0)
    spread_random = sum(max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in unbucketed)
    assert spread < spread_random / 2


def test_lr_schedules_known_values():
    assert lr_factor(0, 100, 10, "cosine") == pytest.approx(0.1)
    assert lr_factor(9, 100, 10, "cosine") == pytest.approx(1.0)
    assert lr_factor(55, 100, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(55, 100, 10, "linear") == pytest.approx(0.5)
    assert lr_factor(80, 100, 0, "constant") == 1.0
    with pytest.raises(ValueError):
        lr_factor(5, 10, 0, "exp")


def _examples(fmt, rows, max_length=128):
    return encode_examples([(r["prompt"], r["chosen"]) for r in rows], fmt, max_length)[0]


def test_sft_lowers_validation_loss_on_demo_data(tiny_gpt2):
    lm = load_causal_lm(str(tiny_gpt2), device="cpu", eval_mode=False)
    fmt = ChatFormat(lm.tokenizer)
    rows = demo_rows()
    train, val = _examples(fmt, rows[:500]), _examples(fmt, rows[500:580])
    trainer = SFTTrainer(
        lm.model,
        lm.tokenizer,
        train,
        val,
        SFTConfig(
            max_steps=60, batch_size=16, lr=3e-3, eval_every=20, log_every=10, checkpoint_every=1000
        ),
        progress=False,
    )
    before = trainer.evaluate()["eval_loss"]
    logged = []
    trainer.on_log = lambda step, m: logged.append((step, m))
    result = trainer.train()
    assert result.steps == 60 and result.best_eval_loss < before - 1.0, (
        before,
        result.best_eval_loss,
    )
    assert {"train_loss", "lr", "grad_norm", "tokens_per_s"} <= set(logged[0][1])
    assert any("eval_perplexity" in m for _, m in logged)
    # the model now writes on-topic-looking text, ending on EOS within the budget for some prompts
    out = generate_samples(lm.model, fmt, [r["prompt"] for r in rows[580:584]], 40, 0.7, 0.9, 1.3)
    assert len(out) == 4 and all(isinstance(t, str) for t in out)


def test_early_stopping_keeps_best_weights(tiny_gpt2):
    lm = load_causal_lm(str(tiny_gpt2), device="cpu", eval_mode=False)
    fmt = ChatFormat(lm.tokenizer)
    rows = demo_rows()
    # a huge learning rate makes validation loss get worse after the first evaluation
    trainer = SFTTrainer(
        lm.model,
        lm.tokenizer,
        _examples(fmt, rows[:200]),
        _examples(fmt, rows[500:540]),
        SFTConfig(
            max_steps=200,
            batch_size=8,
            lr=0.5,
            warmup_ratio=0,
            eval_every=2,
            early_stopping_patience=2,
            checkpoint_every=1000,
        ),
        progress=False,
    )
    result = trainer.train()
    assert result.stopped_early and result.steps < 200
    assert trainer.evaluate()["eval_loss"] == pytest.approx(result.best_eval_loss, rel=1e-5)


def test_killed_run_resumes_to_the_same_weights(tiny_gpt2, tmp_path):
    assert_kill_and_resume_is_exact("sft_job", [tiny_gpt2], tmp_path, "step-00000015")


def test_lora_sft_trains_only_the_adapter(tiny_gpt2):
    from rlhf_core.config import LoraSection
    from rlhf_core.models.loading import add_lora

    lm = load_causal_lm(str(tiny_gpt2), device="cpu", eval_mode=False)
    base_state = {k: v.clone() for k, v in lm.model.state_dict().items()}
    policy = add_lora(lm.model, LoraSection(enabled=True, r=8, alpha=16))
    fmt = ChatFormat(lm.tokenizer)
    rows = demo_rows()
    trainer = SFTTrainer(
        policy,
        lm.tokenizer,
        _examples(fmt, rows[:200]),
        _examples(fmt, rows[500:540]),
        SFTConfig(max_steps=20, batch_size=8, lr=5e-3, eval_every=10, checkpoint_every=1000),
        progress=False,
    )
    before = trainer.evaluate()["eval_loss"]
    result = trainer.train()
    assert result.best_eval_loss < before
    with policy.disable_adapter():
        base_now = {
            k.replace("base_model.model.", "").replace(".base_layer", ""): v
            for k, v in policy.state_dict().items()
            if "lora_" not in k
        }
    for k, v in base_state.items():
        assert torch.equal(base_now[k], v), k  # frozen base: the reference policy for PPO is free


def test_instruction_pairs_from_self_instruct(self_instruct):
    from rlhf_core.data.instructions import load_instruction_pairs

    pairs = load_instruction_pairs(self_instruct)
    assert len(pairs) >= 175
    assert all(p.strip() and r.strip() for p, r in pairs)
    with_input = [p for p, _ in pairs if "\n\n" in p]
    assert with_input  # tasks with an input carry it after the instruction


def test_instruction_data_errors(tmp_path):
    from rlhf_core.data.instructions import load_instruction_pairs
    from rlhf_core.errors import UserError

    with pytest.raises(UserError, match="no such file"):
        load_instruction_pairs(tmp_path / "none.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"instruction": "x", "instances": [{"input": "", "output": "y"}]}\n{"nope": 1}\n'
    )
    with pytest.raises(UserError, match=r"bad.jsonl:2: expected an object"):
        load_instruction_pairs(bad)


def _nan_at(trainer, calls: set[int]):
    """Make the gradient of the given micro-steps (1-based) NaN, as a bad batch or an overflow."""
    original, count = trainer.micro_step, [0]

    def micro_step(indices, step_units):
        loss = original(indices, step_units)
        count[0] += 1
        if count[0] in calls:
            next(p for p in trainer.model.parameters() if p.grad is not None).grad.fill_(
                float("nan")
            )
        return loss

    trainer.micro_step = micro_step


def test_nonfinite_steps_are_skipped_then_stop_training(tiny_gpt2):
    """A NaN gradient never reaches the weights; max_nonfinite_steps in a row stop training with
    one line (a UserError, so the stage fails cleanly)."""
    from rlhf_core.training import TrainingDiverged

    lm = load_causal_lm(str(tiny_gpt2), device="cpu", eval_mode=False)
    train = _examples(ChatFormat(lm.tokenizer), demo_rows()[:64])
    settings = SFTConfig(max_steps=6, batch_size=8, checkpoint_every=1000, max_nonfinite_steps=2)
    trainer = SFTTrainer(lm.model, lm.tokenizer, train, [], settings, progress=False)
    logged = []
    trainer.on_log = lambda step, m: logged.append(m)
    _nan_at(trainer, {2})
    result = trainer.train()
    assert result.steps == 6 and trainer.state["skipped_steps"] == 1
    assert {"skipped_steps": 1} in logged
    assert all(torch.isfinite(p).all() for p in lm.model.parameters())
    trainer = SFTTrainer(lm.model, lm.tokenizer, train, [], settings, progress=False)
    _nan_at(trainer, set(range(1, 100)))
    with pytest.raises(TrainingDiverged, match="sft: .*2 non-finite steps in a row after step 0"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in lm.model.parameters())
