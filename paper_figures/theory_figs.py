"""Figures 2-4 and the bandit half of figure 7: what each objective does to the gradient.

All numbers come from :mod:`sspo_analysis.theory` (closed form, quadrature and
Monte Carlo on log-normal token ratios) and :mod:`sspo_analysis.simulation`
(the softmax bandit); nothing here re-derives a formula. Each figure has a
``data_*`` function (a tidy DataFrame, also written as the figure's CSV) and a
``plot_*`` function (a matplotlib figure), which the notebooks call with their
own knobs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from paper_figures import Context, figure, legend_below, note, stem
from sspo_analysis.analysis import frontier_summary, lowest_mse
from sspo_analysis.io import write_frame

TOKEN_OBJECTIVES: tuple[str, ...] = ("is-token", "grpo", "dapo", "cispo", "sapo")
"""Token-level objectives of figure 2 (``pg`` is 1 at every std and is drawn as the reference line)."""
SEQUENCE_OBJECTIVES: tuple[str, ...] = ("is-seq", "gspo", "gmpo", "sspo", "sspo-sigmoid", "vespo")
"""Sequence-level weights of figure 3."""

FRONTIER_GRIDS: dict[str, tuple[str, np.ndarray]] = {
    # objective -> (swept parameter, values); the default of each objective lies inside its grid.
    "grpo": ("eps", np.geomspace(0.05, 1.6, 17)),
    "cispo": ("eps_max", np.geomspace(1.05, 16.0, 17)),
    "sapo": ("tau", np.geomspace(0.125, 16.0, 17)),
    "gspo": ("eps", np.geomspace(1e-4, 0.8, 17)),
    "gmpo": ("eps", np.geomspace(0.05, 1.6, 17)),
    "sspo": ("tau", np.geomspace(0.125, 16.0, 17)),
    "sspo-sigmoid": ("tau", np.geomspace(0.125, 16.0, 17)),
}
"""Figure 4: the parameter swept per objective (eps for hard clips, tau for soft gates)."""

SIGN_STYLE = {1: ("A > 0", "-"), -1: ("A < 0", "--")}


# --------------------------------------------------------------------------- figure 2


def data_token_bias(
    stds: Sequence[float] | None = None,
    mc_stds: Sequence[float] | None = None,
    mc_samples: int = 20_000,
    objectives: Sequence[str] = TOKEN_OBJECTIVES,
    seed: int = 0,
) -> tuple[object, object]:
    """Mean coefficient ``E[c / A]`` of the token objectives against log-ratio std.

    Returns ``(curves, mc)``: the analytic sweep (closed form or quadrature) and
    Monte Carlo points at ``mc_stds`` with their standard errors, both tidy
    DataFrames with columns ``objective, advantage_sign, log_ratio_std,
    mean_coefficient, var_coefficient, dead_fraction, method`` (``mc`` adds
    ``mean_coefficient_se``).
    """
    import pandas as pd

    from sspo_analysis.theory import LogNormalRatios, analyse, sweep

    stds = np.geomspace(0.02, 2.0, 40) if stds is None else np.asarray(stds, float)
    mc_stds = np.geomspace(0.03, 1.5, 6) if mc_stds is None else np.asarray(mc_stds, float)
    curves = sweep(list(objectives), stds=list(stds), lengths=[1], signs=(1, -1))
    rows = []
    for name in objectives:
        for sign in (1, -1):
            for s in mc_stds:
                res = analyse(name, LogNormalRatios(float(s)), advantage_sign=sign, method="monte-carlo",
                              n_samples=mc_samples, seed=seed).to_dict()
                se = (res.get("mc_stderr") or {}).get("mean_coefficient", float("nan"))
                rows.append({**{k: res[k] for k in ("objective", "advantage_sign", "log_ratio_std",
                                                     "mean_coefficient", "var_coefficient", "dead_fraction",
                                                     "method")},
                             "mean_coefficient_se": se})
    return curves, pd.DataFrame(rows)


COINCIDE_NOTES = {
    "token": {-1: "dapo = grpo for A < 0 by construction:\nthey differ only in the upper clip (eps_high),\n"
                  "which A < 0 never reaches",
              1: "is-token = pg = 1 by construction (E[r] = 1)"},
}
"""Figure 2: where two curves coincide by construction, said on the panel."""


def _dodge(x, j: int, n: int, step: float = 0.035):
    """``x`` times the ``j``-th of ``n`` small factors (a log axis): equal points drawn side by side."""
    return np.asarray(x, float) * np.exp((j - (n - 1) / 2) * step)


def plot_token_bias(curves, mc):
    """Figure 2: one panel per advantage sign; curves analytic, points Monte Carlo (error bars: 2 s.e.).

    Coinciding curves are dashed apart and the Monte Carlo points shifted sideways a
    little (each objective its own marker), so every objective stays visible.
    """
    from matplotlib.lines import Line2D

    from sspo_analysis.plotting import style

    fig, axes = style.subplots(1, 2, 3.0, sharey=True)
    names = list(dict.fromkeys(curves.objective))
    for ax, sign in zip(axes[0], (1, -1)):
        ax.axhline(1.0, color=style.color("pg"), lw=0.8, ls=":", zorder=0)
        for j, name in enumerate(names):
            g = curves[(curves.advantage_sign == sign) & (curves.objective == name)].sort_values("log_ratio_std")
            ax.plot(g.log_ratio_std, g.mean_coefficient, lw=1.2, **style.line_kw(name, markers=False))
            m = mc[(mc.objective == name) & (mc.advantage_sign == sign)]
            kw = style.line_kw(name)
            ax.errorbar(_dodge(m.log_ratio_std, j, len(names)), m.mean_coefficient, yerr=2 * m.mean_coefficient_se,
                        fmt=kw["marker"], ms=3.5, color=kw["color"], mfc="white", mew=0.9, lw=0.8, capsize=0)
        ax.set(xscale="log", xlabel="token log-ratio std s (nats)", title=f"advantage {SIGN_STYLE[sign][0]}")
        note(ax, COINCIDE_NOTES["token"][sign])
    axes[0, 0].set_ylabel("mean coefficient E[c / A]  (1 = unbiased)")
    handles = [Line2D([], [], color=style.color("pg"), lw=0.8, ls=":")] + [Line2D([], [], **style.line_kw(n))
                                                                     for n in names]
    fig.legend(handles, ["pg (on-policy) = 1"] + names, loc="outside lower center", ncols=len(names) + 1)
    fig.suptitle("Token-level gating bias. Lines: closed form / quadrature; markers: Monte Carlo ± 2 s.e.\n"
                 "(shifted sideways a little so that equal points stay visible)")
    return fig


@figure(2, "token_bias", "token-level gating bias against log-ratio std")
def figure_2(out_dir: Path, ctx: Context) -> list[Path]:
    from sspo_analysis.plotting import style

    st = ctx.settings
    ctx.advance(0, 1, "theory: closed form, quadrature and Monte Carlo")
    curves, mc = ctx.cached("fig2", lambda: data_token_bias(
        stds=np.geomspace(0.02, 2.0, st.n_stds), mc_stds=np.geomspace(0.03, 1.5, st.mc_points),
        mc_samples=st.mc_samples))
    import pandas as pd

    data = pd.concat([curves.assign(kind="analytic"), mc.assign(kind="monte-carlo")], ignore_index=True)
    return style.save_figure(plot_token_bias(curves, mc), stem(out_dir, 2), data)


# --------------------------------------------------------------------------- figure 3


def data_sequence_weights(
    stds: Sequence[float] = (0.1, 0.3),
    lengths: Sequence[int] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    objectives: Sequence[str] = SEQUENCE_OBJECTIVES,
):
    """``mean_weight`` and ``var_weight`` of the sequence weights against length, both advantage signs."""
    from sspo_analysis.theory import sweep

    return sweep(list(objectives), stds=list(stds), lengths=[int(x) for x in lengths], signs=(1, -1))


def coinciding(df, keys: Sequence[str], rtol: float = 0.01, by: str = "length") -> list[list[str]]:
    """Groups of objectives whose curves (columns ``keys`` against ``by``) agree within ``rtol`` everywhere.

    Two objectives agree when ``|a - b| <= rtol * max(|a|, |b|)`` at every point of
    every key; groups are the connected sets of agreeing pairs, in first-seen order.
    """
    names = list(dict.fromkeys(df.objective))
    table = {n: df[df.objective == n].set_index(by).sort_index()[list(keys)].to_numpy(float) for n in names}
    group = {n: n for n in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            x, y = table[a], table[b]
            if x.shape == y.shape and np.all(np.abs(x - y) <= rtol * np.maximum(np.abs(x), np.abs(y)) + 1e-15):
                root = group[a]
                group.update({n: root for n in names if group[n] == group[b]})
    groups = [[n for n in names if group[n] == root] for root in dict.fromkeys(group.values())]
    return [g for g in groups if len(g) > 1]


SEQUENCE_ROWS = (
    ("mean_coefficient", "mean coefficient E[c L / A]\n(1 = unbiased)", "linear"),
    ("var_coefficient", "coefficient variance\nVar[c L / A]", "log"),
    ("dead_fraction", "dead fraction P(c = 0)\n(linear below 1e-4)", "symlog"),
)
"""Figure 3's rows: column of :func:`data_sequence_weights`, y label, y scale."""


