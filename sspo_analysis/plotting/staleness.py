"""The exact-gradient staleness figure: each objective's gradient error as the policy lag grows.

The numbers are :func:`sspo_analysis.simulation.staleness_data`'s (one
:func:`~sspo_analysis.simulation.staleness_study` per objective: a tabular sequence
policy whose sequences can be enumerated, so the target gradient is exact); this
module only draws them (:func:`plot_staleness`). Paper figure 9 and the stability
study both call it.
"""

from __future__ import annotations

import numpy as np

PANELS = (
    ("bias", "relative bias\n|E ĝ − g*| / |g*|", "linear"),
    ("variance", "relative variance\nE|ĝ − E ĝ|² / |g*|²", "log"),
    ("mse", "relative MSE\n(bias² + variance)", "log"),
    ("cosine", "cosine(E ĝ, g*)", "linear"),
    ("target_norm2", "|g*|² (exact, same for all;\nthe divisor of the relative panels)", "log"),
    ("variance_abs", "variance, not divided\nE|ĝ − E ĝ|²", "log"),
)
"""The panels: column of the study (``variance_abs`` = ``variance`` x ``target_norm2``), y label, y scale."""


def _draw(ax, df, key: str, lags: list[int], names: list[str]) -> None:
    """One panel: each objective's values at the lags, dodged sideways so that equal values stay visible."""
    from sspo_analysis.plotting import style

    for j, name in enumerate(names):
        g = df[df.objective == name].set_index("staleness").reindex(lags)
        x = np.arange(len(lags)) + (j - (len(names) - 1) / 2) * 0.07
        kw = style.line_kw(name)
        ax.plot(x, g[key], label=name, lw=1.0, **kw)
        if key == "bias":  # the Monte Carlo error of the mean: 2 standard errors
            ax.errorbar(x, g[key], yerr=2 * g.mean_stderr, fmt="none", ecolor=kw["color"], lw=0.7, capsize=0)


def _notes(df, names: list[str]) -> str:
    """The figure's footnote: what is exact, what is estimated, what coincides by construction."""
    s = df.iloc[0]
    text = (f"Exact (enumeration of all {int(s.vocab)}^{int(s.length)} sequences): the target g* = (1 − 1/G)/L ∇J "
            "at the current policy, and the KL. Estimated: E ĝ and Var ĝ from "
            f"{int(s.n_batches)} sampled batches (groups of G = {int(s.group_size)})\ndrawn from the policy k exact "
            "gradient steps old (ĝ = −∇ loss, autograd). Bias: sampling noise of the mean removed; bars: ± 2 "
            "standard errors of the mean.\nk = 0: all ratios are 1, so every objective gives the same estimate "
            "(coinciding points are shifted sideways to show them)")
    if "target_norm2" in df:
        norm = df.groupby("staleness").target_norm2.first().sort_index()
        text = ("Relative variance and MSE are divided by the same lag's |g*|² (bottom middle; the bias by |g*|), "
                f"which changes {norm.iloc[-1] / norm.iloc[0]:.3g}x from k = {norm.index[0]} to k = {norm.index[-1]}:"
                "\na relative error falls with k wherever |g*|² grows faster than the error itself. "
                "Bottom right: the variance not divided.\n") + text
    if "sspo-sigmoid" in names:
        text += ",\nexcept sspo-sigmoid, whose on-policy scale is tau/2 (bias 1 − tau/2 by construction)"
    return text + "."


def plot_staleness(df):
    """Bias, variance, MSE and direction of each objective's gradient estimate against the policy lag k.

    ``df`` is :func:`sspo_analysis.simulation.staleness_data`'s table (several objectives, one row per
    objective and lag). Returns the matplotlib figure (not saved).
    """
    import matplotlib.pyplot as plt

    from sspo_analysis.plotting import style

    style.apply()
    lags = sorted(int(k) for k in df.staleness.unique())
    names = list(dict.fromkeys(df.objective))
    panels = PANELS if "target_norm2" in df else PANELS[:4]  # a table from before the column existed
    if "target_norm2" in df:
        df = df.assign(variance_abs=df.variance * df.target_norm2)
    fig, axes = plt.subplots(2, len(panels) // 2, figsize=(style.FULL_WIDTH, 5.4), layout="constrained",
                             sharex=True)
    kl = df.groupby("staleness").kl.first().reindex(lags)
    for ax, (key, ylabel, scale) in zip(axes.flat, panels):
        if key == "target_norm2":  # exact, one value per lag: one line
            g = df.groupby("staleness").target_norm2.first().reindex(lags)
            ax.plot(range(len(lags)), g, color="black", lw=1.0, marker="o", ms=3)
        else:
            _draw(ax, df, key, lags, names)
        ax.set(ylabel=ylabel, yscale=scale, xticks=range(len(lags)), xticklabels=[str(k) for k in lags])
    for ax in axes[0]:
        top = ax.secondary_xaxis("top")
        top.set_xticks(range(len(lags)), [f"{v:.2g}" for v in kl])
        top.tick_params(labelsize=5.5, labelrotation=30)
        top.set_xlabel("exact KL(π_old ‖ π), nats", fontsize=6)
    axes.flat[0].axhline(0, color="#bbbbbb", lw=0.6, zorder=0)
    axes.flat[3].axhline(1, color="#bbbbbb", lw=0.6, zorder=0)
    for ax in axes[1]:
        ax.set_xlabel("policy lag k (exact ascent steps,\nbehaviour to current policy)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    # The notes ride as the legend's title, so that the layout keeps them clear of the panels and the entries.
    leg = fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 9), fontsize=6.5,
                     title=_notes(df, names), title_fontsize=6)
    leg.get_title().set_color("#444444")
    fig.suptitle("Exact-gradient staleness: the error of each objective's gradient estimate as the policy lag grows")
    return fig
