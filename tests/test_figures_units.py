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
from sspo_analysis.plotting import style


def test_every_figure_is_registered_with_a_unique_stem():
    assert sorted(paper_figures.FIGURES) == list(range(1, 10))
    stems = {paper_figures.stem(paper_figures.Path("x"), n).name for n in paper_figures.FIGURES}
    assert len(stems) == 9
    assert all(s.startswith(f"fig{n}_") for n, s in zip(sorted(paper_figures.FIGURES), sorted(stems)))


@pytest.mark.parametrize("text, numbers, table", [
    (None, list(range(1, 10)), True),
    ("", list(range(1, 10)), True),
    ("3,5", [3, 5], False),
    ("2-4,table", [2, 3, 4], True),
    ("table", [], True),
    (" 8 , 1 ", [1, 8], False),
])
def test_parse_only(text, numbers, table):
    assert paper_figures.parse_only(text) == (numbers, table)


@pytest.mark.parametrize("text, fragment", [("10", "no figure 10"), ("x", "cannot read 'x'"), ("0-2", "no figure 0")])
def test_parse_only_rejects_bad_input_naming_the_allowed_values(text, fragment):
    with pytest.raises(ValueError, match="--only") as err:
        paper_figures.parse_only(text)
    assert fragment in str(err.value) and "table" in str(err.value)


def test_figures_results_markdown_shows_mean_and_std_and_the_notes():
    metrics, runs = synthetic_metrics()
    table = results_frame(summarise_runs(metrics, runs), paper_figures.TRAINED_OBJECTIVES)
    assert list(table.objective) == ["grpo", "sspo"]  # paper order
    md = tf.figures_results_markdown(table, {4: ["- a note"]}, "settings line")
    assert "| grpo | 3 | 0.510 ± 0.000" in md and "- a note" in md and "settings line" in md


def test_training_plots_draw_every_objective(tmp_path):
    metrics, runs = synthetic_metrics(staleness=(0, 2, 8), seeds=(0, 1))
    summary = summarise_runs(metrics, runs)
    paths = style.save_figure(tf.plot_entropy(metrics, ("grpo", "sspo")), tmp_path / "f5")
    fig = tf.plot_stability(metrics, summary, ("grpo", "sspo"))
    # reward, weight variance and grad norm: one line per objective each; staleness panels: one per objective
    assert [len(ax.get_lines()) >= 2 for ax in fig.axes[:6]] == [True] * 6
    paths += style.save_figure(fig, tmp_path / "f6")
    paths += style.save_figure(tf.plot_entropy_mechanism(metrics, metrics), tmp_path / "f7")
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


# --------------------------------------------------------------------------- what a newcomer misread


def test_figure_4_names_a_tie_as_a_tie():
    from paper_figures import theory_figs
    from sspo_analysis.analysis import lowest_mse

    mse = [6.41e-4, 7e-4, 8e-4, 6.41e-4, 9e-4, 9e-4, 1e-3, 2e-3, 2e-3]
    df = pd.DataFrame({"objective": ["gspo"] * 3 + ["gmpo"] * 3 + ["grpo"] * 3, "param": "eps",
                       "value": [0.1, 0.2, np.nan] * 3, "mse": mse, "var_coefficient": 1e-4, "bias_pos": 0.0,
                       "bias_neg": 0.0, "log_ratio_std": 0.1, "length": 16,
                       "is_default": [False, False, True] * 3, "params": "{}"})
    best = lowest_mse(df)
    assert best["overall"]["tied"] == ["gspo", "gmpo"]
    assert "gspo = gmpo (tie: within 1%)" in theory_figs.winner_text(best["overall"])
    summary = frontier_summary(df)
    assert summary.overall_best.tolist() == [True, True, False] and (summary.tie_rtol == 0.01).all()
    # a strict tolerance breaks the tie only where the MSEs differ
    assert lowest_mse(df.assign(mse=df.mse * [1, 1, 1, 1.001, 1, 1, 1, 1, 1]), rtol=1e-4)["overall"]["tied"] == ["gspo"]


def test_coinciding_curves_are_grouped():
    from paper_figures.theory_figs import coinciding

    df = pd.DataFrame({"objective": ["a"] * 3 + ["b"] * 3 + ["c"] * 3, "length": [1, 2, 3] * 3,
                       "v": [1.0, 2.0, 3.0, 1.001, 2.0, 3.0, 1.0, 5.0, 3.0]})
    assert coinciding(df, ["v"]) == [["a", "b"]]
    assert coinciding(df, ["v"], rtol=1e-6) == []


@pytest.mark.parametrize("r, text", [
    ([0.9996, 0.9999], "Pearson r 0.9996 to 0.9999"),
    ([0.99991, 0.99992], "Pearson r = 1.000 (all objectives)"),
    ([0.06, 0.43, np.nan], "Pearson r 0.06 to 0.43"),
    ([np.nan], "Pearson r n/a"),
])
def test_figure_7_writes_the_correlation_range_so_its_ends_differ(r, text):
    assert tf.r_range_text(r) == text


