"""DPO: the losses with hand-worked answers and against TRL 1.12's DPOTrainer on identical tensors;
cached reference log-probabilities equal a fresh computation; training prefers the chosen
responses; kill and resume end on the same weights."""

from __future__ import annotations

import copy
import math

import pandas as pd
import pytest
import torch

from rlhf_core.config import DPOConfig, ModelConfig
from rlhf_core.dpo.core import dpo_loss, sequence_logps
from tests.helpers import demo_rows

T = torch.tensor


def test_losses_known_answers():
    # h = (-1 - -1.5) - (-2 - -1.5) = 1; beta = 0.5
    args = (T([-1.0]), T([-2.0]), T([-1.5]), T([-1.5]), 0.5)
    sigmoid = dpo_loss(*args, "sigmoid")
    assert sigmoid.losses.item() == pytest.approx(math.log1p(math.exp(-0.5)))  # 0.474077
    assert sigmoid.chosen_rewards.item() == pytest.approx(0.25)
    assert sigmoid.rejected_rewards.item() == pytest.approx(-0.25)
    assert sigmoid.margins.item() == pytest.approx(0.5) and sigmoid.accuracies.item() == 1.0
    soft = dpo_loss(*args, "soft", p_chosen=T([0.8]))
    assert soft.losses.item() == pytest.approx(
        0.8 * math.log1p(math.exp(-0.5)) + 0.2 * math.log1p(math.exp(0.5))
    )  # 0.574077
    assert dpo_loss(*args, "soft", p_chosen=T([1.0])).losses.item() == pytest.approx(
        sigmoid.losses.item()
    )
    # per-token means: 0.5 / 2 - (-0.5 / 4) = 0.375; 1 / (2 beta) = 1
    ipo = dpo_loss(*args, "ipo", chosen_tokens=T([2.0]), rejected_tokens=T([4.0]))
    assert ipo.losses.item() == pytest.approx((0.375 - 1.0) ** 2)
    with pytest.raises(ValueError, match="needs p_chosen"):
        dpo_loss(*args, "soft")


def test_sequence_logps_counts_response_tokens_only():
    # vocabulary of 4, uniform logits except row 0 position 1 that makes token 2 certain-ish
    logits = torch.zeros(2, 4, 4)
    logits[0, 1, 2] = math.log(3.0)  # p(token 2) = 3 / 6
    ids = T([[0, 1, 2, 3], [0, 1, 2, 0]])
    mask = T([[0, 0, 1, 1], [0, 1, 1, 0]])
    logps, n = sequence_logps(logits, ids, mask)
    assert n.tolist() == [2.0, 2.0]
    assert logps[0].item() == pytest.approx(math.log(0.5) + math.log(0.25))
    assert logps[1].item() == pytest.approx(2 * math.log(0.25))


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_loss_equals_trl_on_identical_tensors(tmp_path, tiny_gpt2, loss):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig as TRLConfig
    from trl import DPOTrainer as TRLTrainer

    tok = AutoTokenizer.from_pretrained(tiny_gpt2)
    policy = AutoModelForCausalLM.from_pretrained(tiny_gpt2)
    reference = copy.deepcopy(policy)
    torch.manual_seed(0)
    with torch.no_grad():  # a reference unlike the policy, so that the losses are not all log 2
        for p in reference.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = [
        {"prompt": r["prompt"], "chosen": " " + r["chosen"], "rejected": " " + r["rejected"]}
        for r in demo_rows(8)
    ]
    trl = TRLTrainer(
        model=policy,
        ref_model=reference,
        args=TRLConfig(
            output_dir=str(tmp_path / "trl"),
            loss_type=[loss],
            beta=0.3,
            per_device_train_batch_size=8,
            use_cpu=True,
            report_to="none",
            max_length=128,
        ),
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    batch = next(iter(trl.get_train_dataloader()))
    policy.eval()
    reference.eval()
    with torch.no_grad():
        trl_loss = trl.compute_loss(policy, dict(batch))
        kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        mask = batch["completion_mask"]
        logps, n = sequence_logps(policy(**kwargs).logits, batch["input_ids"], mask)
        ref, _ = sequence_logps(reference(**kwargs).logits, batch["input_ids"], mask)
    (pc, pr), (rc, rr), (nc, nr) = logps.chunk(2), ref.chunk(2), n.chunk(2)
    ours = dpo_loss(pc, pr, rc, rr, 0.3, loss, chosen_tokens=nc, rejected_tokens=nr)
    assert abs(trl_loss.item() - 0.6931) > 0.01  # the test can tell a right loss from log 2
    assert ours.losses.mean().item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)


def _pairs_file(tmp_path, n=48, p_chosen=None):
    rows = list(demo_rows(n))
    df = pd.DataFrame(
        {
            "prompt": [r["prompt"] for r in rows],
            "chosen": [r["chosen"] for r in rows],
            "rejected": [r["rejected"] for r in rows],
            "label_source": ["ai"] * len(rows),
            "p_chosen": [p_chosen or 0.9] * len(rows),
        }
    )
    path = tmp_path / f"pairs-{n}.parquet"
    df.to_parquet(path)
    return str(path)


