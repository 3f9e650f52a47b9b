"""The PPO engine: sampling mechanics, learning on the demo task, exact resume after a kill, guards."""

import math

import pytest
import torch

from rlhf_core.config import (
    EvaluateConfig,
    GRPOConfig,
    JudgeConfig,
    ModelConfig,
    OnlineDPOConfig,
    PPOConfig,
    RLOOConfig,
)
from rlhf_core.models.loading import load_causal_lm
from rlhf_core.ppo.build import build_ppo_trainer
from rlhf_core.ppo.core import logprobs_from_logits
from rlhf_core.ppo.rollout import left_pad, response_logits, sample, sampling_copy
from rlhf_core.ppo.trainer import PPODiverged
from rlhf_core.training import has_bf16_units
from tests.helpers import assert_kill_and_resume_is_exact, demo_rows, untrained_reward_dir

PROMPTS = [r["prompt"] for r in demo_rows()[:600]]


def test_sampling_logprobs_match_a_full_forward_pass(tiny_gpt2):
    """Behaviour log-probs from the KV-cached sampling loop equal a fresh forward over the whole
    sequence (left padding, position ids, temperature), and nothing after EOS is kept."""
    lm = load_causal_lm(str(tiny_gpt2), device="cpu")
    tok = lm.tokenizer
    from rlhf_core.models.chat import ChatFormat

    fmt = ChatFormat(tok)
    ids = [fmt.encode(p)[0] for p in PROMPTS[:6]]
    assert len({len(i) for i in ids}) > 1  # the batch really is left-padded
    queries, qmask = left_pad(ids, tok.pad_token_id, torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    batch, logprobs = sample(
        lm.model,
        queries,
        qmask,
        20,
        temperature=0.7,
        top_p=0.9,
        eos_id=tok.eos_token_id,
        pad_id=tok.pad_token_id,
        generator=g,
    )
    with torch.no_grad():
        full = logprobs_from_logits(response_logits(lm.model, batch)[0], batch.responses, 0.7)
        # the LM head on response positions only (logits_to_keep) gives what slicing every position's logits gives
        every = lm.model(
            input_ids=batch.input_ids.masked_fill(~batch.attention_mask, 0),
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits[:, queries.size(1) - 1 : -1]
    assert torch.allclose(response_logits(lm.model, batch)[0], every, atol=1e-5)
    assert torch.allclose(full * batch.mask, logprobs, atol=1e-4)
    for row, m in zip(batch.responses, batch.mask):
        kept = row[m].tolist()
        assert tok.eos_token_id not in kept[:-1]  # EOS only ever as the last kept token
        assert (row[~m] == tok.pad_token_id).all()
    # one row alone gives the same tokens as in the padded batch (padding does not shift positions)
    g1 = torch.Generator().manual_seed(5)
    single, _ = sample(
        lm.model,
        queries[:1, qmask[0].long().argmax() :],
        qmask[:1, qmask[0].long().argmax() :],
        8,
        temperature=1e-4,
        eos_id=None,
        pad_id=tok.pad_token_id,
        generator=g1,
    )
    g2 = torch.Generator().manual_seed(5)
    padded, _ = sample(
        lm.model,
        queries,
        qmask,
        8,
        temperature=1e-4,
        eos_id=None,
        pad_id=tok.pad_token_id,
        generator=g2,
    )
    assert single.responses[0].tolist() == padded.responses[0].tolist()


def test_repetition_penalty_steers_sampling_not_the_log_probabilities(tiny_gpt2):
    """Without a penalty the tiny policy repeats tokens; with a strong one no answer does, and the
    log-probabilities returned are still the policy's own (a full forward pass gives them)."""
    from rlhf_core.models.chat import ChatFormat

    lm = load_causal_lm(str(tiny_gpt2), device="cpu")
    tok, model = lm.tokenizer, lm.model
    queries, qmask = left_pad(
        [ChatFormat(tok).encode(p)[0] for p in PROMPTS[:6]], tok.pad_token_id, torch.device("cpu")
    )

    def run(penalty):
        return sample(
            model,
            queries,
            qmask,
            16,
            eos_id=None,
            pad_id=tok.pad_token_id,
            generator=torch.Generator().manual_seed(3),
            repetition_penalty=penalty,
        )

    plain, _ = run(1.0)
    assert any(len(set(r.tolist())) < len(r) for r in plain.responses)  # repeats happen
    penalised, lp = run(1e6)
    assert all(len(set(r.tolist())) == len(r) for r in penalised.responses)
    full = logprobs_from_logits(response_logits(model, penalised)[0], penalised.responses, 1.0)
    assert torch.allclose(lp, full * penalised.mask, atol=1e-4)


def test_compiled_decoding_samples_what_eager_decoding_samples(tiny_gpt2):
    """The torch.compile'd decode step (static cache) gives the eager loop's tokens and log-probs, still after the
    weights change in place (no stale compiled constants); a failing compiled step falls back to eager decoding
    from the same random state, with one warning."""
    from rlhf_core.models.chat import ChatFormat
    from rlhf_core.ppo.rollout import CompiledDecoding

    lm = load_causal_lm(str(tiny_gpt2), device="cpu")
    tok, model = lm.tokenizer, lm.model
    fmt = ChatFormat(tok)
    queries, qmask = left_pad(
        [fmt.encode(p)[0] for p in PROMPTS[:5]], tok.pad_token_id, torch.device("cpu")
    )
    compiled = CompiledDecoding(model, queries.size(1) + 12)

    def run(seed, with_compiled):
        return sample(
            model,
            queries,
            qmask,
            12,
            temperature=0.8,
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            generator=torch.Generator().manual_seed(seed),
            compiled=compiled if with_compiled else None,
        )

    for step in range(2):
        (eager, lp_eager), (comp, lp_comp) = run(step, False), run(step, True)
        assert compiled.failure is None
        assert torch.equal(eager.responses, comp.responses) and torch.equal(eager.mask, comp.mask)
        assert torch.allclose(lp_eager, lp_comp, atol=1e-5)
        with torch.no_grad():  # an optimiser step, in place
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(7)) * 0.05)
    compiled.step = lambda **kw: (_ for _ in ()).throw(RuntimeError("no C++ compiler\nmore"))
    with pytest.warns(UserWarning, match="compiled decoding is off for this run.*no C.. compiler"):
        fallback, lp_fallback = run(3, True)
    eager, lp_eager = run(3, False)
    assert compiled.failure == "RuntimeError: no C++ compiler"
    assert torch.equal(fallback.responses, eager.responses) and torch.allclose(
        lp_fallback, lp_eager
    )


