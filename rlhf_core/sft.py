"""Supervised fine-tuning of a causal LM on prompt -> response, loss on response tokens only.

Runs on our own lean loop (rlhf_core.training), not transformers.Trainer, so that resume is exact.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from rlhf_core.config import ModelConfig, SFTConfig
from rlhf_core.models.chat import ChatFormat
from rlhf_core.training import LogFn, TrainLoop, ids_digest

IGNORE = -100


@dataclass
class Example:
    input_ids: list[int]
    n_prompt: int  # the first n_prompt tokens carry no loss

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class EncodeStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0  # nothing of the response fits in max_length


def encode_examples(
    pairs: Sequence[tuple[str, str]], fmt: ChatFormat, max_length: int
) -> tuple[list[Example], EncodeStats]:
    """Prompt ids + response ids (+ EOS). Over-long examples keep the end of the prompt and the
    start of the response; an example with no response token left is dropped and counted."""
    out, stats = [], EncodeStats()
    for prompt, response in pairs:
        p_ids, r_ids = fmt.encode(prompt, response)
        if len(p_ids) + len(r_ids) > max_length:
            stats.truncated += 1
            keep_prompt = min(len(p_ids), max(max_length // 2, max_length - len(r_ids)))
            p_ids = p_ids[len(p_ids) - keep_prompt :]
            r_ids = r_ids[: max_length - len(p_ids)]
            if not r_ids:
                stats.dropped += 1
                continue
        out.append(Example(p_ids + r_ids, len(p_ids)))
    stats.examples = len(out)
    return out, stats


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels that are IGNORE on prompt and padding."""
    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, e.n_prompt : n] = ids[i, e.n_prompt : n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over the labelled positions, and how many there were."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    logits = logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)).float(),
        targets.reshape(-1),
        ignore_index=IGNORE,
        reduction="sum",
    )
    return loss, int((targets != IGNORE).sum())


@dataclass
class SFTResult:
    steps: int
    epochs_done: float
    best_eval_loss: float | None
    final_eval_loss: float | None
    stopped_early: bool
    resumed_from_step: int | None
    train_tokens: int
    tokens_per_s: float
    history: list[dict] = field(default_factory=list)
    resume_note: str | None = None
    world_size: int = 1


class SFTTrainer(TrainLoop):
    desc, unit, best_metric, higher_is_better = "sft", "tokens", "eval_loss", False
    distributed_ready = True

    def __init__(
        self,
        model,
        tokenizer,
        train: list[Example],
        val: list[Example],
        settings: SFTConfig,
        seed: int = 0,
        checkpoint_dir: Path | None = None,
        on_log: LogFn | None = None,
        progress: bool = True,
    ):
        if not train:
            raise ValueError("no training examples")
        super().__init__(
            model, [len(e) for e in train], settings, seed, checkpoint_dir, on_log, progress
        )
        self.tokenizer, self.train_set, self.val_set = (
            tokenizer,
            train,
            val[: settings.max_eval_examples],
        )
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        )

    def units(self, indices: Sequence[int]) -> int:
        return sum(len(self.train_set[i]) - max(1, self.train_set[i].n_prompt) for i in indices)

    def data_digest(self) -> str:
        return ids_digest(
            [e.input_ids for e in self.train_set], [e.n_prompt for e in self.train_set]
        )

    def micro_step(self, indices: Sequence[int], step_units: int) -> float:
        batch = collate([self.train_set[i] for i in indices], self.pad_id)
        with self.amp():
            loss_sum, _ = token_nll(
                self.forward_model, {k: v.to(self.device) for k, v in batch.items()}
            )
        (loss_sum / step_units).backward()
        return loss_sum.item()

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.val_set:
            return {}
        total, count = 0.0, 0
        order = sorted(range(len(self.val_set)), key=lambda i: len(self.val_set[i]))
        for start in range(0, len(order), self.s.batch_size):
            batch = collate(
                [self.val_set[i] for i in order[start : start + self.s.batch_size]], self.pad_id
            )
            loss, n = token_nll(self.model, {k: v.to(self.device) for k, v in batch.items()})
            total += float(loss)
            count += n
        loss = total / max(1, count)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    def train(self, resume: bool = True) -> SFTResult:
        r = super().train(resume=resume, has_eval=bool(self.val_set))
        return SFTResult(
            steps=r.steps,
            epochs_done=r.epochs_done,
            best_eval_loss=r.best_metric,
            final_eval_loss=r.final_eval.get("eval_loss"),
            stopped_early=r.stopped_early,
            resumed_from_step=r.resumed_from_step,
            train_tokens=r.train_units,
            tokens_per_s=r.units_per_s,
            history=r.history,
            resume_note=r.resume_note,
            world_size=r.world_size,
        )


