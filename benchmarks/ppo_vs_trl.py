"""PPO throughput: TRL 1.12's trl.experimental.ppo.PPOTrainer against our engine (rlhf_core.ppo), side by side in one process.

    python benchmarks/ppo_vs_trl.py [--setup tiny|small|both] [--iterations N] [--warmup 2] [--threads 1]
                                    [--trl-gc-frozen freeze|noop] [--precision fp32|bf16] [--repeats N] [--no-compiled]
                                    [--profile] [--json]

Three runs per setup, each from the same initial weights, on the same prompts in the same order:
  * "trl"        TRL's PPOTrainer as shipped: its two gc.collect() calls per update run (they are timed through a thin
                 wrapper that calls the real gc.collect, reported as gc_collect_s);
  * "trl-nogc"   the same with the garbage collector out of the way: --trl-gc-frozen freeze (default) runs
                 gc.collect(); gc.freeze(); gc.disable() right before train() (every object that exists then moves to
                 the permanent generation, so TRL's explicit gc.collect() calls only walk objects created during
                 training, and automatic collections are off); --trl-gc-frozen noop instead replaces the `gc` module
                 seen by trl.experimental.ppo.ppo_trainer with a stub whose collect() does nothing (automatic
                 collections stay on, as in our run). Both are undone after the run (gc.enable(); gc.unfreeze() /
                 the real module put back);
  * "ours"       rlhf_core.ppo.PPOTrainer, as configured by default (eager decoding);
  * "ours-compiled" the same with ppo.compile_generation (torch.compile'd decode step against a static KV cache; its
                 first iteration pays the compilation, reported as first_iteration_extra_s); --no-compiled skips it.
--repeats N runs all of them N times, interleaved (the order reversed every other round); each run reports its median
round and every round's episodes/s, and the ratios per round against trl-nogc are listed too.

Setups (GPT-2 from config, no downloads; resid/embd/attn dropout 0 in every model, so dropout is moot on both sides):
  tiny:  2 layers x 128 wide, 4 heads, vocab 2000, 8 prompts per iteration, 32 new tokens, 1 PPO epoch  (default 12 it.)
  small: 4 layers x 256 wide, 4 heads, vocab 2000, 16 prompts per iteration, 64 new tokens, 2 PPO epochs (default 6 it.)

Same for both trainers:
  * tokenizer: our byte-level BPE (rlhf_core.models.scratch.train_tokenizer, vocab 2000, separate <|pad|>, left
    padding) trained on generate_demo_pairs(512, seed=0) texts;
  * models: policy GPT2LMHeadModel and reference = identical weights; reward GPT2ForSequenceClassification(num_labels=1)
    of the same size (random init, seed+1); value model = a copy of the reward model (TRL's standard; ours through
    value_from_reward_model). Every run gets deep copies of the same templates. fp32, CPU;
  * prompts: the demo prompts in our plain Human/Assistant format, tokenised once by our ChatFormat and cut to their last
    64 tokens; TRL gets those ids as its `input_ids` column, laid out in our iteration order and read by a sequential
    DataLoader (swapped in for TRL's shuffling one after construction, same collator), so both trainers see identical
    left-padded query tensors each iteration (checked);
  * sampling: temperature 1.0 (TRL adds 1e-7), top_p 1.0, no top-k, no stop token: every response is exactly
    max_new_tokens long on both sides (TRL: stop_token/stop_token_id None; ours: stop_at_eos=False);
  * PPO: k1 KL penalty with fixed beta 0.05, gamma 1, lam 0.95, cliprange 0.2, cliprange_value 0.2, vf_coef 0.1, advantage
    whitening, no reward whitening/normalisation/clipping, no missing-EOS penalty, no entropy bonus; one mini-batch and one
    micro-batch = the whole batch (TRL: per_device_train_batch_size = local_rollout_forward_batch_size = batch,
    gradient_accumulation_steps 1, num_mini_batches 1; ours: batch = generation = mini = micro batch), the same number of
    PPO epochs, so one optimiser step per PPO epoch on both sides (counted with optimiser step hooks);
  * optimiser: torch.optim.AdamW (non-fused, TRL optim="adamw_torch"; --trl-optim adamw_torch_fused is TRL's default),
    lr 1e-5 constant (TRL lr_scheduler_type="constant"), weight decay 0, one optimiser over policy + value on TRL's side,
    two (policy, value) stepping together on ours. TRL does no gradient clipping; ours runs clip_grad_norm_ with
    max_grad_norm=1e9 (the norm is still computed - a little extra work on our side - but never clips);
  * precision: fp32 by default (TRL bf16=False; ours mixed_precision "no"); --precision bf16 runs both with bf16
    autocast on the CPU (TRL bf16=True, i.e. accelerate's autocast around every model forward; ours mixed_precision
    "bf16": autocast around every forward, old log-probabilities from a full forward pass) and measures the peak
    with bf16 matmuls;
  * no gradient checkpointing, use_cpu=True, no checkpoints (save_strategy="no" / no
    checkpoint_dir), no sample generations (num_sample_generations=0 / on_samples=None), report_to="none".
  Known remaining differences (not work-changing): TRL samples from the global torch RNG, ours from its own generator, so
  the sampled tokens differ; TRL treats a *sampled* <|pad|> token as padding (masks it out of the losses), ours does not.

Timing: wall clock per iteration, from the end of iteration W (= --warmup) to the end of the last one. TRL: a
TrainerCallback stamps time.perf_counter() in on_train_begin and on_step_end (TRL's post-step del/gc.collect/empty_cache
fall into the next interval: one per timed iteration); ours: a stamp before train() and one in on_log after every
iteration. episodes/s = prompts per iteration x timed iterations / window. Our rollout_s / update_s split comes from our
per-iteration metrics (rollout = generation, reference, values, scores, KL rewards, GAE). "gc s/it" = time spent in all
garbage collections (automatic ones and explicit gc.collect calls, timed through gc.callbacks) inside the timed window, per
iteration, for every run. Note that what one gc.collect() costs grows with the number of live Python objects in the
process (here: transformers, datasets, trl, three models per trainer, ...), so the "as shipped" TRL figure depends on
the process it runs in; "trl-nogc" does not.

Model FLOPs (identical formula for both trainers, from the shapes each run actually processed; B prompts, P = padded
prompt width, R = new tokens, T = P + R, L layers, d width, V vocab, E PPO epochs):
  N_b     = non-embedding parameters of a GPT-2 backbone (blocks + final LayerNorm; embeddings excluded)
  N_pol   = N_b + V*d      (policy/reference: the LM-head matmul counts, tied to the embedding or not)
  N_rm    = N_b + d        (reward/value: backbone + scalar score head)
  fwd(N)  = 2*N*T + 4*L*d*T^2                  one full-sequence forward of one row (matmuls + attention scores/values,
                                               the full T x T square: the masked sdpa computes all of it)
  gen     = 2*N_b*(P + R - 1) + 2*V*d*R + 4*L*d*P^2 + sum_{t=1..R-1} 4*L*d*(P + t)
                                               KV-cached sampling: prompt prefill + R-1 decode steps through the blocks,
                                               the LM head once per sampled token
  per iteration = B * [ gen + fwd(N_pol) (reference) + 2*fwd(N_rm) (values, reward)
                        + E * 3 * (fwd(N_pol) + fwd(N_rm)) (PPO update: forward + backward = 3x forward, policy + value) ]
Peak: the best of a few fp32 torch.mm timings (1024^3 and 2048^3) at the run's thread count, measured in the same process
(2*n^3 / t). MFU = achieved model GFLOP/s / peak. (Work either trainer does beyond this - full-vocabulary logits in the
prompt prefill, an extra decode step, entropy statistics, the grad norm - is not counted as model FLOPs.)

--profile runs cProfile over --profile-iterations of OUR iterations (after --warmup unprofiled ones) on a fresh trainer
and prints the top entries by cumulative and by own time, plus the rollout_s/update_s split of those iterations (cProfile
inflates Python-heavy code, so the unprofiled split from the timed run is printed too).

Needs an idle machine: with 2 cores, a busy neighbour process slows a 2-thread torch run several-fold; the cpu/wall
column shows it and a warning is printed when it drops. --threads 1 is far less sensitive to that.
"""

