"""A reward head fit to a frozen backbone's features (a linear probe).

The backbone reads every pair once; x_c, x_r are the features its head reads for the chosen and
rejected response (reward.pooling). With s the root mean square of ||x_c - x_r|| (so that the L2
strength means the same for every backbone) and d = (x_c - x_r) / s, the head's weight w solves

    min_w  sum_i a_i * BT(w . d_i - m_i; p_i) / sum_i a_i  +  l2 * ||w||^2
    BT(z; p) = -(p log sigmoid(z) + (1 - p) log sigmoid(-z))

(a_i the pair weights, m_i the margins of hard labels, p_i the soft labels: rlhf_core.reward.losses),
a smooth convex problem L-BFGS solves to tolerance in seconds. Each l2 in reward.head_l2 is fit on
the training pairs; the one with the lowest validation loss is kept, and the head becomes
weight = w / s, with its bias (if it has one) centring the training responses' rewards on zero.

Fine-tuning a backbone on ~1.4k HH-RLHF pairs overfits it; the probe keeps what pretraining knows
(measured in docs/reward.md).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from rlhf_core import distributed
from rlhf_core.config import RewardConfig
from rlhf_core.metrics import accuracy
from rlhf_core.reward.losses import bradley_terry_loss
from rlhf_core.reward.model import Encoded, RewardModel, head_of
from rlhf_core.training import LogFn, LoopResult


@torch.no_grad()
def head_inputs(rm: RewardModel, items: Sequence[Encoded], batch_size: int = 32) -> torch.Tensor:
    """(n, hidden) fp32: what the head's final Linear reads for each item, in the given order,
    under the autocast the model scores with (RewardModel.amp)."""
    pad = rm.model.config.pad_token_id
    out: torch.Tensor | None = None
    captured: list[torch.Tensor] = []
    hook = head_of(rm.model).register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
    try:
        with rm.amp():
            for idx in rm.sorted_batches(items, batch_size):
                batch = [items[i] for i in idx]
                captured.clear()
                rm.forward(batch)
                x = captured[0].float()
                if x.dim() == 3:  # a causal LM's head runs on every position; the model reads one
                    last = torch.tensor([_read_position(e, pad) for e in batch], device=x.device)
                    x = x[torch.arange(len(batch), device=x.device), last]
                if out is None:
                    out = torch.empty(len(items), x.shape[-1])
                out[idx] = x.cpu()
    finally:
        hook.remove()
    return out


def shared_head_inputs(
    rm: RewardModel, items: Sequence[Encoded], batch_size: int = 32
) -> torch.Tensor:
    """head_inputs of all items, each process of a distributed learner reading items rank, rank + N,
    ... and all of them receiving the whole (the backbone's pass is the probe's cost)."""
    return distributed.sharded_rows(
        distributed.current(), items, lambda part: head_inputs(rm, part, batch_size)
    )


def _read_position(e: Encoded, pad: int | None) -> int:
    """The position transformers' sequence classifiers read: the last token that is not padding
    (so where EOS is the pad token, the one before it)."""
    ids = e.input_ids
    return next((j for j in range(len(ids) - 1, -1, -1) if ids[j] != pad), len(ids) - 1)


def fit_weights(
    d: torch.Tensor,
    l2: float,
    p: torch.Tensor | None = None,
    margin: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """argmin_w of the weighted Bradley-Terry loss of w . d plus l2 ||w||^2 (float64), and the
    number of L-BFGS iterations it took."""
    d = d.double()
    a = torch.ones(len(d), dtype=torch.float64) if weight is None else weight.double()
    w = torch.zeros(d.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w],
        max_iter=1000,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        z = d @ w
        per_pair, _ = bradley_terry_loss(
            z,
            torch.zeros_like(z),
            None if p is None else p.double(),
            None if margin is None else margin.double(),
            a,
        )
        loss = per_pair.sum() / a.sum() + l2 * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), int(opt.state[w]["n_iter"])


def fit_head(
    rm: RewardModel, train, val, cfg: RewardConfig, on_log: LogFn | None = None
) -> LoopResult:
    """Fit rm's head to its frozen backbone's features on the train PairSet (val: PairSet or None);
    on_log(i, metrics) for each L2 strength tried."""
    t0 = time.perf_counter()
    feats = lambda items: shared_head_inputs(rm, items, cfg.eval_batch_size)  # noqa: E731
    xc, xr = feats(train.chosen), feats(train.rejected)
    d = (xc - xr).double()
    scale = float(d.pow(2).sum(1).mean().sqrt()) or 1.0
    d = d / scale
    t = lambda v: torch.as_tensor(v, dtype=torch.float64)  # noqa: E731
    p, margin, weight = t(train.p_chosen), t(train.margin), t(train.weight)
    has_val = val is not None and len(val) > 0
    if has_val:
        dv = (feats(val.chosen) - feats(val.rejected)).double() / scale
        pv = t(val.p_chosen)
    history, fits = [], []
    for i, l2 in enumerate(cfg.head_l2 if has_val else [max(cfg.head_l2)]):
        w, iters = fit_weights(d, l2, p, margin, weight)
        row = {"head_l2": l2, "lbfgs_iterations": iters}
        if has_val:
            z = dv @ w
            loss, _ = bradley_terry_loss(z, torch.zeros_like(z), pv)
            row["eval_loss"] = float(loss.mean())
            row["eval_accuracy"] = accuracy(torch.sigmoid(z).numpy(), val.p_chosen >= 0.5)
        if on_log:
            on_log(i, row)
        history.append({"step": i, **row})
        fits.append((row, w, iters))
    row, w, iters = min(fits, key=lambda fit: fit[0].get("eval_loss", 0.0))
    head = head_of(rm.model)
    with torch.no_grad():
        head.weight.copy_((w / scale).to(head.weight.dtype).reshape(head.weight.shape))
        if head.bias is not None:
            rewards = torch.cat([xc, xr]).double() @ (w / scale)
            head.bias.fill_(-float(rewards.mean()))
    seconds = time.perf_counter() - t0
    return LoopResult(
        steps=iters,
        epochs_done=1.0,
        best_metric=row.get("eval_accuracy"),
        final_eval={k: v for k, v in row.items() if k.startswith("eval_") or k == "head_l2"},
        stopped_early=False,
        resumed_from_step=None,
        train_units=len(train),
        units_per_s=len(train) / seconds,
        history=history,
    )
