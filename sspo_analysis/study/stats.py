"""Statistics for comparing objectives over paired seeds: bootstrap intervals and exact paired tests.

Two runs with the same seed share the warm start, the prompts and the sampling
noise of their first rollout, so objectives are compared *within* a seed: the
per-seed difference is the unit. With five to ten seeds the tests are exact:

- :func:`mean_ci`: the mean over seeds with a percentile-bootstrap interval
  (``scipy.stats.bootstrap``);
- :func:`paired_difference`: the mean of the per-seed differences ``x - y``, its
  bootstrap interval, and the two-sided p-value of the sign-flip permutation test
  (``scipy.stats.permutation_test``, all ``2**n`` sign patterns enumerated), which
  assumes only that the differences are symmetric about zero under the null.

A difference is called significant only when ``p < ALPHA`` *and* the interval
excludes zero; otherwise the verdict says "no significant difference".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

CONFIDENCE = 0.95
"""Level of every interval."""
ALPHA = 0.05
"""Significance level of the paired tests."""
N_RESAMPLES = 9999
"""Bootstrap resamples."""


def _clean(values: Sequence[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return v[np.isfinite(v)]


def mean_ci(values: Sequence[float], seed: int = 0) -> tuple[float, float, float]:
    """``(mean, ci_low, ci_high)`` over the finite ``values``: a 95% percentile-bootstrap interval of the mean.

    One value gives a NaN interval; identical values give a zero-width one.
    """
    from scipy.stats import bootstrap

    v = _clean(values)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    mean = float(v.mean())
    if v.size < 2:
        return mean, float("nan"), float("nan")
    if np.ptp(v) == 0:
        return mean, mean, mean
    res = bootstrap((v,), np.mean, confidence_level=CONFIDENCE, n_resamples=N_RESAMPLES, method="percentile",
                    rng=np.random.default_rng(seed))
    return mean, float(res.confidence_interval.low), float(res.confidence_interval.high)


def sign_flip_p(differences: Sequence[float]) -> float:
    """Two-sided p-value that the paired ``differences`` are centred on zero (exact sign-flip test of the mean)."""
    from scipy.stats import permutation_test

    d = _clean(differences)
    if d.size == 0:
        return float("nan")
    if not np.any(d) or d.size < 2:  # one pair: its two sign patterns are equally extreme, p = 1
        return 1.0
    res = permutation_test((d,), np.mean, permutation_type="samples", alternative="two-sided",
                           n_resamples=np.inf if d.size <= 16 else N_RESAMPLES, rng=np.random.default_rng(0))
    return float(min(1.0, res.pvalue))


def paired_difference(x: Sequence[float], y: Sequence[float], seed: int = 0) -> dict[str, float | int | str]:
    """Compare ``x`` with ``y`` paired by position (one entry per seed; pairs with a NaN are dropped).

    Returns ``n`` (pairs), ``diff`` (mean of ``x - y``), ``ci_low``, ``ci_high`` (its
    bootstrap interval), ``p_value`` (:func:`sign_flip_p`) and ``verdict``:
    ``"higher"``, ``"lower"`` or ``"no significant difference"``.
    """
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: x and y need one value per seed each, got {a.size} and {b.size}")
    ok = np.isfinite(a) & np.isfinite(b)
    d = a[ok] - b[ok]
    mean, low, high = mean_ci(d, seed)
    p = sign_flip_p(d)
    significant = bool(p < ALPHA and np.isfinite(low) and (low > 0 or high < 0))
    verdict = ("higher" if mean > 0 else "lower") if significant else "no significant difference"
    return {"n": int(d.size), "diff": mean, "ci_low": low, "ci_high": high, "p_value": p, "verdict": verdict}


def fraction_ci(flags: Sequence[float]) -> tuple[float, float, float]:
    """``(fraction, ci_low, ci_high)`` of the finite 0/1 ``flags``: the exact (Clopper-Pearson) 95% interval.

    A bootstrap of 10/10 gives the zero-width [1, 1]; the exact interval is [0.69, 1].
    """
    from scipy.stats import binomtest

    v = _clean(flags)
    if v.size == 0:
        return float("nan"), float("nan"), float("nan")
    k = int(round(v.sum()))
    ci = binomtest(k, v.size).proportion_ci(confidence_level=CONFIDENCE, method="exact")
    return k / v.size, float(ci.low), float(ci.high)


def spearman_permutation(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman's rho of ``x`` and ``y`` and its two-sided permutation p-value (ties allowed; NaN without spread).

    The asymptotic p-value of ``scipy.stats.spearmanr`` is not valid for a dozen points with
    heavy ties (an instability rate is mostly 0 or 1); shuffling the pairing is.
    """
    from scipy.stats import permutation_test, spearmanr

    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if a.size < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan"), float("nan")
    res = permutation_test((a, b), lambda u, v: spearmanr(u, v).statistic, permutation_type="pairings",
                           n_resamples=N_RESAMPLES, alternative="two-sided", rng=np.random.default_rng(0))
    return float(res.statistic), float(res.pvalue)
