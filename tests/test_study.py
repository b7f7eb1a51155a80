"""The stability study: its statistics, the instability definition, the partial-credit grader, the plans,
the tables, one tiny study end to end and its command line.

Known values are worked out by hand in the comments. The end-to-end test trains four micro-preset runs of two
steps in one job process (about 20 s on a busy 2-core machine); it is slow-marked like the other end-to-end
tests, and CI's plain ``pytest -q`` runs it.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from sspo_analysis import analysis
from sspo_analysis.study import ARMS, PLANS, Plan, Regime, StudyRun, collect, design
from sspo_analysis.study.stats import mean_ci, paired_difference, sign_flip_p
from sspo_analysis.training import load_config
from sspo_analysis.training.tasks import Reversal

# --------------------------------------------------------------------------- stats


def test_mean_ci_brackets_the_mean():
    mean, low, high = mean_ci([1.0, 2.0, 3.0, 4.0, 10.0])
    assert mean == pytest.approx(4.0)
    assert low < mean < high


def test_mean_ci_is_zero_width_for_identical_values_and_nan_for_one_value():
    assert mean_ci([0.3, 0.3, 0.3]) == (0.3, 0.3, 0.3)
    mean, low, high = mean_ci([0.7])
    assert mean == 0.7 and np.isnan(low) and np.isnan(high)


def test_mean_ci_ignores_nan():
    assert mean_ci([2.0, np.nan, 2.0]) == (2.0, 2.0, 2.0)


def test_sign_flip_p_of_six_positive_differences_is_two_in_64():
    # Of the 2**6 sign patterns only all-plus and all-minus are as extreme as the observed mean.
    assert sign_flip_p([0.1, 0.2, 0.3, 0.1, 0.5, 0.2]) == pytest.approx(2 / 64, abs=1e-12)
    assert sign_flip_p([0.0] * 6) == 1.0


@pytest.mark.parametrize(("shift", "verdict"), [(1.0, "higher"), (-1.0, "lower")])
def test_paired_difference_verdicts(shift, verdict):
    y = np.arange(6.0)
    res = paired_difference(y + shift, y)
    assert res["verdict"] == verdict
    assert res["n"] == 6 and res["diff"] == pytest.approx(shift)
    assert res["p_value"] == pytest.approx(2 / 64)


def test_paired_difference_mixed_signs_is_no_significant_difference():
    res = paired_difference([1, -1, 1, -1, 1, -1], [0] * 6)
    assert res["verdict"] == "no significant difference"
    assert res["p_value"] == 1.0 and res["ci_low"] < 0 < res["ci_high"]


def test_paired_difference_drops_pairs_with_nan():
    # Five pairs left: the smallest possible p is 2/32, not below 0.05, so nothing is significant.
    res = paired_difference([1, 2, 3, np.nan, 5, 6], [0, 1, 2, 3, 4, 5])
    assert res["n"] == 5 and res["diff"] == pytest.approx(1.0)
    assert res["p_value"] == pytest.approx(2 / 32)
    assert res["verdict"] == "no significant difference"
    assert paired_difference([1, 2, 3], [0, np.nan, 2])["n"] == 2


def test_paired_difference_refuses_mismatched_lengths():
    with pytest.raises(ValueError, match="one value per seed"):
        paired_difference([1.0, 2.0, 3.0], [1.0, 2.0])


# --------------------------------------------------------------------------- instability


def test_instability_constants_the_cases_below_were_worked_out_with():
    assert (analysis.REWARD_SMOOTHING, analysis.REWARD_COLLAPSE_FRACTION) == (3, 0.5)
    assert analysis.ENTROPY_COLLAPSE_FRACTION == 0.1 and analysis.ENTROPY_COLLAPSE_STEPS == 3
    assert analysis.SOLVED_REWARD == 0.9


def _steps(reward, entropy=None) -> pd.DataFrame:
    n = len(reward)
    return pd.DataFrame({"step": np.arange(1, n + 1), "reward_mean": np.asarray(reward, dtype=float),
                         "entropy": np.ones(n) if entropy is None else np.asarray(entropy, dtype=float)})


COLLAPSE = [0.2, 0.4, 0.6, 0.6, 0.6, 0.1, 0.0, 0.0, 0.0, 0.0]
# Rolling mean over 3: .2 .3 .4 .533 .6 .433 .233 .033 0 0; running peak .6 from step 5, so the line is .3.
# Step 6 (.433) is still above it; from step 7 (.233) it stays below: reward_collapse at step 7.


def test_reward_that_collapses_and_stays_down_is_unstable_at_the_step_it_fell():
    assert analysis.instability(_steps(COLLAPSE)) == {"unstable": True, "step_unstable": 7,
                                                      "kind": "reward_collapse"}


def test_reward_dip_that_recovers_is_stable():
    steps = _steps([0.6, 0.6, 0.6, 0.0, 0.0, 0.0, 0.6, 0.6, 0.6, 0.6])
    assert analysis.instability(steps) == {"unstable": False, "step_unstable": None, "kind": ""}


def test_entropy_collapse_is_reported_at_the_first_of_the_low_steps():
    # 10% of the first entropy (2.0) is 0.2: steps 3, 4, 5 are below it, three in a row, reward 0.5 < 0.9.
    steps = _steps([0.5] * 6, [2.0, 1.5, 0.19, 0.1, 0.05, 0.5])
    assert analysis.instability(steps) == {"unstable": True, "step_unstable": 3, "kind": "entropy_collapse"}


def test_two_low_entropy_steps_are_not_a_collapse():
    steps = _steps([0.5] * 6, [2.0, 0.1, 0.1, 1.0, 0.1, 0.1])
    assert not analysis.instability(steps)["unstable"]


def test_a_solved_run_with_low_entropy_is_stable():
    steps = _steps([0.95] * 6, [2.0, 0.01, 0.01, 0.01, 0.01, 0.01])
    assert not analysis.instability(steps)["unstable"]


def test_trainer_verdict_wins_when_earlier():
    verdict = {"step": 4, "kind": "nonfinite", "reason": "non-finite reward"}
    assert analysis.instability(_steps(COLLAPSE), verdict) == {"unstable": True, "step_unstable": 4,
                                                               "kind": "trainer"}
    later = {**verdict, "step": 9}
    assert analysis.instability(_steps(COLLAPSE), later)["kind"] == "reward_collapse"


def test_nan_reward_counts_as_below():
    # Rolling means .6 .6 .6 .6 .6 nan nan (pandas skips NaN in a window): from step 6 no finite reward is left.
    res = analysis.instability(_steps([0.6, 0.6, 0.6, np.nan, np.nan, np.nan, np.nan]))
    assert res == {"unstable": True, "step_unstable": 6, "kind": "reward_collapse"}


# --------------------------------------------------------------------------- the reversal grader


@pytest.mark.parametrize(("completion", "reward"),
                         [("dcba", 1.0), ("dcbx", 0.75), ("dc", 0.5), ("dcbaaa", 4 / 6), ("abcd", 0.0), ("", 0.0),
                          (" dcba\n", 1.0)])
def test_reversal_chars_grader_gives_partial_credit(completion, reward):
    assert Reversal(length=4, grader="chars").reward(completion, "dcba") == pytest.approx(reward)


def test_reversal_exact_grader_is_all_or_nothing():
    task = Reversal(length=4)
    assert (task.reward("dcba", "dcba"), task.reward("dcbx", "dcba")) == (1.0, 0.0)


def test_reversal_unknown_grader_names_task_grader():
    with pytest.raises(ValueError, match="task.grader"):
        Reversal(grader="number")


def test_reversal_grader_through_the_config():
    cfg = load_config(None, ['task.name="reversal"', 'task.grader="chars"'])
    assert (cfg.task.name, cfg.task.grader) == ("reversal", "chars")
    with pytest.raises(ValueError, match="task.grader"):
        load_config(None, ['task.name="reversal"', 'task.grader="number"'])


# --------------------------------------------------------------------------- design


@pytest.mark.parametrize("name", sorted(PLANS))
def test_plan_runs_are_unique_and_start_with_the_headline(name):
    plan = PLANS[name]
    runs = plan.runs()
    assert len(runs) == len(set(runs)) == len({r.name for r in runs})
    n_head = len(plan.headline_seeds) * len(plan.arms)
    assert all(r.regime == plan.headline for r in runs[:n_head])
    assert {(r.arm, r.seed) for r in runs[:n_head]} == {(a, s) for a in plan.arms for s in plan.headline_seeds}
    # Every map regime is covered for every arm and map seed.
    assert {(r.arm, r.regime, r.seed) for r in runs} >= {(a, g, s) for a in plan.arms for g in plan.regimes
                                                         for s in plan.seeds}


@pytest.mark.parametrize("name", sorted(PLANS))
def test_every_run_of_every_plan_is_a_valid_config(name, tmp_path):
    plan = PLANS[name]
    for spec in plan.runs():
        cfg = load_config(None, spec.overrides(plan, tmp_path / "cache"))
        assert (cfg.task.name, cfg.task.grader, cfg.objective.name) == ("reversal", "chars", spec.arm.objective)
        assert (cfg.seed, cfg.task.length, cfg.optim.lr) == (spec.seed, spec.regime.length, spec.regime.lr)


def test_two_arms_of_one_objective_get_their_own_run_directories(tmp_path):
    by_objective: dict[str, list] = {}
    for arm in ARMS:
        by_objective.setdefault(arm.objective, []).append(arm)
    shared = [arms for arms in by_objective.values() if len(arms) > 1]
    assert shared, "the study has objectives with two arms (sspo, sspo-sigmoid)"
    regime = PLANS["full"].headline
    for arms in shared:
        dirs = {StudyRun(a, regime, 0).run_dir(tmp_path) for a in arms}
        assert len(dirs) == len(arms)


def test_with_seeds_sets_the_headline_seeds_and_the_first_as_map_seeds():
    full = PLANS["full"]
    seeds = tuple(range(20, 22 + len(full.seeds)))  # two more than the plan's map seeds
    plan = full.with_seeds(seeds)
    assert plan.headline_seeds == seeds and plan.seeds == seeds[:len(full.seeds)]
    assert full.with_seeds((7,)).seeds == (7,) and full.with_seeds((7,)).headline_seeds == (7,)
    assert plan.arms == full.arms and plan.regimes == full.regimes and plan.headline == full.headline


# --------------------------------------------------------------------------- collect


def _tidy() -> pd.DataFrame:
    """Three arms over 6 seeds in one regime: sspo's final reward is always 0.1 below grpo's."""
    regime = Regime(6, 1e-3, 8)
    rows = []
    for seed in range(6):
        base = 0.25 + 0.125 * seed
        for arm, reward in (("grpo", base), ("gmpo", base + (0.05 if seed % 2 else -0.05)), ("sspo", base - 0.1)):
            rows.append({"arm": arm, **regime.as_columns(), "seed": seed, "unstable": float(seed == 0),
                         "time_to_instability": 10.0, "final_reward": reward, "reward_auc": 0.5, "end_entropy": 1.0,
                         "weight_var": 0.1})
    return pd.DataFrame(rows)


def test_compare_finds_the_constant_paired_difference():
    df = _tidy()
    cmp = collect.compare(df, df.regime.iloc[0])
    assert set(cmp.reference) == set(collect.REFERENCES)
    row = cmp[(cmp.arm == "sspo") & (cmp.reference == "grpo") & (cmp.outcome == "final_reward")].iloc[0]
    assert row.verdict == "lower" and row.n == 6
    assert row.p_value == pytest.approx(0.03125) and row["diff"] == pytest.approx(-0.1)
    assert row.ci_low == pytest.approx(-0.1) and row.ci_high == pytest.approx(-0.1)
    # Alternating +-0.05 against grpo: no verdict; identical outcomes: p = 1.
    gmpo = cmp[(cmp.arm == "gmpo") & (cmp.reference == "grpo") & (cmp.outcome == "final_reward")].iloc[0]
    assert gmpo.verdict == "no significant difference"
    same = cmp[(cmp.arm == "sspo") & (cmp.reference == "grpo") & (cmp.outcome == "unstable")].iloc[0]
    assert same.p_value == 1.0 and same.verdict == "no significant difference"
    # Every arm against each reference, on every outcome, never against itself.
    assert len(cmp) == 2 * 2 * len(collect.OUTCOMES)
    assert not (cmp.arm == cmp.reference).any()


def test_summarise_gives_means_with_intervals_per_arm():
    summary = collect.summarise(_tidy())
    assert list(summary.arm) == ["grpo", "gmpo", "sspo"] and set(summary.n) == {6}
    for key in collect.OUTCOMES:
        assert {key, f"{key}_ci_low", f"{key}_ci_high"} <= set(summary.columns)
    sspo = summary.set_index("arm").loc["sspo"]
    assert sspo.final_reward == pytest.approx(0.25 + 0.125 * 2.5 - 0.1)
    assert sspo.final_reward_ci_low < sspo.final_reward < sspo.final_reward_ci_high
    assert sspo.unstable == pytest.approx(1 / 6)
    assert sspo.reward_auc_ci_low == sspo.reward_auc_ci_high == 0.5


def test_map_counts_a_crashed_run_neither_as_unstable_nor_twice():
    from sspo_analysis.study import report

    regime = Regime(6, 1e-3, 8)
    rows = [{"arm": "grpo", **regime.as_columns(), "seed": seed, "unstable": unstable, "time_to_instability": t,
             "final_reward": reward, "reward_auc": reward, "end_entropy": 1.0, "weight_var": 0.1}
            for seed, unstable, t, reward in [(0, 1.0, 3.0, 0.1), (1, 0.0, 10.0, 0.5), (2, np.nan, np.nan, np.nan)]]
    cell = report.map_table(collect.summarise(pd.DataFrame(rows)), ["grpo"], [regime.label])[-1]
    assert cell.startswith("| grpo | 1/"), cell  # one run became unstable, whatever n counts


# --------------------------------------------------------------------------- end to end


TINY_REGIME = Regime(4, 1e-3, 2)
TINY = Plan(
    name="test", arms=tuple(a for a in ARMS if a.label in ("grpo", "sspo")), regimes=(TINY_REGIME,), seeds=(0, 1),
    headline=TINY_REGIME, headline_seeds=(0, 1), steps=2,
    settings=(*design.BASE_SETTINGS, 'model.preset="micro"', "rollout.prompts=4", "rollout.group_size=4",
              "warm_start.max_steps=20"),
)
STABILITY_COLUMNS = ("arm", "objective", "regime", "length", "lr", "updates", "staleness", "seed", "unstable",
                     "step_unstable", "final_reward", "reward_auc", "end_entropy", "weight_var")


@pytest.mark.slow
def test_a_tiny_study_end_to_end_and_a_second_call_trains_nothing(tmp_path, monkeypatch):
    from sspo_analysis.study import load_results
    from sspo_analysis.study.stability import stability

    monkeypatch.setenv("SSPO_CACHE", str(tmp_path / "cache"))  # the job processes inherit it: a warm start of its own
    stability(TINY, tmp_path, jobs=1, progress=False)
    tables = load_results(tmp_path)
    df = tables["stability"]
    assert len(df) == 4 and set(STABILITY_COLUMNS) <= set(df.columns)
    assert sorted(zip(df.arm, df.seed)) == [("grpo", 0), ("grpo", 1), ("sspo", 0), ("sspo", 1)]
    assert set(df.regime) == {TINY_REGIME.label} and df.headline.all()
    assert df[["final_reward", "reward_auc", "end_entropy", "weight_var"]].notna().all().all()
    assert {"unstable_ci_low", "unstable_ci_high", "final_reward_ci_low", "final_reward_ci_high"} <= set(
        tables["summary"].columns)
    assert (tmp_path / "results.md").read_text().startswith("# Stability study (test)")
    assert {p.stem for p in (tmp_path / "figures").glob("*.png")} >= {"map", "headline", "curves_reward_mean",
                                                                     "curves_entropy", "theory"}
    timing = json.loads((tmp_path / "timing.json").read_text())
    assert [c["runs_trained"] for c in timing["calls"]] == [4]
    first = (tmp_path / "stability.csv").read_text()

    stability(TINY, tmp_path, jobs=1, progress=False)
    assert json.loads((tmp_path / "timing.json").read_text())["calls"] == timing["calls"]
    assert (tmp_path / "stability.csv").read_text() == first


# --------------------------------------------------------------------------- command line


@pytest.mark.parametrize("seeds", ["x", "", "1,-2"])
def test_cli_refuses_bad_seeds_in_one_line(seeds, capsys, tmp_path):
    from sspo_analysis.cli import main

    assert main(["study", "stability", "--seeds", seeds, "--out", str(tmp_path / "study")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--seeds" in err
    assert not (tmp_path / "study").exists()


def test_a_damaged_timing_record_is_refused_before_any_training(tmp_path):
    from sspo_analysis.study import PLANS
    from sspo_analysis.study.stability import stability

    (tmp_path / "timing.json").write_text("{bad")
    with pytest.raises(ValueError, match="timing.json: not a study timing record"):
        stability(PLANS["quick"], tmp_path, jobs=1, progress=False)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "cache").exists()


def test_fraction_ci_is_the_exact_clopper_pearson_interval():
    from sspo_analysis.study.stats import fraction_ci

    frac, low, high = fraction_ci([1.0] * 10)
    assert frac == 1.0 and high == 1.0
    assert low == pytest.approx(0.025 ** (1 / 10))  # 10/10: the lower bound solves p^10 = 0.025
    frac, low, high = fraction_ci([0.0] * 10 + [np.nan])
    assert frac == 0.0 and low == 0.0 and high == pytest.approx(1 - 0.025 ** (1 / 10))


def test_spearman_permutation_p_is_small_only_for_a_real_association():
    from sspo_analysis.study.stats import spearman_permutation

    x = np.arange(11.0)
    rho, p = spearman_permutation(x, x**2)
    assert rho == pytest.approx(1.0) and p < 0.001
    rho, p = spearman_permutation(x, np.r_[np.zeros(10), 1.0])
    assert rho > 0 and p == pytest.approx(2 / 11, abs=0.02)  # the lone 1 at an end of x
    assert np.isnan(spearman_permutation(x, np.zeros(11))[0])


@pytest.mark.slow
def test_the_study_on_ray_gives_what_the_local_pool_gives(tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="the ray extra is not installed")
    from sspo_analysis.study.stability import stability

    monkeypatch.setenv("SSPO_CACHE", str(tmp_path / "cache"))  # both executors' workers inherit it
    stability(TINY, tmp_path / "local", jobs=2, progress=False)
    stability(TINY, tmp_path / "ray", jobs=2, progress=False, executor="ray")
    local = pd.read_csv(tmp_path / "local" / "stability.csv")[list(STABILITY_COLUMNS)]
    on_ray = pd.read_csv(tmp_path / "ray" / "stability.csv")[list(STABILITY_COLUMNS)]
    pd.testing.assert_frame_equal(local, on_ray)


def test_an_unknown_executor_is_refused_before_any_work(tmp_path):
    from sspo_analysis.study.pools import open_pool

    with pytest.raises(ValueError, match="--executor: unknown value 'slurm'; allowed: local, ray"):
        open_pool("slurm", 2)
