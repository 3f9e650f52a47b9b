"""Reward-model training on our lean loop (rlhf_core.training): chosen and rejected go through the
model in one forward pass, the loss is Bradley-Terry (hard or soft), the best validation accuracy wins."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rlhf_core.config import DistributedConfig, ModelConfig, RewardConfig
from rlhf_core.errors import UserError
from rlhf_core.metrics import accuracy
from rlhf_core.reward.ensemble import EnsembleRewardModel, bootstrap_indices
from rlhf_core.reward.losses import bradley_terry_loss
from rlhf_core.reward.model import Encoded, RewardModel, build_reward_model
from rlhf_core.reward.probe import fit_head
from rlhf_core.training import LogFn, LoopResult, TrainLoop, ids_digest


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


def encode_pairs(
    rm: RewardModel, df: pd.DataFrame, settings: RewardConfig | None = None
) -> PairSet:
    settings = settings or RewardConfig()
    df = labelled_pairs(df)
    prompts = df["prompt"].tolist()
    source = df["label_source"].to_numpy(str) if "label_source" in df else np.full(len(df), "human")
    p = df["p_chosen"].to_numpy(float) if "p_chosen" in df else np.ones(len(df))
    p = np.where(np.isnan(p), 1.0, p)
    margin = (
        df["margin"].to_numpy(float)
        if ("margin" in df and settings.use_margin)
        else np.zeros(len(df))
    )
    margin = np.where(
        np.isnan(margin) | (p < 1.0), 0.0, margin
    )  # a margin is a statement about hard labels
    weight = np.where(source == "ai", settings.ai_weight, settings.human_weight).astype(float)
    return PairSet(
        rm.encode(prompts, df["chosen"].tolist()),
        rm.encode(prompts, df["rejected"].tolist()),
        p,
        margin,
        weight,
        source,
    )


class RewardForward(torch.nn.Module):
    """RewardModel.forward as one module, so DDP sees the whole reward computation: with mean
    pooling it calls the backbone and the head itself, never the model's own forward."""

    def __init__(self, rm: RewardModel):
        super().__init__()
        self.model = rm.model  # the same parameters, registered here for DDP
        self.score = rm.forward

    def forward(self, items: Sequence[Encoded]) -> torch.Tensor:
        return self.score(items)


class RewardTrainer(TrainLoop):
    desc, unit, best_metric, higher_is_better = "reward", "pairs", "eval_accuracy", True
    distributed_ready = True

    def __init__(
        self,
        rm: RewardModel,
        train: PairSet,
        val: PairSet | None,
        settings: RewardConfig,
        seed: int = 0,
        checkpoint_dir: Path | None = None,
        on_log: LogFn | None = None,
        progress: bool = True,
    ):
        if not len(train):
            raise ValueError("no labelled training pairs")
        lengths = [max(len(c), len(r)) for c, r in zip(train.chosen, train.rejected)]
        self.rm, self.train_set = rm, train
        super().__init__(rm.model, lengths, settings, seed, checkpoint_dir, on_log, progress)
        self.val_set = _head(val, settings.max_eval_pairs) if val is not None and len(val) else None

    def units(self, indices: Sequence[int]) -> int:
        return len(indices)

    def data_digest(self) -> str:
        t = self.train_set
        return ids_digest(
            [e.input_ids for e in t.chosen] + [e.input_ids for e in t.rejected],
            t.p_chosen,
            t.margin,
            t.weight,
        )

    def forward_module(self, model: torch.nn.Module) -> torch.nn.Module:
        return RewardForward(self.rm)

    def _tensor(self, values: np.ndarray, indices: Sequence[int]) -> torch.Tensor:
        return torch.as_tensor(values[list(indices)], dtype=torch.float32, device=self.device)

    def micro_step(self, indices: Sequence[int], step_units: int) -> float:
        t, s = self.train_set, self.s
        with self.amp():
            rewards = self.forward_model(
                [t.chosen[i] for i in indices] + [t.rejected[i] for i in indices]
            )
        r_c, r_r = rewards[: len(indices)], rewards[len(indices) :]
        _, loss_sum = bradley_terry_loss(
            r_c,
            r_r,
            self._tensor(t.p_chosen, indices),
            self._tensor(t.margin, indices),
            self._tensor(t.weight, indices),
            s.center_coef,
        )
        (loss_sum / step_units).backward()
        return loss_sum.item()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        v = self.val_set
        r_c = self.rm.score_encoded(v.chosen, self.s.eval_batch_size)
        r_r = self.rm.score_encoded(v.rejected, self.s.eval_batch_size)
        per_pair, _ = bradley_terry_loss(
            torch.as_tensor(r_c), torch.as_tensor(r_r), torch.as_tensor(v.p_chosen)
        )
        p = 1.0 / (1.0 + np.exp(-(r_c - r_r)))
        return {
            "eval_accuracy": accuracy(p, v.p_chosen >= 0.5),
            "eval_loss": float(per_pair.mean()),
            "eval_reward_gap": float(np.mean(r_c - r_r)),
        }

    def train(self, resume: bool = True) -> LoopResult:
        return super().train(resume=resume, has_eval=self.val_set is not None)