def test_figure_7_axes_are_robust_to_one_outlier():
    values = np.r_[np.linspace(-1, 1, 199), 1000.0]
    lo, hi = tf.robust_limits(values)
    assert -1.3 < lo < -0.9 and 0.9 < hi < 30


def test_figure_7_bandit_panel_is_in_nats_not_per_token():
    metrics, _ = synthetic_metrics()
    fig = tf.plot_entropy_mechanism(metrics, metrics)
    assert fig.axes[0].get_ylabel() == "measured entropy change (nats)"
    assert fig.axes[1].get_ylabel().endswith("(nats / token)")


def test_the_training_progress_line_names_the_runs_in_progress():
    from paper_figures.experiments import training_status

    line = training_status(4, 22, {"gspo_k0_seed1": 100.0, "sapo_k0_seed0": 130.0, "x_k2_seed0": 140.0}, 160.0)
    assert line.startswith("training runs: 4/22 done") and "gspo_k0_seed1 (60 s)" in line
    assert "sapo_k0_seed0 (30 s)" in line and "x_k2_seed0" not in line  # two workers: the two oldest


def test_figure_9_is_registered_cheaply_for_quick_mode():
    assert paper_figures.QUICK.gradient_batches <= 1000 and paper_figures.SMOKE.gradient_batches <= 200
    assert paper_figures.FIGURES[9].name == "staleness_gradient" and not paper_figures.FIGURES[9].needs_training


# --------------------------------------------------------------------------- issue 23: figures that cannot be misread


def test_figure_3_draws_what_each_objective_applies_not_its_unclipped_weight():
    from paper_figures import theory_figs

    df = theory_figs.data_sequence_weights(stds=(0.3,), lengths=(1, 8, 64), objectives=("gspo", "sspo"))
    fig = theory_figs.plot_sequence_weights(df)
    mean_ax, _, dead_ax = fig.axes[:3]
    gspo = df[(df.objective == "gspo") & (df.advantage_sign == 1)].sort_values("length")
    line = next(ln for ln in mean_ax.get_lines() if ln.get_label() == "gspo")
    assert np.allclose(line.get_ydata(), gspo.mean_coefficient)  # the clipped coefficient, not mean_weight
    assert not np.allclose(gspo.mean_coefficient, gspo.mean_weight)
    assert dead_ax.get_yscale() == "symlog"
    texts = " ".join(t.get_text() for t in dead_ax.texts)
    assert "exactly 0 at every L (no clip): sspo" in texts
    assert "gspo (up to" in fig._suptitle.get_text() and "nearly coincide" not in fig._suptitle.get_text()


def test_figure_4_draws_stars_on_one_point_side_by_side_and_names_them():
    from paper_figures import theory_figs
    from sspo_analysis.analysis import lowest_mse

    rows = []
    for name, mse in (("gspo", 1e-3), ("gmpo", 1.001e-3), ("grpo", 5e-2)):
        for value, extra in ((0.1, 0.5), (0.2, 0.0), (np.nan, 0.2)):
            rows.append({"objective": name, "param": "eps", "value": value, "mse": mse + extra,
                         "var_coefficient": mse + extra, "bias_pos": 0.0, "bias_neg": 0.0, "log_ratio_std": 0.3,
                         "length": 16, "is_default": np.isnan(value), "params": "{}"})
    df = pd.DataFrame(rows)
    best = lowest_mse(df)
    assert theory_figs.star_groups(best) == [["gspo", "gmpo"], ["grpo"]]
    fig = theory_figs.plot_frontier({0.3: df})
    ax = fig.axes[0]
    stars = [ln for ln in ax.get_lines() if ln.get_marker() == "*"]
    xs = sorted(float(ln.get_xdata()[0]) for ln in stars[:2])
    assert len(stars) == 3 and xs[1] / xs[0] > 1.2  # drawn apart, around the common point
    assert all(ln.get_markerfacecolor() == "white" for ln in stars)  # every best is at its grid's edge (0.2)
    assert "gspo = gmpo (tie)" in " ".join(t.get_text() for t in ax.texts)
    assert "at the edge of its swept range: gspo, gmpo" in ax.get_title()


def test_figure_5_shows_a_with_its_standard_error_per_objective_and_fits_per_window():
    from test_analysis import synthetic_metrics

    metrics, _ = synthetic_metrics(steps=30)
    metrics = metrics.assign(reward_mean=metrics.reward_mean + 0.01 * np.sin(metrics.index.to_numpy()))
    windows = tf.fit_windows(metrics, ["grpo", "sspo"])
    assert sorted(set(zip(windows.step_lo, windows.step_hi))) == [(0, 9), (10, 19), (20, 29)]
    fig = tf.plot_entropy(metrics, ("grpo", "sspo"))
    titles = [ax.get_title() for ax in fig.axes[:4]]
    assert titles[:2] == ["grpo", "sspo"]  # one column per objective
    assert all("±" in t and "per window" in t for t in titles[2:])
    assert "training time pooled" in fig._suptitle.get_text()


