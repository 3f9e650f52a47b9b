"""The reward stage as plain functions (used by the Prefect task and the CLI alike)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from rlhf_core.config import ModelConfig, RewardConfig
from rlhf_core.errors import UserError
from rlhf_core.models.loading import LoraSettings
from rlhf_core.reward.model import RewardModel, build_reward_model
from rlhf_core.reward.trainer import RewardSettings, RewardTrainer, encode_pairs, labelled_pairs
from rlhf_core.training import LogFn, LoopResult


def reward_settings(cfg: RewardConfig, seed: int) -> RewardSettings:
    keys = RewardSettings.__dataclass_fields__.keys()
    return RewardSettings(**{k: v for k, v in cfg.model_dump().items() if k in keys}, seed=seed)


def normalisation_stats(rm: RewardModel, prompts: list[str], policy_dir: str | None, cfg: RewardConfig, model: ModelConfig,
                        seed: int, fallback_responses: list[str]) -> dict:
    """Mean and std of the reward on what PPO will score: reference-policy samples for training prompts
    (or, without a policy, the data's own responses)."""
    rng = np.random.default_rng(seed)
    unique = sorted(set(prompts))
    picked = [unique[i] for i in rng.permutation(len(unique))[: cfg.norm_prompts]]
    if policy_dir:
        from rlhf_core.models.chat import ChatFormat
        from rlhf_core.models.loading import load_causal_lm
        from rlhf_core.sft import generate_samples

        lm = load_causal_lm(policy_dir, device=model.device, trust_remote_code=model.trust_remote_code)
        fmt = ChatFormat(lm.tokenizer, use_chat_template=model.use_chat_template)
        responses = []
        for start in range(0, len(picked), 16):
            responses += generate_samples(lm.model, fmt, picked[start:start + 16], cfg.norm_max_new_tokens, temperature=1.0,
                                          top_p=1.0, seed=seed + start)
        rewards, source = rm.score(picked, responses), f"reference policy samples ({len(picked)} training prompts)"
    else:
        responses = fallback_responses[: 2 * cfg.norm_prompts]
        rewards, source = rm.score(prompts[: len(responses)], responses), f"training responses ({len(responses)})"
    return {"mean": float(np.mean(rewards)), "std": float(np.std(rewards) or 1.0), "n": len(rewards), "source": source}


def train_reward(train_df: pd.DataFrame, val_df: pd.DataFrame | None, cfg: RewardConfig, model: ModelConfig, backbone: str,
                 *, checkpoint_dir: Path | None = None, policy_dir: str | None = None, seed: int = 0,
                 on_log: LogFn | None = None, progress: bool = True) -> tuple[RewardModel, LoopResult]:
    """Build, train (resuming from checkpoint_dir), and measure the normalisation statistics; the caller saves."""
    train_df = labelled_pairs(train_df)
    val_df = labelled_pairs(val_df) if val_df is not None else None
    if train_df.empty:
        raise UserError("no labelled training pairs for the reward model (enable labels, or give labelled data)")
    lora = LoraSettings(cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, cfg.lora.target_modules) if cfg.lora.enabled else None
    rm = build_reward_model(backbone, max_length=cfg.max_length, dtype=cfg.dtype, device=cfg.device,
                            use_chat_template=model.use_chat_template, trust_remote_code=model.trust_remote_code, seed=seed, lora=lora)
    settings = reward_settings(cfg, seed)
    val = encode_pairs(rm, val_df, settings) if val_df is not None and len(val_df) else None
    trainer = RewardTrainer(rm, encode_pairs(rm, train_df, settings), val, settings, checkpoint_dir=checkpoint_dir,
                            on_log=on_log, progress=progress)
    result = trainer.train()
    if hasattr(rm.model, "merge_and_unload"):  # LoRA: one plain model from here on
        rm.model = rm.model.merge_and_unload()
    rm.normalisation = normalisation_stats(rm, train_df["prompt"].tolist(), policy_dir, cfg, model, seed,
                                           train_df["chosen"].tolist() + train_df["rejected"].tolist())
    rm.info.update({"trained_steps": result.steps, "best_val_accuracy": result.best_metric, "train_pairs": len(train_df)})
    return rm, result
