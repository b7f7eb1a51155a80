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

The names load on first use (:mod:`sspo_analysis.lazy`), so ``sspo --help`` imports no torch.
"""

from sspo_analysis.lazy import lazy_exports

_MODULES = {
    "sspo_analysis.objectives": ("REFERENCE_ESTIMATORS", "all_objective_names", "resolve_objective"),
    "sspo_analysis.theory.analysis": ("METHODS", "RESULT_KEYS", "STATS", "TheoryResult", "analyse",
                                      "available_methods", "sweep"),
    "sspo_analysis.theory.models": ("EmpiricalRatios", "LogNormalRatios"),
}
__all__ = sorted(n for names in _MODULES.values() for n in names)
__getattr__, __dir__ = lazy_exports(__name__, {n: m for m, names in _MODULES.items() for n in names})
