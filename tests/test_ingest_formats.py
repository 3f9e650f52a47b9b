"""Ingest of every supported source kind and preference format (rlhf_core.data.readers / formats / pipeline).

Everything here is real: files written into tmp_path, real parquet, real `datasets` folders, and a real
S3 server (SeaweedFS on loopback). Each test reads the stage outputs back from disk.
"""

from __future__ import annotations

import csv
import gzip
import json
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rlhf_core.config import ColumnMap, DataConfig, S3Config, SourceConfig
from rlhf_core.data.dataset import ingest_sources, validate_normalised
from rlhf_core.data.formats import HH_ASSISTANT, detect_format, split_hh_dialogue
from rlhf_core.errors import UnusableInputError

# -- helpers ----------------------------------------------------------------------------------

KEYS = ["prompt", "chosen", "rejected", "label_source", "p_chosen", "margin", "source_row"]

# Content chosen to stress quoting: commas, double quotes, non-ASCII, emoji, backslashes (no newlines, so a
# CSV record is exactly one line and source_row is the same for every source kind).
PAIRS = [
    {
        "prompt": "Say hello, politely.",
        "chosen": "Hello, how can I help?",
        "rejected": "What.",
        "label_source": "human",
        "p_chosen": 1.0,
        "margin": 2.5,
    },
    {
        "prompt": 'He said "hi" to me',
        "chosen": 'Reply "hi" back',
        "rejected": "Ignore him",
        "label_source": "human",
        "p_chosen": 0.75,
        "margin": 1.0,
    },
    {
        "prompt": "Café naïve — ünïcödé ✓ 🙂",
        "chosen": "Ça va très bien",
        "rejected": "nope",
        "label_source": "ai",
        "p_chosen": 0.6,
        "margin": 0.5,
    },
    {
        "prompt": r"A path C:\temp\x",
        "chosen": "Use a raw string",
        "rejected": "Use one backslash",
        "label_source": "human",
        "p_chosen": 1.0,
        "margin": 3.0,
    },
    {
        "prompt": "Name a colour",
        "chosen": "Blue",
        "rejected": "Seven",
        "label_source": "ai",
        "p_chosen": 0.9,
        "margin": 0.25,
    },
]
EXPECTED_PAIRS = [{**p, "source_row": i} for i, p in enumerate(PAIRS, start=1)]


def write_jsonl(path: Path, rows: list, gz: bool = False) -> Path:
    data = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


def write_lines(path: Path, lines: list[bytes | str]) -> Path:
    path.write_bytes(b"".join((ln.encode() if isinstance(ln, str) else ln) + b"\n" for ln in lines))
    return path


def write_csv(path: Path, rows: list[dict], gz: bool = False) -> Path:
    header = list(rows[0])
    opener = (
        (lambda: gzip.open(path, "wt", encoding="utf-8", newline=""))
        if gz
        else (lambda: open(path, "w", encoding="utf-8", newline=""))
    )
    with opener() as fh:
        w = csv.writer(fh)
        w.writerow(header)
        for r in rows:
            w.writerow([r[h] for h in header])
    return path


def write_parquet(path: Path, rows: list[dict], gz: bool = False) -> Path:
    plain = path.with_name(path.name.removesuffix(".gz"))
    pd.DataFrame(rows).to_parquet(plain, index=False)
    if gz:
        path.write_bytes(gzip.compress(plain.read_bytes()))
        plain.unlink()
    return path


def write_dataset(path: Path, rows: list[dict]) -> Path:
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(path))
    return path


def read_failures(out: Path) -> list[dict]:
    text = (out / "ingest_failures.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def ingest(tmp_path: Path, path, *, chunk_rows: int = 1000, out_name: str = "ingest", **source_kw):
    """Run ingest on one source; return (report, normalised frame, failures sorted by source_row)."""
    out = tmp_path / out_name
    report = ingest_sources([SourceConfig(path=str(path), **source_kw)], out, chunk_rows=chunk_rows)
    frame = pd.read_parquet(out / "normalised.parquet")
    failures = sorted(read_failures(out), key=lambda f: f["source_row"])
    return report, frame, failures


def records(frame: pd.DataFrame, keys=KEYS) -> list[dict]:
    out = []
    for rec in frame[keys].to_dict("records"):
        rec = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in rec.items()}
        rec["source_row"] = int(rec["source_row"])
        out.append(rec)
    return out


def triples(frame: pd.DataFrame) -> list[tuple[str, str, str]]:
    return list(zip(frame["prompt"], frame["chosen"], frame["rejected"]))


def no_partials(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".partial-" in p.name]


# -- pairwise through every source kind -----------------------------------------------------


def _make_source(kind: str, tmp_path: Path) -> Path:
    if kind == "jsonl":
        return write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    if kind == "ndjson":
        return write_jsonl(tmp_path / "pairs.ndjson", PAIRS)
    if kind == "jsonl.gz":
        return write_jsonl(tmp_path / "pairs.jsonl.gz", PAIRS, gz=True)
    if kind == "json-list":
        p = tmp_path / "pairs.json"
        p.write_text(json.dumps(PAIRS, ensure_ascii=False))
        return p
    if kind == "json-data":
        p = tmp_path / "pairs.json"
        p.write_text(json.dumps({"version": 2, "data": PAIRS}, ensure_ascii=False, indent=2))
        return p
    if kind == "json-lines-in-.json":
        return write_jsonl(tmp_path / "pairs.json", PAIRS)
    if kind == "csv":
        return write_csv(tmp_path / "pairs.csv", PAIRS)
    if kind == "csv.gz":
        return write_csv(tmp_path / "pairs.csv.gz", PAIRS, gz=True)
    if kind == "parquet":
        return write_parquet(tmp_path / "pairs.parquet", PAIRS)
    if kind == "parquet.gz":
        return write_parquet(tmp_path / "pairs.parquet.gz", PAIRS, gz=True)
    if kind == "datasets":
        return write_dataset(tmp_path / "pairs_ds", PAIRS)
    raise AssertionError(kind)