from __future__ import annotations

import contextlib
import copy
import cProfile
import gc
import pstats
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import common  # first: puts the repository root on sys.path
from common import (
    add_common_args,
    drop_printer,
    dropout_ps,
    key_values,
    lib_versions,
    machine_state,
    measure_peak,
    patched_env,
    prepare_run,
    print_json,
    run_order,
    stamp,
    timing_callback,
    unwrapped_optimizer,
    warn_if_busy,
)

common.env_defaults(TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1")

import torch  # noqa: E402

import rlhf_core.ppo.trainer as ours_mod  # noqa: E402
from rlhf_core.config import PPOConfig  # noqa: E402
from rlhf_core.data.demo import generate_demo_pairs  # noqa: E402
from rlhf_core.models.chat import ChatFormat  # noqa: E402
from rlhf_core.models.scratch import train_tokenizer  # noqa: E402
from rlhf_core.ppo.trainer import PPOTrainer  # noqa: E402
from rlhf_core.ppo.value import value_from_reward_model  # noqa: E402
from rlhf_core.reward.model import RewardModel  # noqa: E402

VOCAB = 2000
N_POSITIONS = 256
MAX_PROMPT_TOKENS = 64
N_PROMPTS = 512
LR = 1e-5
TARGET_SHIPPED, TARGET_NOGC = 3.0, 1.3


@dataclass(frozen=True)
class Setup:
    name: str
    layers: int
    width: int
    heads: int
    batch: int
    new_tokens: int
    ppo_epochs: int
    iterations: int  # default


SETUPS = {
    "tiny": Setup(
        "tiny", layers=2, width=128, heads=4, batch=8, new_tokens=32, ppo_epochs=1, iterations=12
    ),
    "small": Setup(
        "small", layers=4, width=256, heads=4, batch=16, new_tokens=64, ppo_epochs=2, iterations=6
    ),
}


# -- shared setup ---------------------------------------------------------------------------------
def gpt2_config(tok, setup: Setup, **kw):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=len(tok),
        n_positions=N_POSITIONS,
        n_embd=setup.width,
        n_layer=setup.layers,
        n_head=setup.heads,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **kw,
    )


def build_templates(tok, setup: Setup, seed: int):
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel

    torch.manual_seed(seed)
    policy = GPT2LMHeadModel(gpt2_config(tok, setup)).float()
    policy.generation_config.pad_token_id = tok.pad_token_id
    torch.manual_seed(seed + 1)
    reward = GPT2ForSequenceClassification(gpt2_config(tok, setup, num_labels=1)).float()
    return policy, reward


