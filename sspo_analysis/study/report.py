"""The study's figures (PNG, PDF and the CSV of the plotted numbers) and ``results.md``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sspo_analysis import analysis
from sspo_analysis.plotting import style
from sspo_analysis.study.collect import OUTCOMES, PREDICTORS, SHORT_NAMES
from sspo_analysis.study.stats import ALPHA, mean_ci

BAND = "band: 95% bootstrap CI of the mean over seeds"
BARS = "bars: 95% CI over seeds (fraction unstable: exact Clopper-Pearson; others: bootstrap of the mean)"
KEY_OUTCOMES = ("unstable", "final_reward", "reward_auc", "end_entropy", "weight_var")
"""The outcomes whose paired verdicts ``results.md`` lists (``comparisons.csv`` has every outcome)."""




# --------------------------------------------------------------------------- figures


def plot_map(summary: Any, arms: Sequence[str], regimes: Sequence[str], headline: str) -> Any:
    """Heat map: the fraction of seeds unstable per arm (rows) and regime (columns), annotated ``k/n``."""
    fig, axes = style.subplots(1, 1, 0.32 * len(arms) + 1.6)
    ax = axes[0, 0]
    table = summary.pivot(index="arm", columns="regime", values="unstable").reindex(index=arms, columns=regimes)
    counts = summary.assign(k=summary.unstable * summary.n).pivot(index="arm", columns="regime", values="k")
    n = summary.pivot(index="arm", columns="regime", values="n")
    im = ax.imshow(table.to_numpy(dtype=float), cmap="Reds", vmin=0, vmax=1, aspect="auto")
    for i, arm in enumerate(arms):
        for j, regime in enumerate(regimes):
            if np.isfinite(table.loc[arm, regime]):
                k, total = counts.loc[arm, regime], n.loc[arm, regime]
                ax.text(j, i, f"{k:.0f}/{total:.0f}", ha="center", va="center", fontsize=6,
                        color="white" if table.loc[arm, regime] > 0.6 else "black")
    ax.set_xticks(range(len(regimes)), [r.replace(" ", "\n") + ("\n(headline)" if r == headline else "")
                                       for r in regimes], fontsize=6)
    ax.set_yticks(range(len(arms)), arms)
    ax.set_title("Runs unstable (k of n seeds) per objective and regime\n"
                 "L: answer letters, lr: learning rate, u: updates per rollout batch, k: staleness")
    fig.colorbar(im, ax=ax, label="fraction of seeds unstable", shrink=0.8)
    return fig


def plot_headline(summary: Any, comparisons: Any, arms: Sequence[str], regime: str) -> Any:
    """One panel per outcome: each arm's mean and 95% CI in the headline regime; * marks a significant
    paired difference from grpo, + from gmpo."""
    head = summary[summary.regime == regime].set_index("arm").reindex(arms)
    fig, axes = style.subplots(2, 3, 4.6)
    y = np.arange(len(arms))[::-1]
    for ax, key in zip(axes.ravel(), OUTCOMES):
        for yi, arm in zip(y, arms):
            mean, lo, hi = head.loc[arm, [key, f"{key}_ci_low", f"{key}_ci_high"]].to_numpy(dtype=float)
            err = [[max(mean - lo, 0)], [max(hi - mean, 0)]] if np.isfinite(lo) else None
            ax.errorbar(mean, yi, xerr=err, fmt="o", color=style.color(arm), ms=4, capsize=2)
            right = hi if np.isfinite(hi) else mean
            ax.annotate(_marks(comparisons, arm, key), (right, yi), xytext=(3, 0), textcoords="offset points",
                        fontsize=7, va="center")
        ax.set_yticks(y, arms if ax in axes[:, 0] else [""] * len(arms))
        ax.set_title(SHORT_NAMES[key], fontsize=7)
        ax.grid(axis="x", alpha=0.3)
        if key == "unstable":
            ax.set_xlim(-0.05, 1.12)
        if key == "weight_var":  # one seed's outlier would squash every other objective at 0
            ax.set_xscale("log")
            ax.set_title(SHORT_NAMES[key] + ", log axis", fontsize=7)
    fig.suptitle(f"Headline regime {regime}: {BARS}\n* / + : significant paired difference from grpo / gmpo "
                 f"(exact sign-flip test p < {ALPHA} and CI excluding 0)", fontsize=7)
    return fig


def _marks(comparisons: Any, arm: str, key: str) -> str:
    rows = comparisons[(comparisons.arm == arm) & (comparisons.outcome == key)]
    marks = {"grpo": "*", "gmpo": "+"}
    return "".join(marks[r.reference] for r in rows.itertuples() if r.verdict != "no significant difference")


def curves(metrics: Any, key: str) -> Any:
    """Per arm and step: mean of ``key`` over seeds and its 95% bootstrap CI (the plotted numbers)."""
    import pandas as pd

    rows = []
    for (arm, step), g in metrics.groupby(["arm", "step"], sort=False):
        mean, lo, hi = mean_ci(g[key].to_numpy(dtype=float))
        rows.append({"arm": arm, "step": step, "metric": key, "mean": mean, "ci_low": lo, "ci_high": hi,
                     "n": int(g[key].notna().sum())})
    return pd.DataFrame(rows)


def plot_curves(data: Any, arms: Sequence[str], ylabel: str, regime: str) -> Any:
    """Small multiples, one panel per arm: its mean curve with a CI band, grpo's mean in grey in every panel."""
    ncols = 4
    nrows = -(-len(arms) // ncols)
    fig, axes = style.subplots(nrows, ncols, 1.35 * nrows + 0.5, sharey=True)
    ref = data[data.arm == "grpo"]
    for ax, arm in zip(axes.ravel(), arms):
        d = data[data.arm == arm]
        if arm != "grpo" and len(ref):
            ax.plot(ref.step, ref["mean"], color="0.6", lw=1, label="grpo")
        ax.fill_between(d.step, d.ci_low, d.ci_high, color=style.color(arm), alpha=0.25, lw=0)
        ax.plot(d.step, d["mean"], color=style.color(arm), label=arm)
        ax.set_title(arm, fontsize=7)
        ax.set_xlabel("RL step", fontsize=6)
        ax.set_ylabel(ylabel, fontsize=6)
    for ax in axes.ravel()[len(arms):]:
        ax.axis("off")
    fig.suptitle(f"{ylabel} in the headline regime {regime}: mean over seeds; {BAND} (pointwise); "
                 "grey: grpo's mean", fontsize=7)
    return fig


def plot_theory(per_arm: Any, corr: Any, arms: Sequence[str]) -> Any:
    """One panel per theory prediction: predicted value (x) against the observed fraction unstable (y),
    one point per arm and regime."""
    fig, axes = style.subplots(1, len(PREDICTORS), 2.9)
    labels = {"shrinkage": "predicted mean coefficient E[c/A]", "dead_fraction": "predicted dead fraction",
              "var_coefficient": "predicted coefficient variance"}
    for ax, key in zip(axes[0], PREDICTORS):
        for i, arm in enumerate(arms):
            d = per_arm[per_arm.arm == arm]
            # Arms share many (x, 0) and (x, 1) points: a small vertical offset per arm keeps each visible.
            offset = (i - (len(arms) - 1) / 2) * 0.012
            ax.scatter(d[key], d.observed_unstable + offset, s=14, color=style.color(arm), marker=style.marker(arm),
                       label=arm, alpha=0.9, linewidths=0.6, facecolors="none" if i % 2 else style.color(arm))
        rho = corr[corr.predictor == key].spearman_rho.to_numpy(dtype=float)
        rho = rho[np.isfinite(rho)]
        med = f"median Spearman rho {np.median(rho):+.2f}\nover {len(rho)} regimes with spread" if rho.size else \
            "no regime with spread in both"
        ax.set_title(med, fontsize=6.5)
        ax.set_xlabel(labels[key])
        ax.set_ylabel("observed fraction of seeds unstable\n(points offset vertically per objective)")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, names, loc="outside lower center", ncols=6, fontsize=6)
    fig.suptitle("Theory at each regime's logged log-ratio spread and length against observed instability "
                 "(one point per objective and regime)", fontsize=7)
    return fig


