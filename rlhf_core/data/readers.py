"""Chunked readers: every source becomes a stream of `RawChunk`s (a DataFrame of records plus the
records that could not be parsed), so a multi-GB file never has to fit in memory at once.

Each record keeps its position in the source (`__row`: the 1-based line for line-oriented files,
the 1-based record index otherwise) so a quarantined row can be found again.
"""

from __future__ import annotations

import csv
import gzip
import io
import itertools
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import pandas as pd
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from rlhf_core.errors import UnusableInputError

ROW = "__row"
FILE_SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv", ".parquet")

# In JSON a field left out takes its format's default (p_chosen: a hard label) while an explicit
# null means "unknown": the readers mark the null so the normaliser can quarantine it.
NULL_IS_UNKNOWN = ("p_chosen",)
EXPLICIT_NULL = "\x00null"
_EXPLICIT_NULL_RE = re.compile(
    rb'"(?:' + b"|".join(f.encode() for f in NULL_IS_UNKNOWN) + rb')"\s*:\s*null'
)


def mark_explicit_nulls(obj: dict) -> dict:
    for key in NULL_IS_UNKNOWN:
        if key in obj and obj[key] is None:
            obj[key] = EXPLICIT_NULL
    return obj


@dataclass
class RawChunk:
    frame: pd.DataFrame  # one record per row, column ROW = position in the source
    failures: list[dict] = field(default_factory=list)  # {"source_row", "reasons", "record"}
    blank_lines: int = 0


def failure(row: int, reason: str, record) -> dict:
    return {"source_row": int(row), "reasons": [reason], "record": record}


def describe_kind(path: str) -> str:
    """The reader a path needs: 'jsonl', 'json', 'csv', 'parquet', 'datasets', 's3' or 'hub'."""
    if path.startswith("s3://"):
        return "s3"
    if path.startswith("hf://"):
        return "hub"
    p = Path(path)
    if p.is_dir():
        if (
            (p / "dataset_info.json").exists()
            or (p / "dataset_dict.json").exists()
            or (p / "state.json").exists()
        ):
            return "datasets"
        raise UnusableInputError(
            f"{path}: a folder, but not a dataset saved with datasets.save_to_disk"
        )
    name = p.name.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for suffix in FILE_SUFFIXES:
        if name.endswith(suffix):
            return {".ndjson": "jsonl"}.get(suffix, suffix[1:])
    raise UnusableInputError(
        f"{path}: unknown file type (expected one of {', '.join(FILE_SUFFIXES)}, optionally .gz)"
    )


def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise UnusableInputError(f"{path}: no such file")
    if not path.is_file():
        raise UnusableInputError(f"{path}: not a file")
    if path.stat().st_size == 0:
        raise UnusableInputError(f"{path}: empty file")


def _undecodable(text: str) -> bool:
    # surrogateescape maps undecodable bytes to lone surrogates
    return any("\udc80" <= ch <= "\udcff" for ch in text)


# -- JSON lines -----------------------------------------------------------------------------


def _parse_lines_exactly(numbered: list[tuple[int, bytes]]) -> RawChunk:
    """Slow, exact path: one record at a time, every failure with its own reason."""
    records, rows, failures = [], [], []
    for lineno, raw in numbered:
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            failures.append(
                failure(
                    lineno,
                    f"undecodable bytes (not UTF-8) at byte {exc.start}",
                    raw.decode("utf-8", "replace"),
                )
            )
            continue
        try:
            obj = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            failures.append(failure(lineno, f"broken JSON: {exc}", text.rstrip("\n")))
            continue
        if not isinstance(obj, dict):
            failures.append(
                failure(lineno, f"not a JSON object (got {type(obj).__name__})", text.rstrip("\n"))
            )
            continue
        records.append(mark_explicit_nulls(obj))
        rows.append(lineno)
    frame = pd.DataFrame.from_records(records) if records else pd.DataFrame()
    frame[ROW] = pd.Series(rows, dtype="int64")
    return RawChunk(frame, failures)


