"""Stage 3 of a step: measurements that read the rollout and the updates and change nothing.

Per step, over the rollout batch (mean token entropy ``H``):

- ``entropy``: ``H`` under the policy before the updates; ``entropy_after`` after them
  (``log.entropy_change``), and ``entropy_change_real`` = after - before.
- ``entropy_change_pred``: the first-order change of a softmax policy with one free
  logit vector per visited state under SGD (Cui et al. 2505.22617), from the
  objective's analytic coefficient ``c`` and normalisation ``n``
  (:func:`entropy_change_prediction`); summed over the step's updates, divided by
  the number of tokens. Its absolute scale assumes SGD (the trainer uses AdamW),
  so compare signs and objectives, not units.
- ``entropy_change_taylor``: ``grad_theta H(before) . (theta_after - theta_before)``, the
  network's own first-order prediction for the realised update (``log.entropy_taylor``).
- ``entropy_cov``: Cui et al.'s covariance ``Cov_t(log pi(y_t), c_t)`` over a minibatch's
  sampled tokens (:func:`token_covariance`, their Clip-Cov quantity), averaged over the updates.
- the objective's metrics (``objectives.compute_metrics``), once per minibatch over all its
  tokens, so they do not depend on ``optim.token_budget``.

Every per-update metric is reduced over the step's updates as :data:`UPDATE_REDUCTIONS` declares.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sspo_analysis.io import atomic_path
from sspo_analysis.primitives import clamp_log_ratio, k3_kl, masked_mean, masked_sum
from sspo_analysis.training.rollout import Rollout, logprobs
from sspo_analysis.training.runs import temp_path
from sspo_analysis.training.state import RunState, params_of
from sspo_analysis.training.update import MinibatchUpdate

Tensor = torch.Tensor

# --------------------------------------------------------------------------- the formulas


def entropy_change_prediction(logp: Tensor, entropy: Tensor, coefficient: Tensor, normalisation: Tensor,
                              mask: Tensor) -> Tensor:
    """First-order entropy change per unit SGD step size, summed over the tokens in ``mask``.

    A softmax with free logits ``z`` at the state of token ``t`` has
    ``d log pi(y_t) / dz = e_{y_t} - pi``, and the loss has ``d loss / d log pi(y_t) = -n_t c_t``,
    so one SGD step of size ``eta`` moves ``z`` by ``eta n_t c_t (e_{y_t} - pi)``. Since
    ``dH/dz_a = -pi_a (log pi_a + H)``, the state's entropy changes by
    ``-eta n_t c_t [pi(y_t) (log pi(y_t) + H) - Cov_pi(log pi, pi)]``. The second term has
    zero mean when ``c`` has zero mean under ``pi`` at the state (the group baseline's
    assumption, as in Cui et al.), and it needs the full distribution, so it is left out:
    the result is ``-sum_t n_t c_t pi(y_t) (log pi(y_t) + H_t)``, exact in expectation then.
    All inputs are (B, T); multiply by the step size.
    """
    term = normalisation * coefficient * logp.exp() * (logp + entropy)
    return -masked_sum(term, mask)


def token_covariance(logp: Tensor, coefficient: Tensor, mask: Tensor) -> float:
    """Population covariance of ``log pi(y_t)`` and ``c_t`` over the tokens in ``mask`` (0 for < 2 tokens)."""
    x, y = logp[mask], coefficient[mask]
    if x.numel() < 2:
        return 0.0
    return float(((x - x.mean()) * (y - y.mean())).mean())


# --------------------------------------------------------------------------- before and after the updates


@dataclass
class PolicyBefore:
    """The policy on the rollout batch before the step's updates."""

    logp: Tensor  # (B, T) log-probs of the sampled tokens (detached)
    entropy: float  # mean token entropy
    grad_entropy: Sequence[Tensor | None] | None = None  # d entropy / d params (log.entropy_taylor)
    params: list[Tensor] | None = None  # the parameters it was taken at


def measure_before(state: RunState, roll: Rollout) -> PolicyBefore:
    """Entropy and log-probs of the policy on ``roll`` before the updates (and ``grad H`` for the Taylor check)."""
    taylor = state.cfg.log.entropy_taylor
    if taylor or state.cfg.algo.staleness:  # the sampler is not the policy, or grad H is needed: one more forward
        with torch.set_grad_enabled(taylor), state.autocast():
            logp, entropy = logprobs(state, state.policy, roll)
    else:  # on-policy sampling already measured the policy on this batch
        logp, entropy = roll.old_logp, roll.old_entropy
    mean_entropy = masked_mean(entropy, roll.mask)
    before = PolicyBefore(logp.detach(), float(mean_entropy.detach()))
    if taylor:
        params = params_of(state.policy)
        before.grad_entropy = torch.autograd.grad(mean_entropy, params, allow_unused=True)
        before.params = [p.detach().clone() for p in params]
    return before


def kl_metrics(roll: Rollout, before: PolicyBefore) -> dict[str, float]:
    """k3 KL of the policy before the updates to the reference (``kl_ref``) and to the behaviour policy."""
    kl_ref = math.nan
    if roll.ref_logp is not None:
        kl_ref = float(masked_mean(k3_kl(torch.where(roll.mask, roll.ref_logp - before.logp, 0.0)), roll.mask))
    kl_old = float(masked_mean(k3_kl(torch.where(roll.mask, roll.old_logp - before.logp, 0.0)), roll.mask))
    return {"kl_ref": kl_ref, "kl_before_old": kl_old}