def exactly_zero(df, key: str) -> list[str]:
    """The objectives whose ``key`` is exactly 0 at every point of ``df`` (a soft gate's dead fraction)."""
    return [n for n, g in df.groupby("objective", sort=False) if (g[key] == 0).all()]


def _sequence_panel(ax, ds, key: str, scale: str, names: list[str], rtol: float) -> None:
    """One panel of figure 3: ``key`` against length for every objective, with what coincides named on it."""
    from sspo_analysis.plotting import style

    every = len(names)  # each curve its own marker positions: no marker hides another
    values = ds[ds.objective != "is-seq"][key] if scale == "log" else ds[key]
    top = 10 ** np.ceil(np.log10(max(float(values.max()), 1e-12)) + 3) if scale == "log" else None
    for i, name in enumerate(names):
        g = ds[ds.objective == name].sort_values("length")
        y = g[key].clip(lower=1e-12) if scale == "log" else g[key]
        ax.plot(g.length, y, label=name, lw=1.1, **style.line_kw(name, every=every, index=i))
        if top is not None and g[key].iloc[-1] > top:
            ax.annotate(f"{name}: {g[key].iloc[-1]:.1e}\nat L = {int(g.length.iloc[-1])} (off the panel)",
                        xy=(0.02, 0.97), xycoords="axes fraction", ha="left", va="top", fontsize=6,
                        color=style.color(name))
    text = []
    if key == "dead_fraction":
        zero = exactly_zero(ds, key)
        if zero:
            text.append(f"exactly 0 at every L (no clip): {', '.join(zero)}")
        ds = ds[~ds.objective.isin(zero)]
    same = coinciding(ds[ds.objective != "is-seq"] if scale == "log" else ds, [key], rtol)
    if same:
        text.append(f"within {rtol:.0%} of each other: " + "; ".join(" ≈ ".join(g) for g in same))
    if text:
        note(ax, "\n".join(text), loc="upper left" if key == "dead_fraction" else "lower left")
    if scale == "symlog":
        ax.set_yscale("symlog", linthresh=1e-4, linscale=0.5)
        ax.set_ylim(-2e-5, 1.5)
    elif scale == "log":
        ax.set(yscale="log", ylim=(float(values.clip(lower=1e-12).min()) / 3, top))


