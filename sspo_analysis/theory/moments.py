"""Variances that cannot come out negative, and Monte Carlo sums streamed in bounded memory.

**Variances.** ``E[X^2] - E[X]^2`` loses its digits to cancellation when the
variance is small against ``E[X]^2``, and rounding can then leave it slightly
negative (``-2.2e-16`` for a weight of mean 1). The theory therefore computes a
variance in a centred form wherever one exists, non-negative by construction:
the quadrature of ``(x - E[x])^2``, ``E[X]^2 expm1(...)`` for log-normal and
geometric-mean weights, centred running sums in Monte Carlo. Where only the raw
moments exist (the log-normal partial moments of the hard clips),
:func:`variance` clamps a negative at zero only within :data:`VARIANCE_RTOL` of
the terms subtracted, and a larger negative is an error: it means the two
moments are inconsistent, not rounded.

**Streaming.** :class:`MonteCarloSums` keeps what Monte Carlo needs as running
sums merged chunk by chunk (Chan, Golub and LeVeque's pairwise update of means
and centred co-moments): a fixed few dozen floats whatever the number of
samples, where a list of per-sequence sums grew by 56 bytes per sequence. The
estimators are the ratio estimators over independent units (sequences, or
batches) with delta-method standard errors, as before; only the order of the
floating-point additions differs.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["VARIANCE_RTOL", "MonteCarloSums", "clamp_variance", "variance"]

VARIANCE_ULPS = 2048
"""Rounding a variance may carry, in units in the last place of the larger term subtracted.

