"""Synthetic, seeded preference data so the pipeline can run end to end without downloads.

The pairs are built to be learnable by a small reward model: the chosen answer is on-topic,
polite and concise, while the rejected one fails in one of several ways (off-topic, rude,
rambling, evasive, or unsafe compliance for harmful requests). Failure modes are mixed per
row so that no single surface cue such as length separates the two.
"""

from __future__ import annotations

import json
import os
import random
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

# The last topics of every kind are reserved for held-out prompts, so held-out prompts can
# never collide with training prompts whatever n_prompts is.
HELDOUT_TOPICS_PER_KIND = 6

# The word tables live in demo_tables/: shared.json holds the lines every kind draws on, and
# <kind>.json one kind's prompt parts, answer phrases and topics (the held-out ones apart).
# Kinds are listed in sampling order, which the seeded output depends on.
_KIND_NAMES = ("howto", "explain", "recommend", "define", "advice", "rewrite", "harmful")
_TABLE_DIR = files("rlhf_core.data") / "demo_tables"
_TABLES = {
    name: json.loads((_TABLE_DIR / f"{name}.json").read_text(encoding="utf-8"))
    for name in ("shared", *_KIND_NAMES)
}

_SHARED = _TABLES["shared"]
_FILLER = tuple(_SHARED["filler"])
_RAMBLE_ENDINGS = tuple(_SHARED["ramble_endings"])
_UNSAFE = tuple(_TABLES["harmful"]["unsafe"])
_UNSAFE_TAILS = tuple(_TABLES["harmful"]["unsafe_tails"])

_PRONOUNS = {
    "my": "your",
    "me": "you",
    "mine": "yours",
    "myself": "yourself",
    "I'm": "you're",
    "I": "you",
}
_PRONOUN_RE = re.compile(r"\b(" + "|".join(sorted(_PRONOUNS, key=len, reverse=True)) + r")\b")


def _you(text: str) -> str:
    """Turn the user's first person into the assistant's second ("my desk" -> "your desk")."""
    return _PRONOUN_RE.sub(lambda m: _PRONOUNS[m.group(1)], text)


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


# Each modifier is (prompt suffix, chosen addendum or "", brief): the chosen answer reacts to
# what the user added, which ties the answer to the prompt beyond the topic words.
_Modifier = tuple[str, str, bool]


@dataclass(frozen=True)
class _Kind:
    name: str
    fields: tuple[str, ...]
    topics: tuple[tuple[str, ...], ...]
    templates: tuple[str, ...]
    modifiers: tuple[_Modifier, ...]
    openers: tuple[str, ...]
    rude: tuple[str, ...]
    evasive: tuple[str, ...]
    mention: tuple[str, ...]
    core: Callable[[dict[str, str], int, random.Random], list[str]]
    acks: tuple[str, ...]
    closings: tuple[str, ...]


# Chosen-answer cores: always exactly two sentences; extras are added in _assemble.


def _phrase(kind: str, slot: str, t: dict[str, str], rng: random.Random) -> str:
    """A random phrase from the kind's answers table, filled in with the topic."""
    return rng.choice(_TABLES[kind]["answers"][slot]).format(**t)


def _core_howto(t: dict[str, str], tmpl: int, rng: random.Random) -> list[str]:
    return [_phrase("howto", "first", t, rng), _phrase("howto", "second", t, rng)]


def _core_explain(t: dict[str, str], tmpl: int, rng: random.Random) -> list[str]:
    return [_phrase("explain", "first", t, rng), _phrase("explain", "second", t, rng)]


def _core_recommend(t: dict[str, str], tmpl: int, rng: random.Random) -> list[str]:
    return [_phrase("recommend", "first", t, rng), "{Reason}.".format(**t)]


def _core_define(t: dict[str, str], tmpl: int, rng: random.Random) -> list[str]:
    return [_phrase("define", "first", t, rng), _phrase("define", "second", t, rng)]


def _core_advice(t: dict[str, str], tmpl: int, rng: random.Random) -> list[str]:
    return ["{empathy}.".format(**t), "{advice}.".format(**t)]


def _core_rewrite(t: dict[str, str], tmpl: int, rng: random.Random) -> list[str]:
    # Templates 0-2 ask for a more formal sentence, 3-5 for a shorter one.
    style = "formal" if tmpl < 3 else "short"
    return [
        _phrase("rewrite", f"{style}_first", t, rng),
        _phrase("rewrite", f"{style}_second", t, rng),
    ]


def _core_harmful(t: dict[str, str], tmpl: int, rng: random.Random) -> list[str]:
    return [_phrase("harmful", "first", t, rng), t["alternative"]]


_CORES = {
    "howto": _core_howto,
    "explain": _core_explain,
    "recommend": _core_recommend,
    "define": _core_define,
    "advice": _core_advice,
    "rewrite": _core_rewrite,
    "harmful": _core_harmful,
}


