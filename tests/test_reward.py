"""Reward model: known answers for the losses, metrics and gate; learning, exact resume, encoder
reward models scoring another tokenizer's text, the CLI."""

import json
import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from flows.cli import app
from rlhf_core.config import ModelConfig, RewardConfig
from rlhf_core.errors import UserError
from rlhf_core.reward.evaluate import (
    check_gate,
    evaluate_reward_model,
    markdown_summary,
    pair_metrics,
    write_plots,
)
from rlhf_core.reward.losses import bradley_terry_loss
from rlhf_core.reward.model import build_reward_model, head_of, load_reward_model
from rlhf_core.reward.trainer import RewardTrainer, encode_pairs, train_reward
from tests.helpers import (
    FINE_TUNED,
    assert_kill_and_resume_is_exact,
    demo_frame,
    demo_rows,
    reward_settings,
)


def sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# -- losses -----------------------------------------------------------------------------------
def test_hard_bradley_terry_known_answers():
    per, total = bradley_terry_loss(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0]))
    assert per.tolist() == pytest.approx([-math.log(sig(1.0)), math.log(2)], abs=1e-6)
    assert float(total) == pytest.approx(-math.log(sig(1.0)) + math.log(2), abs=1e-6)
    per, _ = bradley_terry_loss(
        torch.tensor([1.0]), torch.tensor([0.0]), margin=torch.tensor([0.5])
    )
    assert float(per[0]) == pytest.approx(-math.log(sig(0.5)), abs=1e-6)  # 0.474077


def test_soft_bradley_terry_known_answers_and_gradient():
    r_c = torch.tensor([2.0], requires_grad=True)
    per, total = bradley_terry_loss(r_c, torch.tensor([0.0]), p_chosen=torch.tensor([0.7]))
    expected = -(0.7 * math.log(sig(2.0)) + 0.3 * math.log(sig(-2.0)))
    assert float(per[0].detach()) == pytest.approx(expected, abs=1e-6)  # 0.726928
    total.backward()
    assert float(r_c.grad[0]) == pytest.approx(
        sig(2.0) - 0.7, abs=1e-6
    )  # the optimum is sigmoid(d) = p
    hard, _ = bradley_terry_loss(torch.tensor([0.3]), torch.tensor([1.1]))
    soft_one, _ = bradley_terry_loss(
        torch.tensor([0.3]), torch.tensor([1.1]), p_chosen=torch.tensor([1.0])
    )
    assert float(hard[0]) == pytest.approx(float(soft_one[0]), abs=1e-7)


def test_centring_and_weights():
    per, _ = bradley_terry_loss(torch.tensor([1.0]), torch.tensor([1.0]), center_coef=0.01)
    assert float(per[0]) == pytest.approx(math.log(2) + 0.01 * 4, abs=1e-6)
    per, total = bradley_terry_loss(
        torch.tensor([0.0, 0.0]), torch.tensor([0.0, 0.0]), weight=torch.tensor([2.0, 0.5])
    )
    assert per.tolist() == pytest.approx([2 * math.log(2), 0.5 * math.log(2)], abs=1e-6)


# -- metrics and gate -------------------------------------------------------------------------
def test_pair_metrics_on_hand_made_scores():
    r_c, r_r = np.array([2.0, 1.0, 0.0, 3.0]), np.array([1.0, 2.0, 0.0, 0.0])
    m = pair_metrics(r_c, r_r)
    assert m["accuracy"] == pytest.approx((1 + 0 + 0.5 + 1) / 4)  # a tie counts half
    # every other pair shown swapped: scores [1, 1, 0, -3], truth [1, 0, 1, 0]
    assert m["auc"] == pytest.approx((0.5 + 1 + 0 + 1) / 4)
    ece = (2 * abs(sig(1) - 0.5) + abs(0.5 - 1.0) + abs(sig(-3) - 0.0)) / 4
    assert m["ece"] == pytest.approx(ece, abs=1e-9)
    perfect = pair_metrics(np.array([5.0, 6.0, 7.0, 9.0]), np.zeros(4))
    assert perfect["accuracy"] == 1.0 and perfect["auc"] == 1.0


