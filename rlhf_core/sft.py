"""Supervised fine-tuning of a causal LM on prompt -> response, loss on response tokens only.

A lean loop of our own (not transformers.Trainer) so that resume is exact: a checkpoint holds
model, optimiser, scheduler, RNG state, data position and the best weights so far; a run that is
killed and started again ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhf_core.models.chat import ChatFormat

IGNORE = -100


@dataclass
class SFTSettings:
    epochs: float = 3.0
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 5e-4
    weight_decay: float = 0.01
    warmup_ratio: float = 0.05
    schedule: str = "cosine"  # cosine | linear | constant
    max_length: int = 256
    max_grad_norm: float = 1.0
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    early_stopping_patience: int | None = 3  # evaluations without improvement; None = off
    bucket_factor: int = 50  # length-bucketing: sort within mega-batches of bucket_factor * batch_size
    max_eval_examples: int = 512
    seed: int = 0


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


def encode_examples(pairs: Sequence[tuple[str, str]], fmt: ChatFormat, max_length: int) -> tuple[list[Example], EncodeStats]:
    """Prompt ids + response ids (+ EOS). Over-long examples keep the end of the prompt and the
    start of the response; an example with no response token left is dropped and counted."""
    out, stats = [], EncodeStats()
    for prompt, response in pairs:
        p_ids, r_ids = fmt.encode(prompt, response)
        if len(p_ids) + len(r_ids) > max_length:
            stats.truncated += 1
            keep_prompt = min(len(p_ids), max(max_length // 2, max_length - len(r_ids)))
            p_ids = p_ids[len(p_ids) - keep_prompt:]
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
        labels[i, e.n_prompt:n] = ids[i, e.n_prompt:n]
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def token_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL over the labelled positions, and how many there were."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    logits = logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1),
                                             ignore_index=IGNORE, reduction="sum")
    return loss, int((targets != IGNORE).sum())


def length_bucketed_batches(lengths: Sequence[int], batch_size: int, bucket_factor: int, seed: int, epoch: int) -> list[list[int]]:
    """Shuffle, sort by length inside mega-batches (less padding), then shuffle the batches."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    mega = batch_size * max(1, bucket_factor)
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start:start + mega].tolist(), key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {schedule!r} (expected cosine, linear or constant)")


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


LogFn = Callable[[int, dict], None]


