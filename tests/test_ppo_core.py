"""PPO maths: known answers worked by hand, and parity with TRL 1.12's own code on identical tensors."""

import inspect
import math
import textwrap
from types import SimpleNamespace

import pytest
import torch

from rlhf_core.ppo.core import (
    AdaptiveKLController,
    FixedKLController,
    explained_variance,
    gae,
    kl_estimate,
    logprobs_and_entropy,
    logprobs_from_logits,
    masked_mean,
    masked_var,
    masked_whiten,
    policy_loss,
    response_mask,
    token_rewards,
    value_loss,
)


def test_gae_by_hand():
    # one response of 3 tokens, gamma 0.9, lambda 0.8
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.4, 0.2]])
    m = torch.ones(1, 3, dtype=torch.bool)
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8)
    d2 = 1.0 - 0.2  # 0.8 (no next value after the last token)
    d1 = 0.0 + 0.9 * 0.2 - 0.4  # -0.22
    d0 = 0.0 + 0.9 * 0.4 - 0.5  # -0.14
    a2 = d2
    a1 = d1 + 0.72 * a2  # 0.356
    a0 = d0 + 0.72 * a1  # 0.11632
    assert adv[0].tolist() == pytest.approx([a0, a1, a2], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([a0 + 0.5, a1 + 0.4, a2 + 0.2], abs=1e-6)


def test_gae_ignores_padding_after_eos():
    r = torch.tensor([[0.0, 1.0, 5.0, 5.0]])
    v = torch.tensor([[0.5, 0.4, 9.0, 9.0]])  # garbage after EOS must not leak in
    m = torch.tensor([[True, True, False, False]])
    adv, ret = gae(r, v, m, gamma=1.0, lam=1.0)
    assert adv[0].tolist() == pytest.approx(
        [0.5, 0.6, 0.0, 0.0]
    )  # A_t = sum of rewards to go - V_t
    assert ret[0, :2].tolist() == pytest.approx([1.0, 1.0])


def test_kl_estimators():
    logp = torch.tensor([math.log(0.5), math.log(0.2)])
    ref = torch.tensor([math.log(0.25), math.log(0.4)])
    k1 = kl_estimate(logp, ref, "k1")
    assert k1.tolist() == pytest.approx([math.log(2), math.log(0.5)])
    k3 = kl_estimate(logp, ref, "k3")
    # q/p = 0.5 and 2: (0.5 - 1) - log 0.5 = 0.19315; (2 - 1) - log 2 = 0.30685
    assert k3.tolist() == pytest.approx([-0.5 + math.log(2), 1 - math.log(2)], abs=1e-6)
    assert (k3 >= 0).all()
    # both are unbiased: averaged over samples of p they give KL(p || q)
    p, q = torch.tensor([0.7, 0.3]), torch.tensor([0.4, 0.6])
    exact = float((p * (p / q).log()).sum())
    for est in ("k1", "k3"):
        values = kl_estimate(p.log(), q.log(), est)
        assert float((p * values).sum()) == pytest.approx(exact, abs=1e-6)
    with pytest.raises(ValueError):
        kl_estimate(logp, ref, "k2")


def test_whitening_known_answers():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    m = torch.tensor([[True, True, True, False]])
    assert float(masked_mean(x, m)) == pytest.approx(2.0)
    assert float(masked_var(x, m)) == pytest.approx(1.0)  # unbiased: ((1 + 0 + 1) / 2)
    assert float(masked_var(x, m, unbiased=False)) == pytest.approx(2 / 3)
    w = masked_whiten(x, m)
    assert w[0, :3].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    assert masked_whiten(x, m, shift_mean=False)[0, :3].tolist() == pytest.approx(
        [1.0, 2.0, 3.0], abs=1e-6
    )


def test_policy_loss_clips():
    adv = torch.tensor([[1.0, -1.0, 1.0]])
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 1.5, 0.9]]))  # ratios 1.5, 1.5, 0.9
    m = torch.ones(1, 3, dtype=torch.bool)
    loss, stats = policy_loss(new, old, adv, m, clip=0.2)
    # token 0: A>0, r=1.5 -> min(1.5, 1.2) = 1.2 -> -1.2 ; token 1: A<0, r=1.5 -> max(1.5, 1.2) * -1 -> -(-1.5) = 1.5
    # token 2: A>0, r=0.9 inside the range -> -0.9
    assert float(loss) == pytest.approx((-1.2 + 1.5 - 0.9) / 3)
    assert float(stats["clipfrac"]) == pytest.approx(1 / 3)  # only token 0 was clipped
    assert float(stats["approx_kl"]) == pytest.approx(
        0.5 * (2 * math.log(1.5) ** 2 + math.log(0.9) ** 2) / 3
    )