def test_gate_names_metric_and_threshold():
    metrics = {"test_accuracy": 0.55, "test_ece": 0.2, "test_length_correlation": -0.7}
    ok = check_gate(metrics, min_accuracy=0.5)
    assert ok.passed and ok.message == "reward model gate passed"
    bad = check_gate(metrics, min_accuracy=0.6, max_ece=0.1, max_abs_length_corr=0.8)
    assert not bad.passed and len(bad.failures) == 2
    assert "test_accuracy = 0.5500, needs >= 0.6 (reward.gate.min_accuracy)" in bad.message
    assert "test_ece = 0.2000, needs <= 0.1 (reward.gate.max_ece)" in bad.message
    assert "\n" not in bad.message


def test_evaluation_flags_a_reward_that_measures_length(tmp_path):
    class LengthReward:  # stands in for a reward model whose score is the response length
        def score(self, prompts, responses, batch_size=64):
            return np.array([len(r) for r in responses], float)

    df = demo_frame(0, 120)
    ev = evaluate_reward_model(LengthReward(), df, "test")
    assert ev.report["length"]["reward_length_correlation"] == pytest.approx(1.0)
    assert ev.report["length"]["flagged"]
    longer = np.mean(df["chosen"].str.len() > df["rejected"].str.len())
    assert ev.report["accuracy"] == pytest.approx(longer, abs=0.01)
    assert ev.report["length"]["longer_wins_accuracy"] == pytest.approx(
        ev.report["accuracy"], abs=1e-9
    )
    assert {"short", "medium", "long"} == set(ev.report["by_length_bucket"])
    assert len(write_plots(ev, tmp_path)) == 3 and all(
        p.stat().st_size > 1000 for p in tmp_path.iterdir()
    )
    assert "may mostly measure length" in markdown_summary(
        {"test": ev.report}, check_gate(ev.metrics, 0.5)
    )