def staleness_figure(fig_dir: Path, arms: Sequence[Any], n_batches: int) -> list[Path]:
    """The exact-gradient companion of the map: each arm's gradient bias and variance as the policy lag grows
    (:func:`sspo_analysis.simulation.staleness_data`, a tabular policy whose exact gradient is known, drawn by
    :mod:`sspo_analysis.plotting.staleness`)."""
    from sspo_analysis.plotting.staleness import plot_staleness
    from sspo_analysis.simulation import staleness_data

    entries = [(a.label, a.objective, dict(a.params)) for a in arms]
    df = staleness_data(entries, n_batches=n_batches)
    return style.save_figure(plot_staleness(df), fig_dir / "staleness_exact_gradient", df)


def figures(out: Path, data: dict[str, Any], arms: Sequence[str], regimes: Sequence[str], headline: str) -> list[Path]:
    """Every figure of the study drawn from its runs, under ``out/figures``."""
    fig_dir = out / "figures"
    summary, comparisons = data["summary"], data["comparisons"]
    paths = style.save_figure(plot_map(summary, arms, regimes, headline), fig_dir / "map",
                 summary[["regime", "arm", "n", "unstable", "final_reward"]])
    head = summary[summary.regime == headline]
    paths += style.save_figure(plot_headline(summary, comparisons, arms, headline), fig_dir / "headline", head)
    for key, ylabel in (("reward_mean", "reward"), ("entropy", "entropy (nats per token)")):
        d = curves(data["metrics"], key)
        paths += style.save_figure(plot_curves(d, arms, ylabel, headline), fig_dir / f"curves_{key}", d)
    theory = plot_theory(data["theory"], data["theory_corr"], arms)
    paths += style.save_figure(theory, fig_dir / "theory", data["theory"])
    return paths


