"""Mean over seeds with a confidence band: what the training figures draw instead of one line per seed."""

from __future__ import annotations

from typing import Any

import numpy as np

CI_LEVEL = 0.95
"""The confidence level of every band (a t interval of the mean over seeds)."""


def mean_ci(values: Any, level: float = CI_LEVEL, log: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and t confidence interval of the mean over the last axis (the seeds), ignoring NaN.

    ``values`` is ``(n_points, n_seeds)``. With ``log`` the interval is computed on
    ``log(values)`` (non-positive values dropped) and mapped back: a geometric mean
    with a multiplicative band, for quantities drawn on a log axis. Where fewer
    than two seeds have a value the band is the mean itself (no interval).
    Returns ``(mean, low, high)``, each ``(n_points,)``.
    """
    from scipy.stats import t

    vals = np.asarray(values, dtype=float)
    if log:
        vals = np.log(np.where(vals > 0, vals, np.nan))
    finite = np.isfinite(vals)
    n = finite.sum(axis=-1)
    filled = np.where(finite, vals, 0.0)
    mean = np.where(n > 0, filled.sum(axis=-1) / np.maximum(n, 1), np.nan)
    sq = np.where(finite, (filled - mean[..., None]) ** 2, 0.0).sum(axis=-1)
    sd = np.sqrt(sq / np.maximum(n - 1, 1))
    half = np.where(n > 1, t.ppf(0.5 + level / 2, np.maximum(n - 1, 1)) * sd / np.sqrt(np.maximum(n, 1)), 0.0)
    lo, hi = mean - half, mean + half
    if log:
        return np.exp(mean), np.exp(lo), np.exp(hi)
    return mean, lo, hi


def poisson_mean_ci(counts: Any, level: float = CI_LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean count per run and its exact (Garwood) Poisson interval, over the last axis (the seeds), ignoring NaN.

    For a total of ``S`` events in ``n`` runs the interval of the rate is
    ``[chi2(a/2; 2S) / 2, chi2(1 - a/2; 2S + 2) / 2] / n``: never below zero, and
    not zero-width at ``S = 0`` (three runs without a spike allow up to 1.23 per run).
    Returns ``(mean, low, high)``, each ``(n_points,)``; NaN where no run has a count.
    """
    from scipy.stats import chi2

    vals = np.asarray(counts, dtype=float)
    finite = np.isfinite(vals)
    n = finite.sum(axis=-1)
    total = np.where(finite, vals, 0.0).sum(axis=-1)
    alpha = 1.0 - level
    with np.errstate(invalid="ignore", divide="ignore"):
        lo = np.where(total > 0, chi2.ppf(alpha / 2, 2 * total) / 2, 0.0) / n
        hi = chi2.ppf(1 - alpha / 2, 2 * total + 2) / 2 / n
        mean = total / n
    none = n == 0
    return (np.where(none, np.nan, mean), np.where(none, np.nan, lo), np.where(none, np.nan, hi))


def band_label(n_seeds: int, level: float = CI_LEVEL, log: bool = False) -> str:
    """What a band means, in words for the figure: ``"band: 95 % t CI of the mean over 3 seeds"``."""
    what = "geometric mean" if log else "mean"
    if n_seeds < 2:
        return f"one seed: no band ({what} of 1 seed)"
    return f"line: {what} over {n_seeds} seeds; band: {level:.0%} t CI of the {what}"
