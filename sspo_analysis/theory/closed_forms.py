"""Closed forms of the coefficient and weight moments under the log-normal model.

Each public function here is a closed-form hook that an objective names at
registration (``register_objective(..., theory=("closed-form",),
closed_form="sspo_analysis.theory.closed_forms:ppo_clip")``): it takes the
objective's parameters, a :class:`LogNormalGrid` and the advantage sign, and
returns the six statistics of :data:`sspo_analysis.theory.STATS` as arrays
over the grid. The theory never dispatches on an objective's name.

The building blocks are log-normal partial moments ``E[r^k 1{a < l < b}]``
(the hard clips), moments of a sum of Gaussians (the sequence ratios, exact
under AR(1) correlation too) and the factorisation ``E[w^q] = M(q/L)^L`` of a
geometric mean over independent tokens (GMPO; also used by the quadrature).
See ``docs/theory.md`` for the notation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.special import log_ndtr, ndtr

from sspo_analysis.theory.models import sum_variance
from sspo_analysis.theory.moments import variance

__all__ = [
    "LogNormalGrid",
    "geometric_moments",
    "gmpo",
    "lognormal_variance",
    "lognormal_weight",
    "on_policy",
    "ppo_clip",
    "sequence_ppo_clip",
    "sequence_ratio",
    "token_ratio",
    "truncated_ratio",
]

Stats = dict[str, np.ndarray]


@dataclass(frozen=True)
class LogNormalGrid:
    """Token log-ratios ``l ~ N(mean, std^2)`` (AR(1) ``correlation``) on a grid of sequence lengths.

    ``mean`` and ``std`` are columns (S, 1), ``length`` a row (1, K); every
    statistic a hook returns broadcasts to (S, K).
    """

    mean: np.ndarray
    std: np.ndarray
    length: np.ndarray
    correlation: float = 0.0

    @property
    def zeros(self) -> np.ndarray:
        """Zeros of the grid's shape (S, K)."""
        return np.zeros(np.broadcast_shapes(self.mean.shape, self.length.shape))

    def sum_variance(self) -> np.ndarray:
        """``Var(sum_t l)`` over a sequence."""
        return sum_variance(self.std, self.length, self.correlation)


# --------------------------------------------------------------------------- building blocks


def partial_moment(k: float | np.ndarray, a: float, b: float, m: np.ndarray, s: np.ndarray) -> np.ndarray:
    """``E[r^k 1{a < l < b}]`` for ``l ~ N(m, s^2)``, ``r = e^l`` (``a``, ``b`` may be infinite)."""
    mu = m + k * s * s
    alpha, beta = (a - mu) / s, (b - mu) / s
    # In logs: for large s the scale exp(k m + k^2 s^2 / 2) overflows while the probability underflows, and
    # their product (the answer) is finite. Difference of the upper tails when the interval sits in the upper
    # half, of the lower tails otherwise: no cancellation.
    upper = alpha > 0
    hi, lo = np.where(upper, -alpha, beta), np.where(upper, -beta, alpha)
    with np.errstate(divide="ignore", over="ignore", invalid="ignore"):
        log_hi = log_ndtr(hi)
        log_prob = log_hi + np.log1p(-np.exp(log_ndtr(lo) - log_hi))
        return np.exp(k * m + 0.5 * k * k * s * s + log_prob)


def _log_expm1(x: np.ndarray) -> np.ndarray:
    """``log(e^x - 1)`` for ``x >= 0`` (``-inf`` at 0), without overflow for large ``x``."""
    x = np.asarray(x, dtype=float)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        return np.where(x > 30.0, x + np.log1p(-np.exp(-x)), np.log(np.expm1(np.minimum(x, 30.0))))


def lognormal_variance(mu: np.ndarray, var: np.ndarray) -> np.ndarray:
    """``Var[X] = e^(2 mu + var) expm1(var)`` for ``log X ~ N(mu, var)``: no cancellation, never negative."""
    with np.errstate(over="ignore"):
        return np.exp(2 * mu + var + _log_expm1(var))