def test_value_loss_clips():
    old = torch.tensor([[0.0, 0.0]])
    new = torch.tensor([[1.0, 0.1]])
    ret = torch.tensor([[2.0, 0.0]])
    m = torch.ones(1, 2, dtype=torch.bool)
    loss, stats = value_loss(new, old, ret, m, clip=0.2)
    # token 0: unclipped (1-2)^2 = 1, clipped (0.2-2)^2 = 3.24 -> 3.24 ; token 1: (0.1)^2 both -> 0.01
    assert float(loss) == pytest.approx(0.5 * (3.24 + 0.01) / 2)
    assert float(stats["value_clipfrac"]) == pytest.approx(0.5)


def test_masks_stop_at_the_first_eos_and_losses_ignore_padding():
    eos = 7
    responses = torch.tensor([[3, 7, 7, 2], [3, 4, 5, 6], [7, 1, 1, 1]])
    m = response_mask(responses, eos)
    assert m.tolist() == [
        [True, True, False, False],
        [True, True, True, True],
        [True, False, False, False],
    ]
    adv = torch.ones(3, 4)
    logp = torch.zeros(3, 4)
    garbage = logp.clone()
    garbage[~m] = 50.0  # anything after EOS
    assert float(policy_loss(garbage, logp, adv, m)[0]) == pytest.approx(
        float(policy_loss(logp, logp, adv, m)[0])
    )
    scores = torch.tensor([1.0, 2.0, 3.0])
    rewards, non_score = token_rewards(scores, torch.ones(3, 4), m, beta=0.1)
    assert torch.allclose(
        rewards, torch.tensor([[-0.1, 0.9, 0, 0], [-0.1, -0.1, -0.1, 1.9], [2.9, 0, 0, 0]])
    )
    assert float(non_score.sum()) == pytest.approx(-0.1 * 7)


def test_temperature_scaling_of_logprobs_and_entropy():
    logits = torch.tensor([[[2.0, 0.0, 0.0]]])
    tok = torch.tensor([[0]])
    for t in (1.0, 0.5, 2.0):
        p0 = math.exp(2 / t) / (math.exp(2 / t) + 2)
        assert float(logprobs_from_logits(logits, tok, t)) == pytest.approx(math.log(p0), abs=1e-6)
        probs = torch.tensor([p0, (1 - p0) / 2, (1 - p0) / 2])
        assert float(logprobs_and_entropy(logits, tok, t)[1]) == pytest.approx(
            float(-(probs * probs.log()).sum()), abs=1e-6
        )
    # one log-softmax for both (the update's path): the same numbers; the entropy has a gradient only for a bonus
    x = torch.randn(2, 5, 11, requires_grad=True)
    toks = torch.randint(0, 11, (2, 5))
    lp, ent = logprobs_and_entropy(x, toks, 0.7)
    logp = torch.log_softmax(x.detach() / 0.7, -1)
    assert torch.allclose(lp, logprobs_from_logits(x, toks, 0.7)) and torch.allclose(
        ent, -(logp.exp() * logp).sum(-1)
    )
    assert lp.requires_grad and not ent.requires_grad
    _, ent = logprobs_and_entropy(x, toks, 0.7, entropy_grad=True)
    ent.sum().backward()
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_kl_controllers():
    fixed = FixedKLController(0.05)
    fixed.update(10.0, 64)
    assert fixed.beta == 0.05
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    ctl.update(12.0, 256)  # error clipped to +0.2
    assert ctl.beta == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000))
    ctl.update(3.0, 256)  # error -0.5 clipped to -0.2
    assert ctl.beta == pytest.approx(0.1 * (1 + 0.2 * 256 / 10000) * (1 - 0.2 * 256 / 10000))
    state = ctl.state_dict()
    other = AdaptiveKLController(1.0, 6.0, 10000)
    other.load_state_dict(state)
    assert other.beta == ctl.beta


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0]])
    m = torch.ones(1, 3, dtype=torch.bool)
    assert explained_variance(ret, ret, m) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.0), ret, m) == pytest.approx(0.0)


# -- parity with TRL 1.12 ---------------------------------------------------------------------------
def _trl_block(first: str, last: str) -> str:
    """Lines of TRL's PPOTrainer.train() from `first` to `last`: its maths is inline, so the test runs TRL's own text."""
    from trl.experimental.ppo import PPOTrainer

    lines = inspect.getsource(PPOTrainer.train).splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(first))
    end = next(i for i in range(start, len(lines)) if lines[i].strip().startswith(last))
    return textwrap.dedent("\n".join(lines[start : end + 1]))


def _trl_namespace(**values):
    from trl.experimental.ppo import ppo_trainer

    return {
        "torch": torch,
        "masked_mean": ppo_trainer.masked_mean,
        "masked_whiten": ppo_trainer.masked_whiten,
        **values,
    }


