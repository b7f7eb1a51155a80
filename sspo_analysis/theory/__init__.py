"""Theory: what each objective's gating does to the gradient, before any training.

Models of the token log-ratio (:class:`LogNormalRatios`, :class:`EmpiricalRatios`),
the moments of every objective's gradient coefficient and importance weight
(:func:`analyse`, by closed form, Gauss-Hermite quadrature or Monte Carlo) and
tidy grids of them (:func:`sweep`). The formulas are derived in ``docs/theory.md``
("The log-normal model"); every gate and objective comes from
:mod:`sspo_analysis.objectives`.

Example: the sequence importance weight's variance, against its closed form
``exp(L s^2) - 1`` (``docs/theory.md``, section 7)::

    >>> import math
    >>> from sspo_analysis.theory import LogNormalRatios, analyse
    >>> r = analyse("is-seq", LogNormalRatios(0.3, length=16))
    >>> round(r.var_weight, 4), round(math.expm1(16 * 0.3**2), 4), r.method
    (3.2207, 3.2207, 'closed-form')
"""

from sspo_analysis.theory.analysis import METHODS, RESULT_KEYS, STATS, TheoryResult, analyse, available_methods, sweep
from sspo_analysis.theory.estimators import REFERENCE_ESTIMATORS, all_objective_names, resolve_objective
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