Each raw moment of the closed forms is ``exp(x) P`` with ``|x| < 709`` (beyond,
it overflows and :func:`sspo_analysis.theory.analyse` refuses the point); the
rounding of ``x`` becomes a relative error of up to ``|x|`` ulps in ``exp(x)``,
so the difference of two such moments is off by up to about ``2 x 709 + a few``
ulps of the larger one. 2048 covers that.
"""
VARIANCE_RTOL = VARIANCE_ULPS * float(np.finfo(np.float64).eps)
"""A negative variance within this fraction (4.5e-13) of the terms subtracted is rounding, clamped to 0."""

# Columns of the per-unit sums: tokens, sum and sum of squares of the coefficient, dead tokens, sum and sum of
# squares of the weight, and the weight's count (tokens for token weights, 1 for a sequence weight).
_T, _S1, _S2, _D, _W1, _W2, _WN = range(7)
UNIT_COLUMNS = 7


def clamp_variance(var: np.ndarray, scale: np.ndarray, name: str = "variance") -> np.ndarray:
    """``var`` with negatives within ``VARIANCE_RTOL * scale`` set to 0; a larger negative is a ValueError.

    ``scale`` is the magnitude of the terms whose difference ``var`` is (``max(E[X^2], E[X]^2)``). Non-finite
    values pass through unchanged, for the caller's range check to report.
    """
    var, scale = np.asarray(var, dtype=float), np.asarray(scale, dtype=float)
    with np.errstate(over="ignore", invalid="ignore"):
        tol = VARIANCE_RTOL * np.abs(scale)
        rounding = (var < 0) & np.isfinite(tol) & (var >= -tol)
        wrong = np.isfinite(var) & np.isfinite(tol) & (var < -tol)
    if np.any(wrong):
        i = np.unravel_index(np.argmax(np.where(wrong, -var / np.where(tol > 0, tol, 1.0), -np.inf)), var.shape)
        raise ValueError(f"{name}: {float(var[i]):.3g} is negative beyond rounding (tolerance {VARIANCE_RTOL:.1e} "
                         f"x {float(scale[i] if scale.ndim else scale):.3g}, the terms subtracted): the moments "
                         "are inconsistent")
    return np.where(rounding, 0.0, var)


def variance(mean: np.ndarray, second: np.ndarray, name: str = "variance") -> np.ndarray:
    """``second - mean^2`` from raw moments, clamped at 0 only within rounding (:func:`clamp_variance`)."""
    with np.errstate(over="ignore", invalid="ignore"):
        square = np.asarray(mean, dtype=float) ** 2
        return clamp_variance(second - square, np.maximum(np.abs(second), square), name)


class _CentredSum:
    """Count, mean and sum of squared deviations of masked values, merged chunk by chunk."""

    def __init__(self) -> None:
        self.count, self.mean, self.squares = 0.0, 0.0, 0.0

    def add(self, values: torch.Tensor, mask: torch.Tensor) -> None:
        count = float(mask.sum())
        if count == 0:
            return
        mean = float(torch.where(mask, values, 0.0).sum()) / count
        squares = float(torch.where(mask, values - mean, 0.0).square().sum())
        total = self.count + count
        delta = mean - self.mean
        self.squares += squares + delta * delta * self.count * count / total
        self.mean += delta * count / total
        self.count = total

    @property
    def variance(self) -> float:
        return self.squares / self.count if self.count else math.nan


class _UnitSums:
    """Count, means and centred co-moment matrix of per-unit sums, merged chunk by chunk."""

    def __init__(self, width: int) -> None:
        self.n = 0
        self.mean = np.zeros(width)
        self.comoment = np.zeros((width, width))

    def add(self, columns: np.ndarray) -> None:
        """One chunk of units, ``columns`` (width, units): one row per sum, contiguous."""
        count = columns.shape[1]
        if count == 0:
            return
        total = self.n + count
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is the caller's to report, as inf or NaN
            mean = columns.mean(axis=1)
            dev = columns - mean[:, None]
            delta = mean - self.mean
            self.comoment += dev @ dev.T + np.outer(delta, delta) * (self.n * count / total)
            self.mean += delta * (count / total)
        self.n = total

    def stderr(self, coef: np.ndarray, total: float) -> float:
        """``sqrt(sum_i psi_i^2 n / (n - 1)) / total`` for ``psi_i = coef . row_i`` (zero-mean up to rounding)."""
        with np.errstate(over="ignore", invalid="ignore"):
            squares = coef @ self.comoment @ coef + self.n * float(coef @ self.mean) ** 2
        return math.sqrt(max(float(squares), 0.0) * self.n / max(self.n - 1, 1)) / total


class MonteCarloSums:
    """What a Monte Carlo estimate needs, streamed: memory fixed whatever the number of units.

    Each unit (a sequence, or a batch of them) contributes
    :data:`UNIT_COLUMNS` sums (tokens ``T``, ``sum x``, ``sum x^2``, dead tokens,
    ``sum w``, ``sum w^2``, the weight's count); the coefficient ``x`` and the
    weight ``w`` of every token also go into centred running sums, so the
    variances come out non-negative. :meth:`stats` gives the ratio estimators
    over units and their delta-method standard errors.
    """

    def __init__(self) -> None:
        self.units = _UnitSums(UNIT_COLUMNS)
        self.coefficient = _CentredSum()
        self.weight = _CentredSum()

    @property
    def n_units(self) -> int:
        return self.units.n

    def add(self, columns: np.ndarray, coefficient: tuple[torch.Tensor, torch.Tensor],
            weight: tuple[torch.Tensor, torch.Tensor]) -> None:
        """One chunk: per-unit sums ``columns`` (7, units) and the ``(values, mask)`` of its coefficients and
        weights."""
        self.units.add(np.asarray(columns, dtype=np.float64))
        self.coefficient.add(*coefficient)
        self.weight.add(*weight)

    def stats(self) -> tuple[dict[str, float], dict[str, float]]:
        """The six statistics and their standard errors, keyed as ``sspo_analysis.theory.STATS``.

        An overflow comes out as inf or NaN, for the caller's range check to report.
        """
        with np.errstate(all="ignore"):
            coef = self._moments(_T, _S1, _S2, self.coefficient.variance)
            weight = self._moments(_WN, _W1, _W2, self.weight.variance)
            tokens = self.units.n * self.units.mean[_T]
            dead = self.units.mean[_D] / self.units.mean[_T]
            dead_se = self.units.stderr(self._coef({_D: 1.0, _T: -dead}), tokens)
        pairs = {"mean_coefficient": coef["mean"], "var_coefficient": coef["var"], "dead_fraction": (dead, dead_se),
                 "mean_weight": weight["mean"], "var_weight": weight["var"], "ess_fraction": weight["ess"]}
        return {k: float(v[0]) for k, v in pairs.items()}, {k: float(v[1]) for k, v in pairs.items()}

    @staticmethod
    def _coef(entries: dict[int, float]) -> np.ndarray:
        out = np.zeros(UNIT_COLUMNS)
        for col, value in entries.items():
            out[col] += value
        return out

    def _moments(self, den: int, first: int, second_col: int, var: float) -> dict[str, tuple[float, float]]:
        """Mean, variance and ``E[x]^2 / E[x^2]`` of one quantity, with delta-method errors.

        The influence of a unit on the mean is ``d1 = S1 - mean T``, on the raw second moment
        ``d2 = S2 - second T``; the variance's is ``d2 - 2 mean d1``, the ESS's
        ``2 mean / second d1 - mean^2 / second^2 d2`` (all over the total count).
        """
        u = self.units
        total = u.n * u.mean[den]
        mean, second = u.mean[first] / u.mean[den], u.mean[second_col] / u.mean[den]
        d1 = self._coef({first: 1.0, den: -mean})
        d2 = self._coef({second_col: 1.0, den: -second})
        ess = mean**2 / second
        ess_coef = 2 * mean / second * d1 - mean**2 / second**2 * d2
        return {"mean": (mean, u.stderr(d1, total)), "var": (var, u.stderr(d2 - 2 * mean * d1, total)),
                "ess": (ess, u.stderr(ess_coef, total))}
