"""Reward-model quality on real human preferences: the HH-RLHF harmless sample in ../shared/data.

Splits the sample by prompt with the pipeline's own splitter (80/10/10, seed 0), trains a reward
model on the packaged pretrained all-MiniLM-L6-v2 encoder (CPU, minutes), evaluates on the test
split and logs everything to the MLflow experiment `reward-quality`.

    python benchmarks/reward_quality_hh.py [--split-seed 0] [--epochs 2] [--lr 3e-5] [--max-length 128] [--json]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import common  # first: puts the repository root on sys.path
from common import (
    HH_FILE,
    SHARED_DATA,
    add_common_args,
    log_numeric_metrics,
    mlflow_run,
    print_result,
)

from rlhf_core.config import (  # noqa: E402
    DataConfig,
    RewardConfig,  # noqa: E402
    SplitRatios,
)
from rlhf_core.data.dataset import read_valid_pairs, split_by_prompt  # noqa: E402
from rlhf_core.reward.evaluate import evaluate_reward_model, write_plots  # noqa: E402
from rlhf_core.reward.model import build_reward_model  # noqa: E402
from rlhf_core.reward.trainer import RewardTrainer, encode_pairs  # noqa: E402


def main() -> None:
    ap = common.make_parser(__doc__)
    ap.add_argument("--backbone", default="minilm")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=3e-5)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument(
        "--split-seed", type=int, default=0, help="seed of the by-prompt 80/10/10 split"
    )
    ap.add_argument(
        "--tracking-uri", default=f"sqlite:///{Path('.rlhf/benchmarks/mlflow.db').resolve()}"
    )
    add_common_args(ap, seed=True, threads=True)
    args = ap.parse_args()
    common.set_threads(args)

    frame, _ = read_valid_pairs(str(SHARED_DATA / HH_FILE), DataConfig())
    which = split_by_prompt(frame["prompt"], SplitRatios(), seed=args.split_seed)
    train, val, test = (frame[which == i].reset_index(drop=True) for i in range(3))

    rm = build_reward_model(args.backbone, max_length=args.max_length, seed=args.seed)
    settings = RewardConfig(
        epochs=args.epochs,
        lr=args.lr,
        batch_size=args.batch_size,
        eval_every=40,
        early_stopping_patience=None,
        checkpoint_every=10**9,
    )
    t0 = time.perf_counter()
    trainer = RewardTrainer(
        rm,
        encode_pairs(rm, train, settings),
        encode_pairs(rm, val, settings),
        settings,
        seed=args.seed,
        on_log=lambda step, m: print(step, {k: round(v, 4) for k, v in m.items()}, file=sys.stderr),
    )
    result = trainer.train(resume=False)
    train_s = time.perf_counter() - t0
    ev = evaluate_reward_model(rm, test, "test")
    val_ev = evaluate_reward_model(
        rm, val, "val"
    )  # val also chose the best checkpoint: slightly optimistic
    out = {
        "backbone": args.backbone,
        "split_seed": args.split_seed,
        "train_pairs": len(train),
        "val_pairs": len(val),
        "test_pairs": len(test),
        "epochs": args.epochs,
        "lr": args.lr,
        "max_length": args.max_length,
        "train_seconds": round(train_s, 1),
        "pairs_per_s": round(result.units_per_s, 2),
        "best_val_accuracy": result.best_metric,
        "test_accuracy_ci95": [round(x, 4) for x in ev.report["accuracy_ci95"]],
        **{k: round(v, 4) for k, v in ev.metrics.items()},
        **{k: round(v, 4) for k, v in val_ev.metrics.items()},
    }

    import mlflow

    with (
        mlflow_run(args.tracking_uri, "reward-quality", f"hh-harmless-{args.backbone}"),
        tempfile.TemporaryDirectory() as tmp,
    ):
        params = (
            "backbone",
            "split_seed",
            "epochs",
            "lr",
            "max_length",
            "train_pairs",
            "test_pairs",
        )
        mlflow.log_params({k: out[k] for k in params})
        log_numeric_metrics(out, exclude=("epochs", "lr", "max_length"))
        for p in write_plots(ev, Path(tmp)):
            mlflow.log_artifact(str(p), "plots")
        (Path(tmp) / "report.json").write_text(json.dumps(ev.report, indent=2))
        mlflow.log_artifact(str(Path(tmp) / "report.json"))
    print_result(out, args.json, key_width=28)


if __name__ == "__main__":
    main()
