"""Validation of the normalised preference table with pandera.

Rules: required non-empty strings, chosen != rejected, p_chosen in [0, 1], label_source in
{human, ai}, max characters per field, and exact-duplicate pairs (across the whole stream,
not only within a chunk). Validation is lazy: every failing row gets all its reasons.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd
import pandera.pandas as pa
from pandera.typing.pandas import Series

from rlhf_core.data.formats import NORMALISED_COLUMNS


class PreferenceTable(pa.DataFrameModel):
    """The normalised table every later stage reads."""

    prompt: Series[str]
    chosen: Series[str]
    rejected: Series[str]
    label_source: Series[str] = pa.Field(isin=["human", "ai", "none"])  # none: an unlabelled pair
    p_chosen: Series[float] = pa.Field(ge=0.0, le=1.0, nullable=True)
    margin: Series[float] = pa.Field(nullable=True)
    source: Series[str]
    source_row: Series[int] = pa.Field(ge=0)

    @pa.check("prompt", "chosen", "rejected", name="non_empty")
    def _non_empty(cls, s: Series[str]) -> Series[bool]:
        return s.str.strip().str.len() > 0

    @pa.dataframe_check(name="labelled_pair_has_p_chosen")
    def _has_label(cls, df: pd.DataFrame) -> Series[bool]:
        return df["p_chosen"].notna() | (df["label_source"] == "none")

    @pa.check("margin", name="finite")
    def _finite_margin(cls, s: Series[float]) -> Series[bool]:
        return s.isna() | np.isfinite(s)  # inf would dominate every Bradley-Terry loss it enters

    @pa.dataframe_check(name="chosen_differs_from_rejected")
    def _differs(cls, df: pd.DataFrame) -> Series[bool]:
        return df["chosen"].str.strip() != df["rejected"].str.strip()

    class Config:
        strict = True
        ordered = False


def pair_hashes(frame: pd.DataFrame) -> np.ndarray:
    """64-bit hash of (prompt, chosen, rejected) per row: duplicates across chunks at 8 bytes a row."""
    return pd.util.hash_pandas_object(
        frame[["prompt", "chosen", "rejected"]], index=False
    ).to_numpy()


class PreferenceValidator:
    """Validates chunk after chunk; remembers pair hashes so duplicates are caught across chunks."""

    def __init__(
        self, max_prompt_chars: int, max_response_chars: int, drop_duplicates: bool = True
    ):
        self.max_prompt_chars = max_prompt_chars
        self.max_response_chars = max_response_chars
        self.drop_duplicates = drop_duplicates
        self._seen: set[int] = set()
        schema = PreferenceTable.to_schema()
        limits = {
            "prompt": max_prompt_chars,
            "chosen": max_response_chars,
            "rejected": max_response_chars,
        }
        for col, limit in limits.items():
            schema = schema.update_column(
                col, checks=[*schema.columns[col].checks, pa.Check.str_length(max_value=limit)]
            )
        self.schema = schema

    def _reason(self, column, check: str) -> str:
        check = str(check)
        if check.startswith("str_length"):
            limit = self.max_prompt_chars if column == "prompt" else self.max_response_chars
            return f"{column} longer than {limit} characters"
        if check == "non_empty":
            return f"empty {column}"
        if check == "chosen_differs_from_rejected":
            return "chosen is the same as rejected"
        if check == "finite":
            return f"{column} is not finite"
        if check == "labelled_pair_has_p_chosen":
            return "p_chosen missing on a labelled pair"
        if check.startswith("greater_than_or_equal_to") or check.startswith(
            "less_than_or_equal_to"
        ):
            return f"{column} outside [0, 1]" if column == "p_chosen" else f"{column} out of range"
        if check.startswith("isin"):
            return f"{column} must be 'human', 'ai' or 'none'"
        if check == "not_nullable":
            return f"{column} is null"
        return f"{column}: failed {check}"

    def validate(self, frame: pd.DataFrame) -> tuple[np.ndarray, dict[int, list[str]], np.ndarray]:
        """-> (mask of valid rows, reasons by position in `frame`, pair hash per row)."""
        frame = frame[NORMALISED_COLUMNS].reset_index(drop=True)
        reasons: dict[int, list[str]] = defaultdict(list)
        try:
            self.schema.validate(frame, lazy=True)
        except pa.errors.SchemaErrors as err:
            cases = err.failure_cases
            row_cases = cases[cases["index"].notna()]
            if len(row_cases) < len(
                cases
            ):  # a problem of the table itself is a bug upstream, not a bad row
                table_level = cases[cases["index"].isna()].iloc[0]
                raise RuntimeError(
                    f"normalised table breaks its schema: {table_level['check']} on {table_level['column']}"
                ) from None
            for idx, column, check, context in zip(
                row_cases["index"],
                row_cases["column"],
                row_cases["check"],
                row_cases["schema_context"],
            ):
                reason = self._reason(None if context == "DataFrameSchema" else column, check)
                if reason not in reasons[int(idx)]:
                    reasons[int(idx)].append(reason)
        hashes = pair_hashes(frame)
        if self.drop_duplicates:
            # Only rows that pass every other rule compete for "first occurrence": a valid copy of a
            # pair whose first copy was quarantined for another reason is kept.
            otherwise_valid = np.ones(len(frame), bool)
            if reasons:
                otherwise_valid[list(reasons)] = False
            candidates = np.flatnonzero(otherwise_valid)
            cand_hashes = hashes[candidates]
            dup = pd.Series(cand_hashes).duplicated().to_numpy().copy()
            if self._seen:
                dup |= np.fromiter(
                    (h in self._seen for h in cand_hashes.tolist()), bool, len(cand_hashes)
                )
            for i in candidates[dup]:
                reasons[int(i)].append("duplicate of an earlier pair")
            self._seen.update(cand_hashes[~dup].tolist())
        bad = np.zeros(len(frame), bool)
        if reasons:
            bad[list(reasons)] = True
        return ~bad, dict(reasons), hashes