def lognormal_weight(out: Stats, mu: np.ndarray, var: np.ndarray, zeros: np.ndarray) -> Stats:
    """``out`` completed by the moments of a log-normal weight, ``log w ~ N(mu, var)``, broadcast to ``zeros``.

    ``E[w] = e^(mu + var / 2)``, :func:`lognormal_variance` and ``E[w]^2 / E[w^2] = e^(-var)``.
    """
    with np.errstate(over="ignore"):
        weight = {"mean_weight": np.exp(mu + var / 2), "var_weight": lognormal_variance(mu, var),
                  "ess_fraction": np.exp(-var)}
    return {k: v + zeros for k, v in {**out, **weight}.items()}


def geometric_moments(u1: np.ndarray, v1: np.ndarray, c1: np.ndarray, cv: np.ndarray, L: np.ndarray) -> Stats:
    """Moments of a geometric-mean objective from the one-token factors' means and variances.

    ``u1 = E[e^{phi/L}] - 1 = m1 - 1`` (given as such: at large ``L`` the factor
    is ``1 + O(1/L)`` and ``1 + u1`` would round its information away),
    ``v1 = Var[e^{phi/L}]``, ``c1 = E[e^{phi/L} phi']``,
    ``cv = Var[e^{phi/L} phi']``. For i.i.d. tokens ``E[w^q] = M(q/L)^L`` and
    ``E[(w phi'_t)^q] = E[e^{q phi/L} phi'^q] M(q/L)^(L-1)``; with
    ``g = log(M(2/L) / M(1/L)^2) = log1p(v1 / m1^2) >= 0`` the variances are

        Var[w]      = E[w]^2 expm1(L g)
        Var[w phi'] = c1^2 m1^(2L-2) expm1((L-1) g) + cv m1^(2L-2) e^((L-1) g)

    sums of non-negative terms, where ``E[X^2] - E[X]^2`` cancels (at ``L = 1e6``
    the rounding of ``M^L`` alone is 1e-10 relative).
    """
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        lm1, g = np.log1p(u1), np.log1p(v1 / (1 + u1) ** 2)
        mean_w = np.exp(L * lm1)
        var_w = np.exp(2 * L * lm1 + _log_expm1(L * g))
        mean_c = c1 * np.exp((L - 1) * lm1)
        var_c = (np.exp(2 * np.log(np.abs(c1)) + 2 * (L - 1) * lm1 + _log_expm1((L - 1) * g))
                 + cv * np.exp((L - 1) * (2 * lm1 + g)))
        ess = np.exp(-L * g)
    return {"mean_coefficient": mean_c, "var_coefficient": var_c, "mean_weight": mean_w, "var_weight": var_w,
            "ess_fraction": ess}


def _ratio_clip(mu: np.ndarray, sd: np.ndarray, sign: int, eps_lo: float, eps_hi: float) -> Stats:
    """Coefficient moments of ``x 1[kept]``, ``log x ~ N(mu, sd^2)``, PPO's clip on ``x``."""
    if sign > 0:
        a, b = -np.inf, math.log1p(eps_hi)
        dead = ndtr((mu - b) / sd)
    else:
        a, b = (math.log1p(-eps_lo) if eps_lo < 1 else -np.inf), np.inf
        dead = ndtr((a - mu) / sd) if eps_lo < 1 else np.zeros_like(mu)
    mean = partial_moment(1.0, a, b, mu, sd)
    second = partial_moment(2.0, a, b, mu, sd)
    return {"mean_coefficient": mean, "var_coefficient": variance(mean, second, "var_coefficient"),
            "dead_fraction": dead}


def _token_weight(out: Stats, grid: LogNormalGrid) -> Stats:
    """Token objectives: the weight is the ratio ``r`` of one token, log-normal whatever the correlation."""
    return lognormal_weight(out, grid.mean, grid.std * grid.std, grid.zeros)


# --------------------------------------------------------------------------- the hooks


