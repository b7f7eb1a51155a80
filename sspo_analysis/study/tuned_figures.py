"""The tuned study's figures (PNG, PDF and the CSV of what each draws), one function per figure.

Small multiples, one panel per arm, with grpo drawn in grey in every other panel: nine
curves in one panel hide each other, and a shared reference keeps every panel comparable.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.ticker import NullFormatter

from sspo_analysis.plotting import style
from sspo_analysis.study.stats import mean_ci
from sspo_analysis.study.tuned_report import cumulative_kl_at, curve

BAND = "bands: 95% bootstrap CI of the mean over evaluation runs (warm starts x seeds)"
REFERENCE = "grpo"


def _grid(arms: Sequence[str], height_per_row: float = 1.7):
    cols = 3
    rows = -(-len(arms) // cols)
    fig, axes = style.subplots(rows, cols, height_per_row * rows + 0.6, sharex=True, sharey=True)
    for ax in axes.ravel()[len(arms):]:
        ax.set_visible(False)
    return fig, axes.ravel()


def _bottom_labels(axes, n: int, label: str) -> None:
    """``label`` under the lowest drawn panel of each column."""
    for i in range(n):
        if i + 3 >= n:
            axes[i].set_xlabel(label)
            axes[i].xaxis.set_tick_params(labelbottom=True)


def plot_ladders(sweep: Any, arms: Sequence[str], chosen: dict, task: str) -> tuple[Any, Any]:
    """Tuning: held-out AUC against the learning rate, per arm and update count; x: an unstable run, star: the
    chosen rate."""
    fig, axes = _grid(arms)
    tune = sweep[(sweep.role == "tune") & (sweep.task == task)]
    dash = {2: "-", 8: "--"}
    for ax, arm in zip(axes, arms):
        for updates, g in tune[tune.arm == arm].groupby("updates"):
            g = g.groupby("lr", as_index=False)[["heldout_auc", "unstable"]].mean()
            ax.plot(g.lr, g.heldout_auc, dash.get(updates, ":"), color=style.color(arm), marker="o", ms=3,
                    mfc="white", label=f"{updates} updates/batch")
            bad = g[g.unstable > 0]
            ax.plot(bad.lr, bad.heldout_auc, "x", color="black", ms=5)
            lr = chosen.get((task, int(updates), arm))
            if lr is not None:
                ax.plot([lr], g.loc[np.isclose(g.lr, lr), "heldout_auc"], "*", color=style.color(arm), ms=9)
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # the minor ticks' labels overlap
        ax.set_title(arm)
    axes[0].legend(loc="lower left", fontsize=6)
    _bottom_labels(axes, len(arms), "learning rate")
    fig.supylabel("held-out accuracy, mean over the run (tuning pair)")
    fig.suptitle(f"{task}: each objective's learning-rate ladder on the tuning pair (x: unstable run, "
                 "star: chosen rate)")
    cols = ["arm", "updates", "lr", "heldout_auc", "unstable"]
    return fig, tune[cols].sort_values(cols[:3])


def mean_curves(records: dict, picks: Sequence[tuple], key: str, grid: np.ndarray) -> np.ndarray:
    """``(3, len(grid))``: mean, CI low and CI high over the runs ``picks`` of ``key`` on ``grid`` steps (a stopped
    run keeps its last value)."""
    values = []
    for k in picks:
        s, v = curve(records[k], key)
        values.append(np.interp(grid, s, v, right=v[-1]) if len(s) else np.full(len(grid), np.nan))
    table = np.asarray(values, float)
    return np.array([mean_ci(table[:, j]) for j in range(len(grid))]).T


def plot_curves(records: dict, picks: dict[str, list[tuple]], arms: Sequence[str], key: str, ylabel: str,
                title: str, grid: np.ndarray) -> tuple[Any, Any]:
    """One panel per arm: ``key`` against the step at the arm's chosen rate, grpo in grey on the others."""
    import pandas as pd

    fig, axes = _grid(arms)
    curves = {arm: mean_curves(records, picks[arm], key, grid) for arm in arms if picks.get(arm)}
    for ax, arm in zip(axes, arms):
        if REFERENCE in curves and arm != REFERENCE:
            ax.plot(grid, curves[REFERENCE][0], color="0.6", lw=1, label=REFERENCE)
        if arm in curves:
            m, lo, hi = curves[arm]
            ax.plot(grid, m, color=style.color(arm), label=arm)
            ax.fill_between(grid, lo, hi, color=style.color(arm), alpha=0.2, lw=0)
        ax.set_title(arm)
        ax.legend(loc="best", fontsize=6)
    _bottom_labels(axes, len(arms), "RL step")
    fig.supylabel(ylabel)
    fig.suptitle(f"{title}\n{BAND}")
    data = pd.DataFrame([{"arm": arm, "step": s, "mean": c[0][i], "ci_low": c[1][i], "ci_high": c[2][i]}
                         for arm, c in curves.items() for i, s in enumerate(grid)])
    return fig, data


