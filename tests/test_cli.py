"""The CLI as a user runs it: a real subprocess, real files, exit codes and one-line errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def rlhf(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(
        [sys.executable, "-m", "flows.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def touch(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


GOOD = [
    {"prompt": f"q{i}", "chosen": f"good answer {i}", "rejected": f"bad answer {i}"}
    for i in range(40)
]


def test_validate_ok_json_exit_0(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", GOOD + ["{broken"])
    r = rlhf("data", "validate", str(src), "--out", str(tmp_path / "out"), "--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["valid"] == 40 and report["quarantined"] == 1 and report["passed"] is True
    assert report["reasons"] == {"broken JSON": 1}
    for name in ("valid", "quarantine", "report"):
        assert Path(report["outputs"][name]).exists()


def test_validate_over_limit_exit_1_with_summary(tmp_path):
    src = write_jsonl(
        tmp_path / "p.jsonl", GOOD[:5] + [{"prompt": "x", "chosen": "same", "rejected": "same"}] * 3
    )
    r = rlhf("data", "validate", str(src), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 1
    assert "FAILED" in r.stdout and "chosen is the same as rejected" in r.stdout
    assert (tmp_path / "out" / "quarantine.jsonl").read_text().count("\n") == 3


def test_validate_limit_from_set(tmp_path):
    src = write_jsonl(
        tmp_path / "p.jsonl", GOOD[:5] + [{"prompt": "x", "chosen": "same", "rejected": "same"}]
    )
    r = rlhf(
        "data",
        "validate",
        str(src),
        "--out",
        str(tmp_path / "o"),
        "--json",
        "--set",
        "data.max_invalid_fraction=0.5",
        cwd=tmp_path,
    )
    assert r.returncode == 0 and json.loads(r.stdout)["max_invalid_fraction"] == 0.5


@pytest.mark.parametrize(
    "setup, expected",
    [
        (lambda d: d / "missing.jsonl", "no such file"),
        (lambda d: touch(d / "empty.jsonl", ""), "empty file"),
        (
            lambda d: write_jsonl(d / "cols.jsonl", [{"question": "a", "answer": "b"}]),
            "no recognisable preference format",
        ),
        (lambda d: touch(d / "x.txt", "hi"), "unknown file type"),
    ],
)
def test_validate_unusable_input_exit_2_one_line(tmp_path, setup, expected):
    path = setup(tmp_path)
    r = rlhf("data", "validate", str(path), "--out", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expected in lines[0], r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "out").exists()


def test_validate_missing_columns_for_explicit_format_exit_2(tmp_path):
    src = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "chosen": "b"}])
    r = rlhf("data", "validate", str(src), "--format", "pairwise", cwd=tmp_path)
    assert r.returncode == 2 and "missing required column(s) rejected" in r.stderr


def test_bad_config_is_one_line_exit_2(tmp_path):
    (tmp_path / "c.yaml").write_text("data:\n  surces: []\n")
    r = rlhf("run", "--config", "c.yaml", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip() == "error: c.yaml: data.surces: unknown key"


def test_demo_writes_files(tmp_path):
    r = rlhf(
        "data",
        "demo",
        "--out",
        str(tmp_path / "demo"),
        "--n-prompts",
        "50",
        "--n-heldout",
        "10",
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    prefs = (tmp_path / "demo" / "preferences.jsonl").read_text().splitlines()
    assert (
        len(prefs) == 50
        and len((tmp_path / "demo" / "heldout_prompts.jsonl").read_text().splitlines()) == 10
    )
    # and what it writes is valid input for the validator
    r = rlhf(
        "data",
        "validate",
        str(tmp_path / "demo" / "preferences.jsonl"),
        "--json",
        "--out",
        str(tmp_path / "v"),
        cwd=tmp_path,
    )
    assert r.returncode == 0 and json.loads(r.stdout)["valid"] == 50