def test_fused_gelu_is_the_same_function_and_leaves_the_saved_model_alone(tiny_gpt2, tmp_path):
    from transformers.activations import GELUTanh

    from rlhf_core.models.fused import fuse_activations
    from rlhf_core.models.loading import save_model

    lm = load_causal_lm(str(tiny_gpt2), device="cpu")
    model = lm.model
    assert model.config.activation_function == "gelu_new"
    ids = torch.randint(0, len(lm.tokenizer) - 1, (3, 17))
    before = model(input_ids=ids).logits
    model(input_ids=ids).logits.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    assert fuse_activations(model) == model.config.n_layer
    assert all(isinstance(b.mlp.act, GELUTanh) for b in model.transformer.h)
    assert fuse_activations(model) == 0  # idempotent
    assert torch.allclose(model(input_ids=ids).logits, before, atol=1e-5)
    model(input_ids=ids).logits.sum().backward()
    assert all(
        torch.allclose(p.grad, g, atol=1e-4, rtol=1e-4) for p, g in zip(model.parameters(), grads)
    )
    save_model(model, lm.tokenizer, tmp_path / "saved")
    reloaded = load_causal_lm(str(tmp_path / "saved"), device="cpu").model
    assert reloaded.config.activation_function == "gelu_new"
    assert torch.allclose(reloaded(input_ids=ids).logits, before, atol=1e-5)


