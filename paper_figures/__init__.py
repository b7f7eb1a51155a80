"""The paper's figures and results table, one plain function per figure.

Each figure is registered under its number with :func:`figure`; the function
takes ``(out_dir, ctx)``, writes ``figN_<name>.png``, ``.pdf`` and ``.csv`` (the
numbers it plots) into ``out_dir``, and returns the paths it wrote.
``sspo figures`` (:mod:`paper_figures.cli`) and the notebooks call
:func:`make_figures` or the figure modules' ``data_*`` / ``plot_*`` functions.

- :mod:`paper_figures.gates_fig`: figure 1 (gate families);
- :mod:`paper_figures.theory_figs`: figures 2-4, the bandit half of 7 and figure 9
  (``sspo_analysis.theory`` and ``sspo_analysis.simulation``; figure 9's numbers are
  :func:`sspo_analysis.simulation.staleness_data`, its drawing :mod:`sspo_analysis.plotting.staleness`);
- :mod:`paper_figures.experiments`: the training runs behind figures 5-8 and the
  results table (``sspo_analysis.training``);
- :mod:`paper_figures.training_figs`: figures 5-8 and the results table.

The work is shared through :class:`Context`: the theory and training runs are
computed once per call and reused by every figure that needs them, and
finished training runs on disk are reused across calls, so a second call only
replots.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FigureFn = Callable[[Path, "Context"], list[Path]]


@dataclass(frozen=True)
class Settings:
    """How much work each figure does: ``quick`` for CI, ``full`` for the paper.

    Budgets on 2 CPU cores: quick (everything) <= 5 minutes, full <= 40 minutes.
    """

    name: str
    # theory (figures 2-4)
    n_stds: int
    mc_samples: int
    mc_points: int
    lengths: tuple[int, ...]
    frontier_points: int
    # bandit simulator (figure 7, left)
    bandit_steps: int
    bandit_seeds: int
    # LLM training (figures 5-8, results table): a model preset on n-digit addition
    preset: str
    task_digits: int
    train_steps: int
    seeds: tuple[int, ...]
    staleness: tuple[int, ...]
    staleness_objectives: tuple[str, ...]
    staleness_seeds: tuple[int, ...]
    log_ratios_every: int
    # exact-gradient staleness study (figure 9): sampled batches per objective and lag
    gradient_batches: int = 1000


QUICK = Settings(
    name="quick", n_stds=25, mc_samples=20_000, mc_points=5, lengths=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    frontier_points=9, bandit_steps=60, bandit_seeds=1,
    preset="tiny", task_digits=1, train_steps=10, seeds=(0, 1, 2), staleness=(0, 2, 8),
    staleness_objectives=("grpo", "sspo"), staleness_seeds=(0,), log_ratios_every=2, gradient_batches=500,
)
FULL = Settings(
    name="full", n_stds=60, mc_samples=200_000, mc_points=8,
    lengths=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024),
    frontier_points=17, bandit_steps=300, bandit_seeds=3,
    preset="tiny", task_digits=2, train_steps=50, seeds=(0, 1, 2), staleness=(0, 2, 8),
    staleness_objectives=("grpo", "dapo", "gspo", "gmpo", "sapo", "sspo"), staleness_seeds=(0, 1, 2),
    log_ratios_every=5, gradient_batches=4000,
)
SMOKE = Settings(
    name="smoke", n_stds=12, mc_samples=4_000, mc_points=3, lengths=(1, 4, 16, 64, 256, 1024),
    frontier_points=5, bandit_steps=20, bandit_seeds=1,
    preset="micro", task_digits=1, train_steps=4, seeds=(0, 1), staleness=(0, 2),
    staleness_objectives=("sspo",), staleness_seeds=(0,), log_ratios_every=2, gradient_batches=100,
)
"""Smoke settings for the notebooks in CI: the micro preset, a few steps; exercises every code path in seconds."""
SETTINGS: dict[str, Settings] = {"smoke": SMOKE, "quick": QUICK, "full": FULL}

TRAINED_OBJECTIVES: tuple[str, ...] = ("grpo", "dapo", "gspo", "gmpo", "sapo", "sspo")
"""The objectives trained on the tiny LLM (figures 5-8 and the results table)."""


@dataclass
class Context:
    """What the figures share during one call.

    Args:
        quick: use :data:`QUICK` settings instead of :data:`FULL`.
        runs_dir: where training runs live (default ``<out>/runs``); finished runs are reused.
        mode: ``"smoke"``, ``"quick"`` or ``"full"`` (overrides ``quick``; see :data:`SETTINGS`).
        report: a callable ``(message)`` for progress lines (the CLI passes a rich one).
        advance: a callable ``(done, total, description)`` for sub-progress within a
            figure (the CLI drives a rich progress bar with it).
        keep_checkpoints: keep each finished run's ``checkpoint/`` and ``final/`` model (by
            default they are deleted once the run is finished: the figures read only metrics
            and log-ratio dumps; see :func:`paper_figures.experiments.drop_checkpoints`).
    """

    quick: bool = False
    runs_dir: Path | None = None
    mode: str | None = None
    report: Callable[[str], None] = lambda message: None
    advance: Callable[[int, int, str], None] = lambda done, total, description: None
    cache: dict[str, Any] = field(default_factory=dict)
    keep_checkpoints: bool = False

    @property
    def settings(self) -> Settings:
        """``SETTINGS[mode]`` if a mode is named, else :data:`QUICK` or :data:`FULL`."""
        if self.mode is not None:
            if self.mode not in SETTINGS:
                raise ValueError(f"mode: unknown value {self.mode!r}; allowed values: {', '.join(SETTINGS)}")
            return SETTINGS[self.mode]
        return QUICK if self.quick else FULL

    def cached(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()`` once per context under ``key`` (training runs, theory sweeps)."""
        if key not in self.cache:
            self.cache[key] = compute()
        return self.cache[key]