# -- models and training ----------------------------------------------------------------------
def test_reward_head_stays_fp32_under_bf16_autocast(tiny_gpt2, tmp_path):
    """bf16 would round a reward near 4 to a multiple of 1/32; the head (also after save and load,
    and as PPO's value head copied from it) keeps fp32."""
    from rlhf_core.ppo.value import value_from_reward_model

    rm = build_reward_model(str(tiny_gpt2), reward_settings(), seed=0)
    rm.normalisation = {"mean": 0.0, "std": 1.0, "n": 0, "source": "test"}
    rm.save(tmp_path / "rm")
    for model in (rm, load_reward_model(str(tmp_path / "rm"), device="cpu")):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            r = model.forward(
                model.encode(["Hi"] * 8, [f"answer {i} " * (i + 1) for i in range(8)])
            )
        assert r.dtype == torch.float32
        assert not torch.equal(r, r.to(torch.bfloat16).float())  # not bf16-rounded
        value_head = value_from_reward_model(model.model).head
        assert value_head.weight.dtype == torch.float32
        x = torch.randn(2, 3, value_head.in_features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert value_head(x).dtype == torch.float32


def test_head_initialisation(tiny_gpt2):
    rm = build_reward_model(str(tiny_gpt2), reward_settings(), seed=3)
    head = head_of(rm.model)
    d = head.in_features
    assert rm.kind == "causal" and head.out_features == 1
    assert float(head.weight.detach().std()) == pytest.approx(1 / math.sqrt(d + 1), rel=0.35)
    assert head.bias is None or float(head.bias.abs().max()) == 0.0
    enc = build_reward_model("minilm", reward_settings(), seed=3)
    h = head_of(enc.model)
    assert enc.kind == "encoder" and float(h.bias.abs().max()) == 0.0
    assert float(h.weight.detach().std()) == pytest.approx(
        1 / math.sqrt(h.in_features + 1), rel=0.35
    )


def test_training_raises_validation_accuracy_on_demo_data():
    rm = build_reward_model("minilm", reward_settings(max_length=128), seed=0)
    settings = RewardConfig(
        **FINE_TUNED,
        max_steps=30,
        batch_size=8,
        lr=1e-4,
        warmup_ratio=0.1,
        eval_every=15,
        early_stopping_patience=None,
        checkpoint_every=1000,
    )
    val = encode_pairs(rm, demo_frame(500, 580), settings)
    trainer = RewardTrainer(
        rm, encode_pairs(rm, demo_frame(0, 300), settings), val, settings, progress=False
    )
    before = trainer.evaluate()["eval_accuracy"]
    logged = []
    trainer.on_log = lambda step, m: logged.append((step, m))
    result = trainer.train()
    assert result.best_metric >= 0.85 and result.best_metric > before + 0.15, (
        before,
        result.best_metric,
    )
    assert [s for s, m in logged if "eval_accuracy" in m] == [15, 30]
    assert any("pairs_per_s" in m for _, m in logged)
    assert not rm.model.training  # dropout off after training


def test_killed_reward_training_resumes_to_the_same_weights(tiny_gpt2, tmp_path):
    assert_kill_and_resume_is_exact("reward_job", [tiny_gpt2], tmp_path, "step-00000010")


def test_encoder_reward_model_scores_text_from_a_policy_with_another_tokenizer(tiny_gpt2, tmp_path):
    """The policy (BPE, 2k vocab) and the reward model (WordPiece, 30k vocab) share no vocabulary:
    normalisation statistics come from decoded policy samples, and the saved model scores text."""
    cfg = RewardConfig(
        **FINE_TUNED,
        max_steps=4,
        batch_size=8,
        norm_prompts=6,
        norm_max_new_tokens=12,
        device="cpu",
    )
    rm, _ = train_reward(
        demo_frame(0, 64),
        None,
        cfg,
        ModelConfig(),
        "minilm",
        policy_dir=str(tiny_gpt2),
        progress=False,
    )
    assert len(rm.tokenizer) != 2000 and rm.kind == "encoder"
    norm = rm.normalisation
    assert (
        norm["source"].startswith("reference policy samples (6")
        and norm["n"] == 6
        and norm["std"] > 0
    )
    rm.save(tmp_path / "rm")
    back = load_reward_model(str(tmp_path / "rm"), device="cpu")
    assert back.normalisation == norm and back.kind == "encoder"
    from rlhf_core.models.chat import ChatFormat
    from rlhf_core.models.loading import load_causal_lm
    from rlhf_core.sft import generate_samples

    lm = load_causal_lm(str(tiny_gpt2), device="cpu")
    prompts = [r["prompt"] for r in demo_rows()[:4]]
    texts = generate_samples(lm.model, ChatFormat(lm.tokenizer), prompts, 10, 0.7, 0.9, 1.0, seed=1)
    raw = back.score(prompts, texts)
    assert raw.shape == (4,) and np.isfinite(raw).all()
    assert np.allclose(raw, rm.score(prompts, texts), atol=1e-5)
    assert np.allclose(back.normalise(raw), (raw - norm["mean"]) / norm["std"])


def test_long_pairs_keep_the_end_of_the_prompt(tiny_gpt2):
    for backbone in ("minilm", str(tiny_gpt2)):
        rm = build_reward_model(backbone, reward_settings(max_length=32))
        prompt = "filler " * 200 + "what is the capital of france?"
        enc = rm.encode([prompt], ["paris is the capital. " * 40])[0]
        assert len(enc) <= 32
        text = rm.tokenizer.decode(enc.input_ids)
        assert "france" in text.lower() and "paris" in text.lower()
        if rm.kind == "causal":
            assert enc.input_ids[-1] == rm.tokenizer.eos_token_id  # the reward is read at EOS


def test_lora_reward_model_saves_a_plain_model(tiny_gpt2, tmp_path):
    cfg = RewardConfig(  # fp32: bf16 kernels round by memory layout, which merging changes
        **FINE_TUNED,
        max_steps=3,
        batch_size=8,
        device="cpu",
        lr=1e-3,
        lora={"enabled": True, "r": 4, "alpha": 8},
        mixed_precision="no",
    )
    rm, _ = train_reward(
        demo_frame(0, 40), demo_frame(500, 520), cfg, ModelConfig(), str(tiny_gpt2), progress=False
    )
    rm.save(tmp_path / "rm")
    assert not (tmp_path / "rm" / "adapter_config.json").exists()
    back = load_reward_model(str(tmp_path / "rm"), device="cpu")
    df = demo_frame(500, 520)
    assert np.allclose(
        back.score(df["prompt"], df["chosen"]), rm.score(df["prompt"], df["chosen"]), atol=1e-5
    )


def test_any_hf_sequence_classifier_loads_as_a_reward_model(tiny_gpt2, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_gpt2), num_labels=1)
    tok = AutoTokenizer.from_pretrained(str(tiny_gpt2))
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp_path / "plain")
    tok.save_pretrained(tmp_path / "plain")
    rm = load_reward_model(str(tmp_path / "plain"), device="cpu")
    assert rm.kind == "causal" and rm.normalisation is None
    assert np.isfinite(rm.score(["hi"], ["hello"])).all()


