"""The pipeline flow: it reads like the diagram in the README."""

from __future__ import annotations

import functools
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.filesystems import LocalFileSystem
from prefect.runtime import flow_run
from prefect.states import Failed, State

from rlhf_core.config import PipelineConfig, SourceConfig, stable_hash
from rlhf_core.storage import source_fingerprint
from tasks import data as data_tasks
from tasks import evaluate as evaluate_tasks
from tasks import labels as label_tasks
from tasks import models as model_tasks
from tasks import ppo as ppo_tasks
from tasks import registry as registry_tasks
from tasks import reward as reward_tasks
from tasks.stage import make_stage_key, quiet_clean_failures
from tasks.tracking import TrackingContext, finish_pipeline_run, log_cached_stage, start_pipeline_run


class StageFailed(Exception):
    def __init__(self, state: State):
        super().__init__(state.message)
        self.state = state


@functools.cache
def result_storage_block(basepath: str, s3_endpoint: str | None = None) -> str:
    """Prefect wants result storage as a saved block: one per configured location, a folder or s3://bucket/prefix.
    S3 credentials stay in the environment (the block stores only the endpoint)."""
    name = f"rlhf-results-{stable_hash([basepath, s3_endpoint], 10)}"
    if basepath.startswith("s3://"):
        from prefect_aws import AwsCredentials, S3Bucket
        from prefect_aws.client_parameters import AwsClientParameters

        from rlhf_core.storage import split_s3_uri

        bucket, prefix = split_s3_uri(basepath)
        creds = AwsCredentials(aws_client_parameters=AwsClientParameters(endpoint_url=s3_endpoint) if s3_endpoint else AwsClientParameters())
        S3Bucket(bucket_name=bucket, bucket_folder=prefix.rstrip("/"), credentials=creds).save(name, overwrite=True)
        return f"s3-bucket/{name}"
    LocalFileSystem(basepath=basepath).save(name, overwrite=True)
    return f"local-file-system/{name}"


def run_stage(task, stage: str, tracking: TrackingContext, **params) -> dict:
    """Run a stage task (served from cache when its key matches), and keep MLflow complete either way."""
    # Outputs live in the work dir, so the cache key names it too.
    params["stage_key"] = f"{params['stage_key']}-{stable_hash(tracking.work_dir, 6)}"
    task = task.with_options(result_storage=result_storage_block(tracking.result_storage, tracking.s3_endpoint))
    state = task(tracking=tracking, **params, return_state=True)
    if state.is_completed() and state.name == "Cached":
        result = state.result()
        if not Path(result["out_dir"]).exists():  # the cache outlived its files: do the work again
            get_run_logger().warning(f"{stage}: cached output {result['out_dir']} is gone; recomputing")
            state = task.with_options(refresh_cache=True)(tracking=tracking, **params, return_state=True)
        else:
            log_cached_stage(tracking, stage, result)
            return result
    if not state.is_completed():
        raise StageFailed(state)
    return state.result()


def data_sources(cfg: PipelineConfig, tracking: TrackingContext) -> tuple[list[SourceConfig], str | None]:
    """The configured sources, or the generated demo set (which comes with its own held-out prompts)."""
    if cfg.data.sources:
        return cfg.data.sources, None
    demo = run_stage(data_tasks.generate_demo_data, "demo-data", tracking, demo=cfg.data.demo,
                     stage_key=make_stage_key("demo", "", cfg.data.demo.model_dump(), data_tasks.DEMO_CODE_VERSION))
    return [SourceConfig(path=demo["files"]["preferences"], format="pairwise")], demo["files"]["heldout_prompts"]


