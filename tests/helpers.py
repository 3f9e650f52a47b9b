"""Small real models for tests, built and saved by the code itself (nothing is downloaded)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from rlhf_core.data.demo import generate_demo_pairs


@lru_cache(maxsize=1)
def demo_rows(n: int = 600) -> tuple[dict, ...]:
    return tuple(generate_demo_pairs(n, seed=0))


def demo_texts(n: int = 600) -> list[str]:
    rows = demo_rows(n)
    return [r["prompt"] for r in rows] + [r["chosen"] for r in rows] + [r["rejected"] for r in rows]


def tiny_model_dir(root: Path, arch: str = "gpt2") -> Path:
    """A ~1.8M-parameter model + tokenizer trained on the demo text, saved as an HF folder."""
    from rlhf_core.models.scratch import build_scratch_model

    out = root / f"tiny-{arch}"
    if not (out / "config.json").exists():
        build_scratch_model(demo_texts(), out, preset="tiny", arch=arch, seed=0)
    return out


def sft_job(
    model_dir: str, checkpoint_dir: str, out_file: str, max_steps: int = 40, seed: int = 0
) -> None:
    """A complete SFT run used by the resume test (run in a subprocess that may be killed)."""
    from safetensors.torch import save_file

    from rlhf_core.config import SFTConfig
    from rlhf_core.models.chat import ChatFormat
    from rlhf_core.models.loading import load_causal_lm
    from rlhf_core.sft import SFTTrainer, encode_examples

    lm = load_causal_lm(model_dir, device="cpu", eval_mode=False)
    fmt = ChatFormat(lm.tokenizer)
    rows = demo_rows()
    train, _ = encode_examples([(r["prompt"], r["chosen"]) for r in rows[:400]], fmt, 128)
    val, _ = encode_examples([(r["prompt"], r["chosen"]) for r in rows[400:460]], fmt, 128)
    settings = SFTConfig(
        max_steps=max_steps,
        batch_size=8,
        lr=2e-3,
        eval_every=10,
        checkpoint_every=5,
        log_every=5,
        early_stopping_patience=None,
    )
    SFTTrainer(
        lm.model,
        lm.tokenizer,
        train,
        val,
        settings,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        progress=False,
    ).train()
    save_file({k: v.contiguous().clone() for k, v in lm.model.state_dict().items()}, out_file)


def demo_frame(start: int, stop: int):
    """Demo pairs as the normalised table the pipeline writes (human labels)."""
    import pandas as pd

    rows = demo_rows()[start:stop]
    return pd.DataFrame(
        {
            "prompt": [r["prompt"] for r in rows],
            "chosen": [r["chosen"] for r in rows],
            "rejected": [r["rejected"] for r in rows],
            "label_source": "human",
            "p_chosen": 1.0,
            "margin": float("nan"),
        }
    )


# the reward model fine-tuned (the demo's choice; the defaults fit a head on frozen SmolLM2)
FINE_TUNED = {"backbone": "minilm", "pooling": "model", "freeze_backbone": False}


def reward_settings(**overrides):
    """RewardConfig for a reward model the tests build directly: fine-tuned, last-token pooling,
    fp32 on the CPU, unless overridden."""
    from rlhf_core.config import RewardConfig

    return RewardConfig(**{**FINE_TUNED, "mixed_precision": "no", "device": "cpu", **overrides})


def reward_job(
    model_dir: str, checkpoint_dir: str, out_file: str, max_steps: int = 30, seed: int = 0
) -> None:
    """A complete reward-model run used by the resume test (run in a subprocess that may be killed)."""
    from safetensors.torch import save_file

    from rlhf_core.config import RewardConfig
    from rlhf_core.reward.model import build_reward_model
    from rlhf_core.reward.trainer import RewardTrainer, encode_pairs

    rm = build_reward_model(model_dir, reward_settings(max_length=96), seed=seed)
    settings = RewardConfig(
        **FINE_TUNED,
        max_steps=max_steps,
        batch_size=8,
        lr=1e-3,
        eval_every=10,
        checkpoint_every=5,
        log_every=5,
        early_stopping_patience=None,
    )
    RewardTrainer(
        rm,
        encode_pairs(rm, demo_frame(0, 300)),
        encode_pairs(rm, demo_frame(500, 540)),
        settings,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        progress=False,
    ).train()
    save_file({k: v.contiguous().clone() for k, v in rm.model.state_dict().items()}, out_file)


def untrained_reward_dir(root: Path, backbone: str) -> Path:
    """A reward model with a fresh head, saved: enough for engine mechanics (not for learning)."""
    from rlhf_core.reward.model import build_reward_model

    out = root / "reward-untrained"
    if not (out / "config.json").exists():
        rm = build_reward_model(backbone, reward_settings(max_length=128), seed=0)
        rm.normalisation = {"mean": 0.0, "std": 1.0, "n": 0, "source": "test"}
        rm.save(out)
    return out


def ppo_job(
    policy_dir: str,
    reward_dir: str,
    checkpoint_dir: str,
    out_file: str,
    iterations: int = 6,
    seed: int = 0,
    method: str = "ppo",
) -> None:
    """A complete PPO (GRPO, online DPO) run used by the resume tests (run in a subprocess that may be killed)."""
    from safetensors.torch import save_file

    from rlhf_core.config import (
        EvaluateConfig,
        GRPOConfig,
        JudgeConfig,
        ModelConfig,
        OnlineDPOConfig,
        PPOConfig,
    )
    from rlhf_core.ppo.build import build_ppo_trainer

    shared = dict(
        iterations=iterations,
        batch_size=8,
        mini_batch_size=4,
        micro_batch_size=2,
        ppo_epochs=2,
        max_new_tokens=12,
        lr=1e-4,
        device="cpu",
        checkpoint_every=2,
        eval_every=1,  # a best judged state exists at every checkpoint: resume must restore it
        eval_prompts=4,
    )
    if method == "grpo":
        cfg = GRPOConfig(**shared)
    elif method == "online_dpo":
        cfg = OnlineDPOConfig(**shared)
    else:
        cfg = PPOConfig(**shared, adaptive_kl=True, target_kl=0.5)
    trainer = build_ppo_trainer(
        policy_dir,
        reward_dir,
        [r["prompt"] for r in demo_rows()[:40]],
        cfg,
        ModelConfig(),
        seed,
        checkpoint_dir=Path(checkpoint_dir),
        judge=JudgeConfig(),
        evaluate=EvaluateConfig(max_new_tokens=12),
        val_prompts=[r["prompt"] for r in demo_rows()[40:44]],
        progress=False,
    )
    trainer.train()
    weights = {f"policy.{k}": v for k, v in trainer.policy.state_dict().items()}
    if trainer.value is not None:
        weights |= {f"value.{k}": v for k, v in trainer.value.state_dict().items()}
    save_file({k: v.contiguous().clone() for k, v in weights.items()}, out_file)


def grpo_job(policy_dir: str, reward_dir: str, checkpoint_dir: str, out_file: str) -> None:
    """ppo_job with GRPO: groups of 4 answers, the KL a loss term, no value model."""
    ppo_job(policy_dir, reward_dir, checkpoint_dir, out_file, method="grpo")


def online_dpo_job(policy_dir: str, reward_dir: str, checkpoint_dir: str, out_file: str) -> None:
    """ppo_job with online DPO: pairs of answers, judged as it trains."""
    ppo_job(policy_dir, reward_dir, checkpoint_dir, out_file, method="online_dpo")


def dpo_job(
    model_dir: str, train_file: str, val_file: str, checkpoint_dir: str, out_file: str
) -> None:
    """A complete DPO run used by the resume test (run in a subprocess that may be killed)."""
    from safetensors.torch import save_file

    from rlhf_core.config import DPOConfig, ModelConfig
    from rlhf_core.dpo.learner import build_dpo_trainer
    from rlhf_core.training import cpu_copy, untie

    settings = DPOConfig(
        max_steps=24,
        batch_size=4,
        lr=5e-4,
        eval_every=6,
        checkpoint_every=3,
        log_every=3,
        max_length=96,
        early_stopping_patience=None,
    )
    trainer, _ = build_dpo_trainer(
        model_dir,
        train_file,
        val_file,
        ModelConfig(),
        settings,
        checkpoint_dir=Path(checkpoint_dir),
        progress=False,
    )
    trainer.train()
    save_file(untie(cpu_copy(trainer.model)), out_file)


def assert_kill_and_resume_is_exact(job: str, args: list, tmp_path: Path, marker: str) -> None:
    """Run `tests.helpers.<job>(*args, checkpoint_dir, out_file)` straight through; run it again, SIGKILL it
    once the checkpoint `marker` exists, start it once more; both must end with identical weights."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import pytest
    import torch
    from safetensors.torch import load_file

    root = Path(__file__).resolve().parent.parent

    def start(tag: str):
        call = ", ".join(
            repr(str(a)) for a in [*args, tmp_path / f"ckpt-{tag}", tmp_path / f"{tag}.safetensors"]
        )
        return subprocess.Popen(
            [sys.executable, "-c", f"from tests.helpers import {job}; {job}({call})"],
            cwd=root,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    straight = start("a")
    assert straight.wait(timeout=600) == 0, straight.stderr.read().decode()[-2000:]
    victim = start("b")
    deadline = time.monotonic() + 600
    while not (tmp_path / "ckpt-b" / marker).exists() and time.monotonic() < deadline:
        if victim.poll() is not None:
            pytest.fail(
                "the run ended before it could be killed: " + victim.stderr.read().decode()[-2000:]
            )
        time.sleep(0.02)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "b.safetensors").exists()
    resumed = start("b")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read().decode()[-2000:]
    a, b = load_file(tmp_path / "a.safetensors"), load_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    if not differ:
        return
    # Is this a resume bug, or does the job not even repeat itself bit for bit on this machine's
    # kernels? A second straight run tells.
    again = start("c")
    assert again.wait(timeout=600) == 0, again.stderr.read().decode()[-2000:]
    c = load_file(tmp_path / "c.safetensors")
    gap = max(float((a[k] - b[k]).abs().max()) for k in differ)
    noise = [k for k in a if not torch.equal(a[k], c[k])]
    if noise:
        pytest.skip(
            f"{job} is not bit-reproducible on this machine ({len(noise)} tensors differ between two "
            f"straight runs), so an exact resume cannot be checked here (resumed vs straight: max |diff| {gap:.2e})"
        )
    pytest.fail(
        f"resumed {job} differs from the straight run in {len(differ)} tensors (first {differ[0]}, "
        f"max |diff| {gap:.2e}) while two straight runs agree bit for bit"
    )
