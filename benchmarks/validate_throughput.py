"""Validation throughput on a generated 1M-row pairwise file (target: < 10 s on 2 cores).

    python benchmarks/validate_throughput.py [--rows 1000000] [--bad-fraction 0.01] [--json]

Times the two stages separately (ingest = parse + normalise, validate = pandera rules +
duplicates + writing valid/quarantine files) and reports rows/s for each and end to end.
"""

from __future__ import annotations

import json
import random
import tempfile
import time
from pathlib import Path

import common  # first: puts the repository root on sys.path

from rlhf_core.config import DataConfig, SourceConfig  # noqa: E402
from rlhf_core.data.dataset import ingest_sources, validate_normalised  # noqa: E402

WORDS = "the a model answer helpful question please explain how why data train reward policy value kind polite short long".split()


def write_file(path: Path, rows: int, bad_fraction: float, seed: int = 0) -> None:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(rows):
            r = rng.random()
            if r < bad_fraction / 3:
                fh.write('{"prompt": "broken json\n')
            elif r < 2 * bad_fraction / 3:
                fh.write(
                    json.dumps({"prompt": f"q{i}", "chosen": "same", "rejected": "same"}) + "\n"
                )
            elif r < bad_fraction:
                fh.write(json.dumps({"prompt": "", "chosen": f"a{i}", "rejected": "b"}) + "\n")
            else:
                words = rng.choices(WORDS, k=12)
                fh.write(
                    json.dumps(
                        {
                            "prompt": f"{i}: " + " ".join(words[:6]) + "?",
                            "chosen": " ".join(words[6:]) + f" {i}.",
                            "rejected": " ".join(reversed(words)) + "!",
                        }
                    )
                    + "\n"
                )


def main() -> None:
    ap = common.make_parser(__doc__)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--bad-fraction", type=float, default=0.01)
    common.add_common_args(ap)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = tmp / "pairs.jsonl"
        write_file(src, args.rows, args.bad_fraction)
        data = DataConfig(max_invalid_fraction=1.0)
        t0 = time.perf_counter()
        ingest_sources([SourceConfig(path=str(src))], tmp / "ingest", chunk_rows=data.chunk_rows)
        t1 = time.perf_counter()
        report = validate_normalised(tmp / "ingest", tmp / "valid", data)
        t2 = time.perf_counter()
    result = {
        "rows": args.rows,
        "valid": report["valid"],
        "quarantined": report["quarantined"],
        "ingest_s": round(t1 - t0, 2),
        "validate_s": round(t2 - t1, 2),
        "total_s": round(t2 - t0, 2),
        "ingest_rows_per_s": round(args.rows / (t1 - t0)),
        "validate_rows_per_s": round(args.rows / (t2 - t1)),
        "end_to_end_rows_per_s": round(args.rows / (t2 - t0)),
        "target_s": 10.0,
        "meets_target": (t2 - t0) < 10.0,
    }
    common.print_result(result, args.json, key_width=22)


if __name__ == "__main__":
    main()
