"""Judges, the label cache, position-bias control and agreement: real encoders and models, known answers."""

import numpy as np
import pandas as pd
import pytest

from rlhf_core.config import JudgeConfig, LabelsConfig
from rlhf_core.errors import UserError
from rlhf_core.judges.base import Judge, judge_prompt, last_user_turn
from rlhf_core.judges.constitution import DEFAULT_CONSTITUTION, load_constitution
from rlhf_core.judges.labeling import LabelCache, agreement_report, label_pairs
from rlhf_core.judges.rlaif import merge_labels
from tests.helpers import demo_rows


class FirstSlotJudge(Judge):
    """A deterministic order-sensitive judge with a known position bias: it adds +0.2 to whichever
    response it sees first, on top of a content signal (longer is better)."""

    judge_id = "first-slot"
    order_sensitive = True

    def __init__(self):
        super().__init__(load_constitution())
        self.calls = 0

    def prefer(self, prompts, a, b):
        self.calls += len(prompts)
        content = np.array(
            [0.1 if len(x) > len(y) else -0.1 if len(x) < len(y) else 0.0 for x, y in zip(a, b)]
        )
        return 0.5 + content + 0.2


@pytest.fixture(scope="module")
def embedding_judge():
    from rlhf_core.judges.embedding import EmbeddingJudge

    return EmbeddingJudge(load_constitution())


def test_constitution_loads_hashes_and_rejects_bad_keys(tmp_path):
    c = load_constitution()
    assert {p.name for p in c.principles} >= {"harmless", "helpful"}
    edited = tmp_path / "c.yaml"
    edited.write_text(DEFAULT_CONSTITUTION.read_text().replace("weight: 0.5", "weight: 0.6"))
    assert load_constitution(edited).hash != c.hash
    bad = tmp_path / "bad.yaml"
    bad.write_text("principles:\n  - {name: x, text: y, wieght: 2}\n")
    with pytest.raises(UserError, match=r"principles\.0\.wieght: unknown key"):
        load_constitution(bad)
    with pytest.raises(UserError, match="constitution not found"):
        load_constitution(tmp_path / "none.yaml")


def test_judge_prompt_and_last_turn():
    c = load_constitution()
    text = judge_prompt(c, "How do I bake bread?", "Knead and bake.", "No idea.")
    assert (
        "Response A:\nKnead and bake." in text
        and "Response B:\nNo idea." in text
        and text.endswith("A or B.")
    )
    assert all(p.text in text for p in c.principles)
    assert (
        last_user_turn(
            "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how to steal a car?\n\nAssistant:"
        )
        == "how to steal a car?"
    )
    assert last_user_turn("plain request") == "plain request"


def test_embedding_judge_prefers_the_better_response(embedding_judge):
    prompts = [
        "How do I boil an egg?",
        "Can you help me pick a lock to get into my neighbour's house?",
        "What is photosynthesis?",
    ]
    good = [
        "Put the egg in boiling water for about nine minutes, then cool it in cold water.",
        "I'm sorry, I can't help you get into someone else's house. If you're locked out of your own, a locksmith can help.",
        "Photosynthesis is how plants use sunlight, water and carbon dioxide to make sugar and release oxygen.",
    ]
    bad = [
        "Why are you even asking me this? Figure it out yourself.",
        "Sure, here's how you can do it without getting caught: wait until they leave and work the pins.",
        "Well, you know, there are many many things, and um, basically it depends on lots and lots of stuff, honestly.",
    ]
    p = embedding_judge.prefer(prompts, good, bad)
    assert (p > 0.5).all(), p
    # it sees one response at a time: swapping the order gives exactly the complement
    assert np.allclose(embedding_judge.prefer(prompts, bad, good), 1 - p, atol=1e-6)
    assert np.array_equal(p, embedding_judge.prefer(prompts, good, bad))  # deterministic
    scores = embedding_judge.principle_scores(prompts, good, bad)
    assert {"harmless", "helpful", "relevance"} <= set(scores) and scores["harmless"][1] > 0


def test_label_cache_never_asks_twice(tmp_path):
    judge = FirstSlotJudge()
    cache = LabelCache(tmp_path / "cache.sqlite")
    prompts, a, b = ["p1", "p2", "p3"], ["long answer", "x", "abc"], ["short", "longer one", "xyz"]
    first = label_pairs(judge, prompts, a, b, cache=cache)
    assert first.judged == 6 and first.cache_hits == 0 and judge.calls == 6  # both orders
    second = label_pairs(judge, prompts, a, b, cache=cache)
    assert second.judged == 0 and second.cache_hits == 6 and judge.calls == 6
    assert np.array_equal(first.p, second.p)
    cache.close()
    reopened = LabelCache(tmp_path / "cache.sqlite")  # persistent across runs
    assert len(reopened) == 6
    assert label_pairs(judge, prompts, a, b, cache=reopened).judged == 0
    # a new pair, or another judge version, is asked again
    judge.version = "2"
    assert label_pairs(judge, prompts[:1], a[:1], b[:1], cache=reopened).judged == 2


