"""The tuned study: the ladder search, the role split, one run's outcomes from its record, the archive, the
tables, the shipped warm starts, and the committed study re-derived from its archive alone."""

from __future__ import annotations

import gzip
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sspo_analysis.study.tuned import (
    FULL_TUNED,
    QUICK_TUNED,
    TunedRun,
    choose,
    next_rungs,
    outcomes,
    read_records,
    record_key,
    write_records,
)
from sspo_analysis.study.tuned_execute import wanted_runs
from sspo_analysis.study.tuned_report import heldout_at_kl, stable_window, sweep_table

COMMITTED = Path(__file__).resolve().parents[1] / "docs" / "results" / "tuned"


def _o(auc: float, unstable: float = 0.0) -> dict[str, float]:
    return {"heldout_auc": auc, "unstable": unstable}


# --------------------------------------------------------------------------- the ladder search


def test_the_search_starts_at_the_plans_rungs():
    assert next_rungs(FULL_TUNED, 2, {}) == [1e-4, 2e-4, 4e-4]
    assert next_rungs(FULL_TUNED, 2, {1e-4: _o(0.5)}) == [2e-4, 4e-4]


def test_the_search_climbs_until_a_run_is_unstable_and_descends_while_the_lowest_rung_is_best():
    # best at the top and all stable: one rung up
    assert next_rungs(FULL_TUNED, 2, {1e-4: _o(0.4), 2e-4: _o(0.5), 4e-4: _o(0.6)}) == [8e-4]
    # best at the bottom, an unstable rung on top: one rung down
    assert next_rungs(FULL_TUNED, 2, {1e-4: _o(0.6), 2e-4: _o(0.5), 4e-4: _o(0.1, 1.0)}) == [5e-5]
    # an interior best, an unstable top, 4 rungs: done
    done = {5e-5: _o(0.4), 1e-4: _o(0.6), 2e-4: _o(0.5), 4e-4: _o(0.1, 1.0)}
    assert next_rungs(FULL_TUNED, 2, done) == []
    # three rungs, interior best, unstable top: a fourth rung (up the ladder) before it ends
    assert next_rungs(FULL_TUNED, 2, {1e-4: _o(0.4), 2e-4: _o(0.6), 4e-4: _o(0.1, 1.0)}) == [8e-4]


def test_the_search_stops_at_the_ends_of_the_ladder():
    top = {lr: _o(i) for i, lr in enumerate(FULL_TUNED.ladder)}  # always better higher, never unstable
    assert next_rungs(FULL_TUNED, 2, top) == []


def test_the_chosen_rate_has_the_best_auc_and_ties_go_to_the_smaller_rate():
    assert choose({1e-4: _o(0.5), 2e-4: _o(0.7), 4e-4: _o(0.6)}) == 2e-4
    assert choose({1e-4: _o(0.7), 2e-4: _o(0.7)}) == 1e-4
    assert choose({1e-4: _o(float("nan")), 2e-4: _o(0.1)}) == 2e-4


def test_no_pair_is_used_for_tuning_and_evaluation():
    FULL_TUNED.check()
    QUICK_TUNED.check()
    with pytest.raises(ValueError, match="both roles"):
        replace(FULL_TUNED, tune_pairs=((0, 0),)).check()


# --------------------------------------------------------------------------- records and outcomes


def record(**given) -> dict:
    """A run record: 4 planned steps, held-out scores every 2 (``sampled``), per-step ``kl`` and ``reward``."""
    a = {"arm": "grpo", "lr": 1e-4, "role": "tune", "ws": 0, "seed": 1000, "sampled": (0.3, 0.4, 0.5),
         "verdict": None, "kl": (0.01, 0.01, 0.02, 0.02), "reward": (0.3, 0.4, 0.5, 0.5), **given}
    kl, reward, sampled, verdict = a["kl"], a["reward"], a["sampled"], a["verdict"]
    n = len(kl)
    return {"arm": a["arm"], "task": "addition", "lr": a["lr"], "updates": 2, "warm_start": a["ws"], "seed": a["seed"],
            "role": a["role"], "state": "diverged" if verdict else "done", "verdict": verdict, "planned_steps": 4,
            "eval_every": 2,
            "heldout": {"step": [0, 2, 4][:len(sampled)], "sampled": list(sampled), "greedy": list(sampled),
                        "pass@4": list(sampled)},
            "heldout_prompts": 256,
            "steps": {"step": list(range(1, n + 1)), "reward_mean": list(reward[:n]), "entropy": [0.4] * n,
                      "kl_old_k3": list(kl), "log_ratio_std": [0.1] * n, "grad_norm": [1.0] * n,
                      "skipped_updates": [0] * n}}