def expected_for(path: Path) -> list[dict]:
    """Line-oriented CSV counts the header line: its records start on line 2; every other kind starts at 1."""
    shift = 1 if ".csv" in path.name else 0
    return [{**r, "source_row": r["source_row"] + shift} for r in EXPECTED_PAIRS]


SOURCE_KINDS = [
    "jsonl",
    "ndjson",
    "jsonl.gz",
    "json-list",
    "json-data",
    "json-lines-in-.json",
    "csv",
    "csv.gz",
    "parquet",
    "parquet.gz",
    "datasets",
]


@pytest.mark.parametrize("kind", SOURCE_KINDS)
def test_pairwise_source_kinds_give_identical_rows(kind: str, tmp_path: Path) -> None:
    path = _make_source(kind, tmp_path)
    report, frame, failures = ingest(tmp_path, path)
    assert failures == []
    assert report["records"] == len(PAIRS) and report["pairs"] == len(PAIRS)
    assert report["sources"][0]["format"] == "pairwise"
    assert report["sources"][0]["path"] == str(path)
    assert records(frame) == expected_for(path)
    assert set(frame["source"]) == {str(path)}
    assert list(frame.columns) == [
        "prompt",
        "chosen",
        "rejected",
        "label_source",
        "p_chosen",
        "margin",
        "source",
        "source_row",
    ]
    # the report on disk is the returned one
    assert json.loads((tmp_path / "ingest" / "report.json").read_text()) == report


def test_all_source_kinds_in_one_ingest(tmp_path: Path) -> None:
    """Several sources in one run: rows appended in source order, counts summed, each row tagged with its source."""
    paths = []
    for kind in SOURCE_KINDS:
        sub = tmp_path / kind.replace(".", "_")
        sub.mkdir()
        paths.append(_make_source(kind, sub))
    out = tmp_path / "ingest"
    report = ingest_sources([SourceConfig(path=str(p)) for p in paths], out, chunk_rows=2)
    frame = pd.read_parquet(out / "normalised.parquet")
    assert report["pairs"] == report["records"] == len(PAIRS) * len(paths)
    assert [s["pairs"] for s in report["sources"]] == [len(PAIRS)] * len(paths)
    for p in paths:
        assert records(frame[frame["source"] == str(p)]) == expected_for(p)