# --------------------------------------------------------------------------- results.md


def _fmt(mean: float, low: float, high: float, digits: int = 3) -> str:
    if not np.isfinite(mean):
        return "n/a"
    ci = f" [{low:.{digits}f}, {high:.{digits}f}]" if np.isfinite(low) else ""
    return f"{mean:.{digits}f}{ci}"


def headline_table(summary: Any, arms: Sequence[str], regime: str) -> list[str]:
    """Markdown: every outcome per arm in the headline regime, mean [95% CI]."""
    head = summary[summary.regime == regime].set_index("arm")
    lines = ["| objective | n | " + " | ".join(OUTCOMES) + " |", "|---|---|" + "---|" * len(OUTCOMES)]
    for arm in arms:
        if arm not in head.index:
            continue
        r = head.loc[arm]
        cells = [_fmt(r[k], r[f"{k}_ci_low"], r[f"{k}_ci_high"], 1 if k == "time_to_instability" else 3)
                 for k in OUTCOMES]
        lines.append(f"| {arm} | {int(r.n)} | " + " | ".join(cells) + " |")
    return lines


def comparison_table(comparisons: Any, keys: Sequence[str] = ("unstable", "final_reward", "reward_auc")) -> list[str]:
    """Markdown: arm minus reference, paired by seed, with CI, p-value and verdict."""
    lines = ["| objective | vs | outcome | difference [95% CI] | p | verdict |", "|---|---|---|---|---|---|"]
    for r in comparisons[comparisons.outcome.isin(keys)].itertuples():
        lines.append(f"| {r.arm} | {r.reference} | {r.outcome} | {_fmt(r.diff, r.ci_low, r.ci_high)} | "
                     f"{r.p_value:.3f} | {r.verdict} |")
    return lines