@torch.no_grad()
def generate_samples(
    model,
    fmt: ChatFormat,
    prompts: Sequence[str],
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    repetition_penalty: float,
    seed: int = 0,
) -> list[str]:
    """A few generations for a human to read (left-padded batch, sampling from a fixed seed)."""
    tok = fmt.tokenizer
    device = next(model.parameters()).device
    encoded = [fmt.encode(p)[0] for p in prompts]
    width = max(len(e) for e in encoded)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    torch.manual_seed(seed)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=max_new_tokens,
        do_sample=temperature > 0,
        temperature=temperature if temperature > 0 else None,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        pad_token_id=pad,
        eos_token_id=tok.eos_token_id,
    )
    return [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out]


def sft_pairs(split_file: str) -> list[tuple[str, str]]:
    """(prompt, chosen) of a split; unlabelled pairs say nothing about which response to imitate."""
    import pandas as pd

    df = pd.read_parquet(split_file, columns=["prompt", "chosen", "label_source"])
    df = df[df["label_source"] != "none"]
    return list(zip(df["prompt"], df["chosen"]))


def sft_counts(trainer: SFTTrainer, stats: EncodeStats) -> dict[str, int]:
    """What the SFT stage reports about its examples and its model, before training."""
    policy = trainer.model
    return {
        "train_examples": len(trainer.train_set),
        "val_examples": len(trainer.val_set),
        "truncated_examples": stats.truncated,
        "dropped_examples": stats.dropped,
        "trainable_parameters": sum(p.numel() for p in policy.parameters() if p.requires_grad),
        "parameters": sum(p.numel() for p in policy.parameters()),
    }


def build_sft_trainer(
    base_model: str,
    train_file: str,
    val_file: str,
    model: ModelConfig,
    cfg: SFTConfig,
    seed: int = 0,
    *,
    checkpoint_dir: Path | None = None,
    on_log: LogFn | None = None,
    progress: bool = True,
) -> tuple[SFTTrainer, EncodeStats]:
    """The starting policy (with LoRA when configured) and its SFT trainer on prompt -> chosen
    (plus the optional instruction data); the encoding stats say what was truncated or dropped."""
    from rlhf_core.data.instructions import load_instruction_pairs
    from rlhf_core.models.loading import add_lora, load_causal_lm

    loaded = load_causal_lm(
        base_model,
        dtype=model.dtype,
        device=model.device,
        trust_remote_code=model.trust_remote_code,
        eval_mode=False,
    )
    policy = add_lora(loaded.model, model.lora) if model.lora.enabled else loaded.model
    fmt = ChatFormat(loaded.tokenizer, use_chat_template=model.use_chat_template)
    pairs = sft_pairs(train_file)
    if cfg.instruction_data:
        pairs += load_instruction_pairs(cfg.instruction_data)
    train, stats = encode_examples(pairs, fmt, cfg.max_length)
    val, _ = encode_examples(sft_pairs(val_file), fmt, cfg.max_length)
    trainer = SFTTrainer(
        policy,
        loaded.tokenizer,
        train,
        val,
        cfg,
        seed=seed,
        checkpoint_dir=checkpoint_dir,
        on_log=on_log,
        progress=progress,
    )
    trainer.fmt = fmt
    return trainer, stats


def distributed_job(job: dict, dist) -> dict | None:
    """SFT as one of the processes of a distributed learner (rlhf_core.distributed.worker runs it);
    rank 0 writes the model and returns the result."""
    from rlhf_core import distributed

    trainer, stats = build_sft_trainer(
        job["base_model"],
        job["train"],
        job["val"],
        ModelConfig.model_validate(job["model"]),
        SFTConfig.model_validate(job["sft"]),
        job["seed"],
        checkpoint_dir=Path(job["checkpoint_dir"]),
        **distributed.worker_hooks(dist),
    )
    counts = sft_counts(trainer, stats)
    result = trainer.train()
    return distributed.saved_result(
        dist, trainer.model, trainer.tokenizer, job["model_out"], result, counts=counts
    )
