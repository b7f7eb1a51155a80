"""Figures 5-8 and the results table: measured entropy and stability on the tiny LLM.

Everything here reads a tidy per-step table of the training runs (see
:func:`paper_figures.experiments.load_metrics`): one row per (run, step) with
the run's ``objective``, ``seed`` and ``staleness`` and every key of the
trainer's ``metrics.jsonl``. The runs themselves are made (or reused) by
:mod:`paper_figures.experiments`; the numbers drawn from them (run summaries,
fits, agreement) come from :mod:`sspo_analysis.analysis`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from paper_figures import TRAINED_OBJECTIVES, Context, figure, legend_below, note, stem
from sspo_analysis.analysis import (
    PREDICTION_KINDS,
    SPIKE_FACTOR,
    SPIKE_WINDOW,
    entropy_agreement,
    entropy_reward_law,
    fit_entropy_reward,
    results_frame,
    summarise_runs,
)
from sspo_analysis.io import write_frame

# --------------------------------------------------------------------------- shared drawing


def _band(ax, g, key: str, name: str, label: str | None = None, log: bool = False, index: int = 0) -> int:
    """Mean over seeds against step (geometric mean on a log axis) with a 95 % t confidence band of the mean.

    Returns the number of seeds (for the band's description on the figure).
    """
    from sspo_analysis.plotting import style
    from sspo_analysis.plotting.bands import mean_ci

    piv = g.pivot_table(index="step", columns="seed", values=key, aggfunc="mean")
    x = piv.index.to_numpy()
    mean, lo, hi = mean_ci(piv.to_numpy(dtype=float), log=log)
    every = max(1, len(x) // 6)
    ax.plot(x, mean, label=label or name, lw=1.2, **style.line_kw(name, every=every, index=index))
    if piv.shape[1] > 1:
        ax.fill_between(x, lo, hi, color=style.color(name), alpha=0.15, lw=0)
    return int(piv.shape[1])


def _seeds_text(n: int, log: bool = False) -> str:
    from sspo_analysis.plotting.bands import band_label

    return band_label(n, log=log)


SHARED_SETTINGS_NOTE = ("Every objective at one shared learning rate from one warm start: the dynamics at equal "
                        "settings, not a comparison at each objective's own tuned rate (docs/results/tuned).")
"""Said on figures 5 and 6 and in the results table: they do not follow the tuned study's protocol."""


# --------------------------------------------------------------------------- figure 5


FIT_WINDOW = 10
"""Figure 5: steps per window of the per-window fits (the pooled fit mixes training time in)."""


def fit_windows(metrics, objectives: Sequence[str], window: int = FIT_WINDOW):
    """The entropy-reward fit of every objective per ``window`` steps (``fit_entropy_reward`` on each window).

    Returns its table with ``step_lo`` and ``step_hi`` (inclusive) added: whether the pooled
    fit's ``a`` holds within a stretch of training, or comes from entropy and reward both
    drifting with the step.
    """
    import pandas as pd

    main = metrics[metrics.staleness == 0]
    frames = []
    for lo in range(int(main.step.min()), int(main.step.max()) + 1, window):
        part = main[(main.step >= lo) & (main.step < lo + window)]
        frames.append(fit_entropy_reward(part, objectives).assign(step_lo=lo, step_hi=int(part.step.max())))
    return pd.concat(frames, ignore_index=True)


def _fit_text(f, windows) -> str:
    """A panel's fit in words: the pooled ``a`` with its standard error, and the per-window range."""
    text = f"all: a = {f.a:.2f} ± {f.a_se:.2f}\nR² = {f.r2:.2f}, n = {int(f.n)}"
    ok = windows[np.isfinite(windows.a)]
    if len(ok):
        text += f"\nper window:\na = {ok.a.min():.2f} to {ok.a.max():.2f}"
    return text


def plot_entropy(metrics, objectives: Sequence[str] = TRAINED_OBJECTIVES, fits=None, windows=None):
    """Figure 5, one column per objective: top, entropy against step (mean over seeds, band: 95 % t CI of the mean;
    grey: the other objectives' means); bottom, reward against entropy (points: every seed and step, coloured by
    step) with the law ``R = -a exp(H) + b`` fitted on all of them, ``a`` with its standard error."""
    from sspo_analysis.plotting import style

    main = metrics[metrics.staleness == 0]
    names = [o for o in objectives if o in set(main.objective)]
    fits = (fit_entropy_reward(main, names) if fits is None else fits).set_index("objective")
    windows = fit_windows(main, names) if windows is None else windows
    fig, axes = style.subplots(2, len(names), 4.4, sharey="row")
    n_seeds = main.groupby("objective").seed.nunique()
    steps = (float(main.step.min()), float(main.step.max()))
    for j, name in enumerate(names):
        g = main[main.objective == name]
        for other in names:
            if other != name:
                mean = main[main.objective == other].groupby("step").entropy.mean()
                axes[0, j].plot(mean.index, mean, color="#cccccc", lw=0.6, zorder=0)
        _band(axes[0, j], g, "entropy", name, index=j)
        axes[0, j].set_title(name, color=style.color(name))
        points = axes[1, j].scatter(g.entropy, g.reward_mean, s=5, c=g.step, cmap="viridis", vmin=steps[0],
                                    vmax=steps[1], alpha=0.7, lw=0)
        f = fits.loc[name] if name in fits.index else None
        if f is not None and np.isfinite(f.a):
            h = np.linspace(g.entropy.min(), g.entropy.max(), 50)
            axes[1, j].plot(h, entropy_reward_law(h, f.a, f.b), color="black", lw=1.0)
            axes[1, j].set_title(_fit_text(f, windows[windows.objective == name]), fontsize=6)
        axes[0, j].set_xlabel("RL step")
        axes[1, j].set_xlabel("entropy H")
    axes[0, 0].set_ylabel("policy entropy (nats / token)")
    axes[1, 0].set_ylabel("reward (batch mean)")
    fig.colorbar(points, ax=axes[1, :], label="RL step", shrink=0.9, pad=0.01)
    fig.suptitle(f"Entropy H (nats / token) on the tiny LLM, staleness k = 0. Top: {_seeds_text(int(n_seeds.min()))}; "
                 "grey: the other "
                 "objectives' means.\nBottom: every seed's every step; black: R = -a exp(H) + b fitted on all of "
                 f"them (training time pooled), a ± its standard error;\nper window: the range of a fitted per "
                 f"{FIT_WINDOW} steps (fig5_entropy_fit.csv)\n{SHARED_SETTINGS_NOTE}",
                 fontsize=7)
    return fig


@figure(5, "entropy", "entropy curves on the tiny LLM", needs_training=True)
def figure_5(out_dir: Path, ctx: Context) -> list[Path]:
    import pandas as pd

    from paper_figures.experiments import training_data
    from sspo_analysis.plotting import style

    metrics, _ = training_data(ctx)
    cols = ["objective", "seed", "staleness", "step", "entropy", "reward_mean"]
    names = [o for o in TRAINED_OBJECTIVES if o in set(metrics.objective)]
    fits = fit_entropy_reward(metrics, names)
    windows = fit_windows(metrics, names)
    base = stem(out_dir, 5)
    ctx.advance(0, 1, "plotting")
    paths = style.save_figure(plot_entropy(metrics, fits=fits, windows=windows), base,
                              metrics[metrics.staleness == 0][cols])
    table = pd.concat([fits.assign(window="all steps"), windows.assign(window="steps")], ignore_index=True)
    paths.append(write_frame(table, base.with_name(base.name + "_fit.csv")))
    return paths


# --------------------------------------------------------------------------- figure 6


STEP_PANELS = (("reward_mean", "reward\n(batch mean)", False), ("seq_weight_var", "Var of sequence\nweight", True),
               ("grad_norm", "grad norm\n(before clipping)", True))
"""Figure 6, top: the per-step metrics (column, label, log axis), one row each, one column per objective."""


def _step_grid(sub, main, names: list[str]) -> None:
    """Figure 6, top: one row per metric of :data:`STEP_PANELS`, one column per objective (grey: the others)."""
    from sspo_analysis.plotting import style

    axes = sub.subplots(len(STEP_PANELS), len(names), sharex=True, sharey="row", squeeze=False)
    for row, (key, label, log) in enumerate(STEP_PANELS):
        for j, name in enumerate(names):
            ax = axes[row, j]
            for other in names:
                if other != name:
                    mean = main[main.objective == other].groupby("step")[key].mean()
                    ax.plot(mean.index, mean, color="#cccccc", lw=0.5, zorder=0)
            _band(ax, main[main.objective == name], key, name, log=log, index=j)
            if log:
                ax.set_yscale("log")
            if row == 0:
                ax.set_title(f"{name}, k = 0", color=style.color(name), fontsize=7)
        axes[row, 0].set_ylabel(label, fontsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("RL step")


def staleness_tests(summary, key: str = "final_reward"):
    """Every pair of objectives compared at every staleness k on ``key``, paired by seed
    (:func:`sspo_analysis.study.stats.paired_difference`: bootstrap interval and exact sign-flip test)."""
    import itertools

    import pandas as pd

    from sspo_analysis.study.stats import paired_difference

    rows = []
    for k, g in summary.groupby("staleness"):
        piv = g.pivot_table(index="seed", columns="objective", values=key)
        for a, b in itertools.combinations(list(piv.columns), 2):
            both = piv[[a, b]].dropna()
            if len(both) >= 2:
                rows.append({"staleness": k, "metric": key, "a": a, "b": b,
                             **paired_difference(both[a].to_numpy(), both[b].to_numpy())})
    return pd.DataFrame(rows)


def verdict_text(tests) -> str:
    """What the paired tests allow one to say about a ranking, in words for the figure."""
    if tests is None or not len(tests):
        return "no paired comparison (fewer than 2 seeds)"
    sig = tests[tests.verdict != "no significant difference"]
    n = int(tests.n.max())
    if not len(sig):
        return (f"no significant difference between any two objectives at any k\n(paired sign-flip test over {n} "
                f"seeds, smallest p = {tests.p_value.min():.2g}): the figure ranks none of them")
    pairs = "; ".join(f"k={r.staleness}: {r.a} {r.verdict} than {r.b}" for r in sig.itertuples())
    return f"significant (paired, {n} seeds): {pairs}; every other pair: no significant difference"


def plot_stability(metrics, summary, objectives: Sequence[str] = TRAINED_OBJECTIVES, tests=None):
    """Figure 6: top, reward / weight variance / grad norm against step at staleness 0, one column per objective;
    bottom, final reward, grad-norm spikes and weight variance against staleness k."""
    import matplotlib.pyplot as plt

    from sspo_analysis.plotting import style

    style.apply()
    tests = staleness_tests(summary) if tests is None else tests
    main = metrics[metrics.staleness == 0]
    names = [o for o in objectives if o in set(main.objective)]
    fig = plt.figure(figsize=(style.FULL_WIDTH, 7.2), layout="constrained")
    top, bottom = fig.subfigures(2, 1, height_ratios=[3.2, 2.0])
    _step_grid(top, main, names)
    n_seeds = int(main.groupby("objective").seed.nunique().min()) if len(main) else 0
    top.suptitle(f"Staleness k = 0, per step. {_seeds_text(n_seeds)}\n(log axes: geometric mean, CI of the log); "
                 f"grey: the other objectives' means\n{SHARED_SETTINGS_NOTE}", fontsize=7)
    axes = bottom.subplots(1, 3, squeeze=False)[0]
    ks = sorted(summary.staleness.unique())
    stale = [(name, g) for name, g in summary.groupby("objective", sort=False) if g.staleness.nunique() >= 2]
    for j, (name, g) in enumerate(stale):
        # The same seeds at every k, so that the points compare like with like.
        common = set.intersection(*(set(x.seed) for _, x in g.groupby("staleness")))
        g = g[g.seed.isin(common)]
        for ax, key in zip(axes, ("final_reward", "spikes", "weight_var")):
            _stale_points(ax, g, key, name, j, len(stale))
    for ax in axes:
        ax.set_xticks(ks)
        ax.set_xlabel("staleness k (policy lag, updates)")
    axes[0].set(ylabel="final reward", title="final reward vs staleness k")
    axes[1].set(ylabel=f"spikes per run (grad norm\n> {SPIKE_FACTOR:g}x median)", title="grad-norm spikes vs k")
    axes[1].set_ylim(bottom=0)
    axes[2].set(ylabel="mean Var of sequence weight", yscale="log", title="weight variance vs k")
    bottom.suptitle(f"{_STALE_TEXT}\nFinal reward: {verdict_text(tests)}", fontsize=7)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        bottom.legend(handles, labels, loc="outside lower center", ncols=len(labels))
    return fig


@figure(6, "stability", "reward, weight variance and grad norm; staleness study", needs_training=True)
def figure_6(out_dir: Path, ctx: Context) -> list[Path]:
    from paper_figures.experiments import training_data
    from sspo_analysis.plotting import style

    metrics, runs = training_data(ctx)
    summary = summarise_runs(metrics, runs)
    tests = staleness_tests(summary)
    base = stem(out_dir, 6)
    cols = ["objective", "seed", "staleness", "step", "reward_mean", "seq_weight_var", "grad_norm"]
    ctx.advance(0, 1, "plotting")
    paths = style.save_figure(plot_stability(metrics, summary, tests=tests), base, metrics[cols])
    paths.append(write_frame(summary, base.with_name(base.name + "_runs.csv")))
    paths.append(write_frame(tests, base.with_name(base.name + "_tests.csv")))
    return paths


_STALE_TEXT = ("Against staleness k: mean over the seeds run at every k; bars: 95% t CI of the mean (weight variance: "
               "geometric mean;\nspikes: exact Poisson interval of the mean count); no bar with one seed; points "
               "shifted sideways so that equal values stay visible")

COUNT_KEYS = ("spikes",)
"""Figure 6: the per-run summaries that are counts (exact Poisson intervals, never below zero)."""


def _stale_points(ax, g, key: str, name: str, j: int, n: int) -> None:
    """One objective's seed mean (and CI) against staleness k, shifted sideways by its index ``j`` of ``n``."""
    from sspo_analysis.plotting import style
    from sspo_analysis.plotting.bands import mean_ci, poisson_mean_ci

    piv = g.pivot_table(index="staleness", columns="seed", values=key, aggfunc="mean")
    values = piv.to_numpy(dtype=float)
    if key in COUNT_KEYS:
        mean, lo, hi = poisson_mean_ci(values)
    else:
        mean, lo, hi = mean_ci(values, log=key == "weight_var")
    x = piv.index.to_numpy(dtype=float) + (j - (n - 1) / 2) * 0.15
    kw = style.line_kw(name)
    ax.plot(x, mean, lw=1.0, label=name, **kw)
    if piv.shape[1] > 1:
        ax.errorbar(x, mean, yerr=[mean - lo, hi - mean], fmt="none", ecolor=kw["color"], lw=0.8, capsize=0)


# --------------------------------------------------------------------------- figure 7


def r_range_text(r) -> str:
    """The per-objective Pearson r as a range, with enough digits to tell its ends apart.

    ``"Pearson r 0.9991 to 0.9998"`` (the lowest and highest over objectives, 2 to 4
    decimals); when the ends agree to 4 decimals, ``"Pearson r = 1.000 (all
    objectives)"``; ``"Pearson r n/a"`` when there is none.
    """
    r = np.asarray(r, dtype=float)
    r = r[np.isfinite(r)]
    if not len(r):
        return "Pearson r n/a"
    lo, hi = float(r.min()), float(r.max())
    for digits in (2, 3, 4):
        a, b = f"{lo:.{digits}f}", f"{hi:.{digits}f}"
        if a != b:
            return f"Pearson r {a} to {b}"
    return f"Pearson r = {lo:.3f} (all objectives)" if len(r) > 1 else f"Pearson r = {lo:.3f}"


def robust_limits(values, lower: float = 1.0, upper: float = 99.0, pad: float = 0.08) -> tuple[float, float]:
    """Axis limits from the ``lower``-``upper`` percentiles of the finite ``values``, padded by ``pad`` of the span."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if not len(v):
        return -1.0, 1.0
    lo, hi = np.percentile(v, [lower, upper])
    span = (hi - lo) or max(abs(hi), 1e-12)
    return float(lo - pad * span), float(hi + pad * span)


def _scatter_pred_real(ax, df, pred: str, title: str, xlabel: str, diagonal: bool,  # noqa: PLR0913
                       ylabel: str = "measured entropy change (nats / token)") -> None:
    """One panel of figure 7: predicted against measured entropy change, axes at the 1st-99th percentiles."""
    from sspo_analysis.plotting import style

    agree = entropy_agreement(df, pred)
    scale = 1.0
    if not diagonal:  # arbitrary units: write the power of ten into the label, not beside the ticks
        top = float(np.nanmax(np.abs(df[pred].to_numpy(dtype=float)))) if len(df) else 0.0
        if top > 0 and np.isfinite(top):
            scale = 10.0 ** np.floor(np.log10(top))
            xlabel = f"{xlabel}, x {scale:.0e}"
    for name, g in df.groupby("objective", sort=False):
        ax.scatter(g[pred] / scale, g.entropy_change_real, s=7, color=style.color(name), alpha=0.6, lw=0, label=name,
                   marker=style.marker(name))
    ax.axhline(0, color="#dddddd", lw=0.5, zorder=0)
    ax.axvline(0, color="#dddddd", lw=0.5, zorder=0)
    x, y = df[pred].to_numpy(dtype=float) / scale, df.entropy_change_real.to_numpy(dtype=float)
    if diagonal:  # the same limits on both axes, so that the grey line is the diagonal
        xlim = ylim = robust_limits(np.concatenate([x, y]))
        ax.plot(xlim, xlim, color="#bbbbbb", lw=0.7, zorder=0)
    else:
        xlim, ylim = robust_limits(x), robust_limits(y)
    ax.set(xlim=xlim, ylim=ylim)
    ok = np.isfinite(x) & np.isfinite(y)
    outside = int(np.sum(ok & ((x < xlim[0]) | (x > xlim[1]) | (y < ylim[0]) | (y > ylim[1]))))
    if outside:
        note(ax, f"axes: 1st-99th percentile\n{outside} of {int(ok.sum())} points outside", loc="upper left")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=f"{title}\n{r_range_text(agree.pearson_r)}")


def plot_entropy_mechanism(bandit, llm):
    """Figure 7: predicted against measured entropy change per step.

    Left: the softmax bandit, ``-Cov(log pi, dz)`` of the applied update. Middle:
    the LLM runs, the same covariance prediction per visited state (SGD scale;
    the trainer uses AdamW, so only signs and correlations compare). Right: the
    network's own first-order prediction ``grad H . d theta``, in the units of the
    measurement (grey line: equality). Per-objective correlations: ``results.md``.
    """
    from sspo_analysis.plotting import style

    has_taylor = llm is not None and "entropy_change_taylor" in llm and llm.entropy_change_taylor.notna().any()
    fig, axes = style.subplots(1, 3 if has_taylor else 2, 3.1)
    # The bandit has one action per step, so its entropy is in nats (not per token).
    _scatter_pred_real(axes[0, 0], bandit, "entropy_change_pred", "softmax bandit",
                       "predicted -Cov(log pi, dz) (nats)", diagonal=True, ylabel="measured entropy change (nats)")
    if llm is not None and len(llm):
        _scatter_pred_real(axes[0, 1], llm, "entropy_change_pred", "tiny LLM: covariance proxy",
                           "predicted -Cov(log pi, c)\n(SGD units", diagonal=False)
        axes[0, 1].set_xlabel(axes[0, 1].get_xlabel() + ")")
    if has_taylor:
        _scatter_pred_real(axes[0, 2], llm, "entropy_change_taylor", "tiny LLM: first order in theta",
                           "predicted grad H . d theta\n(nats / token)", diagonal=True)
    legend_below(fig, axes[0, 0], markerscale=2)
    fig.suptitle("Predicted against measured entropy change per step. Titles: Pearson r, lowest to highest over the "
                 "objectives (each one: results.md)", fontsize=7.5)
    return fig


def agreement_markdown(agree) -> list[str]:
    """Figure 7's agreement as Markdown lines: Pearson r (sign agreement) per objective and predictor."""
    cols = [("bandit", "entropy_change_pred", "bandit: -Cov(log pi, dz)"),
            ("llm", "entropy_change_pred", "LLM: covariance proxy"),
            ("llm", "entropy_change_taylor", "LLM: grad H . d theta")]
    cols = [c for c in cols if ((agree.source == c[0]) & (agree.predictor == c[1])).any()]
    lines = ["Figure 7: predicted against measured entropy change per step, Pearson r (sign agreement).", "",
             "| objective | " + " | ".join(c[2] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name in dict.fromkeys(agree.objective):
        cells = []
        for source, pred, _ in cols:
            row = agree[(agree.objective == name) & (agree.source == source) & (agree.predictor == pred)]
            cells.append(f"{row.pearson_r.iloc[0]:.2f} ({row.sign_agreement.iloc[0]:.0%})" if len(row) else "")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


@figure(7, "entropy_mechanism", "predicted against measured entropy change", needs_training=True)
def figure_7(out_dir: Path, ctx: Context) -> list[Path]:
    import pandas as pd

    from paper_figures.experiments import training_data
    from paper_figures.theory_figs import data_bandit
    from sspo_analysis.plotting import style

    st = ctx.settings
    ctx.advance(0, 1, "theory: bandit simulator")
    bandit = ctx.cached("bandit", lambda: data_bandit(TRAINED_OBJECTIVES, steps=st.bandit_steps,
                                                      seeds=range(st.bandit_seeds)))
    metrics, _ = training_data(ctx)
    cols = ["objective", "seed", "step", "entropy_change_pred", "entropy_change_real"]
    extra = [c for c in ("entropy_change_taylor", "entropy_cov") if c in metrics]
    llm = metrics[metrics.staleness == 0][cols + extra]
    data = pd.concat([bandit[cols].assign(source="bandit"), llm.assign(source="llm")], ignore_index=True)
    agree = [entropy_agreement(bandit).assign(source="bandit"), entropy_agreement(llm).assign(source="llm")]
    if "entropy_change_taylor" in llm:
        agree.append(entropy_agreement(llm, "entropy_change_taylor").assign(source="llm"))
    agree = pd.concat(agree, ignore_index=True)
    ctx.cache.setdefault("notes", {})[7] = agreement_markdown(agree)
    base = stem(out_dir, 7)
    ctx.advance(0, 1, "plotting")
    paths = style.save_figure(plot_entropy_mechanism(bandit, llm), base, data)
    paths.append(write_frame(agree, base.with_name(base.name + "_agreement.csv")))
    return paths


# --------------------------------------------------------------------------- figure 8


DEAD_LINTHRESH = 1e-3
"""Figure 8: the dead-fraction axes are linear below this, logarithmic above (exact zeros stay on the axes)."""


def _theory_panel(ax, df, key: str, meas: str, log: bool) -> list[str]:
    """One panel of figure 8: predicted against measured per objective; returns the objectives exactly 0 throughout."""
    from matplotlib.transforms import offset_copy

    from sspo_analysis.plotting import style

    cols = [f"empirical_{key}", f"lognormal_{key}", meas]
    zero = [] if log else [n for n, g in df.groupby("objective", sort=False) if (g[cols] == 0).all().all()]
    for name, g in df.groupby("objective", sort=False):
        mk = style.marker(name)
        if name in zero:  # every point at (0, 0): one marker each, side by side there (an offset in points)
            shift = offset_copy(ax.transData, fig=ax.figure, x=7 * (zero.index(name) - (len(zero) - 1) / 2),
                                units="points")
            ax.scatter([0.0], [0.0], s=16, color=style.color(name), label=name, lw=0, marker=mk, transform=shift,
                       zorder=3)
            continue
        ax.scatter(g[f"empirical_{key}"], g[meas], s=12, color=style.color(name), label=name, alpha=0.8, lw=0,
                   marker=mk)
        ax.scatter(g[f"lognormal_{key}"], g[meas], s=16, marker=mk, facecolor="none", edgecolor=style.color(name),
                   lw=0.7, alpha=0.8)
    finite = df[cols].to_numpy(dtype=float)
    finite = finite[np.isfinite(finite)]
    if log:
        pos = finite[finite > 0]
        lo, hi = (pos.min() / 1.5, pos.max() * 1.5) if len(pos) else (1e-4, 1.0)
        ax.set(xscale="log", yscale="log")
    else:
        lo, hi = -DEAD_LINTHRESH / 5, max(float(finite.max()) * 1.5 if len(finite) else 0.0, 0.02)
        ax.set_xscale("symlog", linthresh=DEAD_LINTHRESH, linscale=0.6)
        ax.set_yscale("symlog", linthresh=DEAD_LINTHRESH, linscale=0.6)
    ax.plot([lo, hi], [lo, hi], color="#bbbbbb", lw=0.7, zorder=0)
    ax.set(xlim=(lo, hi), ylim=(lo, hi))
    return zero


def plot_theory_vs_measured(df):
    """Figure 8: predicted against measured coefficient variance and dead fraction, per objective.

    Filled markers: theory on the logged sequences (``EmpiricalRatios``), which
    agree by construction (the same ratios the trainer used: a consistency check,
    not evidence, and said so on the figure); open markers: the log-normal model
    with the same mean, std and length. Each objective has its own marker; the
    dead-fraction axes are symmetric-log, and the objectives whose dead fraction is
    exactly 0 throughout (soft gates) are named on the panel.
    """
    from sspo_analysis.plotting import style

    fig, axes = style.subplots(1, 2, 3.2)
    for ax, (key, meas, label, log) in zip(axes[0], (
            ("var_coefficient", "coef_norm_var", "variance of normalised coefficient", True),
            ("dead_fraction", "dead_frac", "dead-gradient fraction", False))):
        zero = _theory_panel(ax, df, key, meas, log)
        scale = "" if log else f" (linear below {DEAD_LINTHRESH:g})"
        ax.set(xlabel=f"predicted{scale}", ylabel=f"measured{scale}", title=label)
        if zero:
            note(ax, f"{', '.join(zero)}: exactly 0 in every logged step,\npredicted and measured (a soft gate "
                     "zeroes no\ngradient); drawn side by side at (0, 0)", loc="upper left")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles += [Line2D([], [], ls="", marker="o", color="#555555", ms=4),
                Line2D([], [], ls="", marker="o", mfc="none", color="#555555", ms=4)]
    labels += ["filled: theory on logged sequences (agrees by construction)",
               "open: log-normal model (same mean, std, length)"]
    fig.legend(handles, labels, loc="outside lower center", ncols=4)
    fig.suptitle("Filled markers agree by construction: the prediction is computed from the same logged ratios the "
                 "trainer used,\nso their agreement checks the code, not the theory. The open markers (two moments "
                 "only) are the test.", fontsize=7)
    return fig


@figure(8, "theory_vs_measured", "predicted against measured coefficient variance and dead fraction",
        needs_training=True)
def figure_8(out_dir: Path, ctx: Context) -> list[Path]:
    from paper_figures.experiments import theory_on_logged_ratios
    from sspo_analysis.plotting import style

    df = ctx.cached("fig8", lambda: theory_on_logged_ratios(ctx))
    base = stem(out_dir, 8)
    ok = df.dropna(subset=["coef_norm_var", "empirical_var_coefficient"])
    notes = ["Figure 8: median relative error of the predicted coefficient variance, and median absolute error "
             "of the predicted dead fraction, against the values measured in the same steps.", "",
             "| objective | logged steps | var: logged sequences | var: log-normal model | dead: logged sequences "
             "| dead: log-normal model |", "|---|---|---|---|---|---|"]
    for name, g in ok.groupby("objective", sort=False):
        meas = g.coef_norm_var.clip(lower=1e-12)
        rel = {k: np.median(np.abs(g[f"{k}_var_coefficient"] - g.coef_norm_var) / meas) for k in PREDICTION_KINDS}
        dead = {k: np.median(np.abs(g[f"{k}_dead_fraction"] - g.dead_frac)) for k in PREDICTION_KINDS}
        notes.append(f"| {name} | {len(g)} | {rel['empirical']:.1%} | {rel['lognormal']:.1%} | "
                     f"{dead['empirical']:.4f} | {dead['lognormal']:.4f} |")
    ctx.cache.setdefault("notes", {})[8] = notes
    ctx.advance(0, 1, "plotting")
    return style.save_figure(plot_theory_vs_measured(df), base, df)


# --------------------------------------------------------------------------- results table


TABLE_COLUMNS = (("final_reward", "final reward"), ("end_entropy", "entropy at end (nats)"),
                 ("auc_reward", "reward AUC / step"), ("weight_var", "weight variance"), ("spikes", "grad spikes"))


def figures_results_markdown(table, notes: dict | None = None, settings_line: str = "") -> str:
    """The results table as Markdown (mean ± std over seeds) with the figures' notes below it."""
    head = "| objective | runs | " + " | ".join(label for _, label in TABLE_COLUMNS) + " | diverged |"
    lines = ["# Results", "", settings_line, "", SHARED_SETTINGS_NOTE, "", head,
             "|" + "---|" * (len(TABLE_COLUMNS) + 3)]
    fmt = {"weight_var": "{:.3g}", "spikes": "{:.1f}"}
    for row in table.itertuples():
        cells = []
        for key, _ in TABLE_COLUMNS:
            f = fmt.get(key, "{:.3f}")
            mean, sd = getattr(row, f"{key}_mean"), getattr(row, f"{key}_std")
            cells.append(f.format(mean) + ("" if np.isnan(sd) else " ± " + f.format(sd)))
        lines.append(f"| {row.objective} | {row.runs} | " + " | ".join(cells) + f" | {row.diverged} |")
    lines += ["", "Final reward and end entropy: mean over the last 20 % of steps; reward AUC: area under the reward "
              "curve per step; weight variance: mean over steps of the logged variance of the sequence importance "
              "weight (the objective's own sequence weight; for token objectives the geometric mean of the token "
              "ratios); grad spikes: "
              f"steps whose grad norm exceeds {SPIKE_FACTOR:g}x the median of the previous {SPIKE_WINDOW}. "
              "Diverged: did not finish, non-finite values or skipped updates, or final reward below half the "
              "initial reward."]
    for key in sorted(notes or {}):
        lines += [""] + list(notes[key])
    return "\n".join(lines) + "\n"


def results_table(out_dir: Path, ctx: Context) -> list[Path]:
    """Write ``results.csv`` and ``results.md`` into ``out_dir``; returns the paths."""
    from paper_figures.experiments import describe_settings, training_data
    from sspo_analysis.io import write_text

    metrics, runs = training_data(ctx)
    table = results_frame(summarise_runs(metrics, runs), TRAINED_OBJECTIVES)
    csv_path = write_frame(table, Path(out_dir) / "results.csv")
    md = figures_results_markdown(table, ctx.cache.get("notes"), describe_settings(ctx))
    return [csv_path, write_text(Path(out_dir) / "results.md", md)]