def test_outcomes_of_a_finished_run():
    out = outcomes(record())
    assert out["heldout_start"] == 0.3 and out["heldout_final"] == 0.5
    assert out["heldout_gain"] == pytest.approx(0.2)
    assert out["heldout_auc"] == pytest.approx((0.3 / 2 + 0.4 + 0.5 / 2) / 2)  # trapezoid over 0, 2, 4
    assert out["cum_kl"] == pytest.approx(0.06) and out["early_kl"] == pytest.approx(0.015)
    assert out["unstable"] == 0.0


def test_a_stopped_run_keeps_its_score_at_the_stop_for_the_steps_it_did_not_run():
    rec = record(sampled=(0.3, 0.0), verdict={"step": 2, "kind": "nonfinite", "reason": "x"}, kl=(0.1, 0.5),
                 reward=(0.3, 0.0))
    out = outcomes(rec)
    assert out["heldout_final"] == 0.0 and out["heldout_auc"] == pytest.approx(0.3 / 4)
    assert out["unstable"] == 1.0 and out["steps"] == 2


def test_the_archive_round_trips_byte_for_byte_and_names_a_damaged_line(tmp_path):
    recs = {record_key(r): r for r in (record(), record(lr=2e-4), record(role="eval", seed=0))}
    write_records(tmp_path / "a.gz", recs)
    write_records(tmp_path / "b.gz", dict(reversed(list(recs.items()))))
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()
    assert read_records(tmp_path / "a.gz") == recs
    with gzip.open(tmp_path / "c.gz", "wt") as f:
        f.write(json.dumps(record()) + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        read_records(tmp_path / "c.gz")


def test_recorded_runs_are_not_wanted_again_and_evaluation_waits_for_tuning():
    plan = replace(QUICK_TUNED, arms=QUICK_TUNED.arms[:1])  # grpo; ladder 1e-4, 1e-3, 1e-2; start 1e-4, 1e-3
    wanted = wanted_runs(plan, {})
    assert [(r.lr, r.role) for r in wanted] == [(1e-4, "tune"), (1e-3, "tune")]
    recs = {record_key(r): r for r in (record(lr=1e-4, sampled=(0.3, 0.5, 0.6)),
                                       record(lr=1e-3, sampled=(0.3, 0.1, 0.0),
                                              reward=(0.5, 0.1, 0.0, 0.0)))}
    wanted = wanted_runs(plan, recs)  # 1e-3 collapsed, 1e-4 best and lowest: the ladder has no rung below
    assert {(r.lr, r.role, r.warm_start, r.seed) for r in wanted} == {(1e-4, "eval", 0, 0), (1e-3, "eval", 0, 0)}
    assert all(isinstance(r, TunedRun) for r in wanted)


# --------------------------------------------------------------------------- tables


def test_stable_window_is_the_largest_rate_below_the_first_mostly_unstable_one():
    runs = pd.DataFrame({"lr": [1e-4] * 5 + [2e-4] * 5 + [4e-4] * 5 + [8e-4] * 5,
                         "unstable": [0] * 5 + [0, 0, 0, 0, 1] + [1, 1, 0, 0, 0] + [0] * 5})
    assert stable_window(runs) == 2e-4  # 4e-4 has 2/5 unstable; 8e-4 above it does not count
    assert np.isnan(stable_window(pd.DataFrame({"lr": [1e-4], "unstable": [1.0]})))


def test_accuracy_at_equal_movement_interpolates_along_cumulative_kl():
    recs = {record_key(r): r for r in [record(kl=(0.1, 0.1, 0.1, 0.1))]}  # cum KL 0, 0.2, 0.4 at steps 0, 2, 4
    row = sweep_table(recs).iloc[0]
    assert heldout_at_kl(recs, row, 0.3) == pytest.approx(0.45)
    assert np.isnan(heldout_at_kl(recs, row, 0.5))  # it never moved that far


# --------------------------------------------------------------------------- shipped warm starts


def test_each_shipped_warm_start_is_the_one_its_recorded_config_asks_for():
    from sspo_analysis.training.config import _from_dict
    from sspo_analysis.training.warm_start import SHIPPED_WARM_STARTS, ensure_warm_start, warm_start_dir

    shipped = sorted(p for p in SHIPPED_WARM_STARTS.iterdir() if p.is_dir())
    assert len(shipped) >= 3
    for path in shipped:
        cfg = _from_dict(json.loads((path / "warm_start.json").read_text())["config"])
        assert warm_start_dir(cfg).name == path.name
        assert ensure_warm_start(cfg) == path  # taken as it is: no supervised phase


def test_the_study_and_the_figures_start_from_shipped_warm_starts():
    from sspo_analysis.training import load_config
    from sspo_analysis.training.warm_start import shipped_warm_start

    for task in FULL_TUNED.tasks:
        for ws in FULL_TUNED.warm_starts:
            run = TunedRun(FULL_TUNED.arms[0], task.label, 1e-4, 2, ws, 0, "eval")
            assert shipped_warm_start(load_config(None, FULL_TUNED.overrides(run))) is not None, (task.label, ws)
    assert shipped_warm_start(load_config(None, [])) is not None  # sspo train's default
    assert shipped_warm_start(load_config(None, ['warm_start.dir="/elsewhere"'])) is None


# --------------------------------------------------------------------------- the committed study


@pytest.mark.skipif(not (COMMITTED / "runs.jsonl.gz").is_file(), reason="no committed tuned study")
def test_the_committed_study_is_re_derived_from_its_archive_alone(tmp_path):
    import shutil

    from sspo_analysis.study.tuned_report import write_outputs

    assert wanted_runs(FULL_TUNED, read_records(COMMITTED / "runs.jsonl.gz")) == []  # nothing left to train
    shutil.copy(COMMITTED / "runs.jsonl.gz", tmp_path / "runs.jsonl.gz")
    timing = json.loads((COMMITTED / "timing.json").read_text())
    write_outputs(FULL_TUNED, tmp_path, "sspo study tuned --out docs/results/tuned", timing)
    for name in ("sweep.csv", "best.csv", "comparisons.csv", "results.md"):
        assert (tmp_path / name).read_text() == (COMMITTED / name).read_text(), name
    sweep = pd.read_csv(tmp_path / "sweep.csv")
    tune = set(zip(sweep[sweep.role == "tune"].warm_start, sweep[sweep.role == "tune"].seed))
    evaluation = set(zip(sweep[sweep.role == "eval"].warm_start, sweep[sweep.role == "eval"].seed))
    assert not tune & evaluation


def test_an_update_count_can_be_tuned_for_some_arms_only():
    plan = replace(QUICK_TUNED, tune_updates=(2, 8), start={2: (1e-4, 1e-3), 8: (1e-4, 1e-3)},
                   tasks=(replace(QUICK_TUNED.tasks[0], arms={8: ("sspo",)}),))
    wanted = wanted_runs(plan, {})
    assert {(r.arm.label, r.updates) for r in wanted} == {("grpo", 2), ("sspo", 2), ("sspo", 8)}


def test_a_task_can_be_trimmed_to_some_arms_and_update_counts():
    from sspo_analysis.study.tuned import TunedTask

    extra = TunedTask("reversal", ('task.name="reversal"',), "reversal", arms={2: ("sspo",), 8: ()})
    plan = replace(QUICK_TUNED, tasks=(*QUICK_TUNED.tasks, extra), tune_updates=(2, 8),
                   start={2: (1e-4, 1e-3), 8: (1e-4, 1e-3)})
    wanted = wanted_runs(plan, {})
    assert {(r.task, r.arm.label, r.updates) for r in wanted} == {
        ("addition", "grpo", 2), ("addition", "sspo", 2), ("addition", "grpo", 8), ("addition", "sspo", 8),
        ("reversal", "sspo", 2)}
    assert 'task.name="reversal"' in plan.overrides(next(r for r in wanted if r.task == "reversal"))