def test_ppo_raises_the_reward_with_bounded_kl(demo_policy_and_reward):
    sft, rm = demo_policy_and_reward
    cfg = PPOConfig(
        iterations=30,
        batch_size=16,
        mini_batch_size=8,
        micro_batch_size=8,
        ppo_epochs=2,
        max_new_tokens=24,
        lr=5e-5,
        beta=0.05,
        device="cpu",
        kl_hard_limit=20.0,
        checkpoint_every=1000,
    )
    logged = []
    trainer = build_ppo_trainer(
        str(sft),
        str(rm),
        PROMPTS,
        cfg,
        ModelConfig(),
        seed=0,
        progress=False,
        on_log=lambda it, m: logged.append(m),
    )
    assert (
        not trainer.rm_reads_policy_tokens
    )  # MiniLM WordPiece vs the policy's BPE: decoded and re-tokenised
    trainer.train()
    first = sum(m["score"] for m in logged[:5]) / 5
    last = sum(m["score"] for m in logged[-5:]) / 5
    assert last > first + 0.25, (first, last)
    assert max(m["kl"] for m in logged) < 20.0
    assert {
        "score_raw",
        "kl",
        "non_score_reward",
        "entropy",
        "clipfrac",
        "approx_kl",
        "policy_loss",
        "value_loss",
        "explained_variance",
        "response_length",
        "eos_rate",
        "episodes_per_s",
        "tokens_per_s",
    } <= set(logged[0])


def test_killed_ppo_run_resumes_to_the_same_result(tiny_gpt2, tmp_path):
    reward = untrained_reward_dir(tmp_path, str(tiny_gpt2))
    assert_kill_and_resume_is_exact("ppo_job", [tiny_gpt2, reward], tmp_path, "iter-000002")


def test_kl_guard_stops_with_one_line_and_a_rerun_resumes_the_named_checkpoint(tiny_gpt2, tmp_path):
    """A real KL blow-up (a large step size, no KL penalty): one line naming the last good
    checkpoint; the weights that sampled the far rollout are set aside; the rerun resumes from
    the named checkpoint (it samples only the rollouts after it) and stops at the same place."""
    settings = dict(
        iterations=50, max_new_tokens=12, lr=1e-3, beta=0.0, kl_hard_limit=0.5, keep_checkpoints=2
    )
    trainer = _ppo(tiny_gpt2, tmp_path, **settings)
    with pytest.raises(PPODiverged) as err:
        trainer.train()
    msg = str(err.value)
    assert "exceeds ppo.kl_hard_limit 0.5" in msg and "\n" not in msg
    stopped_at = int(msg.split("iteration ")[1].split(":")[0])
    good = sorted((tmp_path / "ckpt").glob("iter-*"))
    assert good and msg.endswith(f"(last good checkpoint: {good[-1]})")
    assert list((tmp_path / "ckpt").glob("diverged-iter-*"))  # the weights that sampled it
    named = int(good[-1].name.split("-")[1])

    again = _ppo(tiny_gpt2, tmp_path, **settings)
    rollouts, rollout = [0], again.rollout

    def counted(idx):
        rollouts[0] += 1
        return rollout(idx)

    again.rollout = counted
    with pytest.raises(PPODiverged) as err2:
        again.train()
    assert f"PPO stopped at iteration {stopped_at}:" in str(err2.value)
    assert rollouts[0] == stopped_at - named  # from the named checkpoint, not from the start


