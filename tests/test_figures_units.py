"""Fast unit tests of paper_figures: the registry, the CLI options, the results table and the plots.

The plots of figures 5-8 are fed small hand-made per-step tables in the trainer's
metrics.jsonl layout; the end-to-end run on the real trainer is tests/test_figures.py.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from test_analysis import synthetic_metrics

import paper_figures
from paper_figures import training_figs as tf
from sspo_analysis.analysis import frontier_summary, results_frame, summarise_runs


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


def test_results_markdown_shows_mean_and_std_and_the_notes():
    metrics, runs = synthetic_metrics()
    table = results_frame(summarise_runs(metrics, runs), paper_figures.TRAINED_OBJECTIVES)
    assert list(table.objective) == ["grpo", "sspo"]  # paper order
    md = tf.results_markdown(table, {4: ["- a note"]}, "settings line")
    assert "| grpo | 3 | 0.510 ± 0.000" in md and "- a note" in md and "settings line" in md


def test_training_plots_draw_every_objective(tmp_path):
    metrics, runs = synthetic_metrics(staleness=(0, 2, 8), seeds=(0, 1))
    summary = summarise_runs(metrics, runs)
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
    assert set(df.length) == {1, 8}  # grpo is token-level, sspo sequence-level
    summary = frontier_summary(df)
    assert summary.overall_best.sum() == 1 and list(summary.objective) == ["grpo", "sspo"]
    # sspo's default tau_pos = 1.0 / tau_neg = 1.05 is not on the swept grid's symmetric points exactly
    assert summary.set_index("objective").loc["sspo", "default_params"].count("1.05") == 1


# --------------------------------------------------------------------------- experiments


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