def test_datasetdict_split_is_selected(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    train = [{"prompt": f"train {i}", "chosen": "good", "rejected": "bad"} for i in range(3)]
    test = [{"prompt": f"test {i}", "chosen": "yes", "rejected": "no"} for i in range(2)]
    folder = tmp_path / "dd"
    DatasetDict({"train": Dataset.from_list(train), "test": Dataset.from_list(test)}).save_to_disk(
        str(folder)
    )

    _, frame, _ = ingest(tmp_path, folder, split="test", out_name="test")
    assert triples(frame) == [("test 0", "yes", "no"), ("test 1", "yes", "no")]
    assert frame["source_row"].tolist() == [1, 2]

    # without a split, 'train' is the default when present
    _, frame, _ = ingest(tmp_path, folder, out_name="default")
    assert [t[0] for t in triples(frame)] == ["train 0", "train 1", "train 2"]

    with pytest.raises(UnusableInputError, match=r"no split 'validation'"):
        ingest(tmp_path, folder, split="validation", out_name="missing")


def test_datasetdict_without_train_needs_a_split(tmp_path: Path) -> None:
    from datasets import Dataset, DatasetDict

    folder = tmp_path / "dd"
    DatasetDict(
        {"a": Dataset.from_list(PAIRS[:1]), "b": Dataset.from_list(PAIRS[1:3])}
    ).save_to_disk(str(folder))
    with pytest.raises(UnusableInputError, match=r"several splits .*'split'"):
        ingest(tmp_path, folder)
    _, frame, _ = ingest(tmp_path, folder, split="b", out_name="b")
    assert records(frame) == [{**PAIRS[1], "source_row": 1}, {**PAIRS[2], "source_row": 2}]


# -- S3 -------------------------------------------------------------------------------------------


def test_s3_jsonl_matches_local(s3_env, tmp_path: Path) -> None:
    key = f"pairs-{uuid.uuid4().hex[:8]}.jsonl"
    local = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    s3_env.client().put_object(Bucket="prefs", Key=key, Body=local.read_bytes())
    uri = f"s3://prefs/{key}"
    out = tmp_path / "ingest"
    report = ingest_sources(
        [SourceConfig(path=uri)],
        out,
        chunk_rows=1000,
        s3=S3Config(endpoint_url=s3_env.endpoint_url),
        cache_dir=tmp_path / "s3cache",
    )
    frame = pd.read_parquet(out / "normalised.parquet")
    assert report["sources"][0]["path"] == uri and report["sources"][0]["format"] == "pairwise"
    assert records(frame) == EXPECTED_PAIRS
    assert set(frame["source"]) == {uri}
    # downloaded once into the cache folder given
    cached = [p for p in (tmp_path / "s3cache").rglob("*") if p.is_file()]
    assert [p.name for p in cached] == [key]
    assert cached[0].read_bytes() == local.read_bytes()


def test_s3_gz_parquet_object(s3_env, tmp_path: Path) -> None:
    key = f"nested/dir/pairs-{uuid.uuid4().hex[:8]}.parquet.gz"
    local = write_parquet(tmp_path / "pairs.parquet.gz", PAIRS, gz=True)
    s3_env.client().put_object(Bucket="prefs", Key=key, Body=local.read_bytes())
    out = tmp_path / "ingest"
    ingest_sources(
        [SourceConfig(path=f"s3://prefs/{key}")],
        out,
        s3=S3Config(endpoint_url=s3_env.endpoint_url),
        cache_dir=tmp_path / "s3cache",
    )
    assert records(pd.read_parquet(out / "normalised.parquet")) == EXPECTED_PAIRS


def test_s3_missing_key_is_unusable_input(s3_env, tmp_path: Path) -> None:
    uri = f"s3://prefs/does-not-exist-{uuid.uuid4().hex[:8]}.jsonl"
    out = tmp_path / "ingest"
    with pytest.raises(UnusableInputError) as info:
        ingest_sources(
            [SourceConfig(path=uri)],
            out,
            s3=S3Config(endpoint_url=s3_env.endpoint_url),
            cache_dir=tmp_path / "s3cache",
        )
    msg = str(info.value)
    assert uri in msg
    assert "\n" not in msg
    assert "no such object" in msg
    assert not out.exists() and no_partials(tmp_path)


# -- HH dialogues -----------------------------------------------------------------------------------


def test_split_hh_single_turn_known_answer() -> None:
    chosen = "\n\nHuman: What is 2+2?\n\nAssistant:  It is 4. "
    rejected = "\n\nHuman: What is 2+2?\n\nAssistant: \n\t5, obviously."
    assert split_hh_dialogue(chosen, rejected) == (
        "\n\nHuman: What is 2+2?\n\nAssistant:",
        "It is 4. ",
        "5, obviously.",
    )


def test_split_hh_multi_turn_known_answer() -> None:
    prefix = (
        "\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke\n\nAssistant:"
    )
    assert split_hh_dialogue(prefix + " Why did the chicken cross the road?", prefix + " No.") == (
        prefix,
        "Why did the chicken cross the road?",
        "No.",
    )
    # the chosen dialogue goes on for more turns: the prompt is still the last SHARED '...Assistant:'
    longer = prefix + " Sure.\n\nHuman: thanks\n\nAssistant: You're welcome"
    assert split_hh_dialogue(longer, prefix + " No.") == (
        prefix,
        "Sure.\n\nHuman: thanks\n\nAssistant: You're welcome",
        "No.",
    )
    # replies that start with the same words do not extend the prompt
    assert split_hh_dialogue(prefix + " Yes, I can.", prefix + " Yes, but no.") == (
        prefix,
        "Yes, I can.",
        "Yes, but no.",
    )


def test_split_hh_no_shared_prompt() -> None:
    assert split_hh_dialogue("\n\nHuman: A\n\nAssistant: x", "\n\nHuman: B\n\nAssistant: y") is None
    assert split_hh_dialogue("no markers at all", "no markers at all either") is None
    assert split_hh_dialogue("", "") is None


def test_hh_ingest_known_answers_and_no_shared_prompt(tmp_path: Path) -> None:
    p1 = "\n\nHuman: How do I boil an egg?\n\nAssistant:"
    p2 = "\n\nHuman: Hi\n\nAssistant: Hello.\n\nHuman: What's the capital of France?\n\nAssistant:"
    rows = [
        {
            "chosen": p1 + " Put it in boiling water for 8 minutes.",
            "rejected": p1 + " Microwave it.",
        },
        {"chosen": p2 + " Paris.", "rejected": p2 + "  Lyon."},
        {"chosen": "\n\nHuman: A\n\nAssistant: yes", "rejected": "\n\nHuman: B\n\nAssistant: no"},
    ]
    path = write_jsonl(tmp_path / "hh.jsonl", rows)
    report, frame, failures = ingest(tmp_path, path)
    assert report["sources"][0]["format"] == "hh"
    assert triples(frame) == [
        (p1, "Put it in boiling water for 8 minutes.", "Microwave it."),
        (p2, "Paris.", "Lyon."),
    ]
    assert frame["source_row"].tolist() == [1, 2]
    assert len(failures) == 1
    assert failures[0]["source_row"] == 3
    assert failures[0]["stage"] == "ingest"
    assert "no shared prompt" in failures[0]["reasons"][0]
    assert failures[0]["record"] == rows[2]

    report = validate_normalised(
        tmp_path / "ingest", tmp_path / "valid", DataConfig(), enforce=False
    )
    assert (
        report["valid"] == 2 and report["quarantined"] == 1 and report["quarantined_at_ingest"] == 1
    )
    quarantine = [
        json.loads(x) for x in (tmp_path / "valid" / "quarantine.jsonl").read_text().splitlines()
    ]
    assert [q["source_row"] for q in quarantine] == [3]


def test_hh_missing_field_is_not_also_no_shared_prompt(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "hh.jsonl",
        [
            {"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": "\n\nHuman: x\n\nAssistant: b"},
            {"chosen": "\n\nHuman: x\n\nAssistant: a", "rejected": None},
        ],
    )
    _, frame, failures = ingest(tmp_path, path)
    assert len(frame) == 1
    assert [(f["source_row"], f["reasons"]) for f in failures] == [
        (2, ["missing field 'rejected'"])
    ]


@pytest.mark.shared_data
def test_hh_real_sample(hh_sample: Path, tmp_path: Path) -> None:
    report = ingest_sources([SourceConfig(path=str(hh_sample))], tmp_path / "ingest")
    assert report["records"] == 1800
    assert report["sources"][0]["format"] == "hh"
    vreport = validate_normalised(
        tmp_path / "ingest", tmp_path / "valid", DataConfig(), enforce=False
    )
    assert vreport["records"] == 1800
    assert vreport["valid"] + vreport["quarantined"] == 1800
    assert (
        vreport["valid"] > 1700
    )  # the sample is real, clean data: only a handful of rows may fail
    quarantine = (tmp_path / "valid" / "quarantine.jsonl").read_text().splitlines()
    assert len(quarantine) == vreport["quarantined"]
    valid = pd.read_parquet(tmp_path / "valid" / "valid.parquet")
    assert len(valid) == vreport["valid"]
    assert valid["prompt"].str.endswith(HH_ASSISTANT).all()
    assert valid["prompt"].str.startswith("\n\nHuman:").all()
    assert not valid["chosen"].str.match(r"\s").any()
    assert not valid["rejected"].str.match(r"\s").any()
    assert (valid["chosen"] != valid["rejected"]).all()
    # every source line appears exactly once, either valid or quarantined
    rows = sorted(valid["source_row"].tolist() + [json.loads(q)["source_row"] for q in quarantine])
    assert rows == list(range(1, 1801))


# -- ranked -------------------------------------------------------------------------------------------


def test_ranked_three_distinct_ranks_orientation(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "ranked.jsonl",
        [
            {"prompt": "Pick", "responses": ["middle", "best", "worst"], "ranks": [2.0, 1.0, 3.0]},
        ],
    )
    report, frame, failures = ingest(tmp_path, path)
    assert failures == []
    assert report["sources"][0]["format"] == "ranked"
    assert report["records"] == 1 and report["pairs"] == 3
    assert sorted(triples(frame)) == sorted(
        [("Pick", "best", "middle"), ("Pick", "best", "worst"), ("Pick", "middle", "worst")]
    )
    assert frame["source_row"].tolist() == [1, 1, 1]
    assert (frame["p_chosen"] == 1.0).all()


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_ranked_integer_ranks(kind: str, tmp_path: Path) -> None:
    rows = [{"prompt": "Pick", "responses": ["middle", "best", "worst"], "ranks": [2, 1, 3]}]
    path = (
        write_jsonl(tmp_path / "r.jsonl", rows)
        if kind == "jsonl"
        else write_parquet(tmp_path / "r.parquet", rows)
    )
    report, frame, failures = ingest(tmp_path, path)
    assert failures == []
    assert sorted(triples(frame)) == sorted(
        [("Pick", "best", "middle"), ("Pick", "best", "worst"), ("Pick", "middle", "worst")]
    )


def test_ranked_ties_skipped_and_counted(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "ranked.jsonl",
        [
            {
                "prompt": "P1",
                "responses": ["a", "b", "c"],
                "ranks": [1.0, 1.0, 2.0],
            },  # 1 tie, 2 pairs
            {"prompt": "P2", "responses": ["x", "y"], "ranks": [3.0, 3.0]},  # all tied
            {
                "prompt": "P3",
                "responses": ["d", "e", "f", "g"],
                "ranks": [4.0, 1.0, 2.0, 3.0],
            },  # 6 pairs
        ],
    )
    report, frame, failures = ingest(tmp_path, path)
    # a record with no preference at all is quarantined with its reason, never silently lost
    assert [f["reasons"] for f in failures] == [["all 2 responses share rank 3: no preference"]]
    assert report["ties_skipped"] == 1 and report["sources"][0]["ties_skipped"] == 1
    assert report["pairs"] == 8 and report["records"] == 3 and report["ingest_failures"] == 1
    assert sorted(t for t in triples(frame) if t[0] == "P1") == [("P1", "a", "c"), ("P1", "b", "c")]
    p3 = {(c, r) for p, c, r in triples(frame) if p == "P3"}
    assert p3 == {("e", "f"), ("e", "g"), ("e", "d"), ("f", "g"), ("f", "d"), ("g", "d")}
    vreport = validate_normalised(
        tmp_path / "ingest", tmp_path / "valid", DataConfig(), enforce=False
    )
    assert vreport["ties_skipped"] == 1
    assert vreport["valid"] == 8 and vreport["quarantined"] == 1
    assert vreport["invalid_fraction"] == pytest.approx(1 / 3)


def test_ranked_bad_records_quarantined_with_reasons(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "ranked.jsonl",
        [
            {"prompt": "ok", "responses": ["good", "bad"], "ranks": [1.0, 2.0]},
            {"prompt": "mismatch", "responses": ["a", "b", "c"], "ranks": [1.0, 2.0]},
            {"prompt": "one", "responses": ["only"], "ranks": [1.0]},
            {"prompt": "string", "responses": "not a list", "ranks": [1.0, 2.0]},
            {"prompt": "ranks string", "responses": ["a", "b"], "ranks": "1,2"},
            {"prompt": "non-str response", "responses": ["a", 7], "ranks": [1.0, 2.0]},
            {"prompt": "bad rank", "responses": ["a", "b"], "ranks": [1.0, "first"]},
            {"prompt": "null responses", "responses": None, "ranks": [1.0, 2.0]},
        ],
    )
    report, frame, failures = ingest(tmp_path, path)
    assert triples(frame) == [("ok", "good", "bad")]
    assert report["records"] == 8 and report["ingest_failures"] == 7
    reasons = {f["source_row"]: f["reasons"] for f in failures}
    assert reasons == {
        2: ["'responses' has 3 items but 'ranks' has 2"],
        3: ["fewer than 2 responses to rank"],
        4: ["field 'responses' must be a list of strings, got str"],
        5: ["field 'ranks' must be a list of numbers, got str"],
        6: ["field 'responses' must be a list of strings"],
        7: ["field 'ranks' must be a list of numbers"],
        8: ["field 'responses' must be a list of strings, got null"],
    }


# -- comparison ---------------------------------------------------------------------------------------------


def test_comparison_default_columns(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "cmp.jsonl",
        [
            {"text": "post 1", "summary_1": "first", "summary_2": "second", "preference": 1},
            {"text": "post 2", "summary_1": "first", "summary_2": "second", "preference": 2},
        ],
    )
    report, frame, failures = ingest(tmp_path, path)
    assert failures == []
    assert report["sources"][0]["format"] == "comparison"
    assert triples(frame) == [("post 1", "first", "second"), ("post 2", "second", "first")]


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_comparison_custom_column_map(kind: str, tmp_path: Path) -> None:
    rows = [
        {"post": "x", "a": "A1", "b": "B1", "choice": 0},
        {"post": "y", "a": "A2", "b": "B2", "choice": 1},
        {"post": "z", "a": "A3", "b": "B3", "choice": 1},
    ]
    path = (
        write_jsonl(tmp_path / "c.jsonl", rows)
        if kind == "jsonl"
        else write_csv(tmp_path / "c.csv", rows)
    )
    cols = ColumnMap(
        prompt="post", response_1="a", response_2="b", label="choice", label_values=(0, 1)
    )
    report, frame, failures = ingest(tmp_path, path, columns=cols)
    assert failures == []
    assert report["sources"][0]["format"] == "comparison"
    assert triples(frame) == [("x", "A1", "B1"), ("y", "B2", "A2"), ("z", "B3", "A3")]


def test_comparison_bad_label_names_column(tmp_path: Path) -> None:
    cols = ColumnMap(
        prompt="post", response_1="a", response_2="b", label="choice", label_values=(0, 1)
    )
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"post": "x", "a": "A", "b": "B", "choice": 0},
            {"post": "y", "a": "A", "b": "B", "choice": 2},
        ],
    )
    _, frame, failures = ingest(tmp_path, path, columns=cols)
    assert triples(frame) == [("x", "A", "B")]
    assert len(failures) == 1 and failures[0]["source_row"] == 2
    reason = failures[0]["reasons"][0]
    assert "'choice'" in reason and "0 or 1" in reason and "2" in reason

    path = write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"text": "t", "summary_1": "A", "summary_2": "B", "preference": 1},
            {"text": "t", "summary_1": "A", "summary_2": "B", "preference": "left"},
        ],
    )
    _, frame, failures = ingest(tmp_path, path, out_name="d")
    assert len(frame) == 1
    assert [f["source_row"] for f in failures] == [2]
    assert failures[0]["reasons"] == ["field 'preference' must be 1 or 2, got 'left'"]