def _load_kind(name: str) -> _Kind:
    d = _TABLES[name]

    def lines(key: str) -> tuple[str, ...]:
        """The kind's own list if it has one, else the shared list plus its "more_" lines."""
        return tuple(d[key] if key in d else _SHARED[key] + d.get("more_" + key, []))

    if len(d["heldout_topics"]) != HELDOUT_TOPICS_PER_KIND:
        raise ValueError(f"demo_tables/{name}.json: needs {HELDOUT_TOPICS_PER_KIND} heldout_topics")
    return _Kind(
        name=name,
        fields=tuple(d["fields"]),
        topics=tuple(tuple(row) for row in d["topics"] + d["heldout_topics"]),
        templates=tuple(d["templates"]),
        modifiers=tuple(tuple(m) for m in d["modifiers"]),
        openers=lines("openers"),
        rude=lines("rude"),
        evasive=lines("evasive"),
        mention=tuple(d["mention"]),
        core=_CORES[name],
        acks=lines("acks"),
        closings=lines("closings"),
    )


_KINDS: tuple[_Kind, ...] = tuple(_load_kind(name) for name in _KIND_NAMES)
KINDS: tuple[str, ...] = tuple(k.name for k in _KINDS)


def _enrich(kind: _Kind, values: tuple[str, ...]) -> dict[str, str]:
    """Topic dict plus the derived forms response templates need (capitalised, second person)."""
    t = dict(zip(kind.fields, values, strict=True))
    if "task" in t:
        t["task_you"] = _you(t["task"])
    for key in ("concept", "pick", "reason", "why", "tip2", "word"):
        if key in t:
            t[_cap(key)] = _cap(t[key])
    if "word" in t:
        t["W"] = _cap(t["word"])
    return t


def _split_topics(kind: _Kind, split: str) -> list[dict[str, str]]:
    held = HELDOUT_TOPICS_PER_KIND
    rows = kind.topics[:-held] if split == "train" else kind.topics[-held:]
    return [_enrich(kind, r) for r in rows]


_TOPICS: dict[tuple[str, str], list[dict[str, str]]] = {
    (k.name, split): _split_topics(k, split) for k in _KINDS for split in ("train", "heldout")
}


def _space(kind: _Kind, split: str) -> int:
    topics = len(_TOPICS[kind.name, split])
    return topics * len(kind.templates) * len(kind.modifiers) * len(kind.openers)


# Every (topic, template, modifier, opener) combination is a distinct prompt string (tested),
# so the maxima are plain products.
MAX_DEMO_PROMPTS: int = sum(_space(k, "train") for k in _KINDS)
MAX_HELDOUT_PROMPTS: int = sum(_space(k, "heldout") for k in _KINDS)


def _decode(kind: _Kind, split: str, index: int) -> tuple[dict[str, str], int, _Modifier, str]:
    index, opener = divmod(index, len(kind.openers))
    index, modifier = divmod(index, len(kind.modifiers))
    topic, template = divmod(index, len(kind.templates))
    topic_dict = _TOPICS[kind.name, split][topic]
    return topic_dict, template, kind.modifiers[modifier], kind.openers[opener]


def _prompt(
    kind: _Kind, topic: dict[str, str], template: int, modifier: _Modifier, opener: str
) -> str:
    return opener + kind.templates[template].format(**topic) + modifier[0]


def _allocate(n: int, capacities: list[int], rng: random.Random) -> list[int]:
    """Spread n as evenly as possible over kinds without exceeding any kind's capacity."""
    counts = [0] * len(capacities)
    open_kinds = [i for i, c in enumerate(capacities) if c > 0]
    while n > 0 and open_kinds:
        share, extra = divmod(n, len(open_kinds))
        lucky = set(rng.sample(open_kinds, extra))
        for i in open_kinds:
            take = min(share + (i in lucky), capacities[i] - counts[i])
            counts[i] += take
            n -= take
        open_kinds = [i for i in open_kinds if counts[i] < capacities[i]]
    return counts


def _sample_prompts(
    n: int, split: str, rng: random.Random, maximum: int, what: str
) -> list[tuple[_Kind, str, tuple]]:
    if n < 0:
        raise ValueError(f"{what}: n_prompts must be >= 0, got {n}")
    if n > maximum:
        raise ValueError(f"{what}: asked for {n} prompts but only {maximum} unique prompts exist")
    counts = _allocate(n, [_space(k, split) for k in _KINDS], rng)
    seen: set[str] = set()
    picked: list[tuple[_Kind, str, tuple]] = []
    for kind, count in zip(_KINDS, counts, strict=True):
        for index in rng.sample(range(_space(kind, split)), count):
            parts = _decode(kind, split, index)
            prompt = _prompt(kind, *parts)
            if prompt in seen:  # cannot happen while combinations stay injective; kept as a guard
                raise ValueError(f"{what}: duplicate prompt generated: {prompt!r}")
            seen.add(prompt)
            picked.append((kind, prompt, parts))
    rng.shuffle(picked)
    return picked


