"""The MLflow Model Registry: register the tuned policy and the reward model, and move `champion`
only when the promotion gate passes. Re-running with cached stages finds the versions it made
before (by the source stage's key) instead of making new ones."""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from prefect import get_run_logger, task

from rlhf_core.config import PipelineConfig
from rlhf_core.evaluation.promotion import decide
from rlhf_core.evaluation.report import markdown_report, write_plots
from rlhf_core.redaction import redact_url
from tasks.results import Evaluation, RewardEvaluation, RewardModel, Tuned
from tasks.tracking import TrackingContext, git_commit, stage_run

CHALLENGER, CHAMPION = "challenger", "champion"
SOURCE_KEY_TAG = "rlhf.source_key"
# Explicit, pinned: MLflow's inferred list for transformers adds torchvision, which has no CPU wheel here.
MODEL_REQUIREMENTS = ("torch", "transformers", "tokenizers", "safetensors", "accelerate")
REWARD_REQUIREMENTS = MODEL_REQUIREMENTS + ("numpy", "pandas", "peft", "sentence-transformers")
TAGGED_METRICS = (
    "eval_win_rate",
    "eval_win_rate_ci_low",
    "eval_score_gain",
    "eval_kl_per_response",
    "eval_unsafe_rate_tuned",
    "eval_perplexity_tuned",
)


def pinned(names: tuple[str, ...]) -> list[str]:
    out = []
    for name in names:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            out.append(name)
    return out


def find_version(client: MlflowClient, name: str, source_key: str):
    """The version registered before from this exact stage output, if any (the oldest one)."""
    try:
        found = client.search_model_versions(
            f"name = '{name}' and tags.`{SOURCE_KEY_TAG}` = '{source_key}'"
        )
    except MlflowException:
        return None
    return min(found, key=lambda v: int(v.version)) if found else None


def alias_version(client: MlflowClient, name: str, alias: str):
    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def run_link(tracking: TrackingContext, run_id: str) -> str:
    uri = redact_url(tracking.tracking_uri)
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{tracking.experiment_id}/runs/{run_id}"
    return f"run `{run_id}` (open with `mlflow ui --backend-store-uri {uri}`)"


def version_tags(
    tracking: TrackingContext, dataset_version: str, source_key: str, metrics: dict[str, float]
) -> dict[str, str]:
    return {
        SOURCE_KEY_TAG: source_key,
        "rlhf.dataset_version": dataset_version,
        "rlhf.config_hash": tracking.config_hash,
        "rlhf.git_commit": git_commit(),
        "rlhf.pipeline_run_id": tracking.parent_run_id,
        **{f"rlhf.{k}": f"{v:.6g}" for k, v in metrics.items()},
    }


def register_reward_model(
    client: MlflowClient,
    tracking: TrackingContext,
    name: str,
    trained: RewardModel,
    evaluated: RewardEvaluation,
    dataset_version: str,
) -> str:
    from rlhf_core.reward import serving

    found = find_version(client, name, trained.key)
    if found:
        return str(found.version)
    code = (
        Path(serving.__file__).resolve().parents[1]
    )  # the rlhf_core package travels with the model
    example = pd.DataFrame(
        {
            "prompt": ["How do I boil an egg?"],
            "response": ["Put it in boiling water for eight minutes."],
        }
    )
    info = mlflow.pyfunc.log_model(
        name="reward_model",
        python_model=str(code / "reward" / "pyfunc_model.py"),
        artifacts={serving.RewardModelPyfunc.ARTIFACT: trained.model_dir},
        code_paths=[str(code)],
        pip_requirements=pinned(REWARD_REQUIREMENTS),
        signature=serving.signature(),
        input_example=example,
    )
    metrics = {
        k: v
        for k, v in evaluated.metrics.items()
        if k in ("test_accuracy", "test_auc", "test_ece", "test_length_correlation")
    }
    version = client.create_model_version(
        name,
        info.model_uri,
        run_id=mlflow.active_run().info.run_id,
        model_id=info.model_id,
        tags=version_tags(tracking, dataset_version, trained.key, metrics),
    )
    return str(version.version)


METHODS = {
    "ppo": "PPO against a reward model",
    "dpo": "DPO on the labelled preference pairs",
    "rloo": "RLOO against a reward model",
    "grpo": "GRPO against a reward model",
    "online_dpo": "online DPO on pairs of its own answers labelled by an AI judge",
}