def test_both_orders_cancel_position_bias():
    judge = FirstSlotJudge()
    one_way = label_pairs(
        judge, ["p", "p"], ["long answer", "same"], ["short", "same"], both_orders=False
    )
    assert one_way.p.tolist() == pytest.approx(
        [0.8, 0.7]
    )  # biased: a tie looks like a win for the first slot
    both = label_pairs(
        judge,
        ["p", "p", "p"],
        ["long answer", "same", "a much longer answer"],
        ["short", "same", "no"],
    )
    # forward 0.5 + 0.1 + 0.2 = 0.8; backward asks (b, a): 0.5 - 0.1 + 0.2 = 0.6 -> P(a > b) = 0.4; mean 0.6:
    # the bias cancels and only the content signal (0.1) is left. The tie lands exactly on 0.5.
    assert both.p.tolist() == pytest.approx([0.6, 0.5, 0.6])
    # the bias (0.2) is larger than the content signal (0.1): every winner flips with the order
    assert both.position_consistency == pytest.approx(0.0)


def test_agreement_report_known_answers():
    p_ai = np.array([0.9, 0.8, 0.3, 0.6])
    report = agreement_report(p_ai, np.ones(4))
    assert report["accuracy"] == 0.75 and report["n_pairs"] == 4
    # balanced presentation makes kappa meaningful: truth alternates T,F,T,F; ai says T,F,F,F
    assert report["cohen_kappa"] == pytest.approx(0.5)
    perfect = agreement_report(np.array([1.0, 1.0]), np.ones(2))
    assert perfect["accuracy"] == 1 and perfect["cohen_kappa"] == 1 and perfect["ece"] == 0


def test_merge_policies():
    train = pd.DataFrame({"p_chosen": [1.0, 1.0, 0.8], "label_source": ["human", "human", "ai"]})
    p_ai = np.array([0.6, 0.2, 0.9])
    assert merge_labels(train, p_ai, LabelsConfig(merge="human"))["p_chosen"].tolist() == [
        1.0,
        1.0,
        0.8,
    ]
    ai = merge_labels(train, p_ai, LabelsConfig(merge="ai"))
    assert ai["p_chosen"].tolist() == [0.6, 0.2, 0.9] and set(ai["label_source"]) == {"ai"}
    w = merge_labels(train, p_ai, LabelsConfig(merge="weighted", ai_weight=0.25))
    assert w["p_chosen"].tolist() == pytest.approx([0.9, 0.8, 0.9])


def test_hf_judge_on_a_local_model(tiny_gpt2):
    from rlhf_core.judges.hf import HFJudge, choice_token_ids

    judge = HFJudge(
        load_constitution(),
        JudgeConfig(backend="hf", model_path=str(tiny_gpt2), device="cpu", batch_size=2),
    )
    assert choice_token_ids(judge.tokenizer, "A") and choice_token_ids(judge.tokenizer, "B")
    prompts = ["How do I boil an egg?", "What is rain?", "Tell me a joke."]
    a = [
        "Boil it for nine minutes.",
        "Water falling from clouds.",
        "Why did the chicken cross the road?",
    ]
    b = ["No.", "I don't know, look it up yourself, it's a stupid question.", "Jokes are dumb."]
    p = judge.prefer(prompts, a, b)
    assert p.shape == (3,) and ((p > 0) & (p < 1)).all()
    assert np.allclose(p, judge.prefer(prompts, a, b))  # no sampling: deterministic
    # left padding with correct positions: a batch gives what one-at-a-time gives
    single = np.concatenate([judge.prefer([x], [y], [z]) for x, y, z in zip(prompts, a, b)])
    assert np.allclose(p, single, atol=1e-5)
    outcome = label_pairs(
        judge, prompts, a, b
    )  # order-sensitive: both orders, consistency reported
    assert outcome.p_backward is not None and 0 <= outcome.position_consistency <= 1
    cot = HFJudge(
        load_constitution(),
        JudgeConfig(
            backend="hf",
            model_path=str(tiny_gpt2),
            device="cpu",
            chain_of_thought=True,
            rationale_tokens=8,
        ),
    )
    assert (cot.prefer(prompts[:2], a[:2], b[:2]) > 0).all()


def test_build_judge_errors():
    from rlhf_core.judges.rlaif import build_judge

    with pytest.raises(UserError, match="needs a causal LM folder"):
        build_judge(JudgeConfig(backend="hf"))
    with pytest.raises(UserError, match="no such model folder"):
        build_judge(JudgeConfig(backend="hf", model_path="/nonexistent/model"))


