"""The on-policy stages (PPO, RLOO, GRPO, online DPO) as plain functions: build policy, reference, reward and
value models from folders and config."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from rlhf_core.config import EvaluateConfig, JudgeConfig, ModelConfig, PolicyGradientConfig
from rlhf_core.errors import UserError
from rlhf_core.models.loading import add_lora, load_causal_lm
from rlhf_core.ppo.trainer import LogFn, PPOTrainer, PreferenceFn, SamplesFn
from rlhf_core.ppo.value import ValueHead, value_from_causal_lm, value_from_reward_model
from rlhf_core.reward.ensemble import EnsembleRewardModel
from rlhf_core.reward.model import load_reward_model


def build_ppo_trainer(
    policy_dir: str,
    reward_dir: str,
    prompts: Sequence[str],
    cfg: PolicyGradientConfig,
    model: ModelConfig,
    seed: int = 0,
    *,
    checkpoint_dir: Path | None = None,
    on_log: LogFn | None = None,
    on_samples: SamplesFn | None = None,
    judge: JudgeConfig | None = None,
    evaluate: EvaluateConfig | None = None,
    val_prompts: Sequence[str] = (),
    preference_judge: JudgeConfig | None = None,
    label_cache: Path | None = None,
    progress: bool = True,
) -> PPOTrainer:
    """With a judge and validation prompts, a JudgeMonitor checks the policy every ppo.eval_every
    iterations, sampling as the final evaluation does (evaluate's settings, open keys from ppo).
    Online DPO's pairs are judged by `preference_judge` (default: the default judge), its answers
    kept in the label cache at `label_cache` when given."""
    import torch

    torch.manual_seed(seed)
    loaded = load_causal_lm(
        policy_dir, dtype=model.dtype, device=cfg.device, trust_remote_code=model.trust_remote_code
    )
    policy, tokenizer = loaded.model, loaded.tokenizer
    reference = None
    if cfg.reference == "copy":
        reference = load_causal_lm(
            policy_dir,
            dtype=model.dtype,
            device=cfg.device,
            trust_remote_code=model.trust_remote_code,
        ).model
    rm = load_reward_model(reward_dir, device=cfg.device, trust_remote_code=model.trust_remote_code)
    if isinstance(rm, EnsembleRewardModel):
        rm = rm.with_aggregate(cfg.ensemble_aggregate, cfg.ensemble_std_coef)
    reads_policy_tokens = rm.reads_tokens_of(tokenizer)
    kind = "none"  # RLOO, GRPO: the other answers to the prompt are the baseline; DPO: none
    if cfg.advantage == "gae":
        kind = cfg.value_model
        if kind == "auto":
            kind = "reward" if reads_policy_tokens else "policy"
    if kind == "none":
        value = None
    elif kind == "reward":
        if not reads_policy_tokens:
            raise UserError(
                "ppo.value_model 'reward' needs a causal reward model with the policy's tokenizer; "
                "use 'policy' or 'shared' with this reward model"
            )
        value = value_from_reward_model(getattr(rm, "members", [rm])[0].model)
    elif kind == "policy":
        value = value_from_causal_lm(reference if reference is not None else policy, seed=seed)
    else:
        value = ValueHead(policy.config.hidden_size, seed)
    if value is not None:
        value.to(loaded.device)
    if cfg.lora.enabled:
        policy = add_lora(policy, cfg.lora)
    monitor = None
    if cfg.eval_every is not None and judge is not None and val_prompts:
        from rlhf_core.evaluation.policy import PolicyEvaluator
        from rlhf_core.judges.rlaif import build_judge
        from rlhf_core.ppo.monitor import JudgeMonitor

        monitor = JudgeMonitor(
            PolicyEvaluator(
                rm,
                build_judge(judge),
                list(val_prompts)[: cfg.eval_prompts],
                (evaluate or EvaluateConfig()).sampling_from(cfg),
                seed=seed,
                use_chat_template=model.use_chat_template,
            )
        )
    return PPOTrainer(
        policy,
        tokenizer,
        rm,
        prompts,
        cfg,
        seed=seed,
        reference=reference,
        value_model=value,
        use_chat_template=model.use_chat_template,
        checkpoint_dir=checkpoint_dir,
        on_log=on_log,
        on_samples=on_samples,
        monitor=monitor,
        preference=(
            judged_preference(preference_judge or JudgeConfig(), label_cache)
            if cfg.advantage == "online_dpo"
            else None
        ),
        progress=progress,
    )


def judged_preference(judge_cfg: JudgeConfig, label_cache: Path | None) -> PreferenceFn:
    """P(a > b) from the judge, asked as the label stage asks it (both orders for an
    order-sensitive judge) and through the same cache, so no pair is judged twice."""
    from rlhf_core.judges.labeling import LabelCache, label_pairs
    from rlhf_core.judges.rlaif import build_judge

    judge = build_judge(judge_cfg)
    cache = LabelCache(label_cache) if label_cache is not None else None

    def prefer(prompts, a, b):
        return label_pairs(judge, prompts, a, b, cache=cache).p

    return prefer


def distributed_job(job: dict, dist) -> dict | None:
    """An on-policy method (PPO, RLOO, GRPO, online DPO: job["section"] names its settings) as one
    of the processes of a distributed learner; rank 0 writes the tuned policy."""
    from rlhf_core import distributed
    from rlhf_core.config import PipelineConfig

    section = PipelineConfig.model_fields[job["section"]].annotation
    optional = lambda key, cls: cls.model_validate(job[key]) if job.get(key) else None  # noqa: E731
    trainer = build_ppo_trainer(
        job["policy_dir"],
        job["reward_dir"],
        job["prompts"],
        section.model_validate(job["settings"]),
        ModelConfig.model_validate(job["model"]),
        job["seed"],
        checkpoint_dir=Path(job["checkpoint_dir"]),
        on_samples=distributed.report_samples if dist.is_main else None,
        judge=optional("judge", JudgeConfig),
        evaluate=optional("evaluate", EvaluateConfig),
        val_prompts=job["val_prompts"],
        preference_judge=optional("preference_judge", JudgeConfig),
        label_cache=Path(job["label_cache"]) if job.get("label_cache") else None,
        **distributed.worker_hooks(dist),
    )
    result = trainer.train()
    return distributed.saved_result(
        dist, trainer.policy, trainer.tokenizer, job["model_out"], result, **described(trainer)
    )


def described(trainer: PPOTrainer) -> dict:
    """What the learner built beside its settings (logged with the stage's parameters)."""
    return {
        "value_model": type(trainer.value).__name__ if trainer.value is not None else "none",
        "reward_reads_policy_tokens": trainer.rm_reads_policy_tokens,
        "monitor_prompts": len(trainer.monitor.ev.prompts) if trainer.monitor else 0,
    }
