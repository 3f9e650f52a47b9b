"""The RLAIF stage: an AI judge labels preference pairs (cached, position-bias controlled)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow.parquet as pq
from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact

import rlhf_core.judges.base
import rlhf_core.judges.embedding
import rlhf_core.judges.hf
import rlhf_core.judges.labeling
import rlhf_core.judges.pipeline
from rlhf_core.config import LabelsConfig
from rlhf_core.data.pipeline import to_normalised_arrow
from rlhf_core.judges.labeling import LabelCache
from rlhf_core.judges.pipeline import build_judge, generate_pairs, label_generated, relabel
from rlhf_core.plots import histogram_plot, reliability_plot
from rlhf_core.storage import atomic_dir
from tasks.stage import code_version, stage_task, stage_dir, user_errors_fail_cleanly
from tasks.tracking import TrackingContext, stage_run

LABELS_CODE_VERSION = code_version(rlhf_core.judges.base, rlhf_core.judges.embedding, rlhf_core.judges.hf,
                                   rlhf_core.judges.labeling, rlhf_core.judges.pipeline, sys.modules[__name__])


def _progress_reporter():
    """A Prefect progress artifact for long labelling runs, updated at most every 2%."""
    artifact_id = create_progress_artifact(progress=0.0, key="labelling-progress", description="AI labelling")
    last = [0.0]

    def report(done: int, total: int) -> None:
        pct = 100.0 * done / max(1, total)
        if pct - last[0] >= 2.0 or done == total:
            update_progress_artifact(artifact_id=artifact_id, progress=pct)
            last[0] = pct

    return report


@stage_task(name="label")
@user_errors_fail_cleanly
def label(train_file: str, labels: LabelsConfig, seed: int, policy_dir: str | None, stage_key: str, tracking: TrackingContext) -> dict:
    out = stage_dir(tracking.work_dir, "label", stage_key)
    logger = get_run_logger()
    with stage_run(tracking, "label", stage_key) as run:
        judge = build_judge(labels.judge)
        cache = LabelCache(Path(tracking.work_dir) / "label-cache.sqlite")
        mlflow.log_params({"mode": labels.mode, "merge": labels.merge, "judge": judge.label_version,
                           "constitution_hash": judge.constitution.hash, "judge_backend": labels.judge.backend})
        train = pd.read_parquet(train_file)
        progress = _progress_reporter()
        if labels.mode == "relabel":
            table, per_pair, report = relabel(train, judge, labels, cache, progress)
        else:
            prompts = train["prompt"].drop_duplicates().head(labels.generate.n_prompts).tolist()
            pairs = generate_pairs(policy_dir, prompts, labels.generate, seed)
            new, per_pair, report = label_generated(pairs, judge, labels, cache, progress)
            table = pd.concat([train, new], ignore_index=True)
        cache.close()
        with atomic_dir(out) as staging:
            arrow = to_normalised_arrow(table)
            # the labels' provenance travels with the data set itself
            provenance = {b"rlhf.labels.merge": labels.merge.encode(), b"rlhf.labels.mode": labels.mode.encode(),
                          b"rlhf.labels.judge": judge.label_version.encode()}
            pq.write_table(arrow.replace_schema_metadata({**(arrow.schema.metadata or {}), **provenance}), staging / "train.parquet")
            per_pair.to_parquet(staging / "labels.parquet", index=False)
            (staging / "report.json").write_text(json.dumps(report, indent=2))
            plots = staging / "plots"
            plots.mkdir()
            histogram_plot({"P(first better)": per_pair["p_ai"].to_numpy()}, plots / "label_distribution.png",
                           "AI label distribution", "P(chosen better)" if labels.mode == "relabel" else "P(a better)",
                           bins=20, value_range=(0, 1))
            if "agreement" in report:
                reliability_plot(report["agreement"]["calibration"], plots / "calibration.png",
                                 "AI labels vs human choice", "AI P(human's choice is better)")
        metrics = {k: float(report[k]) for k in ("n_pairs", "judged", "cache_hits", "pairs_per_s") if report.get(k) is not None}
        if report.get("position_consistency") is not None:
            metrics["position_consistency"] = report["position_consistency"]
        if "agreement" in report:
            metrics |= {f"agreement_{k}": float(report["agreement"][k]) for k in ("accuracy", "cohen_kappa", "ece")}
        for name, stats in report.get("principles", {}).items():
            metrics[f"principle_{name}_prefers_chosen"] = stats["prefers_first_rate"]
        metrics["rows_train_labelled"] = len(table)
        mlflow.log_metrics(metrics)
        mlflow.log_artifact(str(out / "report.json"), "labels")
        mlflow.log_artifacts(str(out / "plots"), "labels/plots")
        summary = [f"### AI labels ({labels.mode}, judge `{judge.label_version}`)", f"- pairs: {metrics['n_pairs']:.0f}, "
                   f"judged now: {metrics['judged']:.0f}, from cache: {metrics['cache_hits']:.0f}, {metrics['pairs_per_s']:.1f} pairs/s"]
        if "agreement" in report:
            a = report["agreement"]
            summary.append(f"- agreement with human labels: **{a['accuracy']:.1%}**, Cohen's kappa {a['cohen_kappa']:.3f}, ECE {a['ece']:.3f}")
        if metrics.get("position_consistency") is not None:
            summary.append(f"- position consistency: {metrics['position_consistency']:.1%}")
        create_markdown_artifact(markdown="\n".join(summary), key="labels-report", description="AI labelling summary")
        logger.info(" ".join(summary[1:]))
        return {"stage_key": stage_key, "out_dir": str(out), "train_file": str(out / "train.parquet"), "mlflow_run_id": run.info.run_id,
                "metrics": metrics, "summary_files": [str(out / "report.json")]}