def entropy_change_metrics(state: RunState, roll: Rollout, before: PolicyBefore) -> dict[str, float]:
    """``entropy_after`` and ``entropy_change_real`` (nan unless ``log.entropy_change``), and the Taylor prediction."""
    after = math.nan
    if state.cfg.log.entropy_change:
        with torch.no_grad(), state.autocast():
            _, entropy = logprobs(state, state.policy, roll)
        after = float(masked_mean(entropy, roll.mask))
    out = {"entropy_after": after, "entropy_change_real": after - before.entropy}
    if before.grad_entropy is not None:
        dot = 0.0
        for g, p0, p in zip(before.grad_entropy, before.params, params_of(state.policy)):
            if g is not None:
                dot += float((g.float() * (p.detach() - p0).float()).sum())
        out["entropy_change_taylor"] = dot
    return out


def rollout_metrics(roll: Rollout) -> dict[str, float]:
    """Reward, accuracy, the share of groups without reward variance, and the mean completion length."""
    rewards = roll.rewards
    return {"reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "accuracy": float((rewards >= 1.0).float().mean()),
            "zero_std_frac": float((rewards.view(-1, roll.group_size).std(-1) == 0).float().mean()),
            "response_length": float(roll.mask.sum(-1).float().mean())}


# --------------------------------------------------------------------------- per update, and the reduction


def _mean(values: list[float]) -> float:
    return float(np.mean(values))


def _nanmean(values: list[float]) -> float:
    return float(np.nanmean(values)) if np.isfinite(values).any() else math.nan


REDUCERS: dict[str, Callable[[list], float]] = {"mean": _mean, "nanmean": _nanmean, "min": min, "max": max,
                                                "sum": sum}

UPDATE_REDUCTIONS: dict[str, str] = {
    # objectives.compute_metrics, each evaluated once per minibatch over all its tokens
    "loss": "mean", "ratio_mean": "mean", "ratio_std": "mean", "ratio_min": "min", "ratio_max": "max",
    "log_ratio_mean": "mean", "log_ratio_std": "mean", "seq_weight_mean": "mean", "seq_weight_var": "mean",
    "ess_frac": "mean", "dead_frac": "mean", "coef_norm_mean": "mean", "coef_norm_var": "mean",
    "clip_frac_low": "mean", "clip_frac_high": "mean", "gate_weight_mean": "mean", "kl_old_k3": "mean",
    "n_tokens": "sum",
    # the trainer's, one value per update (update_metrics)
    "log_ratio_min": "min", "log_ratio_max": "max", "grad_norm": "nanmean", "skipped_updates": "sum", "lr": "mean",
    "entropy_change_pred": "sum", "entropy_cov": "mean",
}
"""How each per-update metric becomes the step's value: one of :data:`REDUCERS`, declared, never inferred."""


def token_log_ratios(roll: Rollout, upd: MinibatchUpdate) -> Tensor:
    """Clamped log-ratios ``log pi - log pi_old`` of the minibatch's tokens (flat, row by row)."""
    return clamp_log_ratio(upd.logp - roll.old_logp[upd.rows])[roll.mask[upd.rows]]


@torch.no_grad()
def update_metrics(state: RunState, roll: Rollout, upd: MinibatchUpdate) -> dict[str, float]:
    """The objective's metrics and the trainer's per-update measurements for one minibatch update."""
    objective, rows = state.objective, upd.rows
    mask = roll.mask[rows]
    _, metrics, terms = objective.evaluate(upd.logp, roll.old_logp[rows], roll.advantages[rows], mask)
    coefficient = terms.coefficient.float()  # analytic, zero on masked tokens
    norm = objective.normalisation(mask).float()
    pred = entropy_change_prediction(upd.logp, upd.entropy, coefficient, norm, mask)
    log_ratio = token_log_ratios(roll, upd)
    empty = log_ratio.numel() == 0
    return {**metrics,
            "log_ratio_min": 0.0 if empty else float(log_ratio.min()),
            "log_ratio_max": 0.0 if empty else float(log_ratio.max()),
            "grad_norm": upd.grad_norm, "skipped_updates": int(upd.skipped), "lr": upd.lr,
            "entropy_change_pred": upd.lr * float(pred) / roll.n_tokens,
            "entropy_cov": token_covariance(upd.logp, coefficient, mask)}


def reduce_updates(per_update: list[dict[str, float]]) -> dict[str, float]:
    """One value per metric for the step, by :data:`UPDATE_REDUCTIONS`."""
    keys = list(per_update[0])
    undeclared = [k for k in keys if k not in UPDATE_REDUCTIONS]
    if undeclared:
        raise ValueError(f"metrics {undeclared}: no reduction declared in measure.UPDATE_REDUCTIONS; "
                         f"allowed reductions: {', '.join(REDUCERS)}")
    return {k: REDUCERS[UPDATE_REDUCTIONS[k]]([m[k] for m in per_update]) for k in keys}


def dump_log_ratios(path: Path, roll: Rollout, updates: list[MinibatchUpdate]) -> None:
    """Write the token log-ratios of every update, with lengths, advantages and update index, to ``path`` (npz)."""
    ratios, lengths, advantages, index = [], [], [], []
    for u, upd in enumerate(updates):
        ratios.append(token_log_ratios(roll, upd).float().cpu())
        lengths.append(roll.mask[upd.rows].sum(-1).cpu())
        advantages.append(roll.advantages[upd.rows].float().cpu())
        index.append(torch.full((len(upd.rows),), u, dtype=torch.int16))
    with atomic_path(path, temp_path(path)) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, log_ratios=torch.cat(ratios).numpy().astype(np.float32),
                 lengths=torch.cat(lengths).numpy().astype(np.int32),
                 advantages=torch.cat(advantages).numpy().astype(np.float32), update=torch.cat(index).numpy())
