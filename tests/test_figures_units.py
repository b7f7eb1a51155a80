"""Fast unit tests of paper_figures: the registry, the CLI options, the run summaries and the plots.

The plots of figures 5-8 are fed small hand-made per-step tables in the trainer's
metrics.jsonl layout; the end-to-end run on the real trainer is tests/test_figures.py.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

import paper_figures
from paper_figures import training_figs as tf


def test_every_figure_is_registered_with_a_unique_stem():
    assert sorted(paper_figures.FIGURES) == list(range(1, 9))
    stems = {paper_figures.stem(paper_figures.Path("x"), n).name for n in paper_figures.FIGURES}
    assert len(stems) == 8
    assert all(s.startswith(f"fig{n}_") for n, s in zip(sorted(paper_figures.FIGURES), sorted(stems)))


@pytest.mark.parametrize("text, numbers, table", [
    (None, list(range(1, 9)), True),
    ("", list(range(1, 9)), True),
    ("3,5", [3, 5], False),
    ("2-4,table", [2, 3, 4], True),
    ("table", [], True),
    (" 8 , 1 ", [1, 8], False),
])
def test_parse_only(text, numbers, table):
    assert paper_figures.parse_only(text) == (numbers, table)


@pytest.mark.parametrize("text, fragment", [("9", "no figure 9"), ("x", "cannot read 'x'"), ("0-2", "no figure 0")])
def test_parse_only_rejects_bad_input_naming_the_allowed_values(text, fragment):
    with pytest.raises(ValueError, match="--only") as err:
        paper_figures.parse_only(text)
    assert fragment in str(err.value) and "table" in str(err.value)


def test_cli_turns_a_bad_selection_into_one_line(capsys):
    from sspo_analysis.cli import main

    assert main(["figures", "--only", "12"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no figure 12" in err


def test_spike_count_counts_jumps_over_the_running_median():
    g = [1.0] * 20
    assert tf.spike_count(g) == 0
    g[10] = 3.5  # > 3x the median of the previous 10
    g[15] = 2.9  # not
    g[17] = float("nan")  # a non-finite norm is a spike
    assert tf.spike_count(g) == 2
    assert tf.spike_count([100.0, 1.0, 1.0]) == 0  # too little history


@given(st.lists(st.floats(0.1, 10.0), min_size=1, max_size=60))
def test_spike_count_is_bounded_and_scale_free(values):
    n = tf.spike_count(values)
    assert 0 <= n <= max(0, len(values) - 3)
    assert tf.spike_count([7.0 * v for v in values]) == n


def test_final_mean_uses_the_last_fifth():
    assert tf.final_mean(list(range(10))) == 8.5
    assert tf.final_mean([3.0]) == 3.0
    assert math.isnan(tf.final_mean([]))


def _synthetic(objectives=("grpo", "sspo"), seeds=(0, 1, 2), staleness=(0,), steps=12):
    """Per-step metrics in the trainer's layout: entropy falls and reward rises, by a known amount."""
    rng = np.random.default_rng(0)
    rows, runs = [], []
    for o in objectives:
        for k in staleness:
            for s in seeds:
                name = f"{o}_k{k}_s{s}"
                runs.append({"name": name, "objective": o, "seed": s, "staleness": k, "done": True})
                for t in range(steps):
                    d = -0.01 * (1 + k)
                    rows.append({"run": name, "objective": o, "seed": s, "staleness": k, "step": t,
                                 "reward_mean": 0.3 + 0.02 * t, "entropy": 1.0 + d * t, "loss": 0.0,
                                 "seq_weight_var": 0.01 * (1 + k), "grad_norm": 1.0 + 0.01 * rng.random(),
                                 "skipped_updates": 0, "coef_norm_var": 0.02, "dead_frac": 0.01,
                                 "entropy_change_pred": d + 0.001 * rng.standard_normal(),
                                 "entropy_change_real": d})
    return pd.DataFrame(rows), runs


