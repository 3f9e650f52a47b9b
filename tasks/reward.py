"""Reward-model stages: train (Bradley-Terry on human and AI labels) and evaluate (the gate reads it)."""

from __future__ import annotations

import json
import shutil

import mlflow
import numpy as np
import pandas as pd
from prefect import get_run_logger

from rlhf_core.config import DistributedConfig, ModelConfig, RewardConfig
from rlhf_core.errors import UserError
from rlhf_core.reward.evaluate import evaluate_reward_model, write_plots
from rlhf_core.reward.model import load_reward_model
from rlhf_core.reward.trainer import labelled_pairs, train_reward
from rlhf_core.storage import atomic_dir
from tasks.results import Labelled, Policy, RewardEvaluation, RewardModel, Splits
from tasks.stage import StageContext, metrics_logger, stage
from tasks.tracking import TrackingContext


@stage(
    "reward-train",
    ignore={"reward": {"gate"}},
)
def train_reward_model(
    ctx: StageContext,
    pairs: Labelled | Splits,
    splits: Splits,
    policy: Policy | None,
    reward: RewardConfig,
    model: ModelConfig,
    seed: int,
    distributed: DistributedConfig,
) -> RewardModel:
    """Train the reward model (on distributed.num_processes processes); store the reward
    normalisation statistics PPO needs with it."""
    out, checkpoints, logger = ctx.out_dir, ctx.checkpoints, get_run_logger()
    policy_dir = policy.model_dir if policy else None
    backbone = policy_dir if reward.backbone == "policy" else reward.backbone
    if not backbone:
        raise UserError(
            "reward.backbone 'policy' needs the SFT reference policy (sft must run before the reward model)"
        )
    train_df, val_df = pd.read_parquet(pairs.train_file), pd.read_parquet(splits.val)
    sources = labelled_pairs(train_df)["label_source"].value_counts().to_dict()
    mlflow.log_params(
        {
            "backbone": reward.backbone,
            "max_length": reward.max_length,
            "lr": reward.lr,
            "epochs": reward.epochs,
            "batch_size": reward.batch_size,
            "grad_accum": reward.grad_accum,
            "center_coef": reward.center_coef,
            "human_weight": reward.human_weight,
            "ai_weight": reward.ai_weight,
            "lora": reward.lora.enabled,
            "pooling": reward.pooling,
            "freeze_backbone": reward.freeze_backbone,
            **{f"train_pairs_{k}": v for k, v in sources.items()},
        }
    )
    rm, results = train_reward(
        train_df,
        val_df,
        reward,
        model,
        backbone,
        checkpoint_dir=checkpoints,
        policy_dir=policy_dir,
        seed=seed,
        on_log=metrics_logger(
            "reward step", ("train_loss", "eval_accuracy", "eval_loss", "pairs_per_s")
        ),
        distributed=distributed,
        on_line=logger.info,
    )
    mlflow.log_params(
        {"kind": rm.kind, "ensemble_members": len(results), "world_size": results[0].world_size}
    )
    result = results[0]
    if result.resume_note:
        logger.warning(f"reward model: {result.resume_note}")
    if result.resumed_from_step:
        logger.info(f"reward model: resumed from step {result.resumed_from_step}")
    with atomic_dir(out) as staging:
        rm.save(staging / "model")
        (staging / "training.json").write_text(
            json.dumps(
                [
                    {"history": r.history, "steps": r.steps, "stopped_early": r.stopped_early}
                    for r in results
                ],
                indent=2,
            )
        )
    mlflow.log_artifacts(str(out / "model"), "reward_model")
    shutil.rmtree(checkpoints, ignore_errors=True)
    members = getattr(rm, "members", [rm])
    metrics = {
        "steps": sum(r.steps for r in results),
        "train_pairs": result.train_units,
        "pairs_per_s": result.units_per_s,
        "stopped_early": float(result.stopped_early),
        "reward_norm_mean": members[0].normalisation["mean"],
        "reward_norm_std": members[0].normalisation["std"],
    }
    if result.best_metric is not None:
        metrics["best_val_accuracy"] = result.best_metric
    if len(results) > 1:
        for i, r in enumerate(results):
            if r.best_metric is not None:
                metrics[f"member{i}_best_val_accuracy"] = r.best_metric
    mlflow.log_metrics(metrics)
    logger.info(
        f"reward model ({rm.kind}, {reward.backbone}): {result.steps} steps, {result.units_per_s:.1f} pairs/s, "
        f"best val accuracy {result.best_metric if result.best_metric is not None else float('nan'):.3f}"
    )
    return ctx.result(
        RewardModel,
        model_dir=str(out / "model"),
        model_uri=f"runs:/{ctx.run.info.run_id}/reward_model",
        metrics=metrics,
    )


@stage(
    "reward-eval",
    ignore={"reward": {"gate"}},
)
def evaluate_reward(
    ctx: StageContext, reward_model: RewardModel, splits: Splits, reward: RewardConfig
) -> RewardEvaluation:
    """Accuracy (overall, by label source, by length), AUC, calibration, reward histograms, length bias."""
    out, test_file = ctx.out_dir, splits.test
    rm = load_reward_model(reward_model.model_dir, device=reward.device)
    evals = [
        evaluate_reward_model(rm, pd.read_parquet(f), split)
        for split, f in (("val", splits.val), ("test", splits.test))
    ]
    if evals[-1].report["n_pairs"] == 0:
        raise UserError(f"{test_file}: no labelled test pairs to evaluate the reward model on")
    metrics = {k: v for ev in evals for k, v in ev.metrics.items() if not np.isnan(v)}
    for i, member in enumerate(getattr(rm, "members", [])):  # the gate reads the ensemble's
        alone = evaluate_reward_model(member, pd.read_parquet(splits.test), "test")
        metrics[f"member{i}_test_accuracy"] = alone.metrics["test_accuracy"]
    with atomic_dir(out) as staging:
        (staging / "report.json").write_text(
            json.dumps({ev.split: ev.report for ev in evals}, indent=2)
        )
        for ev in evals:
            write_plots(ev, staging / "plots")
    mlflow.log_metrics(metrics)
    mlflow.log_artifact(str(out / "report.json"), "reward_eval")
    mlflow.log_artifacts(str(out / "plots"), "reward_eval/plots")
    return ctx.result(
        RewardEvaluation,
        metrics=metrics,
        report={ev.split: ev.report for ev in evals},
        summary_files=[str(out / "report.json")],
    )


def publish_reward_summary(tracking: TrackingContext, evaluated: RewardEvaluation, gate) -> None:
    """The gate's verdict where people look: a Prefect markdown artifact and the MLflow parent run."""
    from prefect.artifacts import create_markdown_artifact

    from rlhf_core.reward.evaluate import markdown_summary

    text = markdown_summary(evaluated.report, gate)
    create_markdown_artifact(
        markdown=text, key="reward-model-report", description="Reward model evaluation and gate"
    )
    mlflow.set_tracking_uri(tracking.tracking_uri)
    client = mlflow.MlflowClient()
    client.log_metric(tracking.parent_run_id, "reward_gate_passed", float(gate.passed))
    for k in ("test_accuracy", "test_auc", "test_ece", "test_length_correlation"):
        if k in evaluated.metrics:
            client.log_metric(tracking.parent_run_id, f"reward_{k}", evaluated.metrics[k])
    client.set_tag(tracking.parent_run_id, "rlhf.reward_gate", gate.message)
    (get_run_logger().info if gate.passed else get_run_logger().warning)(gate.message)
