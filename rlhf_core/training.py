"""The training loop SFT and reward-model training share: length-bucketed batches, gradient
accumulation, bf16 autocast where it pays, warmup + schedule, gradient clipping, periodic
evaluation with early stopping that ends on the best weights, a progress bar, and exact resume.

A checkpoint holds model, optimiser, scheduler, RNG state, data position and the best weights so
far: a run that is killed and started again ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from rlhf_core import distributed
from rlhf_core.config import LoopConfig, stable_hash
from rlhf_core.errors import UserError
from rlhf_core.models.fused import fuse_activations
from rlhf_core.provenance import module_code_version


def length_bucketed_batches(
    lengths: Sequence[int], batch_size: int, bucket_factor: int, seed: int, epoch: int
) -> list[list[int]]:
    """Shuffle, sort by length inside mega-batches (less padding), then shuffle the batches."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths))
    mega = batch_size * max(1, bucket_factor)
    batches = []
    for start in range(0, len(order), mega):
        chunk = sorted(order[start : start + mega].tolist(), key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
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


def has_bf16_units(device: torch.device) -> bool:
    """A GPU with bf16, or a CPU with AMX tiles or AVX512-BF16 dot products (oneDNN runs bf16
    matmuls on them). SmolLM2-135M against fp32 on 2 cores: a forward pass 2.8x faster on a
    Sapphire Rapids VM (AMX); on an AMD EPYC (Zen 4, AVX512-BF16) a forward pass 1.9x, a forward
    and backward 1.5x, sampling 1.4x. CPUs without either emulate bf16 and gain little or lose."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def autocast_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast: always (bf16), never (no), or where the hardware has bf16 units (auto)."""
    if mode == "no":
        return None
    if mode == "bf16":
        return torch.bfloat16
    if mode == "auto":
        return torch.bfloat16 if has_bf16_units(device) else None
    raise ValueError(f"mixed_precision {mode!r}: expected auto, bf16 or no")


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Autocast to `dtype` on `device` for the forward passes, or nothing when dtype is None."""
    return torch.autocast(device.type, dtype=dtype) if dtype else contextlib.nullcontext()


def autocast_for(mode: str, device: torch.device):
    """The autocast context a `mixed_precision` setting asks for on `device`."""
    return autocast_context(device, autocast_dtype(mode, device))


class FP32Linear(torch.nn.Linear):
    """A Linear that stays fp32 under autocast. For scalar heads (rewards, values): in bf16 a reward
    near 4 has a resolution of 1/32, coarser than the margins Bradley-Terry and PPO's advantages
    work with; and oneDNN's bf16 matmul with one output column reduces over every token, a reduction
    it does not promise to order the same way from run to run (the gradient of the reward head
    differed after a resume on one CI machine). The head costs nothing next to the backbone."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())


def fp32_head(linear: torch.nn.Linear) -> torch.nn.Linear:
    """Make this Linear (same weights, same state-dict keys) an FP32Linear."""
    if type(linear) is torch.nn.Linear:
        linear.__class__ = FP32Linear
    return linear


def untie(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): store independent copies."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in state.items():
        ptr = v.untyped_storage().data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.setdefault(ptr, k)
    return out


def cpu_copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the weights (on CPU, .detach().cpu() would share storage with the live ones)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


@contextlib.contextmanager
def checkpoint_folder(root: Path, name: str, prefix: str, keep: int):
    """Yield a staging folder; on success it becomes root/name atomically and only the newest `keep`
    folders named prefix* remain. A kill mid-write leaves no half checkpoint behind."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(f".{prefix}*.partial-*"):  # left by a killed writer
        if time.time() - stale.stat().st_mtime > 3600:
            shutil.rmtree(stale, ignore_errors=True)
    final = root / name
    # unique per writer: two runs writing the same step never share (or delete) a staging folder
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-", dir=root))
    try:
        yield tmp
        if final.exists():  # another writer got there first with the same step
            shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(root.glob(f"{prefix}*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(root: Path | None, prefix: str) -> Path | None:
    if not root or not root.exists():
        return None
    done = sorted(p for p in root.glob(f"{prefix}*") if (p / "state.json").exists())
    return done[-1] if done else None


class TrainingDiverged(UserError):
    """Training produced non-finite losses or gradients repeatedly: the stage stops with one line."""


@dataclass
class LoopResult:
    steps: int
    epochs_done: float
    best_metric: float | None
    final_eval: dict
    stopped_early: bool
    resumed_from_step: int | None
    train_units: int  # tokens (SFT) or pairs (reward model) trained on
    units_per_s: float
    history: list[dict] = field(default_factory=list)
    resume_note: str | None = None  # why a checkpoint found was not resumed
    world_size: int = 1  # the processes that trained


def ids_digest(seqs: Sequence[Sequence[int]], *extra: Sequence[float]) -> str:
    """Digest of token-id sequences (and per-example numbers: labels, weights), in order."""
    h = hashlib.sha256()
    for ids in seqs:
        h.update(np.asarray(ids, dtype=np.int64).tobytes())
        h.update(b"|")
    for values in extra:
        h.update(np.asarray(values, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


LogFn = Callable[[int, dict], None]


def set_aside_if_foreign(path: Path, fingerprint: str) -> str | None:
    """None when the checkpoint at path was written by the run whose fingerprint is given; else
    moves its folder's checkpoints aside (to <dir>.previous, nothing is deleted) and says why.
    Only the checkpoints move: the folder may hold a running learner's other files."""
    written = json.loads((path / "state.json").read_text()).get("fingerprint")
    if written == fingerprint:
        return None
    folder = path.parent
    aside = folder.with_name(folder.name + ".previous")
    shutil.rmtree(aside, ignore_errors=True)
    aside.mkdir(parents=True)
    prefix = path.name.split("-")[0] + "-"  # step-, iter-
    for ckpt in folder.glob(f"{prefix}*"):
        os.replace(ckpt, aside / ckpt.name)
    return (
        f"{path.name} in {folder} is another run's (data, settings, model or code differ): "
        f"started fresh, kept it in {aside}"
    )


def weights_signature(model) -> str:
    """A cheap digest of a model's weights (names, shapes and sums): tells one starting model from
    another where a folder name cannot (the same path rewritten, a model built in memory)."""
    with torch.no_grad():
        return stable_hash(
            [
                (name, list(p.shape), float(p.detach().sum(dtype=torch.float64)))
                for name, p in model.state_dict().items()
            ]
        )


def load_weights(model, file: Path, device) -> None:
    """Load a checkpoint's weights; a checkpoint that does not fit the model is an error, never a
    partial load (tied weights saved twice are the one allowed extra)."""
    state = load_file(file, device=str(device))
    result = model.load_state_dict(state, strict=False)
    tied = {k for k in result.unexpected_keys if k.endswith("lm_head.weight")}
    if result.missing_keys or set(result.unexpected_keys) - tied:
        raise UserError(
            f"{file} does not fit the model (missing {len(result.missing_keys)} tensors, e.g. "
            f"{(result.missing_keys or ['-'])[0]}; unexpected {len(result.unexpected_keys)}): "
            "delete the checkpoint folder to start fresh"
        )


class TrainLoop:
    """Subclasses say how to turn a micro-batch of example indices into a loss, and how to evaluate."""

    desc = "train"
    unit = "examples"  # what throughput is counted in
    distributed_ready = False  # micro_step runs its forward through self.forward_model
    best_metric = "eval_loss"
    higher_is_better = False

    def __init__(
        self,
        model,
        lengths: Sequence[int],
        settings: LoopConfig,
        seed: int = 0,
        checkpoint_dir: Path | None = None,
        on_log: LogFn | None = None,
        progress: bool = True,
    ):
        if not len(lengths):
            raise ValueError("no training examples")
        self.model, self.s, self.seed = model, settings, seed
        fuse_activations(
            model
        )  # the same function as one kernel (GPT-2's tanh-GELU): ~10% off forward+backward on CPU
        self.dist = distributed.current()
        if self.dist.world > 1 and not self.distributed_ready:
            raise UserError(f"{self.desc}: runs in one process only (distributed.num_processes 1)")
        # the forward that trains: DDP's wrapper when several processes learn together
        self.forward_model = self.dist.wrap(self.forward_module(model))
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir else None
        self.on_log = on_log or (lambda step, metrics: None)
        self.progress = progress
        self.device = next(model.parameters()).device
        self.autocast = autocast_dtype(settings.mixed_precision, self.device)
        self.lengths = list(lengths)
        self.batches_per_epoch = math.ceil(len(self.lengths) / settings.batch_size)
        self.steps_per_epoch = math.ceil(self.batches_per_epoch / settings.grad_accum)
        self.total_steps = settings.max_steps or max(
            1, math.ceil(settings.epochs * self.steps_per_epoch)
        )
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [
                {
                    "params": [p for _, p in params if p.ndim >= 2],
                    "weight_decay": settings.weight_decay,
                },
                {"params": [p for _, p in params if p.ndim < 2], "weight_decay": 0.0},
            ],
            lr=settings.lr,
        )
        warmup = int(settings.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda step: lr_factor(step, self.total_steps, warmup, settings.schedule),
        )
        self.state = {
            "step": 0,
            "epoch": 0,
            "batch_in_epoch": 0,
            "best_metric": None,
            "evals_without_improvement": 0,
            "train_units": 0,
            "stopped_early": False,
            "history": [],
        }
        self._best_weights: dict[str, torch.Tensor] | None = None

    # -- what a subclass provides ------------------------------------------------------------
    def units(self, indices: Sequence[int]) -> int:
        """How many loss units (tokens, pairs) these examples hold: the step's loss is their mean."""
        raise NotImplementedError

    def micro_step(self, indices: Sequence[int], step_units: int) -> float:
        """Forward + backward of (summed loss / step_units); returns the summed loss."""
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        raise NotImplementedError

    def forward_module(self, model: torch.nn.Module) -> torch.nn.Module:
        """The module whose forward computes the loss's inputs (what DDP wraps): the model itself
        unless a subclass's forward reaches into it (reward models with mean pooling)."""
        return model

    def window_metrics(self) -> dict[str, float]:
        """Means of the subclass's own training statistics since the last log line (then reset)."""
        return {}

    def data_digest(self) -> str:
        """What the training examples are (subclasses: their token ids and labels)."""
        return stable_hash(self.lengths)

    @functools.cached_property
    def fingerprint(self) -> str:
        """A checkpoint is resumed only by the run that wrote it: the same settings, seed, data,
        starting weights and code. Taken before the first step (train), while the weights are
        the starting ones."""
        return stable_hash(
            {
                "settings": self.s.model_dump(mode="json"),
                "seed": self.seed,
                "data": self.data_digest(),
                "model": weights_signature(self.model),
                "code": module_code_version(sys.modules[type(self).__module__]),
            }
        )

    def amp(self):
        return autocast_context(self.device, self.autocast)

    # -- checkpoints --------------------------------------------------------------------------
    def _weights(self) -> dict[str, torch.Tensor]:
        return cpu_copy(self.model)

    def save_checkpoint(self) -> Path | None:
        if not self.checkpoint_dir:
            return None
        rng_states = self.dist.gather(torch.get_rng_state())  # every process's dropout stream
        if not self.dist.is_main:
            self.dist.barrier()
            return self.checkpoint_dir / f"step-{self.state['step']:08d}"
        path = self._write_checkpoint(rng_states)
        self.dist.barrier()
        return path

    def _write_checkpoint(self, rng_states: list[torch.Tensor]) -> Path:
        name = f"step-{self.state['step']:08d}"
        with checkpoint_folder(self.checkpoint_dir, name, "step-", self.s.keep_checkpoints) as tmp:
            save_file(untie(self._weights()), tmp / "model.safetensors")
            if self._best_weights is not None:
                save_file(untie(self._best_weights), tmp / "best.safetensors")
            torch.save(
                {
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
                    "torch_rng": rng_states[0],
                    "torch_rng_ranks": rng_states,
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
                },
                tmp / "trainer.pt",
            )
            (tmp / "state.json").write_text(
                json.dumps(
                    {
                        **self.state,
                        "settings": self.s.model_dump(mode="json"),
                        "seed": self.seed,
                        "fingerprint": self.fingerprint,
                    }
                )
            )
        return self.checkpoint_dir / name

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.checkpoint_dir, "step-")

    def load_checkpoint(self, path: Path) -> None:
        load_weights(self.model, path / "model.safetensors", self.device)
        if (path / "best.safetensors").exists():
            self._best_weights = load_file(path / "best.safetensors")
        blob = torch.load(path / "trainer.pt", weights_only=True)
        self.optimizer.load_state_dict(blob["optimizer"])
        self.scheduler.load_state_dict(blob["scheduler"])
        ranks = blob.get("torch_rng_ranks") or [blob["torch_rng"]]
        torch.set_rng_state(ranks[self.dist.rank] if self.dist.rank < len(ranks) else ranks[0])
        if blob["cuda_rng"]:
            torch.cuda.set_rng_state_all(blob["cuda_rng"])
        state = json.loads((path / "state.json").read_text())
        for key in ("settings", "seed", "fingerprint"):
            state.pop(key, None)
        self.state.update(state)

    # -- evaluation bookkeeping ----------------------------------------------------------------
    def _after_eval(self, metrics: dict) -> None:
        value, best = metrics[self.best_metric], self.state["best_metric"]
        improved = best is None or (
            value > best + 1e-6 if self.higher_is_better else value < best - 1e-6
        )
        if improved:
            self.state["best_metric"] = value
            self.state["evals_without_improvement"] = 0
            self._best_weights = self._weights()
        else:
            self.state["evals_without_improvement"] += 1
            patience = self.s.early_stopping_patience
            if patience is not None and self.state["evals_without_improvement"] >= patience:
                self.state["stopped_early"] = True

    def _skip_nonfinite(self, loss: float, grad_norm: float) -> None:
        """A NaN/inf step never reaches the weights or the optimiser's moments."""
        self.optimizer.zero_grad(set_to_none=True)
        st = self.state
        st["skipped_steps"] = st.get("skipped_steps", 0) + 1
        st["nonfinite_in_a_row"] = st.get("nonfinite_in_a_row", 0) + 1
        self.on_log(st["step"], {"skipped_steps": st["skipped_steps"]})
        if st["nonfinite_in_a_row"] >= self.s.max_nonfinite_steps:
            raise TrainingDiverged(
                f"{self.desc}: loss {loss:g}, gradient norm {grad_norm:g}: "
                f"{st['nonfinite_in_a_row']} non-finite steps in a row after step {st['step']} "
                f"(the last checkpoint is intact; lower the learning rate or check the data)"
            )

    def _evaluate_in_eval_mode(self) -> dict[str, float]:
        was_training = self.model.training
        self.model.eval()  # dropout off
        try:
            return self.evaluate()
        finally:
            if was_training:
                self.model.train()

    # -- training -----------------------------------------------------------------------------
    def _accumulate(self, group: list[list[int]], n_units: int) -> float:
        """Forward + backward of one optimiser step's micro-batches; the step's summed loss."""
        d = self.dist
        if d.world == 1:
            return sum(self.micro_step(b, n_units) for b in group)
        local = 0.0
        for i, batch in enumerate(group):
            part = d.shard(batch)
            # gradients are averaged over the processes once, at the step's last micro-batch
            with d.no_sync(self.forward_model, sync=i == len(group) - 1):
                if part:
                    local += self.micro_step(part, n_units / d.world)
                else:  # fewer rows than processes: DDP still needs this one's (zero) gradient
                    self.micro_step(batch[:1], math.inf)
        return d.sum(local)

    def train(self, resume: bool = True, has_eval: bool = True) -> LoopResult:
        from tqdm.auto import tqdm

        resumed_from, note = None, None
        # dropout draws from the global generator: the same run whatever ran before it in this
        # process (a resumed run restores the generator's state from its checkpoint); each
        # process of a distributed learner has a stream of its own
        torch.manual_seed(self.seed + self.dist.rank)
        fingerprint = self.fingerprint  # of the starting weights, before any step changes them
        if resume and (ckpt := self.latest_checkpoint()):
            # one process decides; the others follow once a foreign checkpoint is set aside
            note = self.dist.broadcast(
                set_aside_if_foreign(ckpt, fingerprint) if self.dist.is_main else None
            )
            if note is None:
                self.load_checkpoint(ckpt)
                resumed_from = self.state["step"]
        self.model.train()
        s, st = self.s, self.state
        # disable=None: a bar on a terminal, silence in logs (CI, Prefect workers)
        bar = tqdm(
            total=self.total_steps,
            initial=st["step"],
            desc=self.desc,
            unit="step",
            disable=None if self.progress and self.dist.is_main else True,
            dynamic_ncols=True,
        )
        t_start, units_at_start = time.perf_counter(), st["train_units"]
        window_t, window_units, window_loss = time.perf_counter(), 0, 0.0
        last_eval: dict = {}
        while st["step"] < self.total_steps and not st["stopped_early"]:
            batches = length_bucketed_batches(
                self.lengths, s.batch_size, s.bucket_factor, self.seed, st["epoch"]
            )
            while (
                st["batch_in_epoch"] < len(batches)
                and st["step"] < self.total_steps
                and not st["stopped_early"]
            ):
                group = batches[st["batch_in_epoch"] : st["batch_in_epoch"] + s.grad_accum]
                n_units = sum(self.units(b) for b in group)
                step_loss = self._accumulate(group, n_units)
                grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.max_grad_norm)
                st["batch_in_epoch"] += len(group)
                if not (math.isfinite(step_loss) and math.isfinite(float(grad_norm))):
                    self._skip_nonfinite(step_loss, float(grad_norm))
                    continue
                st["nonfinite_in_a_row"] = 0
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                st["step"] += 1
                st["train_units"] += n_units
                window_units += n_units
                window_loss += step_loss
                bar.update(1)
                if st["step"] % s.log_every == 0 or st["step"] == self.total_steps:
                    now = time.perf_counter()
                    metrics = {
                        "train_loss": window_loss / max(1, window_units),
                        "lr": self.scheduler.get_last_lr()[0],
                        "grad_norm": float(grad_norm),
                        f"{self.unit}_per_s": window_units / max(1e-9, now - window_t),
                        "epoch": st["epoch"] + st["batch_in_epoch"] / len(batches),
                        **self.window_metrics(),
                    }
                    bar.set_postfix(
                        loss=f"{metrics['train_loss']:.3f}",
                        **{f"{self.unit}/s": f"{metrics[f'{self.unit}_per_s']:.0f}"},
                    )
                    self.on_log(st["step"], metrics)
                    st["history"].append({"step": st["step"], **metrics})
                    window_t, window_units, window_loss = now, 0, 0.0
                if has_eval and (st["step"] % s.eval_every == 0 or st["step"] == self.total_steps):
                    last_eval = self._evaluate_in_eval_mode()
                    self._after_eval(last_eval)
                    self.on_log(st["step"], last_eval)
                    st["history"].append({"step": st["step"], **last_eval})
                if st["step"] % s.checkpoint_every == 0:
                    self.save_checkpoint()
            if st["batch_in_epoch"] >= len(batches):
                st["epoch"] += 1
                st["batch_in_epoch"] = 0
        bar.close()
        if self._best_weights is not None:  # end on the best evaluated weights
            self.model.load_state_dict(
                {k: v.to(self.device) for k, v in self._best_weights.items()}, strict=False
            )
        self.model.eval()
        elapsed = time.perf_counter() - t_start
        final_eval = next((h for h in reversed(st["history"]) if self.best_metric in h), {})
        return LoopResult(
            steps=st["step"],
            epochs_done=st["epoch"] + st["batch_in_epoch"] / self.batches_per_epoch,
            best_metric=st["best_metric"],
            final_eval=final_eval,
            stopped_early=st["stopped_early"],
            resumed_from_step=resumed_from,
            train_units=st["train_units"],
            units_per_s=(st["train_units"] - units_at_start) / max(1e-9, elapsed),
            history=st["history"],
            resume_note=note,
            world_size=self.dist.world,
        )
