"""Training curves of one or more runs (``sspo plot``): one panel per metric, one colour per objective."""

from __future__ import annotations

from pathlib import Path

PLOT_PANELS = (
    ("reward_mean", "reward"),
    ("entropy", "entropy (nats/token)"),
    ("log_ratio_std", "std of token log-ratio"),
    ("dead_frac", "dead-gradient fraction"),
    ("coef_norm_mean", "mean normalised coefficient"),
    ("grad_norm", "grad norm"),
    ("entropy_change_real", "entropy change (real)"),
    ("entropy_change_pred", "entropy change (Cui proxy)"),
    ("entropy_change_taylor", "entropy change (first order)"),
)
"""The metrics drawn, in panel order (a 3 x 3 grid), with their titles; a metric a run lacks is skipped."""


def plot_runs(runs: list[str | Path], out: str | Path) -> list[Path]:
    """Curves of every run (colour by objective), one panel per metric; returns the PNG and PDF paths."""
    from matplotlib.figure import Figure  # not pyplot: no figure manager, and the caller's backend is left alone

    from sspo_analysis.plotting import style
    from sspo_analysis.training.readers import read_metrics

    for run in runs:
        if not (Path(run) / "metrics.jsonl").exists():
            raise ValueError(f"runs: {str(run)!r} has no metrics.jsonl")
    style.apply()
    frames = [read_metrics(r) for r in runs]
    for run, df in zip(runs, frames):
        if df.empty or "step" not in df:
            raise ValueError(f"runs: {str(run)!r} has no complete step in metrics.jsonl (nothing to plot)")
    fig = Figure(figsize=(style.FULL_WIDTH, 5.4))
    axes = fig.subplots(3, 3, sharex=True)
    labelled = set()
    for df in frames:
        name = str(df["objective"].iloc[0]) if "objective" in df else Path(df["run"].iloc[0]).name
        for ax, (key, title) in zip(axes.flat, PLOT_PANELS):
            if key in df:
                label = name if name not in labelled else None
                ax.plot(df["step"], df[key], color=style.color(name), alpha=0.8, lw=1.0, label=label)
                ax.set_title(title)
        labelled.add(name)
    for ax in axes[-1]:
        ax.set_xlabel("step")
    axes.flat[0].legend(loc="best")
    fig.tight_layout()
    paths = style.save(fig, Path(out) / "training_curves")
    return paths
