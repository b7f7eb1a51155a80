"""When a training run failed: the one definition the trainer, the results table and the stability study share.

Three verdicts, one set of criteria and constants:

- **stopped** (the trainer's stop rule, :data:`TRAINER_STOP`): the trainer ends a run at the first step where
  one of these holds (:class:`Monitor` step by step while it trains, :func:`assess` on its metrics rows), and
  writes ``RUN/DIVERGED`` (``{"step", "kind", "reason"}``):

  - ``nonfinite``: the step's reward or entropy (:data:`FINITE_KEYS`) is not finite (``metrics.jsonl`` writes
    them as ``null``), or the policy's parameters are not (:func:`nonfinite_parameters`), or its logits are
    not while it samples (:class:`NonFiniteError`);
  - ``skipped``: more than :data:`MAX_SKIPPED_FRACTION` of the optimiser updates so far were skipped for a
    non-finite loss or gradient, once at least :data:`MIN_UPDATES_JUDGED` were tried (a non-finite loss skips
    its update, so it counts here, not as ``nonfinite``: one is survivable);
  - ``entropy_collapse``: the mean token entropy stayed below :data:`ENTROPY_COLLAPSE_NATS` for
    :data:`ENTROPY_COLLAPSE_STEPS` steps in a row (the policy is deterministic: a group whose samples are all
    the same teaches nothing).

- **diverged** (the results table, :func:`diverged`): the trainer stopped it, or it did not finish, or it
  logged a non-finite reward, entropy or loss, or skipped any update, or its final reward
  (:func:`final_mean`) fell below :data:`REWARD_COLLAPSE_FRACTION` of its initial reward (the mean of its
  first :data:`REWARD_SMOOTHING` steps).

- **unstable** (the stability study, :func:`instability`), from the first step where one of
  :data:`INSTABILITY_KINDS` holds:

  - ``trainer``: the trainer stopped it (any of :data:`TRAINER_STOP`);
  - ``reward_collapse``: the reward's rolling mean over :data:`REWARD_SMOOTHING` steps falls below
    :data:`REWARD_COLLAPSE_FRACTION` of its running peak and stays below it to the end of the run (the step
    reported is where it fell for the last time);
  - ``entropy_collapse``: the token entropy stays below :data:`ENTROPY_COLLAPSE_FRACTION` of its first step's
    value for :data:`ENTROPY_COLLAPSE_STEPS` steps in a row while the reward is below :data:`SOLVED_REWARD`
    (deterministic before the task is solved; the trainer's ``entropy_collapse`` is the absolute floor).

Grad-norm spikes are counted (:func:`sspo_analysis.analysis.spike_count`) but are no failure: a clipped spike
that the run survives is not one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAX_SKIPPED_FRACTION = 0.5
"""Stopped when more than this fraction of the updates so far were skipped."""
MIN_UPDATES_JUDGED = 8
"""The skipped fraction is judged only after this many updates (one early skip is not a verdict)."""
ENTROPY_COLLAPSE_NATS = 1e-3
"""Mean token entropy (nats) below which a step counts towards the trainer's entropy collapse."""
ENTROPY_COLLAPSE_FRACTION = 0.1
"""The study's entropy collapse: the token entropy below this fraction of its first step's value ..."""
ENTROPY_COLLAPSE_STEPS = 3
"""Consecutive low-entropy steps that make an entropy collapse (the trainer's and the study's)."""
SOLVED_REWARD = 0.9
"""A policy this good may be deterministic: its low entropy is not the study's collapse."""
FINITE_KEYS = ("reward_mean", "entropy")
"""Metrics that must be finite at every step (the results table adds ``loss``)."""
REWARD_SMOOTHING = 3
"""Rewards are judged over this many steps (one noisy batch is not a collapse): the study's rolling mean, the
results table's initial reward."""
REWARD_COLLAPSE_FRACTION = 0.5
"""A reward below this fraction of where it stood has collapsed: the study compares the smoothed reward with its
running peak, the results table the final reward with the initial one."""
FINAL_FRACTION = 0.2
"""Final reward and end entropy are means over the last 20 % of steps (at least one step)."""
TRAINER_STOP = ("nonfinite", "skipped", "entropy_collapse")
"""The criteria the trainer stops a run on (``RUN/DIVERGED``'s ``kind``)."""
INSTABILITY_KINDS = ("trainer", "reward_collapse", "entropy_collapse")
"""Criteria of :func:`instability`, in the order they are reported when two trip at the same step."""


# --------------------------------------------------------------------------- the trainer's stop


class NonFiniteError(ArithmeticError):
    """A step met a non-finite number it cannot go on with (NaN or inf logits while sampling): the trainer ends
    the run as diverged (``nonfinite``) instead of failing with a traceback."""


