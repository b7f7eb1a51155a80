"""Theory: what each objective's gating does to the gradient, before any training.

Models of the token log-ratio (:class:`LogNormalRatios`, :class:`EmpiricalRatios`),
the moments of every objective's gradient coefficient and importance weight
(:func:`analyse`, by closed form, composite Gauss-Legendre quadrature or Monte Carlo) and
tidy grids of them (:func:`sweep`). The notation and the formulas are stated in
``docs/theory.md`` ("The log-normal model"); every gate and objective comes from
:mod:`sspo_analysis.objectives`, where each objective declares the analytic
methods that hold for it (``register_objective(..., theory=...)``). The
reference estimators and :func:`resolve_objective` live there too and are
re-exported here.

Example: the sequence importance weight's variance, against its closed form
``exp(L s^2) - 1`` (``docs/theory.md``, section 7)::

    >>> import math
    >>> from sspo_analysis.theory import LogNormalRatios, analyse
    >>> r = analyse("is-seq", LogNormalRatios(0.3, length=16))  # W = exp(sum_t l): Var[W] = e^(L s^2) - 1
    >>> r.method, round(r.var_coefficient, 4), round(math.expm1(16 * 0.3**2), 4)
    ('closed-form', 3.2207, 3.2207)
"""

from sspo_analysis.objectives import REFERENCE_ESTIMATORS, all_objective_names, resolve_objective
from sspo_analysis.theory.analysis import METHODS, RESULT_KEYS, STATS, TheoryResult, analyse, available_methods, sweep
from sspo_analysis.theory.models import EmpiricalRatios, LogNormalRatios

__all__ = [
    "METHODS",
    "REFERENCE_ESTIMATORS",
    "RESULT_KEYS",
    "STATS",
    "EmpiricalRatios",
    "LogNormalRatios",
    "TheoryResult",
    "all_objective_names",
    "analyse",
    "available_methods",
    "resolve_objective",
    "sweep",
]