def test_lora_policy_with_adapter_reference_and_shared_value_head(tiny_gpt2, tmp_path):
    reward = untrained_reward_dir(tmp_path, str(tiny_gpt2))
    cfg = PPOConfig(
        iterations=2,
        batch_size=4,
        mini_batch_size=4,
        micro_batch_size=2,
        max_new_tokens=8,
        device="cpu",
        reference="adapter",
        value_model="shared",
        lora={"enabled": True, "r": 4, "alpha": 8},
        mixed_precision="no",  # the merge itself is checked in fp32; its bf16 copy below
    )
    trainer = build_ppo_trainer(
        str(tiny_gpt2), str(reward), PROMPTS[:20], cfg, ModelConfig(), progress=False
    )
    assert trainer.reference is None and trainer.shared_value
    base = {k: v.clone() for k, v in trainer.policy.state_dict().items() if "lora" not in k}
    result = trainer.train()
    assert result.iterations == 2 and result.history[0]["kl"] == pytest.approx(
        0.0, abs=1e-4
    )  # adapter starts at zero
    after = trainer.policy.state_dict()
    assert all(
        torch.equal(base[k], after[k]) for k in base
    )  # only the adapter (and the value head) trained
    # it sampled from a merged copy that follows the trained adapter: the same logits as the policy
    assert any(float(v.abs().max()) > 0 for k, v in after.items() if "lora_B" in k)
    batch, _ = sample(
        trainer.sampler(),
        *left_pad([trainer.prompt_ids[0], trainer.prompt_ids[1]], trainer.pad_id, trainer.device),
        6,
        eos_id=None,
        pad_id=trainer.pad_id,
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        merged = response_logits(trainer.sampler(), batch)[0]
        lora = response_logits(trainer.policy, batch)[0]
        with trainer.reference_model() as reference:
            ref = response_logits(reference, batch)[0]
    assert torch.allclose(merged, lora, atol=1e-4) and not torch.allclose(merged, ref, atol=1e-4)
    # the judged checks sample the reference from the same copy holding the base weights, then restore it
    with torch.no_grad():
        with trainer.reference_sampler() as fast_reference:
            assert fast_reference is trainer.merged.model
            base_logits = response_logits(fast_reference, batch)[0]
        again = response_logits(trainer.merged.model, batch)[
            0
        ]  # restored on exit, not by a new sync
    assert torch.allclose(base_logits, ref, atol=1e-4) and torch.equal(again, merged)
    # texts are sampled from a bf16 copy where autocast is bf16: the same weights, rounded
    low = sampling_copy(trainer.merged.model, torch.bfloat16)
    assert {p.dtype for p in low.parameters()} == {torch.bfloat16}
    assert all(p.requires_grad for p in low.parameters())  # frozen bf16 weights decode 2.5x slower
    for name in trainer.merged.layers:
        assert torch.equal(
            low.get_submodule(name).weight,
            trainer.merged.model.get_submodule(name).weight.to(torch.bfloat16),
        )
    assert sampling_copy(trainer.policy, None) is trainer.policy


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_every_update_starts_at_ratio_one(tiny_gpt2, tmp_path, precision):
    """The first PPO epoch starts exactly on-policy: no clipping, approx KL ~ 0. In fp32 the sampling pass's
    log-probs (cached decoding, LM head on the last position) equal the update's full forward (LM head on
    response positions, fused GELU); with bf16 autocast (auto on a CPU with AMX) the old log-probabilities come from a
    full forward pass like the update's. Weights stay fp32."""
    reward = untrained_reward_dir(tmp_path, str(tiny_gpt2))
    cfg = PPOConfig(
        iterations=2,
        batch_size=8,
        mini_batch_size=8,
        micro_batch_size=4,
        ppo_epochs=1,
        max_new_tokens=10,
        device="cpu",
        mixed_precision=precision,
    )
    trainer = build_ppo_trainer(
        str(tiny_gpt2), str(reward), PROMPTS[:20], cfg, ModelConfig(), progress=False
    )
    assert trainer.autocast == (torch.bfloat16 if precision == "bf16" else None)
    trainer.one_step = False  # the rollout's old log-probs themselves, not the update's own
    history = trainer.train().history
    for h in history:  # one mini-batch, one epoch: the only update is at the rollout's own weights
        assert (
            h["clipfrac"] == 0.0 and abs(h["approx_kl"]) < 1e-4 and math.isfinite(h["policy_loss"])
        )
    assert all(p.dtype == torch.float32 for p in trainer.policy.parameters())
    auto = build_ppo_trainer(
        str(tiny_gpt2),
        str(reward),
        PROMPTS[:4],
        cfg.model_copy(update={"mixed_precision": "auto"}),
        ModelConfig(),
        progress=False,
    ).autocast
    assert auto == (torch.bfloat16 if has_bf16_units(torch.device("cpu")) else None)


@pytest.mark.parametrize("method", ["rloo", "grpo"])
def test_one_step_per_rollout_takes_the_old_log_probs_from_the_update(tiny_gpt2, tmp_path, method):
    """One epoch of one mini-batch (RLOO's and GRPO's default): the only optimiser step is at the
    sampling weights, so the update's own detached log-probs are the old ones, whatever the rollout
    passed, and the gradient is the one computed with old log-probs from an exact forward pass."""
    reward = untrained_reward_dir(tmp_path, str(tiny_gpt2))
    settings = {"iterations": 1, "batch_size": 8, "mini_batch_size": 8, "micro_batch_size": 4}
    cfg = (RLOOConfig if method == "rloo" else GRPOConfig)(
        **settings, max_new_tokens=8, mixed_precision="no", device="cpu"
    )
    assert cfg.ppo_epochs == 1
    grads, ratios = [], []
    for one_step in (True, False):
        trainer = build_ppo_trainer(
            str(tiny_gpt2), str(reward), PROMPTS[:20], cfg, ModelConfig(), progress=False
        )
        assert trainer.one_step
        trainer.one_step = one_step
        trainer.policy_opt.step = lambda: None  # keep the weights: compare the gradients only
        update = trainer.update

        def with_old_logprobs(batch, old, *args, trainer=trainer, update=update, one_step=one_step):
            if one_step:  # ignored
                old = torch.full_like(old, -3.0)
            else:  # exact: the update's own micro-batches, at the same weights
                with torch.no_grad():
                    old = torch.cat(
                        [
                            trainer._forward_train(batch.select(torch.arange(i, i + 4)))[0]
                            for i in (0, 4)
                        ]
                    )
            return update(batch, old, *args)

        trainer.update = with_old_logprobs
        ratios.append(trainer.step()["ratio"])
        grads.append(torch.cat([p.grad.flatten() for p in trainer.policy_params]))
    assert ratios[0] == 1.0
    assert torch.allclose(grads[0], grads[1], atol=1e-7, rtol=1e-5)


def test_the_best_judged_check_is_kept_and_patience_stops_training(tiny_gpt2, tmp_path):
    """Checks at every iteration with scripted win rates: the best one (iteration 2) is kept, and three
    checks without improvement stop the run; the policy ends with iteration 2's weights."""
    reward = untrained_reward_dir(tmp_path, str(tiny_gpt2))
    cfg = PPOConfig(
        iterations=10,
        batch_size=4,
        mini_batch_size=4,
        micro_batch_size=4,
        max_new_tokens=8,
        lr=1e-3,
        device="cpu",
        eval_every=1,
        early_stopping_patience=3,
    )
    trainer = build_ppo_trainer(
        str(tiny_gpt2), str(reward), PROMPTS[:20], cfg, ModelConfig(), progress=False
    )
    rates = iter([0.5, 0.7, 0.55, 0.7, 0.6, 0.9])
    seen = {}

    def monitor(policy, tokenizer, reference_model, sampler, reference_sampler):
        seen[trainer.iteration] = {n: p.detach().clone() for n, p in policy.named_parameters()}
        with reference_model() as reference:
            assert reference is trainer.reference
        return {"val_win_rate": next(rates)}

    trainer.monitor = monitor
    result = trainer.train()
    assert result.iterations == 5 and result.stopped_early and result.selected_iteration == 2
    assert [h.get("val_win_rate") for h in result.history] == [0.5, 0.7, 0.55, 0.7, 0.6]
    assert not torch.equal(seen[2]["transformer.wte.weight"], seen[5]["transformer.wte.weight"])
    assert all(torch.equal(p, seen[2][n]) for n, p in trainer.policy.named_parameters())
    last = cfg.model_copy(update={"select": "last", "early_stopping_patience": None})
    assert trainer.s.select == "best_judged" and last.select == "last"


def test_judge_monitor_measures_gold_proxy_and_kl(tiny_gpt2, tmp_path):
    """The real monitor (embedding judge, reward model, exact KL): the reference against itself is a
    tie at zero KL; after updates the policy differs and its KL is positive."""
    reward = untrained_reward_dir(tmp_path, str(tiny_gpt2))
    cfg = PPOConfig(
        iterations=3,
        batch_size=4,
        mini_batch_size=4,
        micro_batch_size=4,
        max_new_tokens=8,
        lr=3e-3,
        device="cpu",
        eval_every=3,
        eval_prompts=8,
        reference="adapter",
        value_model="shared",
        lora={"enabled": True, "r": 4, "alpha": 8},
    )
    trainer = build_ppo_trainer(
        str(tiny_gpt2),
        str(reward),
        PROMPTS[:20],
        cfg,
        ModelConfig(),
        judge=JudgeConfig(),
        evaluate=EvaluateConfig(max_new_tokens=8),
        val_prompts=PROMPTS[100:120],
        progress=False,
    )
    assert len(trainer.monitor.ev.prompts) == 8 and trainer.monitor.ev.s.max_new_tokens == 8
    start = trainer.monitor(trainer.policy, trainer.tokenizer, trainer.reference_model)
    assert start["val_win_rate"] == 0.5 and start["val_kl"] == pytest.approx(0.0, abs=1e-5)
    assert start["val_score"] == pytest.approx(start["val_score_reference"])
    result = trainer.train()
    check = result.history[-1]
    assert result.selected_iteration == 3 and check["val_kl"] > 0
    assert 0 <= check["val_win_rate_ci_low"] <= check["val_win_rate"] <= 1


def test_rloo_groups_answers_per_prompt_and_needs_no_value_model(tiny_gpt2, tmp_path):
    reward = untrained_reward_dir(tmp_path, str(tiny_gpt2))
    cfg = RLOOConfig(
        iterations=2,
        batch_size=8,
        mini_batch_size=8,
        micro_batch_size=4,
        max_new_tokens=8,
        device="cpu",
    )
    trainer = build_ppo_trainer(
        str(tiny_gpt2), str(reward), PROMPTS[:20], cfg, ModelConfig(), progress=False
    )
    assert trainer.value is None and trainer.value_opt is None
    idx = trainer.prompt_indices(0)
    assert len(idx) == 8 and idx[:4] == [idx[0]] * 4 and idx[4:] == [idx[4]] * 4
    history = trainer.train().history
    assert len(history) == 2 and "explained_variance" not in history[0]
    assert all(math.isfinite(h["policy_loss"]) and h["value_loss"] == 0.0 for h in history)
    assert history[-1]["non_score_reward"] != 0.0  # the KL penalty is in the reward
    with pytest.raises(ValueError, match="greater than or equal to 2"):
        RLOOConfig(samples_per_prompt=1)
    with pytest.raises(ValueError, match="multiple of samples_per_prompt"):
        PPOConfig(samples_per_prompt=3)


def test_grpo_puts_the_kl_in_the_loss_and_normalises_within_groups(tiny_gpt2, tmp_path):
    """GRPO: no value model, no KL in the reward, a k3 KL term in the loss that grows from zero
    as the policy leaves the reference, and each group's advantages centred on zero."""
    reward = untrained_reward_dir(tmp_path, str(tiny_gpt2))
    cfg = GRPOConfig(
        iterations=3,
        batch_size=8,
        mini_batch_size=8,
        micro_batch_size=4,
        ppo_epochs=1,  # the first iteration's only update starts at the reference
        max_new_tokens=8,
        lr=1e-3,
        device="cpu",
    )
    trainer = build_ppo_trainer(
        str(tiny_gpt2), str(reward), PROMPTS[:20], cfg, ModelConfig(), progress=False
    )
    assert trainer.value is None and trainer.value_opt is None
    seen = {}
    update = trainer.update

    def spy(batch, old_logprobs, old_values, advantages, *rest):
        seen["advantages"] = advantages[:, 0].clone()
        return update(batch, old_logprobs, old_values, advantages, *rest)

    trainer.update = spy
    history = trainer.train().history
    assert all(h["non_score_reward"] == 0.0 and h["value_loss"] == 0.0 for h in history)
    assert history[0]["kl_k3"] == pytest.approx(0.0, abs=1e-6)  # the policy starts at the reference
    assert history[-1]["kl_k3"] > 0.0 and history[-1]["kl"] > 0.0
    assert torch.allclose(seen["advantages"].view(2, 4).sum(1), torch.zeros(2), atol=1e-5)


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_gradient_does_not_depend_on_the_micro_batch(tiny_gpt2, tmp_path, loss_type):
    """The loss is normalised over the optimiser step's batch (dapo: its tokens; grpo: its
    answers), so accumulating 4 micro-batches of 2 gives the gradient of one batch of 8."""
    reward = untrained_reward_dir(tmp_path, str(tiny_gpt2))
    grads = []
    for micro in (8, 2):
        cfg = GRPOConfig(
            iterations=1,
            batch_size=8,
            mini_batch_size=8,
            micro_batch_size=micro,
            ppo_epochs=1,
            max_new_tokens=8,
            loss_type=loss_type,
            mixed_precision="no",  # bf16 rounds differently for other batch shapes
            device="cpu",
        )
        trainer = build_ppo_trainer(
            str(tiny_gpt2), str(reward), PROMPTS[:20], cfg, ModelConfig(), progress=False
        )
        trainer.policy_opt.step = lambda: None  # keep the weights: compare the gradients only
        trainer.step()
        grads.append(torch.cat([p.grad.flatten() for p in trainer.policy_params]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("job", ["grpo_job", "online_dpo_job"])
def test_killed_grpo_and_online_dpo_runs_resume_to_the_same_result(tiny_gpt2, tmp_path, job):
    reward = untrained_reward_dir(tmp_path, str(tiny_gpt2))
    assert_kill_and_resume_is_exact(job, [tiny_gpt2, reward], tmp_path, "iter-000002")


def test_online_dpo_judges_pairs_of_its_own_answers(tiny_gpt2, tmp_path):
    """Two answers per prompt, kept together through the shuffle; the judge's preference between
    them (asked through the label cache, so a rerun asks it nothing) is the DPO label; the first
    update starts at the reference, where the soft DPO loss is log 2 whatever the label."""
    from rlhf_core.judges.labeling import LabelCache

    reward = untrained_reward_dir(tmp_path, str(tiny_gpt2))
    cfg = OnlineDPOConfig(
        iterations=2,
        batch_size=8,
        mini_batch_size=8,
        micro_batch_size=4,
        max_new_tokens=8,
        lr=1e-3,
        mixed_precision="no",
        device="cpu",
    )
    cache = tmp_path / "labels.sqlite"

    def build():
        return build_ppo_trainer(
            str(tiny_gpt2), str(reward), PROMPTS[:20], cfg, ModelConfig(),
            label_cache=cache, progress=False,
        )  # fmt: skip

    trainer = build()
    assert trainer.value is None
    seen = []
    update = trainer.update

    def spy(batch, *args):
        seen.append((trainer.prompt_indices(trainer.iteration), args[-1].clone()))
        return update(batch, *args)

    trainer.update = spy
    history = trainer.train().history
    idx, p = seen[0]
    assert idx[0::2] == idx[1::2] and p.shape == (4,) and bool(((p >= 0) & (p <= 1)).all())
    order = trainer._order()
    assert torch.equal(order[1::2], order[0::2] + 1) and bool((order[0::2] % 2 == 0).all())
    assert history[0]["policy_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert history[-1]["kl"] > 0 and {"judge_confidence", "rewards_accuracy"} <= set(history[-1])
    judged = len(LabelCache(cache))
    assert 0 < judged <= 8
    build().train()  # the same seed: the same answers
    assert len(LabelCache(cache)) == judged  # every pair from the cache
    with pytest.raises(ValueError, match="less than or equal to 2"):
        OnlineDPOConfig(samples_per_prompt=4)
    with pytest.raises(ValueError, match="must be even"):
        OnlineDPOConfig(micro_batch_size=3, mini_batch_size=6, batch_size=6)


def test_batch_sizes_must_divide():
    with pytest.raises(ValueError, match="multiple of mini_batch_size"):
        PPOConfig(batch_size=12, mini_batch_size=8)


def _ppo(tiny_gpt2, tmp_path, prompts=PROMPTS[:40], reward=None, **overrides):
    """A small PPO run on the tiny policy that checkpoints every iteration."""
    reward = reward or untrained_reward_dir(tmp_path, str(tiny_gpt2))
    settings = {
        "iterations": 6,
        "batch_size": 8,
        "mini_batch_size": 8,
        "micro_batch_size": 8,
        "max_new_tokens": 8,
        "device": "cpu",
        "checkpoint_every": 1,
        "keep_checkpoints": 3,
    }
    cfg = PPOConfig(**{**settings, **overrides})
    return build_ppo_trainer(
        str(tiny_gpt2),
        str(reward),
        prompts,
        cfg,
        ModelConfig(),
        checkpoint_dir=tmp_path / "ckpt",
        progress=False,
    )


def test_nan_rollout_condemns_the_weights_it_sampled_from(tiny_gpt2, tmp_path):
    """A checkpoint is good once the rollout after it passed: when iteration 4's rollout is NaN,
    iteration 3's weights sampled it, so iter-3 is set aside and iter-2 is the one named; a
    rerun resumes from it."""
    trainer = _ppo(tiny_gpt2, tmp_path)
    score, calls = trainer.score, [0]

    def nan_at_fourth(batch, idx):
        calls[0] += 1
        raw, disagreement = score(batch, idx)
        return (raw * float("nan") if calls[0] == 4 else raw), disagreement

    trainer.score = nan_at_fourth
    with pytest.raises(PPODiverged) as err:
        trainer.train()
    msg = str(err.value)
    assert msg.startswith("PPO stopped at iteration 4: non-finite values in the rollout")
    assert msg.endswith(f"(last good checkpoint: {tmp_path / 'ckpt' / 'iter-000002'})")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [
        "diverged-iter-000003",
        "iter-000001",
        "iter-000002",
    ]
    again = _ppo(tiny_gpt2, tmp_path)
    assert again.train().resumed_from == 2


def test_nan_gradient_stops_before_the_weights_change(tiny_gpt2, tmp_path):
    trainer = _ppo(tiny_gpt2, tmp_path)
    trainer.train()  # six good iterations
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    trainer.s = trainer.s.model_copy(update={"iterations": 7})
    first = trainer.policy_params[0]
    first.register_hook(lambda g: g * float("nan"))
    with pytest.raises(PPODiverged, match="non-finite values in the update's gradients"):
        trainer.train(resume=False)
    assert all(torch.equal(p, before[n]) for n, p in trainer.policy.named_parameters())
    assert trainer.latest_checkpoint().name == "iter-000006"


def test_ppo_resumes_only_its_own_checkpoints(tiny_gpt2, tmp_path):
    """Other prompts, another reward model or other settings start fresh (the old checkpoints set
    aside, not deleted) with a note; the same run resumes."""
    _ppo(tiny_gpt2, tmp_path, iterations=2).train()
    same = _ppo(tiny_gpt2, tmp_path, iterations=2).train()
    assert same.resumed_from == 2 and same.resume_note is None
    other = _ppo(tiny_gpt2, tmp_path, prompts=PROMPTS[40:80], iterations=2).train()
    assert other.resumed_from is None and "another run's" in other.resume_note
    assert (tmp_path / "ckpt.previous" / "iter-000002").exists()
    # a reward model with other weights in a folder of the same name
    reward = untrained_reward_dir(tmp_path, str(tiny_gpt2))
    from rlhf_core.reward.model import load_reward_model

    rm = load_reward_model(str(reward), device="cpu")
    with torch.no_grad():
        next(rm.model.parameters()).add_(0.01)
    rm.save(reward)
    again = _ppo(tiny_gpt2, tmp_path, prompts=PROMPTS[40:80], iterations=2).train()
    assert again.resumed_from is None and again.resume_note
