"""Reward-model training on our lean loop (rlhf_core.training): chosen and rejected go through the
model in one forward pass, the loss is Bradley-Terry (hard or soft), the best validation accuracy wins."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rlhf_core.metrics import accuracy
from rlhf_core.reward.losses import bradley_terry_loss
from rlhf_core.reward.model import Encoded, RewardModel
from rlhf_core.training import LogFn, LoopResult, LoopSettings, TrainLoop


@dataclass
class RewardSettings(LoopSettings):
    epochs: float = 1.0
    lr: float = 3e-5
    warmup_ratio: float = 0.1
    schedule: str = "linear"
    eval_every: int = 50
    checkpoint_every: int = 50
    center_coef: float = 0.0  # TRL suggests 0.01 when rewards drift
    human_weight: float = 1.0  # per-source loss weights
    ai_weight: float = 1.0
    use_margin: bool = True  # the data's `margin` column on hard labels
    max_eval_pairs: int = 512  # validation pairs scored at each evaluation during training
    eval_batch_size: int = 64


@dataclass
class PairSet:
    chosen: list[Encoded]
    rejected: list[Encoded]
    p_chosen: np.ndarray  # 1.0 for a hard label
    margin: np.ndarray
    weight: np.ndarray
    label_source: np.ndarray

    def __len__(self) -> int:
        return len(self.chosen)


def labelled_pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Pairs a reward model can learn from or be judged on: unlabelled ones ('none') say nothing."""
    return df[df["label_source"] != "none"].reset_index(drop=True) if "label_source" in df else df


def encode_pairs(rm: RewardModel, df: pd.DataFrame, settings: RewardSettings | None = None) -> PairSet:
    settings = settings or RewardSettings()
    df = labelled_pairs(df)
    prompts = df["prompt"].tolist()
    source = df["label_source"].to_numpy(str) if "label_source" in df else np.full(len(df), "human")
    p = df["p_chosen"].to_numpy(float) if "p_chosen" in df else np.ones(len(df))
    p = np.where(np.isnan(p), 1.0, p)
    margin = df["margin"].to_numpy(float) if ("margin" in df and settings.use_margin) else np.zeros(len(df))
    margin = np.where(np.isnan(margin) | (p < 1.0), 0.0, margin)  # a margin is a statement about hard labels
    weight = np.where(source == "ai", settings.ai_weight, settings.human_weight).astype(float)
    return PairSet(rm.encode(prompts, df["chosen"].tolist()), rm.encode(prompts, df["rejected"].tolist()), p, margin, weight, source)


class RewardTrainer(TrainLoop):
    desc, unit, best_metric, higher_is_better = "reward", "pairs", "eval_accuracy", True

    def __init__(self, rm: RewardModel, train: PairSet, val: PairSet | None, settings: RewardSettings,
                 checkpoint_dir: Path | None = None, on_log: LogFn | None = None, progress: bool = True):
        if not len(train):
            raise ValueError("no labelled training pairs")
        lengths = [max(len(c), len(r)) for c, r in zip(train.chosen, train.rejected)]
        super().__init__(rm.model, lengths, settings, checkpoint_dir, on_log, progress)
        self.rm, self.train_set = rm, train
        self.val_set = _head(val, settings.max_eval_pairs) if val is not None and len(val) else None

    def units(self, indices: Sequence[int]) -> int:
        return len(indices)

    def _tensor(self, values: np.ndarray, indices: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(values[list(indices)], dtype=torch.float32, device=self.device)

    def micro_step(self, indices: Sequence[int], step_units: int) -> float:
        t, s = self.train_set, self.s
        with self.amp():
            rewards = self.rm.forward([t.chosen[i] for i in indices] + [t.rejected[i] for i in indices])
        r_c, r_r = rewards[: len(indices)], rewards[len(indices):]
        _, loss_sum = bradley_terry_loss(r_c, r_r, self._tensor(t.p_chosen, indices), self._tensor(t.margin, indices),
                                         self._tensor(t.weight, indices), s.center_coef)
        (loss_sum / step_units).backward()
        return loss_sum.item()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        v = self.val_set
        r_c = self.rm.score_encoded(v.chosen, self.s.eval_batch_size)
        r_r = self.rm.score_encoded(v.rejected, self.s.eval_batch_size)
        per_pair, _ = bradley_terry_loss(torch.as_tensor(r_c), torch.as_tensor(r_r), torch.as_tensor(v.p_chosen))
        p = 1.0 / (1.0 + np.exp(-(r_c - r_r)))
        return {"eval_accuracy": accuracy(p, v.p_chosen >= 0.5), "eval_loss": float(per_pair.mean()),
                "eval_reward_gap": float(np.mean(r_c - r_r))}

    def train(self, resume: bool = True) -> LoopResult:
        return super().train(resume=resume, has_eval=self.val_set is not None)


def _head(pairs: PairSet, n: int) -> PairSet:
    return PairSet(pairs.chosen[:n], pairs.rejected[:n], pairs.p_chosen[:n], pairs.margin[:n], pairs.weight[:n],
                   pairs.label_source[:n])