@dataclass(frozen=True)
class Verdict:
    """The trainer's verdict: ``diverged``; if so, the ``step`` it was first seen at, the criterion ``kind`` (one of
    :data:`TRAINER_STOP`) and a readable ``reason``."""

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


# --------------------------------------------------------------------------- the results table's "diverged"


def final_mean(values: Sequence[float], fraction: float = FINAL_FRACTION) -> float:
    """Mean over the last ``fraction`` of the values (at least one); NaN for no values."""
    v = np.asarray(values, dtype=float)
    k = max(1, int(round(len(v) * fraction)))
    return float(np.nanmean(v[-k:])) if len(v) else float("nan")


def diverged(run: Mapping[str, Any], steps: Any) -> bool:
    """Whether a run diverged (see the module's list), from its record and its per-step metrics ``steps`` (a
    DataFrame, sorted by step); the trainer's mark is ``RUN/DIVERGED`` when the record has a ``run_dir``."""
    run_dir = run.get("run_dir")
    if run_dir is not None and (Path(run_dir) / "DIVERGED").exists():
        return True
    if not run.get("done", False) or steps.empty:
        return True
    for key in (*FINITE_KEYS, "loss"):
        if key in steps and not np.isfinite(steps[key].to_numpy(dtype=float)).all():
            return True
    if "skipped_updates" in steps and steps.skipped_updates.fillna(0).sum() > 0:
        return True
    start = float(np.mean(steps.reward_mean.to_numpy(dtype=float)[:REWARD_SMOOTHING]))
    return bool(start > 0 and final_mean(steps.reward_mean) < REWARD_COLLAPSE_FRACTION * start)


# --------------------------------------------------------------------------- the study's "unstable"


def instability(steps: Any, trainer_verdict: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """When, and how, a run became unstable (see the module's list).

    ``steps`` is the run's per-step metrics (``step``, ``reward_mean``, ``entropy``; a DataFrame sorted by
    step) and ``trainer_verdict`` the trainer's ``RUN/DIVERGED`` record (``{"step", "kind", "reason"}``) or
    ``None``. Returns ``unstable``, ``step_unstable`` (``None`` when stable), ``kind`` (one of
    :data:`INSTABILITY_KINDS`, or ``""``).
    """
    found: list[tuple[int, int]] = []  # (step, criterion index)
    if trainer_verdict is not None:
        found.append((int(trainer_verdict.get("step") or 0), 0))
    if len(steps):
        step = steps.step.to_numpy(dtype=int)
        reward = steps.reward_mean.to_numpy(dtype=float)
        for index, at in ((1, _reward_collapse(reward)),
                          (2, _entropy_collapse(steps.entropy.to_numpy(dtype=float), reward))):
            if at is not None:
                found.append((int(step[at]), index))
    if not found:
        return {"unstable": False, "step_unstable": None, "kind": ""}
    at, index = min(found)
    return {"unstable": True, "step_unstable": at, "kind": INSTABILITY_KINDS[index]}


def smoothed_reward(reward: Sequence[float]) -> np.ndarray:
    """The reward's rolling mean over :data:`REWARD_SMOOTHING` steps (fewer at the start; NaN steps skipped)."""
    import pandas as pd

    return pd.Series(np.asarray(reward, dtype=float)).rolling(REWARD_SMOOTHING, min_periods=1).mean().to_numpy()


def _reward_collapse(reward: np.ndarray) -> int | None:
    """Index of the step from which the smoothed reward stays below the collapse line of its running peak."""
    smooth = smoothed_reward(reward)
    peak = np.fmax.accumulate(np.where(np.isfinite(smooth), smooth, -np.inf))
    below = ~(smooth >= REWARD_COLLAPSE_FRACTION * peak)  # NaN counts as below
    if len(below) == 0 or not below[-1] or peak[-1] <= 0:
        return None
    above = np.flatnonzero(~below)
    return int(above[-1] + 1) if above.size else 0


def _entropy_collapse(entropy: np.ndarray, reward: np.ndarray) -> int | None:
    """Index of the first step of :data:`ENTROPY_COLLAPSE_STEPS` low-entropy unsolved steps in a row."""
    if len(entropy) == 0 or not np.isfinite(entropy[0]) or entropy[0] <= 0:
        return None
    low = (entropy < ENTROPY_COLLAPSE_FRACTION * entropy[0]) & (reward < SOLVED_REWARD)
    run = 0
    for i, flag in enumerate(low):
        run = run + 1 if flag else 0
        if run == ENTROPY_COLLAPSE_STEPS:
            return i - ENTROPY_COLLAPSE_STEPS + 1
    return None
