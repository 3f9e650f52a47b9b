"""Reward-model ensembles against over-optimisation (Coste et al. 2023).

k members are trained alike, each on its own bootstrap resample of the training pairs with its
own seed (head initialisation, data order). Each member's score is normalised with its own
statistics (measured on reference-policy samples), then the scores of one response combine as

    mean:            r = mean_i r_i
    min:             r = min_i r_i                              (worst-case optimisation)
    mean_minus_std:  r = mean_i r_i - lambda * std_i r_i        (uncertainty-weighted optimisation)

with std the population standard deviation over members. Their disagreement std_i r_i grows where
the policy leaves the data the members agree on, so its batch mean is logged as an
over-optimisation signal.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from rlhf_core.reward.model import RewardModel

ENSEMBLE_FILE = "ensemble.json"
Aggregate = Literal["mean", "min", "mean_minus_std"]


def aggregate(member_scores, how: Aggregate = "mean", coef: float = 1.0):
    """(k, n) normalised member scores -> (n,) ensemble scores (numpy or torch, as given)."""
    s = member_scores
    if how == "mean":
        return s.mean(0)
    if how == "min":
        return s.min(0) if isinstance(s, np.ndarray) else s.min(0).values
    if how == "mean_minus_std":
        std = s.std(0) if isinstance(s, np.ndarray) else s.std(0, unbiased=False)
        return s.mean(0) - coef * std
    raise ValueError(f"unknown ensemble aggregate {how!r}")


def bootstrap_indices(n: int, member: int, seed: int) -> np.ndarray:
    """Member i's resample: n draws with replacement; member 0 of a one-member ensemble is the data."""
    return np.random.default_rng([seed, member, 7919]).integers(0, n, n)


@dataclass
class EnsembleRewardModel:
    """Members with the interface PPO and the evaluation use: score() returns the aggregate of the
    members' normalised scores, so normalise() is the identity here."""

    members: list[RewardModel]
    how: Aggregate = "mean"
    coef: float = 1.0

    def __post_init__(self) -> None:
        first = self.members[0]
        self.kind, self.tokenizer, self.max_length = first.kind, first.tokenizer, first.max_length
        self.model = torch.nn.ModuleList([m.model for m in self.members])
        self.normalisation = None
        self.info = {"ensemble": len(self.members), "aggregate": self.how, "coef": self.coef}

    @property
    def device(self) -> torch.device:
        return self.members[0].device

    def reads_tokens_of(self, tokenizer) -> bool:
        return all(m.reads_tokens_of(tokenizer) for m in self.members)

    def encode_ids(self, p_ids: list[int], r_ids: list[int]):
        return self.members[0].encode_ids(p_ids, r_ids)

    def member_scores(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 64):
        """(k, n) normalised scores, one row per member."""
        return np.stack(
            [m.normalise(m.score(prompts, responses, batch_size)) for m in self.members]
        )

    def member_scores_encoded(self, items, batch_size: int = 64) -> np.ndarray:
        return np.stack([m.normalise(m.score_encoded(items, batch_size)) for m in self.members])

    def score(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 64):
        return aggregate(self.member_scores(prompts, responses, batch_size), self.how, self.coef)

    def score_encoded(self, items, batch_size: int = 64) -> np.ndarray:
        return aggregate(self.member_scores_encoded(items, batch_size), self.how, self.coef)

    def normalise(self, rewards):
        return rewards

    def with_aggregate(self, how: Aggregate, coef: float) -> EnsembleRewardModel:
        return EnsembleRewardModel(self.members, how, coef)

    def save(self, out_dir: Path) -> Path:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        names = [f"member-{i}" for i in range(len(self.members))]
        for name, member in zip(names, self.members):
            member.save(out_dir / name)
        (out_dir / ENSEMBLE_FILE).write_text(
            json.dumps({"members": names, "aggregate": self.how, "coef": self.coef}, indent=2)
        )
        return out_dir


def is_ensemble(path: str | Path) -> bool:
    return (Path(path) / ENSEMBLE_FILE).is_file()


def member_dirs(path: str | Path) -> list[Path]:
    spec = json.loads((Path(path) / ENSEMBLE_FILE).read_text())
    return [Path(path) / name for name in spec["members"]]


def ensemble_spec(path: str | Path) -> dict:
    return json.loads((Path(path) / ENSEMBLE_FILE).read_text())