def test_summaries_and_results_table_from_known_curves():
    metrics, runs = _synthetic()
    summary = tf.summarise_runs(metrics, runs)
    assert len(summary) == 6 and not summary.diverged.any()
    # reward 0.3 + 0.02 t over 12 steps: last 20 % = steps 10, 11 -> 0.51; AUC per step = mean of the line = 0.41
    assert np.allclose(summary.final_reward, 0.51)
    assert np.allclose(summary.auc_reward, 0.41)
    assert (summary.spikes == 0).all()
    table = tf.results_frame(summary)
    assert list(table.objective) == ["grpo", "sspo"]  # paper order
    assert (table.runs == 3).all() and (table.diverged == 0).all()
    md = tf.results_markdown(table, {4: ["- a note"]}, "settings line")
    assert "| grpo | 3 | 0.510 ± 0.000" in md and "- a note" in md


def test_a_collapsed_or_unfinished_run_counts_as_diverged():
    metrics, runs = _synthetic(objectives=("grpo",), seeds=(0, 1, 2))
    metrics.loc[(metrics.seed == 0) & (metrics.step >= 8), "reward_mean"] = 0.05  # collapse
    metrics.loc[(metrics.seed == 1) & (metrics.step == 3), "entropy"] = float("nan")
    runs[2]["done"] = False
    summary = tf.summarise_runs(metrics, runs)
    assert summary.diverged.tolist() == [True, True, True]
    assert tf.results_frame(summary).diverged.iloc[0] == 3


def test_entropy_agreement_on_a_perfect_prediction():
    df = pd.DataFrame({"objective": ["a"] * 5, "entropy_change_pred": [-2.0, -1, 0.5, 1, 3],
                       "entropy_change_real": [-1.0, -0.5, 0.25, 0.5, 1.5]})
    row = tf.entropy_agreement(df).iloc[0]
    assert row.pearson_r == pytest.approx(1.0) and row.slope_through_0 == pytest.approx(0.5)
    assert row.sign_agreement == 1.0 and row.n == 5


def test_training_plots_draw_every_objective(tmp_path):
    metrics, runs = _synthetic(staleness=(0, 2, 8), seeds=(0, 1))
    summary = tf.summarise_runs(metrics, runs)
    paths = paper_figures.save(tf.plot_entropy(metrics, ("grpo", "sspo")), tmp_path / "f5")
    fig = tf.plot_stability(metrics, summary, ("grpo", "sspo"))
    # reward, weight variance and grad norm: one line per objective each; staleness panels: one per objective
    assert [len(ax.get_lines()) >= 2 for ax in fig.axes[:6]] == [True] * 6
    paths += paper_figures.save(fig, tmp_path / "f6")
    paths += paper_figures.save(tf.plot_entropy_mechanism(metrics, metrics), tmp_path / "f7")
    assert all(p.exists() and p.stat().st_size > 1000 for p in paths)


def test_figure_1_writes_png_pdf_csv_and_admissibility(tmp_path):
    paths = paper_figures.FIGURES[1].fn(tmp_path, paper_figures.Context(quick=True))
    names = {p.name for p in paths}
    assert {"fig1_gates.png", "fig1_gates.pdf", "fig1_gates.csv", "fig1_gates_admissibility.csv"} <= names
    adm = pd.read_csv(tmp_path / "fig1_gates_admissibility.csv").set_index("gate")
    assert adm.loc["arctan", "admissible"] and not adm.loc["hard-clip", "admissible"]
    assert not adm.loc["hard-clip", "c1"]


# --------------------------------------------------------------------------- theory figures: wiring checks


def test_figure_2_monte_carlo_points_sit_on_the_analytic_curves():
    from paper_figures import theory_figs

    stds = [0.05, 0.3, 0.8]
    curves, mc = theory_figs.data_token_bias(stds=stds, mc_stds=stds, mc_samples=20_000,
                                             objectives=("grpo", "sapo"))
    merged = curves.merge(mc, on=["objective", "advantage_sign", "log_ratio_std"], suffixes=("", "_mc"))
    assert len(merged) == 2 * 2 * 3
    gap = (merged.mean_coefficient - merged.mean_coefficient_mc).abs()
    assert (gap <= 4 * merged.mean_coefficient_se + 1e-9).all(), merged[["objective", "log_ratio_std"]][gap > 0]


