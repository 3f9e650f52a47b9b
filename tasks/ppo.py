"""The on-policy stages, one per method (ppo, rloo, grpo, online_dpo): tune the reference policy
against the gated reward model (online DPO: the judge), kept near the reference by a KL term."""

from __future__ import annotations

import json
import shutil

import mlflow
import pandas as pd
from prefect import get_run_logger

from rlhf_core.config import (
    ON_POLICY_TITLES,
    DistributedConfig,
    EvaluateConfig,
    JudgeConfig,
    ModelConfig,
    PolicyGradientConfig,
)
from rlhf_core.distributed.launch import launch
from rlhf_core.models.loading import save_model
from rlhf_core.plots import curves_plot, gold_proxy_plot
from rlhf_core.ppo.build import build_ppo_trainer, described
from rlhf_core.ppo.trainer import PPOResult
from rlhf_core.storage import atomic_dir
from tasks.labels import JUDGE_CODE, LABEL_CACHE
from tasks.results import Policy, RewardModel, Splits, Tuned
from tasks.stage import StageContext, metrics_logger, stage

CURVES = [
    "score",
    "kl",
    "entropy",
    "response_length",
    "value_loss",
    "reward_disagreement",
    "episodes_per_s",
]


# the judged checks sample and judge as the final evaluation does; nothing else of it matters
EVALUATE_UNREAD = {
    "enabled",
    "prompts",
    "max_prompts",
    "perplexity_examples",
    "perplexity_max_length",
    "n_samples",
    "best_of_n",
    "best_of_n_prompts",
    "device",
    "safety",
    "judge",
}