@pytest.mark.shared_data
def test_embedding_judge_agreement_on_real_hh_rlhf(hh_sample):
    """The figure published in the README: the offline judge against real human labels."""
    import gzip
    import json

    from rlhf_core.data.formats import split_hh_dialogue
    from rlhf_core.judges.constitution import PROJECT_ROOT
    from rlhf_core.judges.embedding import EmbeddingJudge

    rows = [
        split_hh_dialogue(r["chosen"], r["rejected"])
        for r in map(json.loads, gzip.open(hh_sample, "rt"))
    ]
    rows = [r for r in rows if r and r[1] and r[2]][:500]
    judge = EmbeddingJudge(
        load_constitution(PROJECT_ROOT / "configs" / "constitution-harmless.yaml"),
        JudgeConfig(relevance_weight=0.0),
    )
    out = label_pairs(judge, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])
    report = agreement_report(out.p, np.ones(len(rows)))
    assert report["accuracy"] > 0.55 and report["cohen_kappa"] > 0.1, (
        report
    )  # 58.2% / 0.165 on all 1,796 pairs


def test_sampled_principles_are_drawn_by_weight_and_order_free():
    judge = FirstSlotJudge()
    judge.principle_mode = "sample"
    names = {p.name: p.weight for p in judge.constitution.principles}
    draws = [judge.principles_for(f"prompt {i}", f"a{i}", f"b{i}")[0] for i in range(4000)]
    total = sum(names.values())
    for name, w in names.items():
        assert abs(draws.count(name) / 4000 - w / total) < 0.03, name
    assert all(
        judge.principles_for(f"p{i}", f"a{i}", f"b{i}")
        == judge.principles_for(f"p{i}", f"b{i}", f"a{i}")
        for i in range(200)
    )
    assert judge.principles_for("p", "a", "b") == judge.principles_for("p", "a", "b")
    assert (
        ":sample0" in judge.label_version
    )  # sampled labels are cached apart from all-principle ones
    judge.principle_mode = "all"
    assert judge.principles_for("p", "a", "b") is None


def test_embedding_judge_with_sampled_principles(embedding_judge):
    from rlhf_core.judges.embedding import EmbeddingJudge

    sampled = EmbeddingJudge(load_constitution(), JudgeConfig(principles="sample"))
    prompts = ["Can you help me hurt my neighbour?", "How do I boil an egg?", "What is rain?"]
    a = [
        "I'm sorry, I can't help with that.",
        "Boil it for nine minutes.",
        "Water that falls from clouds.",
    ]
    b = [
        "Sure, hit them with something heavy.",
        "Go away.",
        "Well, um, it depends on lots and lots of things, honestly.",
    ]
    weights = {p.name: p.weight for p in sampled.constitution.principles}
    diffs = sampled.principle_scores(prompts, a, b)
    p = sampled.prefer(prompts, a, b)
    for i in range(3):  # known answer: only the drawn principle (plus relevance) decides
        drawn = sampled.principles_for(prompts[i], a[i], b[i])[0]
        total = weights[drawn] * diffs[drawn][i] + sampled.relevance_weight * diffs["relevance"][i]
        assert p[i] == pytest.approx(1 / (1 + np.exp(-total / sampled.temperature)), rel=1e-4)
    assert sampled.label_version != embedding_judge.label_version


def test_generate_mode_labels_new_pairs_from_the_policy(tiny_gpt2, embedding_judge):
    from rlhf_core.config import GenerateConfig
    from rlhf_core.judges.rlaif import generate_pairs, label_generated

    pairs = generate_pairs(
        str(tiny_gpt2),
        ["How do I boil an egg?", "What is rain?", "Name a fruit."],
        GenerateConfig(max_new_tokens=12, batch_size=2),
        seed=0,
    )
    assert pairs and all(a != b for _, a, b in pairs)
    three = generate_pairs(
        str(tiny_gpt2),
        ["How do I boil an egg?", "What is rain?"],
        GenerateConfig(max_new_tokens=12, batch_size=6, samples_per_prompt=3),
        seed=0,
    )
    assert len(three) == 6  # 3 samples -> 3 pairs per prompt (the tiny policy never repeats itself)
    assert pairs == generate_pairs(
        str(tiny_gpt2),
        ["How do I boil an egg?", "What is rain?", "Name a fruit."],
        GenerateConfig(max_new_tokens=12, batch_size=2),
        seed=0,
    )  # seeded
    table, per_pair, report = label_generated(
        pairs, embedding_judge, LabelsConfig(mode="generate"), cache=None
    )
    assert len(table) == len(pairs) and set(table["label_source"]) == {"ai"}
    assert (table["p_chosen"] >= 0.5).all()  # the judge's winner is 'chosen'
    assert report["mode"] == "generate" and report["n_pairs"] == len(pairs)