def versioned_splits(cfg: PipelineConfig, tracking: TrackingContext) -> tuple[dict, dict]:
    """Sources -> ingest -> validate -> train/val/test split by prompt; each stage keyed on what it reads."""
    data = cfg.data
    sources, heldout_file = data_sources(cfg, tracking)
    source_digest = stable_hash([(s.model_dump(), source_fingerprint(s.path, cfg.s3)) for s in sources])
    ingested = run_stage(data_tasks.ingest, "ingest", tracking, sources=sources, chunk_rows=data.chunk_rows, s3=cfg.s3,
                         stage_key=make_stage_key("ingest", source_digest, [s.model_dump() for s in sources], data_tasks.DATA_CODE_VERSION))
    validated = run_stage(data_tasks.validate, "validate", tracking, ingest_dir=ingested["out_dir"], data=data,
                          stage_key=make_stage_key("validate", ingested["stage_key"],
                                                   data.model_dump(exclude={"sources", "splits", "demo", "chunk_rows"}),
                                                   data_tasks.DATA_CODE_VERSION))
    splits = run_stage(data_tasks.split, "split", tracking, validate_dir=validated["out_dir"], ratios=data.splits, seed=cfg.run.seed,
                       stage_key=make_stage_key("split", validated["stage_key"], [data.splits.model_dump(), cfg.run.seed],
                                                data_tasks.DATA_CODE_VERSION))
    data_tasks.log_splits_to_run(tracking.parent_run_id, splits)
    return validated, {**splits, "demo_heldout_file": heldout_file}


def reference_policy(cfg: PipelineConfig, tracking: TrackingContext, splits: dict) -> dict:
    """Starting policy (built from scratch offline, or the configured checkpoint), then SFT."""
    model = cfg.model
    if model.from_scratch:
        start = run_stage(model_tasks.init_policy, "init-policy", tracking, train_file=splits["files"]["train"], model=model,
                          seed=cfg.run.seed, stage_key=make_stage_key("init-policy", splits["stage_key"],
                                                                       [model.model_dump(), cfg.run.seed], model_tasks.POLICY_CODE_VERSION))
        base, base_key = start["model_dir"], start["stage_key"]
    else:
        base = model.name_or_path
        base_key = source_fingerprint(base, cfg.s3) if Path(base).exists() else base
    if not cfg.sft.enabled:
        return {"model_dir": base}
    return run_stage(model_tasks.sft, "sft", tracking, base_model=base, train_file=splits["files"]["train"],
                     val_file=splits["files"]["val"], model=model, sft_cfg=cfg.sft, seed=cfg.run.seed,
                     stage_key=make_stage_key("sft", stable_hash([base_key, splits["stage_key"]]),
                                              [model.model_dump(), cfg.sft.model_dump(), cfg.run.seed], model_tasks.SFT_CODE_VERSION))


def ai_labels(cfg: PipelineConfig, tracking: TrackingContext, splits: dict, policy: dict | None) -> dict:
    """RLAIF: judge the training pairs (or new pairs sampled from the SFT policy)."""
    labels = cfg.labels
    if labels.mode == "generate" and policy is None:
        raise StageFailed(Failed(message="labels.mode 'generate' samples from the SFT policy: run.until must include sft"))
    from rlhf_core.judges.constitution import load_constitution

    constitution_hash = load_constitution(labels.judge.constitution).hash
    upstream = [splits["stage_key"], policy["model_dir"] if (policy and labels.mode == "generate") else None]
    return run_stage(label_tasks.label, "label", tracking, train_file=splits["files"]["train"], labels=labels, seed=cfg.run.seed,
                     policy_dir=policy["model_dir"] if policy else None,
                     stage_key=make_stage_key("label", stable_hash(upstream), [labels.model_dump(), constitution_hash, cfg.run.seed],
                                              label_tasks.LABELS_CODE_VERSION))


