"""Figure 1: the gate families, in ratio and log space, against the hard clip.

The drawing is ``sspo gates``'s (:func:`sspo_analysis.plotting.gates.plot_gates`),
so the command and the paper show the same figure; this adds the admissibility
table of every family as a CSV beside it.
"""

from __future__ import annotations

from pathlib import Path

from paper_figures import Context, figure, stem
from sspo_analysis.io import write_frame


def explore_gate(family: str = "arctan", tau: float = 1.0, eps: float = 0.2, half_width: float = 2.0):
    """One family at one temperature against the hard clip: value, weight and token coefficient in both spaces.

    Returns ``(fig, admissibility)`` where ``admissibility`` is
    :class:`sspo_analysis.gates.Admissibility` of the family at ``tau``. Used by
    ``notebooks/01_gates.ipynb``.
    """
    import torch

    from sspo_analysis import gates
    from sspo_analysis.plotting import style

    l = torch.linspace(-half_width, half_width, 801, dtype=torch.float64)
    r = l.exp()
    fig, axes = style.subplots(2, 3, 4.0)
    for row, (space, u, x, xlabel) in enumerate((("ratio", r - 1.0, r, "ratio r"),
                                                  ("log", l, l, "log-ratio l = log r"))):
        for name, ls in ((family, "-"), ("hard-clip", "--")):
            g = gates.get_gate(name, tau=tau, eps=eps, space=space)
            label = name if name == "hard-clip" else f"{name}, tau={tau:g}"
            kw = {"color": style.color(name), "ls": ls, "label": label}
            axes[row, 0].plot(x, g(u), **kw)
            axes[row, 1].plot(x, g.weight(u), **kw)
            axes[row, 2].plot(l, g.weight(u) * (r if space == "ratio" else 1.0), **kw)
        sym = "r - 1" if space == "ratio" else "l"
        axes[row, 0].set(xlabel=xlabel, ylabel=f"gate g({sym})", title=f"{space} space: value")
        axes[row, 1].set(xlabel=xlabel, ylabel=f"weight g'({sym})", title=f"{space} space: weight")
        axes[row, 2].set(xlabel="log-ratio l", ylabel="token coefficient c / A", title=f"{space} space: c / A")
    axes[0, 0].legend(loc="upper left")
    report = gates.get_gate(family, tau=tau, eps=eps).check_admissible()
    verdict = "admissible" if report.admissible else "not admissible (fails: " + ", ".join(report.failures()) + ")"
    fig.suptitle(f"{family} gate, tau = {tau:g}: {verdict}; hard clip eps = {eps:g} for comparison")
    return fig, report


@figure(1, "gates", "gate families: value and weight, ratio and log space")
def figure_1(out_dir: Path, ctx: Context, tau: float = 1.0, eps: float = 0.2) -> list[Path]:
    """Gate value and weight of every family (tau=1) with the hard clip (eps=0.2).

    Writes ``fig1_gates.{png,pdf,csv}`` (the curves) and
    ``fig1_gates_admissibility.csv`` (the four admissibility properties per family).
    """
    import pandas as pd

    from sspo_analysis.plotting.gates import admissibility_table, plot_gates

    base = stem(out_dir, 1)
    paths = plot_gates(out_dir, tau=tau, eps=eps, stem=base.name)
    table = pd.DataFrame(admissibility_table(tau, eps))
    paths.append(write_frame(table, base.with_name(base.name + "_admissibility.csv")))
    return [Path(p) for p in paths]
