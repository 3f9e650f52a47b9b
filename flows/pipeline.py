"""The pipeline flow: it reads like the diagram in the README. Each stage keys its own cache on
what it is given (see tasks/stage.py) and returns a typed result the next stages take."""

from __future__ import annotations

from prefect import flow, get_run_logger
from prefect.runtime import flow_run
from prefect.states import Failed, State

from rlhf_core.config import PipelineConfig, SourceConfig
from rlhf_core.errors import UserError
from rlhf_core.reward.evaluate import check_gate
from rlhf_core.storage import work_dir_lock
from tasks import data, dpo, evaluate, labels, models, ppo, registry, reward
from tasks.results import DemoData, Splits
from tasks.stage import StageFailed, quiet_clean_failures
from tasks.tracking import (
    TrackingContext,
    close_abandoned_runs,
    finish_pipeline_run,
    start_pipeline_run,
)


def versioned_splits(
    cfg: PipelineConfig, t: TrackingContext
) -> tuple[Splits, DemoData | None, dict]:
    """Sources (the configured ones, or the generated demo set) -> ingest -> validate -> split."""
    demo = None if cfg.data.sources else data.demo_data(t, demo=cfg.data.demo)
    sources = cfg.data.sources or [SourceConfig(path=demo.preferences, format="pairwise")]
    ingested = data.ingest(t, sources=sources, chunk_rows=cfg.data.chunk_rows, s3=cfg.s3)
    validated = data.validate(t, ingested=ingested, data=cfg.data)
    splits = data.split(t, validated=validated, ratios=cfg.data.splits, seed=cfg.run.seed)
    data.log_splits_to_run(t.parent_run_id, splits)
    return splits, demo, {**validated.metrics, **splits.metrics}


def reward_gate(cfg: PipelineConfig, t: TrackingContext, evaluated) -> None:
    """PPO never starts on a reward model that misses a configured threshold."""
    gate = cfg.reward.gate
    verdict = check_gate(
        evaluated.metrics, gate.min_accuracy, gate.max_ece, gate.max_abs_length_corr
    )
    reward.publish_reward_summary(t, evaluated, verdict)
    if not verdict.passed:
        raise StageFailed.because(verdict.message)


def register(
    cfg: PipelineConfig,
    t: TrackingContext,
    evaluated,
    tuned,
    reward_model,
    reward_eval,
    dataset_version: str,
) -> dict | None:
    """Register the policy (alias challenger) and the reward model; champion only through the gate."""
    promotion = None
    if cfg.registry.enabled:
        state = registry.register_and_promote(
            cfg, t, evaluated, tuned, reward_model, reward_eval, dataset_version, return_state=True
        )
        if not state.is_completed():
            raise StageFailed(state)
        promotion = state.result()
    registry.publish_evaluation(t, evaluated, promotion, tuned)
    return promotion


def enabled(cfg: PipelineConfig, stage: str, section: str | None = None) -> bool:
    """The stage runs: run.until includes it and its section is not switched off."""
    return cfg.run.runs(stage) and getattr(cfg, section or stage).enabled


def optimise_policy(
    cfg: PipelineConfig, t: TrackingContext, reference, pairs, reward_model, splits
):
    """run.method: DPO on the labelled pairs (the reward model then serves the evaluation only),
    or an on-policy method against the gated reward model (PPO, RLOO, GRPO), or online DPO (the
    label stage's judge labels pairs of the policy's answers as it trains)."""
    method = cfg.run.method
    if method == "dpo":
        return dpo.dpo(
            t,
            reference=reference,
            pairs=pairs,
            splits=splits,
            dpo=cfg.dpo,
            model=cfg.model,
            seed=cfg.run.seed,
            distributed=cfg.distributed,
        )
    return getattr(ppo, method)(
        t,
        reference=reference,
        reward_model=reward_model,
        splits=splits,
        settings=getattr(cfg, method),
        model=cfg.model,
        judge=cfg.evaluation_judge,
        evaluate=cfg.evaluate,
        seed=cfg.run.seed,
        distributed=cfg.distributed,
        preference_judge=cfg.labels.judge if method == "online_dpo" else None,
    )