def _head(pairs: PairSet, n: int) -> PairSet:
    return PairSet(
        pairs.chosen[:n],
        pairs.rejected[:n],
        pairs.p_chosen[:n],
        pairs.margin[:n],
        pairs.weight[:n],
        pairs.label_source[:n],
    )


def reference_samples(
    prompts: list[str],
    policy_dir: str | None,
    cfg: RewardConfig,
    model: ModelConfig,
    seed: int,
    fallback_responses: list[str],
    sampled: tuple[list[str], list[str]] = ([], []),
) -> tuple[list[str], list[str], str]:
    """(prompts, responses, description) the normalisation statistics are measured on: reference-policy
    samples for training prompts: those the label stage drew (source 'generated'), else new ones;
    without a policy, the data's own responses."""
    if len(sampled[0]) >= cfg.norm_prompts:
        n = cfg.norm_prompts
        return sampled[0][:n], sampled[1][:n], f"reference policy samples ({n}, label stage)"
    if not policy_dir:
        responses = fallback_responses[: 2 * cfg.norm_prompts]
        return prompts[: len(responses)], responses, f"training responses ({len(responses)})"
    from rlhf_core.models.chat import ChatFormat
    from rlhf_core.models.loading import load_causal_lm
    from rlhf_core.sft import generate_samples

    rng = np.random.default_rng(seed)
    unique = sorted(set(prompts))
    picked = [unique[i] for i in rng.permutation(len(unique))[: cfg.norm_prompts]]
    lm = load_causal_lm(policy_dir, device=model.device, trust_remote_code=model.trust_remote_code)
    fmt = ChatFormat(lm.tokenizer, use_chat_template=model.use_chat_template)
    responses = []
    for start in range(0, len(picked), 16):
        responses += generate_samples(
            lm.model,
            fmt,
            picked[start : start + 16],
            cfg.norm_max_new_tokens,
            temperature=1.0,
            top_p=1.0,
            repetition_penalty=1.0,
            seed=seed + start,
        )
    return picked, responses, f"reference policy samples ({len(picked)} training prompts)"


def normalisation_stats(
    rm: RewardModel, prompts: list[str], responses: list[str], source: str
) -> dict:
    """Mean and std of the reward on what PPO will score."""
    rewards = rm.score(prompts, responses)
    return {
        "mean": float(np.mean(rewards)),
        "std": float(np.std(rewards) or 1.0),
        "n": len(rewards),
        "source": source,
    }


def train_reward(
    train_df: pd.DataFrame,
    val_df: pd.DataFrame | None,
    cfg: RewardConfig,
    model: ModelConfig,
    backbone: str,
    *,
    checkpoint_dir: Path | None = None,
    policy_dir: str | None = None,
    seed: int = 0,
    on_log: LogFn | None = None,
    progress: bool = True,
    distributed: DistributedConfig | None = None,
    on_line: Callable[[str], None] = print,
) -> tuple[RewardModel | EnsembleRewardModel, list[LoopResult]]:
    """Build, train (resuming from checkpoint_dir) and measure the normalisation statistics of the
    reward model, or of each member of an ensemble (reward.ensemble); the caller saves. With
    distributed.num_processes > 1 the training runs on that many processes (their output goes
    to on_line), and the statistics are measured here."""
    if distributed is not None and distributed.num_processes > 1:
        members, results = _train_members_on_processes(
            train_df,
            val_df,
            cfg,
            model,
            backbone,
            checkpoint_dir,
            seed,
            distributed,
            on_log,
            on_line,
        )
    else:
        members, results = train_members(
            train_df,
            val_df,
            cfg,
            model,
            backbone,
            checkpoint_dir=checkpoint_dir,
            seed=seed,
            on_log=on_log,
            progress=progress,
        )
    return with_normalisation(members, train_df, cfg, model, policy_dir, seed), results


def _train_members_on_processes(
    train_df, val_df, cfg, model, backbone, checkpoint_dir, seed, distributed, on_log, on_line
) -> tuple[list[RewardModel], list[LoopResult]]:
    """train_members on distributed.num_processes processes (rlhf_core.distributed.worker)."""
    from rlhf_core.distributed.launch import launch
    from rlhf_core.reward.model import load_reward_model

    if checkpoint_dir is None:
        raise ValueError("training on several processes needs a checkpoint_dir to work in")
    work = Path(checkpoint_dir) / "learner"
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, frame in (("train", train_df), ("val", val_df)):
        if frame is not None:
            files[name] = str(work / f"{name}.parquet")
            frame.to_parquet(files[name])
    out = launch(
        "reward",
        {
            "train": files["train"],
            "val": files.get("val"),
            "reward": cfg.model_dump(mode="json"),
            "model": model.model_dump(mode="json"),
            "backbone": backbone,
            "seed": seed,
            "checkpoint_dir": str(checkpoint_dir),
            "model_out": str(work / "model"),
        },
        work,
        distributed,
        on_line=on_line,
        on_log=on_log or (lambda step, metrics: None),
    )
    members = [
        load_reward_model(
            str(work / "model" / f"member-{i}"),
            device=cfg.device,
            dtype=cfg.dtype,
            trust_remote_code=model.trust_remote_code,
        )
        for i in range(len(out["results"]))
    ]
    return members, [LoopResult(**r) for r in out["results"]]