def param_counts(policy, reward) -> dict:
    def body(model):
        backbone = getattr(model, model.base_model_prefix)
        return sum(
            p.numel() for n, p in backbone.named_parameters() if not n.startswith(("wte.", "wpe."))
        )

    cfg = policy.config
    n_b_pol, n_b_rm = body(policy), body(reward)
    return {
        "n_body_policy": n_b_pol,
        "n_body_reward": n_b_rm,
        "n_policy": n_b_pol + cfg.vocab_size * cfg.n_embd,
        "n_reward": n_b_rm + cfg.n_embd,
        "layers": cfg.n_layer,
        "width": cfg.n_embd,
        "vocab": cfg.vocab_size,
        "total_params_policy": sum(p.numel() for p in policy.parameters()),
        "total_params_reward": sum(p.numel() for p in reward.parameters()),
    }


def iteration_flops(shape: tuple[int, int, int], epochs: int, pc: dict) -> float:
    """Model FLOPs of one PPO iteration (formula in the module docstring); shape = (B, P, R)."""
    B, P, R = shape
    L, d, V = pc["layers"], pc["width"], pc["vocab"]
    T = P + R

    def fwd(n):
        return 2 * n * T + 4 * L * d * T * T

    gen = (
        2 * pc["n_body_policy"] * (P + R - 1)
        + 2 * V * d * R
        + 4 * L * d * P * P
        + sum(4 * L * d * (P + t) for t in range(1, R))
    )
    per_row = (
        gen
        + fwd(pc["n_policy"])
        + 2 * fwd(pc["n_reward"])
        + epochs * 3 * (fwd(pc["n_policy"]) + fwd(pc["n_reward"]))
    )
    return float(B * per_row)


class GCTimer:
    """Every garbage collection (automatic or explicit gc.collect) while installed: (start, seconds, generation)."""

    def __init__(self):
        self.events: list[tuple[float, float, int]] = []
        self._start = 0.0

    def _callback(self, phase, info):
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.events.append(
                (self._start, time.perf_counter() - self._start, info.get("generation", -1))
            )

    def __enter__(self):
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._callback)

    def within(self, t0: float, t1: float) -> tuple[float, int, int]:
        """(seconds, collections, full collections) that started in [t0, t1)."""
        ev = [e for e in self.events if t0 <= e[0] < t1]
        return sum(e[1] for e in ev), len(ev), sum(1 for e in ev if e[2] == 2)


def summarise(
    stamps: list[tuple[float, float]],
    shapes: list[tuple[int, int, int]],
    warmup: int,
    epochs: int,
    pc: dict,
    peak: float,
    gc_timer: GCTimer,
) -> dict:
    """stamps[0] = start of train(), stamps[i] = end of iteration i."""
    n = len(stamps) - 1
    if n <= warmup:
        raise SystemExit(f"only {n} iterations recorded, need more than --warmup={warmup}")
    window = stamps[n][0] - stamps[warmup][0]
    cpu = stamps[n][1] - stamps[warmup][1]
    timed = shapes[warmup:n]
    episodes = sum(s[0] for s in timed)
    flops = sum(iteration_flops(s, epochs, pc) for s in timed)
    iter_s = [stamps[i][0] - stamps[i - 1][0] for i in range(1, n + 1)]
    gc_s, gc_n, gc_full = gc_timer.within(stamps[warmup][0], stamps[n][0])
    return {
        "gc_s_per_iteration": gc_s / (n - warmup),
        "gc_collections_timed": gc_n,
        "gc_full_collections_timed": gc_full,
        "episodes_per_s": episodes / window,
        "timed_s": window,
        "timed_iterations": n - warmup,
        "timed_episodes": episodes,
        "mean_iteration_s": window / (n - warmup),
        "iteration_s": iter_s,
        "cpu_per_wall": cpu / window,
        "model_gflop_per_iteration": flops / (n - warmup) / 1e9,
        "achieved_gflops": flops / window / 1e9,
        "mfu": flops / window / 1e9 / peak,
        "iterations": n,
    }


# -- TRL ------------------------------------------------------------------------------------------
class _TimedGC:
    """Stands in for the `gc` module inside trl's ppo_trainer: calls the real gc.collect (or nothing) and times it."""

    def __init__(self, real: bool):
        self.real, self.seconds, self.calls = real, 0.0, 0

    def collect(self, *a, **kw):
        self.calls += 1
        if not self.real:
            return 0
        t = time.perf_counter()
        try:
            return gc.collect(*a, **kw)
        finally:
            self.seconds += time.perf_counter() - t


