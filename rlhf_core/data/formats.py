"""Normalise every preference format into one table (see NORMALISED_COLUMNS).

Row-level problems found here (missing fields, wrong types, a dialogue pair with no shared
prompt, a bad label) become quarantine records; problems of the whole source (missing
columns, unknown format) raise UnusableInputError.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rlhf_core.config import ColumnMap
from rlhf_core.data.readers import EXPLICIT_NULL, ROW
from rlhf_core.errors import UnusableInputError

NORMALISED_COLUMNS = [
    "prompt",
    "chosen",
    "rejected",
    "label_source",
    "p_chosen",
    "margin",
    "source",
    "source_row",
]
HH_ASSISTANT = "\n\nAssistant:"
FORMATS = ("pairwise", "hh", "ranked", "comparison")


def empty_normalised() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "prompt": pd.Series([], dtype="str"),
            "chosen": pd.Series([], dtype="str"),
            "rejected": pd.Series([], dtype="str"),
            "label_source": pd.Series([], dtype="str"),
            "p_chosen": pd.Series([], dtype="float64"),
            "margin": pd.Series([], dtype="float64"),
            "source": pd.Series([], dtype="str"),
            "source_row": pd.Series([], dtype="int64"),
        }
    )


def required_columns(fmt: str, cols: ColumnMap) -> list[str]:
    return {
        "pairwise": ["prompt", "chosen", "rejected"],
        "hh": ["chosen", "rejected"],
        "ranked": ["prompt", "responses", "ranks"],
        "comparison": [cols.prompt, cols.response_1, cols.response_2, cols.label],
    }[fmt]


def detect_format(columns: list[str], cols: ColumnMap, where: str) -> str:
    present = set(columns)
    for fmt in ("ranked", "pairwise", "comparison", "hh"):
        if set(required_columns(fmt, cols)) <= present:
            return fmt
    expected = "; ".join(f"{f}: {', '.join(required_columns(f, cols))}" for f in FORMATS)
    raise UnusableInputError(
        f"{where}: no recognisable preference format (columns: {', '.join(sorted(present)) or 'none'}; expected {expected})"
    )


def check_columns(fmt: str, columns: list[str], cols: ColumnMap, where: str) -> None:
    missing = [c for c in required_columns(fmt, cols) if c not in columns]
    if missing:
        raise UnusableInputError(
            f"{where}: missing required column(s) {', '.join(missing)} for format '{fmt}'"
        )


@dataclass
class Normalised:
    frame: pd.DataFrame
    failures: list[dict]
    ties_skipped: int = 0  # ranked: tied pairs of records that gave other pairs
    records_expanded: int = 0  # ranked: records that produced pairs


class _Problems:
    """Collects per-row reasons from vectorised checks; rows with any reason are quarantined."""

    def __init__(self, n: int):
        self.n = n
        self.reasons: dict[int, list[str]] = {}

    def flag(self, mask, reason: str | Callable[[int], str]) -> None:
        for i in np.flatnonzero(np.asarray(mask, dtype=bool)):
            self.reasons.setdefault(int(i), []).append(
                reason(int(i)) if callable(reason) else reason
            )

    @property
    def bad(self) -> np.ndarray:
        mask = np.zeros(self.n, dtype=bool)
        if self.reasons:
            mask[list(self.reasons)] = True
        return mask


def _record_of(frame: pd.DataFrame, i: int) -> dict:
    rec = {
        k: None if isinstance(v, str) and v == EXPLICIT_NULL else v
        for k, v in frame.iloc[i].items()
        if k != ROW
    }
    return json.loads(
        json.dumps(rec, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )


def _is_number(v) -> bool:
    """A real number; arrow-backed columns give numpy scalars, and a bool is not a number here."""
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(
        v, (bool, np.bool_)
    )


def _label_key(v) -> str | None:
    """Canonical text of a label so 1, 1.0, "1" and np.int64(1) compare equal; None when missing."""
    if v is None or (isinstance(v, (float, np.floating)) and np.isnan(v)):
        return None
    if _is_number(v) and float(v).is_integer():
        return str(int(v))
    return str(v).strip()


def _failures(frame: pd.DataFrame, problems: _Problems) -> list[dict]:
    return [
        {"source_row": int(frame[ROW].iloc[i]), "reasons": reasons, "record": _record_of(frame, i)}
        for i, reasons in sorted(problems.reasons.items())
    ]


def _type_name(v) -> str:
    return "null" if v is None or (isinstance(v, float) and np.isnan(v)) else type(v).__name__


def _string_column(frame: pd.DataFrame, name: str, problems: _Problems) -> pd.Series:
    """The column as strings; missing values and non-strings are flagged (never coerced)."""
    if name not in frame.columns:
        problems.flag(np.ones(len(frame), bool), f"missing field '{name}'")
        return pd.Series([""] * len(frame), dtype="str", index=frame.index)
    col = frame[name]
    if pd.api.types.is_string_dtype(col.dtype) and col.dtype != object:
        missing = col.isna().to_numpy()
        problems.flag(missing, f"missing field '{name}'")
        return col.fillna("")
    values = col.to_numpy(dtype=object)
    is_str = np.fromiter((isinstance(v, str) for v in values), bool, len(values))
    is_missing = np.fromiter(
        (v is None or (isinstance(v, float) and np.isnan(v)) for v in values), bool, len(values)
    )
    problems.flag(is_missing, f"missing field '{name}'")
    problems.flag(
        ~is_str & ~is_missing,
        lambda i: f"field '{name}' must be a string, got {_type_name(values[i])}",
    )
    return pd.Series(np.where(is_str, values, ""), dtype="str", index=frame.index)


def _float_column(
    frame: pd.DataFrame,
    name: str,
    default: float | None,
    problems: _Problems,
    unlabelled: pd.Series | None = None,
) -> pd.Series:
    """Optional numeric column: missing -> default; a non-number is flagged, and so is an explicit
    JSON null (EXPLICIT_NULL) except on the rows `unlabelled` marks (there it stays NaN)."""
    if name not in frame.columns:
        return pd.Series(
            np.full(len(frame), np.nan if default is None else default),
            dtype="float64",
            index=frame.index,
        )
    col = frame[name]
    if pd.api.types.is_bool_dtype(col.dtype):
        problems.flag(np.ones(len(frame), bool), f"field '{name}' must be a number, got bool")
        return pd.Series(np.nan, index=frame.index, dtype="float64")
    is_bool = is_null = np.zeros(len(frame), bool)
    if not pd.api.types.is_numeric_dtype(col.dtype):
        is_null = (col.astype(object) == EXPLICIT_NULL).to_numpy()
        allowed = np.zeros(len(frame), bool) if unlabelled is None else unlabelled.to_numpy()
        problems.flag(
            is_null & ~allowed, f"field '{name}' is null: an unknown label (leave it out for 1.0)"
        )
        col = col.astype(object).where(~is_null, None)
    if col.dtype == object:  # mixed JSON values: a bool must not pass as 0/1
        is_bool = np.fromiter(
            (isinstance(v, (bool, np.bool_)) for v in col.to_numpy()), bool, len(col)
        )
        col = col.where(~is_bool, None)
    problems.flag(is_bool, f"field '{name}' must be a number, got bool")
    numeric = pd.to_numeric(col, errors="coerce").astype("float64")
    bad = numeric.isna() & col.notna() & (col.astype("str").str.strip() != "")
    problems.flag(bad.to_numpy(), lambda i: f"field '{name}' must be a number, got {col.iloc[i]!r}")
    if default is not None:
        numeric = numeric.fillna(default).mask(is_null)  # an allowed null stays unknown
    return numeric


def _assemble(
    frame, prompt, chosen, rejected, p_chosen, margin, label_source, source, problems
) -> Normalised:
    bad = problems.bad
    failures = _failures(frame, problems)
    keep = ~bad
    out = pd.DataFrame(
        {
            "prompt": prompt[keep].astype("str"),
            "chosen": chosen[keep].astype("str"),
            "rejected": rejected[keep].astype("str"),
            "label_source": label_source[keep].astype("str"),
            "p_chosen": p_chosen[keep].astype("float64"),
            "margin": margin[keep].astype("float64"),
            "source": pd.Series(source, index=frame.index, dtype="str")[keep],
            "source_row": frame[ROW][keep].astype("int64"),
        }
    ).reset_index(drop=True)
    return Normalised(out, failures)


def _label_source_column(frame, default: str, problems: _Problems) -> pd.Series:
    if "label_source" not in frame.columns:
        return pd.Series(default, index=frame.index, dtype="str")
    col = frame["label_source"]
    return col.where(col.notna(), default).astype("str")


def normalise_pairwise(
    frame: pd.DataFrame, source: str, label_source: str, cols: ColumnMap
) -> Normalised:
    problems = _Problems(len(frame))
    prompt = _string_column(frame, "prompt", problems)
    chosen = _string_column(frame, "chosen", problems)
    rejected = _string_column(frame, "rejected", problems)
    sources = _label_source_column(frame, label_source, problems)
    p_chosen = _float_column(frame, "p_chosen", 1.0, problems, sources == "none")
    margin = _float_column(frame, "margin", None, problems)
    return _assemble(frame, prompt, chosen, rejected, p_chosen, margin, sources, source, problems)


def split_hh_dialogue(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """Prompt = the shared prefix up to and including the last '\\n\\nAssistant:'; None when there is none."""
    k = chosen.rfind(HH_ASSISTANT)
    while k >= 0:
        end = k + len(HH_ASSISTANT)
        if rejected.startswith(chosen[:end]):
            return chosen[:end], chosen[end:].lstrip(), rejected[end:].lstrip()
        k = chosen.rfind(HH_ASSISTANT, 0, k)
    return None


def normalise_hh(
    frame: pd.DataFrame, source: str, label_source: str, cols: ColumnMap
) -> Normalised:
    problems = _Problems(len(frame))
    chosen_full = _string_column(frame, "chosen", problems)
    rejected_full = _string_column(frame, "rejected", problems)
    n = len(frame)
    prompts, chosen, rejected = [""] * n, [""] * n, [""] * n
    no_prompt = np.zeros(n, bool)
    for i, (c, r) in enumerate(zip(chosen_full.tolist(), rejected_full.tolist())):
        parts = split_hh_dialogue(c, r)
        if parts is None:
            no_prompt[i] = True
        else:
            prompts[i], chosen[i], rejected[i] = parts
    already = problems.bad
    problems.flag(
        no_prompt & ~already,
        "no shared prompt: the two dialogues share no prefix ending in '\\n\\nAssistant:'",
    )
    idx = frame.index
    sources = _label_source_column(frame, label_source, problems)
    return _assemble(
        frame,
        pd.Series(prompts, index=idx, dtype="str"),
        pd.Series(chosen, index=idx, dtype="str"),
        pd.Series(rejected, index=idx, dtype="str"),
        _float_column(frame, "p_chosen", 1.0, problems, sources == "none"),
        _float_column(frame, "margin", None, problems),
        sources,
        source,
        problems,
    )


def normalise_comparison(
    frame: pd.DataFrame, source: str, label_source: str, cols: ColumnMap
) -> Normalised:
    problems = _Problems(len(frame))
    prompt = _string_column(frame, cols.prompt, problems)
    a = _string_column(frame, cols.response_1, problems)
    b = _string_column(frame, cols.response_2, problems)
    raw = (
        frame[cols.label].to_numpy(dtype=object)
        if cols.label in frame.columns
        else np.full(len(frame), None)
    )
    label = np.array([_label_key(v) for v in raw], dtype=object)
    first, second = (_label_key(v) for v in cols.label_values)
    first_wins = label == first
    second_wins = label == second
    raw_label = frame[cols.label] if cols.label in frame.columns else None
    problems.flag(
        ~first_wins & ~second_wins,
        lambda i: (
            f"field '{cols.label}' must be {first} or {second}, got {raw_label.iloc[i] if raw_label is not None else None!r}"
        ),
    )
    chosen = pd.Series(np.where(first_wins, a, b), index=frame.index, dtype="str")
    rejected = pd.Series(np.where(first_wins, b, a), index=frame.index, dtype="str")
    return _assemble(
        frame,
        prompt,
        chosen,
        rejected,
        pd.Series(1.0, index=frame.index),
        _float_column(frame, "margin", None, problems),
        _label_source_column(frame, label_source, problems),
        source,
        problems,
    )


def normalise_ranked(
    frame: pd.DataFrame, source: str, label_source: str, cols: ColumnMap
) -> Normalised:
    """k ranked responses -> all k(k-1)/2 ordered pairs (rank 1 is best); ties are skipped and counted."""
    problems = _Problems(len(frame))
    prompt = _string_column(frame, "prompt", problems)
    out_rows, ties, expanded = [], 0, 0
    responses_col = (
        frame["responses"].to_numpy(dtype=object)
        if "responses" in frame.columns
        else [None] * len(frame)
    )
    ranks_col = (
        frame["ranks"].to_numpy(dtype=object) if "ranks" in frame.columns else [None] * len(frame)
    )
    bad_before = problems.bad
    for i in range(len(frame)):
        responses, ranks = responses_col[i], ranks_col[i]
        reason = None
        if responses is None or not hasattr(responses, "__len__") or isinstance(responses, str):
            reason = f"field 'responses' must be a list of strings, got {_type_name(responses)}"
        elif ranks is None or not hasattr(ranks, "__len__") or isinstance(ranks, str):
            reason = f"field 'ranks' must be a list of numbers, got {_type_name(ranks)}"
        else:
            responses, ranks = list(responses), list(ranks)
            if len(responses) != len(ranks):
                reason = f"'responses' has {len(responses)} items but 'ranks' has {len(ranks)}"
            elif len(responses) < 2:
                reason = "fewer than 2 responses to rank"
            elif not all(isinstance(r, str) for r in responses):
                reason = "field 'responses' must be a list of strings"
            elif not all(_is_number(r) and np.isfinite(r) for r in ranks):
                reason = "field 'ranks' must be a list of numbers"
        if reason:
            problems.flag(np.arange(len(frame)) == i, reason)
            continue
        if bad_before[i]:
            continue
        if len(set(ranks)) == 1:  # nothing to learn, but the record is accounted for
            problems.flag(
                np.arange(len(frame)) == i,
                f"all {len(ranks)} responses share rank {ranks[0]:g}: no preference",
            )
            continue
        expanded += 1
        for a in range(len(responses)):
            for b in range(a + 1, len(responses)):
                if ranks[a] == ranks[b]:
                    ties += 1
                    continue
                best, worst = (a, b) if ranks[a] < ranks[b] else (b, a)
                out_rows.append(
                    (prompt.iloc[i], responses[best], responses[worst], int(frame[ROW].iloc[i]))
                )
    failures = _failures(frame, problems)
    ls = label_source
    out = (
        empty_normalised()
        if not out_rows
        else pd.DataFrame(
            {
                "prompt": pd.Series([r[0] for r in out_rows], dtype="str"),
                "chosen": pd.Series([r[1] for r in out_rows], dtype="str"),
                "rejected": pd.Series([r[2] for r in out_rows], dtype="str"),
                "label_source": pd.Series([ls] * len(out_rows), dtype="str"),
                "p_chosen": np.ones(len(out_rows)),
                "margin": np.full(len(out_rows), np.nan),
                "source": pd.Series([source] * len(out_rows), dtype="str"),
                "source_row": np.array([r[3] for r in out_rows], dtype="int64"),
            }
        )
    )
    return Normalised(out, failures, ties_skipped=ties, records_expanded=expanded)


NORMALISERS = {
    "pairwise": normalise_pairwise,
    "hh": normalise_hh,
    "ranked": normalise_ranked,
    "comparison": normalise_comparison,
}