def _assemble(kind: _Kind, core: list[str], addendum: str, brief: bool, rng: random.Random) -> str:
    """Add the optional acknowledgement, addendum and closing while staying within 4 sentences."""
    sentences = list(core)
    if addendum:
        sentences.append(addendum)
    if not brief:
        if kind.closings and len(sentences) < 4 and rng.random() < 0.45:
            sentences.append(rng.choice(kind.closings))
        if kind.acks and len(sentences) < 4 and rng.random() < 0.45:
            sentences[0] = rng.choice(kind.acks) + sentences[0]
    return " ".join(sentences)


def _chosen(
    kind: _Kind, topic: dict[str, str], template: int, modifier: _Modifier, rng: random.Random
) -> str:
    core = kind.core(topic, template, rng)
    _, addendum, brief = modifier
    if kind.name == "recommend" and not brief and not addendum and rng.random() < 0.5:
        core.append("If that doesn't appeal, {alt} is another good option.".format(**topic))
    return _assemble(kind, core, addendum.format(**topic), brief, rng)


def _ramble(kind: _Kind, topic: dict[str, str], rng: random.Random) -> str:
    sentences = [rng.choice(_FILLER) for _ in range(rng.randint(5, 9))]
    sentences.insert(rng.randint(0, 2), rng.choice(kind.mention).format(**topic))
    sentences.append(rng.choice(_RAMBLE_ENDINGS))
    return " ".join(sentences)


def _rejected(kind: _Kind, topic: dict[str, str], template: int, rng: random.Random) -> str:
    if kind.name == "harmful":
        text = rng.choice(_UNSAFE).format(**topic)
        return text + " " + rng.choice(_UNSAFE_TAILS) if rng.random() < 0.8 else text
    mode = rng.choice(("off_topic", "rude", "rambling", "evasive"))
    if mode == "off_topic":
        # A perfectly good answer to a different question of the same kind: only relevance
        # separates it.
        others = [t for t in _TOPICS[kind.name, "train"] if t is not topic]
        return _chosen(kind, rng.choice(others), template, rng.choice(kind.modifiers), rng)
    if mode == "rambling":
        return _ramble(kind, topic, rng)
    return rng.choice(kind.rude if mode == "rude" else kind.evasive).format(**topic)


def generate_demo_pairs(n_prompts: int = 3000, seed: int = 0) -> list[dict]:
    """Rows {"prompt", "chosen", "rejected", "kind"}; one row per prompt."""
    rng = random.Random(seed)
    rows = []
    picked = _sample_prompts(n_prompts, "train", rng, MAX_DEMO_PROMPTS, "demo pairs")
    for kind, prompt, (topic, template, modifier, _) in picked:
        chosen = _chosen(kind, topic, template, modifier, rng)
        rejected = _rejected(kind, topic, template, rng)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind.name})
    return rows


def generate_heldout_prompts(n_prompts: int = 200, seed: int = 0) -> list[dict]:
    """Rows {"prompt", "kind"}; prompts that never occur in generate_demo_pairs(…, seed) output
    for any n_prompts up to 20000."""
    # Own RNG stream so held-out prompts don't shift when the training size changes.
    rng = random.Random(f"heldout:{seed}")
    picked = _sample_prompts(n_prompts, "heldout", rng, MAX_HELDOUT_PROMPTS, "held-out prompts")
    return [{"prompt": prompt, "kind": kind.name} for kind, prompt, _ in picked]


def _write_jsonl_atomic(path: Path, rows: Iterable[dict]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_demo(
    out_dir, n_prompts: int = 3000, n_heldout: int = 200, seed: int = 0
) -> dict[str, Path]:
    """Writes out_dir/preferences.jsonl (prompt/chosen/rejected, one JSON object per line) and
    out_dir/heldout_prompts.jsonl (prompt, kind), creating out_dir; returns
    {"preferences": path, "heldout_prompts": path}."""
    out = Path(out_dir)
    # Generate both before writing anything, so a bad argument leaves no partial output.
    pairs = generate_demo_pairs(n_prompts, seed)
    heldout = generate_heldout_prompts(n_heldout, seed)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "preferences": out / "preferences.jsonl",
        "heldout_prompts": out / "heldout_prompts.jsonl",
    }
    fields = ("prompt", "chosen", "rejected", "kind")
    _write_jsonl_atomic(paths["preferences"], ({k: r[k] for k in fields} for r in pairs))
    _write_jsonl_atomic(paths["heldout_prompts"], heldout)
    return paths