def run_trl(
    policy_t,
    reward_t,
    tok,
    setup: Setup,
    order: list[list[int]],
    prompt_ids: list[list[int]],
    args,
    gc_mode: str,
    out_dir: str,
) -> dict:
    """gc_mode: shipped | freeze | noop."""
    from datasets import Dataset
    from torch.utils.data import DataLoader
    from trl.experimental.ppo import PPOConfig
    from trl.experimental.ppo import PPOTrainer as TRLPPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_mod

    B, n_iter = setup.batch, len(order)
    rows = [prompt_ids[i] for idx in order for i in idx]
    dataset = Dataset.from_dict({"input_ids": rows})
    config = PPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=B,
        gradient_accumulation_steps=1,
        num_mini_batches=1,
        local_rollout_forward_batch_size=B,
        num_ppo_epochs=setup.ppo_epochs,
        total_episodes=B * n_iter,
        response_length=setup.new_tokens,
        temperature=1.0,
        stop_token=None,
        stop_token_id=None,
        missing_eos_penalty=None,
        kl_coef=0.05,
        kl_estimator="k1",
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        gamma=1.0,
        lam=0.95,
        whiten_rewards=False,
        learning_rate=LR,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        optim=args.trl_optim,
        bf16=args.precision == "bf16",
        fp16=False,
        use_cpu=True,
        gradient_checkpointing=False,
        num_sample_generations=0,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        disable_tqdm=True,
        logging_steps=1,
        seed=args.seed,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )
    stamps: list[tuple[float, float]] = []
    torch.manual_seed(args.seed)
    policy, ref = copy.deepcopy(policy_t), copy.deepcopy(policy_t)
    reward, value = copy.deepcopy(reward_t), copy.deepcopy(reward_t)
    # TRL's PPOTrainer builds its own Accelerator without a mixed_precision argument, so bf16=True alone leaves it in
    # fp32; accelerate reads this variable instead (checked below through trainer.accelerator.mixed_precision)
    precision_env = {"ACCELERATE_MIXED_PRECISION": "bf16"} if args.precision == "bf16" else {}
    with (
        contextlib.redirect_stdout(sys.stderr),
        patched_env(precision_env),
    ):  # accelerator.print would break --json
        trainer = TRLPPOTrainer(
            args=config,
            processing_class=tok,
            model=policy,
            ref_model=ref,
            reward_model=reward,
            train_dataset=dataset,
            value_model=value,
            eval_dataset=None,
            callbacks=[timing_callback(stamps, train_begin=True)],
        )
    drop_printer(trainer)
    # our iteration order: a sequential DataLoader over the rows laid out in that order (TRL's own shuffles)
    trainer.dataloader = trainer.accelerator.prepare(
        DataLoader(
            dataset,
            batch_size=trainer.local_dataloader_batch_size,
            shuffle=False,
            collate_fn=trainer.data_collator,
            drop_last=True,
        )
    )

    shapes, queries_seen = [], []
    real_batch_generation = trl_mod.batch_generation

    def recording_batch_generation(model, queries, *a, **kw):
        query_responses, logitss = real_batch_generation(model, queries, *a, **kw)
        queries_seen.append(queries.detach().clone())
        shapes.append(
            (
                int(queries.size(0)),
                int(queries.size(1)),
                int(query_responses.size(1) - queries.size(1)),
            )
        )
        return query_responses, logitss

    opt_steps = [0]
    inner_opt = unwrapped_optimizer(trainer)
    hook = inner_opt.register_step_post_hook(
        lambda *a, **k: opt_steps.__setitem__(0, opt_steps[0] + 1)
    )

    timed_gc = _TimedGC(real=gc_mode != "noop")
    real_gc_module = trl_mod.gc
    trl_mod.batch_generation = recording_batch_generation
    trl_mod.gc = timed_gc
    gc.collect()
    if gc_mode == "freeze":
        gc.freeze()
        gc.disable()
    t0 = time.perf_counter()
    try:
        with contextlib.redirect_stdout(sys.stderr), GCTimer() as gc_timer:
            trainer.train()
    finally:
        train_s = time.perf_counter() - t0
        if gc_mode == "freeze":
            gc.enable()
            gc.unfreeze()
        trl_mod.gc = real_gc_module
        trl_mod.batch_generation = real_batch_generation
        hook.remove()
    model = trainer.model
    checks = {
        "optimizer": type(inner_opt).__name__,
        "optimizer_fused": bool(inner_opt.param_groups[0].get("fused")),
        "optimizer_foreach": inner_opt.param_groups[0].get("foreach"),
        "lr_scheduler": type(trainer.lr_scheduler).__name__,
        "lrs_logged": sorted({h["lr"] for h in trainer.state.log_history if "lr" in h}),
        "mixed_precision": str(trainer.accelerator.mixed_precision),
        "param_dtypes": sorted(
            {
                str(p.dtype)
                for m in (model, trainer.ref_model, trainer.reward_model)
                for p in m.parameters()
            }
        ),
        "gradient_checkpointing": bool(trainer.policy_model.is_gradient_checkpointing),
        "dropout_p": dropout_ps(model, trainer.ref_model, trainer.reward_model),
        "stop_token_id": trainer.stop_token_id,
        "attn_implementation": trainer.policy_model.config._attn_implementation,
        "torch_threads": torch.get_num_threads(),
    }
    return {
        "stamps": stamps,
        "shapes": shapes,
        "queries": queries_seen,
        "optimizer_steps": opt_steps[0],
        "train_s": train_s,
        "gc_timer": gc_timer,
        "gc_collect_s": timed_gc.seconds,
        "gc_collect_calls": timed_gc.calls,
        "config_check": checks,
    }


# -- ours -----------------------------------------------------------------------------------------
def our_settings(
    setup: Setup, iterations: int, precision: str = "fp32", compile_generation: bool = False
) -> PPOConfig:
    B = setup.batch
    return PPOConfig(
        iterations=iterations,
        batch_size=B,
        generation_batch_size=B,
        mini_batch_size=B,
        micro_batch_size=B,
        ppo_epochs=setup.ppo_epochs,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        max_new_tokens=setup.new_tokens,
        stop_at_eos=False,
        temperature=1.0,
        top_p=1.0,
        lr=LR,
        value_lr=None,
        weight_decay=0.0,
        beta=0.05,
        kl_estimator="k1",
        adaptive_kl=False,
        kl_hard_limit=None,
        gamma=1.0,
        lam=0.95,
        cliprange=0.2,
        cliprange_value=0.2,
        vf_coef=0.1,
        entropy_coef=0.0,
        max_grad_norm=1e9,
        whiten_advantages=True,
        normalise_reward=False,
        reward_clip=None,
        missing_eos_penalty=None,
        checkpoint_every=10**9,
        sample_every=10**9,
        mixed_precision="bf16" if precision == "bf16" else "no",
        compile_generation=compile_generation,
    )


