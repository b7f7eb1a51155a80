"""Small formulas that every layer shares, each written once.

The objectives, the trainer, the simulators and the engine integrations call
these instead of retyping them, so a change of convention (the clamp, the
advantage epsilon, the KL estimator) lands everywhere at once.
See ``docs/theory.md`` for the notation.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

LOG_RATIO_CLAMP = 20.0
"""Log-ratios are clamped to ``[-20, 20]`` before ``exp`` (``e^20 ~ 5e8``)."""

ADVANTAGE_EPS = 1e-4
"""Added to the group's reward std before dividing (GRPO advantages)."""


def clamp_log_ratio(x: Tensor) -> Tensor:
    """``x`` clamped to ``[-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP]``, safe to exponentiate."""
    return x.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)


def reduce_dtype(*xs: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32: reductions never run in half precision."""
    return torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over ``mask`` (where, not multiply: a masked ``inf`` never becomes ``nan``)."""
    kept = torch.where(mask, x.to(reduce_dtype(x)), 0.0)
    return kept.sum() if dim is None else kept.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``x`` over ``mask`` (0 where the mask is empty), in float32 or float64."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1).to(reduce_dtype(x))


def masked_var(x: Tensor, mask: Tensor) -> Tensor:
    """Population variance of ``x`` over ``mask`` (0 where the mask is empty)."""
    centred = x.to(reduce_dtype(x)) - masked_mean(x, mask)
    return masked_mean(centred**2, mask)


def k3_kl(log_ratio: Tensor) -> Tensor:
    """The k3 estimator ``e^d - 1 - d`` of ``KL(q || p)`` per sample, ``d = log p - log q`` (clamped).

    Unbiased under samples from ``q``, non-negative, and exact to second order in ``d``.
    """
    d = clamp_log_ratio(log_ratio)
    return torch.expm1(d) - d


def sequence_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence token mean of ``x`` (B, T) over ``mask``, shape (B,); 0 for an empty sequence."""
    return masked_mean(x, mask, dim=-1).to(x.dtype)


def geometric_mean_weight(log_values: Tensor, mask: Tensor) -> Tensor:
    """``exp(mean_t log_values)`` per sequence (B,): the sequence weight of GSPO, GMPO and SSPO."""
    return clamp_log_ratio(sequence_mean(log_values, mask)).exp()


def group_advantages(rewards: Tensor, scale: bool = True, eps: float = ADVANTAGE_EPS) -> Tensor:
    """Group-normalised advantages over the last dim: ``(R - mean_g R) / (std_g R + eps)``.

    ``scale=False`` drops the division (Dr.GRPO). ``rewards`` is (..., G).
    """
    centred = rewards - rewards.mean(-1, keepdim=True)
    if not scale:
        return centred
    return centred / (rewards.std(-1, keepdim=True) + eps)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of ``softmax(logits)`` over the last dim, in float32 or float64."""
    z = logits.to(reduce_dtype(logits))
    logp = torch.log_softmax(z, -1)
    return -(logp.exp() * logp).sum(-1)