def test_comparison_one_missing_label_quarantines_only_that_row(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "c.jsonl",
        [
            {"text": "t1", "summary_1": "A", "summary_2": "B", "preference": 1},
            {"text": "t2", "summary_1": "A", "summary_2": "B", "preference": 2},
            {"text": "t3", "summary_1": "A", "summary_2": "B", "preference": None},
        ],
    )
    _, frame, failures = ingest(tmp_path, path)
    assert [f["source_row"] for f in failures] == [3]
    assert triples(frame) == [("t1", "A", "B"), ("t2", "B", "A")]


# -- format detection and whole-source problems -------------------------------------------------------------


@pytest.mark.parametrize(
    "columns, expected",
    [
        (["prompt", "chosen", "rejected"], "pairwise"),
        (
            ["prompt", "chosen", "rejected", "p_chosen", "margin", "label_source", "extra"],
            "pairwise",
        ),
        (["chosen", "rejected"], "hh"),
        (["prompt", "responses", "ranks"], "ranked"),
        (["prompt", "responses", "ranks", "chosen", "rejected"], "ranked"),
        (["text", "summary_1", "summary_2", "preference"], "comparison"),
    ],
)
def test_detect_format_known_answers(columns, expected) -> None:
    assert detect_format(columns, ColumnMap(), "x") == expected


