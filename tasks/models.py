"""Policy stages: the starting policy (built offline from scratch, or a given checkpoint) and SFT,
which makes the reference policy."""

from __future__ import annotations

import math
import shutil
import sys

import mlflow
import pandas as pd

import rlhf_core.models.chat
import rlhf_core.models.loading
import rlhf_core.models.scratch
import rlhf_core.sft
from rlhf_core.config import ModelConfig, SFTConfig
from rlhf_core.data.instructions import load_instruction_pairs
from rlhf_core.models.chat import ChatFormat
from rlhf_core.models.loading import LoraSettings, add_lora, load_causal_lm, save_model
from rlhf_core.models.scratch import build_scratch_model
from rlhf_core.sft import SFTSettings, SFTTrainer, encode_examples, generate_samples
from rlhf_core.storage import atomic_dir
from tasks.stage import code_version, metrics_logger, quiet_transformers, stage_dir, stage_task, user_errors_fail_cleanly
from tasks.tracking import TrackingContext, stage_run

POLICY_CODE_VERSION = code_version(rlhf_core.models.scratch, rlhf_core.models.loading, sys.modules[__name__])
SFT_CODE_VERSION = code_version(rlhf_core.sft, rlhf_core.models.chat, rlhf_core.models.loading, sys.modules[__name__])


@stage_task(name="init-policy")
@user_errors_fail_cleanly
def init_policy(train_file: str, model: ModelConfig, seed: int, stage_key: str, tracking: TrackingContext) -> dict:
    """Build a small causal LM and a BPE tokenizer trained on the training split's text."""
    quiet_transformers()
    out = stage_dir(tracking.work_dir, "init-policy", stage_key)
    with stage_run(tracking, "init-policy", stage_key) as run:
        train = pd.read_parquet(train_file, columns=["prompt", "chosen", "rejected"])
        texts = pd.concat([train["prompt"], train["chosen"], train["rejected"]]).tolist()
        with atomic_dir(out) as staging:
            build_scratch_model(texts, staging, preset=model.preset, arch=model.arch, seed=seed)
        loaded = load_causal_lm(str(out), device="cpu")
        n_params = sum(p.numel() for p in loaded.model.parameters())
        mlflow.log_params({"preset": model.preset, "arch": model.arch, "vocab_size": len(loaded.tokenizer)})
        mlflow.log_metrics({"parameters": n_params, "tokenizer_training_texts": len(texts)})
        return {"stage_key": stage_key, "out_dir": str(out), "model_dir": str(out), "mlflow_run_id": run.info.run_id,
                "metrics": {"parameters": n_params}}


def _sft_settings(cfg: SFTConfig, seed: int) -> SFTSettings:
    keys = SFTSettings.__dataclass_fields__.keys()
    return SFTSettings(**{k: v for k, v in cfg.model_dump().items() if k in keys}, seed=seed)


@stage_task(name="sft")
@user_errors_fail_cleanly
def sft(base_model: str, train_file: str, val_file: str, model: ModelConfig, sft_cfg: SFTConfig, seed: int, stage_key: str,
        tracking: TrackingContext) -> dict:
    """Fine-tune the starting policy on prompt -> chosen; the result is the reference policy for PPO."""
    quiet_transformers()
    out = stage_dir(tracking.work_dir, "sft", stage_key)
    checkpoints = out.with_name(out.name + ".checkpoints")  # outlives a killed run: the next run resumes from it
    with stage_run(tracking, "sft", stage_key) as run:
        loaded = load_causal_lm(base_model, dtype=model.dtype, device=model.device, trust_remote_code=model.trust_remote_code,
                                eval_mode=False)
        policy = loaded.model
        if model.lora.enabled:
            policy = add_lora(policy, LoraSettings(model.lora.r, model.lora.alpha, model.lora.dropout,
                                                   model.lora.target_modules))
        fmt = ChatFormat(loaded.tokenizer, use_chat_template=model.use_chat_template)
        # unlabelled pairs say nothing about which response to imitate
        train_df = pd.read_parquet(train_file, columns=["prompt", "chosen", "label_source"]).query("label_source != 'none'")
        val_df = pd.read_parquet(val_file, columns=["prompt", "chosen", "label_source"]).query("label_source != 'none'")
        pairs = list(zip(train_df["prompt"], train_df["chosen"]))
        if sft_cfg.instruction_data:
            pairs += load_instruction_pairs(sft_cfg.instruction_data)
        train, train_stats = encode_examples(pairs, fmt, sft_cfg.max_length)
        val, _ = encode_examples(list(zip(val_df["prompt"], val_df["chosen"])), fmt, sft_cfg.max_length)
        settings = _sft_settings(sft_cfg, seed)
        mlflow.log_params({f"sft.{k}": v for k, v in sft_cfg.model_dump().items()} | {
            "base_model": base_model, "lora": model.lora.enabled, "train_examples": len(train), "val_examples": len(val),
            "truncated_examples": train_stats.truncated, "dropped_examples": train_stats.dropped})
        trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        mlflow.log_metrics({"trainable_parameters": trainable, "parameters": sum(p.numel() for p in policy.parameters())})
        trainer = SFTTrainer(policy, loaded.tokenizer, train, val, settings, checkpoint_dir=checkpoints)
        trainer.on_log = metrics_logger("sft step", ("train_loss", "eval_loss", "eval_perplexity", "tokens_per_s"), trainer.total_steps)
        result = trainer.train()
        if result.resumed_from_step is not None:
            mlflow.set_tag("rlhf.resumed_from_step", str(result.resumed_from_step))
        prompts = val_df["prompt"].head(sft_cfg.n_samples).tolist()
        if prompts:
            generated = generate_samples(policy, fmt, prompts, max_new_tokens=sft_cfg.sample_max_new_tokens, seed=seed)
            mlflow.log_table({"prompt": prompts, "reference": val_df["chosen"].head(len(prompts)).tolist(), "generated": generated},
                             "samples/sft_generations.json")
        with atomic_dir(out) as staging:
            save_model(policy, loaded.tokenizer, staging / "model")
        mlflow.log_artifacts(str(out / "model"), "model")
        shutil.rmtree(checkpoints, ignore_errors=True)
        metrics = {"steps": result.steps, "train_tokens": result.train_tokens, "tokens_per_s": result.tokens_per_s,
                   "stopped_early": float(result.stopped_early)}
        if result.best_eval_loss is not None:
            metrics |= {"best_eval_loss": result.best_eval_loss, "best_eval_perplexity": math.exp(min(result.best_eval_loss, 50.0))}
        mlflow.log_metrics(metrics)
        return {"stage_key": stage_key, "out_dir": str(out), "model_dir": str(out / "model"), "mlflow_run_id": run.info.run_id,
                "model_uri": f"runs:/{run.info.run_id}/model", "metrics": metrics}