def test_figure_6_says_its_staleness_counts_never_go_below_zero_and_no_ranking_is_implied():
    from test_analysis import synthetic_metrics

    metrics, runs = synthetic_metrics(staleness=(0, 2, 8), seeds=(0, 1, 2))
    metrics.loc[(metrics.run == "grpo_k2_s0") & (metrics.step == 11), "grad_norm"] = 50.0  # one spike
    summary = summarise_runs(metrics, runs)
    tests = tf.staleness_tests(summary)
    assert len(tests) == 3 and (tests.verdict == "no significant difference").all()  # 3 seeds: p >= 0.25
    assert "no significant difference between any two objectives" in tf.verdict_text(tests)
    fig = tf.plot_stability(metrics, summary, ("grpo", "sspo"))
    top = fig.axes[:6]
    assert [ax.get_title() for ax in top[:2]] == ["grpo, k = 0", "sspo, k = 0"]
    spikes = next(ax for ax in fig.axes if ax.get_title() == "grad-norm spikes vs k")
    low = min(seg[:, 1].min() for coll in spikes.collections for seg in coll.get_segments())
    assert low >= 0
    assert any(seg[:, 1].max() > 1 for coll in spikes.collections for seg in coll.get_segments())  # 0 of 3: wide


def test_figure_8_names_the_exact_zeros_of_the_dead_fraction():
    rows = []
    for name, dead in (("grpo", 0.05), ("sspo", 0.0)):
        for step in range(4):
            rows.append({"objective": name, "seed": 0, "step": step, "coef_norm_var": 0.01 * (step + 1),
                         "dead_frac": dead, "log_ratio_std": 0.1, "empirical_var_coefficient": 0.01 * (step + 1),
                         "lognormal_var_coefficient": 0.012 * (step + 1), "empirical_dead_fraction": dead,
                         "lognormal_dead_fraction": dead * 1.1})
    fig = tf.plot_theory_vs_measured(pd.DataFrame(rows))
    dead_ax = fig.axes[1]
    assert dead_ax.get_xscale() == "symlog" and dead_ax.get_yscale() == "symlog"
    assert "sspo: exactly 0 in every logged step" in " ".join(t.get_text() for t in dead_ax.texts)
    markers = {c.get_label(): c.get_paths()[0].vertices.shape for c in dead_ax.collections if c.get_label() in
               ("grpo", "sspo")}
    assert markers["grpo"] != markers["sspo"]  # each objective its own marker


def test_finished_runs_lose_their_checkpoints_and_nothing_else(tmp_path):
    from paper_figures.experiments import drop_checkpoints

    def run(name: str, finished: bool, extra: str | None = None):
        d = tmp_path / name
        for rel in ("config.toml", "metrics.jsonl", "log_ratios/step_000005.npz", "checkpoint/state.pt",
                    "final/model.safetensors", "final/config.json"):
            (d / rel).parent.mkdir(parents=True, exist_ok=True)
            (d / rel).write_bytes(b"x" * 100)
        if finished:
            (d / "DONE").write_text("finished\n")
        if extra:
            (d / extra).write_text("mine")
        return d

    done, busy, mixed = run("done", True), run("busy", False), run("mixed", True, "final/notes.txt")
    assert drop_checkpoints(done) == 300
    assert sorted(str(p.relative_to(done)) for p in done.rglob("*") if p.is_file()) == [
        "DONE", "config.toml", "log_ratios/step_000005.npz", "metrics.jsonl"]
    assert drop_checkpoints(busy) == 0 and (busy / "checkpoint" / "state.pt").exists()  # it resumes from it
    assert drop_checkpoints(mixed) == 300 and (mixed / "final" / "notes.txt").read_text() == "mine"


def test_only_the_main_grid_dumps_log_ratios():
    from paper_figures import FULL
    from paper_figures.experiments import overrides

    assert "log.log_ratios_every=5" in overrides(FULL, 0)  # figure 8 reads these
    assert "log.log_ratios_every=0" in overrides(FULL, 2)


@pytest.mark.parametrize("keep", [False, True])
def test_reused_runs_lose_their_checkpoints_unless_asked_to_keep_them(tmp_path, keep):
    from paper_figures import QUICK, Context
    from paper_figures.experiments import ensure_runs, plan

    ctx = Context(quick=True, runs_dir=tmp_path, keep_checkpoints=keep)
    for spec in plan(ctx):  # every planned run finished, as a call before this one left it
        (spec.run_dir / "checkpoint").mkdir(parents=True)
        (spec.run_dir / "checkpoint" / "state.pt").write_bytes(b"x")
        (spec.run_dir / "DONE").write_text("")
        (spec.run_dir / "config.toml").write_text(
            f'seed = {spec.seed}\nsteps = {QUICK.train_steps}\n[model]\npreset = "{QUICK.preset}"\n'
            f'[task]\ndigits = {QUICK.task_digits}\n[objective]\nname = "{spec.objective}"\n[algo]\n'
            f"staleness = {spec.staleness}\n")
    runs = ensure_runs(ctx)
    assert len(runs) == len(plan(ctx)) and all(r["done"] for r in runs)
    kept = [(r["run_dir"] / "checkpoint" / "state.pt").exists() for r in runs]
    assert kept == [keep] * len(runs)