def plot_sequence_weights(df, sign: int = 1, rtol: float = 0.01):
    """Figure 3: what each sequence objective applies to a sequence's gradient, against its length.

    Rows: the mean and variance of the normalised coefficient ``c L / A`` (the
    importance weight after the objective's own clip or gate, at its default
    parameters) and the dead fraction ``P(c = 0)``; columns: the log-ratio stds.
    Curves that agree within ``rtol`` are named on the panel, and their markers
    staggered so that each stays visible; ``is-seq``'s variance ``exp(L s^2) - 1``
    leaves the panel at large ``L`` and its last value is written beside the cut.
    """
    from sspo_analysis.plotting import style

    stds = sorted(df.log_ratio_std.unique())
    fig, axes = style.subplots(len(SEQUENCE_ROWS), len(stds), 6.2, sharex=True)
    d = df[df.advantage_sign == sign]
    names = list(dict.fromkeys(d.objective))
    for j, s in enumerate(stds):
        ds = d[np.isclose(d.log_ratio_std, s)]
        for row, (key, ylabel, scale) in enumerate(SEQUENCE_ROWS):
            _sequence_panel(axes[row, j], ds, key, scale, names, rtol)
            axes[row, j].set(xscale="log", ylabel=ylabel)
        axes[0, j].set_title(f"log-ratio std s = {s:g} nats, {SIGN_STYLE[sign][0]}")
        axes[-1, j].set_xlabel("sequence length L (tokens)")
    legend_below(fig, axes[0, 0])
    dead = d.groupby("objective", sort=False).dead_fraction.max()
    clipping = [f"{n} (up to {dead[n]:.0%})" for n in names if dead[n] >= 0.01]
    fig.suptitle("Sequence-level objectives at their default parameters: the coefficient each applies to a "
                 "sequence's gradient\n(its importance weight after its own clip or gate), against length. "
                 + (f"Dead fraction 1% or more: {', '.join(clipping)}" if clipping else ""), fontsize=7.5)
    return fig


