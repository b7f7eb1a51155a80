"""The gate figure: every family's value and weight in ratio and log space.

Used by ``sspo gates`` and by paper figure 1, so both show the same thing.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from sspo_analysis import gates
from sspo_analysis.io import atomic_path
from sspo_analysis.objectives import get_objective


def families() -> tuple[str, ...]:
    """The gates the figure draws: every registered family but the identity, user gates included."""
    return tuple(name for name in gates.GATES if name != "identity")
SIGMOID_TAUS = (1.0, 2.0, 4.0)


def admissibility_table(tau: float = 1.0, eps: float = 0.2) -> list[dict[str, object]]:
    """One row per gate family: the four admissibility properties and the verdict."""
    rows = []
    for name in gates.GATES:
        report = gates.get_gate(name, tau=tau, eps=eps).check_admissible()
        rows.append(
            {
                "gate": name,
                "c1": report.c1,
                "max_at_origin": report.max_at_origin,
                "monotone": report.monotone,
                "vanishing_tails": report.vanishing_tails,
                "admissible": report.admissible,
            }
        )
    return rows


def gate_curves(tau: float = 1.0, eps: float = 0.2, points: int = 801) -> dict[str, np.ndarray]:
    """The numbers the figure plots, as named columns over a common log-ratio grid.

    Columns: ``log_ratio``, ``ratio``; per family ``{family}_{space}_value`` and
    ``{family}_{space}_weight`` (ratio space in ``u = r - 1``, log space in
    ``u = l``); per family ``{family}_{space}_coef``, the token coefficient
    ``c / A`` it implies (``r g'(r - 1)`` in ratio space, ``g'(l)`` in log
    space); and ``sspo-sigmoid_tau{tau}_coef``, the per-token coefficient of the
    geometric mean of SAPO gates, whose on-policy value is ``tau / 2``.
    """
    l = torch.linspace(-2.0, 2.0, points, dtype=torch.float64)
    r = l.exp()
    out: dict[str, np.ndarray] = {"log_ratio": l.numpy(), "ratio": r.numpy()}
    for name in families():
        for space, u in (("ratio", r - 1.0), ("log", l)):
            g = gates.get_gate(name, tau=tau, eps=eps, space=space)
            out[f"{name}_{space}_value"] = g(u).numpy()
            out[f"{name}_{space}_weight"] = g.weight(u).numpy()
            out[f"{name}_{space}_coef"] = (g.weight(u) * (r if space == "ratio" else 1.0)).numpy()
    ones = torch.ones(points, 1, dtype=torch.float64)
    for t in SIGMOID_TAUS:
        # The package objective itself, one token per sequence: c * T / A = w phi'(l) at T = 1 is
        # exp(phi) phi'; divide out w to show the per-token gate weight phi'(l).
        obj = get_objective("sspo-sigmoid", tau=t)
        phi, dphi = obj.log_gate(l[:, None], ones.bool())
        out[f"sspo-sigmoid_tau{t:g}_coef"] = dphi[:, 0].numpy()
    return out


def _line_style(name: str) -> dict[str, object]:
    """Colour and dash of a gate's curves: the built-ins' own; user gates grey, told apart by their dashes."""
    from sspo_analysis.plotting import style

    if gates.is_builtin(name):
        return {"color": style.color(name), "ls": "--" if name == "hard-clip" else "-"}
    user = [n for n in families() if not gates.is_builtin(n)]
    return {"color": style.color(name), "ls": (":", "-.", (0, (5, 1, 1, 1)), (0, (1, 3)))[user.index(name) % 4]}


def write_csv(columns: dict[str, np.ndarray], path: str | Path) -> Path:
    """Write named equal-length columns to ``path`` as CSV, atomically."""
    path = Path(path)
    names = list(columns)
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(names)
        writer.writerows(zip(*(np.round(columns[n], 10) for n in names)))
    return path


def plot_gates(out_dir: str | Path, tau: float = 1.0, eps: float = 0.2, stem: str = "gates") -> list[Path]:
    """Draw the gate figure into ``out_dir`` as PNG, PDF and CSV; returns the paths."""
    from matplotlib.figure import Figure  # not pyplot: no figure manager, and the caller's backend is left alone

    from sspo_analysis.plotting import style

    style.apply()
    data = gate_curves(tau, eps)
    l, r = data["log_ratio"], data["ratio"]
    fig = Figure(figsize=(style.FULL_WIDTH, 4.6), layout="constrained")
    axes = fig.subplots(2, 3)
    for row, (space, x, xlabel) in enumerate((("ratio", r, "ratio r"), ("log", l, "log-ratio l = log r"))):
        u = "r - 1" if space == "ratio" else "l"
        for name in families():
            kw = {**_line_style(name), "label": name}
            axes[row, 0].plot(x, data[f"{name}_{space}_value"], **kw)
            axes[row, 1].plot(x, data[f"{name}_{space}_weight"], **kw)
        axes[row, 0].set(xlabel=xlabel, ylabel=f"gate g({u})", title=f"{space} space: value")
        axes[row, 1].set(xlabel=xlabel, ylabel=f"weight g'({u})", title=f"{space} space: weight")
        axes[row, 0].axvline(1.0 if space == "ratio" else 0.0, color="#bbbbbb", lw=0.6, zorder=0)
        axes[row, 1].axvline(1.0 if space == "ratio" else 0.0, color="#bbbbbb", lw=0.6, zorder=0)
    for ax in axes[0, :2]:
        ax.set_xlim(0.0, 4.0)
    # In ratio space the token coefficient is r g'(r - 1): the extra r skews it upward.
    for name in families():
        axes[0, 2].plot(l, data[f"{name}_ratio_coef"], **_line_style(name))
    axes[0, 2].set(
        xlabel="log-ratio l", ylabel="token coefficient c / A", title="ratio-space gate: c / A = r g'(r - 1)"
    )
    # sspo-sigmoid: the geometric mean of SAPO gates is only admissible at tau = 2.
    for t, ls in zip(SIGMOID_TAUS, (":", "-", "-.")):
        axes[1, 2].plot(
            l,
            data[f"sspo-sigmoid_tau{t:g}_coef"],
            color=style.color("sspo-sigmoid"),
            ls=ls,
            label=f"tau = {t:g}: phi'(0) = {t / 2:g}",
        )
    axes[1, 2].axhline(1.0, color="#bbbbbb", lw=0.6, zorder=0)
    axes[1, 2].set(xlabel="log-ratio l", ylabel="per-token weight phi'(l)", title="sspo-sigmoid: phi'(0) = tau / 2")
    # Headroom above the tallest curve so the legend covers none of them.
    peak = max(float(max(data[f"sspo-sigmoid_tau{t:g}_coef"])) for t in SIGMOID_TAUS)
    axes[1, 2].set_ylim(top=1.75 * peak)
    axes[1, 2].legend(loc="upper right", fontsize=7)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncol=min(len(families()), 6),
        title=f"soft gates at tau = {tau:g}; hard clip at eps = {eps:g}",
    )
    paths = style.save(fig, Path(out_dir) / stem)
    paths.append(write_csv(data, Path(out_dir) / f"{stem}.csv"))
    return paths