def test_detect_format_custom_column_map_and_failure() -> None:
    cols = ColumnMap(prompt="post", response_1="a", response_2="b", label="choice")
    assert detect_format(["post", "a", "b", "choice"], cols, "x") == "comparison"
    with pytest.raises(
        UnusableInputError, match=r"src: no recognisable preference format \(columns: a, post;"
    ):
        detect_format(["post", "a"], cols, "src")


_DETECT_ROWS = {
    "pairwise": PAIRS,
    "hh": [{"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b"}],
    "ranked": [{"prompt": "p", "responses": ["a", "b"], "ranks": [1.0, 2.0]}],
    "comparison": [{"text": "t", "summary_1": "a", "summary_2": "b", "preference": 1}],
}


@pytest.mark.parametrize(
    "expected, kind",
    [
        (f, k)
        for f in _DETECT_ROWS
        for k in ("jsonl", "csv", "parquet")
        if not (f == "ranked" and k == "csv")
    ],
)  # CSV has no list values
def test_auto_detection_per_source_kind(expected, kind, tmp_path: Path) -> None:
    rows = _DETECT_ROWS[expected]
    writer = {"jsonl": write_jsonl, "csv": write_csv, "parquet": write_parquet}[kind]
    path = writer(tmp_path / f"data.{kind}", rows)
    report, frame, failures = ingest(tmp_path, path)
    assert report["sources"][0]["format"] == expected
    assert failures == [] and len(frame) == report["pairs"] > 0