@figure(3, "sequence_weights", "sequence objectives: coefficient mean, variance and dead fraction "
        "against length")
def figure_3(out_dir: Path, ctx: Context) -> list[Path]:
    from sspo_analysis.plotting import style

    ctx.advance(0, 1, "theory: sequence weights")
    df = ctx.cached("fig3", lambda: data_sequence_weights(lengths=ctx.settings.lengths))
    return style.save_figure(plot_sequence_weights(df), stem(out_dir, 3), df)


# --------------------------------------------------------------------------- figure 4


def data_frontier(
    std: float = 0.3,
    length: int = 16,
    grids: dict[str, tuple[str, np.ndarray]] | None = None,
    points: int | None = None,
):
    """Bias-variance frontier of the coefficient as each objective's eps or tau sweeps.

    For every objective and setting, the coefficient's bias ``E[c/A] - 1``,
    variance and ``MSE = bias^2 + variance`` at log-ratio std ``std`` and
    length ``length`` (sequence objectives), averaged over the two advantage
    signs (group-normalised advantages are positive and negative equally
    often). Columns: ``objective, param, value, bias_pos, bias_neg,
    var_coefficient, mse, is_default``.
    """
    import pandas as pd

    from sspo_analysis.analysis import frontier_errors
    from sspo_analysis.objectives import get_spec
    from sspo_analysis.theory import LogNormalRatios, analyse

    grids = dict(FRONTIER_GRIDS if grids is None else grids)
    rows = []
    for name, (param, values) in grids.items():
        if points is not None:
            values = np.geomspace(values[0], values[-1], points)
        level = get_spec(name).level
        model = LogNormalRatios(std, length=length if level == "sequence" else 1)
        settings = [({param: float(v)}, False) for v in values] + [({}, True)]  # the last: the paper's defaults
        for params, is_default in settings:
            res = {sign: analyse(name, model, advantage_sign=sign, **params) for sign in (1, -1)}
            rows.append({"objective": name, "level": level, "param": param,
                         "value": params.get(param, float("nan")), "log_ratio_std": std, "length": model.length,
                         **frontier_errors(res),
                         "is_default": is_default, "params": json.dumps(res[1].params, sort_keys=True),
                         "method": res[1].method})
    return pd.DataFrame(rows)


