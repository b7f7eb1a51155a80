"""Stage 2 of a step: ``algo.updates_per_batch`` minibatch AdamW updates on the rollout, nothing else.

Each minibatch may be split into micro-batches of at most ``optim.token_budget``
padded tokens (gradient accumulation); :func:`micro_weight` scales each
micro-batch's loss so that the accumulated gradient equals the minibatch's.
The update returns, per minibatch, the policy's log-probs and entropies it
computed before stepping, so the measurements need no second forward pass.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch

from sspo_analysis.objectives import Objective
from sspo_analysis.primitives import k3_kl
from sspo_analysis.training.config import TrainConfig
from sspo_analysis.training.rollout import Rollout, logprobs
from sspo_analysis.training.state import RunState, params_of

Tensor = torch.Tensor


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    """The LR multiplier of optimiser update ``u`` (0-based): linear warmup, then constant, linear or cosine.

    Warmup rises as ``(u + 1) / (warmup + 1)``; afterwards the schedule falls from 1 to
    ``min_lr_ratio`` over the run's remaining updates (``steps x updates_per_batch`` in all).
    """
    total = cfg.steps * cfg.algo.updates_per_batch
    o = cfg.optim

    def f(update: int) -> float:
        if update < o.warmup_updates:
            return (update + 1) / (o.warmup_updates + 1)
        frac = (update - o.warmup_updates) / max(1, total - o.warmup_updates)
        if o.schedule == "linear":
            return 1.0 - (1.0 - o.min_lr_ratio) * frac
        if o.schedule == "cosine":
            return o.min_lr_ratio + (1.0 - o.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
        return 1.0

    return f


def micro_batches(rows: Tensor, seq_len: int, budget: int) -> list[Tensor]:
    """``rows`` in consecutive chunks of at most ``budget // seq_len`` rows (all of them when ``budget`` is 0)."""
    if budget <= 0:
        return [rows]
    return list(rows.split(max(1, budget // seq_len)))


def micro_weight(objective: Objective, mask_micro: Tensor, mask_mini: Tensor) -> float:
    """Share of a micro-batch in the minibatch loss under the objective's aggregation."""
    if objective.agg == "token-mean":
        return float(mask_micro.sum()) / max(1.0, float(mask_mini.sum()))
    if objective.agg == "seq-mean-token-sum-norm":
        return mask_micro.shape[0] / mask_mini.shape[0]
    return float(mask_micro.any(-1).sum()) / max(1.0, float(mask_mini.any(-1).sum()))


@dataclass
class MinibatchUpdate:
    """One optimiser update, as the measurements see it."""

    rows: Tensor  # the rollout rows of the minibatch
    logp: Tensor  # (b, T) the policy's log-probs of those rows just before this update (detached)
    entropy: Tensor  # (b, T) the policy's entropies there (detached)
    lr: float  # the learning rate of this update
    grad_norm: float  # before clipping; nan when the loss was not finite
    skipped: bool  # non-finite loss or gradient norm: no step taken


def _micro_loss(state: RunState, roll: Rollout, micro: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(loss, log-probs, entropies)`` of one micro-batch: the objective's loss plus the k3 KL penalty."""
    objective, kl_coef = state.objective, state.cfg.algo.kl_coef
    mask = roll.mask[micro]
    with state.autocast():
        logp, entropy = logprobs(state, state.policy, roll, micro)
    loss = objective.loss(logp, roll.old_logp[micro], roll.advantages[micro], mask)
    if roll.ref_logp is not None and kl_coef > 0:
        kl = k3_kl(torch.where(mask, roll.ref_logp[micro] - logp, 0.0))
        loss = loss + kl_coef * (kl * objective.token_weights(mask)).sum()
    return loss, logp, entropy


def _optimiser_step(state: RunState, finite: bool) -> float:
    """Clip and step when the loss and the gradient norm are finite; returns the norm (nan: skipped)."""
    grad_norm = (torch.nn.utils.clip_grad_norm_(params_of(state.policy), state.cfg.optim.grad_clip) if finite
                 else torch.tensor(math.nan))
    if finite and bool(torch.isfinite(grad_norm)):
        state.opt.step()
    else:
        state.opt.zero_grad(set_to_none=True)
    return float(grad_norm)


def minibatch_update(state: RunState, roll: Rollout, rows: Tensor) -> MinibatchUpdate:
    """One AdamW update on the minibatch ``rows``, accumulated over micro-batches."""
    state.opt.zero_grad(set_to_none=True)
    lr = state.sched.get_last_lr()[0]
    mask = roll.mask[rows]
    finite, logps, entropies = True, [], []
    for micro in micro_batches(rows, roll.ids.shape[1], state.cfg.optim.token_budget):
        loss, logp, entropy = _micro_loss(state, roll, micro)
        finite = finite and bool(torch.isfinite(loss))
        if finite:
            (loss * micro_weight(state.objective, roll.mask[micro], mask)).backward()
        logps.append(logp.detach())
        entropies.append(entropy.detach())
    grad_norm = _optimiser_step(state, finite)
    skipped = not (finite and math.isfinite(grad_norm))
    return MinibatchUpdate(rows, torch.cat(logps), torch.cat(entropies), lr, grad_norm, skipped)


def update(state: RunState, roll: Rollout) -> list[MinibatchUpdate]:
    """``algo.updates_per_batch`` updates on disjoint random minibatches of ``roll``, advancing the LR schedule."""
    order = torch.randperm(roll.size, generator=state.gen, device=state.gen.device)
    updates = []
    for rows in order.chunk(state.cfg.algo.updates_per_batch):
        updates.append(minibatch_update(state, roll, rows))
        with warnings.catch_warnings():  # a skipped update (non-finite loss) still advances the schedule, on purpose
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before")
            state.sched.step()
        if state.cfg.algo.staleness:
            state.snapshot()
    return updates