def on_policy(params: dict[str, Any], grid: LogNormalGrid, sign: int) -> Stats:
    """``pg``: ``c = A`` and weight 1 whatever the log-ratios."""
    zeros = grid.zeros
    return {"mean_coefficient": zeros + 1, "var_coefficient": zeros, "dead_fraction": zeros,
            "mean_weight": zeros + 1, "var_weight": zeros, "ess_fraction": zeros + 1}


def token_ratio(params: dict[str, Any], grid: LogNormalGrid, sign: int) -> Stats:
    """``is-token``: ``c / A = r``, log-normal."""
    out = _token_weight({"dead_fraction": grid.zeros}, grid)
    return {**out, "mean_coefficient": out["mean_weight"], "var_coefficient": out["var_weight"]}


def ppo_clip(params: dict[str, Any], grid: LogNormalGrid, sign: int) -> Stats:
    """``grpo`` / ``dapo``: ``c / A = r 1[kept]``, PPO's clip of one token's ratio."""
    return _token_weight(_ratio_clip(grid.mean, grid.std, sign, params["eps_lo"], params["eps_hi"]), grid)


def truncated_ratio(params: dict[str, Any], grid: LogNormalGrid, sign: int) -> Stats:
    """``cispo``: ``c / A = min(r, eps_max)``."""
    m, s, zeros = grid.mean, grid.std, grid.zeros
    eps_max = params["eps_max"]
    b = math.log(eps_max) if eps_max > 0 else -np.inf
    above = ndtr((m - b) / s)
    mean = partial_moment(1.0, -np.inf, b, m, s) + eps_max * above
    second = partial_moment(2.0, -np.inf, b, m, s) + eps_max**2 * above
    return _token_weight({"mean_coefficient": mean, "var_coefficient": variance(mean, second, "var_coefficient"),
                          "dead_fraction": zeros + (1.0 if eps_max == 0 else 0.0)}, grid)


def sequence_ratio(params: dict[str, Any], grid: LogNormalGrid, sign: int) -> Stats:
    """``is-seq``: ``c T / A = W = exp(sum_t l)``, log-normal with the variance of the sum."""
    out = lognormal_weight({"dead_fraction": grid.zeros}, grid.length * grid.mean, grid.sum_variance(), grid.zeros)
    return {**out, "mean_coefficient": out["mean_weight"], "var_coefficient": out["var_weight"]}


def sequence_ppo_clip(params: dict[str, Any], grid: LogNormalGrid, sign: int) -> Stats:
    """``gspo``: PPO's clip of ``s = exp(mean_t l)``, whose log is normal with the variance of the mean."""
    sd = np.sqrt(grid.sum_variance()) / grid.length  # std of mean_t l
    out = _ratio_clip(grid.mean, sd, sign, params["eps_lo"], params["eps_hi"])
    return lognormal_weight(out, grid.mean, sd**2, grid.zeros)


def gmpo(params: dict[str, Any], grid: LogNormalGrid, sign: int) -> Stats:
    """``gmpo``: the geometric mean of the one-sided log-space clip; token factors by partial moments.

    Independent tokens only (the factorisation ``E[w^q] = M(q/L)^L``).
    """
    m, s, L, zeros = grid.mean, grid.std, grid.length, grid.zeros
    k1, k2 = 1.0 / L, 2.0 / L
    if sign > 0:
        a, b = -np.inf, params["eps_hi"]
        tail, edge = ndtr((m - b) / s), b
    else:
        a, b = -params["eps_lo"], np.inf
        tail, edge = ndtr((a - m) / s), a
    c1, c2 = partial_moment(k1, a, b, m, s), partial_moment(k2, a, b, m, s)
    m1, m2 = c1 + np.exp(k1 * edge) * tail, c2 + np.exp(k2 * edge) * tail
    out = geometric_moments(m1 - 1, variance(m1, m2, "var_weight"), c1, variance(c1, c2, "var_coefficient"), L)
    out["dead_fraction"] = tail + zeros
    return {k: v + zeros for k, v in out.items()}
