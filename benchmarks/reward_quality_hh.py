"""Reward-model quality on real human preferences: the HH-RLHF harmless sample in ../shared/data.

Measures what `rlhf reward train --data <the sample>` does with the pipeline's config (default:
none, the settings' own defaults, as that command; `--set reward.key=value` changes them; `--config
configs/default.yaml` measures the demo's reward model): for each split seed, the sample is split
by prompt 80/10/10 with the pipeline's splitter, `train_reward` trains on the train split (the
validation split picks the checkpoint or the probe's L2), and the test split is scored. Prints
each split's test accuracy, their mean, and the "shorter reply wins" baseline; logs each split to
the MLflow experiment `reward-quality`.

    python benchmarks/reward_quality_hh.py [--split-seeds 0 1 2] [--set reward.pooling=mean ...] [--json]
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

from rlhf_core.config import load_config  # noqa: E402
from rlhf_core.data.dataset import read_valid_pairs, split_by_prompt  # noqa: E402
from rlhf_core.reward.evaluate import evaluate_reward_model, write_plots  # noqa: E402
from rlhf_core.reward.trainer import train_reward  # noqa: E402


def main() -> None:
    ap = common.make_parser(__doc__)
    ap.add_argument(
        "--config", default=None, help="pipeline config (default: none, the settings' defaults)"
    )
    ap.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value")
    ap.add_argument("--split-seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument(
        "--tracking-uri", default=f"sqlite:///{Path('.rlhf/benchmarks/mlflow.db').resolve()}"
    )
    add_common_args(ap, threads=True)
    args = ap.parse_args()
    common.set_threads(args)
    cfg = load_config(args.config, args.sets, fallback=None)
    frame, _ = read_valid_pairs(str(SHARED_DATA / HH_FILE), cfg.data)
    splits = [split_one(frame, cfg, seed, args) for seed in args.split_seeds]
    accs = [s["test_accuracy"] for s in splits]
    out = {
        "sets": args.sets,
        "split_seeds": args.split_seeds,
        "test_accuracy_per_split": accs,
        "test_accuracy_mean": round(sum(accs) / len(accs), 4),
        "shorter_wins_per_split": [s["shorter_wins"] for s in splits],
        "train_seconds_per_split": [s["train_seconds"] for s in splits],
        "splits": splits,
    }
    print_result(out, args.json, key_width=28)


def split_one(frame, cfg, split_seed: int, args) -> dict:
    which = split_by_prompt(frame["prompt"], cfg.data.splits, seed=split_seed)
    train, val, test = (frame[which == i].reset_index(drop=True) for i in range(3))
    t0 = time.perf_counter()
    rm, results = train_reward(
        train,
        val,
        cfg.reward,
        cfg.model,
        cfg.reward.backbone,
        seed=cfg.run.seed,
        progress=False,
        on_log=lambda step, m: print(step, {k: round(v, 4) for k, v in m.items()}, file=sys.stderr),
    )
    train_s = time.perf_counter() - t0
    result = results[0]
    ev = evaluate_reward_model(rm, test, "test")
    val_ev = evaluate_reward_model(
        rm, val, "val"
    )  # val also chose the best checkpoint: slightly optimistic
    shorter = (test["chosen"].str.len() < test["rejected"].str.len()).mean()
    out = {
        "split_seed": split_seed,
        "train_pairs": len(train),
        "val_pairs": len(val),
        "test_pairs": len(test),
        "train_seconds": round(train_s, 1),
        "pairs_per_s": round(result.units_per_s, 2),
        "best_val_accuracy": result.best_metric,
        "test_accuracy": round(ev.metrics["test_accuracy"], 4),
        "test_accuracy_ci95": [round(x, 4) for x in ev.report["accuracy_ci95"]],
        "shorter_wins": round(float(shorter), 4),
        **{k: round(v, 4) for k, v in ev.metrics.items()},
        **{k: round(v, 4) for k, v in val_ev.metrics.items()},
    }
    import mlflow

    with (
        mlflow_run(args.tracking_uri, "reward-quality", f"hh-harmless-{cfg.reward.backbone}"),
        tempfile.TemporaryDirectory() as tmp,
    ):
        mlflow.log_params(
            {
                **{k: out[k] for k in ("split_seed", "train_pairs", "test_pairs")},
                **{f"reward.{k}": v for k, v in cfg.reward.model_dump().items()},
                "sets": " ".join(args.sets),
            }
        )
        log_numeric_metrics(out)
        for p in write_plots(ev, Path(tmp)):
            mlflow.log_artifact(str(p), "plots")
        (Path(tmp) / "report.json").write_text(json.dumps(ev.report, indent=2))
        mlflow.log_artifact(str(Path(tmp) / "report.json"))
    print(f"split {split_seed}: test accuracy {out['test_accuracy']:.3f}", file=sys.stderr)
    return out


if __name__ == "__main__":
    main()