def map_table(summary: Any, arms: Sequence[str], regimes: Sequence[str]) -> list[str]:
    """Markdown: unstable runs ``k/n`` and mean final reward per arm and regime."""
    lines = ["| objective | " + " | ".join(regimes) + " |", "|---|" + "---|" * len(regimes)]
    index = summary.set_index(["arm", "regime"])
    for arm in arms:
        cells = []
        for regime in regimes:
            if (arm, regime) not in index.index:
                cells.append("")
                continue
            r = index.loc[(arm, regime)]
            cells.append(f"{r.unstable * r.n:.0f}/{int(r.n)} ({r.final_reward:.2f})")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return lines


def theory_table(corr: Any) -> list[str]:
    lines = ["| regime | predictor | Spearman rho | p | objectives |", "|---|---|---|---|---|"]
    for r in corr.itertuples():
        rho = "n/a (no spread)" if not np.isfinite(r.spearman_rho) else f"{r.spearman_rho:+.2f}"
        p = "" if not np.isfinite(r.p_value) else ("<0.001" if r.p_value < 0.001 else f"{r.p_value:.3f}")
        lines.append(f"| {r.regime} | {r.predictor} | {rho} | {p} | {r.n_arms} |")
    return lines


def definitions() -> list[str]:
    """The instability definition, stated from the constants :func:`sspo_analysis.analysis.instability` uses."""
    a = analysis
    return [
        "A run is **unstable** from the first step where one of these holds "
        "(`sspo_analysis.analysis.instability`):",
        "- `trainer`: the trainer stopped it (non-finite reward, entropy or parameters; most updates skipped "
        "for a non-finite loss; entropy below 1e-3 nats);",
        f"- `reward_collapse`: the reward's rolling mean over {a.REWARD_SMOOTHING} steps falls below "
        f"{a.REWARD_COLLAPSE_FRACTION:g} x its running peak and stays there to the end of the run;",
        f"- `entropy_collapse`: the token entropy stays below {a.ENTROPY_COLLAPSE_FRACTION:g} x its first step's "
        f"value for {a.ENTROPY_COLLAPSE_STEPS} steps in a row while the reward is below {a.SOLVED_REWARD:g}.",
        "Grad-norm spikes are counted (`spikes` in `stability.csv`) but are not instability. "
        "`time_to_instability` is the step a run became unstable, or the run length when it never did "
        "(censored), so its mean understates how long stable runs would last.",
    ]


def peak_note(df: Any) -> str:
    """Where the unstable runs' smoothed reward peaked, and which criteria fired (from ``stability.csv``)."""
    unstable = df[df.unstable == 1]
    if unstable.empty:
        return ""
    first = int((unstable.peak_step == 1).sum())
    kinds = ", ".join(f"{k} {n}" for k, n in unstable.kind.value_counts().items())
    return (f"Criteria that fired: {kinds}. In {first} of the {len(unstable)} unstable runs the smoothed reward "
            "peaked at step 1, the warm start's own reward (`peak_step` in `stability.csv`): there a reward "
            "collapse means the policy fell below half of where it started.")


def findings(df: Any, comparisons: Any, headline: str) -> list[str]:
    """Plain statements read off the numbers (no interpretation): instability counts and significant pairs."""
    lines = []
    missing = df[df.unstable.isna()]
    if len(missing):
        lines.append(f"- {len(missing)} run(s) left no metrics (crashed; see their FAILED file) and are left out: "
                     + ", ".join(missing.run) + ".")
    per_arm = df.groupby("arm", sort=False).unstable.agg(["sum", "count"])
    never = [a for a, r in per_arm.iterrows() if r["sum"] == 0]
    lines.append(f"- Unstable runs over the whole map: {int(per_arm['sum'].sum())} of {int(per_arm['count'].sum())}. "
                 f"Never unstable in any regime: {', '.join(never) if never else 'none'}.")
    worst = per_arm.assign(rate=per_arm["sum"] / per_arm["count"]).sort_values("rate", ascending=False)
    lines.append("- Fraction of runs unstable over the map, per objective: "
                 + ", ".join(f"{a} {r.rate:.2f}" for a, r in worst.iterrows()) + ".")
    for ref in ("grpo", "gmpo"):
        part = comparisons[(comparisons.reference == ref) & comparisons.outcome.isin(KEY_OUTCOMES)]
        if part.empty:
            continue
        lines.append(f"- Headline regime {headline}, paired against {ref}:")
        for key in KEY_OUTCOMES:
            rows = part[part.outcome == key]
            groups = {v: ", ".join(rows[rows.verdict == v].arm) for v in ("higher", "lower",
                                                                         "no significant difference")}
            text = "; ".join(f"{v}: {arms}" for v, arms in groups.items() if arms)
            lines.append(f"  - {key}: {text}.")
    return lines


