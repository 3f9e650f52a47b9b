"""GRPO and RLOO throughput: our engine (rlhf_core.ppo) against TRL's GRPOTrainer and RLOOTrainer, side by side in one process.

    python benchmarks/grpo_vs_trl.py [--method both|grpo|rloo] [--mode both|same|user] [--model scratch|smollm2]
                                     [--preset tiny|small] [--arch gpt2|llama] [--steps 10] [--warmup-steps 2]
                                     [--episodes 16] [--k 4] [--max-new-tokens 48] [--repeat 1] [--threads N] [--json]
           identical batches only: [--micro-batch 8] [--ppo-epochs 2] [--lr 1e-4] [--beta B] [--loss-type dapo|grpo]
                                   [--loss-tol 1e-5] [--prompt-tokens N];  as a user runs it: [--no-trl-beta-row]

For each method (--method both, the default, runs GRPO against trl.GRPOTrainer, then RLOO against trl.RLOOTrainer) two
modes (--mode both, the default, runs both). Throughput is reported in episodes per second (episode = one sampled answer
to one prompt; a step = one rollout of --episodes episodes: --episodes / --k prompts, --k answers each) and as ratios
ours / TRL.

Same for every run: one model folder (--model scratch: build_scratch_model(texts, dir, --preset, --arch, seed) trained on
generate_demo_pairs(512, seed=0) texts, GPT-2 dropout 0 / Llama attention dropout 0; --model smollm2: the packaged
SmolLM2-135M-Instruct, resolved by rlhf_core.models.loading as `model.name_or_path: smollm2` is, no download), loaded
fresh (fp32, CPU) for each trainer; one reward model folder: build_reward_model(<the policy folder>) (the policy's
backbone with a seeded random scalar head, kind "causal", same tokenizer, no normalisation statistics, scoring in fp32),
loaded for each run with load_reward_model and GPT-2's GELU fused as our trainer does to its own reward model. Our side
is built by rlhf_core.ppo.build.build_ppo_trainer (the pipeline's own builder: policy, reference copy, reward model);
TRL gets `reward_funcs=` a callable that scores with that same reward model exactly as our trainer scores (prompt ids +
the completion's ids through EOS -> RewardModel.encode_ids -> score_encoded -> normalise if normalise_reward; with no
statistics normalise is the identity on both sides). Prompts: the demo prompts, in our trainer's order
(PPOTrainer.prompt_indices); TRL gets them as text in our ChatFormat (conversational messages when the tokenizer has a
chat template), with a `prompt_index` column the reward callable reads, laid out in that order with shuffle_dataset=False.

  "identical batches" (--mode same): the same weights, rollouts and reward, and the update of each side timed.
  * every iteration OUR engine produces the rollout (PPOTrainer.step: sampling, reference log-probs, scores,
    advantages); its update() is wrapped so that the very tensors it receives (prompt/response ids and masks, old
    log-probs from the sampling pass, reference log-probs, advantages) are also fed to TRL's loss. TRL side: a
    GRPOTrainer / RLOOTrainer on its own copy of the same initial weights, whose optimiser and scheduler come from its
    create_optimizer_and_scheduler; for each optimiser step it runs its own training_step (GRPOTrainer/RLOOTrainer
    .training_step -> transformers Trainer.training_step: model.train(), compute_loss -> _compute_loss, the GA scaling,
    accelerator.backward) once per micro-batch with _prepare_inputs replaced by the identity (it would generate),
    then what transformers' inner loop does at a step boundary: _clip_grad_norm (1.0), optimizer.step(),
    lr_scheduler.step(), model.zero_grad(). The micro-batches are ours: the same per-epoch permutations (drawn
    ahead through our trainer's own _order() from its shuffle generator, whose state is then put back, so that
    update() draws the very same ones: checked, "same micro-batches"), --micro-batch rows each, one optimiser step
    per epoch over the whole rollout (mini-batch = --episodes, like TRL's default of one optimiser step per
    generation), --ppo-epochs epochs (TRL num_iterations).
  * inputs TRL gets: prompt_ids/prompt_mask (no padding: every prompt is cut to its last --prompt-tokens tokens, by
    default the shortest prompt's length, because TRL's loss forward passes no position_ids: with left-padded prompts it
    would score tokens at positions shifted by the padding, unlike its own generate() and our engine, and the check below
    would measure that instead of the loss), completion_ids/completion_mask (ours, right-padded after EOS),
    advantages (ours, one per answer), GRPO: old_per_token_logps, ref_per_token_logps, num_items_in_batch (the rollout's
    response tokens, TRL's definition); RLOO: old_logps (ours summed over the answer's tokens).
  * settings, both: fp32 (ours mixed_precision "no", TRL bf16=False), lr --lr constant (TRL lr_scheduler_type
    "constant"), torch AdamW non-fused (TRL optim "adamw_torch"), weight decay 0, clip 1.0, cliprange = epsilon 0.2,
    temperature 1, top_p 1, stop at EOS, no activation checkpointing, no entropy bonus. GRPO: beta --beta (default ours
    0.04) k3 in the loss, loss_type --loss-type (dapo), scale_rewards group, TRL use_bias_correction_kl=False (TRL's
    default True multiplies the KL term by the ratio, which changes its gradient; ours has no such weight). RLOO: beta
    --beta (default ours 0.05), k1 KL summed into the reward on both sides, no advantage whitening (ours
    whiten_advantages=False, TRL normalize_advantages=False, its default). Ours also: kl_hard_limit off (a benchmark
    must not stop midway), no judged checks, checkpoints or samples.
  * loss check: the loss each side backpropagates at each optimiser step (ours: recorded through
    grpo_token_loss/policy_loss and aggregated as update() does; TRL: the sum of its training_step returns) and the
    max |diff| over all steps. GRPO: the objectives are the same, so they must agree to float rounding (<= --loss-tol:
    "agree" / "DIFFER"); one difference is left in: ours swaps GPT-2's tanh GELU for PyTorch's fused kernel (relative
    differences ~1e-7). RLOO: the objectives differ by design (TRL: one importance ratio per answer, exp of the summed
    log-prob change, clipped per answer, loss = mean over answers; ours: PPO's per-token ratio and clip, loss = each
    micro-batch's mean over its tokens, weighted by its share of the step's answers), so the losses are listed but not
    expected to agree ("different objectives"; at the very first step, ratio 1, they coincide when all answers have the
    same length). Also reported: the largest weight difference between the two policies at the end.
  * timed windows: "update" = ours: the update() call (its micro-batch selects, forwards, backwards, clip, AdamW steps);
    TRL: the training_step calls + clip + optimizer/scheduler steps + zero_grad (the micro-batch dicts are built
    before the window: in a real run TRL's _prepare_inputs slices its buffer). Episodes/s (update) = episodes x timed
    iterations / the summed windows. "generation" = ours: rlhf_core.ppo.rollout.sample inside the rollout (KV-cached
    sampling, the sampled tokens' log-probs included); TRL: _generate_single_turn on the same prompt ids (left pad,
    model.generate with TRL's GenerationConfig, EOS mask, ids to lists), run on TRL's model at the same weights right
    before (odd rounds) or after (even rounds) our rollout; tokens differ (each side samples with its own RNG), so
    generation is compared in generated (non-pad) tokens per second. Reference log-probs, scoring and advantages are
    in neither window. Odd --repeat rounds run TRL's update before ours within every iteration.

  "as a user runs it" (--mode user): each trainer's own train() on its own defaults.
  * the harness sets on both: the model, prompts (same ids per step, checked), reward, number of steps (--steps),
    episodes per step (--episodes; TRL per_device_train_batch_size = --episodes, so one generation of --episodes
    completions per optimiser step), answers per prompt (--k: TRL num_generations), max new tokens (--max-new-tokens:
    TRL max_completion_length), seed. TRL also: use_cpu, shuffle_dataset=False (our prompt order), a log line every
    step (logging_steps=1), no saving, evaluation, reporting or progress bars. Ours also: no judged checks
    (eval_every None), checkpoints or sample tables, no progress bar; mini/micro batch capped at --episodes if smaller.
  * everything else at each side's defaults; the output lists them. Ours: GRPOConfig()/RLOOConfig(): lr 3e-5 constant,
    2 PPO epochs over each rollout (2 optimiser steps per step at 16 episodes), micro-batches of 8, bf16 autocast where the
    CPU has bf16 units ("auto"), sampling log-probs reused as old log-probs (fp32) or one policy forward (bf16), a
    reference forward every step (beta > 0). TRL: learning_rate 1e-6 linear, num_iterations 1 (one optimiser step per
    generation, no old-log-prob forward in GRPO; RLOO always runs one), bf16 autocast, activation checkpointing on,
    fused AdamW, GRPO beta 0.0 (no reference model at all: less work per step than ours at 0.04), RLOO beta 0.05 (a
    reference forward every step). GRPO also gets a third run, "trl-beta", TRL's defaults with beta = ours (0.04; its
    use_bias_correction_kl default kept); --no-trl-beta-row skips it.
  * timed window: the end of step --warmup-steps to the end of the last step (ours: on_log after every iteration; TRL:
    on_step_end); everything inside: generation, reference and old-log-prob forwards, reward, advantages, updates,
    logging. Episodes/s = episodes x timed steps / window. Model loading and trainer construction are excluded.
  * TRL behaviour seen here that changes results but not the work: its loss forward passes no position_ids, so with
    left-padded prompts of different lengths its training log-probs are computed at shifted positions (its sampling
    used the right ones); ours counts positions from the first real token everywhere.

--repeat N runs every mode N times, interleaved (the run order reversed every other round); the tables show each run's
median round (identical batches: the round with the median update ratio), the user-mode ratio is the median of the
per-round ratios (ours and TRL of the same round), and every round's ratio is listed. "cpu/wall" well under the thread count means other processes took the
cores: on 2 cores a busy neighbour slows a 2-thread torch run several-fold; a warning is printed then. --threads 1 is
far less sensitive to that.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import statistics
import sys
import tempfile
from pathlib import Path

import common  # first: puts the repository root on sys.path
from common import (
    add_common_args,
    drop_printer,
    dropout_ps,
    key_values,
    lib_versions,
    machine_state,
    prepare_run,
    print_json,
    print_table,
    run_order,
    stamp,
    timed_window,
    timing_callback,
    trl_config_check,
    warn_if_busy,
)

common.env_defaults(
    TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1", HF_HUB_OFFLINE="1"
)

import torch  # noqa: E402

import rlhf_core.ppo.trainer as ours_mod  # noqa: E402
from rlhf_core.config import GRPOConfig, ModelConfig, RewardConfig, RLOOConfig  # noqa: E402
from rlhf_core.data.demo import generate_demo_pairs  # noqa: E402
from rlhf_core.models.chat import ChatFormat  # noqa: E402
from rlhf_core.models.fused import fuse_activations  # noqa: E402
from rlhf_core.models.loading import load_causal_lm, load_tokenizer  # noqa: E402
from rlhf_core.models.scratch import build_scratch_model  # noqa: E402
from rlhf_core.ppo.build import build_ppo_trainer  # noqa: E402
from rlhf_core.reward.model import build_reward_model, load_reward_model  # noqa: E402
from rlhf_core.training import autocast_dtype  # noqa: E402

MODES = {"same": "identical batches", "user": "as a user runs it"}
METHODS = {"grpo": "GRPO", "rloo": "RLOO"}
OUR_CONFIG = {"grpo": GRPOConfig, "rloo": RLOOConfig}
TOKENIZER_TEXTS = 512  # demo pairs the scratch tokenizer is trained on
REWARD_MAX_LENGTH = 256
FINAL_WINDOW = 3  # "last reward" = mean over the last 3 steps


# -- shared setup ---------------------------------------------------------------------------------
def trl_classes(method: str):
    from trl import GRPOConfig as TRLGRPOConfig
    from trl import GRPOTrainer, RLOOTrainer
    from trl import RLOOConfig as TRLRLOOConfig

    return (TRLGRPOConfig, GRPOTrainer) if method == "grpo" else (TRLRLOOConfig, RLOOTrainer)


def beta_for(method: str, args) -> float:
    return args.beta if args.beta is not None else OUR_CONFIG[method]().beta


def check_token_scoring(trainer) -> None:
    if not trainer.rm_reads_policy_tokens:  # TRL's callable scores token ids: ours must too
        raise SystemExit(
            "our reward model would decode and re-tokenise (rm_reads_policy_tokens False)"
        )


def load_rm(reward_dir: str):
    """The reward model as our trainer holds its own: eval mode, frozen, GELU fused (PPOTrainer.__init__)."""
    rm = load_reward_model(reward_dir, device="cpu")
    rm.model.eval()
    fuse_activations(rm.model)
    rm.model.requires_grad_(False)
    return rm


def reward_callable(rm, prompt_ids: list[list[int]], normalise: bool):
    """TRL's reward_funcs: scores (prompt ids, completion ids through EOS) as PPOTrainer.score does."""

    def our_reward_model(prompts, completions, completion_ids, prompt_index, **kw):
        items = [rm.encode_ids(prompt_ids[i], ids) for i, ids in zip(prompt_index, completion_ids)]
        raw = rm.score_encoded(items, batch_size=len(items))
        scores = rm.normalise(raw) if normalise else raw
        return [float(x) for x in scores]

    return our_reward_model


