"""The data stages as plain functions: ingest -> validate -> split.

Each stage streams chunk by chunk and writes its outputs atomically into one folder; stages
hand each other paths, never tables.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from rlhf_core.config import DataConfig, S3Config, SourceConfig, SplitRatios
from rlhf_core.data.formats import (
    NORMALISED_COLUMNS,
    NORMALISERS,
    check_columns,
    detect_format,
    empty_normalised,
)
from rlhf_core.data.readers import ROW, RawChunk, read_hub, read_local
from rlhf_core.data.validate import PreferenceValidator
from rlhf_core.errors import TooManyInvalidRowsError, UnusableInputError
from rlhf_core.storage import atomic_dir, s3_download

Progress = Callable[[int], None]  # called with the number of records just processed

NORMALISED_FILE = "normalised.parquet"
INGEST_FAILURES_FILE = "ingest_failures.jsonl"
VALID_FILE = "valid.parquet"
QUARANTINE_FILE = "quarantine.jsonl"
REPORT_FILE = "report.json"
SPLITS = ("train", "val", "test")

_ARROW_SCHEMA = pa.Schema.from_pandas(empty_normalised(), preserve_index=False)


def to_normalised_arrow(frame: pd.DataFrame) -> pa.Table:
    return pa.Table.from_pandas(
        frame[NORMALISED_COLUMNS], schema=_ARROW_SCHEMA, preserve_index=False
    )


def _chunks_for(source: SourceConfig, chunk_rows: int, s3: S3Config, cache_dir: Path):
    if source.path.startswith("s3://"):
        return read_local(s3_download(source.path, cache_dir, s3), chunk_rows, source.split)
    if source.path.startswith("hf://"):
        return read_hub(source.path, chunk_rows, source.split)
    return read_local(Path(source.path), chunk_rows, source.split)


def ingest_sources(
    sources: list[SourceConfig],
    out_dir: Path,
    *,
    chunk_rows: int = 200_000,
    s3: S3Config | None = None,
    cache_dir: Path | None = None,
    progress: Progress | None = None,
) -> dict:
    """Read and normalise every source into out_dir/normalised.parquet; unparseable records go to
    out_dir/ingest_failures.jsonl. Returns the ingest report (also written as report.json)."""
    if not sources:
        raise UnusableInputError("no data sources configured")
    s3 = s3 or S3Config()
    cache_dir = Path(cache_dir or Path(out_dir).parent / "s3-cache")
    report = {
        "sources": [],
        "records": 0,
        "pairs": 0,
        "ingest_failures": 0,
        "blank_lines": 0,
        "ties_skipped": 0,
    }
    with atomic_dir(Path(out_dir)) as staging:
        writer = pq.ParquetWriter(staging / NORMALISED_FILE, _ARROW_SCHEMA)
        try:
            with open(staging / INGEST_FAILURES_FILE, "wb") as failures_out:
                for source in sources:
                    stats = _ingest_one(
                        source, chunk_rows, s3, cache_dir, writer, failures_out, progress
                    )
                    report["sources"].append(stats)
                    for key in (
                        "records",
                        "pairs",
                        "ingest_failures",
                        "blank_lines",
                        "ties_skipped",
                    ):
                        report[key] += stats[key]
        finally:
            writer.close()
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return report


def _ingest_one(
    source: SourceConfig, chunk_rows, s3, cache_dir, writer, failures_out, progress
) -> dict:
    where = source.path
    fmt = None if source.format == "auto" else source.format
    stats = {
        "path": source.path,
        "format": fmt,
        "records": 0,
        "pairs": 0,
        "ingest_failures": 0,
        "blank_lines": 0,
        "ties_skipped": 0,
    }
    chunk: RawChunk
    for chunk in _chunks_for(source, chunk_rows, s3, cache_dir):
        columns = [c for c in chunk.frame.columns if c != ROW]
        if stats["format"] is None:
            if not columns and not len(chunk.frame):
                # a chunk of only broken or blank lines says nothing about the format yet
                pass
            else:
                stats["format"] = detect_format(columns, source.columns, where)
        if stats["format"] is not None and stats["records"] == 0 and len(chunk.frame):
            check_columns(stats["format"], columns, source.columns, where)
        failures = list(chunk.failures)
        if len(chunk.frame) and stats["format"] is not None:
            norm = NORMALISERS[stats["format"]](
                chunk.frame, source.path, source.label_source, source.columns
            )
            failures += norm.failures
            stats["ties_skipped"] += norm.ties_skipped
            if (
                source.label_source == "none"
            ):  # unlabelled: which response is 'chosen' means nothing yet
                norm.frame["label_source"] = "none"
                norm.frame["p_chosen"] = np.nan
            if len(norm.frame):
                writer.write_table(to_normalised_arrow(norm.frame))
            stats["pairs"] += len(norm.frame)
        elif len(chunk.frame):
            raise UnusableInputError(f"{where}: no recognisable preference format")
        if failures and "first_failure" not in stats:
            stats["first_failure"] = failures[0]["reasons"][0]
        for f in failures:
            failures_out.write(
                orjson.dumps(
                    {"source": source.path, "stage": "ingest", **f},
                    option=orjson.OPT_SERIALIZE_NUMPY,
                )
                + b"\n"
            )
        n_records = len(chunk.frame) + len(chunk.failures)
        stats["records"] += n_records
        stats["ingest_failures"] += len(failures)
        stats["blank_lines"] += chunk.blank_lines
        if progress:
            progress(n_records)
    if stats["records"] == 0:
        raise UnusableInputError(f"{where}: no records")
    if stats["format"] is None:
        raise UnusableInputError(
            f"{where}: no record could be parsed (first problem: {stats.get('first_failure', 'unknown')})"
        )
    stats.pop("first_failure", None)
    return stats


def reason_kind(reason: str) -> str:
    """Group reasons for counting: drop the specifics (positions, offending values)."""
    if reason.startswith("broken JSON"):
        return "broken JSON"
    reason = re.sub(r" at byte \d+$", "", reason)
    reason = re.sub(r" \(got \w+\)$", "", reason)
    reason = re.sub(r" \(.*\)$", "", reason) if reason.startswith("malformed CSV") else reason
    return re.sub(r", got .*$", "", reason)


def _length_stats(lengths: np.ndarray) -> dict:
    if not len(lengths):
        return {"mean": 0.0, "p50": 0, "p95": 0, "max": 0}
    return {
        "mean": round(float(lengths.mean()), 1),
        "p50": int(np.percentile(lengths, 50)),
        "p95": int(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
    }


_RECORD_FIELDS = ("prompt", "chosen", "rejected", "label_source", "p_chosen", "margin")


def _content_bytes(valid: pd.DataFrame, hashes: np.ndarray) -> bytes:
    """What the dataset version digests: the pair hash and label fields, row-major, so the digest
    does not depend on how the rows were chunked."""
    return np.column_stack(
        [
            hashes.astype(np.uint64),
            valid["p_chosen"].to_numpy("float64").view(np.uint64),
            valid["margin"].to_numpy("float64").view(np.uint64),
            (valid["label_source"] == "ai").to_numpy().astype(np.uint64),
        ]
    ).tobytes()


def validate_normalised(
    ingest_dir: Path,
    out_dir: Path,
    data: DataConfig,
    *,
    progress: Progress | None = None,
    enforce: bool = True,
) -> dict:
    """Validate ingest_dir's normalised table. Writes valid.parquet, quarantine.jsonl (ingest failures
    plus rule failures, each with its reasons) and report.json to out_dir; every input record is
    accounted for. Raises TooManyInvalidRowsError (after writing everything) when over the limit."""
    ingest_dir = Path(ingest_dir)
    ingest_report = json.loads((ingest_dir / REPORT_FILE).read_text())
    validator = PreferenceValidator(
        data.max_prompt_chars, data.max_response_chars, data.drop_duplicates
    )
    reasons: Counter[str] = Counter()
    lengths = {"prompt": [], "chosen": [], "rejected": []}
    n_valid = n_invalid = 0
    # the gate counts source records: a ranked record gives many pairs, and one bad pair spoils it
    bad_records: dict[str, set[int]] = {}
    digest = hashlib.sha256()
    with atomic_dir(Path(out_dir)) as staging:
        with open(staging / QUARANTINE_FILE, "wb") as quarantine:
            with open(ingest_dir / INGEST_FAILURES_FILE, "rb") as fh:
                for line in fh:
                    quarantine.write(line)
                    for r in orjson.loads(line)["reasons"]:
                        reasons[reason_kind(r)] += 1
            writer = pq.ParquetWriter(staging / VALID_FILE, _ARROW_SCHEMA)
            try:
                for batch in pq.ParquetFile(ingest_dir / NORMALISED_FILE).iter_batches(
                    batch_size=data.chunk_rows
                ):
                    frame = batch.to_pandas()
                    ok, why, hashes = validator.validate(frame)
                    if why:
                        positions = sorted(why)
                        bad_rows = frame.iloc[positions][["source", "source_row", *_RECORD_FIELDS]]
                        bad_rows = (
                            bad_rows.astype(object).where(bad_rows.notna(), None).to_dict("records")
                        )
                        for pos, rec in zip(positions, bad_rows):
                            bad_records.setdefault(rec["source"], set()).add(int(rec["source_row"]))
                            quarantine.write(
                                orjson.dumps(
                                    {
                                        "source": rec["source"],
                                        "stage": "validate",
                                        "source_row": int(rec["source_row"]),
                                        "reasons": why[pos],
                                        "record": {k: rec[k] for k in _RECORD_FIELDS},
                                    }
                                )
                                + b"\n"
                            )
                            for r in why[pos]:
                                reasons[reason_kind(r)] += 1
                    valid = frame[ok]
                    if len(valid):
                        writer.write_table(to_normalised_arrow(valid))
                        digest.update(_content_bytes(valid, hashes[ok]))
                        for col in lengths:
                            lengths[col].append(valid[col].str.len().to_numpy())
                    n_valid += len(valid)
                    n_invalid += len(frame) - len(valid)
                    if progress:
                        progress(len(frame))
            finally:
                writer.close()
        n_failed_ingest = ingest_report["ingest_failures"]
        n_records = ingest_report["records"]
        invalid_records = n_failed_ingest + sum(len(rows) for rows in bad_records.values())
        invalid_fraction = invalid_records / n_records if n_records else 1.0
        report = {
            "dataset_version": digest.hexdigest()[:16],
            "sources": ingest_report["sources"],
            "records": ingest_report["records"],
            "pairs_normalised": ingest_report["pairs"],
            "valid": n_valid,
            "quarantined": n_invalid + n_failed_ingest,
            "quarantined_at_ingest": n_failed_ingest,
            "quarantined_at_validation": n_invalid,
            "invalid_records": invalid_records,
            "blank_lines": ingest_report["blank_lines"],
            "ties_skipped": ingest_report["ties_skipped"],
            "invalid_fraction": round(invalid_fraction, 6),
            "max_invalid_fraction": data.max_invalid_fraction,
            "passed": invalid_fraction <= data.max_invalid_fraction,
            "reasons": dict(reasons.most_common()),
            "lengths_chars": {
                c: _length_stats(np.concatenate(v) if v else np.array([]))
                for c, v in lengths.items()
            },
        }
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2))
    if enforce and not report["passed"]:
        raise gate_error(report, Path(out_dir))
    return report


def gate_error(report: dict, out_dir: Path) -> TooManyInvalidRowsError:
    """The one-line error of a validation report that did not pass."""
    return TooManyInvalidRowsError(
        f"{report['invalid_fraction']:.1%} of source records are invalid "
        f"(limit data.max_invalid_fraction={report['max_invalid_fraction']:g}); "
        f"see {Path(out_dir) / QUARANTINE_FILE}"
    )


def split_by_prompt(prompts: pd.Series, ratios: SplitRatios, seed: int) -> np.ndarray:
    """0/1/2 = train/val/test per row, from a hash of the prompt: one prompt never lands in two splits."""
    key = f"{seed:016d}"[-16:]
    u = (
        pd.util.hash_pandas_object(prompts, index=False, hash_key=key).to_numpy() % 1_000_000
    ) / 1_000_000
    return np.where(u < ratios.train, 0, np.where(u < ratios.train + ratios.val, 1, 2)).astype(
        np.int8
    )


def make_splits(
    valid_dir: Path, out_dir: Path, ratios: SplitRatios, seed: int, *, chunk_rows: int = 200_000
) -> dict:
    """Write train/val/test parquet files and a manifest.json with the dataset version and counts."""
    valid_report = json.loads((Path(valid_dir) / REPORT_FILE).read_text())
    counts = dict.fromkeys(SPLITS, 0)
    with atomic_dir(Path(out_dir)) as staging:
        writers = {s: pq.ParquetWriter(staging / f"{s}.parquet", _ARROW_SCHEMA) for s in SPLITS}
        try:
            for batch in pq.ParquetFile(Path(valid_dir) / VALID_FILE).iter_batches(
                batch_size=chunk_rows
            ):
                frame = batch.to_pandas()
                which = split_by_prompt(frame["prompt"], ratios, seed)
                for code, name in enumerate(SPLITS):
                    part = frame[which == code]
                    if len(part):
                        writers[name].write_table(to_normalised_arrow(part))
                        counts[name] += len(part)
        finally:
            for w in writers.values():
                w.close()
        manifest = {
            "dataset_version": valid_report["dataset_version"],
            "counts": counts,
            "ratios": ratios.model_dump(),
            "seed": seed,
            "files": {s: f"{s}.parquet" for s in SPLITS},
        }
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def read_valid_pairs(
    path: str,
    data: DataConfig,
    *,
    fmt: str = "auto",
    s3: S3Config | None = None,
    cache_dir: Path | None = None,
    quarantine_dir: Path | None = None,
) -> tuple[pd.DataFrame, dict]:
    """One preference source (anything `rlhf data validate` accepts, or a split parquet the pipeline
    wrote) -> its valid rows, after the same ingest and validation as the pipeline. Bad rows go to
    quarantine_dir (kept) and too many of them stop here with the usual one-line error."""
    import tempfile

    if not path.startswith(("s3://", "hf://")) and not Path(path).exists():
        raise UnusableInputError(f"{path}: no such file")
    with tempfile.TemporaryDirectory(prefix="rlhf-pairs-") as tmp:
        ingest_sources(
            [SourceConfig(path=path, format=fmt)],
            Path(tmp) / "ingest",
            chunk_rows=data.chunk_rows,
            s3=s3,
            cache_dir=cache_dir or Path(tmp) / "s3-cache",
        )
        out = Path(quarantine_dir) if quarantine_dir else Path(tmp) / "valid"
        report = validate_normalised(Path(tmp) / "ingest", out, data)
        frame = pd.read_parquet(out / VALID_FILE)
    return frame, report