def register_policy(
    client: MlflowClient,
    tracking: TrackingContext,
    name: str,
    tuned: Tuned,
    evaluated: Evaluation,
    dataset_version: str,
    use_chat_template: bool,
) -> str:
    from huggingface_hub import ModelCard

    from rlhf_core.models.chat import PLAIN_ASSISTANT, PLAIN_HUMAN
    from rlhf_core.models.loading import load_causal_lm

    lm = load_causal_lm(tuned.model_dir, device="cpu")
    # pyfunc callers send plain prompts; the template is the policy's own chat format.
    template = (
        None
        if (use_chat_template and getattr(lm.tokenizer, "chat_template", None))
        else f"{PLAIN_HUMAN}{{prompt}}{PLAIN_ASSISTANT}"
    )
    m = evaluated.metrics
    card = ModelCard(
        f"---\nlibrary_name: transformers\ntags: [rlhf, {tuned.method}]\n---\n# {name}\n\n"
        f"Policy tuned with {METHODS[tuned.method]} on dataset version `{dataset_version}` "
        f"(config `{tracking.config_hash}`). Held-out win rate "
        f"vs. its reference: {m['eval_win_rate']:.3f}; KL per response {m['eval_kl_per_response']:.2f}.\n"
    )
    info = mlflow.transformers.log_model(
        {"model": lm.model, "tokenizer": lm.tokenizer},
        name="policy",
        task="text-generation",
        pip_requirements=pinned(MODEL_REQUIREMENTS),
        prompt_template=template,
        model_card=card,
        model_config={"max_new_tokens": 64, "do_sample": True, "top_p": 0.95},
    )
    tags = version_tags(
        tracking, dataset_version, evaluated.key, {k: m[k] for k in TAGGED_METRICS if k in m}
    ) | {"rlhf.method": tuned.method}
    version = client.create_model_version(
        name,
        info.model_uri,
        run_id=mlflow.active_run().info.run_id,
        model_id=info.model_id,
        tags=tags,
    )
    return str(version.version)


def ensure_registered_model(client: MlflowClient, name: str, description: str) -> None:
    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description=description)


def compare_with_champion(
    cfg: PipelineConfig, evaluated: Evaluation, reward_dir: str, champion
) -> dict:
    """The champion on the same held-out prompts, sampler and seed, scored by the same reward model and judge."""
    from rlhf_core.evaluation.compare import build_evaluator

    generations = pd.read_parquet(evaluated.generations_file)
    prompts = generations["prompt"].tolist()
    evaluator = build_evaluator(
        reward_dir,
        cfg.evaluation_judge,
        prompts,
        cfg.evaluation,
        seed=cfg.run.seed,
        device=cfg.evaluate.device,
        use_chat_template=cfg.model.use_chat_template,
    )
    components = mlflow.transformers.load_model(
        f"models:/{cfg.registry.policy_name}/{champion.version}",
        return_type="components",
        device=None,
    )
    result = evaluator.measure(
        components["model"].eval(),
        components["tokenizer"],
        f"champion v{champion.version}",
        safety=False,
        perplexity=False,
    )
    win, _ = evaluator.compare_texts(
        generations["prompt"].tolist(), generations["tuned"].tolist(), result.held_out.texts
    )
    return {
        "version": str(champion.version),
        "win": win.as_dict(),
        "win_rate": win.win_rate,
        "score": float(result.scores.mean()),
        "score_gain": float(generations["tuned_score"].mean() - result.scores.mean()),
    }


