"""Policy stages: the starting policy (built offline from scratch, or a given checkpoint) and SFT,
which makes the reference policy."""

from __future__ import annotations

import math
import shutil

import mlflow
import pandas as pd
from prefect import get_run_logger

from rlhf_core.config import DistributedConfig, ModelConfig, SFTConfig
from rlhf_core.distributed.launch import launch
from rlhf_core.models.chat import ChatFormat
from rlhf_core.models.loading import load_causal_lm, save_model
from rlhf_core.models.scratch import build_scratch_model
from rlhf_core.sft import SFTResult, build_sft_trainer, generate_samples, sft_counts, sft_pairs
from rlhf_core.storage import atomic_dir
from tasks.results import Policy, Splits
from tasks.stage import StageContext, input_digest, metrics_logger, stage


@stage("init-policy")
def init_policy(ctx: StageContext, splits: Splits, model: ModelConfig, seed: int) -> Policy:
    """Build a small causal LM and a BPE tokenizer trained on the training split's text."""
    train = pd.read_parquet(splits.train, columns=["prompt", "chosen", "rejected"])
    texts = pd.concat([train["prompt"], train["chosen"], train["rejected"]]).tolist()
    with atomic_dir(ctx.out_dir) as staging:
        build_scratch_model(texts, staging, preset=model.preset, arch=model.arch, seed=seed)
    loaded = load_causal_lm(str(ctx.out_dir), device="cpu")
    n_params = sum(p.numel() for p in loaded.model.parameters())
    mlflow.log_params(
        {"preset": model.preset, "arch": model.arch, "vocab_size": len(loaded.tokenizer)}
    )
    mlflow.log_metrics({"parameters": n_params, "tokenizer_training_texts": len(texts)})
    return ctx.result(Policy, model_dir=str(ctx.out_dir), metrics={"parameters": n_params})


def pretrained_policy(model: ModelConfig) -> Policy:
    """The configured checkpoint as the starting policy: an input, keyed by its content."""
    digest = input_digest(model)["name_or_path"][1]
    return Policy(
        stage="pretrained",
        key=f"pretrained-{digest}",
        out_dir=model.name_or_path,
        model_dir=model.name_or_path,
    )


@stage("sft")
def sft(
    ctx: StageContext,
    start: Policy,
    splits: Splits,
    model: ModelConfig,
    sft: SFTConfig,
    seed: int,
    distributed: DistributedConfig,
) -> Policy:
    """Fine-tune the starting policy on prompt -> chosen; the result is the reference policy."""
    logger = get_run_logger()
    mlflow.log_params(
        {f"sft.{k}": v for k, v in sft.model_dump().items()}
        | {"base_model": start.model_dir, "lora": model.lora.enabled}
    )
    if distributed.num_processes > 1:
        policy, tokenizer, fmt, result, counts = _sft_processes(
            ctx, start, splits, model, sft, seed, distributed
        )
    else:
        trainer, stats = build_sft_trainer(
            start.model_dir,
            splits.train,
            splits.val,
            model,
            sft,
            seed,
            checkpoint_dir=ctx.checkpoints,
        )
        trainer.on_log = metrics_logger("sft step", SFT_SHOWN, trainer.total_steps)
        policy, tokenizer, fmt = trainer.model, trainer.tokenizer, trainer.fmt
        counts = sft_counts(trainer, stats)
        result = trainer.train()
    mlflow.log_params({k: v for k, v in counts.items() if k.endswith("_examples")})
    mlflow.log_param("world_size", result.world_size)  # as the learner reported it
    mlflow.log_metrics({k: v for k, v in counts.items() if k.endswith("parameters")})
    if result.resume_note:
        logger.warning(f"sft: {result.resume_note}")
    if result.resumed_from_step is not None:
        logger.info(f"sft: resumed from step {result.resumed_from_step}")
        mlflow.set_tag("rlhf.resumed_from_step", str(result.resumed_from_step))
    shown = sft_pairs(splits.val)[: sft.n_samples]
    if shown:
        prompts = [p for p, _ in shown]
        generated = generate_samples(
            policy,
            fmt,
            prompts,
            sft.sample_max_new_tokens,
            sft.sample_temperature,
            sft.sample_top_p,
            sft.sample_repetition_penalty,
            seed=seed,
        )
        mlflow.log_table(
            {"prompt": prompts, "reference": [c for _, c in shown], "generated": generated},
            "samples/sft_generations.json",
        )
    with atomic_dir(ctx.out_dir) as staging:
        if distributed.num_processes > 1:  # rank 0 saved it already: move, do not write it again
            shutil.move(ctx.checkpoints / "learner" / "model", staging / "model")
        else:
            save_model(policy, tokenizer, staging / "model")
    mlflow.log_artifacts(str(ctx.out_dir / "model"), "model")
    shutil.rmtree(ctx.checkpoints, ignore_errors=True)
    metrics = {
        "steps": result.steps,
        "train_tokens": result.train_tokens,
        "tokens_per_s": result.tokens_per_s,
        "stopped_early": float(result.stopped_early),
    }
    if result.best_eval_loss is not None:
        metrics |= {
            "best_eval_loss": result.best_eval_loss,
            "best_eval_perplexity": math.exp(min(result.best_eval_loss, 50.0)),
        }
    mlflow.log_metrics(metrics)
    return ctx.result(
        Policy,
        model_dir=str(ctx.out_dir / "model"),
        model_uri=f"runs:/{ctx.run.info.run_id}/model",
        metrics=metrics,
    )


SFT_SHOWN = ("train_loss", "eval_loss", "eval_perplexity", "tokens_per_s")


def _sft_processes(ctx, start, splits, model, sft, seed, distributed):
    """SFT as distributed.num_processes processes (rlhf_core.distributed); the trained policy
    comes back as the folder rank 0 wrote, loaded here for the samples and the stage's output."""
    learner = ctx.checkpoints / "learner"
    out = launch(
        "sft",
        {
            "base_model": start.model_dir,
            "train": splits.train,
            "val": splits.val,
            "model": model.model_dump(mode="json"),
            "sft": sft.model_dump(mode="json"),
            "seed": seed,
            "checkpoint_dir": str(ctx.checkpoints),
            "model_out": str(learner / "model"),
        },
        learner,
        distributed,
        on_line=get_run_logger().info,
        on_log=metrics_logger("sft step", SFT_SHOWN),
    )
    loaded = load_causal_lm(str(learner / "model"), dtype=model.dtype, device=model.device)
    fmt = ChatFormat(loaded.tokenizer, use_chat_template=model.use_chat_template)
    return loaded.model, loaded.tokenizer, fmt, SFTResult(**out["result"]), out["counts"]
