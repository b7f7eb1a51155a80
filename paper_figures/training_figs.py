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

from paper_figures import TRAINED_OBJECTIVES, Context, color, figure, legend_below, new_figure, save, stem, write_frame
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


def _band(ax, g, key: str, name: str, label: str | None = None, log: bool = False) -> None:
    """Mean over seeds against step (geometric mean on a log axis), with a band from the seeds' min to max."""
    piv = g.pivot_table(index="step", columns="seed", values=key, aggfunc="mean")
    x = piv.index.to_numpy()
    vals = piv.to_numpy(dtype=float)
    if log:
        vals = np.where(vals > 0, vals, np.nan)
    mean = np.exp(np.nanmean(np.log(vals), axis=1)) if log else np.nanmean(vals, axis=1)
    ax.plot(x, mean, color=color(name), label=label or name, lw=1.2)
    if vals.shape[1] > 1:
        ax.fill_between(x, np.nanmin(vals, axis=1), np.nanmax(vals, axis=1), color=color(name), alpha=0.18, lw=0)


# --------------------------------------------------------------------------- figure 5


def plot_entropy(metrics, objectives: Sequence[str] = TRAINED_OBJECTIVES, fits=None):
    """Figure 5: entropy against step (mean over seeds, band = seed range); reward against entropy with the
    fitted law ``R = -a exp(H) + b`` per objective (points: every seed and step)."""
    fig, axes = new_figure(1, 2, 2.8)
    main = metrics[metrics.staleness == 0]
    n_seeds = main.groupby("objective").seed.nunique()
    fits = fit_entropy_reward(main, [o for o in objectives if o in set(main.objective)]) if fits is None else fits
    fits = fits.set_index("objective")
    for name in objectives:
        g = main[main.objective == name]
        if g.empty:
            continue
        _band(axes[0, 0], g, "entropy", name)
        axes[0, 1].scatter(g.entropy, g.reward_mean, s=4, color=color(name), alpha=0.35, lw=0)
        if name in fits.index and np.isfinite(fits.loc[name, "a"]):
            h = np.linspace(g.entropy.min(), g.entropy.max(), 50)
            f = fits.loc[name]
            axes[0, 1].plot(h, entropy_reward_law(h, f.a, f.b), color=color(name), lw=1.2,
                            label=f"{name}: a = {f.a:.2g}, R² = {f.r2:.2f}")
    axes[0, 0].set(xlabel="RL step (rollout batches)", ylabel="policy entropy (nats / token)",
                   title=f"entropy: mean over {int(n_seeds.min()) if len(n_seeds) else 0} seeds, band = min to max")
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
    paths = save(plot_entropy(metrics, fits=fits), base, metrics[metrics.staleness == 0][cols])
    paths.append(write_frame(fits, base.with_name(base.name + "_fit.csv")))
    return paths


# --------------------------------------------------------------------------- figure 6


def plot_stability(metrics, summary, objectives: Sequence[str] = TRAINED_OBJECTIVES):
    """Figure 6: top, reward / weight variance / grad norm against step; bottom, against staleness k."""
    fig, axes = new_figure(2, 3, 4.6)
    main = metrics[metrics.staleness == 0]
    for name in objectives:
        g = main[main.objective == name]
        if g.empty:
            continue
        _band(axes[0, 0], g, "reward_mean", name)
        _band(axes[0, 1], g, "seq_weight_var", name, log=True)
        _band(axes[0, 2], g, "grad_norm", name, log=True)
    axes[0, 0].set(xlabel="RL step", ylabel="reward (mean over batch)", title="reward")
    axes[0, 1].set(xlabel="RL step", ylabel="Var of sequence weight", yscale="log", title="importance-weight variance")
    axes[0, 2].set(xlabel="RL step", ylabel="grad norm (before clipping)", yscale="log", title="gradient norm")
    legend_below(fig, axes[0, 0])
    ks = sorted(summary.staleness.unique())
    for name, g in summary.groupby("objective", sort=False):
        if g.staleness.nunique() < 2:
            continue
        # The same seeds at every k, so that the points compare like with like.
        common = set.intersection(*(set(x.seed) for _, x in g.groupby("staleness")))
        g = g[g.seed.isin(common)]
        agg = g.groupby("staleness")[["final_reward", "spikes", "weight_var"]].mean()
        for ax, key in zip(axes[1], ("final_reward", "spikes", "weight_var")):
            ax.plot(agg.index, agg[key], color=color(name), marker="o", ms=3, lw=1.0, label=name)
            ax.scatter(g.staleness, g[key], s=8, color=color(name), alpha=0.4, lw=0)  # the seeds
    for ax in axes[1]:
        ax.set_xticks(ks)
        ax.set_xlabel("staleness k (policy lag, updates)")
    axes[1, 0].set(ylabel="final reward", title="final reward vs staleness")
    axes[1, 1].set(ylabel=f"spikes (grad norm > {SPIKE_FACTOR:g}x median)", title="grad-norm spikes vs staleness")
    axes[1, 0].annotate("line: seed mean; dots: seeds", (0.02, 0.02), xycoords="axes fraction", fontsize=6,
                        color="#555555")
    axes[1, 2].set(ylabel="mean Var of sequence weight", yscale="log", title="weight variance vs staleness")
    return fig


