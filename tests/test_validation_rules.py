"""Validation rules of the normalised preference table (rlhf_core.data.validate / pipeline.validate_normalised)
and the prompt-disjoint splits (pipeline.make_splits), each with known answers.

Data goes through the real stages: a JSON-lines file in tmp_path -> ingest_sources -> validate_normalised,
and the outputs (valid.parquet, quarantine.jsonl, report.json) are read back from disk.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from rlhf_core.config import DataConfig, SourceConfig, SplitRatios
from rlhf_core.data.dataset import ingest_sources, make_splits, validate_normalised
from rlhf_core.data.validate import PreferenceValidator
from rlhf_core.errors import TooManyInvalidRowsError

# -- helpers --------------------------------------------------------------------------------------


def pair(i, **kw) -> dict:
    return {
        "prompt": f"prompt {i}",
        "chosen": f"good answer {i}",
        "rejected": f"bad answer {i}",
        **kw,
    }


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text(
        "".join(
            (r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n" for r in rows
        )
    )
    return path


class Run:
    """One ingest + validate over `rows`, with its outputs read back."""

    def __init__(
        self,
        tmp_path: Path,
        rows: list,
        data: DataConfig | None = None,
        *,
        name: str = "run",
        enforce: bool = False,
        ingest_chunk_rows: int = 1000,
    ):
        self.root = tmp_path / name
        self.root.mkdir(parents=True, exist_ok=True)
        self.src = write_jsonl(self.root / "pairs.jsonl", rows)
        self.ingest_dir = self.root / "ingest"
        self.valid_dir = self.root / "valid"
        ingest_sources(
            [SourceConfig(path=str(self.src))], self.ingest_dir, chunk_rows=ingest_chunk_rows
        )
        self.report = validate_normalised(
            self.ingest_dir, self.valid_dir, data or DataConfig(), enforce=enforce
        )
        self.load()

    def load(self) -> None:
        self.valid = pd.read_parquet(self.valid_dir / "valid.parquet")
        self.quarantine = [
            json.loads(x) for x in (self.valid_dir / "quarantine.jsonl").read_text().splitlines()
        ]
        self.disk_report = json.loads((self.valid_dir / "report.json").read_text())

    @property
    def reasons_by_row(self) -> dict[int, list[str]]:
        return {q["source_row"]: q["reasons"] for q in self.quarantine}

    @property
    def valid_rows(self) -> list[int]:
        return self.valid["source_row"].tolist()


def no_partials(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if ".partial-" in p.name]


# -- single rules --------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["prompt", "chosen", "rejected"])
@pytest.mark.parametrize("value", ["", "   ", " \n\t "])
def test_empty_or_whitespace_field(field: str, value: str, tmp_path: Path) -> None:
    run = Run(tmp_path, [pair(1), pair(2, **{field: value}), pair(3)])
    assert run.valid_rows == [1, 3]
    assert run.reasons_by_row == {2: [f"empty {field}"]}
    q = run.quarantine[0]
    assert q["stage"] == "validate" and q["source"] == str(run.src)
    assert q["record"][field] == value  # the record is kept as it was
    assert run.report["reasons"] == {f"empty {field}": 1}


@pytest.mark.parametrize(
    "chosen, rejected", [("same", "same"), ("same ", " same"), ("\tsame\n", "same")]
)
def test_chosen_equals_rejected(chosen: str, rejected: str, tmp_path: Path) -> None:
    run = Run(
        tmp_path,
        [
            pair(1),
            pair(2, chosen=chosen, rejected=rejected),
            pair(3, chosen="Same", rejected="same"),
        ],
    )
    assert run.valid_rows == [1, 3]  # case differs: not the same
    assert run.reasons_by_row == {2: ["chosen is the same as rejected"]}


def test_p_chosen_range(tmp_path: Path) -> None:
    rows = [
        pair(1, p_chosen=0.0),
        pair(2, p_chosen=1.0),
        pair(3, p_chosen=0.5),
        pair(4, p_chosen=-0.01),
        pair(5, p_chosen=1.01),
        pair(6, p_chosen=100.0),
    ]
    run = Run(tmp_path, rows)
    assert run.valid_rows == [1, 2, 3]
    assert run.reasons_by_row == {
        4: ["p_chosen outside [0, 1]"],
        5: ["p_chosen outside [0, 1]"],
        6: ["p_chosen outside [0, 1]"],
    }
    assert run.valid["p_chosen"].tolist() == [0.0, 1.0, 0.5]
    assert run.report["reasons"] == {"p_chosen outside [0, 1]": 3}


def test_non_finite_labels_are_quarantined(tmp_path: Path) -> None:
    """An infinite margin would dominate every loss it enters."""
    rows = [
        pair(1, margin=1.5),
        pair(2, margin=float("inf")),
        pair(3, margin=float("-inf")),
        pair(4, p_chosen=float("inf")),
    ]
    run = Run(tmp_path, rows)
    assert run.valid_rows == [1]
    assert run.reasons_by_row == {
        2: ["margin is not finite"],
        3: ["margin is not finite"],
        4: ["p_chosen outside [0, 1]"],
    }


def test_label_source_must_be_human_or_ai(tmp_path: Path) -> None:
    rows = [
        pair(1, label_source="human"),
        pair(2, label_source="ai"),
        pair(3, label_source="robot"),
        pair(4, label_source="Human"),
        pair(5),
    ]
    run = Run(tmp_path, rows)
    assert run.valid_rows == [1, 2, 5]
    assert run.valid["label_source"].tolist() == [
        "human",
        "ai",
        "human",
    ]  # missing -> the source's default
    assert run.reasons_by_row == {
        3: ["label_source must be 'human', 'ai' or 'none'"],
        4: ["label_source must be 'human', 'ai' or 'none'"],
    }


def test_source_label_source_default_ai(tmp_path: Path) -> None:
    src = write_jsonl(tmp_path / "p.jsonl", [pair(1), pair(2, label_source="human")])
    ingest_sources([SourceConfig(path=str(src), label_source="ai")], tmp_path / "i")
    validate_normalised(tmp_path / "i", tmp_path / "v", DataConfig(), enforce=True)
    assert pd.read_parquet(tmp_path / "v" / "valid.parquet")["label_source"].tolist() == [
        "ai",
        "human",
    ]


def test_max_chars_limits_are_inclusive(tmp_path: Path) -> None:
    data = DataConfig(max_prompt_chars=10, max_response_chars=20)
    rows = [
        {
            "prompt": "p" * 10,
            "chosen": "c" * 20,
            "rejected": "r" * 20,
        },  # 1 exactly at the limits: passes
        {"prompt": "p" * 11, "chosen": "c" * 5, "rejected": "r" * 5},  # 2 prompt one over
        {"prompt": "p" * 5, "chosen": "c" * 21, "rejected": "r" * 5},  # 3 chosen one over
        {"prompt": "p" * 5, "chosen": "c" * 5, "rejected": "r" * 21},  # 4 rejected one over
        {"prompt": "é" * 10, "chosen": "🙂" * 20, "rejected": "x"},  # 5 characters, not bytes
    ]
    run = Run(tmp_path, rows, data)
    assert run.valid_rows == [1, 5]
    assert run.reasons_by_row == {
        2: ["prompt longer than 10 characters"],
        3: ["chosen longer than 20 characters"],
        4: ["rejected longer than 20 characters"],
    }


def test_row_failing_several_rules_lists_all_reasons(tmp_path: Path) -> None:
    rows = [
        pair(1),
        {
            "prompt": "  ",
            "chosen": "x" * 30,
            "rejected": "x" * 30,
            "p_chosen": 1.5,
            "label_source": "bot",
        },
    ]
    run = Run(tmp_path, rows, DataConfig(max_response_chars=25))
    assert run.valid_rows == [1]
    assert len(run.quarantine) == 1
    reasons = run.quarantine[0]["reasons"]
    assert sorted(reasons) == sorted(
        [
            "empty prompt",
            "chosen is the same as rejected",
            "p_chosen outside [0, 1]",
            "label_source must be 'human', 'ai' or 'none'",
            "chosen longer than 25 characters",
            "rejected longer than 25 characters",
        ]
    )
    assert len(reasons) == len(set(reasons))
    assert run.report["quarantined_at_validation"] == 1
    assert sum(run.report["reasons"].values()) == 6


# -- duplicates ------------------------------------------------------------------------------------


def test_duplicates_within_a_chunk_first_kept(tmp_path: Path) -> None:
    rows = [
        pair(1),
        pair(2),
        pair(1, p_chosen=0.9),
        pair(3),
        pair(2),
        {"prompt": "prompt 1", "chosen": "good answer 1", "rejected": "bad answer 1 "},
    ]
    run = Run(tmp_path, rows)
    # duplicate = same (prompt, chosen, rejected) text; label fields do not matter; any other text is a new pair
    assert run.valid_rows == [1, 2, 4, 6]
    assert run.reasons_by_row == {
        3: ["duplicate of an earlier pair"],
        5: ["duplicate of an earlier pair"],
    }
    assert run.valid.loc[0, "p_chosen"] == 1.0  # the first occurrence's labels
    assert run.report["reasons"] == {"duplicate of an earlier pair": 2}


def test_duplicates_across_chunks(tmp_path: Path) -> None:
    rows = [pair(i) for i in range(1, 2401)]
    rows.append(pair(5))  # line 2401: duplicate of line 5 (first chunk), found in the third chunk
    rows.append(pair(1500))  # line 2402: duplicate of a row in the second chunk
    rows += [pair(i) for i in range(2403, 2451)]
    rows.append(pair(2420))  # line 2451: duplicate within the last chunk
    run = Run(tmp_path, rows, DataConfig(chunk_rows=1000))
    assert run.reasons_by_row == {
        2401: ["duplicate of an earlier pair"],
        2402: ["duplicate of an earlier pair"],
        2451: ["duplicate of an earlier pair"],
    }
    assert run.report["valid"] == len(rows) - 3
    assert 5 in run.valid_rows and 1500 in run.valid_rows and 2420 in run.valid_rows
    assert run.valid.duplicated(["prompt", "chosen", "rejected"]).sum() == 0


def test_drop_duplicates_false_keeps_them(tmp_path: Path) -> None:
    rows = [pair(i) for i in range(1, 1201)] + [pair(3), pair(3), pair(1100)]
    run = Run(tmp_path, rows, DataConfig(chunk_rows=1000, drop_duplicates=False))
    assert run.quarantine == []
    assert run.report["valid"] == 1203
    assert run.valid_rows.count(3) == 1 and run.valid_rows[-3:] == [1201, 1202, 1203]
    assert (run.valid["prompt"] == "prompt 3").sum() == 3


def test_duplicate_of_a_quarantined_pair_is_kept(tmp_path: Path) -> None:
    run = Run(tmp_path, [pair(1, p_chosen=1.5), pair(1, p_chosen=1.0)])
    assert run.reasons_by_row == {1: ["p_chosen outside [0, 1]"]}
    assert run.valid_rows == [2]


# -- the validator on its own --------------------------------------------------------------------------


def _frame(rows: list[dict]) -> pd.DataFrame:
    base = {"label_source": "human", "p_chosen": 1.0, "margin": np.nan, "source": "s"}
    return pd.DataFrame(
        [{**base, **r, "source_row": i} for i, r in enumerate(rows, start=1)]
    ).astype(
        {
            "prompt": "str",
            "chosen": "str",
            "rejected": "str",
            "label_source": "str",
            "source": "str",
            "p_chosen": "float64",
            "margin": "float64",
            "source_row": "int64",
        }
    )


def test_preference_validator_known_answer() -> None:
    v = PreferenceValidator(max_prompt_chars=5, max_response_chars=3)
    ok, why, hashes = v.validate(
        _frame(
            [
                {"prompt": "12345", "chosen": "abc", "rejected": "x"},
                {"prompt": "123456", "chosen": "abcd", "rejected": "y"},
                {
                    "prompt": "p",
                    "chosen": "a",
                    "rejected": "a",
                    "p_chosen": 0.3,
                    "label_source": "ai",
                    "margin": 2.0,
                },
                {"prompt": "12345", "chosen": "abc", "rejected": "x"},
            ]
        )
    )
    assert ok.tolist() == [True, False, False, False]
    assert why == {
        1: ["prompt longer than 5 characters", "chosen longer than 3 characters"],
        2: ["chosen is the same as rejected"],
        3: ["duplicate of an earlier pair"],
    }
    assert (
        hashes.dtype == np.uint64
        and len(hashes) == 4
        and hashes[0] == hashes[3]
        and len(set(hashes[:3])) == 3
    )

    # the validator remembers pairs across calls (chunks)
    ok2, why2, _ = v.validate(
        _frame(
            [
                {"prompt": "12345", "chosen": "abc", "rejected": "x"},
                {"prompt": "q", "chosen": "b", "rejected": "c"},
            ]
        )
    )
    assert ok2.tolist() == [False, True] and why2 == {0: ["duplicate of an earlier pair"]}


def test_preference_validator_without_dedup() -> None:
    v = PreferenceValidator(100, 100, drop_duplicates=False)
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}] * 3
    ok, why, _ = v.validate(_frame(rows))
    assert ok.tolist() == [True, True, True] and why == {}
    ok, why, _ = v.validate(_frame(rows))
    assert ok.tolist() == [True, True, True] and why == {}


# -- the report ------------------------------------------------------------------------------------


def test_report_counts_by_reason_and_accounting(tmp_path: Path) -> None:
    rows = [
        pair(1, chosen=""),  # empty chosen
        pair(2, chosen="  "),  # empty chosen
        pair(3, p_chosen=2.0),  # p_chosen
        pair(4),
        pair(4),  # duplicate
        '{"prompt": "broken',  # broken JSON (ingest)
        '{"prompt": "p7", "chosen": 7, "rejected": "r"}',  # wrong type (ingest)
        pair(8),
        pair(9, chosen="", p_chosen=-1.0),  # two reasons
        "",  # blank line
    ]
    run = Run(tmp_path, rows)
    r = run.report
    assert r == run.disk_report
    assert r["reasons"] == {
        "empty chosen": 3,
        "p_chosen outside [0, 1]": 2,
        "duplicate of an earlier pair": 1,
        "broken JSON": 1,
        "field 'chosen' must be a string": 1,
    }
    assert r["records"] == 9 and r["pairs_normalised"] == 7
    assert r["valid"] == 2 and run.valid_rows == [4, 8]
    assert (
        r["quarantined_at_ingest"] == 2
        and r["quarantined_at_validation"] == 5
        and r["quarantined"] == 7
    )
    assert r["blank_lines"] == 1
    assert r["valid"] + r["quarantined"] + r["blank_lines"] == len(rows)
    assert len(run.quarantine) == r["quarantined"]
    assert sorted(q["source_row"] for q in run.quarantine) == [1, 2, 3, 5, 6, 7, 9]
    assert sorted(run.reasons_by_row[9]) == ["empty chosen", "p_chosen outside [0, 1]"]
    assert r["invalid_fraction"] == pytest.approx(7 / 9, abs=1e-6)
    assert r["passed"] is False
    assert r["lengths_chars"]["prompt"] == {"mean": 8.0, "p50": 8, "p95": 8, "max": 8}
    assert r["lengths_chars"]["chosen"]["max"] == len("good answer 8")


@pytest.mark.parametrize(
    "n_bad, limit, passed",
    [(0, 0.0, True), (1, 0.05, True), (2, 0.05, False), (2, 0.1, True), (20, 1.0, True)],
)
def test_invalid_fraction_and_passed(
    n_bad: int, limit: float, passed: bool, tmp_path: Path
) -> None:
    rows = [pair(i, chosen="") if i <= n_bad else pair(i) for i in range(1, 21)]
    run = Run(tmp_path, rows, DataConfig(max_invalid_fraction=limit))
    assert run.report["invalid_fraction"] == pytest.approx(n_bad / 20)
    assert run.report["max_invalid_fraction"] == limit
    assert run.report["passed"] is passed
    assert run.report["valid"] == 20 - n_bad


def test_enforce_raises_after_writing_everything(tmp_path: Path) -> None:
    rows = [pair(i, chosen="") if i % 4 == 0 else pair(i) for i in range(1, 21)]  # 5 of 20 invalid
    root = tmp_path / "run"
    root.mkdir()
    src = write_jsonl(root / "pairs.jsonl", rows)
    ingest_sources([SourceConfig(path=str(src))], root / "ingest")
    with pytest.raises(TooManyInvalidRowsError) as info:
        validate_normalised(
            root / "ingest", root / "valid", DataConfig(max_invalid_fraction=0.2), enforce=True
        )
    msg = str(info.value)
    assert (
        "25.0%" in msg
        and "max_invalid_fraction=0.2" in msg
        and str(root / "valid" / "quarantine.jsonl") in msg
    )
    report = json.loads((root / "valid" / "report.json").read_text())
    assert report["passed"] is False and report["invalid_fraction"] == pytest.approx(0.25)
    quarantine = (root / "valid" / "quarantine.jsonl").read_text().splitlines()
    assert sorted(json.loads(q)["source_row"] for q in quarantine) == [4, 8, 12, 16, 20]
    assert len(pd.read_parquet(root / "valid" / "valid.parquet")) == 15
    assert no_partials(tmp_path)
    # exactly at the limit passes
    report = validate_normalised(
        root / "ingest", root / "valid2", DataConfig(max_invalid_fraction=0.25), enforce=True
    )
    assert report["passed"] is True


# -- atomic outputs ----------------------------------------------------------------------------------------


def test_outputs_are_atomic_on_success_and_failure(tmp_path: Path) -> None:
    run = Run(tmp_path, [pair(i) for i in range(1, 11)])
    assert no_partials(tmp_path)
    assert sorted(p.name for p in run.valid_dir.iterdir()) == [
        "quarantine.jsonl",
        "report.json",
        "valid.parquet",
    ]
    assert sorted(p.name for p in run.ingest_dir.iterdir()) == [
        "ingest_failures.jsonl",
        "normalised.parquet",
        "report.json",
    ]
    before = {p.name: p.read_bytes() for p in run.valid_dir.iterdir()}
    ingest_before = {p.name: p.read_bytes() for p in run.ingest_dir.iterdir()}

    # a validation that fails half-way leaves the previous outputs untouched and no staging folder
    (run.ingest_dir / "ingest_failures.jsonl").unlink()
    with pytest.raises(FileNotFoundError):
        validate_normalised(run.ingest_dir, run.valid_dir, DataConfig(), enforce=False)
    assert {p.name: p.read_bytes() for p in run.valid_dir.iterdir()} == before
    assert no_partials(tmp_path)

    # an ingest whose second source is unusable leaves the previous ingest untouched
    (run.ingest_dir / "ingest_failures.jsonl").write_bytes(ingest_before["ingest_failures.jsonl"])
    other = write_jsonl(tmp_path / "other.jsonl", [pair(99)])
    with pytest.raises(Exception, match="no such file"):
        ingest_sources(
            [SourceConfig(path=str(other)), SourceConfig(path=str(tmp_path / "missing.jsonl"))],
            run.ingest_dir,
        )
    assert {p.name: p.read_bytes() for p in run.ingest_dir.iterdir()} == ingest_before
    assert no_partials(tmp_path)

    # a rerun replaces the outputs in place
    report = validate_normalised(
        run.ingest_dir, run.valid_dir, DataConfig(max_prompt_chars=8), enforce=False
    )
    assert report["valid"] == 9  # "prompt 10" is 9 characters
    assert len(pd.read_parquet(run.valid_dir / "valid.parquet")) == 9
    assert no_partials(tmp_path)


def test_enforce_failure_leaves_no_staging(tmp_path: Path) -> None:
    with pytest.raises(TooManyInvalidRowsError):
        Run(tmp_path, [pair(1, chosen=""), pair(2)], enforce=True)
    assert no_partials(tmp_path)
    assert (tmp_path / "run" / "valid" / "report.json").exists()


# -- dataset version -------------------------------------------------------------------------------------


def test_dataset_version(tmp_path: Path) -> None:
    rows = [pair(i, p_chosen=0.5 + (i % 5) / 10) for i in range(1, 2501)]
    a = Run(tmp_path, rows, name="a").report["dataset_version"]
    b = Run(tmp_path, rows, name="b").report["dataset_version"]
    assert a == b and len(a) == 16
    # the ingest chunk size does not change the version
    assert Run(tmp_path, rows, name="c", ingest_chunk_rows=700).report["dataset_version"] == a
    # one changed chosen text changes it
    changed = [dict(r) for r in rows]
    changed[1234]["chosen"] += "!"
    assert Run(tmp_path, changed, name="d").report["dataset_version"] != a
    # so does a label
    relabelled = [dict(r) for r in rows]
    relabelled[10]["p_chosen"] = 0.55
    assert Run(tmp_path, relabelled, name="e").report["dataset_version"] != a
    # and the order of rows
    assert Run(tmp_path, rows[::-1], name="f").report["dataset_version"] != a
    # rows quarantined do not take part: adding an invalid row keeps the version
    assert Run(tmp_path, [*rows, pair(9999, chosen="")], name="g").report["dataset_version"] == a


def test_dataset_version_does_not_depend_on_validation_chunk_rows(tmp_path: Path) -> None:
    rows = [pair(i, p_chosen=0.5 + (i % 5) / 10) for i in range(1, 2501)]
    a = Run(tmp_path, rows, name="a").report["dataset_version"]
    b = Run(tmp_path, rows, DataConfig(chunk_rows=1000), name="b").report["dataset_version"]
    assert a == b


def test_soft_labels_pass_through_unchanged(tmp_path: Path) -> None:
    rows = [
        pair(1, p_chosen=0.7, label_source="ai", margin=0.25),
        pair(2, p_chosen=0.0, label_source="human"),
        pair(3),
    ]
    run = Run(tmp_path, rows)
    assert run.quarantine == []
    got = run.valid[
        ["prompt", "chosen", "rejected", "label_source", "p_chosen", "margin", "source_row"]
    ]
    assert got.iloc[0].tolist() == ["prompt 1", "good answer 1", "bad answer 1", "ai", 0.7, 0.25, 1]
    assert got.iloc[1, :5].tolist() == ["prompt 2", "good answer 2", "bad answer 2", "human", 0.0]
    assert np.isnan(got.iloc[1]["margin"]) and np.isnan(got.iloc[2]["margin"])
    assert got.iloc[2]["p_chosen"] == 1.0  # no label -> a hard preference
    assert set(run.valid["source"]) == {str(run.src)}


# -- splits ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def valid_5000(tmp_path_factory) -> Path:
    """~5000 valid pairs over 2000 prompts (each prompt repeated 1-4 times)."""
    root = tmp_path_factory.mktemp("splits")
    rng = np.random.default_rng(0)
    rows = []
    for p in range(2000):
        for k in range(int(rng.integers(1, 5))):
            rows.append(
                {
                    "prompt": f"question {p}",
                    "chosen": f"answer {p}.{k}",
                    "rejected": f"wrong {p}.{k}",
                }
            )
    src = write_jsonl(root / "pairs.jsonl", rows)
    ingest_sources([SourceConfig(path=str(src))], root / "ingest", chunk_rows=1000)
    report = validate_normalised(
        root / "ingest", root / "valid", DataConfig(chunk_rows=1000), enforce=True
    )
    assert report["valid"] == len(rows) and 4000 < len(rows) < 6000
    return root / "valid"


def _read_splits(folder: Path) -> dict[str, pd.DataFrame]:
    return {s: pd.read_parquet(folder / f"{s}.parquet") for s in ("train", "val", "test")}


def test_make_splits(valid_5000: Path, tmp_path: Path) -> None:
    ratios = SplitRatios(train=0.8, val=0.1, test=0.1)
    manifest = make_splits(valid_5000, tmp_path / "s1", ratios, seed=0, chunk_rows=1000)
    valid_report = json.loads((valid_5000 / "report.json").read_text())
    n = valid_report["valid"]
    assert manifest == json.loads((tmp_path / "s1" / "manifest.json").read_text())
    assert sum(manifest["counts"].values()) == n
    assert manifest["dataset_version"] == valid_report["dataset_version"]
    assert manifest["seed"] == 0 and manifest["ratios"] == {"train": 0.8, "val": 0.1, "test": 0.1}
    splits = _read_splits(tmp_path / "s1")
    assert {s: len(f) for s, f in splits.items()} == manifest["counts"]

    # every valid row lands in exactly one split
    valid = pd.read_parquet(valid_5000 / "valid.parquet")
    all_rows = sorted(pd.concat(splits.values())["source_row"].tolist())
    assert all_rows == sorted(valid["source_row"].tolist())

    # no prompt in two splits
    prompts = {s: set(f["prompt"]) for s, f in splits.items()}
    assert not prompts["train"] & prompts["val"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["val"] & prompts["test"]

    # ratios roughly respected
    assert 0.75 < manifest["counts"]["train"] / n < 0.85
    assert 0.06 < manifest["counts"]["val"] / n < 0.14
    assert 0.06 < manifest["counts"]["test"] / n < 0.14

    # deterministic (and independent of the chunk size)
    make_splits(valid_5000, tmp_path / "s2", ratios, seed=0)
    again = _read_splits(tmp_path / "s2")
    for s in splits:
        pd.testing.assert_frame_equal(
            splits[s].sort_values("source_row").reset_index(drop=True),
            again[s].sort_values("source_row").reset_index(drop=True),
        )

    # another seed gives another assignment with the same guarantees
    other = make_splits(valid_5000, tmp_path / "s3", ratios, seed=1)
    other_splits = _read_splits(tmp_path / "s3")
    assert set(other_splits["val"]["prompt"]) != prompts["val"]
    assert sum(other["counts"].values()) == n
    assert no_partials(tmp_path)


def test_make_splits_other_ratios(valid_5000: Path, tmp_path: Path) -> None:
    manifest = make_splits(
        valid_5000, tmp_path / "s", SplitRatios(train=0.5, val=0.5, test=0.0), seed=3
    )
    n = sum(manifest["counts"].values())
    assert manifest["counts"]["test"] == 0
    assert 0.45 < manifest["counts"]["train"] / n < 0.55
    splits = _read_splits(tmp_path / "s")
    assert len(splits["test"]) == 0
    assert not set(splits["train"]["prompt"]) & set(splits["val"]["prompt"])


def test_unlabelled_source_and_missing_label(tmp_path):
    """label_source: none marks unlabelled pairs (p_chosen empty); a labelled pair without p_chosen is quarantined."""
    import json as _json

    from rlhf_core.config import DataConfig, SourceConfig
    from rlhf_core.data.dataset import ingest_sources, validate_normalised

    src = tmp_path / "unlabelled.jsonl"
    src.write_text(
        "".join(
            _json.dumps({"prompt": f"q{i}", "chosen": f"first {i}", "rejected": f"second {i}"})
            + "\n"
            for i in range(5)
        )
    )
    ingest_sources([SourceConfig(path=str(src), label_source="none")], tmp_path / "ing")
    report = validate_normalised(tmp_path / "ing", tmp_path / "val", DataConfig())
    assert report["valid"] == 5
    valid = pd.read_parquet(tmp_path / "val" / "valid.parquet")
    assert set(valid["label_source"]) == {"none"} and valid["p_chosen"].isna().all()

    labelled = tmp_path / "labelled.jsonl"
    labelled.write_text(
        _json.dumps(
            {
                "prompt": "q",
                "chosen": "a",
                "rejected": "b",
                "p_chosen": None,
                "label_source": "human",
            }
        )
        + "\n"
        + _json.dumps({"prompt": "q2", "chosen": "a", "rejected": "b", "label_source": "robot"})
        + "\n"
    )
    ingest_sources([SourceConfig(path=str(labelled))], tmp_path / "ing2")
    report = validate_normalised(
        tmp_path / "ing2", tmp_path / "val2", DataConfig(max_invalid_fraction=1.0)
    )
    # a labelled pair with an explicit null label is unknown, not certain
    assert report["valid"] == 0 and report["reasons"] == {
        "field 'p_chosen' is null: an unknown label (leave it out for 1.0)": 1,
        "label_source must be 'human', 'ai' or 'none'": 1,
    }


# -- the gate counts source records, and labels are never invented ----------------------------------------


def ranked(i: int, k: int = 5, **kw) -> dict:
    return {
        "prompt": f"rank prompt {i}",
        "responses": [f"answer {i}.{j}" for j in range(k)],
        "ranks": list(range(1, k + 1)),
        **kw,
    }


def test_gate_counts_ranked_records_not_the_pairs_they_give(tmp_path: Path) -> None:
    # 7 good lists of 5 give 70 pairs; 3 broken records are 30% of the source, not 3 / 73 = 4%
    rows = [ranked(i) for i in range(7)] + [ranked(i, ranks=None) for i in range(7, 10)]
    run = Run(tmp_path, rows, DataConfig(max_invalid_fraction=0.05))
    assert run.report["valid"] == 70 and run.report["records"] == 10
    assert run.report["invalid_records"] == 3
    assert run.report["invalid_fraction"] == pytest.approx(0.3)
    assert run.report["passed"] is False


def test_a_record_with_several_bad_pairs_counts_once(tmp_path: Path) -> None:
    # record 1 repeats one answer at three ranks: 3 of its 10 pairs compare a text with itself
    # and 4 repeat an earlier pair
    dup = ranked(0)
    dup["responses"][1] = dup["responses"][0]
    dup["responses"][2] = dup["responses"][0]
    run = Run(tmp_path, [dup] + [ranked(i) for i in range(1, 4)])
    assert run.report["quarantined_at_validation"] == 7
    assert run.report["invalid_records"] == 1
    assert run.report["invalid_fraction"] == pytest.approx(1 / 4)


@pytest.mark.parametrize("chunk_rows", [1000, 1])  # arrow's fast path and the exact one
def test_explicit_null_p_chosen_is_quarantined_not_read_as_certain(
    tmp_path: Path, chunk_rows: int
) -> None:
    rows = [
        pair(1, p_chosen=None),  # explicit null: unknown, not 1.0
        pair(2, p_chosen=0.7),
        pair(3),  # left out: a hard label
        pair(4, p_chosen=None, label_source="ai"),
        pair(5, p_chosen=None, label_source="none"),  # unlabelled on purpose: kept, no label
    ]
    run = Run(tmp_path, rows, ingest_chunk_rows=chunk_rows)
    reason = "field 'p_chosen' is null: an unknown label (leave it out for 1.0)"
    assert run.reasons_by_row == {1: [reason], 4: [reason]}
    assert [q["record"]["p_chosen"] for q in run.quarantine] == [None, None]
    p = run.valid.set_index("source_row")["p_chosen"]
    assert p[2] == 0.7 and p[3] == 1.0 and np.isnan(p[5])
