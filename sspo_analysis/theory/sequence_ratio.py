"""Theory of the field's other objectives: VESPO by quadrature in ``log W``; Clip-Cov and KL-Cov by batch Monte Carlo.

**VESPO** weights every token of a sequence by ``phi(W)``, a function of the product
ratio ``W = exp(sum_t l_t)`` alone. Under the i.i.d. log-normal model
``log W ~ N(L m, L s^2)``, so every moment of the normalised coefficient
``c / A = phi(W)`` is a one-dimensional integral against that normal density:
:func:`vespo_quadrature` takes the composite Gauss-Legendre rule of
:func:`sspo_analysis.theory.analysis.normal_nodes` and evaluates ``phi`` through the
objective's own code (one token carrying the whole ``log W``, whose clamp to
``[log 1e-8, 20]`` is the one TRL applies to the sum). The weight reported is
``phi(W)`` too, so ``mean_weight`` equals ``mean_coefficient``.

**LUSPO** has GSPO's ``J_i`` and GSPO's normalised coefficient ``c T / A = s 1[kept]``;
only its aggregation differs (each token's gradient is ``T_i`` times GSPO's), so
``analyse`` uses GSPO's closed forms for it unchanged.

**Clip-Cov and KL-Cov** choose the tokens they act on by ranking the covariance
``(A - mean A)(log pi - mean log pi)`` over the whole batch, and Clip-Cov draws its
tokens at random among those in a window. A token's coefficient therefore depends
on every other token of the batch, its advantage and its log-probability, not on
its own log-ratio alone: no per-token or per-sequence integral exists, so
:func:`batch_monte_carlo` samples whole batches and runs the objective on them.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from sspo_analysis.objectives import Objective
from sspo_analysis.theory.analysis import MC_CHUNK_TOKENS, _return_freed_memory, centred_quadrature, normal_nodes
from sspo_analysis.theory.closed_forms import LogNormalGrid
from sspo_analysis.theory.models import EmpiricalRatios, LogNormalRatios
from sspo_analysis.theory.moments import MonteCarloSums

DEFAULT_BATCH_SIZE = 64
"""Sequences per sampled batch in :func:`batch_monte_carlo` (the ranking's population is ``B L`` tokens)."""
OLD_LOG_PROB_SCALE = 1.0
"""Old token log-probabilities are ``-Exponential(1)`` in the batch model (mean -1, most tokens near 0)."""


def vespo_quadrature(obj: Objective, grid: LogNormalGrid, sign: int, quad_nodes: int) -> dict[str, np.ndarray]:
    """Moments of VESPO's ``phi(W)``, ``log W ~ N(L m, L s^2)``, over ``grid`` (S, K); its declared quadrature hook.

    ``quad_nodes`` is the Gauss-Legendre order per panel of ``normal_nodes``. The
    gate scale is the largest ``lambda``: ``phi`` varies on a scale ``~ 1 / lambda`` in
    ``log W`` near ``W = 1``.
    """
    m, s, L = grid.mean, grid.std, grid.length
    shape = np.broadcast_shapes(m.shape, L.shape)
    mu = np.broadcast_to(L * m, shape).reshape(-1, 1)
    sd = np.broadcast_to(s * np.sqrt(L), shape).reshape(-1, 1)
    scale = max(1.0, *(float(obj.params[k]) for k in ("lambda_pos", "lambda_neg")))
    log_w, w = normal_nodes(mu, sd, scale, quad_nodes)
    flat = torch.from_numpy(np.ascontiguousarray(log_w, dtype=np.float64)).reshape(-1, 1)
    adv = torch.full((flat.shape[0],), float(sign), dtype=torch.float64)
    c = obj.coefficient(flat, torch.zeros_like(flat), adv, torch.ones_like(flat, dtype=torch.bool))
    phi = (c.reshape(log_w.shape) * sign).numpy()
    mean, var = (v[..., 0] for v in centred_quadrature(phi, w))
    dead = ((phi == 0) * w).sum(-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        out = {"mean_coefficient": mean, "var_coefficient": var, "dead_fraction": dead,
               "mean_weight": mean, "var_weight": var, "ess_fraction": mean**2 / (var + mean**2)}
    return {k: v.reshape(shape) for k, v in out.items()}


def _batches(model: LogNormalRatios | EmpiricalRatios, n_samples: int | None, rng: np.random.Generator,
             batch_size: int):
    """Batches of ``batch_size`` sampled sequences ``(log_ratio, mask)``; an incomplete last batch is dropped."""
    per_chunk = max(batch_size, MC_CHUNK_TOKENS // batch_size * batch_size)
    for values, mask in model.chunks(n_samples, rng, per_chunk):
        _return_freed_memory()
        size = min(batch_size, len(values))
        for start in range(0, len(values) - size + 1, size):
            yield values[start:start + size], mask[start:start + size]


def _add_batch(sums: MonteCarloSums, obj: Objective, values: np.ndarray, mask: np.ndarray, sign: int,
               rng: np.random.Generator) -> None:
    """One sampled batch through ``objective.terms``, into ``sums`` as one unit: the tokens of its sequences with
    ``sign(A) = sign``."""
    lr, mt = torch.from_numpy(values), torch.from_numpy(mask)
    old = torch.from_numpy(-rng.exponential(OLD_LOG_PROB_SCALE, size=values.shape))
    adv = torch.from_numpy(rng.standard_normal(values.shape[0]))
    with torch.no_grad():
        t = obj.terms(old + lr, old, adv, mt)[0]
    keep = mt & (torch.sign(adv) == sign)[:, None]
    x = torch.where(keep, t.coefficient / adv[:, None], 0.0)
    w = torch.where(keep, t.weight, 0.0)
    n = keep.sum().to(torch.float64)
    row = torch.stack([n, x.sum(), (x * x).sum(), (keep & (t.coefficient == 0)).sum().to(torch.float64),
                       w.sum(), (w * w).sum(), n])
    sums.add(row[:, None].numpy(), (x, keep), (w, keep))


def batch_monte_carlo(obj: Objective, model: LogNormalRatios | EmpiricalRatios, sign: int, n_samples: int | None,
                      seed: int, batch_size: int = DEFAULT_BATCH_SIZE) -> tuple[dict[str, float], dict[str, float]]:
    """Moments of a batch-dependent objective's ``c / A`` over sampled batches: (stats, standard errors).

    The batch model: ``batch_size`` sequences of the model's log-ratios ``l``;
    advantages ``A_i ~ N(0, 1)`` per sequence, both signs in one batch as group
    normalisation gives; old log-probabilities ``-Exponential(1)`` per token,
    independent of ``l`` and ``A``; ``log pi = log pi_old + l``. The statistics are
    over the tokens of the sequences whose ``A`` has ``sign``; batches are the unit
    of independence (the ranking couples the sequences of one batch).
    """
    if not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size: must be an integer >= 2, got {batch_size!r}")
    rng = np.random.default_rng(seed)
    sums = MonteCarloSums()
    for values, mask in _batches(model, n_samples, rng, batch_size):
        _add_batch(sums, obj, values, mask, sign, rng)
    if sums.n_units < 2:
        raise ValueError(f"n_samples: need at least 2 batches of {batch_size} sequences, got {sums.n_units}")
    stats, stderr = sums.stats()
    return stats, {k: (v if math.isfinite(v) else math.nan) for k, v in stderr.items()}
