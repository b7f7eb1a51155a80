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

from paper_figures import (
    TRAINED_OBJECTIVES,
    Context,
    color,
    figure,
    legend_below,
    line_style,
    new_figure,
    note,
    save,
    stem,
    write_frame,
)
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

# --------------------------------------------------------------------------- shared drawing


def _band(ax, g, key: str, name: str, label: str | None = None, log: bool = False, index: int = 0) -> int:
    """Mean over seeds against step (geometric mean on a log axis) with a 95 % t confidence band of the mean.

    Returns the number of seeds (for the band's description on the figure).
    """
    from sspo_analysis.plotting.bands import mean_ci

    piv = g.pivot_table(index="step", columns="seed", values=key, aggfunc="mean")
    x = piv.index.to_numpy()
    mean, lo, hi = mean_ci(piv.to_numpy(dtype=float), log=log)
    every = max(1, len(x) // 6)
    ax.plot(x, mean, label=label or name, lw=1.2, **line_style(name, marker=True, every=every, index=index))
    if piv.shape[1] > 1:
        ax.fill_between(x, lo, hi, color=color(name), alpha=0.15, lw=0)
    return int(piv.shape[1])


def _seeds_text(n: int, log: bool = False) -> str:
    from sspo_analysis.plotting.bands import band_label

    return band_label(n, log=log)


# --------------------------------------------------------------------------- figure 5


def plot_entropy(metrics, objectives: Sequence[str] = TRAINED_OBJECTIVES, fits=None):
    """Figure 5: entropy against step (mean over seeds, band: 95 % t CI of the mean); reward against entropy with
    the fitted law ``R = -a exp(H) + b`` per objective (points: every seed and step)."""
    from sspo_analysis.plotting import style

    fig, axes = new_figure(1, 2, 2.8)
    main = metrics[metrics.staleness == 0]
    n_seeds = main.groupby("objective").seed.nunique()
    fits = fit_entropy_reward(main, [o for o in objectives if o in set(main.objective)]) if fits is None else fits
    fits = fits.set_index("objective")
    for j, name in enumerate(objectives):
        g = main[main.objective == name]
        if g.empty:
            continue
        _band(axes[0, 0], g, "entropy", name, index=j)
        axes[0, 1].scatter(g.entropy, g.reward_mean, s=5, color=color(name), alpha=0.4, lw=0,
                           marker=style.marker(name))
        if name in fits.index and np.isfinite(fits.loc[name, "a"]):
            h = np.linspace(g.entropy.min(), g.entropy.max(), 50)
            f = fits.loc[name]
            axes[0, 1].plot(h, entropy_reward_law(h, f.a, f.b), lw=1.2, label=f"{name}: a = {f.a:.2g}, R² = {f.r2:.2f}",
                            **line_style(name))
    axes[0, 0].set(xlabel="RL step (rollout batches)", ylabel="policy entropy (nats / token)", title="entropy")
    note(axes[0, 0], _seeds_text(int(n_seeds.min()) if len(n_seeds) else 0))
    axes[0, 1].set(xlabel="policy entropy H (nats / token)", ylabel="reward (batch mean)",
                   title="reward against entropy; lines: fit R = -a exp(H) + b")
    axes[0, 1].legend(loc="best", fontsize=5.5, handlelength=1.2, borderaxespad=0.2)
    legend_below(fig, axes[0, 0])
    return fig


@figure(5, "entropy", "entropy curves on the tiny LLM", needs_training=True)
def figure_5(out_dir: Path, ctx: Context) -> list[Path]:
    from paper_figures.experiments import training_data

    metrics, _ = training_data(ctx)
    cols = ["objective", "seed", "staleness", "step", "entropy", "reward_mean"]
    fits = fit_entropy_reward(metrics, [o for o in TRAINED_OBJECTIVES if o in set(metrics.objective)])
    base = stem(out_dir, 5)
    ctx.advance(0, 1, "plotting")
    paths = save(plot_entropy(metrics, fits=fits), base, metrics[metrics.staleness == 0][cols])
    paths.append(write_frame(fits, base.with_name(base.name + "_fit.csv")))
    return paths


# --------------------------------------------------------------------------- figure 6


def plot_stability(metrics, summary, objectives: Sequence[str] = TRAINED_OBJECTIVES):
    """Figure 6: top, reward / weight variance / grad norm against step; bottom, against staleness k."""
    fig, axes = new_figure(2, 3, 4.6)
    main = metrics[metrics.staleness == 0]
    n_seeds = 0
    for j, name in enumerate(objectives):
        g = main[main.objective == name]
        if g.empty:
            continue
        n_seeds = _band(axes[0, 0], g, "reward_mean", name, index=j)
        _band(axes[0, 1], g, "seq_weight_var", name, log=True, index=j)
        _band(axes[0, 2], g, "grad_norm", name, log=True, index=j)
    axes[0, 0].set(xlabel="RL step", ylabel="reward (mean over batch)", title="reward")
    axes[0, 1].set(xlabel="RL step", ylabel="Var of sequence weight", yscale="log", title="importance-weight variance")
    axes[0, 2].set(xlabel="RL step", ylabel="grad norm (before clipping)", yscale="log", title="gradient norm")
    legend_below(fig, axes[0, 0])
    fig.suptitle(f"Top: {_seeds_text(n_seeds)} (log axes: geometric mean, CI of the log).\nBottom: {_STALE_TEXT}",
                 fontsize=7)
    ks = sorted(summary.staleness.unique())
    stale = [(name, g) for name, g in summary.groupby("objective", sort=False) if g.staleness.nunique() >= 2]
    for j, (name, g) in enumerate(stale):
        # The same seeds at every k, so that the points compare like with like.
        common = set.intersection(*(set(x.seed) for _, x in g.groupby("staleness")))
        g = g[g.seed.isin(common)]
        for ax, key in zip(axes[1], ("final_reward", "spikes", "weight_var")):
            _stale_points(ax, g, key, name, j, len(stale), log=key == "weight_var")
    for ax in axes[1]:
        ax.set_xticks(ks)
        ax.set_xlabel("staleness k (policy lag, updates)")
    axes[1, 0].set(ylabel="final reward", title="final reward vs staleness")
    axes[1, 1].set(ylabel=f"spikes (grad norm > {SPIKE_FACTOR:g}x median)", title="grad-norm spikes vs staleness")
    axes[1, 2].set(ylabel="mean Var of sequence weight", yscale="log", title="weight variance vs staleness")
    return fig


@figure(6, "stability", "reward, weight variance and grad norm; staleness study", needs_training=True)
def figure_6(out_dir: Path, ctx: Context) -> list[Path]:
    from paper_figures.experiments import training_data

    metrics, runs = training_data(ctx)
    summary = summarise_runs(metrics, runs)
    base = stem(out_dir, 6)
    cols = ["objective", "seed", "staleness", "step", "reward_mean", "seq_weight_var", "grad_norm"]
    ctx.advance(0, 1, "plotting")
    paths = save(plot_stability(metrics, summary), base, metrics[cols])
    paths.append(write_frame(summary, base.with_name(base.name + "_runs.csv")))
    return paths


_STALE_TEXT = ("mean over the seeds run at every k; bars: 95% t CI of the mean (no bar with one seed); "
               "points shifted sideways so that equal values stay visible")


def _stale_points(ax, g, key: str, name: str, j: int, n: int, log: bool = False) -> None:
    """One objective's seed mean (and CI) against staleness k, shifted sideways by its index ``j`` of ``n``."""
    from sspo_analysis.plotting.bands import mean_ci

    piv = g.pivot_table(index="staleness", columns="seed", values=key, aggfunc="mean")
    mean, lo, hi = mean_ci(piv.to_numpy(dtype=float), log=log)
    x = piv.index.to_numpy(dtype=float) + (j - (n - 1) / 2) * 0.15
    kw = line_style(name, marker=True)
    ax.plot(x, mean, lw=1.0, label=name, **kw)
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
        ax.scatter(g[pred] / scale, g.entropy_change_real, s=7, color=color(name), alpha=0.6, lw=0, label=name,
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
    has_taylor = llm is not None and "entropy_change_taylor" in llm and llm.entropy_change_taylor.notna().any()
    fig, axes = new_figure(1, 3 if has_taylor else 2, 3.1)
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
    paths = save(plot_entropy_mechanism(bandit, llm), base, data)
    paths.append(write_frame(agree, base.with_name(base.name + "_agreement.csv")))
    return paths


# --------------------------------------------------------------------------- figure 8


def plot_theory_vs_measured(df):
    """Figure 8: predicted against measured coefficient variance and dead fraction, per objective.

    Filled circles: theory on the logged sequences (``EmpiricalRatios``), which
    agree by construction (the same ratios the trainer used: a consistency check,
    not evidence, and said so on the figure); open triangles: the log-normal model
    with the same mean, std and length.
    """
    fig, axes = new_figure(1, 2, 3.0)
    for ax, (key, meas, label, log) in zip(axes[0], (
            ("var_coefficient", "coef_norm_var", "variance of normalised coefficient", True),
            ("dead_fraction", "dead_frac", "dead-gradient fraction", False))):
        cols = [f"empirical_{key}", f"lognormal_{key}", meas]
        vals = df[cols].to_numpy(dtype=float)
        for name, g in df.groupby("objective", sort=False):
            ax.scatter(g[f"empirical_{key}"], g[meas], s=10, color=color(name), label=name, alpha=0.8, lw=0)
            ax.scatter(g[f"lognormal_{key}"], g[meas], s=14, marker="^", facecolor="none",
                       edgecolor=color(name), lw=0.7, alpha=0.8)
        finite = vals[np.isfinite(vals)]
        if log:
            pos = finite[finite > 0]
            lo, hi = (pos.min() / 1.5, pos.max() * 1.5) if len(pos) else (1e-4, 1.0)
            ax.set(xscale="log", yscale="log")
        else:
            lo, hi = -0.002, max(float(finite.max()) * 1.1 if len(finite) else 0.0, 0.02)
        ax.plot([lo, hi], [lo, hi], color="#bbbbbb", lw=0.7, zorder=0)
        ax.set(xlim=(lo, hi), ylim=(lo, hi), xlabel=f"predicted {label}", ylabel=f"measured {label}",
               title=label)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    from matplotlib.lines import Line2D

    handles += [Line2D([], [], ls="", marker="o", color="#555555", ms=4),
                Line2D([], [], ls="", marker="^", mfc="none", color="#555555", ms=4)]
    labels += ["theory on logged sequences (agrees by construction)", "log-normal model (same mean, std, length)"]
    fig.legend(handles, labels, loc="outside lower center", ncols=4)
    fig.suptitle("Filled circles agree by construction: the prediction is computed from the same logged ratios the "
                 "trainer used,\nso their agreement checks the code, not the theory. The open triangles (two moments "
                 "only) are the test.", fontsize=7)
    return fig


@figure(8, "theory_vs_measured", "predicted against measured coefficient variance and dead fraction",
        needs_training=True)
def figure_8(out_dir: Path, ctx: Context) -> list[Path]:
    from paper_figures.experiments import theory_on_logged_ratios

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
    return save(plot_theory_vs_measured(df), base, df)


# --------------------------------------------------------------------------- results table


TABLE_COLUMNS = (("final_reward", "final reward"), ("end_entropy", "entropy at end (nats)"),
                 ("auc_reward", "reward AUC / step"), ("weight_var", "weight variance"), ("spikes", "grad spikes"))


def results_markdown(table, notes: dict | None = None, settings_line: str = "") -> str:
    """The results table as Markdown (mean ± std over seeds) with the figures' notes below it."""
    head = "| objective | runs | " + " | ".join(label for _, label in TABLE_COLUMNS) + " | diverged |"
    lines = ["# Results", "", settings_line, "", head, "|" + "---|" * (len(TABLE_COLUMNS) + 3)]
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
    md = results_markdown(table, ctx.cache.get("notes"), describe_settings(ctx))
    return [csv_path, write_text(Path(out_dir) / "results.md", md)]
