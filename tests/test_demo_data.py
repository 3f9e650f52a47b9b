"""Tests for the synthetic demo preference data (rlhf_core.data.demo)."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from rlhf_core.data import demo
from rlhf_core.data.demo import generate_demo_pairs, generate_heldout_prompts, write_demo

WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")
SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return generate_demo_pairs(5000, seed=0)


def test_rows_have_expected_fields(rows: list[dict]) -> None:
    assert len(rows) == 5000
    for r in rows:
        assert set(r) == {"prompt", "chosen", "rejected", "kind"}
        assert all(isinstance(r[k], str) and r[k].strip() for k in r)
        assert not r["prompt"].startswith(("Human:", "User:"))


def test_deterministic() -> None:
    assert generate_demo_pairs(500, seed=3) == generate_demo_pairs(500, seed=3)
    assert generate_heldout_prompts(100, seed=3) == generate_heldout_prompts(100, seed=3)


def test_seed_changes_output() -> None:
    assert generate_demo_pairs(500, seed=0) != generate_demo_pairs(500, seed=1)
    assert generate_heldout_prompts(100, seed=0) != generate_heldout_prompts(100, seed=1)


def test_prompts_unique(rows: list[dict]) -> None:
    prompts = [r["prompt"] for r in rows]
    assert len(set(prompts)) == len(prompts)
    big = generate_demo_pairs(20000, seed=7)
    assert len({r["prompt"] for r in big}) == 20000


def test_whole_prompt_space_is_injective_and_split() -> None:
    # The maxima are computed as products, which is only right if no two combinations collide.
    spaces = {}
    for split in ("train", "heldout"):
        prompts = [
            demo._prompt(kind, *demo._decode(kind, split, i))
            for kind in demo._KINDS
            for i in range(demo._space(kind, split))
        ]
        spaces[split] = set(prompts)
        assert len(spaces[split]) == len(prompts)
    assert len(spaces["train"]) == demo.MAX_DEMO_PROMPTS >= 20000
    assert len(spaces["heldout"]) == demo.MAX_HELDOUT_PROMPTS >= 200
    assert not spaces["train"] & spaces["heldout"]


def test_too_many_prompts_raises_with_maximum() -> None:
    with pytest.raises(ValueError, match=str(demo.MAX_DEMO_PROMPTS)):
        generate_demo_pairs(demo.MAX_DEMO_PROMPTS + 1)
    with pytest.raises(ValueError, match=str(demo.MAX_HELDOUT_PROMPTS)):
        generate_heldout_prompts(demo.MAX_HELDOUT_PROMPTS + 1)
    with pytest.raises(ValueError):
        generate_demo_pairs(-1)
    assert generate_demo_pairs(0) == []


def test_can_exhaust_heldout_space() -> None:
    everything = generate_heldout_prompts(demo.MAX_HELDOUT_PROMPTS, seed=0)
    assert len({r["prompt"] for r in everything}) == demo.MAX_HELDOUT_PROMPTS


def test_heldout_disjoint_from_train(rows: list[dict]) -> None:
    heldout = generate_heldout_prompts(200, seed=0)
    assert len(heldout) == 200
    assert all(set(h) == {"prompt", "kind"} for h in heldout)
    assert len({h["prompt"] for h in heldout}) == 200
    assert not {h["prompt"] for h in heldout} & {r["prompt"] for r in rows}


def test_every_kind_present(rows: list[dict]) -> None:
    assert len(demo.KINDS) >= 6 and "harmful" in demo.KINDS
    counts = Counter(r["kind"] for r in rows)
    assert set(counts) == set(demo.KINDS)
    # Kinds are balanced, so even tiny data sets cover them all.
    assert max(counts.values()) - min(counts.values()) <= 1
    assert {r["kind"] for r in generate_demo_pairs(len(demo.KINDS), seed=5)} == set(demo.KINDS)
    assert {h["kind"] for h in generate_heldout_prompts(200)} == set(demo.KINDS)


def test_chosen_differs_from_rejected(rows: list[dict]) -> None:
    assert all(r["chosen"] != r["rejected"] for r in rows)


def test_no_placeholders_left(rows: list[dict]) -> None:
    texts = [r[k] for r in rows for k in ("prompt", "chosen", "rejected")]
    texts += [h["prompt"] for h in generate_heldout_prompts(500)]
    assert not [t for t in texts if "{" in t or "}" in t]
    assert not [t for t in texts if "  " in t or t != t.strip()]


def test_chosen_is_concise(rows: list[dict]) -> None:
    # Rewrite and define answers quote text, which confuses a naive sentence splitter.
    for r in rows:
        if r["kind"] in ("rewrite", "define"):
            continue
        n = len(SENTENCE_BREAK.split(r["chosen"]))
        assert 2 <= n <= 4, (n, r["chosen"])


def test_length_is_not_a_perfect_signal(rows: list[dict]) -> None:
    longer = sum(len(r["rejected"]) > len(r["chosen"]) for r in rows) / len(rows)
    assert 0.2 <= longer <= 0.8
    chosen_lengths = {len(r["chosen"]) for r in rows}
    assert max(chosen_lengths) > 2 * min(chosen_lengths)


def test_harmful_rows_refuse(rows: list[dict]) -> None:
    harmful = [r for r in rows if r["kind"] == "harmful"]
    refusal = re.compile(r"\b(can't|won't)\b help")
    assert harmful and all(refusal.search(r["chosen"]) for r in harmful)
    assert not any(refusal.search(r["rejected"]) for r in harmful)


def test_chosen_mentions_prompt_topic(rows: list[dict]) -> None:
    # Topic words are the prompt's rarer words: anything in >10% of a kind's prompts comes
    # from a template, opener or modifier rather than from the topic.
    by_kind: dict[str, list[dict]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    hits = total = 0
    for kind, group in by_kind.items():
        if kind == "harmful":
            continue
        doc_freq = Counter(w for r in group for w in set(WORD.findall(r["prompt"].lower())))
        for r in group:
            topic_words = {
                w
                for w in WORD.findall(r["prompt"].lower())
                if len(w) >= 4 and doc_freq[w] <= 0.1 * len(group)
            }
            total += 1
            hits += bool(topic_words & set(WORD.findall(r["chosen"].lower())))
    assert total > 0 and hits / total > 0.9


def test_write_demo(tmp_path) -> None:
    out = tmp_path / "nested" / "demo"
    paths = write_demo(out, n_prompts=300, n_heldout=40, seed=2)
    assert set(paths) == {"preferences", "heldout_prompts"}
    assert paths["preferences"] == out / "preferences.jsonl"
    assert paths["heldout_prompts"] == out / "heldout_prompts.jsonl"
    assert sorted(p.name for p in out.iterdir()) == ["heldout_prompts.jsonl", "preferences.jsonl"]

    prefs = [
        json.loads(line) for line in paths["preferences"].read_text(encoding="utf-8").splitlines()
    ]
    held = [
        json.loads(line)
        for line in paths["heldout_prompts"].read_text(encoding="utf-8").splitlines()
    ]
    assert len(prefs) == 300 and len(held) == 40
    assert all(set(p) == {"prompt", "chosen", "rejected", "kind"} for p in prefs)
    assert all(set(h) == {"prompt", "kind"} for h in held)
    expected = generate_demo_pairs(300, seed=2)
    assert [p["prompt"] for p in prefs] == [r["prompt"] for r in expected]
    assert not {h["prompt"] for h in held} & {p["prompt"] for p in prefs}

    # Rewriting in place replaces the files and still leaves no temp files behind.
    write_demo(out, n_prompts=10, n_heldout=5, seed=2)
    assert sorted(p.name for p in out.iterdir()) == ["heldout_prompts.jsonl", "preferences.jsonl"]
    assert len(paths["preferences"].read_text(encoding="utf-8").splitlines()) == 10


def test_write_demo_bad_request_leaves_nothing(tmp_path) -> None:
    out = tmp_path / "demo"
    with pytest.raises(ValueError):
        write_demo(out, n_prompts=demo.MAX_DEMO_PROMPTS + 1)
    assert not out.exists()


def test_tables_load_as_tuples() -> None:
    # JSON gives lists; the frozen _Kind must still hold tuples so it stays hashable.
    hash(demo._KINDS)
    assert all(isinstance(m, tuple) for k in demo._KINDS for m in k.modifiers + k.topics)
