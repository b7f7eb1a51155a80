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


def band_label(n_seeds: int, level: float = CI_LEVEL, log: bool = False) -> str:
    """What a band means, in words for the figure: ``"band: 95 % t CI of the mean over 3 seeds"``."""
    what = "geometric mean" if log else "mean"
    if n_seeds < 2:
        return f"one seed: no band ({what} of 1 seed)"
    return f"line: {what} over {n_seeds} seeds; band: {level:.0%} t CI of the {what}"
