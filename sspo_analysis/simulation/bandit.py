"""A softmax bandit trained by every objective: entropy drift, predicted and realised.

The policy is ``pi = softmax(z)`` over ``V`` actions; a subset of the actions is
"correct" (reward 1, else 0). Each step samples groups of ``group_size`` actions
from the current policy, computes group-normalised advantages, and takes
``updates_per_batch`` SGD steps on the logits with the objective's real loss
(``objective(log_prob, old_log_prob, advantages, mask)``, one token per
sample), so every update after the first is off-policy and the gates act.

For a softmax the entropy's gradient is ``dH/dz_a = -pi_a (log pi_a - E_pi[log pi])``,
so a logit change ``dz`` changes the entropy by, to first order (Cui et al.,
arXiv 2505.22617),

    dH ~ -Cov_{a ~ pi}(log pi(a), dz_a).

Each step records this prediction with the step's actual ``dz`` and the
realised change; their gap is second order in ``dz`` (see the tests).

The advantages and the entropy are the package's primitives
(:func:`sspo_analysis.primitives.group_advantages`, with the trainer's
``ADVANTAGE_EPS = 1e-4`` added to the group std, and
:func:`sspo_analysis.primitives.entropy_from_logits`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from sspo_analysis.objectives import Objective, resolve_objective
from sspo_analysis.primitives import entropy_from_logits, group_advantages

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["run_bandit", "entropy_change_first_order"]

_METRICS = ("dead_frac", "clip_frac_low", "clip_frac_high", "ratio_min", "ratio_max", "log_ratio_std",
            "coef_norm_mean", "seq_weight_mean", "ess_frac")


def entropy_change_first_order(logits: torch.Tensor, dz: torch.Tensor) -> torch.Tensor:
    """``-Cov_{a ~ pi}(log pi(a), dz_a)``: the first-order entropy change of ``softmax(logits)`` under ``dz``."""
    logp = torch.log_softmax(logits, -1)
    p = logp.exp()
    centred = logp - (p * logp).sum(-1, keepdim=True)
    return -(p * centred * (dz - (p * dz).sum(-1, keepdim=True))).sum(-1)


def check_int(value: int, name: str, minimum: int = 1) -> int:
    """``value`` if it is an integer (not a bool) >= ``minimum``, else a ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return value


