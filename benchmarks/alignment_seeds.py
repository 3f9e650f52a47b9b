"""Does the default run align? `rlhf run` once per seed, each from an empty work dir, and a table of
what matters: held-out judged win rate over the reference (95% interval), KL per response, safety,
the promotion decision and the wall time per stage.

    python benchmarks/alignment_seeds.py --seeds 0 1 2 --json
    python benchmarks/alignment_seeds.py --seeds 0 --config configs/default.yaml --set rloo.iterations=30

Runs are sequential (a second busy process slows PyTorch's threads several-fold on 2 cores).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import ROOT, add_common_args, make_parser

METRICS = (
    "eval_win_rate",
    "eval_win_rate_ci_low",
    "eval_win_rate_ci_high",
    "eval_win_rate_length_controlled",
    "eval_kl_per_response",
    "eval_score_gain",
    "eval_unsafe_rate_reference",
    "eval_unsafe_rate_tuned",
    "eval_safety_win_rate",
    "reward_test_accuracy",
    "registry_promoted",
)


def run_seed(seed: int, work_dir: Path, config: str | None, sets: list[str]) -> dict:
    if work_dir.exists():
        shutil.rmtree(work_dir)
    cmd = [str(Path(sys.executable).parent / "rlhf"), "run"]
    if config:
        cmd += ["--config", config]
    for item in [f"run.seed={seed}", f"run.work_dir={work_dir}", *sets]:
        cmd += ["--set", item]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    (work_dir / "benchmark.log").write_text(proc.stdout + proc.stderr)
    row = {"seed": seed, "wall_s": round(wall, 1), "exit_code": proc.returncode}
    row |= read_run(work_dir)
    return row


def read_run(work_dir: Path) -> dict:
    """The parent run's headline metrics, the on-policy stage's checkpoint choice, minutes per stage."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work_dir / 'mlflow.db'}")
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        order_by=["attributes.start_time DESC"],
    )
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if not parents:
        return {}
    parent = parents[0]
    out = {k: parent.data.metrics[k] for k in METRICS if k in parent.data.metrics}
    stages = {}
    for child in runs:
        if child.data.tags.get("mlflow.parentRunId") == parent.info.run_id:
            name = child.data.tags.get("rlhf.stage", child.info.run_name)
            if child.info.end_time:
                stages[name] = round((child.info.end_time - child.info.start_time) / 60000, 2)
            if name in ("ppo", "rloo", "grpo", "online_dpo"):
                for k in ("selected_iteration", "val_win_rate_best", "iterations_run"):
                    if k in child.data.metrics:
                        out[f"policy_{k}"] = child.data.metrics[k]
    out["stage_minutes"] = stages
    out["promotion"] = parent.data.tags.get("rlhf.promotion")
    return out


def main() -> None:
    ap = make_parser(__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--config", default=None, help="default: configs/default.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[], help="section.key=value")
    ap.add_argument("--work-root", default=str(ROOT / ".rlhf-bench" / "alignment"))
    add_common_args(ap)
    args = ap.parse_args()
    rows = [
        run_seed(seed, Path(args.work_root) / f"seed-{seed}", args.config, args.sets)
        for seed in args.seeds
    ]
    if args.json:
        print(json.dumps({"config": args.config, "sets": args.sets, "runs": rows}, indent=2))
        return
    print(
        "| seed | win rate (95% CI) | LC win rate | KL/response | unsafe ref -> tuned | promoted | minutes |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "eval_win_rate" not in r:
            print(
                f"| {r['seed']} | failed (exit {r['exit_code']}) | | | | | {r['wall_s'] / 60:.1f} |"
            )
            continue
        print(
            f"| {r['seed']} | {r['eval_win_rate']:.3f} ({r['eval_win_rate_ci_low']:.3f}-"
            f"{r['eval_win_rate_ci_high']:.3f}) | {r.get('eval_win_rate_length_controlled', float('nan')):.3f} "
            f"| {r['eval_kl_per_response']:.2f} | {r.get('eval_unsafe_rate_reference', float('nan')):.2f} -> "
            f"{r.get('eval_unsafe_rate_tuned', float('nan')):.2f} | {bool(r.get('registry_promoted'))} "
            f"| {r['wall_s'] / 60:.1f} |"
        )


if __name__ == "__main__":
    main()
