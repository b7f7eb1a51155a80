"""Whether a run diverged: the one definition the trainer, the sweeps and the stability analysis share.

A run diverged at the first step where one of these holds (:func:`assess` on its metrics rows,
or :class:`Monitor` step by step while it trains):

- ``nonfinite``: the step's reward or the policy's entropy is not finite (``metrics.jsonl`` writes
  them as ``null``), or the policy's parameters are not (:func:`nonfinite_parameters`), or its
  logits are not while it samples (:class:`NonFiniteError`);
- ``skipped``: more than :data:`MAX_SKIPPED_FRACTION` of the optimiser updates so far were skipped
  for a non-finite loss or gradient, once at least :data:`MIN_UPDATES_JUDGED` updates were tried
  (a non-finite loss skips its update, so it counts here, not as ``nonfinite``: one is survivable);
- ``entropy_collapse``: the mean token entropy stayed below :data:`ENTROPY_COLLAPSE_NATS` for
  :data:`ENTROPY_COLLAPSE_STEPS` consecutive steps (the policy has become deterministic; nothing
  more is learned from a group whose samples are all the same).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

MAX_SKIPPED_FRACTION = 0.5
"""Diverged when more than this fraction of the updates so far were skipped."""
MIN_UPDATES_JUDGED = 8
"""The skipped fraction is judged only after this many updates (one early skip is not a verdict)."""
ENTROPY_COLLAPSE_NATS = 1e-3
"""Mean token entropy (nats) below which a step counts towards an entropy collapse."""
ENTROPY_COLLAPSE_STEPS = 3
"""Consecutive steps below :data:`ENTROPY_COLLAPSE_NATS` that make a collapse."""
FINITE_KEYS = ("reward_mean", "entropy")
"""Metrics that must be finite at every step."""


class NonFiniteError(ArithmeticError):
    """A step met a non-finite number it cannot go on with (NaN or inf logits while sampling): the trainer ends
    the run as diverged (``nonfinite``) instead of failing with a traceback."""


@dataclass(frozen=True)
class Verdict:
    """``diverged``; if so, the ``step`` it was first seen at, the criterion ``kind`` and a readable ``reason``."""

    diverged: bool
    step: int | None = None
    kind: str = ""
    reason: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "kind": self.kind, "reason": self.reason}


HEALTHY = Verdict(False)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class Monitor:
    """Feeds metrics rows one step at a time; :meth:`update` returns the first divergence, then keeps it."""

    def __init__(self, updates_per_step: int) -> None:
        self.updates_per_step = updates_per_step
        self.updates = 0
        self.skipped = 0
        self.low_entropy_steps = 0
        self.verdict = HEALTHY

    def update(self, row: Mapping[str, Any]) -> Verdict:
        """Judge one step's metrics row (``step``, ``skipped_updates``, ``entropy``, ``reward_mean``)."""
        if self.verdict.diverged:
            return self.verdict
        step = int(row.get("step", 0))
        bad = [k for k in FINITE_KEYS if k in row and not _finite(row[k])]
        self.updates += self.updates_per_step
        self.skipped += int(row.get("skipped_updates") or 0)
        entropy = row.get("entropy")
        self.low_entropy_steps = self.low_entropy_steps + 1 if _finite(entropy) and entropy < ENTROPY_COLLAPSE_NATS \
            else 0
        if bad:
            self.verdict = Verdict(True, step, "nonfinite", f"non-finite {', '.join(bad)} at step {step}")
        elif self.updates >= MIN_UPDATES_JUDGED and self.skipped > MAX_SKIPPED_FRACTION * self.updates:
            self.verdict = Verdict(True, step, "skipped", f"{self.skipped} of {self.updates} updates skipped "
                                   f"(non-finite loss or gradient) by step {step}")
        elif self.low_entropy_steps >= ENTROPY_COLLAPSE_STEPS:
            self.verdict = Verdict(True, step, "entropy_collapse",
                                   f"entropy below {ENTROPY_COLLAPSE_NATS:g} nats for {self.low_entropy_steps} "
                                   f"steps (step {step}: {entropy:.2e})")
        return self.verdict


def assess(rows: Iterable[Mapping[str, Any]], updates_per_step: int) -> Verdict:
    """The :class:`Verdict` on a run's metrics rows in step order (``updates_per_step``: ``algo.updates_per_batch``)."""
    monitor = Monitor(updates_per_step)
    for row in rows:
        if monitor.update(row).diverged:
            break
    return monitor.verdict


def nonfinite_parameters(model: Any) -> list[str]:
    """Names of ``model``'s parameters holding a NaN or an infinity (a torch module)."""
    import torch

    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]


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