def plot_movement(records: dict, picks: dict[str, list[tuple]], arms: Sequence[str], budget: float,  # noqa: PLR0913
                  grid: np.ndarray, setting: str = "") -> tuple[Any, Any]:
    """Held-out accuracy against cumulative KL to the behaviour policy (mean over runs at each evaluation step),
    every arm in one panel on a log x axis; the dotted line is the common budget of the equal-movement table."""
    import pandas as pd

    fig, axes = style.subplots(1, 1, 3.2, width=5.0)
    ax = axes[0, 0]
    rows = []
    for i, arm in enumerate(arms):
        if not picks.get(arm):
            continue
        kl = np.mean([cumulative_kl_at(records[k], grid) for k in picks[arm]], axis=0)
        acc = mean_curves(records, picks[arm], "sampled", grid)[0]
        ax.plot(np.maximum(kl, 1e-4), acc, **style.line_kw(arm, every=3, index=i), label=arm)
        rows += [{"arm": arm, "step": s, "cum_kl": k, "heldout": a} for s, k, a in zip(grid, kl, acc)]
    if np.isfinite(budget):
        ax.axvline(budget, color="0.5", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("cumulative KL to the behaviour policy (nats, sum over steps; step 0 drawn at 1e-4)")
    ax.set_ylabel("held-out accuracy (sampled)")
    ax.set_title(f"{setting + ': ' if setting else ''}accuracy against movement, each objective at its chosen "
                 "rate\n(mean over evaluation runs at each evaluation step; dotted: the common KL budget)")
    ax.legend(fontsize=6, ncol=2)
    return fig, pd.DataFrame(rows)


def plot_evaluation(best: Any, arms: Sequence[str], task: str, updates: int) -> tuple[Any, Any]:
    """Per arm: held-out gain, final accuracy at its chosen rate and at twice it, and the fraction unstable at
    both, with intervals."""
    fig, axes = style.subplots(1, 3, 0.28 * len(arms) + 1.2)
    b = best[(best.task == task) & (best.updates == updates)].set_index("arm").reindex(arms)
    y = np.arange(len(arms))[::-1]
    panels = (("heldout_gain", None, "held-out gain over the warm start\n(chosen rate)"),
              ("heldout_final", "heldout_final_2x", "held-out accuracy at the end\n(o: chosen rate, s: twice it)"),
              ("unstable", "unstable_2x", "fraction of runs unstable\n(o: chosen rate, s: twice it)"))
    for ax, (key, key2, title) in zip(axes[0], panels):
        for yi, arm in zip(y, arms):
            for k, mk, dy in ((key, "o", 0.12), (key2, "s", -0.12)):
                if k is None or not np.isfinite(b.loc[arm, k]):
                    continue
                m, lo, hi = b.loc[arm, [k, f"{k}_ci_low", f"{k}_ci_high"]].to_numpy(dtype=float)
                err = [[max(m - lo, 0)], [max(hi - m, 0)]] if np.isfinite(lo) else None
                ax.errorbar(m, yi + (dy if key2 else 0), xerr=err, fmt=mk, color=style.color(arm), ms=4, capsize=2,
                            mfc="white" if mk == "s" else style.color(arm))
        ax.set_title(title)
        ax.set_yticks(y, arms)
    axes[0, 0].axvline(0, color="0.5", lw=0.8)
    fig.suptitle(f"{task}, {updates} updates per batch: evaluation runs (3 warm starts x 3 seeds), "
                 "bars: 95% CI (bootstrap of the mean; fractions: Clopper-Pearson)")
    return fig, b.reset_index()


def save_all(out: Path, figures: dict[str, tuple[Any, Any]]) -> list[Path]:
    paths: list[Path] = []
    for stem, (fig, data) in figures.items():
        paths += style.save_figure(fig, out / stem, data)
    return paths
