"""The evaluation stage: tuned policy vs. its reference on held-out prompts, with report and plots."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import mlflow
import pandas as pd
from prefect import get_run_logger

import rlhf_core.evaluation.metrics
import rlhf_core.evaluation.pipeline
import rlhf_core.evaluation.policy
import rlhf_core.evaluation.prompts
import rlhf_core.evaluation.report
from rlhf_core.config import EvaluateConfig, JudgeConfig, ModelConfig, PPOConfig
from rlhf_core.evaluation.pipeline import (build_evaluator, eval_settings, evaluate_tuned, heldout_prompts, perplexity_pairs,
                                           safety_prompts)
from rlhf_core.evaluation.report import markdown_report, write_plots
from rlhf_core.storage import atomic_dir
from tasks.stage import code_version, quiet_transformers, stage_dir, stage_task, user_errors_fail_cleanly
from tasks.tracking import TrackingContext, stage_run

EVALUATE_CODE_VERSION = code_version(rlhf_core.evaluation.metrics, rlhf_core.evaluation.policy, rlhf_core.evaluation.prompts,
                                     rlhf_core.evaluation.pipeline, rlhf_core.evaluation.report, sys.modules[__name__])
REPORT_FILE, MARKDOWN_FILE, GENERATIONS_FILE = "report.json", "report.md", "generations.parquet"


def phase_logger():
    logger = get_run_logger()
    t0 = time.perf_counter()

    def progress(what: str, done: int, total: int) -> None:
        if done == total:
            logger.info(f"evaluate: {what}: {total} done ({time.perf_counter() - t0:.0f}s)")

    return progress


@stage_task(name="evaluate")
@user_errors_fail_cleanly
def evaluate_policy(tuned_dir: str, reference_dir: str, reward_dir: str, ppo_history: str | None, prompts_file: str,
                    demo_heldout_file: str | None, val_file: str, evaluate: EvaluateConfig, ppo_cfg: PPOConfig, judge: JudgeConfig,
                    model: ModelConfig, seed: int, stage_key: str, tracking: TrackingContext) -> dict:
    quiet_transformers()
    out = stage_dir(tracking.work_dir, "evaluate", stage_key)
    logger = get_run_logger()
    with stage_run(tracking, "evaluate", stage_key) as run:
        prompts = heldout_prompts(evaluate, prompts_file)
        harmful, harmful_source = safety_prompts(evaluate, demo_heldout_file)
        settings = eval_settings(evaluate, ppo_cfg, seed)
        evaluator = build_evaluator(reward_dir, judge, prompts, settings, safety=harmful,
                                    perplexity=perplexity_pairs(val_file, evaluate.perplexity_examples), device=evaluate.device,
                                    use_chat_template=model.use_chat_template, progress=phase_logger())
        mlflow.log_params({"tuned_policy": tuned_dir, "reference_policy": reference_dir, "reward_model": reward_dir,
                           "prompts": evaluate.prompts or prompts_file, "n_prompts": len(prompts), "safety_prompts": harmful_source,
                           "n_safety_prompts": len(harmful), "judge": evaluator.judge.label_version,
                           **{f"sampling_{k}": getattr(settings, k) for k in ("max_new_tokens", "temperature", "top_p", "seed")}})
        report, tuned, reference = evaluate_tuned(evaluator, tuned_dir, reference_dir, evaluate.device, evaluate.n_samples)
        report["settings"] = {"prompts_source": evaluate.prompts or prompts_file, "safety_source": harmful_source,
                              "judge": evaluator.judge.label_version, "sampling": vars(settings)}
        history = json.loads(Path(ppo_history).read_text()) if ppo_history and Path(ppo_history).exists() else None
        generations = pd.DataFrame({"prompt": tuned.held_out.prompts, "reference": reference.held_out.texts,
                                    "tuned": tuned.held_out.texts, "reference_score": reference.scores, "tuned_score": tuned.scores})
        with atomic_dir(out) as staging:
            (staging / REPORT_FILE).write_text(json.dumps(report, indent=2))
            generations.to_parquet(staging / GENERATIONS_FILE, index=False)
            plots = write_plots(report, staging / "plots", history)
            (staging / MARKDOWN_FILE).write_text(markdown_report(report, plots=[f"plots/{p.name}" for p in plots]))
        metrics = report["metrics"]
        mlflow.log_metrics(metrics)
        mlflow.log_artifacts(str(out), "evaluation")
        mlflow.log_table(pd.DataFrame(report["samples"]), artifact_file="evaluation/samples_table.json")
        logger.info(f"evaluate: win rate {metrics['eval_win_rate']:.3f} ({metrics['eval_win_rate_ci_low']:.3f}-"
                    f"{metrics['eval_win_rate_ci_high']:.3f}), score {metrics['eval_score_mean_reference']:+.3f} -> "
                    f"{metrics['eval_score_mean_tuned']:+.3f}, KL {metrics['eval_kl_per_response']:.2f}/response")
        return {"stage_key": stage_key, "out_dir": str(out), "mlflow_run_id": run.info.run_id, "metrics": metrics,
                "report_file": str(out / REPORT_FILE), "generations_file": str(out / GENERATIONS_FILE),
                "summary_files": [str(out / REPORT_FILE), str(out / MARKDOWN_FILE)]}