def test_figure_3_is_seq_variance_is_the_log_normal_identity():
    from paper_figures import theory_figs

    df = theory_figs.data_sequence_weights(stds=(0.1, 0.3), lengths=(1, 8, 64))
    seq = df[(df.objective == "is-seq") & (df.advantage_sign == 1)]
    assert np.allclose(seq.var_weight, np.expm1(seq.length * seq.log_ratio_std**2), rtol=1e-6)
    assert set(df.objective) == set(theory_figs.SEQUENCE_OBJECTIVES)


def test_figure_4_frontier_marks_the_lowest_mse_and_the_defaults():
    from paper_figures import theory_figs

    grids = {"grpo": ("eps", np.array([0.1, 0.2, 0.4])), "sspo": ("tau", np.array([0.5, 1.0, 2.0]))}
    df = theory_figs.data_frontier(std=0.3, length=8, grids=grids)
    assert len(df) == 2 * (3 + 1) and df.is_default.sum() == 2
    assert np.allclose(df.mse, 0.5 * (df.bias_pos**2 + df.bias_neg**2) + df.var_coefficient)
    best = theory_figs.lowest_mse(df)
    swept = df[~df.is_default]
    assert best["overall"]["mse"] == swept.mse.min()
    summary = theory_figs.frontier_summary(df)
    assert summary.overall_best.sum() == 1 and list(summary.objective) == ["grpo", "sspo"]
    # sspo's default tau_pos = 1.0 / tau_neg = 1.05 is not on the swept grid's symmetric points exactly
    assert summary.set_index("objective").loc["sspo", "default_params"].count("1.05") == 1


# --------------------------------------------------------------------------- experiments


def test_token_mixture_pooling_of_two_advantage_signs():
    from types import SimpleNamespace

    from paper_figures.experiments import _pool

    a = SimpleNamespace(mean_coefficient=1.0, var_coefficient=0.5, dead_fraction=0.1)
    b = SimpleNamespace(mean_coefficient=0.0, var_coefficient=0.0, dead_fraction=0.4)
    var, dead = _pool([(3.0, a), (1.0, b)])
    # mixture: E[x] = 0.75, E[x^2] = 0.75 * 1.5 = 1.125 -> var 0.5625; dead 0.75 * 0.1 + 0.25 * 0.4
    assert var == pytest.approx(0.5625) and dead == pytest.approx(0.175)


def test_a_finished_run_made_with_other_settings_is_not_reused(tmp_path):
    from paper_figures import QUICK, Context
    from paper_figures.experiments import ensure_runs, plan

    ctx = Context(quick=True, runs_dir=tmp_path)
    first = plan(ctx)[0]
    first.run_dir.mkdir(parents=True)
    (first.run_dir / "DONE").write_text("")
    (first.run_dir / "config.toml").write_text(
        f'seed = {first.seed}\nsteps = {QUICK.train_steps + 1}\n[model]\npreset = "tiny"\n'
        f'[task]\ndigits = {QUICK.task_digits}\n[objective]\nname = "{first.objective}"\n[algo]\nstaleness = 0\n')
    with pytest.raises(ValueError, match=r"--runs-dir: .* \(steps: 11 \(want 10\)\)"):
        ensure_runs(ctx)


def test_the_plan_covers_the_main_grid_and_the_staleness_study(tmp_path):
    from paper_figures import FULL, Context
    from paper_figures.experiments import plan

    specs = plan(Context(quick=False, runs_dir=tmp_path))
    main = [s for s in specs if s.staleness == 0]
    assert {(s.objective, s.seed) for s in main} == {(o, s) for o in paper_figures.TRAINED_OBJECTIVES
                                                     for s in FULL.seeds}
    assert {s.staleness for s in specs} == set(FULL.staleness)
    assert len({s.run_dir for s in specs}) == len(specs)
    assert all(str(s.run_dir).startswith(str(tmp_path / "full")) for s in specs)
