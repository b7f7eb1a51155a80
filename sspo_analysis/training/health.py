"""Whether a run learns: the no-signal warning, said once when a run's first steps give every group one reward.

That is not a failure (the run goes on); what stops or fails a run is defined in :mod:`sspo_analysis.failure`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

NO_SIGNAL_STEPS = 5
"""A run whose first this many steps give every group one reward (``zero_std_frac`` 1) is warned about."""


def no_signal(rows: Iterable[Mapping[str, Any]], steps: int = NO_SIGNAL_STEPS) -> str:
    """Why a run learns nothing, or ``""``: when each of its first ``steps`` metrics rows has zero reward variance
    in every group (``zero_std_frac`` 1), every advantage is 0 and the policy never moves. This is not a
    divergence (the run goes on); it is said once, with the likely causes, and in the end-of-run summary."""
    first = [row for row, _ in zip(rows, range(steps))]
    if len(first) < steps or any(row.get("zero_std_frac") != 1.0 for row in first):
        return ""
    rewards = sorted({round(float(row.get("reward_mean") or 0.0), 6) for row in first})
    return (f"no learning signal: every group of the first {steps} steps got one reward for all its samples "
            f"(mean reward {', '.join(f'{r:g}' for r in rewards)}), so every advantage is 0. Likely causes: the "
            "grader (task.grader: 'exact' compares whole strings; GSM8K-style answers need 'number' or 'math'), "
            "the chat template (task.chat_template: an instruct model expects its chat format), or the answer "
            "format (what the model writes against what the data holds, e.g. '#### 72' or '\\boxed{72}'); "
            "or a task too hard for the model (a random model scores 0)")


class SignalWatch:
    """Feeds metrics rows one step at a time; :meth:`update` returns :func:`no_signal`'s message once, at the
    step it becomes true, and ``""`` otherwise (``message`` keeps it for the end-of-run summary)."""

    def __init__(self, steps: int = NO_SIGNAL_STEPS) -> None:
        self.steps = steps
        self.rows: list[Mapping[str, Any]] = []
        self.message = ""

    def update(self, row: Mapping[str, Any]) -> str:
        """Judge one step's metrics row; the message the first time the run is found to have no signal."""
        if len(self.rows) >= self.steps:
            return ""
        self.rows.append(row)
        self.message = no_signal(self.rows, self.steps)
        return self.message
