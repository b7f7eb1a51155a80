"""Reference estimators, and the one resolver from a name to an :class:`~sspo_analysis.objectives.Objective`.

The theory compares every objective with three textbook estimators:

- ``pg``: on-policy policy gradient (the registered objective), ``c = A``;
- ``is-token``: the plain token importance ratio, ``c = A r``;
- ``is-seq``: the sequence importance ratio ``W = prod_t r_t``, unbiased off
  policy and with variance ``exp(L s^2) - 1`` under the log-normal model.

``is-token`` and ``is-seq`` are not training objectives, so they are not in the
objective registry (``sspo train`` does not offer them); they are built here on
the same :class:`~sspo_analysis.objectives.Objective` wrapper, so the Monte
Carlo, the simulators and the sweeps treat them exactly like the registered ones.
"""

from __future__ import annotations

from typing import Any

import torch

from sspo_analysis.objectives import (
    LOG_RATIO_CLAMP,
    Objective,
    ObjectiveSpec,
    Terms,
    get_objective,
    objective_names,
)

Tensor = torch.Tensor

REFERENCE_ESTIMATORS: tuple[str, ...] = ("pg", "is-token", "is-seq")
"""Names of the reference estimators (``pg`` is also a registered objective)."""

SEQ_LOG_WEIGHT_CLAMP = 4.0 * LOG_RATIO_CLAMP
"""``is-seq`` clamps ``sum_t l`` to ``[-80, 80]`` before ``exp``; a token clamp would be meaningless for a sum."""


def _is_token(log_ratio: Tensor, adv: Tensor, mask: Tensor) -> Terms:
    """Token importance sampling ``r A``: ``c = A r``."""
    r = log_ratio.exp()
    return Terms(r * adv, (adv * r).detach(), r)


def _is_seq(log_ratio: Tensor, adv: Tensor, mask: Tensor) -> Terms:
    """Sequence importance sampling ``W A / T`` with ``W = exp(sum_t l)``: ``c = A W / T``.

    The ``1 / T`` keeps the normalised coefficient ``c T / A = W``, so that it is 1
    on-policy like every sequence-level objective's.
    """
    n = mask.sum(-1).clamp(min=1).to(log_ratio.dtype)
    w = torch.where(mask, log_ratio, 0.0).sum(-1).clamp(-SEQ_LOG_WEIGHT_CLAMP, SEQ_LOG_WEIGHT_CLAMP).exp()
    coefficient = torch.where(mask, (adv * w / n)[:, None], 0.0).detach()
    return Terms(w * adv / n, coefficient, w)


_REFERENCE_SPECS = {
    "is-token": ObjectiveSpec("is-token", _is_token, "token", "seq-mean-token-mean", {}, None, _is_token.__doc__ or ""),
    "is-seq": ObjectiveSpec("is-seq", _is_seq, "sequence", "seq-mean-token-mean", {}, None, _is_seq.__doc__ or ""),
}


def all_objective_names() -> tuple[str, ...]:
    """The registered objectives followed by the reference estimators the theory adds."""
    return objective_names() + tuple(n for n in REFERENCE_ESTIMATORS if n not in objective_names())


def resolve_objective(objective: str | Objective, **params: Any) -> Objective:
    """An :class:`Objective` from a name (registered or reference) and its parameters.

    An :class:`Objective` instance is returned as it is (``params`` must then be empty).
    """
    if isinstance(objective, Objective):
        if params:
            raise ValueError(f"objective: parameters {sorted(params)} given with an Objective instance; "
                             "build the instance with them instead")
        return objective
    if not isinstance(objective, str):
        raise ValueError(f"objective: expected a name or an Objective, got {type(objective).__name__}")
    if objective in _REFERENCE_SPECS:
        if params:
            raise ValueError(f"objective {objective!r}: unknown parameter(s) {', '.join(sorted(params))}; "
                             "allowed: (none)")
        spec = _REFERENCE_SPECS[objective]
        return Objective(objective, {}, spec.agg, None, spec)
    if objective not in objective_names():
        raise ValueError(f"objective: unknown name {objective!r}; allowed values: {', '.join(all_objective_names())}")
    return get_objective(objective, **params)