def train_members(
    train_df: pd.DataFrame,
    val_df: pd.DataFrame | None,
    cfg: RewardConfig,
    model: ModelConfig,
    backbone: str,
    *,
    checkpoint_dir: Path | None = None,
    seed: int = 0,
    on_log: LogFn | None = None,
    progress: bool = True,
) -> tuple[list[RewardModel], list[LoopResult]]:
    """The trained reward model, or each member of an ensemble, without normalisation statistics:
    the part of training that runs on distributed.num_processes processes."""
    train_df = labelled_pairs(train_df)
    val_df = labelled_pairs(val_df) if val_df is not None else None
    if train_df.empty:
        raise UserError(
            "no labelled training pairs for the reward model (enable labels, or give labelled data)"
        )
    k = cfg.ensemble.members
    members, results = [], []
    for i in range(k):
        rows = (
            train_df.iloc[bootstrap_indices(len(train_df), i, seed)].reset_index(drop=True)
            if k > 1 and cfg.ensemble.bootstrap
            else train_df
        )
        member_seed = seed + 1000 * i  # member 0 of an ensemble is the single model
        rm = build_reward_model(backbone, cfg, model, seed=member_seed)
        val = encode_pairs(rm, val_df, cfg) if val_df is not None and len(val_df) else None
        member_log = on_log if k == 1 or on_log is None else _prefixed(on_log, f"member{i}_")
        pairs = encode_pairs(rm, rows, cfg)
        if cfg.freeze_backbone:
            result = fit_head(rm, pairs, val, cfg, member_log)
        else:
            trainer = RewardTrainer(
                rm,
                pairs,
                val,
                cfg,
                seed=member_seed,
                checkpoint_dir=(
                    checkpoint_dir / f"member-{i}" if checkpoint_dir and k > 1 else checkpoint_dir
                ),
                on_log=member_log,
                progress=progress,
            )
            result = trainer.train()
        if hasattr(rm.model, "merge_and_unload"):  # LoRA: one plain model from here on
            rm.model = rm.model.merge_and_unload()
        rm.info.update(
            {
                "trained_steps": result.steps,
                "best_val_accuracy": result.best_metric,
                "train_pairs": len(rows),
            }
        )
        members.append(rm)
        results.append(result)
    return members, results


def with_normalisation(
    members: list[RewardModel],
    train_df: pd.DataFrame,
    cfg: RewardConfig,
    model: ModelConfig,
    policy_dir: str | None,
    seed: int,
) -> RewardModel | EnsembleRewardModel:
    """The trained members with the normalisation statistics PPO needs (reference_samples says on
    what they are measured), as one model or an ensemble."""
    train_df = labelled_pairs(train_df)
    generated = (
        train_df[train_df["source"] == "generated"] if "source" in train_df else train_df.head(0)
    )
    prompts, responses, source = reference_samples(
        train_df["prompt"].tolist() * 2,  # beside chosen + rejected below
        policy_dir,
        cfg,
        model,
        seed,
        train_df["chosen"].tolist() + train_df["rejected"].tolist(),
        (  # winners and losers alternate, so any prefix is both
            [p for p in generated["prompt"] for _ in (0, 1)],
            [t for pair in zip(generated["chosen"], generated["rejected"]) for t in pair],
        ),
    )
    for rm in members:
        rm.normalisation = normalisation_stats(rm, prompts, responses, source)
    return members[0] if len(members) == 1 else EnsembleRewardModel(members)


def _prefixed(on_log: LogFn, prefix: str) -> LogFn:
    return lambda step, metrics: on_log(step, {prefix + k: v for k, v in metrics.items()})


def distributed_job(job: dict, dist) -> dict | None:
    """The reward model's training (each member of an ensemble in turn) as one of the processes of a
    distributed learner; rank 0 writes member-i folders, and the stage measures the normalisation
    statistics in its own process."""
    from rlhf_core import distributed

    members, results = train_members(
        pd.read_parquet(job["train"]),
        pd.read_parquet(job["val"]) if job["val"] else None,
        RewardConfig.model_validate(job["reward"]),
        ModelConfig.model_validate(job["model"]),
        job["backbone"],
        checkpoint_dir=Path(job["checkpoint_dir"]),
        seed=job["seed"],
        on_log=distributed.report_metrics if dist.is_main else None,
        progress=False,
    )
    if not dist.is_main:
        return None
    for i, rm in enumerate(members):
        rm.save(Path(job["model_out"]) / f"member-{i}")
    return {"results": [asdict(r) for r in results], "world_size": dist.world}