def reward_model(cfg: PipelineConfig, tracking: TrackingContext, splits: dict, train_file: str, train_key: str,
                 policy: dict | None) -> tuple[dict, dict]:
    """Bradley-Terry reward model on the (AI-)labelled training pairs, then its evaluation on val/test."""
    reward = cfg.reward
    policy_dir = policy["model_dir"] if policy else None
    trained = run_stage(reward_tasks.train_reward_model, "reward-train", tracking, train_file=train_file,
                        val_file=splits["files"]["val"], reward=reward, model=cfg.model, policy_dir=policy_dir, seed=cfg.run.seed,
                        stage_key=make_stage_key("reward-train", stable_hash([train_key, splits["stage_key"], policy_dir]),
                                                 [reward.model_dump(exclude={"gate"}), cfg.model.use_chat_template, cfg.run.seed],
                                                 reward_tasks.REWARD_TRAIN_CODE_VERSION))
    evaluated = run_stage(reward_tasks.evaluate_reward, "reward-eval", tracking, model_dir=trained["model_dir"],
                          val_file=splits["files"]["val"], test_file=splits["files"]["test"], reward=reward,
                          stage_key=make_stage_key("reward-eval", stable_hash([trained["stage_key"], splits["stage_key"]]),
                                                   [reward.device], reward_tasks.REWARD_EVAL_CODE_VERSION))
    return trained, evaluated


def reward_gate(cfg: PipelineConfig, tracking: TrackingContext, evaluated: dict) -> None:
    """PPO never starts on a reward model that misses a configured threshold."""
    from rlhf_core.reward.evaluate import check_gate

    gate = cfg.reward.gate
    result = check_gate(evaluated["metrics"], gate.min_accuracy, gate.max_ece, gate.max_abs_length_corr)
    reward_tasks.publish_reward_summary(tracking, evaluated, result)
    if not result.passed:
        raise StageFailed(Failed(message=result.message))


def tuned_policy(cfg: PipelineConfig, tracking: TrackingContext, splits: dict, policy: dict, reward: dict) -> dict:
    """PPO with a KL penalty against the frozen reference policy, scored by the gated reward model."""
    return run_stage(ppo_tasks.ppo, "ppo", tracking, policy_dir=policy["model_dir"], reward_dir=reward["model_dir"],
                     train_file=splits["files"]["train"], ppo_cfg=cfg.ppo, model=cfg.model, seed=cfg.run.seed,
                     stage_key=make_stage_key("ppo", stable_hash([policy["model_dir"], reward["stage_key"], splits["stage_key"]]),
                                              [cfg.ppo.model_dump(), cfg.model.model_dump(), cfg.run.seed], ppo_tasks.PPO_CODE_VERSION))


def evaluation(cfg: PipelineConfig, tracking: TrackingContext, splits: dict, policy: dict, reward: dict, tuned: dict) -> dict:
    """Tuned vs. reference on held-out prompts: the demo's own, a configured file, or the test split's prompts."""
    from rlhf_core.judges.constitution import load_constitution

    ev = cfg.evaluate
    prompts_file = splits["demo_heldout_file"] or splits["files"]["test"]
    inputs = [tuned["stage_key"], policy["model_dir"], reward["stage_key"], splits["stage_key"]]
    inputs += [source_fingerprint(p, cfg.s3) for p in (ev.prompts, ev.safety.prompts, prompts_file) if p]
    sampling = cfg.ppo.model_dump(include={"max_new_tokens", "max_prompt_tokens", "temperature", "top_p"})
    history = str(Path(tuned["out_dir"]) / "history.json")
    return run_stage(evaluate_tasks.evaluate_policy, "evaluate", tracking, tuned_dir=tuned["model_dir"], reference_dir=policy["model_dir"],
                     reward_dir=reward["model_dir"], ppo_history=history, prompts_file=prompts_file,
                     demo_heldout_file=splits["demo_heldout_file"], val_file=splits["files"]["val"], evaluate=ev, ppo_cfg=cfg.ppo,
                     judge=cfg.labels.judge, model=cfg.model, seed=cfg.run.seed,
                     stage_key=make_stage_key("evaluate", stable_hash(inputs),
                                              [ev.model_dump(), cfg.labels.judge.model_dump(), load_constitution(cfg.labels.judge.constitution).hash,
                                               sampling, cfg.model.use_chat_template, cfg.run.seed], evaluate_tasks.EVALUATE_CODE_VERSION))