@figure(6, "stability", "reward, weight variance and grad norm; staleness study", needs_training=True)
def figure_6(out_dir: Path, ctx: Context) -> list[Path]:
    from paper_figures.experiments import training_data

    metrics, runs = training_data(ctx)
    summary = summarise_runs(metrics, runs)
    base = stem(out_dir, 6)
    cols = ["objective", "seed", "staleness", "step", "reward_mean", "seq_weight_var", "grad_norm"]
    paths = save(plot_stability(metrics, summary), base, metrics[cols])
    paths.append(write_frame(summary, base.with_name(base.name + "_runs.csv")))
    return paths


# --------------------------------------------------------------------------- figure 7


def _scatter_pred_real(ax, df, pred: str, title: str, xlabel: str, diagonal: bool) -> None:
    agree = entropy_agreement(df, pred)
    scale = 1.0
    if not diagonal:  # arbitrary units: write the power of ten into the label, not beside the ticks
        top = float(np.nanmax(np.abs(df[pred].to_numpy(dtype=float)))) if len(df) else 0.0
        if top > 0 and np.isfinite(top):
            scale = 10.0 ** np.floor(np.log10(top))
            xlabel = f"{xlabel}, x {scale:.0e}"
    for name, g in df.groupby("objective", sort=False):
        ax.scatter(g[pred] / scale, g.entropy_change_real, s=6, color=color(name), alpha=0.65, lw=0, label=name)
    ax.axhline(0, color="#dddddd", lw=0.5, zorder=0)
    ax.axvline(0, color="#dddddd", lw=0.5, zorder=0)
    if diagonal:
        vals = df[[pred, "entropy_change_real"]].to_numpy(dtype=float)
        lim = float(np.nanmax(np.abs(vals))) * 1.05 if np.isfinite(vals).any() else 1.0
        ax.plot([-lim, lim], [-lim, lim], color="#bbbbbb", lw=0.7, zorder=0)
    r = agree.pearson_r.dropna()
    span = f"Pearson r {r.min():.2f} to {r.max():.2f}" if len(r) else "Pearson r n/a"
    ax.set(xlabel=xlabel, ylabel="measured entropy change (nats / token)", title=f"{title}\n{span}")


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
    _scatter_pred_real(axes[0, 0], bandit, "entropy_change_pred", "softmax bandit",
                       "predicted -Cov(log pi, dz) (nats)", diagonal=True)
    if llm is not None and len(llm):
        _scatter_pred_real(axes[0, 1], llm, "entropy_change_pred", "tiny LLM: covariance proxy",
                           "predicted -Cov(log pi, c)\n(SGD units", diagonal=False)
        axes[0, 1].set_xlabel(axes[0, 1].get_xlabel() + ")")
    if has_taylor:
        _scatter_pred_real(axes[0, 2], llm, "entropy_change_taylor", "tiny LLM: first order in theta",
                           "predicted grad H . d theta\n(nats / token)", diagonal=True)
    legend_below(fig, axes[0, 0], markerscale=2)
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
    ctx.advance(0, 1, "bandit simulator")
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
    paths = save(plot_entropy_mechanism(bandit, llm), base, data)
    paths.append(write_frame(agree, base.with_name(base.name + "_agreement.csv")))
    return paths


# --------------------------------------------------------------------------- figure 8


def plot_theory_vs_measured(df):
    """Figure 8: predicted against measured coefficient variance and dead fraction, per objective.

    Filled circles: theory on the logged sequences (``EmpiricalRatios``); open
    triangles: the log-normal model with the same mean, std and length.
    """
    fig, axes = new_figure(1, 2, 3.0)
    for ax, (key, meas, label, log) in zip(axes[0], (
            ("var_coefficient", "coef_norm_var", "variance of normalised coefficient", True),
            ("dead_fraction", "dead_frac", "dead-gradient fraction", False))):
        cols = [f"empirical_{key}", f"lognormal_{key}", meas]
        vals = df[cols].to_numpy(dtype=float)
        for name, g in df.groupby("objective", sort=False):
            ax.scatter(g[f"empirical_{key}"], g[meas], s=10, color=color(name), label=name, alpha=0.8, lw=0)
            ax.scatter(g[f"lognormal_{key}"], g[meas], s=12, marker="^", facecolor="none",
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
    labels += ["theory on logged sequences", "log-normal model (same mean, std, length)"]
    fig.legend(handles, labels, loc="outside lower center", ncols=4)
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