def make_ours(
    policy_t,
    reward_t,
    tok,
    prompts: list[str],
    setup: Setup,
    iterations: int,
    seed: int,
    on_log=None,
    precision: str = "fp32",
    compile_generation: bool = False,
):
    torch.manual_seed(seed)
    policy, ref = copy.deepcopy(policy_t), copy.deepcopy(policy_t)
    reward = copy.deepcopy(reward_t)
    value = value_from_reward_model(copy.deepcopy(reward_t))
    rm = RewardModel(reward, tok, kind="causal", max_length=N_POSITIONS, normalisation=None)
    trainer = PPOTrainer(
        policy,
        tok,
        rm,
        prompts,
        our_settings(setup, iterations, precision, compile_generation),
        seed=seed,
        reference=ref,
        value_model=value,
        on_log=on_log,
        progress=False,
    )
    if not trainer.rm_reads_policy_tokens:
        raise SystemExit(
            "our reward model would decode and re-tokenise (rm_reads_policy_tokens is False)"
        )
    return trainer


@contextlib.contextmanager
def recording_sample(shapes: list, queries_seen: list):
    real = ours_mod.sample

    def wrapper(model, queries, *a, **kw):
        batch, logprobs = real(model, queries, *a, **kw)
        queries_seen.append(queries.detach().clone())
        shapes.append((int(queries.size(0)), int(queries.size(1)), int(batch.responses.size(1))))
        return batch, logprobs

    ours_mod.sample = wrapper
    try:
        yield
    finally:
        ours_mod.sample = real


def run_ours(trainer: PPOTrainer) -> dict:
    stamps: list[tuple[float, float]] = []
    trainer.on_log = lambda it, m: stamps.append(stamp())
    shapes, queries_seen = [], []
    steps = {"policy": 0, "value": 0}
    hooks = [
        trainer.policy_opt.register_step_post_hook(
            lambda *a, **k: steps.__setitem__("policy", steps["policy"] + 1)
        ),
        trainer.value_opt.register_step_post_hook(
            lambda *a, **k: steps.__setitem__("value", steps["value"] + 1)
        ),
    ]
    gc.collect()
    try:
        with recording_sample(shapes, queries_seen), GCTimer() as gc_timer:
            t0 = time.perf_counter()
            stamps.append(stamp())
            result = trainer.train(resume=False)
            train_s = time.perf_counter() - t0
    finally:
        for h in hooks:
            h.remove()
    models = (trainer.policy, trainer.reference, trainer.value, trainer.rm.model)
    checks = {
        "optimizer": type(trainer.policy_opt).__name__,
        "optimizer_fused": bool(trainer.policy_opt.param_groups[0].get("fused")),
        "optimizer_foreach": trainer.policy_opt.param_groups[0].get("foreach"),
        "param_dtypes": sorted({str(p.dtype) for m in models for p in m.parameters()}),
        "gradient_checkpointing": bool(trainer.policy.is_gradient_checkpointing),
        "dropout_p": dropout_ps(*models),
        "eval_mode": not any(m.training for m in models),
        "stop_at_eos": trainer.s.stop_at_eos,
        "max_grad_norm": trainer.s.max_grad_norm,
        "rm_reads_policy_tokens": trainer.rm_reads_policy_tokens,
        "attn_implementation": trainer.policy.config._attn_implementation,
        "torch_threads": torch.get_num_threads(),
        "fused_activations": trainer.s.fuse_activations,
        "compiled_decoding": trainer.compiled is not None and trainer.compiled.failure is None,
        "compile_failure": trainer.compiled.failure if trainer.compiled is not None else None,
    }
    if steps["policy"] != steps["value"]:
        raise SystemExit(f"ours: policy and value optimiser steps differ: {steps}")
    return {
        "stamps": stamps,
        "shapes": shapes,
        "queries": queries_seen,
        "optimizer_steps": steps["policy"],
        "train_s": train_s,
        "gc_timer": gc_timer,
        "history": result.history,
        "config_check": checks,
    }


def profile_ours(policy_t, reward_t, tok, prompts, setup: Setup, args, top: int = 20) -> dict:
    """cProfile over --profile-iterations of our iterations, after --warmup unprofiled ones."""
    warm = max(1, args.warmup)
    trainer = make_ours(
        policy_t, reward_t, tok, prompts, setup, warm, args.seed, precision=args.precision
    )
    trainer.train(resume=False)
    trainer.s.iterations = warm + args.profile_iterations
    prof = cProfile.Profile()
    gc.collect()
    t0 = time.perf_counter()
    prof.enable()
    trainer.train(
        resume=False
    )  # continues from iteration `warm` (no checkpoints: resume=False only skips loading)
    prof.disable()
    wall = time.perf_counter() - t0
    stats = pstats.Stats(prof)
    entries = []
    for (file, line, func), (cc, nc, tt, ct, _callers) in stats.stats.items():
        short = file if file.startswith("<") else "/".join(Path(file).parts[-3:])
        entries.append(
            {"function": f"{short}:{line}({func})", "ncalls": nc, "tottime_s": tt, "cumtime_s": ct}
        )
    by_cum = sorted(entries, key=lambda e: e["cumtime_s"], reverse=True)[:top]
    by_own = sorted(entries, key=lambda e: e["tottime_s"], reverse=True)[:top]
    engine = sorted(
        (
            e
            for e in entries
            if e["function"].startswith(("rlhf_core/", "torch/optim/", "nn/utils/clip_grad"))
            or "run_backward" in e["function"]
        ),
        key=lambda e: e["cumtime_s"],
        reverse=True,
    )[:top]
    hist = trainer.history[warm:]
    return {
        "iterations": len(hist),
        "wall_s": wall,
        "top_cumulative": by_cum,
        "top_own_time": by_own,
        "engine": engine,
        "rollout_s": [h["rollout_s"] for h in hist],
        "update_s": [h["update_s"] for h in hist],
    }


