"""The evaluation stage: tuned policy vs. its reference on held-out prompts, with report and plots."""

from __future__ import annotations

import json
import time
from pathlib import Path

import mlflow
import pandas as pd
from prefect import get_run_logger

from rlhf_core.config import EvaluateConfig, JudgeConfig, ModelConfig
from rlhf_core.evaluation.compare import (
    build_evaluator,
    evaluate_tuned,
    heldout_prompts,
    perplexity_pairs,
    safety_prompts,
)
from rlhf_core.evaluation.report import markdown_report, write_plots
from rlhf_core.storage import atomic_dir
from tasks.labels import JUDGE_CODE
from tasks.results import DemoData, Evaluation, Policy, RewardModel, Splits, Tuned
from tasks.stage import StageContext, stage

REPORT_FILE, MARKDOWN_FILE, GENERATIONS_FILE = "report.json", "report.md", "generations.parquet"


def phase_logger():
    logger = get_run_logger()
    t0 = time.perf_counter()

    def progress(what: str, done: int, total: int) -> None:
        if done == total:
            logger.info(f"evaluate: {what}: {total} done ({time.perf_counter() - t0:.0f}s)")

    return progress


@stage(
    "evaluate",
    code=JUDGE_CODE,
)
def evaluate_policy(
    ctx: StageContext,
    tuned: Tuned,
    reference: Policy,
    reward_model: RewardModel,
    splits: Splits,
    demo: DemoData | None,
    evaluate: EvaluateConfig,
    judge: JudgeConfig,
    model: ModelConfig,
    seed: int,
) -> Evaluation:
    """Tuned vs. reference on held-out prompts: the demo's own, a configured file, or the test split's."""
    out, logger = ctx.out_dir, get_run_logger()
    tuned_dir, reference_dir, reward_dir = (
        tuned.model_dir,
        reference.model_dir,
        reward_model.model_dir,
    )
    prompts_file, demo_heldout_file = (
        demo.heldout_prompts if demo else splits.test,
        demo.heldout_prompts if demo else None,
    )
    prompts = heldout_prompts(evaluate, prompts_file)
    harmful, harmful_source = safety_prompts(evaluate, demo_heldout_file)
    evaluator = build_evaluator(
        reward_dir,
        judge,
        prompts,
        evaluate,  # its open sampling keys filled in from the method's section (cfg.evaluation)
        seed=seed,
        safety=harmful,
        perplexity=perplexity_pairs(splits.val, evaluate.perplexity_examples),
        device=evaluate.device,
        use_chat_template=model.use_chat_template,
        progress=phase_logger(),
    )
    mlflow.log_params(
        {
            "tuned_policy": tuned_dir,
            "reference_policy": reference_dir,
            "reward_model": reward_dir,
            "prompts": evaluate.prompts or prompts_file,
            "n_prompts": len(prompts),
            "safety_prompts": harmful_source,
            "n_safety_prompts": len(harmful),
            "judge": evaluator.judge.label_version,
            **{f"sampling_{k}": getattr(evaluate, k) for k in evaluate.SAMPLING},
            "sampling_seed": seed,
        }
    )
    report, measured, baseline = evaluate_tuned(
        evaluator, tuned_dir, reference_dir, evaluate.device, evaluate.n_samples
    )
    report["settings"] = {
        "prompts_source": evaluate.prompts or prompts_file,
        "safety_source": harmful_source,
        "judge": evaluator.judge.label_version,
        "sampling": {**evaluate.model_dump(include=set(evaluate.SAMPLING)), "seed": seed},
    }
    history = (
        json.loads(Path(tuned.history_file).read_text())
        if Path(tuned.history_file).exists()
        else None
    )
    generations = pd.DataFrame(
        {
            "prompt": measured.held_out.prompts,
            "reference": baseline.held_out.texts,
            "tuned": measured.held_out.texts,
            "reference_score": baseline.scores,
            "tuned_score": measured.scores,
        }
    )
    with atomic_dir(out) as staging:
        (staging / REPORT_FILE).write_text(json.dumps(report, indent=2))
        generations.to_parquet(staging / GENERATIONS_FILE, index=False)
        plots = write_plots(report, staging / "plots", history)
        (staging / MARKDOWN_FILE).write_text(
            markdown_report(report, plots=[f"plots/{p.name}" for p in plots])
        )
    metrics = report["metrics"]
    mlflow.log_metrics(metrics)
    mlflow.log_artifacts(str(out), "evaluation")
    mlflow.log_table(pd.DataFrame(report["samples"]), artifact_file="evaluation/samples_table.json")
    logger.info(
        f"evaluate: win rate {metrics['eval_win_rate']:.3f} ({metrics['eval_win_rate_ci_low']:.3f}-"
        f"{metrics['eval_win_rate_ci_high']:.3f}), score {metrics['eval_score_mean_reference']:+.3f} -> "
        f"{metrics['eval_score_mean_tuned']:+.3f}, KL {metrics['eval_kl_per_response']:.2f}/response"
    )
    return ctx.result(
        Evaluation,
        metrics=metrics,
        report_file=str(out / REPORT_FILE),
        generations_file=str(out / GENERATIONS_FILE),
        summary_files=[str(out / REPORT_FILE), str(out / MARKDOWN_FILE)],
    )