def test_explicit_format_with_missing_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(UnusableInputError) as info:
        ingest(tmp_path, path, format="ranked")
    msg = str(info.value)
    assert str(path) in msg and "responses, ranks" in msg and "'ranked'" in msg
    with pytest.raises(
        UnusableInputError,
        match=r"missing required column\(s\) text, summary_1, summary_2, preference",
    ):
        ingest(tmp_path, path, format="comparison")
    # an explicit format that fits is used even when auto-detection would say otherwise
    report, frame, _ = ingest(tmp_path, path, format="hh", out_name="hh")
    assert report["sources"][0]["format"] == "hh"
    assert report["ingest_failures"] == len(PAIRS)  # none of the pairwise rows is a dialogue


def test_unrecognisable_columns(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(
        UnusableInputError, match=r"no recognisable preference format \(columns: answer, question;"
    ):
        ingest(tmp_path, path)
    assert not (tmp_path / "ingest").exists() and no_partials(tmp_path)


@pytest.mark.parametrize(
    "case, match",
    [
        ("empty.jsonl", "empty file"),
        ("empty.csv", "empty file"),
        ("empty.parquet", "empty file"),
        ("header_only.csv", "no records"),
        ("blank_only.jsonl", "no records"),
        ("missing.jsonl", "no such file"),
        ("data.txt", "unknown file type"),
        ("not_a_dataset", "not a dataset saved with datasets.save_to_disk"),
        ("empty_list.json", "no records"),
        ("object.json", "without a list of records"),
        ("scalar.json", "expected a list of records, got int"),
        ("broken.json", "not valid JSON"),
        ("garbage.parquet", "not a readable parquet file"),
    ],
)
def test_unusable_sources(case: str, match: str, tmp_path: Path) -> None:
    path = tmp_path / case
    contents = {
        "empty.jsonl": b"",
        "empty.csv": b"",
        "empty.parquet": b"",
        "header_only.csv": b"prompt,chosen,rejected\n",
        "blank_only.jsonl": b"\n  \n\n",
        "data.txt": b"prompt,chosen,rejected\na,b,c\n",
        "empty_list.json": b"[]",
        "object.json": b'{"meta": {"n": 1}}',
        "scalar.json": b"42",
        "broken.json": b'[{"prompt": ',
        "garbage.parquet": b"this is not parquet at all",
    }
    if case == "not_a_dataset":
        path.mkdir()
        (path / "readme.txt").write_text("hello")
    elif case in contents:
        path.write_bytes(contents[case])
    out = tmp_path / "ingest"
    with pytest.raises(UnusableInputError, match=match) as info:
        ingest_sources([SourceConfig(path=str(path))], out)
    assert "\n" not in str(info.value)
    assert not out.exists() and no_partials(tmp_path)


def test_no_sources_is_unusable(tmp_path: Path) -> None:
    with pytest.raises(UnusableInputError, match="no data sources"):
        ingest_sources([], tmp_path / "ingest")


# -- broken input kinds ---------------------------------------------------------------------------------------

GOOD = '{"prompt": "p%d", "chosen": "c%d", "rejected": "r%d"}'


def test_broken_jsonl_lines_each_quarantined_with_line_and_reason(tmp_path: Path) -> None:
    lines: list[bytes | str] = [
        GOOD % (1, 1, 1),  # 1 ok
        '{"prompt": "p2", "chosen": "c2", "rejected": ',  # 2 broken JSON
        '["a", "list"]',  # 3 not an object
        "",  # 4 blank
        '{"prompt": "p5", "chosen": 5, "rejected": "r5"}',  # 5 chosen is a number
        '{"prompt": "p6", "chosen": "c6", "rejected": "r6", "p_chosen": "abc"}',  # 6 p_chosen not a number
        '{"prompt": "p7", "chosen": "c7"}',  # 7 rejected missing
        b'\xff\xfe{"prompt": "p8", "chosen": "c8", "rejected": "r8"}',  # 8 undecodable bytes
        "   \t",  # 9 whitespace only
        '"just a string"',  # 10 not an object
        '{"prompt": null, "chosen": "c11", "rejected": "r11"}',  # 11 prompt null
        '{"prompt": "p12", "chosen": "c12", "rejected": "r12", "margin": "big"}',  # 12 margin not a number
        '{"prompt": "p13", "chosen": "c13", "rejected": ["r13"]}',  # 13 rejected is a list
        GOOD % (14, 14, 14),  # 14 ok
    ]
    path = write_lines(tmp_path / "broken.jsonl", lines)
    report, frame, failures = ingest(tmp_path, path)
    assert triples(frame) == [("p1", "c1", "r1"), ("p14", "c14", "r14")]
    assert frame["source_row"].tolist() == [1, 14]
    by_row = {f["source_row"]: f["reasons"] for f in failures}
    assert sorted(by_row) == [2, 3, 5, 6, 7, 8, 10, 11, 12, 13]
    assert len(by_row[2]) == 1 and by_row[2][0].startswith("broken JSON")
    assert by_row[3] == ["not a JSON object (got list)"]
    assert by_row[5] == ["field 'chosen' must be a string, got int"]
    assert by_row[6] == ["field 'p_chosen' must be a number, got 'abc'"]
    assert by_row[7] == ["missing field 'rejected'"]
    assert by_row[8] == ["undecodable bytes (not UTF-8) at byte 0"]
    assert by_row[10] == ["not a JSON object (got str)"]
    assert by_row[11] == ["missing field 'prompt'"]
    assert by_row[12] == ["field 'margin' must be a number, got 'big'"]
    assert by_row[13] == ["field 'rejected' must be a string, got list"]
    assert all(f["stage"] == "ingest" and f["source"] == str(path) for f in failures)
    assert report["blank_lines"] == 2
    assert report["records"] == 12 and report["ingest_failures"] == 10

    vreport = validate_normalised(
        tmp_path / "ingest", tmp_path / "valid", DataConfig(), enforce=False
    )
    assert vreport["valid"] + vreport["quarantined"] + vreport["blank_lines"] == len(lines)
    assert vreport["valid"] == 2 and vreport["quarantined_at_ingest"] == 10
    assert vreport["reasons"]["broken JSON"] == 1
    assert sum(v for k, v in vreport["reasons"].items() if k.startswith("not a JSON object")) == 2
    assert vreport["reasons"]["missing field 'rejected'"] == 1
    assert vreport["reasons"]["undecodable bytes (not UTF-8)"] == 1
    quarantine = (tmp_path / "valid" / "quarantine.jsonl").read_text().splitlines()
    assert len(quarantine) == 10  # blank lines are counted, not quarantined


def test_wrong_types_on_the_arrow_fast_path(tmp_path: Path) -> None:
    """A chunk arrow can parse (consistent types) but whose values are of the wrong type."""
    path = write_lines(
        tmp_path / "types.jsonl",
        [
            '{"prompt": "p1", "chosen": 1, "rejected": "r1", "p_chosen": 0.5}',
            '{"prompt": "p2", "chosen": 2, "rejected": "r2", "p_chosen": 0.5}',
        ],
    )
    _, frame, failures = ingest(tmp_path, path)
    assert len(frame) == 0
    assert [(f["source_row"], f["reasons"]) for f in failures] == [
        (1, ["field 'chosen' must be a string, got int"]),
        (2, ["field 'chosen' must be a string, got int"]),
    ]


def test_bool_p_chosen_alone_is_rejected(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "b.jsonl", ['{"prompt": "p", "chosen": "a", "rejected": "b", "p_chosen": true}']
    )
    _, frame, failures = ingest(tmp_path, path)
    assert len(frame) == 0
    assert failures[0]["reasons"] == ["field 'p_chosen' must be a number, got bool"]


def test_bool_p_chosen_mixed_with_numbers_is_rejected(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "b.jsonl",
        [
            '{"prompt": "p", "chosen": "a", "rejected": "b", "p_chosen": 0.5}',
            '{"prompt": "q", "chosen": "a", "rejected": "b", "p_chosen": false}',
        ],
    )
    _, frame, failures = ingest(tmp_path, path)
    assert frame["source_row"].tolist() == [1]
    assert [f["source_row"] for f in failures] == [2]
    assert failures[0]["reasons"][0].startswith("field 'p_chosen' must be a number")


def test_broken_csv_rows(tmp_path: Path) -> None:
    path = tmp_path / "broken.csv"
    path.write_bytes(
        b"".join(
            [
                b"prompt,chosen,rejected,p_chosen\n",  # 1 header
                b"p2,c2,r2,0.5\n",  # 2 ok
                b"p3,c3,r3,0.5,extra\n",  # 3 too many fields
                b"p4,c4\xff\xfe,r4,1\n",  # 4 undecodable bytes
                b"p5,c5,r5,abc\n",  # 5 p_chosen not a number
                b"p6,c6\n",  # 6 too few fields
                b'"p7, quoted","c7 ""q""",r7,\n',  # 7 ok (quoted; empty p_chosen -> 1.0)
            ]
        )
    )
    report, frame, failures = ingest(tmp_path, path)
    assert records(frame, ["prompt", "chosen", "rejected", "p_chosen", "source_row"]) == [
        {"prompt": "p2", "chosen": "c2", "rejected": "r2", "p_chosen": 0.5, "source_row": 2},
        {
            "prompt": "p7, quoted",
            "chosen": 'c7 "q"',
            "rejected": "r7",
            "p_chosen": 1.0,
            "source_row": 7,
        },
    ]
    by_row = {f["source_row"]: f["reasons"] for f in failures}
    assert by_row == {
        3: ["malformed CSV row: 5 fields, header has 4"],
        4: ["undecodable bytes (not UTF-8)"],
        5: ["field 'p_chosen' must be a number, got 'abc'"],
        6: ["malformed CSV row: 2 fields, header has 4"],
    }
    vreport = validate_normalised(
        tmp_path / "ingest", tmp_path / "valid", DataConfig(), enforce=False
    )
    assert vreport["valid"] + vreport["quarantined"] == 6  # data lines (header excluded)
    assert vreport["reasons"]["malformed CSV row: 5 fields, header has 4"] == 1


def test_undecodable_bytes_in_gz_csv(tmp_path: Path) -> None:
    path = tmp_path / "u.csv.gz"
    path.write_bytes(gzip.compress(b"prompt,chosen,rejected\n\xff\xfe,c,r\np,c,r\n"))
    _, frame, failures = ingest(tmp_path, path)
    assert triples(frame) == [("p", "c", "r")]
    assert [(f["source_row"], f["reasons"]) for f in failures] == [
        (2, ["undecodable bytes (not UTF-8)"])
    ]


def test_undecodable_bytes_inside_a_json_string(tmp_path: Path) -> None:
    path = write_lines(
        tmp_path / "u.jsonl",
        [
            GOOD % (1, 1, 1),
            b'{"prompt": "p2\xff\xfe", "chosen": "c2", "rejected": "r2"}',
            GOOD % (3, 3, 3),
        ],
    )
    _, frame, failures = ingest(tmp_path, path)
    assert [f["source_row"] for f in failures] == [2]
    assert failures[0]["reasons"][0].startswith("undecodable bytes (not UTF-8)")
    assert frame["source_row"].tolist() == [1, 3]
    report = validate_normalised(
        tmp_path / "ingest", tmp_path / "valid", DataConfig(), enforce=False
    )
    assert report["valid"] == 2 and report["quarantined"] == 1


def test_jsonl_line_count_invariant(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    lines = []
    for i in range(1, 301):
        roll = rng.random()
        if roll < 0.05:
            lines.append("")
        elif roll < 0.10:
            lines.append('{"prompt": "broken')
        elif roll < 0.15:
            lines.append(
                f'{{"prompt": "p{i}", "chosen": "same", "rejected": "same"}}'
            )  # fails validation
        else:
            lines.append(GOOD % (i, i, i))
    path = write_lines(tmp_path / "mix.jsonl", lines)
    ingest(tmp_path, path, chunk_rows=64)
    report = validate_normalised(
        tmp_path / "ingest", tmp_path / "valid", DataConfig(), enforce=False
    )
    assert report["valid"] + report["quarantined"] + report["blank_lines"] == len(lines)
    assert report["blank_lines"] == sum(1 for ln in lines if not ln)
    valid = pd.read_parquet(tmp_path / "valid" / "valid.parquet")
    quarantine = [
        json.loads(x) for x in (tmp_path / "valid" / "quarantine.jsonl").read_text().splitlines()
    ]
    blank = [i for i, ln in enumerate(lines, start=1) if not ln]
    assert sorted(
        valid["source_row"].tolist() + [q["source_row"] for q in quarantine] + blank
    ) == list(range(1, len(lines) + 1))


def test_csv_blank_lines_are_counted(tmp_path: Path) -> None:
    path = tmp_path / "blank.csv"
    path.write_text("prompt,chosen,rejected\np1,c1,r1\n\np3,c3,r3\n\n")
    report, frame, _ = ingest(tmp_path, path)
    assert frame["source_row"].tolist() == [2, 4]
    assert report["blank_lines"] == 2


def test_file_with_only_broken_lines_names_the_first_problem(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "broken.jsonl", ['{"prompt": ', "{nope"])
    with pytest.raises(
        UnusableInputError, match=r"no record could be parsed \(first problem: broken JSON"
    ):
        ingest(tmp_path, path)


def test_file_with_only_broken_lines_is_unusable(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "broken.jsonl", ['{"prompt": ', "{nope", "[1, 2]"])
    with pytest.raises(UnusableInputError, match=r"no record could be parsed"):
        ingest(tmp_path, path)
    assert not (tmp_path / "ingest").exists() and no_partials(tmp_path)


# -- fast arrow path vs exact fallback ---------------------------------------------------------------------


def _big_rows(n: int) -> list[dict]:
    rows = []
    for i in range(1, n + 1):
        row = {
            "prompt": f'prompt {i}, "quoted" é',
            "chosen": f"chosen {i}",
            "rejected": f"rejected {i}",
        }
        if i % 3 == 0:
            row["p_chosen"] = 0.5 + (i % 5) / 10
        if i % 7 == 0:
            row["margin"] = float(i % 11)
        if i % 13 == 0:
            row["label_source"] = "ai"
        rows.append(row)
    return rows


def test_fast_and_exact_paths_agree(tmp_path: Path) -> None:
    rows = _big_rows(2500)
    broken_line = 2201  # in the third chunk of 1000
    lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    clean = write_lines(tmp_path / "clean.jsonl", lines)
    broken_lines = list(lines)
    broken_lines[broken_line - 1] = lines[broken_line - 1][:-5]  # truncated -> broken JSON
    broken = write_lines(tmp_path / "broken.jsonl", broken_lines)

    _, clean_frame, clean_failures = ingest(tmp_path, clean, chunk_rows=1000, out_name="clean")
    _, broken_frame, broken_failures = ingest(tmp_path, broken, chunk_rows=1000, out_name="broken")
    # the same file in one chunk: one broken line sends ALL 2500 lines to the exact path
    _, exact_frame, exact_failures = ingest(tmp_path, broken, chunk_rows=10_000, out_name="exact")

    assert clean_failures == []
    assert len(clean_frame) == 2500
    assert [f["source_row"] for f in broken_failures] == [broken_line]
    assert broken_failures[0]["reasons"][0].startswith("broken JSON")
    assert exact_failures == broken_failures

    # the expected rows straight from the input (defaults: label_source human, p_chosen 1.0, margin null)
    expected = [
        {
            "prompt": r["prompt"],
            "chosen": r["chosen"],
            "rejected": r["rejected"],
            "label_source": r.get("label_source", "human"),
            "p_chosen": r.get("p_chosen", 1.0),
            "margin": r.get("margin"),
            "source_row": i,
        }
        for i, r in enumerate(rows, start=1)
    ]
    assert records(clean_frame) == expected
    expected = [r for r in expected if r["source_row"] != broken_line]
    assert records(broken_frame) == expected
    assert records(exact_frame) == expected


def test_fast_path_keeps_date_like_strings(tmp_path: Path) -> None:
    rows = [
        {
            "prompt": "When did the Berlin wall fall?",
            "chosen": "1989-11-09",
            "rejected": "1961-08-13",
        },
        {"prompt": "When is new year?", "chosen": "2024-01-01", "rejected": "2024-12-25"},
    ]
    path = write_jsonl(tmp_path / "dates.jsonl", rows)
    _, frame, failures = ingest(tmp_path, path)
    assert failures == []
    assert triples(frame) == [(r["prompt"], r["chosen"], r["rejected"]) for r in rows]