def run_bandit(  # noqa: PLR0913 - keyword knobs of one experiment, each a CLI flag
    objective: str | Objective,
    steps: int = 200,
    n_actions: int = 64,
    group_size: int = 16,
    updates_per_batch: int = 4,
    lr: float = 0.25,
    seed: int = 0,
    *,
    n_correct: int | None = None,
    n_groups: int = 1,
    init_scale: float = 1.0,
    scale_advantages: bool = True,
    **params: Any,
) -> pd.DataFrame:
    """Train a softmax bandit with ``objective`` and record entropy, reward and the entropy drift.

    Args:
        objective: an objective name or :class:`Objective` (reference estimators too).
        steps: sampling steps (one batch each).
        n_actions: ``V``.
        group_size: samples per group (the advantage is normalised within a group).
        updates_per_batch: SGD updates on each batch; all but the first are off-policy.
        lr: SGD learning rate on the logits.
        seed: seeds the initial logits, the correct subset and the sampling.
        n_correct: rewarded actions (default ``max(1, V // 8)``), chosen at random.
        n_groups: groups per step.
        init_scale: std of the initial logits.
        scale_advantages: divide by the group std (GRPO) or not (Dr.GRPO).
        **params: the objective's parameters (``eps``, ``tau``, ``gate``, ...).

    Returns:
        One row per step: ``step``, ``objective``, ``entropy`` (before the step),
        ``reward`` (batch mean), ``expected_reward`` (``pi(correct)`` before the
        step), ``entropy_change_pred`` (``-Cov(log pi, dz)`` with the step's
        actual logit change ``dz``), ``entropy_change_real``,
        ``entropy_change_pred_pg`` (the same prediction for ``updates_per_batch``
        plain on-policy policy-gradient steps: the drift without any gate, so
        ``entropy_change_real - entropy_change_pred_pg`` is the gate's own
        effect, to first order), ``dz_norm``, and the
        objective's metrics of the step's last update (``dead_frac``,
        ``clip_frac_low``, ``clip_frac_high``, ``ratio_min``, ``ratio_max``,
        ``log_ratio_std``, ``coef_norm_mean``, ``seq_weight_mean``, ``ess_frac``).
    """
    import pandas as pd

    obj = resolve_objective(objective, **params)
    steps = check_int(steps, "steps")
    n_actions = check_int(n_actions, "n_actions", 2)
    setup = _Setup(
        steps=steps,
        group_size=check_int(group_size, "group_size", 2),
        updates_per_batch=check_int(updates_per_batch, "updates_per_batch"),
        n_groups=check_int(n_groups, "n_groups"),
        lr=_check_lr(lr),
        scale_advantages=scale_advantages,
    )
    n_correct = max(1, n_actions // 8) if n_correct is None else n_correct
    if not 1 <= n_correct < n_actions:
        raise ValueError(f"n_correct: must be in [1, n_actions), got {n_correct!r}")

    gen = torch.Generator().manual_seed(seed)
    z = init_scale * torch.randn(n_actions, generator=gen, dtype=torch.float64)
    correct = torch.zeros(n_actions, dtype=torch.float64)
    correct[torch.randperm(n_actions, generator=gen)[:n_correct]] = 1.0
    rows = []
    for step in range(setup.steps):
        z, row = _bandit_step(obj, z, correct, setup, gen)
        rows.append({"step": step, "objective": obj.name, **row})
    frame = pd.DataFrame(rows)
    frame["lr"] = float(lr)
    frame["updates_per_batch"] = updates_per_batch
    frame["seed"] = seed
    return frame


def _check_lr(lr: float) -> float:
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr: must be a finite number > 0, got {lr!r}")
    return lr


@dataclass(frozen=True)
class _Setup:
    """The bandit's training settings, checked."""

    steps: int
    group_size: int
    updates_per_batch: int
    n_groups: int
    lr: float
    scale_advantages: bool


def _sgd(objective: Objective, z: torch.Tensor, actions: torch.Tensor, old_lp: torch.Tensor, adv: torch.Tensor,
         setup: _Setup) -> tuple[torch.Tensor, dict[str, float]]:
    """``updates_per_batch`` SGD steps on the logits with the objective's loss; the new logits and the last metrics."""
    mask = torch.ones(actions.shape[0], 1, dtype=torch.bool)
    metrics: dict[str, float] = {}
    for _ in range(setup.updates_per_batch):
        zv = z.detach().requires_grad_(True)
        lp = torch.log_softmax(zv, -1)[actions].view(-1, 1)
        loss, metrics = objective(lp, old_lp, adv, mask)
        (grad,) = torch.autograd.grad(loss, zv)
        z = (zv - setup.lr * grad).detach()
    return z, metrics


def _bandit_step(obj: Objective, z: torch.Tensor, correct: torch.Tensor, setup: _Setup,
                 gen: torch.Generator) -> tuple[torch.Tensor, dict[str, Any]]:
    """One sampling step and its updates; the new logits and the step's record."""
    batch = setup.n_groups * setup.group_size
    z_before = z.detach().clone()
    with torch.no_grad():
        p = torch.softmax(z_before, -1)
        actions = torch.multinomial(p, batch, replacement=True, generator=gen)
        rewards = correct[actions]
        adv = group_advantages(rewards.view(setup.n_groups, setup.group_size), setup.scale_advantages).reshape(batch)
        old_lp = torch.log_softmax(z_before, -1)[actions].view(batch, 1)
    # The same number of plain on-policy steps from z_before, to first order: what the step
    # would do to the entropy without importance weights, gates or clipping.
    zv = z_before.clone().requires_grad_(True)
    mask = torch.ones(batch, 1, dtype=torch.bool)
    pg_loss, _ = resolve_objective("pg")(torch.log_softmax(zv, -1)[actions].view(batch, 1), old_lp, adv, mask)
    dz_pg = -setup.updates_per_batch * setup.lr * torch.autograd.grad(pg_loss, zv)[0]
    z, metrics = _sgd(obj, z, actions, old_lp, adv, setup)
    dz = z - z_before
    h_before, h_after = entropy_from_logits(z_before), entropy_from_logits(z)
    return z, {
        "entropy": float(h_before),
        "reward": float(rewards.mean()),
        "expected_reward": float((p * correct).sum()),
        "entropy_change_pred": float(entropy_change_first_order(z_before, dz)),
        "entropy_change_real": float(h_after - h_before),
        "entropy_change_pred_pg": float(entropy_change_first_order(z_before, dz_pg)),
        "dz_norm": float(dz.norm()),
        **{k: metrics.get(k, math.nan) for k in _METRICS},
    }