def trl_dataset(fmt: ChatFormat, prompts: list[str], rows: list[int]):
    """Our prompts as a TRL user passes them (messages when there is a chat template, else our plain format),
    one row per prompt in our order."""
    from datasets import Dataset

    def as_prompt(p: str):
        return [{"role": "user", "content": p}] if fmt.has_template else fmt.prompt_text(p)

    return Dataset.from_dict(
        {"prompt": [as_prompt(prompts[i]) for i in rows], "prompt_index": list(rows)}
    )


def prompt_rows(trainer, steps: int) -> list[int]:
    """The prompt of each group, step after step, as our trainer draws them (every k-th entry)."""
    k = trainer.s.samples_per_prompt
    return [i for it in range(steps) for i in trainer.prompt_indices(it)[::k]]


@contextlib.contextmanager
def patched(module, name: str, wrapper):
    real = getattr(module, name)
    setattr(module, name, wrapper(real))
    try:
        yield
    finally:
        setattr(module, name, real)


def timed_sample(records: list):
    """Wraps rlhf_core.ppo.trainer.sample: (wall, cpu, generated tokens, decode width, queries) per call."""

    def wrap(real):
        def sample(model, queries, *a, **kw):
            t0 = stamp()
            batch, logprobs = real(model, queries, *a, **kw)
            t1 = stamp()
            records.append(
                {
                    "wall": t1[0] - t0[0],
                    "cpu": t1[1] - t0[1],
                    "tokens": int(batch.mask.sum()),
                    "width": int(batch.responses.size(1)),
                    "queries": queries,
                    "query_mask": batch.query_mask,
                }
            )
            return batch, logprobs

        return sample

    return wrap