def _settings(**kw) -> DPOConfig:
    base = {
        "max_steps": 12,
        "batch_size": 4,
        "lr": 5e-4,
        "eval_every": 6,
        "checkpoint_every": 3,
        "max_length": 96,
        "mixed_precision": "no",
        "early_stopping_patience": None,
    }
    return DPOConfig(**(base | kw))


def test_training_prefers_chosen_and_caches_reference_logps(tmp_path, tiny_gpt2):
    from rlhf_core.dpo.learner import build_dpo_trainer

    train, val = _pairs_file(tmp_path, 48), _pairs_file(tmp_path, 16)
    cache = tmp_path / "ref-cache"
    logs = []
    trainer, stats = build_dpo_trainer(
        str(tiny_gpt2),
        train,
        val,
        ModelConfig(),
        _settings(loss="sigmoid"),
        reference_cache=cache,
        on_log=lambda step, m: logs.append(m),
        progress=False,
    )
    assert stats.examples == 48 and len(list(cache.glob("*.safetensors"))) == 2
    before = trainer.evaluate()
    assert before["eval_loss"] == pytest.approx(math.log(2), abs=1e-4)  # log-ratios start at 0
    result = trainer.train()
    after = result.final_eval
    assert after["eval_loss"] < before["eval_loss"] - 0.05
    assert after["eval_rewards_accuracy"] > 0.6 and after["eval_rewards_margin"] > 0
    assert any("rewards_accuracy" in m and "logps_chosen" in m for m in logs)

    # the cached reference log-probabilities are what a fresh computation gives
    fresh, _ = build_dpo_trainer(
        str(tiny_gpt2), train, val, ModelConfig(), _settings(loss="sigmoid"), progress=False
    )
    again, _ = build_dpo_trainer(
        str(tiny_gpt2),
        train,
        val,
        ModelConfig(),
        _settings(loss="sigmoid"),
        reference_cache=cache,
        progress=False,
    )
    assert torch.equal(fresh.ref_train, again.ref_train)
    assert torch.equal(fresh.ref_val, again.ref_val)


def test_lora_reference_is_the_adapter_switched_off(tmp_path, tiny_gpt2):
    from rlhf_core.dpo.learner import build_dpo_trainer

    train, val = _pairs_file(tmp_path, 16), _pairs_file(tmp_path, 8)
    full, _ = build_dpo_trainer(
        str(tiny_gpt2), train, val, ModelConfig(), _settings(), progress=False
    )
    lora, _ = build_dpo_trainer(
        str(tiny_gpt2),
        train,
        val,
        ModelConfig(),
        _settings(lora={"enabled": True, "r": 4, "alpha": 8}),
        progress=False,
    )
    assert torch.allclose(full.ref_train, lora.ref_train, atol=1e-5)
    result = lora.train()
    assert result.steps == 12
    trainable = [n for n, p in lora.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_kill_and_resume_is_exact(tmp_path, tiny_gpt2):
    from tests.helpers import assert_kill_and_resume_is_exact

    train, val = _pairs_file(tmp_path, 48), _pairs_file(tmp_path, 16)
    assert_kill_and_resume_is_exact("dpo_job", [tiny_gpt2, train, val], tmp_path, "step-00000009")


def test_log_ratios_start_at_zero_in_the_training_precision(tmp_path, tiny_gpt2):
    """The reference log-probabilities come from the kernels and precision training runs in
    (fused GELU, bf16 autocast where the machine has bf16 units): the first loss is exactly log 2."""
    from rlhf_core.dpo.learner import build_dpo_trainer

    train, val = _pairs_file(tmp_path, 16), _pairs_file(tmp_path, 8)
    trainer, _ = build_dpo_trainer(
        str(tiny_gpt2), train, val, ModelConfig(), _settings(mixed_precision="auto"), progress=False
    )
    assert trainer.evaluate()["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)


def test_label_sources_choose_the_pairs(tmp_path, tiny_gpt2):
    from rlhf_core.dpo.learner import build_dpo_trainer

    df = pd.read_parquet(_pairs_file(tmp_path, 24))
    df.loc[:9, "label_source"] = "human"
    df.loc[10:11, "label_source"] = "none"  # unlabelled: never trained on
    mixed = tmp_path / "mixed.parquet"
    df.to_parquet(mixed)
    val = _pairs_file(tmp_path, 8)
    sizes = {}
    for sources in (["human", "ai"], ["ai"], ["human"]):
        trainer, _ = build_dpo_trainer(
            str(tiny_gpt2),
            str(mixed),
            val,
            ModelConfig(),
            _settings(label_sources=sources),
            progress=False,
        )
        sizes[tuple(sources)] = len(trainer.train_set)
    assert sizes == {("human", "ai"): 22, ("ai",): 12, ("human",): 10}
