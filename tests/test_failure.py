"""The one definition of failure (sspo_analysis.failure): the trainer's stop, the results table's "diverged" and the
study's "unstable" on hand-built metric curves, each verdict worked out by hand from the constants below; each
criterion applied at the step it first holds, and a run whose updates are all skipped marked diverged."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from test_runs import FAST, _sets

from sspo_analysis import analysis, failure
from sspo_analysis.cli import main
from sspo_analysis.failure import ENTROPY_COLLAPSE_NATS, ENTROPY_COLLAPSE_STEPS, Monitor, assess, diverged, instability
from sspo_analysis.training import read_metrics, train


def test_the_constants_the_cases_below_were_worked_out_with():
    assert (failure.MAX_SKIPPED_FRACTION, failure.MIN_UPDATES_JUDGED) == (0.5, 8)
    assert (failure.ENTROPY_COLLAPSE_NATS, failure.ENTROPY_COLLAPSE_STEPS) == (1e-3, 3)
    assert (failure.ENTROPY_COLLAPSE_FRACTION, failure.SOLVED_REWARD) == (0.1, 0.9)
    assert (failure.REWARD_SMOOTHING, failure.REWARD_COLLAPSE_FRACTION, failure.FINAL_FRACTION) == (3, 0.5, 0.2)
    assert failure.TRAINER_STOP == ("nonfinite", "skipped", "entropy_collapse")


def _frame(reward, entropy, skipped=None) -> pd.DataFrame:
    n = len(reward)
    return pd.DataFrame({"step": np.arange(1, n + 1), "reward_mean": np.asarray(reward, dtype=float),
                         "entropy": np.asarray(entropy, dtype=float), "loss": np.zeros(n),
                         "skipped_updates": np.zeros(n, dtype=int) if skipped is None else np.asarray(skipped)})


def _rows(frame: pd.DataFrame) -> list[dict]:
    """The frame as metrics.jsonl rows (a non-finite number is written as null)."""
    return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
            for row in frame.astype(object).to_dict("records")]


FINISHED = {"done": True}

# Each case: (reward, entropy, skipped updates per step), and by hand:
# (trainer stop: kind and step, or None), results-table diverged, study verdict.
STABLE = ([0.2 + 0.05 * i for i in range(10)], [1.0] * 10, None)
# Trainer: every number finite, no skip, entropy 1.0 >= 1e-3: no stop. Table: initial reward mean(.2, .25, .3) = .25,
# final reward mean of the last 20 % (2 steps: .6, .65) = .625 >= .5 x .25. Study: the rising smoothed reward never
# falls under half its running peak; the entropy never under .1 x 1.0.
COLLAPSE = ([0.6] * 5 + [0.1] * 5, [1.0] * 10, None)
# Trainer: no stop. Table: initial .6, final mean(.1, .1) = .1 < .5 x .6 = .3: diverged. Study: rolling means
# .6 .6 .6 .6 .6 .433 .267 .1 .1 .1, peak .6, line .3: step 6 (.433) is above it; from step 7 below, to the end.
ENTROPY = ([0.3] * 8, [1.0, 0.5, 0.05, 0.05, 0.05, 0.05, 0.05, 0.05], None)
# Trainer: .05 >= 1e-3 nats, no stop. Table: initial .3, final .3: not diverged. Study: steps 3, 4, 5 are under
# .1 x 1.0 with reward .3 < .9, three in a row: entropy collapse from step 3.
SKIPPED = ([0.3] * 6, [1.0] * 6, [2] * 6)
# Trainer (2 updates a step): after step 4, 8 updates tried (>= 8), 8 skipped > .5 x 8: stopped at step 4 ("skipped").
# Table: a skipped update: diverged. Study: reward and entropy flat: only the trainer's verdict, at step 4.
NAN_REWARD = ([0.3, 0.3, 0.3, math.nan], [1.0] * 4, None)
# Trainer: step 4's reward is not finite: stopped at step 4 ("nonfinite"). Table: a non-finite reward: diverged.
# Study: the rolling mean skips the NaN (.3 at step 4), so no reward collapse: the trainer's verdict, at step 4.
FLOOR = ([0.3] * 5, [1.0, 0.5, 1e-4, 1e-4, 1e-4], None)
# Trainer: entropy under 1e-3 nats at steps 3, 4, 5: stopped at step 5 ("entropy_collapse"). Study: the same steps are
# under .1 x 1.0 from step 3, before the trainer's step 5: entropy_collapse at step 3.

CASES = {
    "stable": (STABLE, None, False, None),
    "reward collapse": (COLLAPSE, None, True, ("reward_collapse", 7)),
    "entropy collapse": (ENTROPY, None, False, ("entropy_collapse", 3)),
    "trainer stop, skipped": (SKIPPED, ("skipped", 4), True, ("trainer", 4)),
    "trainer stop, non-finite": (NAN_REWARD, ("nonfinite", 4), True, ("trainer", 4)),
    "trainer stop, entropy floor": (FLOOR, ("entropy_collapse", 5), True, ("entropy_collapse", 3)),
}


def _study(want) -> dict:
    if want is None:
        return {"unstable": False, "step_unstable": None, "kind": ""}
    return {"unstable": True, "step_unstable": want[1], "kind": want[0]}


def test_each_verdict_on_hand_built_curves():
    for name, ((reward, entropy, skipped), stop, table, study) in CASES.items():
        frame = _frame(reward, entropy, skipped)
        verdict = assess(_rows(frame), updates_per_step=2)
        assert (verdict.kind, verdict.step) == (stop if stop else ("", None)), name
        assert diverged({"done": stop is None}, frame) is table, name  # a stopped run never finishes
        marker = verdict.to_dict() if verdict.diverged else None
        assert instability(frame, marker) == _study(study), name


def test_the_trainer_mark_alone_makes_a_finished_healthy_run_diverged(tmp_path):
    frame = _frame(*STABLE)
    assert not diverged({**FINISHED, "run_dir": tmp_path}, frame)
    (tmp_path / "DIVERGED").write_text('{"step": 4, "kind": "nonfinite", "reason": "x"}')
    assert diverged({**FINISHED, "run_dir": tmp_path}, frame)


def test_the_monitor_keeps_its_first_verdict():
    monitor = Monitor(updates_per_step=2)
    rows = _rows(_frame(*NAN_REWARD))
    verdicts = [monitor.update(row) for row in rows + [{"step": 5, "reward_mean": 0.3, "entropy": 1.0}]]
    assert [v.diverged for v in verdicts] == [False, False, False, True, True]
    assert verdicts[-1].step == 4 and verdicts[-1].reason == "non-finite reward_mean at step 4"


def test_the_analysis_and_the_study_read_the_same_definition():
    # summarise_run's diverged column and the study's instability are this module's, not copies
    assert analysis.diverged is diverged and analysis.instability is instability
    assert analysis.final_mean is failure.final_mean and analysis.smoothed_reward is failure.smoothed_reward


def test_assess_applies_each_criterion_at_the_step_it_first_holds():
    ok = {"reward_mean": 0.5, "entropy": 1.0, "skipped_updates": 0}
    rows = [dict(ok, step=s) for s in range(1, 6)]
    assert not assess(rows, 2).diverged
    nan = [*rows[:2], dict(ok, step=3, entropy=None), *rows[3:]]
    assert (assess(nan, 2).kind, assess(nan, 2).step) == ("nonfinite", 3)
    low = [dict(ok, step=s, entropy=ENTROPY_COLLAPSE_NATS / 2 if s > 1 else 1.0) for s in range(1, 8)]
    assert (assess(low, 2).kind, assess(low, 2).step) == ("entropy_collapse", 1 + ENTROPY_COLLAPSE_STEPS)
    blip = [dict(ok, step=s, entropy=ENTROPY_COLLAPSE_NATS / 2 if s % 2 else 1.0) for s in range(1, 8)]
    assert not assess(blip, 2).diverged  # never the required consecutive steps
    # 2 updates a step; every update of steps 1-4 skipped: 8 of 8 > half once 8 were tried (step 4)
    skipped = [dict(ok, step=s, skipped_updates=2) for s in range(1, 6)]
    assert (assess(skipped, 2).kind, assess(skipped, 2).step) == ("skipped", 4)
    one = [dict(ok, step=1, skipped_updates=1), *rows[1:]]
    assert not assess(one, 2).diverged


def test_a_run_whose_updates_are_all_skipped_is_marked_diverged(tmp_path, monkeypatch, capsys):
    import sspo_analysis.objectives as objectives

    original = objectives.Objective.loss

    def poisoned(self, *args, **kwargs):
        return original(self, *args, **kwargs) * math.nan

    monkeypatch.setattr(objectives.Objective, "loss", poisoned)
    out = tmp_path / "dead"
    args = ["train", "--no-progress", "--out", str(out), *_sets(FAST + ["steps=10"])]
    assert main(args) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "diverged at step 4" in err and "8 of 8 updates skipped" in err
    assert not (out / "DONE").exists()
    marker = json.loads((out / "DIVERGED").read_text())
    assert marker["step"] == 4 and marker["kind"] == "skipped"
    assert len(read_metrics(out)) == 4  # the run stopped there
    with pytest.raises(ValueError, match="diverged"):
        train(None, out, resume=True)
    import pandas as pd

    from sspo_analysis.failure import diverged

    healthy = pd.DataFrame({"step": [1, 2, 3, 4], "reward_mean": [0.5] * 4, "entropy": [1.0] * 4,
                            "loss": [0.1] * 4, "skipped_updates": [0] * 4})
    assert not diverged({"done": True, "run_dir": tmp_path / "elsewhere"}, healthy)
    assert diverged({"done": True, "run_dir": out}, healthy)  # the marker alone decides