@pytest.fixture
def rollout():
    g = torch.Generator().manual_seed(0)
    B, T = 6, 9
    responses_len = torch.tensor([9, 4, 9, 1, 7, 9])
    mask = torch.arange(T).expand(B, T) < responses_len.unsqueeze(1)
    logprobs = -torch.rand(B, T, generator=g) * 3
    ref = -torch.rand(B, T, generator=g) * 3
    values = torch.randn(B, T, generator=g)
    scores = torch.randn(B, generator=g)
    return SimpleNamespace(
        B=B,
        T=T,
        mask=mask,
        logprobs=logprobs,
        ref=ref,
        values=values,
        scores=scores,
        lens=responses_len,
    )


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_kl_parity_with_trl(rollout, estimator):
    ns = _trl_namespace(
        logprobs=rollout.logprobs,
        ref_logprobs=rollout.ref,
        args=SimpleNamespace(kl_estimator=estimator),
    )
    exec(_trl_block("logr = ref_logprobs - logprobs", "kl = "), ns)
    assert torch.allclose(
        kl_estimate(rollout.logprobs, rollout.ref, estimator), ns["kl"], atol=1e-6
    )


def test_gae_and_whitening_parity_with_trl(rollout):
    # TRL zeroes values and rewards past the response; on identical tensors our masked GAE must agree
    m = rollout.mask
    values = rollout.values * m
    rewards, _ = token_rewards(
        rollout.scores, kl_estimate(rollout.logprobs, rollout.ref), m, beta=0.05
    )
    args = SimpleNamespace(gamma=0.99, lam=0.95)
    ns = _trl_namespace(
        values=values,
        rewards=rewards,
        responses=torch.zeros(rollout.B, rollout.T),
        args=args,
        padding_mask=~m,
    )
    exec(
        _trl_block("lastgaelam = 0", "advantages = torch.masked_fill(advantages, padding_mask, 0)"),
        ns,
    )
    adv, ret = gae(rewards, values, m, gamma=0.99, lam=0.95)
    assert torch.allclose(ret, ns["returns"], atol=1e-5)
    ours = masked_whiten(adv, m) * m
    assert torch.allclose(ours, ns["advantages"], atol=1e-5)


def test_clipped_losses_parity_with_trl(rollout):
    g = torch.Generator().manual_seed(1)
    m = rollout.mask
    new_logprobs = rollout.logprobs + 0.3 * torch.randn(rollout.B, rollout.T, generator=g)
    vpred = rollout.values + 0.5 * torch.randn(rollout.B, rollout.T, generator=g)
    returns = torch.randn(rollout.B, rollout.T, generator=g)
    adv = torch.randn(rollout.B, rollout.T, generator=g)
    idx = torch.arange(rollout.B)
    args = SimpleNamespace(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1)
    ns = _trl_namespace(
        vpred=vpred,
        mb_values=rollout.values,
        mb_return=returns,
        new_logprobs=new_logprobs,
        mb_logprobs=rollout.logprobs,
        mb_advantage=adv,
        args=args,
        padding_mask=~m,
        padding_mask_p1=~m,
        micro_batch_inds=idx,
    )
    exec(_trl_block("vpredclipped = torch.clamp(", "loss = pg_loss + args.vf_coef * vf_loss"), ns)
    pg, pg_stats = policy_loss(new_logprobs, rollout.logprobs, adv, m, clip=0.2)
    vf, vf_stats = value_loss(vpred, rollout.values, returns, m, clip=0.2)
    assert float(pg) == pytest.approx(float(ns["pg_loss"]), abs=1e-6)
    assert float(vf) == pytest.approx(float(ns["vf_loss"]), abs=1e-6)
    assert float(vf_stats["value_clipfrac"]) == pytest.approx(float(ns["vf_clipfrac"]), abs=1e-6)
    assert float(pg + 0.1 * vf) == pytest.approx(float(ns["loss"]), abs=1e-6)


def test_sampler_draws_from_the_tempered_nucleus():
    from rlhf_core.ppo.rollout import draw

    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05])).repeat(20000, 1)
    g = torch.Generator().manual_seed(0)
    tok, logp = draw(logits, 1.0, 1.0, g)
    freq = torch.bincount(tok, minlength=4).float() / len(tok)
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.012)
    assert torch.allclose(logp[0].exp(), torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=1e-6)
    tok, _ = draw(logits, 1.0, 0.8, g)  # nucleus {0.5, 0.3}: renormalised to 0.625 / 0.375
    freq = torch.bincount(tok, minlength=4).float() / len(tok)
    assert freq[2] == 0 and freq[3] == 0 and abs(float(freq[0]) - 0.625) < 0.012
    tok, _ = draw(logits, 0.5, 1.0, g)  # T = 0.5 squares the odds
    p = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    freq = torch.bincount(tok, minlength=4).float() / len(tok)
    assert torch.allclose(freq, p / p.sum(), atol=0.012)


