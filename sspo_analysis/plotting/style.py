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
    # The references: greys and black.
    "pg": OKABE_ITO["black"],
    "is-token": "#999999",
    "is-seq": "#555555",
    # The six trained objectives: Okabe & Ito plus Paul Tol's olive and red, chosen so that no two of
    # them are closer than about 38 in CIE76 Delta E (grpo's orange and sspo's former vermillion were 33).
    "grpo": OKABE_ITO["orange"],
    "dapo": "#999933",
    "sapo": OKABE_ITO["sky"],
    "gspo": OKABE_ITO["green"],
    "gmpo": OKABE_ITO["purple"],
    "sspo": "#CC3311",
    # The field's other objectives and the stability study's variants (Tol's muted palette).
    "cispo": "#8C564B",
    "sspo-sigmoid": OKABE_ITO["blue"],
    "vespo": "#882255",
    "luspo": "#44AA99",
    "clip-cov": "#DDCC77",
    "kl-cov": "#332288",
    "sspo-erf": "#AA4499",
    "sspo-sigmoid-tau2": "#66A61E",
}
"""One colour per objective; no two alike (tests/test_plotting_style.py checks the distances)."""

OBJECTIVE_MARKERS: dict[str, str] = {
    "pg": "", "is-token": "x", "is-seq": "+", "grpo": "o", "dapo": "v", "sapo": "D", "gspo": "s", "gmpo": "^",
    "sspo": "h", "cispo": "P", "sspo-sigmoid": "d", "vespo": "*", "luspo": "<", "clip-cov": ">", "kl-cov": "X",
    "sspo-erf": "p", "sspo-sigmoid-tau2": "8",
}
"""One marker shape per objective, so that the lines stay apart in grayscale."""

OBJECTIVE_DASHES: dict[str, object] = {
    # Objectives whose curves coincide with another's somewhere are dashed: dapo = grpo for A < 0,
    # gmpo ~ gspo ~ sspo at small log-ratio spread.
    "dapo": (0, (5, 2)), "gmpo": (0, (2, 1.5)), "gspo": (0, (6, 1.5, 1.5, 1.5)), "cispo": ":",
    "sspo-sigmoid": "-.", "luspo": (0, (3, 1, 1, 1, 1, 1)), "kl-cov": (0, (1, 1)), "sspo-erf": (0, (4, 1, 1, 1)),
    "sspo-sigmoid-tau2": (0, (3, 3)),
}
"""Dash patterns (default solid)."""

VARIANT_DASHES: tuple[object, ...] = ((0, (4, 1.5)), (0, (1, 1.2)), (0, (6, 2, 1, 2)), (0, (2, 2)),
                                      (0, (8, 2, 1, 2, 1, 2)))
"""Dash patterns of unnamed variants (``"sspo@tau=2"``), picked by a stable hash of the name."""

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


def base_name(name: str) -> str | None:
    """The objective a (possibly parametrised) name belongs to, or ``None``.

    ``"sspo"`` -> ``"sspo"``; ``"sspo-sigmoid@tau=2"`` -> ``"sspo-sigmoid"`` (the
    part before ``@``); ``"sspo-sigmoid-tau3"`` -> ``"sspo-sigmoid"`` (the
    longest known name it extends with ``-``).
    """
    head = name.split("@", 1)[0]
    if head in OBJECTIVE_COLORS:
        return head
    known = [k for k in OBJECTIVE_COLORS if head.startswith(k + "-")]
    return max(known, key=len) if known else None


def is_variant(name: str) -> bool:
    """Whether ``name`` is an unnamed variant of a known objective (coloured as its base, dashed apart)."""
    return name not in OBJECTIVE_COLORS and name not in GATE_COLORS and base_name(name) is not None


def color(name: str) -> str:
    """The colour of an objective, a variant of one (its base's colour) or a gate family; grey otherwise."""
    if name in OBJECTIVE_COLORS or name in GATE_COLORS:
        return OBJECTIVE_COLORS.get(name, GATE_COLORS.get(name))
    base = base_name(name)
    return OBJECTIVE_COLORS[base] if base else "#777777"


def marker(name: str) -> str:
    """The marker shape of an objective (a variant: its base's); ``"o"`` for unknown names."""
    base = name if name in OBJECTIVE_MARKERS else base_name(name)
    return OBJECTIVE_MARKERS.get(base, "o") if base else "o"


def linestyle(name: str) -> object:
    """The dash pattern of an objective; a variant gets one of :data:`VARIANT_DASHES`, never its base's."""
    if is_variant(name):
        import zlib

        return VARIANT_DASHES[zlib.crc32(name.encode()) % len(VARIANT_DASHES)]
    return OBJECTIVE_DASHES.get(name, "-")


def line_kw(name: str, markers: bool = True, every: int | None = None, index: int = 0) -> dict[str, object]:
    """Matplotlib keywords for an objective's line: colour, dash pattern and (optionally) its marker.

    With ``every``, markers sit on every ``every``-th point, starting at
    ``index % every``: give each curve of a panel its own ``index`` so that the
    markers of overlapping curves do not sit on top of each other.
    """
    ls = linestyle(name)
    # Dashed lines on top of solid ones: where two curves coincide, the solid one shows through the gaps.
    kw: dict[str, object] = {"color": color(name), "ls": ls, "zorder": 2.0 if ls == "-" else 2.2}
    if markers and marker(name):
        kw.update(marker=marker(name), ms=3.5, mfc="white", mew=0.9)
        if every:
            kw["markevery"] = (index % every, every)
    return kw


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


def subplots(nrows: int, ncols: int, height: float, width: float | None = None, **kw):
    """``plt.subplots`` at paper width (``width`` inches, default :data:`FULL_WIDTH`) with this style applied,
    constrained layout and always a 2-D array of axes."""
    import matplotlib.pyplot as plt

    apply()
    return plt.subplots(nrows, ncols, figsize=(width or FULL_WIDTH, height), constrained_layout=True, squeeze=False,
                        **kw)


def save_figure(fig, path_stem, data=None) -> list:
    """:func:`save` ``fig`` (PNG and PDF), close it and, if given, write the DataFrame ``data`` (the plotted
    numbers) as ``<stem>.csv``; every write atomic. Returns the paths."""
    from pathlib import Path

    import matplotlib.pyplot as plt

    from sspo_analysis.io import write_frame

    paths = [Path(p) for p in save(fig, path_stem)]
    plt.close(fig)
    if data is not None:
        paths.append(write_frame(data, Path(path_stem).with_suffix(".csv")))
    return paths


def save(fig, path_stem) -> list:
    """Save ``fig`` as PNG and PDF next to each other, atomically; returns the paths."""
    from pathlib import Path

    from sspo_analysis.io import atomic_path

    stem = Path(path_stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        target = stem.with_suffix(f".{ext}")
        with atomic_path(target) as tmp:  # no creation date in the PDF: the same figure gives the same bytes
            fig.savefig(tmp, format=ext, metadata={"CreationDate": None} if ext == "pdf" else None)
        paths.append(target)
    return paths