def median_round(rounds: list[dict], key: str) -> dict:
    ranked = sorted(rounds, key=lambda r: r[key])
    return ranked[len(ranked) // 2]


def ratio(a: float, b: float) -> float:
    return a / b if b else math.nan


# -- identical batches ----------------------------------------------------------------------------
def our_same_config(method: str, args, prompt_tokens: int):
    common_kw = dict(
        iterations=args.steps,
        batch_size=args.episodes,
        generation_batch_size=args.episodes,
        mini_batch_size=args.episodes,
        micro_batch_size=args.micro_batch,
        ppo_epochs=args.ppo_epochs,
        samples_per_prompt=args.k,
        max_prompt_tokens=prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        stop_at_eos=True,
        temperature=1.0,
        top_p=1.0,
        lr=args.lr,
        weight_decay=0.0,
        cliprange=0.2,
        entropy_coef=0.0,
        max_grad_norm=1.0,
        reward_clip=None,
        missing_eos_penalty=None,
        mixed_precision="no",
        kl_hard_limit=None,
        eval_every=None,
        checkpoint_every=10**9,
        sample_every=10**9,
        beta=beta_for(method, args),
    )
    if method == "grpo":
        return GRPOConfig(**common_kw, scale_rewards="group", loss_type=args.loss_type)
    return RLOOConfig(**common_kw, kl_estimator="k1", adaptive_kl=False, whiten_advantages=False)


def trl_same_config(method: str, cfg, args, out_dir: str):
    config_cls, _ = trl_classes(method)
    kw = dict(
        output_dir=out_dir,
        max_steps=args.steps * cfg.ppo_epochs,
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=cfg.batch_size // cfg.micro_batch_size,
        num_generations=cfg.samples_per_prompt,
        max_completion_length=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        beta=cfg.beta,
        epsilon=cfg.cliprange,
        num_iterations=cfg.ppo_epochs,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=cfg.max_grad_norm,
        optim="adamw_torch",
        bf16=False,
        fp16=False,
        activation_checkpointing=False,
        use_cpu=True,
        shuffle_dataset=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=args.seed,
    )
    if method == "grpo":
        kw.update(
            loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards, use_bias_correction_kl=False
        )
    else:
        kw.update(normalize_advantages=False)
    return config_cls(**kw)


def loss_recorder(method: str, records: list):
    """Wraps grpo_token_loss / policy_loss inside our trainer: keeps (per-token loss, mask) / (loss, rows) of every
    micro-batch (detached references; aggregated after the timed window)."""

    def wrap(real):
        if method == "grpo":

            def grpo_token_loss(logprobs, old, ref, adv, mask, *a, **kw):
                per_token, stats = real(logprobs, old, ref, adv, mask, *a, **kw)
                records.append((per_token.detach(), mask))
                return per_token, stats

            return grpo_token_loss

        def policy_loss(logprobs, old, adv, mask, *a, **kw):
            loss, stats = real(logprobs, old, adv, mask, *a, **kw)
            records.append((loss.detach(), mask.size(0)))
            return loss, stats

        return policy_loss

    return wrap


def our_step_losses(method: str, cfg, records: list) -> list[float]:
    """The loss update() backpropagates at each optimiser step (one step = mini_batch_size / micro_batch_size
    micro-batches), from the recorded micro-batch terms."""
    per_step = cfg.mini_batch_size // cfg.micro_batch_size
    out = []
    for start in range(0, len(records), per_step):
        chunk = records[start : start + per_step]
        if method == "rloo":  # pg * share, share = rows / mini-batch rows
            out.append(float(sum(loss * rows for loss, rows in chunk) / cfg.mini_batch_size))
        elif cfg.loss_type == "dapo":
            tokens = sum(int(m.sum()) for _, m in chunk)
            out.append(float(sum(p.sum() for p, _ in chunk) / max(1, tokens)))
        else:
            seqs = sum((p.sum(1) / m.sum(1).clamp(min=1)).sum() for p, m in chunk)
            out.append(float(seqs / cfg.mini_batch_size))
    return out


def epoch_orders(trainer, epochs: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The permutations update() is about to draw (one per epoch), drawn ahead through the trainer's own
    _order() from its shuffle generator, whose state is then put back; also the state update() must leave."""
    gen = trainer.shuffle_gen
    state = gen.get_state()
    draw = getattr(trainer, "_order", None) or (
        lambda: torch.randperm(trainer.s.batch_size, generator=gen)
    )
    orders = [draw() for _ in range(epochs)]
    after = gen.get_state()
    gen.set_state(state)
    return orders, after


def trl_step_inputs(method: str, cfg, batch, old_logprobs, advantages, ref_logprobs, orders):
    """TRL's micro-batch dicts for every optimiser step of this update, in our order (our per-epoch
    permutations, split into mini- and micro-batches as update() splits them)."""
    mask = batch.mask
    seq_adv = advantages[:, 0]  # one advantage per answer (every answer has a first token)
    full = {
        "prompt_ids": batch.queries,
        "prompt_mask": batch.query_mask.long(),
        "completion_ids": batch.responses,
        "completion_mask": mask.long(),
        "advantages": seq_adv,
    }
    if method == "grpo":
        full["old_per_token_logps"] = old_logprobs
        full["ref_per_token_logps"] = ref_logprobs
    else:
        full["old_logps"] = (old_logprobs * mask).sum(1)
    n_tokens = mask.sum()
    steps = []
    for order in orders:
        for mb_start in range(0, cfg.batch_size, cfg.mini_batch_size):
            mini = order[mb_start : mb_start + cfg.mini_batch_size]
            micro = []
            for mc_start in range(0, len(mini), cfg.micro_batch_size):
                idx = mini[mc_start : mc_start + cfg.micro_batch_size]
                inputs = {k: v[idx] for k, v in full.items()}
                if method == "grpo":
                    inputs["num_items_in_batch"] = n_tokens
                micro.append(inputs)
            steps.append(micro)
    return steps


def trl_update(trl, steps: list[list[dict]]) -> list[torch.Tensor]:
    """What transformers' inner training loop does for these optimiser steps, minus data loading."""
    model, losses = trl.model, []
    for micro in steps:
        trl.current_gradient_accumulation_steps = len(micro)
        step_loss = 0.0
        for inputs in micro:
            step_loss = step_loss + trl.training_step(model, inputs, None)
        trl._clip_grad_norm(model)
        trl.optimizer.step()
        trl.lr_scheduler.step()
        model.zero_grad()
        trl.state.global_step += 1
        losses.append(step_loss)
    return losses


def trl_generate(trl, prompt_ids: list[list[int]]) -> dict:
    t0 = stamp()
    out = trl._generate_single_turn(prompt_ids, None, {})
    t1 = stamp()
    completions = out[0] if isinstance(out, tuple) else out  # GRPO: (ids, logprobs); RLOO: ids
    return {
        "wall": t1[0] - t0[0],
        "cpu": t1[1] - t0[1],
        "tokens": sum(len(c) for c in completions),
        "width": max(len(c) for c in completions),
    }


def run_same(method: str, dirs: dict, prompts: list[str], args, out_dir: str, rep: int) -> dict:
    cfg = our_same_config(method, args, dirs["prompt_tokens"])
    trainer = build_ppo_trainer(
        dirs["model"], dirs["reward"], prompts, cfg, ModelConfig(), seed=args.seed, progress=False
    )
    check_token_scoring(trainer)
    fmt = ChatFormat(trainer.tokenizer)
    rm = load_rm(dirs["reward"])
    _, trainer_cls = trl_classes(method)
    torch.manual_seed(args.seed)
    loaded = load_causal_lm(dirs["model"], dtype="fp32", device="cpu", eval_mode=False)
    with contextlib.redirect_stdout(sys.stderr):
        trl = trainer_cls(
            model=loaded.model,
            reward_funcs=reward_callable(rm, trainer.prompt_ids, cfg.normalise_reward),
            args=trl_same_config(method, cfg, args, out_dir),
            train_dataset=trl_dataset(fmt, prompts, prompt_rows(trainer, args.steps)),
            processing_class=loaded.tokenizer,
        )
    drop_printer(trl)
    trl.create_optimizer_and_scheduler(num_training_steps=args.steps * cfg.ppo_epochs)
    # the batch is given: training_step must not generate
    trl._prepare_inputs = lambda inputs: inputs
    trl_first = rep % 2 == 1

    its: list[dict] = []
    current: dict = {}
    samples: list[dict] = []
    records: list = []
    real_update = trainer.update

    def update(batch, old_logprobs, old_values, advantages, returns, ref_logprobs, *rest, **kw):
        orders, after = epoch_orders(trainer, cfg.ppo_epochs)
        steps = trl_step_inputs(method, cfg, batch, old_logprobs, advantages, ref_logprobs, orders)
        out = {}

        def ours():
            records.clear()
            t0 = stamp()
            out["stats"] = real_update(
                batch, old_logprobs, old_values, advantages, returns, ref_logprobs, *rest, **kw
            )
            t1 = stamp()
            current["same_order"] = torch.equal(trainer.shuffle_gen.get_state(), after)
            current["ours_update"] = (t1[0] - t0[0], t1[1] - t0[1])
            current["ours_losses"] = our_step_losses(method, cfg, records)

        def theirs():
            t0 = stamp()
            losses = trl_update(trl, steps)
            t1 = stamp()
            current["trl_update"] = (t1[0] - t0[0], t1[1] - t0[1])
            current["trl_losses"] = [float(x) for x in losses]

        for fn in (theirs, ours) if trl_first else (ours, theirs):
            fn()
        current["prompt_padding"] = not bool(batch.query_mask.all())
        current["response_tokens"] = int(batch.mask.sum())
        return out["stats"]

    trainer.update = update
    loss_fn = "grpo_token_loss" if method == "grpo" else "policy_loss"
    with (
        patched(ours_mod, "sample", timed_sample(samples)),
        patched(ours_mod, loss_fn, loss_recorder(method, records)),
        contextlib.redirect_stdout(sys.stderr),
    ):
        for it in range(args.steps):
            current = {}
            ids = [trainer.prompt_ids[i] for i in trainer.prompt_indices(it)]
            if trl_first:
                current["trl_gen"] = trl_generate(trl, ids)
            samples.clear()
            metrics = trainer.step()
            trainer.iteration += 1
            if not trl_first:
                current["trl_gen"] = trl_generate(trl, ids)
            current["ours_gen"] = {
                "wall": sum(s["wall"] for s in samples),
                "cpu": sum(s["cpu"] for s in samples),
                "tokens": sum(s["tokens"] for s in samples),
                "width": max(s["width"] for s in samples),
            }
            current["score_raw"] = metrics["score_raw"]
            its.append(current)

    with torch.no_grad():
        theirs = dict(trl.model.named_parameters())
        weight_diff = max(
            float((p - theirs[n]).abs().max()) for n, p in trainer.policy.named_parameters()
        )
    return summarise_same(method, cfg, its, args, weight_diff, trainer, trl)


def summarise_same(method: str, cfg, its: list[dict], args, weight_diff: float, trainer, trl):
    W, B = args.warmup_steps, cfg.batch_size
    timed = its[W:]

    def side(who: str) -> dict:
        upd_wall = sum(i[f"{who}_update"][0] for i in timed)
        upd_cpu = sum(i[f"{who}_update"][1] for i in timed)
        gen_wall = sum(i[f"{who}_gen"]["wall"] for i in timed)
        gen_tokens = sum(i[f"{who}_gen"]["tokens"] for i in timed)
        losses = [x for i in its for x in i[f"{who}_losses"]]
        return {
            "update_episodes_per_s": B * len(timed) / upd_wall,
            "update_s_per_step": upd_wall / len(timed),
            "update_cpu_per_wall": upd_cpu / upd_wall,
            "generation_tokens_per_s": gen_tokens / gen_wall,
            "generation_s_per_step": gen_wall / len(timed),
            "generation_cpu_per_wall": sum(i[f"{who}_gen"]["cpu"] for i in timed) / gen_wall,
            "generated_tokens_per_step": gen_tokens / len(timed),
            "decode_steps_per_step": statistics.fmean(i[f"{who}_gen"]["width"] for i in timed),
            "optimizer_steps": len(losses),
            "first_loss": losses[0],
            "final_loss": statistics.fmean(losses[-cfg.ppo_epochs :]),
            "losses": losses,
        }

    ours, theirs = side("ours"), side("trl")
    diffs = [abs(a - b) for a, b in zip(ours.pop("losses"), theirs.pop("losses"))]
    equal_count = ours["optimizer_steps"] == theirs["optimizer_steps"]
    loss_diff = max(diffs) if diffs and equal_count else math.inf
    autocast = autocast_dtype(cfg.mixed_precision, trainer.device)
    return {
        "ours": {
            **ours,
            "rollout_response_tokens_per_step": statistics.fmean(
                i["response_tokens"] for i in timed
            ),
            "score_raw_first": its[0]["score_raw"],
            "score_raw_last": statistics.fmean(i["score_raw"] for i in its[-FINAL_WINDOW:]),
            "autocast": str(autocast).removeprefix("torch.") if autocast else "none (fp32)",
            "dropout_p": dropout_ps(trainer.policy),
        },
        "trl": {
            **theirs,
            "config_check": trl_config_check(trl),
            "dropout_p": dropout_ps(trl.model),
        },
        "ratio_update": ratio(ours["update_episodes_per_s"], theirs["update_episodes_per_s"]),
        "ratio_generation_tokens_per_s": ratio(
            ours["generation_tokens_per_s"], theirs["generation_tokens_per_s"]
        ),
        "loss_max_abs_diff": loss_diff,
        "loss_diff_per_step": diffs,
        "losses_agree": loss_diff <= args.loss_tol if method == "grpo" else None,
        "final_weights_max_abs_diff": weight_diff,
        "prompt_padding": any(i["prompt_padding"] for i in its),
        "same_micro_batches": all(i["same_order"] for i in its),
        "min_cpu_per_wall": min(
            ours["update_cpu_per_wall"],
            theirs["update_cpu_per_wall"],
            ours["generation_cpu_per_wall"],
            theirs["generation_cpu_per_wall"],
        ),
        "settings": {
            "lr": cfg.lr,
            "ppo_epochs": cfg.ppo_epochs,
            "episodes_per_optimizer_step": cfg.mini_batch_size,
            "micro_batch": cfg.micro_batch_size,
            "beta": cfg.beta,
            "cliprange": cfg.cliprange,
            "prompt_tokens": cfg.max_prompt_tokens,
            **(
                {"loss_type": cfg.loss_type, "scale_rewards": cfg.scale_rewards}
                if method == "grpo"
                else {"kl_estimator": cfg.kl_estimator, "whiten_advantages": cfg.whiten_advantages}
            ),
        },
    }


# -- as a user runs it ----------------------------------------------------------------------------
def our_user_config(method: str, args):
    cls = OUR_CONFIG[method]
    d = cls()
    harness = dict(
        iterations=args.steps,
        batch_size=args.episodes,
        samples_per_prompt=args.k,
        max_new_tokens=args.max_new_tokens,
        eval_every=None,
        checkpoint_every=10**9,
        sample_every=10**9,
    )
    # fewer episodes than (or not a multiple of) the default mini-batch
    if args.episodes % d.mini_batch_size:
        mini = min(d.mini_batch_size, args.episodes)
        harness.update(mini_batch_size=mini, micro_batch_size=min(d.micro_batch_size, mini))
    return cls(**harness)


def our_defaults_kept(method: str, cfg, device) -> dict:
    autocast = autocast_dtype(cfg.mixed_precision, device)
    out = {
        "lr": cfg.lr,
        "schedule": "constant",
        "ppo_epochs": cfg.ppo_epochs,
        "mini_batch_size": cfg.mini_batch_size,
        "micro_batch_size": cfg.micro_batch_size,
        "generation_batch_size": cfg.generation_batch_size,
        "beta": cfg.beta,
        "cliprange": cfg.cliprange,
        "max_grad_norm": cfg.max_grad_norm,
        "weight_decay": cfg.weight_decay,
        "temperature": cfg.temperature,
        "top_p": cfg.top_p,
        "stop_at_eos": cfg.stop_at_eos,
        "max_prompt_tokens": cfg.max_prompt_tokens,
        "normalise_reward": cfg.normalise_reward,
        "mixed_precision": cfg.mixed_precision,
        "autocast": str(autocast).removeprefix("torch.") if autocast else "none (fp32)",
        "fuse_activations": cfg.fuse_activations,
        "compile_generation": cfg.compile_generation,
        "kl_hard_limit": cfg.kl_hard_limit,
        "optimizer": "AdamW (torch.optim, non-fused)",
    }
    if method == "grpo":
        out.update(loss_type=cfg.loss_type, scale_rewards=cfg.scale_rewards, kl="k3 in the loss")
    else:
        out.update(
            kl_estimator=cfg.kl_estimator,
            kl="in the reward",
            whiten_advantages=cfg.whiten_advantages,
            adaptive_kl=cfg.adaptive_kl,
        )
    return out


def run_user_ours(method: str, dirs: dict, prompts: list[str], args) -> dict:
    cfg = our_user_config(method, args)
    stamps: list[tuple[float, float]] = []
    trainer = build_ppo_trainer(
        dirs["model"],
        dirs["reward"],
        prompts,
        cfg,
        ModelConfig(),
        seed=args.seed,
        on_log=lambda it, m: stamps.append(stamp()),
        progress=False,
    )
    check_token_scoring(trainer)
    opt_steps = [0]
    hook = trainer.policy_opt.register_step_post_hook(
        lambda *a, **k: opt_steps.__setitem__(0, opt_steps[0] + 1)
    )
    samples: list[dict] = []
    try:
        with patched(ours_mod, "sample", timed_sample(samples)):
            result = trainer.train(resume=False)
    finally:
        hook.remove()
    # per step: the query rows it sampled from (generation_batch_size chunks, left-padded)
    per_step = math.ceil(cfg.batch_size / cfg.generation_batch_size)
    prompts_seen, gen_tokens = [], []
    for start in range(0, len(samples), per_step):
        chunk = samples[start : start + per_step]
        prompts_seen.append(
            [q[m].tolist() for s in chunk for q, m in zip(s["queries"], s["query_mask"])]
        )
        gen_tokens.append(sum(s["tokens"] for s in chunk))
    rewards = [h["score"] for h in result.history]  # normalised if normalise_reward, as TRL's
    out = summarise_user("ours", stamps, cfg.batch_size, gen_tokens, rewards, opt_steps[0], args)
    out.update(
        settings=our_defaults_kept(method, cfg, trainer.device),
        rollout_s_mean=statistics.fmean(
            h["rollout_s"] for h in result.history[args.warmup_steps :]
        ),
        update_s_mean=statistics.fmean(h["update_s"] for h in result.history[args.warmup_steps :]),
        dropout_p=dropout_ps(trainer.policy),
    )
    return {"summary": out, "prompts": prompts_seen}


def trl_user_config(method: str, args, out_dir: str, beta: float | None):
    config_cls, _ = trl_classes(method)
    extra = {} if beta is None else {"beta": beta}
    return config_cls(
        output_dir=out_dir,
        max_steps=args.steps,
        per_device_train_batch_size=args.episodes,
        num_generations=args.k,
        max_completion_length=args.max_new_tokens,
        shuffle_dataset=False,
        use_cpu=True,
        seed=args.seed,
        data_seed=args.seed,
        logging_strategy="steps",
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        **extra,
    )


def trl_defaults_kept(method: str, c) -> dict:
    def val(x):
        return str(getattr(x, "value", x))

    out = {
        "learning_rate": c.learning_rate,
        "lr_scheduler_type": val(c.lr_scheduler_type),
        "warmup_steps": c.warmup_steps,
        "weight_decay": c.weight_decay,
        "optim": val(c.optim),
        "bf16": c.bf16,
        "activation_checkpointing": c.activation_checkpointing,
        "gradient_accumulation_steps": c.gradient_accumulation_steps,
        "num_iterations": c.num_iterations,
        "beta": c.beta,
        "epsilon": c.epsilon,
        "max_grad_norm": c.max_grad_norm,
        "temperature": c.temperature,
        "top_p": c.top_p,
        "top_k": c.top_k,
        "mask_truncated_completions": c.mask_truncated_completions,
        "disable_dropout": c.disable_dropout,
        "use_vllm": c.use_vllm,
        "use_liger_kernel": c.use_liger_kernel,
        "torch_compile": c.torch_compile,
        "dataloader_pin_memory": c.dataloader_pin_memory,
    }
    if method == "grpo":
        out.update(
            loss_type=c.loss_type,
            scale_rewards=c.scale_rewards,
            use_bias_correction_kl=c.use_bias_correction_kl,
        )
    else:
        out.update(normalize_advantages=c.normalize_advantages)
    return out


def run_user_trl(
    method: str, dirs: dict, prompts: list[str], rows: list[int], prompt_ids, args, out_dir, beta
) -> dict:
    _, trainer_cls = trl_classes(method)
    config = trl_user_config(method, args, out_dir, beta)
    rm = load_rm(dirs["reward"])
    torch.manual_seed(args.seed)
    loaded = load_causal_lm(dirs["model"], dtype="fp32", device="cpu", eval_mode=False)
    fmt = ChatFormat(loaded.tokenizer)
    stamps: list[tuple[float, float]] = []
    normalise = our_user_config(method, args).normalise_reward
    with contextlib.redirect_stdout(sys.stderr):
        trainer = trainer_cls(
            model=loaded.model,
            reward_funcs=reward_callable(rm, prompt_ids, normalise),
            args=config,
            train_dataset=trl_dataset(fmt, prompts, rows),
            processing_class=loaded.tokenizer,
        )
    drop_printer(trainer)
    trainer.add_callback(timing_callback(stamps))
    generations: list[dict] = []
    real = trainer._generate_and_score_completions

    def recording(inputs):
        out = real(inputs)
        generations.append(
            {
                "prompt_ids": out["prompt_ids"],
                "prompt_mask": out["prompt_mask"],
                "tokens": int(out["completion_mask"].sum()),
            }
        )
        return out

    trainer._generate_and_score_completions = recording
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    prompts_seen = [
        [q[m.bool()].tolist() for q, m in zip(g["prompt_ids"], g["prompt_mask"])]
        for g in generations
    ]
    rewards = [
        h["reward"] for h in trainer.state.log_history if "reward" in h and "train_runtime" not in h
    ]
    out = summarise_user(
        "trl",
        stamps,
        args.episodes,
        [g["tokens"] for g in generations],
        rewards,
        trainer.state.global_step,
        args,
    )
    out.update(
        defaults_kept=trl_defaults_kept(method, config),
        config_check=trl_config_check(trainer),
        reference_model=trainer.ref_model is not None,
        dropout_p=dropout_ps(trainer.model),
    )
    return {"summary": out, "prompts": prompts_seen}


def summarise_user(name, stamps, episodes, gen_tokens, rewards, opt_steps, args) -> dict:
    n, window, cpu = timed_window(name, stamps, args.warmup_steps)
    timed = n - args.warmup_steps
    return {
        "episodes_per_s": episodes * timed / window,
        "s_per_step": window / timed,
        "timed_s": window,
        "timed_steps": timed,
        "steps": n,
        "cpu_per_wall": cpu / window,
        "optimizer_steps": opt_steps,
        "generated_tokens_per_step": statistics.fmean(gen_tokens[args.warmup_steps : n]),
        "reward_first": rewards[0] if rewards else None,
        "reward_last": statistics.fmean(rewards[-FINAL_WINDOW:]) if rewards else None,
    }


def run_user(method, dirs, prompts, rows, prompt_ids, args, tmp, rep) -> dict:
    names = ["trl", "ours"]
    if method == "grpo" and args.trl_beta_row:
        names.insert(1, "trl-beta")
    raw = {}
    for name in run_order(names, rep):
        if name == "ours":
            raw[name] = run_user_ours(method, dirs, prompts, args)
        else:
            beta = beta_for(method, args) if name == "trl-beta" else None
            out_dir = str(Path(tmp) / f"{method}-{name}-{rep}")
            raw[name] = run_user_trl(method, dirs, prompts, rows, prompt_ids, args, out_dir, beta)
    # ours samples each group's k answers as k consecutive rows; so does TRL's RepeatSampler
    expected = [
        [
            prompt_ids[i]
            for i in rows[s * args.n_groups : (s + 1) * args.n_groups]
            for _ in range(args.k)
        ]
        for s in range(args.steps)
    ]
    out = {name: r["summary"] for name, r in raw.items()}
    out["checks"] = {
        "same_prompts_per_step": {
            name: _same_prompt_rows(r["prompts"], expected) for name, r in raw.items()
        },
        "steps": {name: r["summary"]["steps"] for name, r in raw.items()},
    }
    return out


def _same_prompt_rows(seen: list[list[list[int]]], expected: list[list[list[int]]]) -> bool:
    """Each step's prompts as the same multiset of id lists (row order within a step aside)."""
    if len(seen) < len(expected):
        return False
    return all(sorted(map(tuple, a)) == sorted(map(tuple, b)) for a, b in zip(seen, expected))


# -- driver ---------------------------------------------------------------------------------------
def build_models(args, tmp: str) -> dict:
    rows = generate_demo_pairs(max(TOKENIZER_TEXTS, args.n_prompts), seed=0)
    prompts = [r["prompt"] for r in rows][: args.n_prompts]
    if args.model == "smollm2":
        model_dir = "smollm2"
    else:
        corpus = (
            [r["prompt"] for r in rows]
            + [r["chosen"] for r in rows]
            + [r["rejected"] for r in rows]
        )
        model_dir = str(
            build_scratch_model(
                corpus, Path(tmp) / "policy", args.preset, args.arch, seed=args.seed
            )
        )
    rm = build_reward_model(
        model_dir,
        RewardConfig(
            max_length=REWARD_MAX_LENGTH, pooling="model", mixed_precision="no", device="cpu"
        ),
        seed=args.seed + 1,
    )
    reward_dir = str(rm.save(Path(tmp) / "reward"))
    probe = load_causal_lm(model_dir, dtype="fp32", device="cpu")
    n_params = sum(p.numel() for p in probe.model.parameters())
    arch = type(probe.model).__name__
    del probe, rm
    tok = load_tokenizer(model_dir)
    fmt = ChatFormat(tok)
    lengths = [len(fmt.encode(p)[0]) for p in prompts]
    prompt_tokens = args.prompt_tokens or min(min(lengths), 64)
    return {
        "model": model_dir,
        "reward": reward_dir,
        "prompts": prompts,
        "prompt_tokens": prompt_tokens,
        "prompt_lengths": lengths,
        "n_params": n_params,
        "architecture": arch,
        "chat_template": fmt.has_template,
    }


def run_method(method: str, dirs: dict, args, tmp: str) -> dict:
    prompts = dirs["prompts"]
    modes = ["same", "user"] if args.mode == "both" else [args.mode]
    out = {}
    if "user" in modes:
        # our order and prompt ids, from a trainer built as the user-mode run builds it (not trained)
        probe = build_ppo_trainer(
            dirs["model"],
            dirs["reward"],
            prompts,
            our_user_config(method, args),
            ModelConfig(),
            seed=args.seed,
            progress=False,
        )
        rows, prompt_ids = prompt_rows(probe, args.steps), probe.prompt_ids
        del probe
    for mode in modes:
        rounds = []
        for rep in range(args.repeat):
            if mode == "same":
                out_dir = str(Path(tmp) / f"{method}-same-{rep}")
                rounds.append(run_same(method, dirs, prompts, args, out_dir, rep))
            else:
                rounds.append(run_user(method, dirs, prompts, rows, prompt_ids, args, tmp, rep))
        out[mode] = aggregate(method, mode, rounds)
    return out


def aggregate(method: str, mode: str, rounds: list[dict]) -> dict:
    if mode == "same":
        best = median_round(rounds, "ratio_update")
        return {
            **best,
            "rounds_ratio_update": [r["ratio_update"] for r in rounds],
            "rounds_ratio_generation": [r["ratio_generation_tokens_per_s"] for r in rounds],
            "loss_max_abs_diff": max(r["loss_max_abs_diff"] for r in rounds),
            "losses_agree": None if method == "rloo" else all(r["losses_agree"] for r in rounds),
            "prompt_padding": any(r["prompt_padding"] for r in rounds),
            "same_micro_batches": all(r["same_micro_batches"] for r in rounds),
        }
    names = [k for k in rounds[0] if k != "checks"]
    out = {}
    for name in names:
        runs = [r[name] for r in rounds]
        out[name] = {
            **median_round(runs, "episodes_per_s"),
            "rounds_episodes_per_s": [r["episodes_per_s"] for r in runs],
        }
    for name in (n for n in names if n.startswith("trl")):
        key = name.replace("-", "_")
        per_round = [ratio(r["ours"]["episodes_per_s"], r[name]["episodes_per_s"]) for r in rounds]
        out[f"ratio_ours_over_{key}"] = statistics.median(per_round)  # paired: the same round
        out[f"rounds_ratio_ours_over_{key}"] = per_round
    out["checks"] = {
        "same_prompts_per_step": {
            n: all(r["checks"]["same_prompts_per_step"][n] for r in rounds) for n in names
        },
        "steps": rounds[0]["checks"]["steps"],
    }
    out["min_cpu_per_wall"] = min(r[n]["cpu_per_wall"] for r in rounds for n in names)
    return out


def fmt_rounds(xs: list[float]) -> str:
    return ", ".join(f"{x:.2f}" for x in xs)


def print_same(method: str, e: dict, args) -> None:
    print()
    print(f"== {METHODS[method]}, identical batches (--mode same) ==")
    header = (
        f"{'':<6}{'update ep/s':>12}{'upd s/step':>11}{'cpu/wall':>9}{'opt steps':>10}"
        f"{'gen tok/s':>10}{'gen s/step':>11}{'gen tok/step':>13}{'first loss':>12}{'final loss':>12}"
    )
    print_table(
        header,
        (
            f"{who:<6}{s['update_episodes_per_s']:>12.2f}{s['update_s_per_step']:>11.3f}"
            f"{s['update_cpu_per_wall']:>9.2f}{s['optimizer_steps']:>10}"
            f"{s['generation_tokens_per_s']:>10.0f}{s['generation_s_per_step']:>11.3f}"
            f"{s['generated_tokens_per_step']:>13.0f}{s['first_loss']:>12.5f}{s['final_loss']:>12.5f}"
            for who, s in (("ours", e["ours"]), ("trl", e["trl"]))
        ),
    )
    rounds = (
        f" (rounds: {fmt_rounds(e['rounds_ratio_update'])})"
        if len(e["rounds_ratio_update"]) > 1
        else ""
    )
    gen_rounds = (
        f" (rounds: {fmt_rounds(e['rounds_ratio_generation'])})"
        if len(e["rounds_ratio_generation"]) > 1
        else ""
    )
    print(
        f"ratio (ours / trl): update {e['ratio_update']:.2f}x{rounds}; generation tokens/s "
        f"{e['ratio_generation_tokens_per_s']:.2f}x{gen_rounds}"
    )
    if method == "grpo":
        verdict = "agree" if e["losses_agree"] else "DIFFER"
        how = f"tolerance {args.loss_tol:.0e}"
    else:
        verdict = "differ by design (different objectives, see the docstring)"
        how = "not expected to agree"
    print(
        f"loss check: per-step losses {verdict} (max |ours - trl| {e['loss_max_abs_diff']:.2e} over "
        f"{e['ours']['optimizer_steps']} optimiser steps, {how}); final weights max |diff| "
        f"{e['final_weights_max_abs_diff']:.2e}; same micro-batches {e['same_micro_batches']}, "
        f"prompt padding {e['prompt_padding']}"
    )
    st = e["settings"]
    print(
        f"both: fp32, lr {st['lr']:g} constant, AdamW (torch, non-fused, wd 0), clip 1.0, "
        f"{key_values({k: v for k, v in st.items() if k != 'lr'})}"
    )
    print(f"trl runs with: {key_values(e['trl']['config_check'])}")
    print(
        "windows: update = ours update() / TRL training_step x micro-batches + clip + optimizer + "
        "scheduler; generation = ours sample() / TRL _generate_single_turn"
    )


def print_user(method: str, e: dict) -> None:
    print()
    print(f"== {METHODS[method]}, as a user runs it (--mode user) ==")
    names = [n for n in ("ours", "trl", "trl-beta") if n in e]
    header = (
        f"{'':<10}{'episodes/s':>11}{'s/step':>8}{'timed s':>9}{'cpu/wall':>9}{'opt steps':>10}"
        f"{'gen tok/step':>13}{'first reward':>13}{'last reward':>12}"
    )

    def num(x, spec):
        return format(x, spec) if x is not None else "-"

    print_table(
        header,
        (
            f"{n:<10}{e[n]['episodes_per_s']:>11.2f}{e[n]['s_per_step']:>8.3f}{e[n]['timed_s']:>9.2f}"
            f"{e[n]['cpu_per_wall']:>9.2f}{e[n]['optimizer_steps']:>10}"
            f"{e[n]['generated_tokens_per_step']:>13.0f}{num(e[n]['reward_first'], '>13.4f')}"
            f"{num(e[n]['reward_last'], '>12.4f')}"
            for n in names
        ),
    )
    for n in names[1:]:
        key = n.replace("-", "_")
        rounds = e[f"rounds_ratio_ours_over_{key}"]
        extra = f" (rounds: {fmt_rounds(rounds)})" if len(rounds) > 1 else ""
        print(f"ratio ours / {n}: {e[f'ratio_ours_over_{key}']:.2f}x{extra}")
    c = e["checks"]
    print(
        f"checks: same prompt ids per step {key_values(c['same_prompts_per_step'])}; "
        f"steps {key_values(c['steps'])}"
    )
    print(
        f"ours (rollout {e['ours']['rollout_s_mean']:.3f} s + update {e['ours']['update_s_mean']:.3f} s "
        f"per step), defaults kept: {key_values(e['ours']['settings'])}"
    )
    for n in names[1:]:
        print(
            f"{n} defaults kept{' (beta set to ours)' if n == 'trl-beta' else ''}: "
            f"{key_values(e[n]['defaults_kept'])}"
        )
        print(
            f"{n} runs with: reference model {e[n]['reference_model']}, {key_values(e[n]['config_check'])}"
        )


def main() -> None:
    ap = common.make_parser(__doc__)
    ap.add_argument("--method", default="both", choices=["both", "grpo", "rloo"])
    ap.add_argument(
        "--mode",
        default="both",
        choices=["both", "same", "user"],
        help="same: identical batches, update timed; user: each trainer's train() on its defaults",
    )
    ap.add_argument("--model", default="scratch", choices=["scratch", "smollm2"])
    ap.add_argument("--preset", default="small", choices=["tiny", "small"], help="scratch model")
    ap.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"], help="scratch model")
    ap.add_argument("--steps", type=int, default=10, help="steps (rollouts) for each trainer")
    ap.add_argument(
        "--warmup-steps", type=int, default=2, help="first steps excluded from timing (all runs)"
    )
    ap.add_argument("--episodes", type=int, default=16, help="episodes (answers) per step")
    ap.add_argument("--k", type=int, default=4, help="answers per prompt (TRL num_generations)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument(
        "--prompts",
        dest="n_prompts",
        type=int,
        default=None,
        help="demo prompts (default: steps x episodes / k, each prompt once)",
    )
    ap.add_argument(
        "--prompt-tokens",
        type=int,
        default=None,
        help="--mode same: every prompt cut to its last N tokens (default: the shortest prompt's length, <= 64)",
    )
    ap.add_argument(
        "--micro-batch", type=int, default=8, help="--mode same: rows per forward/backward"
    )
    ap.add_argument("--ppo-epochs", type=int, default=2, help="--mode same: TRL num_iterations")
    ap.add_argument("--lr", type=float, default=1e-4, help="--mode same: learning rate, both")
    ap.add_argument(
        "--beta",
        type=float,
        default=None,
        help="--mode same, and trl-beta: KL coefficient (default: ours, GRPO 0.04, RLOO 0.05)",
    )
    ap.add_argument(
        "--loss-type", default="dapo", choices=["dapo", "grpo"], help="--mode same, GRPO"
    )
    ap.add_argument(
        "--loss-tol",
        type=float,
        default=1e-5,
        help="--mode same, GRPO: the per-step losses agree when max |ours - TRL| <= this",
    )
    ap.add_argument(
        "--trl-beta-row",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--mode user, GRPO: also run TRL with beta = ours (default on)",
    )
    ap.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="rounds, interleaved (order reversed every other round)",
    )
    add_common_args(ap, seed=True, threads=True)
    args = ap.parse_args()
    if args.warmup_steps < 1 or args.steps <= args.warmup_steps:
        ap.error(
            "need 1 <= --warmup-steps < --steps (the timed window starts at the end of a step)"
        )
    if args.k < 2 or args.episodes % args.k:
        ap.error("--episodes must be a multiple of --k >= 2")
    if args.episodes % args.micro_batch:
        ap.error("--episodes must be a multiple of --micro-batch")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    args.n_groups = args.episodes // args.k
    if args.n_prompts is None:
        args.n_prompts = args.steps * args.n_groups
    load_start = prepare_run(args)
    versions = lib_versions()
    methods = ["grpo", "rloo"] if args.method == "both" else [args.method]

    results = {}
    with tempfile.TemporaryDirectory(prefix="grpo-vs-trl-") as tmp:
        dirs = build_models(args, tmp)
        for method in methods:
            results[method] = run_method(method, dirs, args, tmp)

    min_cpu = min(e["min_cpu_per_wall"] for by_mode in results.values() for e in by_mode.values())
    machine = machine_state(load_start, min_cpu)
    lengths = dirs["prompt_lengths"]
    setup = {
        "model": args.model,
        "preset": args.preset if args.model == "scratch" else None,
        "arch": dirs["architecture"],
        "parameters": dirs["n_params"],
        "chat_template": dirs["chat_template"],
        "prompts": args.n_prompts,
        "prompt_tokens_mean": statistics.fmean(lengths),
        "prompt_tokens_min": min(lengths),
        "prompt_tokens_max": max(lengths),
        "prompt_tokens_same_mode": dirs["prompt_tokens"],
        "episodes_per_step": args.episodes,
        "answers_per_prompt": args.k,
        "max_new_tokens": args.max_new_tokens,
        "steps": args.steps,
        "warmup_steps_excluded": args.warmup_steps,
        "reward_model": "the policy's backbone + seeded random scalar head (build_reward_model), fp32, "
        "no normalisation statistics",
        "device": "cpu",
        **machine,
        "repeat": args.repeat,
        "aggregate": "tables: each run's median round (identical batches: the round of the median "
        "update ratio); user-mode ratios: the median of the per-round ratios; every round's ratio listed",
        "versions": versions,
    }
    if args.json:
        print_json({"setup": setup, **results})
        return

    what = (
        f"{args.preset}/{args.arch} scratch" if args.model == "scratch" else "SmolLM2-135M-Instruct"
    )
    print(
        f"GRPO/RLOO throughput, ours vs TRL {versions['trl']}; {what} ({dirs['architecture']}, "
        f"{dirs['n_params'] / 1e6:.1f}M params), CPU, {torch.get_num_threads()} threads, "
        f"torch {versions['torch']}, transformers {versions['transformers']}"
    )
    print(
        f"{args.episodes} episodes per step ({args.n_groups} prompts x {args.k} answers), "
        f"<= {args.max_new_tokens} new tokens, {args.steps} steps (first {args.warmup_steps} untimed), "
        f"{args.n_prompts} prompts of {min(lengths)}-{max(lengths)} tokens "
        f"(identical batches: cut to {dirs['prompt_tokens']})"
    )
    for method in methods:
        for mode, e in results[method].items():
            if mode == "same":
                print_same(method, e, args)
            else:
                print_user(method, e)
    warn_if_busy(machine, what="ratios", lead="\n")


if __name__ == "__main__":
    main()
