"""Agreement of the offline judges with real human labels (HH-RLHF harmless sample), logged to MLflow.

    python benchmarks/judge_agreement.py [--data ../shared/data/hh-rlhf-harmless-base.sample.jsonl.gz]
        [--hf-model DIR] [--limit N] [--tracking-uri sqlite:///.rlhf/mlflow.db] [--json]

One MLflow run per (judge, constitution) in the experiment 'judge-agreement', with accuracy, Cohen's
kappa, ECE, position consistency and pairs/s, plus the calibration plot. The figures in the README
come from this script.
"""

from __future__ import annotations

import gzip
import json
import sys
import tempfile
from pathlib import Path

import common  # first: puts the repository root on sys.path
from common import HH_FILE, ROOT, SHARED_DATA, log_numeric_metrics, mlflow_run

common.env_defaults(HF_HUB_OFFLINE="1")

import numpy as np  # noqa: E402

from rlhf_core.config import JudgeConfig  # noqa: E402
from rlhf_core.data.formats import split_hh_dialogue  # noqa: E402
from rlhf_core.judges.constitution import load_constitution  # noqa: E402
from rlhf_core.judges.labeling import agreement_report, label_pairs  # noqa: E402
from rlhf_core.plots import reliability_plot  # noqa: E402

DEFAULT_DATA = SHARED_DATA / HH_FILE


def load_hh(path: Path, limit: int | None) -> tuple[list[str], list[str], list[str]]:
    rows = []
    with gzip.open(path, "rt") as fh:
        for line in fh:
            rec = json.loads(line)
            parts = split_hh_dialogue(rec["chosen"], rec["rejected"])
            if parts and parts[1] and parts[2]:
                rows.append(parts)
    rows = rows[:limit] if limit else rows
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def main() -> None:
    ap = common.make_parser(__doc__)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--hf-model", help="a local causal LM folder to measure as the 'hf' judge")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--tracking-uri", default=f"sqlite:///{ROOT / '.rlhf' / 'mlflow.db'}")
    common.add_common_args(ap)
    args = ap.parse_args()
    if not args.data.exists():
        sys.exit(f"error: {args.data}: no such file (set RLHF_SHARED_DATA or --data)")
    prompts, chosen, rejected = load_hh(args.data, args.limit)

    import mlflow

    from rlhf_core.judges.embedding import EmbeddingJudge
    from rlhf_core.judges.hf import HFJudge

    setups = [
        ("embedding", "constitution-harmless.yaml", {"relevance_weight": 0.0}),
        ("embedding", "constitution.yaml", {}),
    ]
    if args.hf_model:
        setups.append(("hf", "constitution-harmless.yaml", {"model_path": args.hf_model}))
    results = []
    for backend, constitution_file, options in setups:
        constitution = load_constitution(ROOT / "configs" / constitution_file)
        if backend == "embedding":
            judge = EmbeddingJudge(constitution, JudgeConfig(**options))
        else:
            settings = JudgeConfig(backend="hf", device="cpu", batch_size=16, **options)
            judge = HFJudge(constitution, settings)
        outcome = label_pairs(judge, prompts, chosen, rejected)
        report = agreement_report(outcome.p, np.ones(len(prompts)))
        row = {
            "judge": backend,
            "constitution": constitution_file,
            "n_pairs": report["n_pairs"],
            "accuracy": round(report["accuracy"], 4),
            "cohen_kappa": round(report["cohen_kappa"], 4),
            "ece": round(report["ece"], 4),
            "position_consistency": outcome.position_consistency,
            "pairs_per_s": round(outcome.pairs_per_s, 1),
        }
        results.append(row)
        run_name = f"{backend}-{constitution_file.removesuffix('.yaml')}"
        with mlflow_run(args.tracking_uri, "judge-agreement", run_name):
            mlflow.log_params(
                {
                    "judge": judge.label_version,
                    "data": str(args.data),
                    "constitution": constitution_file,
                    **options,
                }
            )
            log_numeric_metrics(row)
            with tempfile.TemporaryDirectory() as tmp:
                mlflow.log_artifact(
                    str(
                        reliability_plot(
                            report["calibration"],
                            Path(tmp) / "calibration.png",
                            f"{backend} judge vs HH-RLHF human labels",
                        )
                    )
                )
    if args.json:
        print(json.dumps(results))
    else:
        for r in results:
            print(
                f"{r['judge']:>9} {r['constitution']:<28} n={r['n_pairs']}  agreement {r['accuracy']:.1%}  kappa {r['cohen_kappa']:+.3f}  "
                f"ECE {r['ece']:.3f}  consistency {r['position_consistency'] if r['position_consistency'] is not None else 'n/a'}  "
                f"{r['pairs_per_s']} pairs/s"
            )


if __name__ == "__main__":
    main()
