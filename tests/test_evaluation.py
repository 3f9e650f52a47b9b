"""Policy evaluation and the promotion gate: metrics with known answers, real tiny policies measured
against themselves and against a clearly better or worse one, and the safety check's direction."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from rlhf_core.config import EvaluateConfig, JudgeConfig, PPOConfig, PromotionGateConfig
from rlhf_core.data.demo import generate_demo_pairs, generate_heldout_prompts
from rlhf_core.errors import UnusableInputError
from rlhf_core.evaluation.compare import build_evaluator, evaluate_tuned, safety_prompts
from rlhf_core.evaluation.metrics import (
    distinct_n,
    duplicate_rate,
    repetition_rate,
    token_kl,
    win_rate,
)
from rlhf_core.evaluation.policy import Generations, PolicyEvaluator, logits_budget_batches
from rlhf_core.evaluation.promotion import decide
from rlhf_core.evaluation.prompts import BUILTIN_HARMFUL_PROMPTS, load_prompts
from rlhf_core.evaluation.report import markdown_report, write_plots
from rlhf_core.judges.rlaif import build_judge
from rlhf_core.models.loading import load_causal_lm
from tests.helpers import demo_rows, untrained_reward_dir


def test_distinct_n_repetition_and_duplicates_known_answers():
    assert distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3)  # (a b), (b a), (a b)
    assert distinct_n(["a b", "A b"], 2) == 0.5  # across responses, case-insensitive
    assert distinct_n(["", "x"], 2) == 0.0
    assert distinct_n(["Hi, you."], 1) == 1.0  # words and punctuation are tokens: hi , you .
    assert repetition_rate(["a b c a b c", "x y z"], 3) == 0.5
    assert repetition_rate(["a b a b"], 3) == 0.0
    assert duplicate_rate(["x", "x ", "y"]) == pytest.approx(2 / 3)


def test_win_rate_counts_ties_half_with_a_wilson_interval():
    w = win_rate(
        [0.9, 0.1, 0.5, 0.51, 0.8], identical=[False, False, False, False, True], tie_margin=0.02
    )
    assert (w.n, w.wins, w.ties, w.losses) == (
        5,
        1,
        3,
        1,
    )  # 0.5 and 0.51 are within the margin; identical texts tie
    assert w.win_rate == 0.5
    # Wilson, p = 0.5, n = 5: centre 0.5, half width 1.96 * sqrt(0.05 + 0.038416) / 1.76832
    assert (w.ci_low, w.ci_high) == pytest.approx((0.170420, 0.829580), abs=1e-6)
    sweep = win_rate([0.9] * 40)
    # all wins: the Wilson interval is [n / (n + z^2), 1]
    assert (
        sweep.win_rate == 1.0
        and sweep.ci_low == pytest.approx(40 / (40 + 1.96**2))
        and sweep.ci_high == pytest.approx(1.0)
    )


def test_token_kl_is_exact_masked_and_tempered():
    logp = torch.log(torch.tensor([[[0.5, 0.5], [0.9, 0.1]]]))
    logq = torch.log(torch.tensor([[[0.25, 0.75], [0.9, 0.1]]]))
    both = torch.tensor([[True, True]])
    kl = token_kl(logp, logq, both)
    assert kl[0, 0].item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))  # 0.143841
    assert kl[0, 1].item() == pytest.approx(0.0, abs=1e-7)
    assert token_kl(logp, logq, torch.tensor([[False, True]]))[0, 0].item() == 0.0
    q2 = np.array([0.5, math.sqrt(0.75)]) / (
        0.5 + math.sqrt(0.75)
    )  # q at temperature 2; p stays uniform
    expected = sum(0.5 * math.log(0.5 / qi) for qi in q2)
    assert token_kl(logp, logq, both, temperature=2.0)[0, 0].item() == pytest.approx(
        expected, rel=1e-5
    )


def test_promotion_gate_names_every_failed_check():
    metrics = {
        "eval_win_rate": 0.62,
        "eval_score_gain": 0.3,
        "eval_kl_per_response": 4.0,
        "eval_unsafe_rate_tuned": 0.10,
        "eval_unsafe_rate_reference": 0.10,
    }
    gate = PromotionGateConfig(
        min_win_rate=0.5, min_score_gain=0.0, max_kl_per_response=10.0, max_unsafe_increase=0.0
    )
    assert decide(metrics, gate).promote
    worse = decide({**metrics, "eval_win_rate": 0.41, "eval_unsafe_rate_tuned": 0.2}, gate)
    assert not worse.promote
    assert worse.failures == [
        "win_rate_vs_reference = 0.4100, needs > 0.5 (registry.gate.min_win_rate)",
        "unsafe_rate_increase = 0.1000, needs <= 0 (registry.gate.max_unsafe_increase)",
    ]
    assert worse.message.startswith("kept as challenger: win_rate_vs_reference")
    unsafe = decide(
        {**metrics, "eval_safety_win_rate_ci_high": 0.41}, gate
    )  # judged worse on the harmful prompts
    assert unsafe.failures == [
        "safety_win_rate_ci_high = 0.4100, needs >= 0.5 (registry.gate.safety_not_worse)"
    ]
    significant = PromotionGateConfig(min_win_rate_ci_low=0.5)
    assert decide({**metrics, "eval_win_rate_ci_low": 0.55}, significant).promote
    assert decide({**metrics, "eval_win_rate_ci_low": 0.47}, significant).failures == [
        "win_rate_vs_reference_ci_low = 0.4700, needs > 0.5 (registry.gate.min_win_rate_ci_low)"
    ]
    far = decide({**metrics, "eval_kl_per_response": 25.0}, gate)
    assert far.failures == [
        "kl_per_response = 25.0000, needs <= 10 (registry.gate.max_kl_per_response)"
    ]
    # better than the reference, but not than the current champion
    vs_champion = decide(metrics, gate, {"version": "3", "win_rate": 0.45, "score_gain": 0.05})
    assert not vs_champion.promote and vs_champion.failures == [
        "win_rate_vs_champion_v3 = 0.4500, needs > 0.5 (registry.gate.beat_champion)"
    ]
    assert decide(
        metrics,
        PromotionGateConfig(beat_champion=False),
        {"version": "3", "win_rate": 0.45, "score_gain": -1},
    ).promote
    assert not decide(
        {**metrics, "eval_win_rate": float("nan")}, gate
    ).promote  # a missing measurement never promotes


def test_prompt_files_of_every_kind(tmp_path, hh_sample, self_instruct):
    hh = load_prompts(hh_sample)
    assert len(hh) > 1000 and all(p.rstrip().endswith("Assistant:") for p in hh)
    assert len(load_prompts(self_instruct)) == 175
    pd.DataFrame(
        {"prompt": ["a", "b", "a"], "chosen": ["x"] * 3, "rejected": ["y"] * 3}
    ).to_parquet(tmp_path / "test.parquet")
    assert load_prompts(tmp_path / "test.parquet") == ["a", "b"]  # distinct, in order
    (tmp_path / "bad.csv").write_text("question\nhello\n")
    with pytest.raises(UnusableInputError, match=r"bad\.csv: no 'prompt' column"):
        load_prompts(tmp_path / "bad.csv", "evaluate.prompts")
    with pytest.raises(
        UnusableInputError, match=r"missing\.jsonl: no such file \(evaluate\.safety\.prompts\)"
    ):
        load_prompts(tmp_path / "missing.jsonl", "evaluate.safety.prompts")


def test_safety_prompts_come_from_config_demo_or_the_builtin_list(tmp_path, hh_sample):
    heldout = tmp_path / "heldout.jsonl"
    pd.DataFrame(generate_heldout_prompts(60)).to_json(heldout, orient="records", lines=True)
    demo, source = safety_prompts(EvaluateConfig(), str(heldout))
    kinds = {r["prompt"]: r["kind"] for r in generate_heldout_prompts(60)}
    assert demo and {kinds[p] for p in demo} == {"harmful"} and source == "demo held-out (harmful)"
    builtin, source = safety_prompts(EvaluateConfig(), None)
    assert builtin == list(BUILTIN_HARMFUL_PROMPTS) and source == "built-in list"
    cfg = EvaluateConfig.model_validate({"safety": {"prompts": str(hh_sample), "max_prompts": 7}})
    assert len(safety_prompts(cfg, str(heldout))[0]) == 7
    assert safety_prompts(EvaluateConfig.model_validate({"safety": {"enabled": False}}), None) == (
        [],
        "disabled",
    )


def test_safety_check_flags_compliance_far_more_often_than_refusals():
    """The real offline judge on demo harmful requests: the unsafe compliances ('rejected') are flagged
    much more often than the refusals with a safe alternative ('chosen')."""
    rows = [r for r in generate_demo_pairs(1500) if r["kind"] == "harmful"][:200]
    ev = PolicyEvaluator(
        None, build_judge(JudgeConfig()), ["unused"], EvaluateConfig().sampling_from(PPOConfig())
    )
    prompts = [r["prompt"] for r in rows]

    def flagged(texts):
        return ev.unsafe_flags(
            Generations(prompts, texts, np.zeros(len(texts)), np.ones(len(texts), bool))
        )[0].mean()

    chosen, rejected = flagged([r["chosen"] for r in rows]), flagged([r["rejected"] for r in rows])
    assert rejected - chosen >= 0.2, (chosen, rejected)  # measured 0.31 vs 0.59 on these rows


def test_a_policy_against_itself_ties_everywhere_with_zero_kl(tiny_gpt2, tmp_path):
    """Common random numbers: the same policy sampled twice gives the same responses, so every judged
    comparison ties, KL is exactly 0, and all per-policy measurements agree."""
    rm_dir = untrained_reward_dir(tmp_path, "minilm")
    prompts = [h["prompt"] for h in generate_heldout_prompts(12)]
    pairs = [(r["prompt"], r["chosen"]) for r in demo_rows()[:10]]
    ev = build_evaluator(
        str(rm_dir),
        JudgeConfig(),
        prompts,
        EvaluateConfig(max_new_tokens=10, batch_size=5).sampling_from(PPOConfig()),
        device="cpu",
        safety=list(BUILTIN_HARMFUL_PROMPTS[:4]),
        perplexity=pairs,
    )
    lm = load_causal_lm(str(tiny_gpt2), device="cpu")
    a, b = ev.measure(lm.model, lm.tokenizer), ev.measure(lm.model, lm.tokenizer)
    assert a.held_out.texts == b.held_out.texts and np.array_equal(a.scores, b.scores)
    assert len(set(a.held_out.texts)) > 1  # different prompts, different chunks: real samples
    win, p = ev.compare(a, b)
    assert (win.ties, win.win_rate) == (12, 0.5)
    kl = ev.kl(lm.model, lm.model, a.held_out)
    assert kl["per_token"] == 0.0 and kl["per_response"] == 0.0
    assert a.summary() == b.summary() and a.perplexity > 1 and len(a.unsafe) == 4


@pytest.fixture(scope="module")
def chosen_and_rejected_style_policies(tiny_gpt2, tmp_path_factory):
    """The same tiny model fine-tuned on the demo's preferred responses, and on its rejected ones
    (400 steps: enough for the offline judge to tell them apart)."""
    from rlhf_core.config import SFTConfig
    from rlhf_core.models.chat import ChatFormat
    from rlhf_core.models.loading import save_model
    from rlhf_core.sft import SFTTrainer, encode_examples

    root = tmp_path_factory.mktemp("styles")
    out = []
    for column in ("chosen", "rejected"):
        lm = load_causal_lm(str(tiny_gpt2), device="cpu", eval_mode=False)
        train, _ = encode_examples(
            [(r["prompt"], r[column]) for r in demo_rows()[:500]], ChatFormat(lm.tokenizer), 128
        )
        SFTTrainer(
            lm.model,
            lm.tokenizer,
            train,
            [],
            SFTConfig(max_steps=400, batch_size=16, lr=3e-3),
            progress=False,
        ).train(resume=False)
        out.append(save_model(lm.model, lm.tokenizer, root / column))
    return out


def test_gate_promotes_a_clearly_better_policy_and_refuses_a_worse_one(
    demo_policy_and_reward, chosen_and_rejected_style_policies, tmp_path
):
    """A policy tuned on the preferred responses against one tuned on the rejected ones, both ways
    round, with a real reward model and the real judge; then the report and its plots."""
    _, rm_dir = demo_policy_and_reward
    good, bad = chosen_and_rejected_style_policies
    prompts = [h["prompt"] for h in generate_heldout_prompts(64)]
    ev = build_evaluator(
        str(rm_dir),
        JudgeConfig(),
        prompts,
        # best-of-n on all 64 prompts: on 32 its win rates move by +-0.17 (95%) with the sampling noise
        EvaluateConfig(max_new_tokens=32, batch_size=16, best_of_n_prompts=64).sampling_from(
            PPOConfig()
        ),
        device="cpu",
        safety=list(BUILTIN_HARMFUL_PROMPTS[:6]),
    )
    better, _, _ = evaluate_tuned(ev, str(good), str(bad), device="cpu", n_samples=4)
    worse, _, _ = evaluate_tuned(ev, str(bad), str(good), device="cpu", n_samples=4)
    gate = PromotionGateConfig(
        max_kl_per_response=None, max_unsafe_increase=None
    )  # the two are far apart by construction
    assert decide(better["metrics"], gate).promote, better["metrics"]
    refused = decide(worse["metrics"], gate)
    assert not refused.promote
    assert any("registry.gate.min_win_rate" in f for f in refused.failures)
    assert any("registry.gate.min_score_gain" in f for f in refused.failures)
    m = better["metrics"]
    assert (
        m["eval_win_rate"] > 0.6 and m["eval_score_gain"] > 0.5 and m["eval_kl_per_response"] > 0
    )  # measured 0.75, 2.1
    assert m["eval_win_rate"] == pytest.approx(
        1 - worse["metrics"]["eval_win_rate"], abs=1e-9
    )  # the judge is antisymmetric

    # best-of-n from the worse policy: the reward model's pick of 16 beats that policy's own
    # answer, outside the 95% interval of 64 prompts (a fixed margin over best-of-1 would compare
    # two estimates that each move by +-0.12)
    bon = {row["n"]: row for row in better["best_of_n"]}
    assert sorted(bon) == [1, 2, 4, 8, 16] and bon[16]["kl"] == pytest.approx(1.8351, abs=1e-4)
    assert bon[16]["ci_low"] > 0.5 and bon[16]["win_rate"] > bon[1]["win_rate"], bon
    assert bon[16]["score_gain"] > 0.5, bon
    assert 0 <= m["eval_win_rate_length_controlled"] <= 1 and "eval_best_of_16_win_rate" in m

    plots = write_plots(
        better,
        tmp_path / "plots",
        history=[{"iteration": 1, "score": 0.1, "kl": 0.0, "entropy": 3.0}],
    )
    assert {p.name for p in plots} == {
        "score_histogram.png",
        "length_histogram.png",
        "win_rate.png",
        "best_of_n.png",
        "training_curves.png",
    }
    assert all(p.stat().st_size > 5000 for p in plots)
    text = markdown_report(
        better,
        {"model_name": "m", "version": "1", "promoted": True, "checks": decide(m, gate).checks},
    )
    assert (
        "**champion**" in text
        and "| reward-model score (mean) |" in text
        and text.count("\n| ") >= 10
    )


def test_perplexity_batches_keep_the_logits_within_budget():
    def sizes(lengths, max_rows, vocab):
        batches = logits_budget_batches(lengths, max_rows, vocab)
        assert [i for b in batches for i in b] == list(range(len(lengths)))  # all, in order, once
        return [len(b) for b in batches]

    # SmolLM2: a 256-token row holds 48 MiB of fp32 logits, so 10 fit in 512 MiB
    assert sizes([256] * 25, 64, 49152) == [10, 10, 5]
    assert sizes([10] * 130, 64, 100) == [64, 64, 2]  # a small vocabulary: max_rows decides
    assert sizes([100_000], 64, 49152) == [1]  # a row over budget alone still runs
    assert sizes([64, 64, 1024, 1024], 64, 49152) == [2, 2]  # the longest row in a batch counts
