"""Simulators where the theory meets the dynamics, on CPU in seconds.

- :func:`run_bandit`: a softmax bandit trained by any objective; per step the
  entropy, the reward and the entropy change, predicted to first order and realised.
- :func:`staleness_study`: a tabular autoregressive policy; the bias and
  variance of each objective's gradient estimate against the exact on-policy
  gradient (by enumeration) as the policy lag grows.

Objective names resolve through :func:`sspo_analysis.objectives.resolve_objective`
(the reference estimators ``is-token`` and ``is-seq`` included); the advantages
and the entropy are :mod:`sspo_analysis.primitives`'.
"""

from sspo_analysis.simulation.bandit import entropy_change_first_order, run_bandit
from sspo_analysis.simulation.sequence import TabularPolicy, staleness_study

__all__ = [
    "TabularPolicy",
    "entropy_change_first_order",
    "run_bandit",
    "staleness_study",
]