def stages(cfg: PipelineConfig, t: TrackingContext) -> dict:
    """The stages in pipeline order; each hands its typed result to the next. Returns the run's
    summary (paths and metrics) after the last stage the config asks for."""
    seed, model = cfg.run.seed, cfg.model
    splits, demo, counts = versioned_splits(cfg, t)
    out = {"dataset_version": splits.dataset_version, "splits": splits.files, "counts": counts}
    if not cfg.run.runs("sft"):
        return out

    if model.from_scratch:
        start = models.init_policy(t, splits=splits, model=model, seed=seed)
    else:
        start = models.pretrained_policy(model)
    reference = start
    if cfg.sft.enabled:
        reference = models.sft(
            t,
            start=start,
            splits=splits,
            model=model,
            sft=cfg.sft,
            seed=seed,
            distributed=cfg.distributed,
        )
    out["reference_policy"] = reference.model_dir

    pairs = splits
    if enabled(cfg, "label", "labels"):
        sampled_from = reference if cfg.labels.mode != "relabel" else None
        pairs = labels.label(t, splits=splits, policy=sampled_from, labels=cfg.labels, seed=seed)
        out["labels"] = pairs.metrics
    out["train_file"] = pairs.train_file
    if not enabled(cfg, "reward"):
        return out

    reward_model = reward.train_reward_model(
        t,
        pairs=pairs,
        splits=splits,
        policy=reference,
        reward=cfg.reward,
        model=model,
        seed=seed,
        distributed=cfg.distributed,
    )
    reward_eval = reward.evaluate_reward(
        t, reward_model=reward_model, splits=splits, reward=cfg.reward
    )
    out |= {"reward_model": reward_model.model_dir, "reward": reward_eval.metrics}
    reward_gate(cfg, t, reward_eval)
    if not enabled(cfg, "ppo", cfg.run.method):
        return out

    tuned = optimise_policy(cfg, t, reference, pairs, reward_model, splits)
    out |= {"tuned_policy": tuned.model_dir, cfg.run.method: tuned.metrics}
    if not enabled(cfg, "evaluate"):
        return out

    evaluated = evaluate.evaluate_policy(
        t,
        tuned=tuned,
        reference=reference,
        reward_model=reward_model,
        splits=splits,
        demo=demo,
        evaluate=cfg.evaluation,
        judge=cfg.evaluation_judge,
        model=model,
        seed=seed,
    )
    out["evaluation"] = evaluated.metrics
    if cfg.run.until != "evaluate":
        out["registry"] = register(
            cfg, t, evaluated, tuned, reward_model, reward_eval, splits.dataset_version
        )
    return out


@flow(name="rlhf-pipeline", log_prints=True)
def rlhf_pipeline(config: dict, data_path: str | None = None) -> dict | State:
    """Preference data -> versioned splits -> SFT reference policy -> AI labels -> reward model + gate
    -> policy optimisation (run.method) -> evaluation -> registry (champion only through the
    promotion gate)."""
    quiet_clean_failures()
    cfg = PipelineConfig.model_validate(config)
    if data_path:
        # a run for one file (e.g. started by the data-arrival trigger) replaces the sources
        sources = [SourceConfig(path=data_path)]
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"sources": sources})})
    flow_name = flow_run.get_name() or "local"
    try:  # one run per work dir: the other one's stages and checkpoints are in it
        with work_dir_lock(cfg.work_dir, f"flow run {flow_name}"):
            return tracked_run(cfg, flow_name)
    except UserError as exc:
        return Failed(message=str(exc))


def tracked_run(cfg: PipelineConfig, flow_name: str) -> dict | State:
    """The stages inside the pipeline's MLflow parent run, closed as FINISHED or FAILED."""
    if closed := close_abandoned_runs(cfg):
        get_run_logger().warning(
            f"{closed} MLflow run(s) left RUNNING by a killed run on this work dir: marked KILLED"
        )
    t = start_pipeline_run(
        cfg,
        run_name=f"{cfg.run.name}-{flow_name}",
        tags={"prefect.flow_run_id": str(flow_run.get_id() or "")},
    )
    status = "FAILED"
    try:
        out = {"mlflow_run_id": t.parent_run_id, **stages(cfg, t)}
        status = "FINISHED"
        return out
    except StageFailed as failed:
        return Failed(message=failed.state.message)
    finally:
        finish_pipeline_run(t, status)