def test_rloo_advantages_known_answers():
    from rlhf_core.ppo.core import rloo_advantages

    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 10.0, 10.0])  # two prompts, k = 3
    a = rloo_advantages(r, 3)
    # prompt 1: 1 - (2+3)/2 = -1.5, 2 - (1+3)/2 = 0, 3 - (1+2)/2 = 1.5; prompt 2: 6 - 10 = -4, 10 - 8 = 2
    assert torch.allclose(a, torch.tensor([-1.5, 0.0, 1.5, -4.0, 2.0, 2.0]))
    assert torch.allclose(a.view(2, 3).sum(1), torch.zeros(2))  # a prompt's offset cancels
    assert torch.allclose(rloo_advantages(r + 100.0, 3), a)
    with pytest.raises(ValueError, match="k >= 2"):
        rloo_advantages(r, 4)


def test_grpo_advantages_known_answers():
    from rlhf_core.ppo.core import grpo_advantages

    r = torch.tensor([1.0, 2.0, 3.0, 6.0, 10.0, 14.0])  # two prompts, k = 3
    # prompt 1: mean 2, std 1; prompt 2: mean 10, std 4
    a = grpo_advantages(r, 3, "group", eps=0.0)
    assert torch.allclose(a, torch.tensor([-1.0, 0.0, 1.0, -1.0, 0.0, 1.0]))
    assert torch.allclose(grpo_advantages(r, 3, "none"), torch.tensor([-1.0, 0, 1, -4, 0, 4]))
    batch = grpo_advantages(r, 3, "batch", eps=0.0)
    assert torch.allclose(batch, torch.tensor([-1.0, 0, 1, -4, 0, 4]) / r.std())
    assert torch.allclose(grpo_advantages(r * 3 + 7, 3, "group", eps=0.0), a)  # scale-free
    same = grpo_advantages(torch.ones(3), 3)  # a group that agrees teaches nothing
    assert torch.equal(same, torch.zeros(3))
    with pytest.raises(ValueError, match="k >= 2"):
        grpo_advantages(r, 4)


def test_grpo_token_loss_known_answers():
    """l = -min(r A, clip(r) A) + beta * (exp(q - p) - (q - p) - 1), r = exp(p - p_old)."""
    from rlhf_core.ppo.core import grpo_token_loss

    old = torch.tensor([[-1.0, -1.0, -1.0]])
    new = old + torch.tensor([[0.0, math.log(1.5), math.log(0.5)]])
    ref = torch.tensor([[-1.0, -1.0, -2.0]])
    adv = torch.tensor([[1.0, 1.0, -1.0]])
    mask = torch.tensor([[True, True, False]])
    loss, stats = grpo_token_loss(new, old, ref, adv, mask, clip=0.2, beta=0.1)
    # token 0: r = 1, A = 1, q = p: -1; token 1: r = 1.5 clipped to 1.2 for A > 0: -1.2 plus
    # beta * (exp(-log 1.5) + log 1.5 - 1); token 2 is padding
    k3 = 1 / 1.5 + math.log(1.5) - 1
    assert torch.allclose(loss, torch.tensor([[-1.0, -1.2 + 0.1 * k3, 0.0]]))
    assert float(stats["clipfrac"]) == pytest.approx(0.5)
    assert float(stats["kl_k3"]) == pytest.approx(k3 / 2)
    # a padding token the policy finds very unlikely, its reference log-prob 0: still finite
    far = new.clone()
    far[0, 2] = -200.0
    loss, _ = grpo_token_loss(far.requires_grad_(), old, ref * mask, adv, mask, beta=0.1)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(far.grad).all()


def test_repetition_penalty_is_transformers_own():
    """penalise_repeats on a known row, and the same numbers as transformers'
    RepetitionPenaltyLogitsProcessor on random logits."""
    from transformers import RepetitionPenaltyLogitsProcessor

    from rlhf_core.ppo.rollout import penalise_repeats

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    seen = torch.tensor([[True, True, False, False]])
    assert torch.equal(penalise_repeats(logits, seen, 2.0), torch.tensor([[1.0, -2.0, 0.5, 3.0]]))
    assert penalise_repeats(logits, seen, 1.0) is logits
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 50, generator=g)
    ids = torch.randint(0, 50, (3, 7), generator=g)
    seen = torch.zeros(3, 50, dtype=torch.bool)
    seen[torch.arange(3).unsqueeze(1), ids] = True
    expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    assert torch.allclose(penalise_repeats(logits, seen, 1.3), expected)