# -- CLI --------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_only", [True, False])
def test_cli_reward_train_and_eval(tiny_gpt2, tmp_path, head_only):
    """`rlhf reward train`: a probe on the frozen backbone (the defaults) and fine-tuning."""
    data = tmp_path / "prefs.jsonl"
    data.write_text(
        "".join(
            json.dumps({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]})
            + "\n"
            for r in demo_rows()[:200]
        )
    )
    runner = CliRunner()
    out = tmp_path / "rm"
    res = runner.invoke(
        app,
        [
            "reward",
            "train",
            "--data",
            str(data),
            "--base",
            str(tiny_gpt2),
            "--out",
            str(out),
            "--json",
            "--set",
            "reward.max_steps=4",
            "--set",
            "reward.batch_size=8",
            "--set",
            "reward.device=cpu",
            "--set",
            f"run.work_dir={tmp_path / 'work'}",
        ]
        + ([] if head_only else ["--set", "reward.freeze_backbone=false"]),
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert (out / "reward_model.json").exists() and (out / "model.safetensors").exists()
    meta = json.loads((out / "reward_model.json").read_text())
    assert meta["pooling"] == "mean"  # the settings' default, not the demo config's "model"
    if head_only:  # a probe counts L-BFGS iterations, not optimiser steps
        assert summary["steps"] >= 1 and summary["best_val_accuracy"] is not None
    else:
        assert summary["steps"] == 4
    assert not (tmp_path / "rm.checkpoints").exists()
    res = runner.invoke(
        app,
        [
            "reward",
            "eval",
            "--model",
            str(out),
            "--data",
            str(data),
            "--json",
            "--plots",
            str(tmp_path / "plots"),
        ],
    )
    assert res.exit_code == 0, res.output
    metrics = json.loads(res.stdout.strip().splitlines()[-1])
    assert metrics["n_pairs"] == 200 and {"accuracy", "auc", "ece", "length_correlation"} <= set(
        metrics
    )
    assert 0 <= metrics["accuracy"] <= 1 and len(list((tmp_path / "plots").glob("*.png"))) == 3
    res = runner.invoke(
        app, ["reward", "eval", "--model", str(tmp_path / "nope"), "--data", str(data)]
    )
    assert (
        res.exit_code == 2
        and "no such model folder" in res.output
        and "Traceback" not in res.output
    )
    res = runner.invoke(
        app, ["reward", "eval", "--model", str(out), "--data", str(tmp_path / "missing.jsonl")]
    )
    assert res.exit_code == 2 and "no such file" in res.output


def test_ensemble_aggregates_known_answers():
    import torch

    from rlhf_core.reward.ensemble import aggregate, bootstrap_indices

    s = np.array([[1.0, 0.0, 2.0], [3.0, 0.0, -2.0]])  # 2 members x 3 responses
    assert aggregate(s, "mean").tolist() == [2.0, 0.0, 0.0]
    assert aggregate(s, "min").tolist() == [1.0, 0.0, -2.0]
    assert aggregate(s, "mean_minus_std", 0.5).tolist() == [1.5, 0.0, -1.0]  # std 1, 0, 2
    t = torch.tensor(s)
    for how in ("mean", "min", "mean_minus_std"):
        assert np.allclose(aggregate(t, how, 0.5).numpy(), aggregate(s, how, 0.5))
    a, b = bootstrap_indices(100, 0, 0), bootstrap_indices(100, 1, 0)
    assert len(a) == 100 and len(set(a)) < 100 and not np.array_equal(a, b)
    assert np.array_equal(a, bootstrap_indices(100, 0, 0))


def test_reward_ensemble_trains_saves_loads_and_scores_as_its_aggregate(tiny_gpt2, tmp_path):
    """Two members on bootstrap resamples: each normalised with its own statistics, the ensemble's
    score is their mean, a reload gives the same scores, and PPO logs the members' disagreement."""
    from rlhf_core.config import PPOConfig
    from rlhf_core.ppo.build import build_ppo_trainer
    from rlhf_core.reward.ensemble import EnsembleRewardModel, is_ensemble

    cfg = RewardConfig(
        **FINE_TUNED,
        max_steps=4,
        batch_size=8,
        norm_prompts=6,
        norm_max_new_tokens=8,
        device="cpu",
        ensemble={"members": 2},
        mixed_precision="no",  # exact reload: bf16 scores of a reloaded model differ by ~0.5%
    )
    rm, results = train_reward(
        demo_frame(0, 64),
        None,
        cfg,
        ModelConfig(),
        str(tiny_gpt2),
        policy_dir=str(tiny_gpt2),
        progress=False,
    )
    assert isinstance(rm, EnsembleRewardModel) and len(rm.members) == 2 and len(results) == 2
    assert all(m.normalisation["n"] == 6 for m in rm.members)
    df = demo_frame(500, 520)
    members = rm.member_scores(df["prompt"], df["chosen"])
    assert members.shape == (2, 20) and not np.allclose(members[0], members[1])
    assert np.allclose(rm.score(df["prompt"], df["chosen"]), members.mean(0))
    rm.save(tmp_path / "rm")
    assert is_ensemble(tmp_path / "rm")
    back = load_reward_model(str(tmp_path / "rm"), device="cpu")
    assert isinstance(back, EnsembleRewardModel)
    assert np.allclose(back.score(df["prompt"], df["chosen"]), members.mean(0), atol=1e-5)

    ppo = PPOConfig(
        iterations=1,
        batch_size=4,
        mini_batch_size=4,
        micro_batch_size=4,
        max_new_tokens=8,
        device="cpu",
        ensemble_aggregate="min",
    )
    trainer = build_ppo_trainer(
        str(tiny_gpt2), str(tmp_path / "rm"), list(df["prompt"]), ppo, ModelConfig(), progress=False
    )
    assert trainer.rm.how == "min" and trainer.rm_reads_policy_tokens
    history = trainer.train().history
    assert history[0]["reward_disagreement"] > 0


def test_probe_weights_known_answers():
    """One feature, every pair d = 1 with soft label 0.75: sigmoid(w) = 0.75, so w = ln 3 without
    L2; with L2 the optimum's gradient vanishes: -(p - sigmoid(w)) + 2 l2 w = 0."""
    from rlhf_core.reward.probe import fit_weights

    d = torch.ones(8, 1)
    w, _ = fit_weights(d, 1e-12, p=torch.full((8,), 0.75))
    assert float(w) == pytest.approx(math.log(3), abs=1e-5)
    w, _ = fit_weights(d, 0.1, p=torch.full((8,), 0.75))
    assert -(0.75 - sig(float(w))) + 2 * 0.1 * float(w) == pytest.approx(0, abs=1e-7)
    # hard labels with margin 1 and weights: the weighted mean gradient vanishes
    g = torch.Generator().manual_seed(0)
    d = torch.randn(40, 3, generator=g)
    m, a = torch.full((40,), 1.0), torch.rand(40, generator=g) + 0.5
    w, iters = fit_weights(d, 0.01, margin=m, weight=a)
    w = w.clone().requires_grad_(True)
    z = d.double() @ w - m.double()
    loss = (a.double() * -torch.nn.functional.logsigmoid(z)).sum() / a.sum() + 0.01 * (w @ w)
    (grad,) = torch.autograd.grad(loss, w)
    assert float(grad.abs().max()) < 1e-7 and iters >= 1


def test_mean_pooling_reads_only_the_response(tiny_gpt2, tmp_path):
    for backbone in ("minilm", str(tiny_gpt2)):
        rm = build_reward_model(backbone, reward_settings(max_length=64, pooling="mean"))
        a, b = rm.encode(["say hi", "a different and longer prompt: say hi"], ["hello there"] * 2)
        response = rm.tokenizer.decode(a.input_ids[a.response_start :]).strip().lower()
        assert a.response_start > 0 and response.startswith("hello"), response
        x = rm.features([a, b])
        assert x.shape == (2, head_of(rm.model).in_features)
        if rm.kind == "causal":  # causal attention: the response's states depend on the prompt
            assert not torch.allclose(x[0], x[1])
        rm.save(tmp_path / rm.kind)
        back = load_reward_model(str(tmp_path / rm.kind), device="cpu")
        assert back.pooling == "mean"
        assert np.allclose(
            back.score(["say hi"], ["hello"]), rm.score(["say hi"], ["hello"]), atol=1e-5
        )


def test_frozen_backbone_probe_learns_demo_preferences_and_keeps_the_backbone():
    """The head alone, fit by L-BFGS on frozen MiniLM features, separates the demo's pairs; the
    backbone's weights are untouched and the L2 strength with the lowest validation loss is kept."""
    cfg = RewardConfig(freeze_backbone=True, pooling="mean", head_l2=[1e-4, 1e-2], device="cpu")
    before = build_reward_model("minilm", reward_settings(pooling="mean"), seed=0)
    backbone = {k: v.clone() for k, v in before.model.bert.state_dict().items()}
    logged = []
    rm, results = train_reward(
        demo_frame(0, 200),
        demo_frame(500, 580),
        cfg,
        ModelConfig(),
        "minilm",
        on_log=lambda step, m: logged.append(m),
        progress=False,
    )
    (result,) = results
    assert [m["head_l2"] for m in logged] == [1e-4, 1e-2]
    assert result.final_eval["eval_loss"] == min(m["eval_loss"] for m in logged)
    assert result.best_metric >= 0.85, result.history
    for k, v in rm.model.bert.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    ev = evaluate_reward_model(rm, demo_frame(400, 480), "test").report
    assert ev["accuracy"] >= 0.85


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("pooling", ["model", "mean"])
def test_probe_features_are_what_the_model_reads(tiny_gpt2, pooling, precision):
    """The probe fits the head to head_inputs(); scoring must read exactly those features, also
    under bf16 autocast (scoring runs under the precision the head was fit with)."""
    from rlhf_core.reward.probe import head_inputs

    for backbone, eos_pads in (("minilm", False), (str(tiny_gpt2), False), (str(tiny_gpt2), True)):
        rm = build_reward_model(
            backbone, reward_settings(max_length=48, pooling=pooling, mixed_precision=precision)
        )
        if eos_pads:  # tokenizers whose pad token is EOS: the classifier reads the token before it
            rm.tokenizer.pad_token = rm.tokenizer.eos_token
            rm.model.config.pad_token_id = rm.tokenizer.eos_token_id
        df = demo_frame(0, 12)
        items = rm.encode(df["prompt"], df["chosen"])
        x = head_inputs(rm, items, batch_size=5)
        with torch.no_grad():
            expected = head_of(rm.model)(x).squeeze(-1)
        scored = rm.score_encoded(items, batch_size=5)  # same batches: bf16 rounds by batch shape
        assert torch.allclose(expected, torch.as_tensor(scored).float(), atol=1e-4)


def test_reward_model_scores_under_its_own_precision(tmp_path):
    """A model fit under bf16 autocast scores under it, also after save and load."""
    df = demo_frame(0, 16)
    scores = {}
    for precision in ("no", "bf16"):
        rm = build_reward_model("minilm", reward_settings(max_length=64, mixed_precision=precision))
        scores[precision] = rm.score(df["prompt"], df["chosen"])
        loaded = load_reward_model(str(rm.save(tmp_path / precision)), device="cpu")
        assert loaded.mixed_precision == precision
        np.testing.assert_allclose(loaded.score(df["prompt"], df["chosen"]), scores[precision])
    assert not np.array_equal(scores["no"], scores["bf16"])  # bf16 really ran
    np.testing.assert_allclose(scores["no"], scores["bf16"], atol=0.05)


def test_backbone_layers_keeps_the_first_blocks(tmp_path):
    """reward.backbone_layers: the first N blocks with their pretrained weights; saved and loaded
    as that smaller model; more layers than the backbone has is a one-line error."""
    full = build_reward_model("minilm", reward_settings())
    rm = build_reward_model("minilm", reward_settings(backbone_layers=2))
    assert rm.model.config.num_hidden_layers == 2 and len(rm.model.bert.encoder.layer) == 2
    for k, v in rm.model.bert.encoder.layer.state_dict().items():
        assert torch.equal(v, full.model.bert.encoder.layer[:2].state_dict()[k]), k
    df = demo_frame(0, 8)
    loaded = load_reward_model(str(rm.save(tmp_path / "rm")), device="cpu")
    assert loaded.model.config.num_hidden_layers == 2
    np.testing.assert_allclose(
        loaded.score(df["prompt"], df["chosen"]), rm.score(df["prompt"], df["chosen"]), atol=1e-5
    )
    with pytest.raises(UserError, match="has 6 layers; cannot keep 7"):
        build_reward_model("minilm", reward_settings(backbone_layers=7))


def _fine_tune_head(cfg: RewardConfig, train, checkpoint_dir=None):
    rm, results = train_reward(
        train,
        None,
        cfg,
        ModelConfig(),
        "minilm",
        checkpoint_dir=checkpoint_dir,
        progress=False,
    )
    return head_of(rm.model).weight.detach().clone(), results[0]


def test_training_is_the_same_whatever_ran_before(tmp_path):
    """MiniLM has dropout: training seeds the global generator itself, so a run does not depend
    on which stages happened to run (or come from the cache) before it in the process."""
    cfg = RewardConfig(
        **FINE_TUNED, max_steps=3, batch_size=8, device="cpu", norm_prompts=4, mixed_precision="no"
    )
    train = demo_frame(0, 32)
    torch.manual_seed(123)
    first, _ = _fine_tune_head(cfg, train)
    torch.rand(1000)  # another stage drew from the generator
    second, _ = _fine_tune_head(cfg, train)
    assert torch.equal(first, second)


def test_a_checkpoint_of_another_run_is_not_resumed(tmp_path):
    """Resume checks what it resumes: other data start fresh (the old checkpoints set aside, not
    deleted) with a note; the same data and settings resume."""
    cfg = RewardConfig(
        **FINE_TUNED,
        max_steps=4,
        batch_size=8,
        device="cpu",
        norm_prompts=4,
        checkpoint_every=2,
        eval_every=2,
    )
    ckpt = tmp_path / "rm.checkpoints"
    _fine_tune_head(cfg, demo_frame(0, 32), ckpt)
    _, same = _fine_tune_head(cfg, demo_frame(0, 32), ckpt)
    assert same.resumed_from_step == 4 and same.resume_note is None
    _, other = _fine_tune_head(cfg, demo_frame(100, 132), ckpt)
    assert other.resumed_from_step is None and other.steps == 4
    assert "another run's" in other.resume_note and (tmp_path / "rm.checkpoints.previous").exists()
    longer = cfg.model_copy(update={"max_steps": 6})
    _, changed = _fine_tune_head(longer, demo_frame(100, 132), ckpt)
    assert changed.resumed_from_step is None and changed.resume_note  # settings changed too


def test_cli_resumes_its_own_checkpoint_and_says_so(tiny_gpt2, tmp_path):
    """`rlhf reward train --out DIR` killed mid-run: the same command resumes and prints the step;
    the command with another setting does not resume the first run's checkpoint, and says so."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_rows()[:200]))
    out = tmp_path / "rm"
    checkpoints = tmp_path / "rm.checkpoints"
    base = [str(Path(sys.executable).parent / "rlhf"), "reward", "train", "--data", str(data)]
    base += ["--base", str(tiny_gpt2), "--out", str(out), "--set", f"run.work_dir={tmp_path}"]
    for setting in (
        "freeze_backbone=false",
        "max_steps=60",
        "batch_size=8",
        "checkpoint_every=5",
        "device=cpu",
    ):
        base += ["--set", f"reward.{setting}"]

    def killed_after_a_checkpoint(args: list[str]) -> set[int]:
        proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not list(checkpoints.glob("step-*")):
            assert proc.poll() is None, proc.stdout.read().decode()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return {int(p.name.split("-")[1]) for p in checkpoints.glob("step-*")}

    steps = killed_after_a_checkpoint(base)
    again = subprocess.run(base, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    resumed = [line for line in again.stderr.splitlines() if line.startswith("resumed from step")]
    assert len(resumed) == 1 and int(resumed[0].split()[-1]) in steps, again.stderr[-2000:]

    killed_after_a_checkpoint(base)
    other = subprocess.run(
        base + ["--set", "reward.lr=1e-3"], capture_output=True, text=True, timeout=600
    )
    assert other.returncode == 0, other.stderr[-2000:]
    assert "resumed from step" not in other.stderr
    assert "is another run's (data, settings, model or code differ): started fresh" in other.stderr
    assert not checkpoints.exists() and (tmp_path / "rm.checkpoints.previous").is_dir()