def test_both_mode_adds_judged_policy_samples_to_the_relabelled_pairs(tiny_gpt2, tmp_path):
    """The added pairs' responses are the policy's samples, not the data's; the data's pairs carry
    the judge's labels."""
    from rlhf_core.judges.rlaif import label_training_pairs

    rows = demo_rows()[:40]
    train = pd.DataFrame(rows).assign(p_chosen=1.0, label_source="human", margin=np.nan)
    train.to_parquet(tmp_path / "train.parquet")
    labels = LabelsConfig(
        mode="both", generate={"n_prompts": 5, "max_new_tokens": 10, "samples_per_prompt": 2}
    )
    _, table, per_pair, report = label_training_pairs(
        str(tmp_path / "train.parquet"), labels, 0, str(tiny_gpt2), tmp_path / "cache.sqlite"
    )
    data_responses = set(train["chosen"]) | set(train["rejected"])
    added = table.iloc[len(train) :]
    assert 0 < len(added) <= 5 and report["generated"]["n_pairs"] == len(added)
    assert not (set(added["chosen"]) | set(added["rejected"])) & data_responses
    assert set(added["prompt"]) <= set(train["prompt"][:5])
    assert (table.iloc[: len(train)]["label_source"] == "ai").all() and "agreement" in report
    assert len(per_pair) == len(table)


def test_unlabelled_pairs_take_the_ai_label_oriented_to_the_winner():
    train = pd.DataFrame(
        {
            "prompt": ["p1", "p2", "p3"],
            "chosen": ["a1", "a2", "h3"],
            "rejected": ["b1", "b2", "r3"],
            "p_chosen": [np.nan, np.nan, 1.0],
            "label_source": ["none", "none", "human"],
        }
    )
    out = merge_labels(train, np.array([0.8, 0.3, 0.6]), LabelsConfig(merge="human"))
    assert out["chosen"].tolist() == ["a1", "b2", "h3"] and out["rejected"].tolist() == [
        "b1",
        "a2",
        "r3",
    ]
    assert out["p_chosen"].tolist() == pytest.approx(
        [0.8, 0.7, 1.0]
    )  # human label kept under merge: human
    assert out["label_source"].tolist() == ["ai", "ai", "human"]


def test_relabel_measures_agreement_only_on_labelled_pairs():
    from rlhf_core.judges.rlaif import relabel

    train = pd.DataFrame(
        {
            "prompt": ["p1", "p2", "p3", "p4"],
            "chosen": ["long answer", "x", "a much longer one", "q"],
            "rejected": ["short", "longer one", "no", "longer"],
            "p_chosen": [1.0, 1.0, np.nan, np.nan],
            "label_source": ["human", "human", "none", "none"],
        }
    )
    table, per_pair, report = relabel(train, FirstSlotJudge(), LabelsConfig(), cache=None)
    assert report["unlabelled_pairs"] == 2 and report["agreement"]["n_pairs"] == 2
    assert (
        report["agreement"]["accuracy"] == 0.5
    )  # the judge prefers longer: right on p1, wrong on p2
    assert (
        table.loc[3, "chosen"] == "longer" and table.loc[3, "p_chosen"] > 0.5
    )  # oriented to the judge's winner
    assert set(table["label_source"]) == {"ai"}


def test_max_pairs_judges_a_seeded_random_subset_and_keeps_the_rest():
    from rlhf_core.judges.rlaif import relabel

    n = 40
    train = pd.DataFrame(
        {
            "prompt": [f"p{i}" for i in range(n)],
            "chosen": [f"a much longer answer {i}" for i in range(n)],
            "rejected": [f"short {i}" for i in range(n)],
            "p_chosen": np.full(n, 0.9),
            "label_source": ["human"] * n,
        }
    )
    cfg = LabelsConfig(max_pairs=10)
    table, per_pair, report = relabel(train, FirstSlotJudge(), cfg, cache=None, seed=3)
    assert len(per_pair) == 10 and report["judged_pairs"] == 10 and report["kept_pairs"] == 30
    judged = set(per_pair["prompt"])
    assert judged != {f"p{i}" for i in range(10)}  # not the file's first rows
    assert len(table) == n and set(table["prompt"]) == set(train["prompt"])  # nothing dropped
    kept = table[~table["prompt"].isin(judged)]
    assert (kept["label_source"] == "human").all() and (kept["p_chosen"] == 0.9).all()
    assert (table[table["prompt"].isin(judged)]["label_source"] == "ai").all()
    again = relabel(train, FirstSlotJudge(), cfg, cache=None, seed=3)[1]
    assert set(again["prompt"]) == judged  # the subset is the seed's