@task(name="register")
def register_and_promote(
    cfg: PipelineConfig,
    tracking: TrackingContext,
    evaluated: Evaluation,
    tuned: Tuned,
    reward_trained: RewardModel,
    reward_evaluated: RewardEvaluation,
    dataset_version: str,
) -> dict:
    """Register both models; alias the new policy version `challenger`; move `champion` to it when the
    promotion gate passes (against the reference, and against the current champion when there is one)."""
    reg = cfg.registry
    logger = get_run_logger()
    mlflow.set_tracking_uri(tracking.tracking_uri)
    client = MlflowClient()
    ensure_registered_model(
        client,
        reg.policy_name,
        "Policies tuned by the RLHF pipeline (PPO); `champion` is the one to serve.",
    )
    ensure_registered_model(
        client, reg.reward_model_name, "Reward models trained by the RLHF pipeline (Bradley-Terry)."
    )
    existing = find_version(client, reg.policy_name, evaluated.key)
    if (
        existing is not None and existing.tags.get("rlhf.promoted") is not None
    ):  # registered and gated by an earlier run
        aliases = list(client.get_model_version(reg.policy_name, existing.version).aliases)
        reward_version = find_version(client, reg.reward_model_name, reward_trained.key)
        logger.info(
            f"registry: {reg.policy_name} v{existing.version} already registered (aliases: {', '.join(aliases) or 'none'})"
        )
        return {
            "model_name": reg.policy_name,
            "version": str(existing.version),
            "promoted": existing.tags["rlhf.promoted"] == "true",
            "message": existing.tags.get("rlhf.decision", ""),
            "checks": [],
            "aliases": aliases,
            "reward_model_version": str(reward_version.version) if reward_version else None,
            "note": f"already registered as version {existing.version} by an earlier run of the same stages: no new version",
        }
    with stage_run(tracking, "register", evaluated.key):
        reward_version = register_reward_model(
            client,
            tracking,
            reg.reward_model_name,
            reward_trained,
            reward_evaluated,
            dataset_version,
        )
        if existing is None:
            version = register_policy(
                client,
                tracking,
                reg.policy_name,
                tuned,
                evaluated,
                dataset_version,
                cfg.model.use_chat_template,
            )
        else:  # registered by a run that stopped before its gate: finish that version instead of making another
            version = str(existing.version)
        client.set_registered_model_alias(reg.policy_name, CHALLENGER, version)
        champion = alias_version(client, reg.policy_name, CHAMPION)
        if champion is not None and str(champion.version) == version:
            champion = None
        versus = None
        if champion is not None and reg.gate.beat_champion:
            logger.info(
                f"registry: evaluating champion v{champion.version} on the same held-out prompts"
            )
            versus = compare_with_champion(cfg, evaluated, reward_trained.model_dir, champion)
            mlflow.log_metrics(
                {
                    "champion_win_rate": versus["win_rate"],
                    "champion_score_gain": versus["score_gain"],
                }
            )
        decision = decide(evaluated.metrics, reg.gate, versus)
        if decision.promote:
            client.set_registered_model_alias(reg.policy_name, CHAMPION, version)
            client.set_registered_model_alias(reg.reward_model_name, CHAMPION, reward_version)
        promotion = {
            "model_name": reg.policy_name,
            "version": version,
            "promoted": decision.promote,
            "message": decision.message,
            "checks": decision.checks,
            "champion": versus,
            "previous_champion": str(champion.version) if champion else None,
            "reward_model_version": reward_version,
        }
        mlflow.log_dict(promotion, "promotion.json")
        mlflow.log_metric("promoted", float(decision.promote))
        client.set_model_version_tag(
            reg.policy_name, version, "rlhf.decision", decision.message[:4900]
        )
        client.set_model_version_tag(
            reg.policy_name, version, "rlhf.promoted", str(decision.promote).lower()
        )  # last: marks it done
        promotion["aliases"] = list(client.get_model_version(reg.policy_name, version).aliases)
    (logger.info if decision.promote else logger.warning)(
        f"registry: {reg.policy_name} v{version}: {decision.message}"
    )
    return promotion


def publish_evaluation(
    tracking: TrackingContext, evaluated: Evaluation, promotion: dict | None, tuned: Tuned
) -> str:
    """The report where people look: MLflow parent run (same metric names every run) and a Prefect artifact."""
    from prefect.artifacts import create_markdown_artifact

    mlflow.set_tracking_uri(tracking.tracking_uri)
    client = MlflowClient()
    report = json.loads(Path(evaluated.report_file).read_text())
    metrics = dict(evaluated.metrics)
    if promotion:
        metrics["registry_promoted"] = float(bool(promotion.get("promoted")))
        metrics["registry_version"] = float(promotion["version"])
        if promotion.get("champion"):
            metrics["champion_win_rate"] = promotion["champion"]["win_rate"]
            metrics["champion_score_gain"] = promotion["champion"]["score_gain"]
        client.set_tag(
            tracking.parent_run_id,
            "rlhf.promotion",
            promotion.get("message") or promotion.get("note", ""),
        )
        client.set_tag(
            tracking.parent_run_id,
            "rlhf.registered_version",
            f"{promotion['model_name']}/{promotion['version']}",
        )
    for k, v in metrics.items():
        client.log_metric(tracking.parent_run_id, k, float(v))
    history = (
        json.loads(Path(tuned.history_file).read_text())
        if Path(tuned.history_file).exists()
        else None
    )
    with tempfile.TemporaryDirectory(prefix="rlhf-report-") as tmp:
        plots = write_plots(report, Path(tmp) / "plots", history, (promotion or {}).get("champion"))
        text = markdown_report(
            report,
            promotion,
            run_link(tracking, tracking.parent_run_id),
            [f"plots/{p.name}" for p in plots],
        )
        (Path(tmp) / "report.md").write_text(text)
        (Path(tmp) / "report.json").write_text(
            json.dumps({**report, "promotion": promotion}, indent=2)
        )
        client.log_artifacts(tracking.parent_run_id, tmp, "evaluation")
    create_markdown_artifact(
        markdown=markdown_report(report, promotion, run_link(tracking, tracking.parent_run_id)),
        key="policy-evaluation-report",
        description="Tuned policy vs. reference, and the registry decision",
    )
    return text
