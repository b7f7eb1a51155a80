"""Simulators where the theory meets the dynamics, on CPU in seconds.

- :func:`run_bandit`: a softmax bandit trained by any objective; per step the
  entropy, the reward and the entropy change, predicted to first order and realised.
- :func:`staleness_study`: a tabular autoregressive policy; the bias and
  variance of each objective's gradient estimate against the exact on-policy
  gradient (by enumeration) as the policy lag grows; :func:`staleness_data`: that
  study for several objectives on the same samples, stacked in one table.

Objective names resolve through :func:`sspo_analysis.objectives.resolve_objective`
(the reference estimators ``is-token`` and ``is-seq`` included); the advantages
and the entropy are :mod:`sspo_analysis.primitives`'.

The names load on first use (:mod:`sspo_analysis.lazy`), so ``sspo --help`` imports no torch.
"""

from sspo_analysis.lazy import lazy_exports

_MODULES = {
    "sspo_analysis.simulation.bandit": ("entropy_change_first_order", "run_bandit"),
    "sspo_analysis.simulation.sequence": ("TabularPolicy", "staleness_data", "staleness_study"),
}
__all__ = sorted(n for names in _MODULES.values() for n in names)
__getattr__, __dir__ = lazy_exports(__name__, {n: m for m, names in _MODULES.items() for n in names})