def _sweep_arrow(ax, x, y, col: str) -> None:
    """An arrowhead on a frontier curve, midway, pointing the way its parameter grows."""
    i = max(0, len(x) // 2 - 1)
    if len(x) > 1:
        ax.annotate("", xy=(x[i + 1], y[i + 1]), xytext=(x[i], y[i]),
                    arrowprops={"arrowstyle": "-|>", "color": col, "lw": 0.9, "mutation_scale": 9})


def winner_text(best: dict) -> str:
    """The lowest-MSE setting of a frontier, ties named as ties (``lowest_mse``'s ``"overall"`` row)."""
    tied = best.get("tied", [best["objective"]])
    if len(tied) > 1:
        return (f"lowest MSE {best['mse']:.3g}: {' = '.join(tied)} (tie: within {best['rtol']:.0%})")
    return f"lowest MSE {best['mse']:.3g}: {best['objective']} {best['param']} = {best['value']:.3g}"


def star_groups(best: dict, decades: float = 0.05) -> list[list[str]]:
    """The objectives whose lowest-MSE stars would sit on one point: within ``decades`` on both log axes.

    ``best`` is :func:`~sspo_analysis.analysis.lowest_mse`'s dict; groups are connected sets, in its order.
    """
    names = [n for n in best if n != "overall"]
    pos = {n: np.log10([max(best[n]["var_coefficient"], 1e-8), best[n]["mse"]]) for n in names}
    group = {n: n for n in names}
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if np.all(np.abs(pos[a] - pos[b]) <= decades):
                root = group[a]
                group.update({n: root for n in names if group[n] == group[b]})
    return [[n for n in names if group[n] == root] for root in dict.fromkeys(group.values())]


STAR_SHIFT = 0.3
"""Figure 4: stars on one point are drawn this far apart (natural log of the x factor), around the point."""


def _stars(ax, best: dict) -> None:
    """Each objective's lowest-MSE star (hollow at the edge of its swept range); stars on one point drawn side by
    side around it (a black dot marks the point) and named there, ties as ties."""
    from sspo_analysis.plotting import style

    tied = best["overall"]["tied"]
    for group in star_groups(best):
        b0 = best[group[0]]
        x0, y0 = max(b0["var_coefficient"], 1e-8), b0["mse"]
        for j, name in enumerate(group):
            b = best[name]
            x = max(b["var_coefficient"], 1e-8) * np.exp((j - (len(group) - 1) / 2) * STAR_SHIFT)
            edge = ({"mfc": "white", "mec": style.color(name), "mew": 1.0} if b["at_edge"]
                    else {"mec": "black", "mew": 0.4})
            ax.plot(x, b["mse"], "*", color=style.color(name), ms=9, zorder=3, **edge)
        if len(group) > 1:
            ax.plot(x0, y0, "o", color="black", ms=1.8, zorder=4)
            ties = [n for n in group if n in tied] if len(tied) > 1 else []
            rest = [f"{n} (MSE {best[n]['mse'] / best['overall']['mse'] - 1:+.1%})" for n in group if n not in ties]
            label = ", ".join(([" = ".join(ties) + " (tie)"] if ties else []) + rest)
            ax.annotate(label, (x0 * np.exp(len(group) / 2 * STAR_SHIFT), y0), xytext=(3, -1),
                        textcoords="offset points", fontsize=5.5, va="top", ha="left")


def edge_text(best: dict) -> str:
    """Which of the overall winners sit at the edge of their swept range (the optimum may lie beyond it)."""
    edge = [n for n in best["overall"].get("tied", [best["overall"]["objective"]]) if best[n]["at_edge"]]
    return f"at the edge of its swept range: {', '.join(edge)}" if edge else "inside the swept ranges"


def plot_frontier(dfs: dict[float, object], mse_cap: float = 3.0):
    """Figure 4: MSE against variance per objective (one panel per std); stars mark each lowest-MSE setting.

    The vertical distance above the diagonal is the squared bias. MSE above
    ``mse_cap`` is cut off (``sspo-sigmoid`` at large tau, whose on-policy scale is
    tau/2). Arrows point the way each swept parameter grows (its range is in the
    legend); a hollow star is a lowest MSE at the end of the swept range; stars on
    one point are drawn side by side and named; objectives tied at the lowest MSE
    are named as a tie.
    """
    from matplotlib.lines import Line2D

    from sspo_analysis.plotting import style

    fig, axes = style.subplots(1, len(dfs), 3.6)
    for ax, (std, df) in zip(axes[0], dfs.items()):
        shown = df[df.mse <= mse_cap]
        lo = max(shown.var_coefficient.min(), 1e-8) / 2
        hi = min(df.mse.max(), mse_cap) * 2
        ax.plot([lo, hi], [lo, hi], color="#bbbbbb", lw=0.7, zorder=0, label="MSE = variance (no bias)")
        best = lowest_mse(df)
        for j, (name, g) in enumerate(df.groupby("objective", sort=False)):
            d = g[g.is_default]
            g = g[~g.is_default].sort_values("value")
            x, y = g.var_coefficient.clip(lower=1e-8).to_numpy(), g.mse.to_numpy()
            ax.plot(x, y, lw=1.0, label=f"{name}: {g.param.iloc[0]} {g.value.min():.3g} → {g.value.max():.3g}",
                    **style.line_kw(name, every=4, index=j))
            _sweep_arrow(ax, x, y, style.color(name))
            ax.plot(d.var_coefficient.clip(lower=1e-8), d.mse, "s", color=style.color(name), ms=5, mfc="none", mew=1.0)
        _stars(ax, best)
        ax.set(xscale="log", yscale="log", ylim=(max(shown.mse.min() / 2, 1e-8), hi),
               xlim=(lo, shown.var_coefficient.max() * 2), xlabel="coefficient variance Var[c/A]",
               ylabel="MSE of c/A  (bias² + variance)",
               title=f"s = {std:g} nats, L = {int(df.length.max())}\n{winner_text(best['overall'])}\n{edge_text(best)}")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    keys = [(Line2D([], [], ls="", marker="*", color="#777777", mec="black", mew=0.4, ms=8),
             "lowest MSE of an objective, inside its swept range"),
            (Line2D([], [], ls="", marker="*", color="#777777", mfc="white", mew=1.0, ms=8),
             "lowest MSE at the end of its swept range (may lie beyond)"),
            (Line2D([], [], ls="", marker="s", color="#777777", mfc="none", ms=5), "default parameters")]
    fig.legend(handles + [k[0] for k in keys], labels + [k[1] for k in keys], loc="outside lower center", ncols=3)
    fig.suptitle("Bias-variance frontier as eps or tau sweeps (A > 0 and A < 0 averaged). Arrows: the way the "
                 "parameter grows (range in the legend).\nStars on one point are drawn side by side around it (black "
                 "dot) and named; MSEs within 1 % of each other count as a tie", fontsize=7.5)
    return fig


@figure(4, "frontier", "bias-variance frontier of the gradient coefficient")
def figure_4(out_dir: Path, ctx: Context) -> list[Path]:
    import pandas as pd

    from sspo_analysis.plotting import style

    stds = (0.1, 0.3)
    ctx.advance(0, 1, "theory: frontier sweeps")
    dfs = ctx.cached("fig4", lambda: {s: data_frontier(std=s, points=ctx.settings.frontier_points) for s in stds})
    data = pd.concat(dfs.values(), ignore_index=True)
    summary = pd.concat([frontier_summary(df) for df in dfs.values()], ignore_index=True)
    notes = []
    for s, g in summary.groupby("log_ratio_std", sort=False):
        winners = g[g.overall_best]
        b, length = winners.iloc[0], g.length.max()
        d = g.sort_values("default_mse").iloc[0]
        at_edge = [t.objective for t in winners.itertuples() if t.best_at_grid_edge]
        parts = [f"a tie: MSEs within {b.tie_rtol:.0%}"] if len(winners) > 1 else []
        if at_edge:
            parts.append(f"at the edge of the swept range: {', '.join(at_edge)}, so the optimum may lie beyond")
        who = " = ".join(f"{t.objective} ({t.param} = {t.best_value:.3g})" for t in winners.itertuples())
        tie = f" ({'; '.join(parts)})" if parts else ""
        notes.append(f"- Figure 4 (s = {s:g}, L = {int(length)}): the lowest-MSE setting is {who}{tie}: "
                     f"MSE {b.best_mse:.3g} (variance {b.best_var:.3g}). "
                     f"At default parameters the lowest MSE is {d.objective}'s, {d.default_mse:.3g}.")
    ctx.cache.setdefault("notes", {})[4] = notes
    base = stem(out_dir, 4)
    paths = style.save_figure(plot_frontier(dfs), base, data)
    paths.append(write_frame(summary, base.with_name(base.name + "_best.csv")))
    return paths


# --------------------------------------------------------------------------- figure 7, bandit half


def data_bandit(objectives: Sequence[str], steps: int = 200, seeds: Sequence[int] = (0,), **kwargs):
    """Per-step bandit records (entropy, reward, predicted and realised entropy change) per objective and seed."""
    import pandas as pd

    from sspo_analysis.simulation import run_bandit

    frames = []
    for name in objectives:
        for seed in seeds:
            frames.append(run_bandit(name, steps=steps, seed=seed, **kwargs).assign(objective=name, seed=seed))
    return pd.concat(frames, ignore_index=True)


# --------------------------------------------------------------------------- figure 9


@figure(9, "staleness_gradient", "exact-gradient staleness: gradient bias and variance against policy lag")
def figure_9(out_dir: Path, ctx: Context) -> list[Path]:
    """Each objective's gradient error against the exact gradient as the policy lag k grows
    (:func:`sspo_analysis.simulation.staleness_data`, drawn by :mod:`sspo_analysis.plotting.staleness`;
    ``Settings.gradient_batches`` sampled batches per lag)."""
    from sspo_analysis.plotting import style
    from sspo_analysis.plotting.staleness import plot_staleness
    from sspo_analysis.simulation import staleness_data

    def progress(done: int, total: int, name: str) -> None:
        ctx.advance(done, total, f"theory: exact-gradient staleness study, {name}")

    df = ctx.cached("fig9", lambda: staleness_data(n_batches=ctx.settings.gradient_batches, progress=progress))
    ctx.advance(1, 1, "plotting")
    return style.save_figure(plot_staleness(df), stem(out_dir, 9), df)