class SFTTrainer:
    def __init__(self, model, tokenizer, train: list[Example], val: list[Example], settings: SFTSettings,
                 checkpoint_dir: Path | None = None, on_log: LogFn | None = None, progress: bool = True):
        if not train:
            raise ValueError("no training examples")
        self.model, self.tokenizer, self.train_set, self.val_set = model, tokenizer, train, val[: settings.max_eval_examples]
        self.s = settings
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.on_log = on_log or (lambda step, metrics: None)
        self.progress = progress
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.lengths = [len(e) for e in train]
        self.batches_per_epoch = math.ceil(len(train) / settings.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / settings.grad_accum)
        self.total_steps = settings.max_steps or max(1, math.ceil(settings.epochs * self.steps_per_epoch))
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": settings.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}], lr=settings.lr)
        warmup = int(settings.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: lr_factor(step, self.total_steps, warmup, settings.schedule))
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "best_eval_loss": None, "evals_without_improvement": 0,
                      "train_tokens": 0, "stopped_early": False, "history": []}
        self._best_weights: dict[str, torch.Tensor] | None = None

    # -- checkpoints --------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        # a copy: on CPU, .detach().cpu() would share storage with the live weights
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in self.model.state_dict().items()}

    def save_checkpoint(self) -> Path | None:
        if not self.checkpoint_dir:
            return None
        final = self.checkpoint_dir / f"step-{self.state['step']:08d}"
        tmp = self.checkpoint_dir / f".{final.name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(_untie(self._trainable_state()), tmp / "model.safetensors")
        if self._best_weights is not None:
            save_file(_untie(self._best_weights), tmp / "best.safetensors")
        torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, tmp / "trainer.pt")
        (tmp / "state.json").write_text(json.dumps({**self.state, "settings": asdict(self.s)}))
        os.replace(tmp, final)
        for old in sorted(self.checkpoint_dir.glob("step-*"))[: -self.s.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoint_dir or not self.checkpoint_dir.exists():
            return None
        done = sorted(p for p in self.checkpoint_dir.glob("step-*") if (p / "state.json").exists())
        return done[-1] if done else None

    def load_checkpoint(self, path: Path) -> None:
        weights = load_file(path / "model.safetensors", device=str(self.device))
        self.model.load_state_dict(weights, strict=False)
        if (path / "best.safetensors").exists():
            self._best_weights = load_file(path / "best.safetensors")
        blob = torch.load(path / "trainer.pt", weights_only=True)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        torch.set_rng_state(blob["torch_rng"])
        if blob["cuda_rng"]:
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
        state = json.loads((path / "state.json").read_text())
        state.pop("settings", None)
        self.state.update(state)

    # -- evaluation ---------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        if not self.val_set:
            return {}
        was_training = self.model.training
        self.model.eval()
        total, count = 0.0, 0
        order = sorted(range(len(self.val_set)), key=lambda i: len(self.val_set[i]))
        for start in range(0, len(order), self.s.batch_size):
            batch = collate([self.val_set[i] for i in order[start:start + self.s.batch_size]], self.pad_id)
            loss, n = token_nll(self.model, {k: v.to(self.device) for k, v in batch.items()})
            total += float(loss)
            count += n
        if was_training:
            self.model.train()
        loss = total / max(1, count)
        return {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 50.0))}

    def _after_eval(self, metrics: dict) -> None:
        best = self.state["best_eval_loss"]
        if best is None or metrics["eval_loss"] < best - 1e-6:
            self.state["best_eval_loss"] = metrics["eval_loss"]
            self.state["evals_without_improvement"] = 0
            self._best_weights = self._trainable_state()
        else:
            self.state["evals_without_improvement"] += 1
            patience = self.s.early_stopping_patience
            if patience is not None and self.state["evals_without_improvement"] >= patience:
                self.state["stopped_early"] = True

    # -- training -----------------------------------------------------------------------------
    def train(self, resume: bool = True) -> SFTResult:
        from tqdm.auto import tqdm

        resumed_from = None
        if resume and (ckpt := self.latest_checkpoint()):
            self.load_checkpoint(ckpt)
            resumed_from = self.state["step"]
        self.model.train()
        s, st = self.s, self.state
        # disable=None: a bar on a terminal, silence in logs (CI, Prefect workers)
        bar = tqdm(total=self.total_steps, initial=st["step"], desc="sft", unit="step", disable=None if self.progress else True,
                   dynamic_ncols=True)
        t_start, tokens_at_start = time.perf_counter(), st["train_tokens"]
        window_t, window_tokens, window_loss, window_n = time.perf_counter(), 0, 0.0, 0
        while st["step"] < self.total_steps and not st["stopped_early"]:
            batches = length_bucketed_batches(self.lengths, s.batch_size, s.bucket_factor, s.seed, st["epoch"])
            while st["batch_in_epoch"] < len(batches) and st["step"] < self.total_steps and not st["stopped_early"]:
                group = batches[st["batch_in_epoch"]: st["batch_in_epoch"] + s.grad_accum]
                micro = [collate([self.train_set[i] for i in b], self.pad_id) for b in group]
                n_tokens = sum(int((m["labels"][:, 1:] != IGNORE).sum()) for m in micro)
                step_loss = 0.0
                for m in micro:
                    loss_sum, _ = token_nll(self.model, {k: v.to(self.device) for k, v in m.items()})
                    (loss_sum / n_tokens).backward()
                    step_loss += loss_sum.item()
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                st["step"] += 1
                st["batch_in_epoch"] += len(group)
                st["train_tokens"] += n_tokens
                window_tokens += n_tokens
                window_loss += step_loss
                window_n += n_tokens
                bar.update(1)
                if st["step"] % s.log_every == 0 or st["step"] == self.total_steps:
                    now = time.perf_counter()
                    metrics = {"train_loss": window_loss / max(1, window_n), "lr": self.scheduler.get_last_lr()[0],
                               "grad_norm": float(grad_norm), "tokens_per_s": window_tokens / max(1e-9, now - window_t),
                               "epoch": st["epoch"] + st["batch_in_epoch"] / len(batches)}
                    bar.set_postfix(loss=f"{metrics['train_loss']:.3f}", tok_s=f"{metrics['tokens_per_s']:.0f}")
                    self.on_log(st["step"], metrics)
                    st["history"].append({"step": st["step"], **metrics})
                    window_t, window_tokens, window_loss, window_n = now, 0, 0.0, 0
                if self.val_set and (st["step"] % s.eval_every == 0 or st["step"] == self.total_steps):
                    metrics = self.evaluate()
                    self._after_eval(metrics)
                    self.on_log(st["step"], metrics)
                    st["history"].append({"step": st["step"], **metrics})
                if st["step"] % s.checkpoint_every == 0:
                    self.save_checkpoint()
            if st["batch_in_epoch"] >= len(batches):
                st["epoch"] += 1
                st["batch_in_epoch"] = 0
        bar.close()
        final_eval = st["history"][-1].get("eval_loss") if st["history"] else None
        if self._best_weights is not None:  # end on the best evaluated weights
            self.model.load_state_dict({k: v.to(self.device) for k, v in self._best_weights.items()}, strict=False)
        self.model.eval()
        elapsed = time.perf_counter() - t_start
        return SFTResult(steps=st["step"], epochs_done=st["epoch"] + st["batch_in_epoch"] / self.batches_per_epoch,
                         best_eval_loss=st["best_eval_loss"], final_eval_loss=final_eval, stopped_early=st["stopped_early"],
                         resumed_from_step=resumed_from, train_tokens=st["train_tokens"],
                         tokens_per_s=(st["train_tokens"] - tokens_at_start) / max(1e-9, elapsed), history=st["history"])


def _untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): store independent copies."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.setdefault(ptr, k)
    return out


@torch.no_grad()
def generate_samples(model, fmt: ChatFormat, prompts: Sequence[str], max_new_tokens: int = 64, temperature: float = 0.7,
                     top_p: float = 0.9, seed: int = 0) -> list[str]:
    """A few generations for a human to read (left-padded batch, sampling from a fixed seed)."""
    tok = fmt.tokenizer
    device = next(model.parameters()).device
    encoded = [fmt.encode(p)[0] for p in prompts]
    width = max(len(e) for e in encoded)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.tensor([[pad] * (width - len(e)) + e for e in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in encoded], device=device)
    torch.manual_seed(seed)
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                         temperature=temperature if temperature > 0 else None, top_p=top_p, pad_token_id=pad,
                         eos_token_id=tok.eos_token_id)
    return [tok.decode(row[width:], skip_special_tokens=True).strip() for row in out]
