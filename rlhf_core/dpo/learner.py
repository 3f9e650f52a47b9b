"""DPO on the shared training loop (rlhf_core.training): length-bucketed batches of preference
pairs, the reference policy's log-probabilities computed once before training (so no second model
is held while training, and with LoRA the reference is simply the adapter switched off), exact
resume, and implicit-reward accuracy, margins and log-probabilities logged as it trains.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rlhf_core import distributed
from rlhf_core.config import DPOConfig
from rlhf_core.dpo.core import dpo_loss, sequence_logps
from rlhf_core.models.chat import ChatFormat
from rlhf_core.models.fused import fuse_activations
from rlhf_core.sft import EncodeStats
from rlhf_core.training import (
    LogFn,
    LoopResult,
    TrainLoop,
    autocast_for,
    ids_digest,
)


@dataclass
class PairExample:
    prompt: list[int]
    chosen: list[int]  # response ids (+ EOS)
    rejected: list[int]
    p_chosen: float  # P(chosen > rejected); 1.0 for a hard label

    def __len__(self) -> int:
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def encode_pairs(
    df: pd.DataFrame, fmt: ChatFormat, max_length: int
) -> tuple[list[PairExample], EncodeStats]:
    """Labelled pairs (unlabelled ones say nothing) as token ids. An over-long pair keeps the end of
    its prompt (at most max_length - max_length // 2 tokens of it go) and the start of both
    responses."""
    if "label_source" in df:
        df = df[df["label_source"] != "none"]
    p = df["p_chosen"].to_numpy(float) if "p_chosen" in df else np.ones(len(df))
    p = np.where(np.isnan(p), 1.0, p)
    out, stats = [], EncodeStats()
    for prompt, chosen, rejected, p_c in zip(df["prompt"], df["chosen"], df["rejected"], p):
        p_ids, c_ids = fmt.encode(prompt, chosen)
        r_ids = fmt.encode(prompt, rejected)[1]
        longest = max(len(c_ids), len(r_ids))
        if len(p_ids) + longest > max_length:
            stats.truncated += 1
            keep_prompt = min(len(p_ids), max(max_length // 2, max_length - longest))
            p_ids = p_ids[len(p_ids) - keep_prompt :]
            c_ids, r_ids = c_ids[: max_length - keep_prompt], r_ids[: max_length - keep_prompt]
        out.append(PairExample(p_ids, c_ids, r_ids, float(p_c)))
    stats.examples = len(out)
    return out, stats


def collate_pairs(batch: Sequence[PairExample], pad_id: int) -> dict[str, torch.Tensor]:
    """One right-padded batch of 2B rows, the chosen responses first, then the rejected ones;
    response_mask is 1 on response tokens."""
    rows = [(e.prompt, e.chosen) for e in batch] + [(e.prompt, e.rejected) for e in batch]
    width = max(len(p) + len(r) for p, r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    response = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        ids[i, :n] = torch.tensor(p + r)
        mask[i, :n] = 1
        response[i, len(p) : n] = 1
    return {"input_ids": ids, "attention_mask": mask, "response_mask": response}


def pair_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 2) summed response log-probs [chosen, rejected] and (B, 2) response lengths."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    logps, n = sequence_logps(logits, batch["input_ids"], batch["response_mask"])
    return torch.stack(logps.chunk(2), dim=1), torch.stack(n.chunk(2), dim=1)


def _reference_mode(model):
    """The reference policy: the adapter switched off for a LoRA policy, the model as it is else."""
    return (
        model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    )


@torch.no_grad()
def reference_logps(
    model, examples: Sequence[PairExample], pad_id: int, batch_size: int, autocast: Callable
) -> torch.Tensor:
    """(N, 2) log pi_ref(chosen | prompt), log pi_ref(rejected | prompt) of every pair, computed by
    the reference policy (in the precision training runs in, so that the log-ratios start at 0)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = torch.zeros((len(examples), 2), dtype=torch.float32)
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    try:
        with _reference_mode(model):
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                batch = collate_pairs([examples[i] for i in idx], pad_id)
                with autocast():
                    logps, _ = pair_logps(model, {k: v.to(device) for k, v in batch.items()})
                out[idx] = logps.float().cpu()
    finally:
        model.train(was_training)
    return out


class DPOTrainer(TrainLoop):
    desc, unit, best_metric, higher_is_better = "dpo", "pairs", "eval_loss", False
    distributed_ready = True

    def __init__(
        self,
        model,
        tokenizer,
        train: list[PairExample],
        val: list[PairExample],
        ref_train: torch.Tensor,
        ref_val: torch.Tensor,
        settings: DPOConfig,
        seed: int = 0,
        checkpoint_dir: Path | None = None,
        on_log: LogFn | None = None,
        progress: bool = True,
    ):
        if not train:
            raise ValueError("no labelled training pairs")
        super().__init__(
            model, [len(e) for e in train], settings, seed, checkpoint_dir, on_log, progress
        )
        n_val = min(len(val), settings.max_eval_pairs)
        self.train_set, self.val_set = train, val[:n_val]
        self.ref_train, self.ref_val = ref_train, ref_val[:n_val]
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )
        self._window: dict[str, float] = {}

    def units(self, indices: Sequence[int]) -> int:
        return len(indices)

    def data_digest(self) -> str:
        t = self.train_set
        return ids_digest(
            [e.prompt + [-1] + e.chosen + [-2] + e.rejected for e in t],
            [e.p_chosen for e in t],
            self.ref_train.flatten().tolist(),
        )

    def _loss(self, examples: Sequence[PairExample], ref: torch.Tensor, model=None):
        batch = {k: v.to(self.device) for k, v in collate_pairs(examples, self.pad_id).items()}
        with self.amp():
            logps, n = pair_logps(model or self.model, batch)
        ref = ref.to(self.device)
        p = torch.tensor([e.p_chosen for e in examples], device=self.device)
        out = dpo_loss(
            logps[:, 0],
            logps[:, 1],
            ref[:, 0],
            ref[:, 1],
            self.s.beta,
            self.s.loss,
            p,
            n[:, 0],
            n[:, 1],
        )
        return out, logps.detach()

    def micro_step(self, indices: Sequence[int], step_units: int) -> float:
        out, logps = self._loss(
            [self.train_set[i] for i in indices], self.ref_train[list(indices)], self.forward_model
        )
        loss_sum = out.losses.sum()
        (loss_sum / step_units).backward()
        w = self._window
        for key, values in (
            ("rewards_accuracy", out.accuracies),
            ("rewards_margin", out.margins),
            ("rewards_chosen", out.chosen_rewards),
            ("rewards_rejected", out.rejected_rewards),
            ("logps_chosen", logps[:, 0]),
            ("logps_rejected", logps[:, 1]),
        ):
            w[key] = w.get(key, 0.0) + float(values.sum())
        w["pairs"] = w.get("pairs", 0.0) + len(indices)
        return loss_sum.item()

    def window_metrics(self) -> dict[str, float]:
        w, self._window = self._window, {}
        if self.dist.world > 1:  # every process's pairs
            parts = self.dist.gather(w)
            w = {k: sum(p.get(k, 0.0) for p in parts) for k in sorted(set().union(*parts))}
        n = w.pop("pairs", 0.0)
        return {k: v / n for k, v in w.items()} if n else {}

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.val_set:
            return {}
        totals: dict[str, float] = {}
        order = sorted(range(len(self.val_set)), key=lambda i: len(self.val_set[i]))
        for start in range(0, len(order), self.s.batch_size):
            idx = order[start : start + self.s.batch_size]
            out, logps = self._loss([self.val_set[i] for i in idx], self.ref_val[idx])
            for key, values in (
                ("eval_loss", out.losses),
                ("eval_rewards_accuracy", out.accuracies),
                ("eval_rewards_margin", out.margins),
                ("eval_logps_chosen", logps[:, 0]),
                ("eval_logps_rejected", logps[:, 1]),
            ):
                totals[key] = totals.get(key, 0.0) + float(values.float().sum())
        n = len(self.val_set)
        return {k: v / n for k, v in totals.items()}

    def train(self, resume: bool = True) -> LoopResult:
        return super().train(resume=resume, has_eval=bool(self.val_set))


