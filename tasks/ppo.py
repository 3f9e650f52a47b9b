"""The PPO stage: tune the reference policy against the gated reward model with a KL penalty."""

from __future__ import annotations

import json
import shutil
import sys

import mlflow
import pandas as pd
from prefect import get_run_logger

import rlhf_core.ppo.core
import rlhf_core.ppo.pipeline
import rlhf_core.ppo.rollout
import rlhf_core.ppo.trainer
import rlhf_core.ppo.value
from rlhf_core.config import ModelConfig, PPOConfig
from rlhf_core.models.loading import save_model
from rlhf_core.plots import curves_plot
from rlhf_core.ppo.pipeline import build_ppo_trainer
from rlhf_core.storage import atomic_dir
from tasks.stage import code_version, metrics_logger, quiet_transformers, stage_dir, stage_task, user_errors_fail_cleanly
from tasks.tracking import TrackingContext, stage_run

PPO_CODE_VERSION = code_version(rlhf_core.ppo.core, rlhf_core.ppo.rollout, rlhf_core.ppo.value, rlhf_core.ppo.trainer,
                                rlhf_core.ppo.pipeline, sys.modules[__name__])
CURVES = ["score", "kl", "entropy", "response_length", "value_loss", "episodes_per_s"]


@stage_task(name="ppo")
@user_errors_fail_cleanly
def ppo(policy_dir: str, reward_dir: str, train_file: str, ppo_cfg: PPOConfig, model: ModelConfig, seed: int, stage_key: str,
        tracking: TrackingContext) -> dict:
    quiet_transformers()
    out = stage_dir(tracking.work_dir, "ppo", stage_key)
    checkpoints = out.with_name(out.name + ".checkpoints")  # outlives a killed run: the next run resumes from it
    logger = get_run_logger()
    with stage_run(tracking, "ppo", stage_key) as run:
        prompts = pd.read_parquet(train_file, columns=["prompt"])["prompt"].drop_duplicates().tolist()
        def log_samples(iteration: int, rows: list[dict]) -> None:  # log_table appends to an existing table file
            mlflow.log_table(pd.DataFrame(rows), artifact_file="samples/ppo_samples.json")

        trainer = build_ppo_trainer(policy_dir, reward_dir, prompts, ppo_cfg, model, seed, checkpoint_dir=checkpoints,
                                    on_log=metrics_logger("ppo iteration", ("score", "kl", "entropy", "response_length", "episodes_per_s"),
                                                          ppo_cfg.iterations, every=max(1, ppo_cfg.iterations // 20)),
                                    on_samples=log_samples)
        mlflow.log_params({"policy": policy_dir, "reward_model": reward_dir, "prompts": len(prompts),
                           "value_model": type(trainer.value).__name__, "reward_reads_policy_tokens": trainer.rm_reads_policy_tokens,
                           **{k: v for k, v in ppo_cfg.model_dump().items() if not isinstance(v, dict)}})
        result = trainer.train()
        if result.resumed_from:
            logger.info(f"ppo: resumed from iteration {result.resumed_from}")
        policy = trainer.policy
        with atomic_dir(out) as staging:
            save_model(policy, trainer.tokenizer, staging / "model")
            (staging / "history.json").write_text(json.dumps(result.history, indent=2))
            curves_plot(result.history, CURVES, staging / "training_curves.png", "PPO")
        mlflow.log_artifact(str(out / "training_curves.png"), "plots")
        mlflow.log_artifacts(str(out / "model"), "model")
        shutil.rmtree(checkpoints, ignore_errors=True)
        h = result.history
        k = max(1, min(5, len(h) // 4))
        metrics = {"score_start": sum(x["score"] for x in h[:k]) / k, "score_end": sum(x["score"] for x in h[-k:]) / k,
                   "kl_end": sum(x["kl"] for x in h[-k:]) / k, "episodes": float(result.episodes),
                   "mean_episodes_per_s": result.episodes_per_s}
        mlflow.log_metrics(metrics)
        logger.info(f"ppo: score {metrics['score_start']:.3f} -> {metrics['score_end']:.3f}, KL {metrics['kl_end']:.3f}, "
                    f"{result.episodes_per_s:.1f} episodes/s")
        return {"stage_key": stage_key, "out_dir": str(out), "model_dir": str(out / "model"), "mlflow_run_id": run.info.run_id,
                "model_uri": f"runs:/{run.info.run_id}/model", "metrics": metrics, "summary_files": [str(out / "history.json")]}
