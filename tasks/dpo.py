"""The DPO stage: tune the reference policy directly on the labelled pairs (run.method: dpo)."""

from __future__ import annotations

import json
import shutil

import mlflow
from prefect import get_run_logger

from rlhf_core.config import DistributedConfig, DPOConfig, ModelConfig
from rlhf_core.distributed.launch import launch
from rlhf_core.dpo.learner import build_dpo_trainer
from rlhf_core.models.loading import save_model
from rlhf_core.plots import curves_plot
from rlhf_core.storage import atomic_dir
from rlhf_core.training import LoopResult
from tasks.results import Labelled, Policy, Splits, Tuned
from tasks.stage import StageContext, metrics_logger, stage

SHOWN = ("train_loss", "rewards_accuracy", "rewards_margin", "eval_loss", "eval_rewards_accuracy")
CURVES = [
    "train_loss",
    "rewards_accuracy",
    "rewards_margin",
    "logps_chosen",
    "logps_rejected",
    "eval_loss",
    "eval_rewards_accuracy",
]


@stage("dpo")
def dpo(
    ctx: StageContext,
    reference: Policy,
    pairs: Labelled | Splits,
    splits: Splits,
    dpo: DPOConfig,
    model: ModelConfig,
    seed: int,
    distributed: DistributedConfig,
) -> Tuned:
    """DPO from the reference policy on the (AI-)labelled training pairs; the reference's
    log-probabilities are computed once per (reference weights, pairs) and cached in the work dir."""
    logger = get_run_logger()
    params = {f"dpo.{k}": v for k, v in dpo.model_dump().items() if not isinstance(v, dict)} | {
        "policy": reference.model_dir,
        "lora": dpo.lora.enabled,
    }
    reference_cache = ctx.work_dir / "cache" / "dpo-reference"
    learner = ctx.checkpoints / "learner"
    if distributed.num_processes > 1:
        done = launch(
            "dpo",
            {
                "policy_dir": reference.model_dir,
                "train": pairs.train_file,
                "val": splits.val,
                "model": model.model_dump(mode="json"),
                "dpo": dpo.model_dump(mode="json"),
                "seed": seed,
                "checkpoint_dir": str(ctx.checkpoints),
                "reference_cache": str(reference_cache),
                "model_out": str(learner / "model"),
            },
            learner,
            distributed,
            on_line=logger.info,
            on_log=metrics_logger("dpo step", SHOWN),
        )
        result = LoopResult(**done["result"])
        mlflow.log_params(
            params | {k: done[k] for k in ("train_pairs", "val_pairs", "truncated_pairs")}
        )
        _log_reference_files(done["reference_files"])
    else:
        trainer, stats = build_dpo_trainer(
            reference.model_dir,
            pairs.train_file,
            splits.val,
            model,
            dpo,
            seed,
            checkpoint_dir=ctx.checkpoints,
            reference_cache=reference_cache,
        )
        trainer.on_log = metrics_logger("dpo step", SHOWN, trainer.total_steps)
        mlflow.log_params(
            params
            | {
                "train_pairs": len(trainer.train_set),
                "val_pairs": len(trainer.val_set),
                "truncated_pairs": stats.truncated,
            }
        )
        _log_reference_files(trainer.reference_files)
        result = trainer.train()
    mlflow.log_param("world_size", result.world_size)  # as the learner reported it
    if result.resume_note:
        logger.warning(f"dpo: {result.resume_note}")
    if result.resumed_from_step is not None:
        logger.info(f"dpo: resumed from step {result.resumed_from_step}")
    out = ctx.out_dir
    with atomic_dir(out) as staging:
        if distributed.num_processes > 1:  # rank 0 saved it: move, do not write it again
            shutil.move(learner / "model", staging / "model")
        else:
            save_model(trainer.model, trainer.tokenizer, staging / "model")
        (staging / "history.json").write_text(json.dumps(result.history, indent=2))
        curves_plot(result.history, CURVES, staging / "training_curves.png", "DPO", x="step")
    mlflow.log_artifact(str(out / "training_curves.png"), "plots")
    mlflow.log_artifacts(str(out / "model"), "model")
    shutil.rmtree(ctx.checkpoints, ignore_errors=True)
    metrics = {
        "steps": float(result.steps),
        "train_pairs": float(result.train_units),
        "pairs_per_s": result.units_per_s,
        "stopped_early": float(result.stopped_early),
    }
    evals = [h for h in result.history if "eval_loss" in h]
    if evals:  # training ends on the weights of the best evaluation
        best = min(evals, key=lambda h: h["eval_loss"])
        metrics |= {f"best_{k}": v for k, v in best.items() if k.startswith("eval_")}
        metrics["best_step"] = float(best["step"])
    mlflow.log_metrics(metrics)
    logger.info(
        f"dpo: {result.steps} steps, {result.units_per_s:.1f} pairs/s"
        + (
            f"; kept step {best['step']}: validation loss {best['eval_loss']:.4f}, "
            f"implicit-reward accuracy {best['eval_rewards_accuracy']:.3f}"
            if evals
            else ""
        )
    )
    return ctx.result(
        Tuned,
        method="dpo",
        model_dir=str(out / "model"),
        model_uri=f"runs:/{ctx.run.info.run_id}/model",
        history_file=str(out / "history.json"),
        metrics=metrics,
        summary_files=[str(out / "history.json")],
    )


def _log_reference_files(files) -> None:
    """The cached reference log-probabilities this run used (train, val)."""
    for file in files:
        mlflow.log_artifact(str(file), "reference_logps")