# -- driver ---------------------------------------------------------------------------------------
def run_setup(
    setup: Setup, tok, prompts: list[str], prompt_ids: list[list[int]], args, peak: float, tmp: str
) -> dict:
    iterations = args.iterations or setup.iterations
    if iterations <= args.warmup:
        raise SystemExit(f"--iterations ({iterations}) must exceed --warmup ({args.warmup})")
    policy_t, reward_t = build_templates(tok, setup, args.seed)
    pc = param_counts(policy_t, reward_t)

    ours_trainer: PPOTrainer | None = make_ours(
        policy_t, reward_t, tok, prompts, setup, iterations, args.seed, precision=args.precision
    )
    if args.precision == "bf16" and ours_trainer.autocast != torch.bfloat16:
        raise SystemExit("our trainer is not in bf16 autocast")
    if ours_trainer.prompt_ids != prompt_ids:
        raise SystemExit("our trainer tokenised the prompts differently from the ids given to TRL")
    order = [ours_trainer.prompt_indices(it) for it in range(iterations)]

    def run(name: str) -> dict:
        nonlocal ours_trainer
        if name.startswith("trl"):
            mode = "shipped" if name == "trl" else args.trl_gc_frozen
            return run_trl(
                policy_t, reward_t, tok, setup, order, prompt_ids, args, mode, str(Path(tmp) / name)
            )
        if name == "ours" and ours_trainer is not None:
            trainer, ours_trainer = ours_trainer, None
        else:  # ours-compiled: the same engine with ppo.compile_generation (its first iteration pays the compilation)
            trainer = make_ours(
                policy_t,
                reward_t,
                tok,
                prompts,
                setup,
                iterations,
                args.seed,
                precision=args.precision,
                compile_generation=name == "ours-compiled",
            )
        return run_ours(trainer)

    def summarised(name: str, r: dict) -> dict:
        s = summarise(
            r["stamps"], r["shapes"], args.warmup, setup.ppo_epochs, pc, peak, r["gc_timer"]
        )
        s.update(
            train_s=r["train_s"],
            optimizer_steps=r["optimizer_steps"],
            config_check=r["config_check"],
            generated_tokens_per_iteration=sorted({b * resp for b, _, resp in r["shapes"]}),
        )
        if name.startswith("trl"):
            n = s["iterations"]
            s.update(
                gc_collect_calls=r["gc_collect_calls"],
                explicit_gc_collect_s_per_iteration=r["gc_collect_s"] / n,
            )
        else:
            timed = r["history"][args.warmup :]
            s["rollout_s_mean"] = sum(h["rollout_s"] for h in timed) / len(timed)
            s["update_s_mean"] = sum(h["update_s"] for h in timed) / len(timed)
            later = sorted(s["iteration_s"][args.warmup :])
            s["first_iteration_extra_s"] = (
                s["iteration_s"][0] - later[len(later) // 2]
            )  # compilation, for ours-compiled
            s["compiled_decoding"] = r["config_check"]["compiled_decoding"]
        return s

    names = ["trl", "trl-nogc", "ours"] + (["ours-compiled"] if args.compiled else [])
    raws: dict[str, list[dict]] = {n: [] for n in names}
    for rep in range(
        args.repeats
    ):  # interleaved, the order reversed every other round, so drift hits every run alike
        for name in run_order(names, rep):
            r = run(name)
            r["summary"] = summarised(name, r)
            if raws[name]:  # the work check reads the first round's query tensors only
                r.pop("queries", None)
            raws[name].append(r)
    summary, raw = {}, {}
    for (
        name,
        reps,
    ) in (
        raws.items()
    ):  # the median round (by episodes/s) stands for the run; every round's rate is kept
        ranked = sorted(reps, key=lambda r: r["summary"]["episodes_per_s"])
        summary[name] = {
            **ranked[len(ranked) // 2]["summary"],
            "episodes_per_s_rounds": [r["summary"]["episodes_per_s"] for r in reps],
        }
        if name.startswith(
            "ours"
        ):  # later rounds reuse this process's compiled code: the first round paid it
            summary[name]["first_iteration_extra_s"] = max(
                r["summary"]["first_iteration_extra_s"] for r in reps
            )
        raw[name] = reps[0]
    rounds_ratio = {
        n: [
            o["summary"]["episodes_per_s"] / t["summary"]["episodes_per_s"]
            for o, t in zip(raws[n], raws["trl-nogc"])
        ]
        for n in names
        if n.startswith("ours")
    }

    ref_shapes, ref_queries = raw["ours"]["shapes"], raw["ours"]["queries"]
    work = {
        "identical_queries": all(
            len(r["queries"]) == len(ref_queries)
            and all(torch.equal(a, b) for a, b in zip(r["queries"], ref_queries))
            for r in raw.values()
        ),
        "identical_shapes_B_P_R": all(r["shapes"] == ref_shapes for r in raw.values()),
        "shapes_B_P_R": ref_shapes,
        "optimizer_steps": {k: r["optimizer_steps"] for k, r in raw.items()},
        "optimizer_steps_expected": iterations * setup.ppo_epochs,
        "generated_tokens_per_iteration": {
            k: s["generated_tokens_per_iteration"] for k, s in summary.items()
        },
    }
    work["same_work"] = (
        work["identical_queries"]
        and work["identical_shapes_B_P_R"]
        and len(set(work["optimizer_steps"].values())) == 1
        and work["optimizer_steps"]["ours"] == work["optimizer_steps_expected"]
        and all(
            len(v) == 1 and v[0] == setup.batch * setup.new_tokens
            for v in work["generated_tokens_per_iteration"].values()
        )
    )
    ratios, targets = {}, {}
    for name in (k for k in raw if k.startswith("ours")):
        key = name.replace("-", "_")
        eps = summary[name]["episodes_per_s"]
        ratios[f"{key}_over_trl"] = eps / summary["trl"]["episodes_per_s"]
        ratios[f"{key}_over_trl_nogc"] = eps / summary["trl-nogc"]["episodes_per_s"]
        targets[f"{key}_over_trl>=3"] = ratios[f"{key}_over_trl"] >= TARGET_SHIPPED
        targets[f"{key}_over_trl_nogc>=1.3"] = ratios[f"{key}_over_trl_nogc"] >= TARGET_NOGC
        ratios[f"{key}_over_trl_nogc_per_round"] = rounds_ratio[name]
    out = {
        "setup": {**setup.__dict__, "iterations": iterations, "warmup": args.warmup, **pc},
        "work_check": work,
        **summary,
        "ratios": ratios,
        "targets_met": targets,
    }
    if args.profile:
        out["profile_ours"] = profile_ours(policy_t, reward_t, tok, prompts, setup, args)
    return out


def print_setup(res: dict, peak: float, args) -> None:
    st = res["setup"]
    print(
        f"\n== {st['name']}: GPT-2 {st['layers']} layers x {st['width']} (heads {st['heads']}), vocab {st['vocab']}, "
        f"{st['total_params_policy'] / 1e6:.2f}M policy params; batch {st['batch']} prompts, {st['new_tokens']} new tokens, "
        f"{st['ppo_epochs']} PPO epoch(s); {st['iterations']} iterations, first {st['warmup']} untimed"
    )
    w = res["work_check"]
    print(
        f"same work: {w['same_work']} (identical query tensors {w['identical_queries']}, identical (B, P, R) per iteration "
        f"{w['identical_shapes_B_P_R']}, optimiser steps {w['optimizer_steps']} expected {w['optimizer_steps_expected']}, "
        f"generated tokens/iteration {w['generated_tokens_per_iteration']['ours']})"
    )
    header = (
        f"{'':<14}{'episodes/s':>11}{'s/iter':>8}{'timed s':>9}{'GFLOP/it':>10}{'GFLOP/s':>9}{'MFU':>8}"
        f"{'cpu/wall':>10}{'gc s/it':>9}{'rollout s':>11}{'update s':>10}"
    )
    print(header)
    print("-" * len(header))
    runs = [k for k in ("trl", "trl-nogc", "ours", "ours-compiled") if k in res]
    for name in runs:
        s = res[name]
        gcs = f"{s['gc_s_per_iteration']:>9.3f}"
        split = (
            f"{s['rollout_s_mean']:>11.3f}{s['update_s_mean']:>10.3f}"
            if "rollout_s_mean" in s
            else ""
        )
        print(
            f"{name:<14}{s['episodes_per_s']:>11.2f}{s['mean_iteration_s']:>8.3f}{s['timed_s']:>9.2f}"
            f"{s['model_gflop_per_iteration']:>10.2f}{s['achieved_gflops']:>9.2f}{100 * s['mfu']:>7.2f}%"
            f"{s['cpu_per_wall']:>10.2f}{gcs}{split}"
        )
    if len(res["ours"]["episodes_per_s_rounds"]) > 1:
        print(
            "episodes/s per round (the table shows each run's median round): "
            + "; ".join(
                f"{n} {', '.join(f'{x:.2f}' for x in res[n]['episodes_per_s_rounds'])}"
                for n in runs
            )
        )
    r, t = res["ratios"], res["targets_met"]
    for name in (k for k in runs if k.startswith("ours")):
        key = name.replace("-", "_")
        extra = (
            f"; its first iteration took {res[name]['first_iteration_extra_s']:.1f} s longer (compilation)"
            if res[name]["compiled_decoding"]
            else ""
        )
        print(
            f"ratio {name}/trl (as shipped): {r[f'{key}_over_trl']:.2f}x (target >= {TARGET_SHIPPED}: "
            f"{'met' if t[f'{key}_over_trl>=3'] else 'NOT met'}); {name}/trl-nogc ({args.trl_gc_frozen}): "
            f"{r[f'{key}_over_trl_nogc']:.2f}x (target >= {TARGET_NOGC}: "
            f"{'met' if t[f'{key}_over_trl_nogc>=1.3'] else 'NOT met'}){extra}"
        )
    for name in ("trl", *(k for k in runs if k.startswith("ours"))):
        print(f"{name}: " + key_values(res[name]["config_check"]))
    if "profile_ours" in res:
        p = res["profile_ours"]
        print(
            f"\nprofile (cProfile) of our engine, {p['iterations']} iterations after {max(1, args.warmup)} warm-up, "
            f"{p['wall_s']:.2f}s wall; rollout_s {[round(x, 3) for x in p['rollout_s']]}, "
            f"update_s {[round(x, 3) for x in p['update_s']]} (cProfile-inflated; unprofiled means: rollout "
            f"{res['ours']['rollout_s_mean']:.3f}s, update {res['ours']['update_s_mean']:.3f}s)"
        )
        for title, key in (
            ("by cumulative time", "top_cumulative"),
            ("by own time", "top_own_time"),
            (
                "of our engine (rlhf_core, optimiser, clipping, backward) by cumulative time",
                "engine",
            ),
        ):
            print(f"  top {len(p[key])} {title}:   ncalls   tottime   cumtime")
            for e in p[key]:
                print(
                    f"    {e['ncalls']:>10} {e['tottime_s']:>9.3f} {e['cumtime_s']:>9.3f}  {e['function']}"
                )


def main() -> None:
    ap = common.make_parser(__doc__)
    ap.add_argument("--setup", default="both", choices=["tiny", "small", "both"])
    ap.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="PPO iterations per run (default: tiny 12, small 6)",
    )
    ap.add_argument(
        "--warmup", type=int, default=2, help="first iterations excluded from timing (all runs)"
    )
    ap.add_argument(
        "--trl-gc-frozen",
        default="freeze",
        choices=["freeze", "noop"],
        help="freeze: gc.collect+gc.freeze+gc.disable before TRL's train(); noop: TRL's gc.collect() calls do nothing",
    )
    ap.add_argument(
        "--trl-optim",
        default="adamw_torch",
        choices=["adamw_torch", "adamw_torch_fused"],
        help="TRL's optimiser (adamw_torch = ours: torch.optim.AdamW, not fused; TRL's default is fused)",
    )
    ap.add_argument("--profile", action="store_true", help="also cProfile a few of our iterations")
    ap.add_argument("--profile-iterations", type=int, default=3)
    ap.add_argument(
        "--precision",
        default="fp32",
        choices=["fp32", "bf16"],
        help="bf16: autocast on both sides (CPU bf16 units)",
    )
    ap.add_argument(
        "--no-compiled",
        dest="compiled",
        action="store_false",
        help="skip the fourth run, ours with ppo.compile_generation (torch.compile'd decode step)",
    )
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds of all runs, interleaved; each run reports its median round (a 2-core VM drifts by ~10%%)",
    )
    add_common_args(ap, seed=True, threads=True)
    args = ap.parse_args()
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")

    load_start = prepare_run(args)
    versions = lib_versions()
    peak_dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak = measure_peak(dtype=peak_dtype)

    rows = generate_demo_pairs(N_PROMPTS, seed=0)
    prompts = [r["prompt"] for r in rows]
    tok = train_tokenizer(
        prompts + [r["chosen"] for r in rows] + [r["rejected"] for r in rows], VOCAB
    )
    tok.model_max_length = N_POSITIONS
    if (
        tok.pad_token_id is None
        or tok.pad_token_id == tok.eos_token_id
        or tok.padding_side != "left"
    ):
        raise SystemExit("need a separate pad token and left padding")
    fmt = ChatFormat(tok)
    prompt_ids = [fmt.encode(p)[0][-MAX_PROMPT_TOKENS:] for p in prompts]

    names = ["tiny", "small"] if args.setup == "both" else [args.setup]
    results = {}
    with tempfile.TemporaryDirectory(prefix="ppo-vs-trl-") as tmp:
        for name in names:
            results[name] = run_setup(
                SETUPS[name], tok, prompts, prompt_ids, args, peak["peak_gflops"], tmp
            )
    peak_end = measure_peak(reps=2, dtype=peak_dtype)

    # TRL as shipped is left out: its gc.collect() runs on one thread, so its CPU/wall is low on an
    # idle machine too
    min_cpu = min(
        res[k]["cpu_per_wall"]
        for res in results.values()
        for k in ("trl-nogc", "ours", "ours-compiled")
        if k in res
    )
    machine = {
        **machine_state(load_start, min_cpu),
        **peak,
        "peak_gflops_end": peak_end["peak_gflops"],
        "tokenizer_vocab": len(tok),
        "prompt_tokens": {
            "max_prompt_tokens": MAX_PROMPT_TOKENS,
            "mean": sum(map(len, prompt_ids)) / len(prompt_ids),
            "max": max(map(len, prompt_ids)),
        },
        "precision": args.precision,
        "trl_gc_frozen": args.trl_gc_frozen,
        "trl_optim": args.trl_optim,
        "lr": LR,
        "versions": versions,
    }
    threads = machine["torch_threads"]
    if args.json:
        for res in results.values():
            for k in (k for k in ("trl", "trl-nogc", "ours", "ours-compiled") if k in res):
                res[k]["iteration_s"] = [round(x, 4) for x in res[k]["iteration_s"]]
        print_json({"machine": machine, **results})
        return
    print(
        f"PPO throughput, ours vs TRL {versions['trl']} experimental PPOTrainer; "
        f"{args.precision} CPU, {threads} threads, "
        f"torch {versions['torch']}, transformers {versions['transformers']}"
    )
    print(
        f"{args.precision} matmul peak: {peak['peak_gflops']:.1f} GFLOP/s (mm1024 {peak['mm1024_gflops']:.1f}, "
        f"mm2048 {peak['mm2048_gflops']:.1f}; {peak_end['peak_gflops']:.1f} at the end); "
        f"trl-nogc = {args.trl_gc_frozen}; TRL optim {args.trl_optim}; timing excludes the first {args.warmup} iterations"
    )
    for res in results.values():
        print_setup(res, peak["peak_gflops"], args)
    warn_if_busy(machine, what="ratios", lead="\n")


if __name__ == "__main__":
    main()
