"""One look for every figure: a colour-blind-safe palette, one colour per objective.

Okabe & Ito's eight colours (Color Universal Design) are safe for the common
colour-vision deficiencies. Every figure takes an objective's colour from
:func:`color`, so an objective has the same colour everywhere.
"""

from __future__ import annotations

import matplotlib as mpl

OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
}

OBJECTIVE_COLORS: dict[str, str] = {
    "pg": OKABE_ITO["black"],
    "is-token": "#999999",
    "is-seq": "#555555",
    "grpo": OKABE_ITO["orange"],
    "dapo": OKABE_ITO["yellow"],
    "cispo": "#8C564B",
    "sapo": OKABE_ITO["sky"],
    "gspo": OKABE_ITO["green"],
    "gmpo": OKABE_ITO["purple"],
    "sspo": OKABE_ITO["vermillion"],
    "sspo-sigmoid": OKABE_ITO["blue"],
    # The field's other objectives, from Paul Tol's muted palette (also colour-blind safe).
    "vespo": "#882255",
    "luspo": "#44AA99",
    "clip-cov": "#999933",
    "kl-cov": "#332288",
}

GATE_COLORS: dict[str, str] = {
    "identity": "#999999",
    "sigmoid": OKABE_ITO["sky"],
    "erf": OKABE_ITO["green"],
    "arctan": OKABE_ITO["vermillion"],
    "softsign": OKABE_ITO["purple"],
    "hard-clip": OKABE_ITO["black"],
}

# Two-column paper: a full-width figure is about 7 in.
FULL_WIDTH = 7.0


def color(name: str) -> str:
    """The colour of an objective (or gate family); grey for unknown names."""
    return OBJECTIVE_COLORS.get(name, GATE_COLORS.get(name, "#777777"))


def apply() -> None:
    """Set matplotlib defaults readable at two-column-paper width."""
    mpl.rcParams.update(
        {
            "figure.dpi": 150,
            "savefig.dpi": 200,
            "savefig.bbox": "tight",
            "font.size": 8,
            "axes.titlesize": 8,
            "axes.labelsize": 8,
            "legend.fontsize": 7,
            "xtick.labelsize": 7,
            "ytick.labelsize": 7,
            "lines.linewidth": 1.4,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "legend.frameon": False,
        }
    )


def save(fig, path_stem) -> list:
    """Save ``fig`` as PNG and PDF next to each other, atomically; returns the paths."""
    from pathlib import Path

    from sspo_analysis.io import atomic_path

    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        target = stem.with_suffix(f".{ext}")
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=ext)
        paths.append(target)
    return paths