def read_jsonl(path: Path, chunk_rows: int) -> Iterator[RawChunk]:
    _check_file(path)
    with _open_binary(path) as fh:
        lineno = 0
        while True:
            lines = list(itertools.islice(fh, chunk_rows))
            if not lines:
                return
            numbered = []
            blank = 0
            for raw in lines:
                lineno += 1
                if raw.strip():
                    numbered.append((lineno, raw))
                else:
                    blank += 1
            if not numbered:
                yield RawChunk(pd.DataFrame({ROW: pd.Series([], dtype="int64")}), blank_lines=blank)
                continue
            chunk = None
            # Fast path: arrow parses the whole chunk at once; any irregularity (broken line,
            # mixed types, bad UTF-8) sends the chunk to the exact path so nothing is lost.
            try:
                blob = b"".join(raw if raw.endswith(b"\n") else raw + b"\n" for _, raw in numbered)
                blob.decode("utf-8")  # arrow does not check UTF-8 inside strings
                if _EXPLICIT_NULL_RE.search(blob):  # arrow reads a null like a missing field
                    raise pa.ArrowInvalid("explicit null label")
                table = pa_json.read_json(
                    io.BytesIO(blob),
                    read_options=pa_json.ReadOptions(block_size=max(1 << 20, len(blob) + 1)),
                )
                # arrow turns date-like strings into timestamps: such a chunk goes the exact way
                inferred_dates = any(pa.types.is_temporal(f.type) for f in table.schema)
                if table.num_rows == len(numbered) and not inferred_dates:
                    frame = table.to_pandas()
                    frame[ROW] = pd.Series([n for n, _ in numbered], dtype="int64")
                    chunk = RawChunk(frame)
            except (
                pa.ArrowInvalid,
                pa.ArrowNotImplementedError,
                pa.ArrowTypeError,
                UnicodeDecodeError,
            ):
                chunk = None
            if chunk is None:
                chunk = _parse_lines_exactly(numbered)
            chunk.blank_lines = blank
            yield chunk


# -- JSON document --------------------------------------------------------------------------


def read_json(path: Path, chunk_rows: int) -> Iterator[RawChunk]:
    _check_file(path)
    with _open_binary(path) as fh:
        raw = fh.read()
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        # A .json file that is really JSON lines is common enough to accept.
        if raw.lstrip().startswith(b"{") and b"\n" in raw.strip():
            yield from read_jsonl(path, chunk_rows)
            return
        raise UnusableInputError(f"{path}: not valid JSON ({exc})") from None
    if isinstance(doc, dict):
        lists = [k for k in ("data", "rows", "records", "examples") if isinstance(doc.get(k), list)]
        if not lists:
            raise UnusableInputError(
                f"{path}: a JSON object without a list of records (expected a top-level list or a 'data' list)"
            )
        doc = doc[lists[0]]
    if not isinstance(doc, list):
        raise UnusableInputError(f"{path}: expected a list of records, got {type(doc).__name__}")
    if not doc:
        raise UnusableInputError(f"{path}: no records")
    for start in range(0, len(doc), chunk_rows):
        records, rows, failures = [], [], []
        for i, obj in enumerate(doc[start : start + chunk_rows], start=start + 1):
            if isinstance(obj, dict):
                records.append(mark_explicit_nulls(obj))
                rows.append(i)
            else:
                failures.append(
                    failure(
                        i,
                        f"not a JSON object (got {type(obj).__name__})",
                        json.dumps(obj, default=str)[:2000],
                    )
                )
        frame = pd.DataFrame.from_records(records) if records else pd.DataFrame()
        frame[ROW] = pd.Series(rows, dtype="int64")
        yield RawChunk(frame, failures)


# -- CSV ------------------------------------------------------------------------------------


def read_csv(path: Path, chunk_rows: int) -> Iterator[RawChunk]:
    _check_file(path)
    opener = (
        (lambda: gzip.open(path, "rt", encoding="utf-8", errors="surrogateescape", newline=""))
        if path.name.lower().endswith(".gz")
        else (lambda: open(path, encoding="utf-8", errors="surrogateescape", newline=""))
    )
    with opener() as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise UnusableInputError(f"{path}: empty file") from None
        except csv.Error as exc:
            raise UnusableInputError(f"{path}: not valid CSV ({exc})") from None
        header = [h.strip().lstrip("\ufeff") for h in header]
        if len(set(header)) != len(header):
            raise UnusableInputError(f"{path}: duplicate column names in the header: {header}")
        while True:
            columns: list[list] = [[] for _ in header]
            rows, failures, n, blank = [], [], 0, 0
            while n < chunk_rows:
                line = (
                    reader.line_num + 1
                )  # where this record starts (a quoted field may span lines)
                try:
                    values = next(reader)
                except StopIteration:
                    break
                except csv.Error as exc:
                    failures.append(failure(line, f"malformed CSV ({exc})", None))
                    n += 1
                    continue
                n += 1
                if not values or (len(values) == 1 and not values[0].strip()):
                    blank += 1
                    continue
                if len(values) != len(header):
                    failures.append(
                        failure(
                            line,
                            f"malformed CSV row: {len(values)} fields, header has {len(header)}",
                            ",".join(values)[:2000],
                        )
                    )
                    continue
                if any(_undecodable(v) for v in values):
                    failures.append(
                        failure(
                            line,
                            "undecodable bytes (not UTF-8)",
                            ",".join(
                                v.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                                for v in values
                            )[:2000],
                        )
                    )
                    continue
                for col, v in zip(columns, values):
                    col.append(v)
                rows.append(line)
            if n == 0:
                return
            frame = pd.DataFrame({h: pd.Series(c, dtype="str") for h, c in zip(header, columns)})
            frame[ROW] = pd.Series(rows, dtype="int64")
            yield RawChunk(frame, failures, blank_lines=blank)