def build_dpo_trainer(
    policy_dir: str,
    train_file: str,
    val_file: str,
    model_cfg,
    cfg: DPOConfig,
    seed: int = 0,
    *,
    checkpoint_dir: Path | None = None,
    on_log: LogFn | None = None,
    progress: bool = True,
    reference_cache: Path | None = None,
) -> tuple[DPOTrainer, EncodeStats]:
    """The policy (the reference policy's weights, with LoRA when configured) and its DPO trainer on
    the labelled pairs; the reference log-probabilities come from `reference_cache` when it holds
    them for these exact pairs and weights, else they are computed and stored there."""
    from safetensors.torch import load_file, save_file

    from rlhf_core.config import stable_hash
    from rlhf_core.models.loading import add_lora, load_causal_lm
    from rlhf_core.training import weights_signature

    loaded = load_causal_lm(
        policy_dir,
        dtype=model_cfg.dtype,
        device=model_cfg.device,
        trust_remote_code=model_cfg.trust_remote_code,
        eval_mode=False,
    )
    reference_weights = weights_signature(loaded.model)  # before LoRA adds its own weights
    policy = add_lora(loaded.model, cfg.lora) if cfg.lora.enabled else loaded.model
    # the kernels training will run (TrainLoop fuses them too): the log-ratios start at 0
    fuse_activations(policy)
    fmt = ChatFormat(loaded.tokenizer, use_chat_template=model_cfg.use_chat_template)
    pairs = pd.read_parquet(train_file)
    if "label_source" in pairs:
        pairs = pairs[pairs["label_source"].isin(cfg.label_sources)]
    train, stats = encode_pairs(pairs, fmt, cfg.max_length)
    val, _ = encode_pairs(pd.read_parquet(val_file), fmt, cfg.max_length)
    val = val[: cfg.max_eval_pairs]
    pad = loaded.tokenizer.pad_token_id
    pad = pad if pad is not None else loaded.tokenizer.eos_token_id
    device = next(policy.parameters()).device

    def amp():
        return autocast_for(cfg.mixed_precision, device)

    reference_files: list[Path] = []

    dist = distributed.current()

    def refs(examples: list[PairExample]) -> torch.Tensor:
        key = stable_hash(
            [
                reference_weights,
                ids_digest([e.prompt + [-1] + e.chosen + [-2] + e.rejected for e in examples]),
                cfg.mixed_precision,
                str(device),
            ]
        )
        file = reference_cache / f"{key}.safetensors" if reference_cache else None
        if file is not None:
            reference_files.append(file)
        if dist.broadcast(file is not None and file.exists()):  # one answer for every process
            return load_file(file)["logps"]
        logps = distributed.sharded_rows(  # N processes: each computes its share of the pairs
            dist, examples, lambda part: reference_logps(policy, part, pad, cfg.batch_size, amp)
        )
        if file is not None and dist.is_main:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(".partial")
            save_file({"logps": logps.contiguous()}, tmp)
            tmp.replace(file)
        return logps

    trainer = DPOTrainer(
        policy,
        loaded.tokenizer,
        train,
        val,
        refs(train),
        refs(val),
        cfg,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        on_log=on_log,
        progress=progress,
    )
    trainer.fmt, trainer.tokenizer = fmt, loaded.tokenizer
    trainer.reference_files = reference_files  # [train, val] in the cache, when there is one
    return trainer, stats


def distributed_job(job: dict, dist) -> dict | None:
    """DPO as one of the processes of a distributed learner; rank 0 writes the tuned policy."""
    from rlhf_core.config import ModelConfig

    trainer, stats = build_dpo_trainer(
        job["policy_dir"],
        job["train"],
        job["val"],
        ModelConfig.model_validate(job["model"]),
        DPOConfig.model_validate(job["dpo"]),
        job["seed"],
        checkpoint_dir=Path(job["checkpoint_dir"]),
        reference_cache=Path(job["reference_cache"]),
        **distributed.worker_hooks(dist),
    )
    result = trainer.train()
    return distributed.saved_result(
        dist,
        trainer.model,
        trainer.tokenizer,
        job["model_out"],
        result,
        train_pairs=len(trainer.train_set),
        val_pairs=len(trainer.val_set),
        truncated_pairs=stats.truncated,
        reference_files=[str(f) for f in trainer.reference_files],
    )