def optimise(
    ctx: StageContext,
    reference: Policy,
    reward_model: RewardModel,
    splits: Splits,
    settings: PolicyGradientConfig,
    model: ModelConfig,
    judge: JudgeConfig,
    evaluate: EvaluateConfig,
    seed: int,
    distributed: DistributedConfig,
    preference_judge: JudgeConfig | None = None,
) -> Tuned:
    """The reference policy tuned against the gated reward model with the section's method; the
    evaluation judge checks it on validation prompts and picks the checkpoint (select). Online DPO
    has `preference_judge` (the label stage's) judge its pairs, through the label stage's cache.
    The learner runs on distributed.num_processes processes."""
    method = ctx.name
    out, checkpoints, logger = ctx.out_dir, ctx.checkpoints, get_run_logger()
    policy_dir, reward_dir = reference.model_dir, reward_model.model_dir
    prompts = pd.read_parquet(splits.train, columns=["prompt"])["prompt"].drop_duplicates().tolist()
    val_prompts = pd.read_parquet(splits.val, columns=["prompt"])["prompt"].drop_duplicates()

    def log_samples(
        iteration: int, rows: list[dict]
    ) -> None:  # log_table appends to an existing table file
        mlflow.log_table(pd.DataFrame(rows), artifact_file=f"samples/{method}_samples.json")

    on_log = metrics_logger(
        f"{method} iteration",
        ("score", "kl", "entropy", "response_length", "episodes_per_s", "val_win_rate", "val_kl"),
        settings.iterations,
        every=max(1, settings.iterations // 20),
    )
    params = {k: v for k, v in settings.model_dump().items() if not isinstance(v, dict)}
    mlflow.log_params(
        {
            "policy": policy_dir,
            "reward_model": reward_dir,
            "prompts": len(prompts),
            **params,
        }
    )
    shared = {
        "judge": judge,
        "evaluate": evaluate,
        "val_prompts": val_prompts.tolist(),
        "preference_judge": preference_judge,
        "label_cache": ctx.work_dir / LABEL_CACHE,
    }
    learner = checkpoints / "learner"
    if distributed.num_processes > 1:
        done = launch(
            "policy",
            {
                "section": method,
                "settings": settings.model_dump(mode="json"),
                "policy_dir": policy_dir,
                "reward_dir": reward_dir,
                "prompts": prompts,
                "model": model.model_dump(mode="json"),
                "seed": seed,
                "checkpoint_dir": str(checkpoints),
                "model_out": str(learner / "model"),
                "judge": judge.model_dump(mode="json"),
                "evaluate": evaluate.model_dump(mode="json"),
                "val_prompts": shared["val_prompts"],
                "preference_judge": preference_judge and preference_judge.model_dump(mode="json"),
                "label_cache": str(shared["label_cache"]),
            },
            learner,
            distributed,
            on_line=logger.info,
            on_log=on_log,
            on_samples=log_samples,
        )
        result = PPOResult(**done["result"])
        built = {k: v for k, v in done.items() if k not in ("result", "world_size")}
        mlflow.log_params({k: v for k, v in built.items() if k not in params})
    else:
        trainer = build_ppo_trainer(
            policy_dir,
            reward_dir,
            prompts,
            settings,
            model,
            seed,
            checkpoint_dir=checkpoints,
            on_log=on_log,
            on_samples=log_samples,
            **shared,
        )
        # a setting of the same name is what MLflow shows
        mlflow.log_params({k: v for k, v in described(trainer).items() if k not in params})
        result = trainer.train()
    mlflow.log_param("world_size", result.world_size)  # as the learner reported it
    if result.resume_note:
        logger.warning(f"{method}: {result.resume_note}")
    if result.resumed_from:
        logger.info(f"{method}: resumed from iteration {result.resumed_from}")
    with atomic_dir(out) as staging:
        if distributed.num_processes > 1:  # rank 0 saved it: move, do not write it again
            shutil.move(learner / "model", staging / "model")
        else:
            save_model(trainer.policy, trainer.tokenizer, staging / "model")
        (staging / "history.json").write_text(json.dumps(result.history, indent=2))
        curves_plot(
            result.history, CURVES, staging / "training_curves.png", ON_POLICY_TITLES[method]
        )
        checks = [h for h in result.history if "val_win_rate" in h]
        if checks:
            gold_proxy_plot(checks, staging / "gold_vs_proxy.png", result.selected_iteration)
    mlflow.log_artifact(str(out / "training_curves.png"), "plots")
    if checks:
        mlflow.log_artifact(str(out / "gold_vs_proxy.png"), "plots")
    mlflow.log_artifacts(str(out / "model"), "model")
    shutil.rmtree(checkpoints, ignore_errors=True)
    h = result.history
    k = max(1, min(5, len(h) // 4))
    metrics = {
        "score_start": sum(x["score"] for x in h[:k]) / k,
        "score_end": sum(x["score"] for x in h[-k:]) / k,
        "kl_end": sum(x["kl"] for x in h[-k:]) / k,
        "episodes": float(result.episodes),
        "mean_episodes_per_s": result.episodes_per_s,
        "iterations_run": float(result.iterations),
    }
    if checks:
        best = max(checks, key=lambda c: c["val_win_rate"])
        metrics |= {
            "val_win_rate_best": best["val_win_rate"],
            "val_kl_best": best["val_kl"],
            "val_win_rate_last": checks[-1]["val_win_rate"],
        }
    if result.selected_iteration is not None:
        metrics["selected_iteration"] = float(result.selected_iteration)
    mlflow.log_metrics(metrics)
    logger.info(
        f"{method}: score {metrics['score_start']:.3f} -> {metrics['score_end']:.3f}, KL {metrics['kl_end']:.3f}, "
        f"{result.episodes_per_s:.1f} episodes/s"
    )
    if result.selected_iteration is not None:
        logger.info(
            f"{method}: kept iteration {result.selected_iteration} (judged validation win rate "
            f"{metrics['val_win_rate_best']:.3f}, KL {metrics['val_kl_best']:.2f}; "
            f"last check {metrics['val_win_rate_last']:.3f})"
            + (" after early stopping" if result.stopped_early else "")
        )
    return ctx.result(
        Tuned,
        model_dir=str(out / "model"),
        model_uri=f"runs:/{ctx.run.info.run_id}/model",
        history_file=str(out / "history.json"),
        metrics=metrics,
        summary_files=[str(out / "history.json")],
        method=method,
    )


def _method_stage(method: str):
    """The stage of one method: its own name (cache key, folder, MLflow run) and config section."""
    return stage(method, code=JUDGE_CODE, ignore={"evaluate": EVALUATE_UNREAD})(optimise)


ppo, rloo, grpo, online_dpo = (_method_stage(m) for m in ON_POLICY_TITLES)