# -- Arrow-backed sources: parquet, datasets folders, hub ids -------------------------------


def _arrow_batches(batches: Iterator[pa.RecordBatch | pa.Table]) -> Iterator[RawChunk]:
    start = 1
    for batch in batches:
        frame = batch.to_pandas()
        frame[ROW] = pd.Series(range(start, start + len(frame)), dtype="int64")
        start += len(frame)
        yield RawChunk(frame)


def read_parquet(path: Path, chunk_rows: int) -> Iterator[RawChunk]:
    _check_file(path)
    if path.name.lower().endswith(".gz"):
        # Parquet needs a seekable file: decompress next to the work, then read.
        with tempfile.NamedTemporaryFile(suffix=".parquet", delete=False) as tmp:
            with gzip.open(path, "rb") as src:
                shutil.copyfileobj(src, tmp)
        try:
            yield from read_parquet(Path(tmp.name), chunk_rows)
        finally:
            os.unlink(tmp.name)
        return
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise UnusableInputError(f"{path}: not a readable parquet file ({exc})") from None
    if pf.metadata.num_rows == 0:
        raise UnusableInputError(f"{path}: no rows")
    yield from _arrow_batches(pf.iter_batches(batch_size=chunk_rows))


def _pick_split(ds, where: str, split: str | None):
    from datasets import DatasetDict

    if isinstance(ds, DatasetDict):
        if split is None:
            if len(ds) == 1:
                split = next(iter(ds))
            elif "train" in ds:
                split = "train"
            else:
                raise UnusableInputError(
                    f"{where}: several splits {list(ds)}; set the source's 'split'"
                )
        if split not in ds:
            raise UnusableInputError(f"{where}: no split {split!r} (has {list(ds)})")
        ds = ds[split]
    if len(ds) == 0:
        raise UnusableInputError(f"{where}: no rows")
    return ds


def _dataset_chunks(ds, chunk_rows: int) -> Iterator[RawChunk]:
    table = ds.with_format("arrow")
    yield from _arrow_batches(table.iter(batch_size=chunk_rows))


def read_datasets_folder(
    path: Path, chunk_rows: int, split: str | None = None
) -> Iterator[RawChunk]:
    from datasets import load_from_disk

    try:
        ds = load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as exc:
        raise UnusableInputError(f"{path}: cannot load the saved dataset ({exc})") from None
    yield from _dataset_chunks(_pick_split(ds, str(path), split), chunk_rows)


def read_hub(hub_id: str, chunk_rows: int, split: str | None = None) -> Iterator[RawChunk]:
    """For users who are online: `hf://<owner>/<name>`. Not used offline."""
    from datasets import load_dataset

    name = hub_id.removeprefix("hf://")
    try:
        ds = load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - the hub raises many kinds; the user needs one line
        raise UnusableInputError(
            f"{hub_id}: cannot load from the hub ({type(exc).__name__}: {exc})"
        ) from None
    yield from _dataset_chunks(_pick_split(ds, hub_id, split), chunk_rows)


def read_local(path: Path, chunk_rows: int, split: str | None = None) -> Iterator[RawChunk]:
    kind = describe_kind(str(path))
    if kind == "datasets":
        return read_datasets_folder(path, chunk_rows, split)
    return {"jsonl": read_jsonl, "json": read_json, "csv": read_csv, "parquet": read_parquet}[kind](
        path, chunk_rows
    )
