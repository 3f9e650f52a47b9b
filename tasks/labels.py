"""The RLAIF stage: an AI judge labels preference pairs (cached, position-bias controlled)."""

from __future__ import annotations

import mlflow
from prefect import get_run_logger
from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    update_progress_artifact,
)

from rlhf_core.config import LabelsConfig
from rlhf_core.judges.constitution import DEFAULT_CONSTITUTION
from rlhf_core.judges.rlaif import label_metrics, label_training_pairs, write_labelled
from rlhf_core.storage import atomic_dir
from tasks.results import Labelled, Policy, Splits
from tasks.stage import StageContext, stage

JUDGE_CODE = (DEFAULT_CONSTITUTION,)  # read when no constitution is configured
# in the work dir: the judge's answers, shared by every stage that asks it
LABEL_CACHE = "label-cache.sqlite"


def _progress_reporter():
    """A Prefect progress artifact for long labelling runs, updated at most every 2%."""
    artifact_id = create_progress_artifact(
        progress=0.0, key="labelling-progress", description="AI labelling"
    )
    last = [0.0]

    def report(done: int, total: int) -> None:
        pct = 100.0 * done / max(1, total)
        if pct - last[0] >= 2.0 or done == total:
            update_progress_artifact(artifact_id=artifact_id, progress=pct)
            last[0] = pct

    return report


@stage("label", code=JUDGE_CODE)
def label(
    ctx: StageContext, splits: Splits, policy: Policy | None, labels: LabelsConfig, seed: int
) -> Labelled:
    """AI labels for the training pairs (relabel), or for new pairs sampled from the policy (generate)."""
    judge, table, per_pair, report = label_training_pairs(
        splits.train,
        labels,
        seed,
        policy.model_dir if policy else None,
        ctx.work_dir / LABEL_CACHE,
        _progress_reporter(),
    )
    mlflow.log_params(
        {
            "mode": labels.mode,
            "merge": labels.merge,
            "judge": judge.label_version,
            "constitution_hash": judge.constitution.hash,
            "judge_backend": labels.judge.backend,
        }
    )
    with atomic_dir(ctx.out_dir) as staging:
        write_labelled(staging, table, per_pair, report, labels, judge)
    metrics = label_metrics(report, len(table))
    mlflow.log_metrics(metrics)
    mlflow.log_artifact(str(ctx.out_dir / "report.json"), "labels")
    mlflow.log_artifacts(str(ctx.out_dir / "plots"), "labels/plots")
    summary = [
        f"### AI labels ({labels.mode}, judge `{judge.label_version}`)",
        f"- pairs: {metrics['n_pairs']:.0f}, judged now: {metrics['judged']:.0f}, "
        f"from cache: {metrics['cache_hits']:.0f}, {metrics['pairs_per_s']:.1f} pairs/s",
    ]
    if "agreement" in report:
        a = report["agreement"]
        summary.append(
            f"- agreement with human labels: **{a['accuracy']:.1%}**, Cohen's kappa "
            f"{a['cohen_kappa']:.3f}, ECE {a['ece']:.3f}"
        )
    if metrics.get("position_consistency") is not None:
        summary.append(f"- position consistency: {metrics['position_consistency']:.1%}")
    create_markdown_artifact(
        markdown="\n".join(summary), key="labels-report", description="AI labelling summary"
    )
    get_run_logger().info(" ".join(summary[1:]))
    return ctx.result(
        Labelled,
        train_file=str(ctx.out_dir / "train.parquet"),
        metrics=metrics,
        summary_files=[str(ctx.out_dir / "report.json")],
    )