@dataclass(frozen=True)
class FigureSpec:
    number: int
    name: str
    title: str
    fn: FigureFn
    needs_training: bool


FIGURES: dict[int, FigureSpec] = {}


def figure(number: int, name: str, title: str, needs_training: bool = False) -> Callable[[FigureFn], FigureFn]:
    """Register ``fn(out_dir, ctx) -> list[Path]`` as figure ``number``."""

    def decorator(fn: FigureFn) -> FigureFn:
        FIGURES[number] = FigureSpec(number, name, title, fn, needs_training)
        return fn

    return decorator


def stem(out_dir: Path, number: int) -> Path:
    """``<out>/fig<N>_<name>``: the common stem of a figure's PNG, PDF and CSV."""
    return Path(out_dir) / f"fig{number}_{FIGURES[number].name}"


def note(ax: Any, text: str, loc: str = "lower left", **kw: Any) -> None:
    """A small grey note inside ``ax`` (what coincides by construction, what a band is)."""
    x = 0.02 if "left" in loc else 0.98
    y = 0.03 if "lower" in loc else 0.97
    ann = ax.annotate(text, (x, y), xycoords="axes fraction", ha="left" if "left" in loc else "right",
                      va="bottom" if "lower" in loc else "top", fontsize=6, color="#444444", **kw)
    ann.set_in_layout(False)  # a note never resizes the panels


def legend_below(fig: Any, ax: Any, ncols: int = 6, **kw: Any) -> None:
    """One legend for the whole figure, below the panels, from ``ax``'s labelled artists (never covers data)."""
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(ncols, len(labels)), **kw)


def parse_only(text: str | None) -> tuple[list[int], bool]:
    """Parse ``--only`` (``"3,5"``, ``"1-4"``, ``"table"``) into (figure numbers, make the table).

    ``None`` or ``""`` selects everything. The results table is made when asked
    for by name, or when no selection is given.
    """
    if not text:
        return sorted(FIGURES), True
    numbers: set[int] = set()
    table = False
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part == "table":
            table = True
            continue
        try:
            if "-" in part:
                lo, hi = (int(x) for x in part.split("-", 1))
                chosen = range(lo, hi + 1)
            else:
                chosen = [int(part)]
        except ValueError:
            raise ValueError(f"--only: cannot read {part!r}; allowed values: figure numbers "
                             f"{', '.join(map(str, sorted(FIGURES)))} (ranges like 2-4) and 'table'") from None
        for n in chosen:
            if n not in FIGURES:
                allowed = ", ".join(map(str, sorted(FIGURES)))
                raise ValueError(f"--only: no figure {n}; allowed values: {allowed}, table")
            numbers.add(n)
    return sorted(numbers), table


@dataclass
class FigureResult:
    number: int | str
    title: str
    paths: list[Path]
    seconds: float


def make_figures(
    out_dir: str | Path = "figures",
    only: Iterable[int] | None = None,
    table: bool = True,
    ctx: Context | None = None,
    on_start: Callable[[int | str, str], None] = lambda key, title: None,
    on_done: Callable[[FigureResult], None] = lambda result: None,
) -> list[FigureResult]:
    """Make the selected figures (default: all) and the results table into ``out_dir``.

    Figures run in number order except that the ones needing no training come
    first, so a failing trainer cannot hide the theory figures. ``on_start`` and
    ``on_done`` let a caller display progress. Returns one result per item.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ctx = ctx or Context()
    chosen: Sequence[int] = sorted(FIGURES) if only is None else sorted(only)
    order = sorted(chosen, key=lambda n: (FIGURES[n].needs_training, n))
    results = []
    for n in order:
        spec = FIGURES[n]
        on_start(n, spec.title)
        t0 = time.perf_counter()
        paths = spec.fn(out, ctx)
        result = FigureResult(n, spec.title, paths, time.perf_counter() - t0)
        on_done(result)
        results.append(result)
    if table:
        from paper_figures.training_figs import results_table

        on_start("table", "results table")
        t0 = time.perf_counter()
        paths = results_table(out, ctx)
        result = FigureResult("table", "results table", paths, time.perf_counter() - t0)
        on_done(result)
        results.append(result)
    return results


# Importing the figure modules registers the figures.
from paper_figures import gates_fig, theory_figs, training_figs  # noqa: E402,F401