def _smallest_p(plan: Any) -> str:
    n = len(plan.headline_seeds)
    return f"{2 / 2**n:.3g} for the {n} headline seeds here" + ("; no test can reach 0.05" if 2 / 2**n >= 0.05 else "")


def _batch_text(plan: Any) -> str:
    from sspo_analysis.training import load_config

    cfg = load_config(None, plan.runs()[0].overrides(plan))
    r = cfg.rollout
    return (f"{cfg.model.preset} Qwen2 preset, {r.prompts} prompts x {r.group_size} samples per step at "
            f"temperature {r.temperature:g}, gradient norm clipped at {cfg.optim.grad_clip:g}")


def stability_markdown(data: dict[str, Any], plan: Any, command: str, seconds: float, load: str) -> str:
    """``results.md``: how it was made, the definitions, the headline, the comparisons, the map and the theory."""
    arms = [a.label for a in plan.arms]
    regimes = plan.regime_labels()
    head = plan.headline.label
    batch = _batch_text(plan)
    parts = [
        f"# Stability study ({plan.name})", "",
        f"Made by `{command}` in {seconds / 60:.1f} minutes ({load}). Runs: {len(data['tidy'])}; "
        f"{plan.steps} RL steps each; map seeds {list(plan.seeds)}, headline seeds {list(plan.headline_seeds)}, "
        "paired by seed (same warm start, same prompts and sampling stream).",
        "", f"Task: reversal of L letters with partial credit (the fraction of characters in place), "
        f"{batch}; a supervised warm start per L.", "",
        "## Definitions", "", *definitions(), data.get("peak_note", ""), "",
        "## What the numbers say", "", *findings(data["tidy"], data["comparisons"], head), "",
        f"## Headline regime: {head}", "", "Mean over seeds [95% percentile-bootstrap CI].", "",
        *headline_table(data["summary"], arms, head), "",
        "### Paired comparisons (objective minus reference, same seeds)", "",
        f"Exact sign-flip permutation test; significant when p < {ALPHA} and the CI excludes 0. With n paired "
        f"seeds the smallest possible p is 2/2^n: {_smallest_p(plan)}.", "",
        *comparison_table(data["comparisons"]), "",
        "## Stability map", "", "Unstable runs k/n (mean final reward).", "",
        *map_table(data["summary"], arms, regimes), "",
        "## Theory's ranking against the observed one", "",
        "Per regime, each objective's predicted mean coefficient, dead fraction and coefficient variance "
        "(`sspo_analysis.theory`, log-normal ratios at the regime's median early log-ratio spread and mean "
        "length), rank-correlated with the observed fraction of seeds unstable (`theory.csv` has every value).",
        "", *theory_table(data["theory_corr"]), "",
        "## Files", "", "`stability.csv` (one row per run), `summary.csv` (mean and CI per objective and regime), "
        "`comparisons.csv`, `theory.csv`, `theory_correlations.csv` (permutation p-values of Spearman's rho), "
        "`timing.json` (training wall time per call), `figures/` (PNG, PDF and CSV of each figure).",
        "`figures/staleness_exact_gradient` is the noise-free companion of the map's staleness column: every "
        "objective's gradient estimate against the exact gradient of a small tabular sequence policy, as the lag "
        "between the sampling and the current policy grows.",
    ]
    return "\n".join(parts) + "\n"