def registry(cfg: PipelineConfig, tracking: TrackingContext, splits: dict, evaluated: dict, tuned: dict, reward: dict,
             reward_evaluated: dict) -> dict | None:
    """Register the policy (alias challenger) and the reward model; promote to champion only through the gate."""
    promotion = None
    if cfg.registry.enabled:
        state = registry_tasks.register_and_promote(cfg.model_dump(mode="json"), tracking, evaluated, tuned, reward, reward_evaluated,
                                                    splits["dataset_version"], return_state=True)
        if not state.is_completed():
            raise StageFailed(state)
        promotion = state.result()
    registry_tasks.publish_evaluation(tracking, evaluated, promotion, str(Path(tuned["out_dir"]) / "history.json"))
    return promotion


@flow(name="rlhf-pipeline", log_prints=True)
def rlhf_pipeline(config: dict, data_path: str | None = None) -> dict | State:
    """Preference data -> versioned splits -> SFT reference policy -> AI labels -> reward model + gate -> PPO
    -> evaluation -> registry (champion only through the promotion gate)."""
    quiet_clean_failures()
    cfg = PipelineConfig.model_validate(config)
    if data_path:  # a run for one file (e.g. started by the data-arrival trigger): it replaces the configured sources
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"sources": [SourceConfig(path=data_path)]})})
    tracking = start_pipeline_run(cfg, run_name=f"{cfg.run.name}-{flow_run.get_name() or 'local'}",
                                  tags={"prefect.flow_run_id": str(flow_run.get_id() or "")})
    status = "FAILED"
    try:
        validated, splits = versioned_splits(cfg, tracking)
        result = {"mlflow_run_id": tracking.parent_run_id, "dataset_version": splits["dataset_version"], "splits": splits["files"],
                  "counts": {**validated["metrics"], **splits["metrics"]}}
        policy = None
        if cfg.run.runs("sft"):
            policy = reference_policy(cfg, tracking, splits)
            result["reference_policy"] = policy["model_dir"]
        train_file, train_key = splits["files"]["train"], splits["stage_key"]
        if cfg.run.runs("label") and cfg.labels.enabled:
            labelled = ai_labels(cfg, tracking, splits, policy)
            train_file, train_key = labelled["train_file"], labelled["stage_key"]
            result["labels"] = labelled["metrics"]
        result["train_file"] = train_file
        if cfg.run.runs("reward") and cfg.reward.enabled:
            trained, evaluated_rm = reward_model(cfg, tracking, splits, train_file, train_key, policy)
            result["reward_model"] = trained["model_dir"]
            result["reward"] = evaluated_rm["metrics"]
            reward_gate(cfg, tracking, evaluated_rm)
            if cfg.run.runs("ppo") and cfg.ppo.enabled:
                if policy is None:
                    raise StageFailed(Failed(message="ppo needs the SFT reference policy: run.until must include sft"))
                tuned = tuned_policy(cfg, tracking, splits, policy, trained)
                result["tuned_policy"] = tuned["model_dir"]
                result["ppo"] = tuned["metrics"]
                if cfg.run.runs("evaluate") and cfg.evaluate.enabled:
                    evaluated = evaluation(cfg, tracking, splits, policy, trained, tuned)
                    result["evaluation"] = evaluated["metrics"]
                    if cfg.run.until != "evaluate":
                        result["registry"] = registry(cfg, tracking, splits, evaluated, tuned, trained, evaluated_rm)
        status = "FINISHED"
        return result
    except StageFailed as failed:
        return Failed(message=failed.state.message)
    finally:
        finish_pipeline_run(tracking, status)
