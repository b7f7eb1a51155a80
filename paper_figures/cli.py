"""``sspo figures``: every paper figure and the results table, with a progress display.

The command lives here, beside the figures, and reaches ``sspo`` through the
entry-point group ``sspo_analysis.commands`` declared in ``pyproject.toml``
(``figures = "paper_figures.cli:register"``). The dependency points one way:
``paper_figures`` imports the library, the library never imports
``paper_figures``; ``sspo`` finds this command by its name in the installed
metadata and imports this module only when ``sspo figures`` runs.

Without the installed entry point (a source checkout whose install predates it),
``python -m paper_figures.cli --quick`` runs the same command.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``figures`` to the ``sspo`` sub-commands ``sub``."""
    p = sub.add_parser(
        "figures",
        help="make every paper figure (PNG, PDF, CSV) and the results table",
        description="Make the paper figures 1-9 and figures/results.{md,csv}. Training runs are kept under "
        "<out>/runs and reused, so a second call only replots; a finished run keeps its metrics and log-ratio dumps, "
        "not its checkpoint (unless --keep-checkpoints).",
    )
    p.add_argument("--quick", action="store_true", help="fewer steps, seeds and samples (CI: <= 5 min on 2 cores)")
    p.add_argument("--only", default=None, metavar="LIST",
                   help="comma-separated figure numbers or ranges, and/or 'table' (e.g. 3,5 or 2-4,table)")
    p.add_argument("--out", default="figures", help="output directory (default: figures/)")
    p.add_argument("--runs-dir", default=None, help="training runs directory (default: <out>/runs)")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each finished run's checkpoint/ and final/ model (default: deleted once the run is "
                        "finished, also in runs made by earlier calls; the figures read only metrics and log-ratio "
                        "dumps)")
    p.set_defaults(func=run)


def _label(key: int | str) -> str:
    return f"figure {key}" if isinstance(key, int) else str(key)


class _Display:
    """The rich progress display of one ``sspo figures`` call: an overall bar and a per-figure sub-bar."""

    def __init__(self, console: Any, total: int, mode: str) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.console = console
        self.results: list[Any] = []
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=console, transient=False)
        self.overall = self.progress.add_task(f"figures ({mode})", total=total)
        self.sub = self.progress.add_task("", total=1, visible=False)

    def advance(self, done: int, n: int, description: str) -> None:
        self.progress.update(self.sub, completed=done, total=max(n, 1), description=f"  {description}", visible=True)

    def on_start(self, key: int | str, title: str) -> None:
        self.progress.update(self.overall, description=f"{_label(key)}: {title}")
        self.progress.update(self.sub, visible=False, completed=0)

    def on_done(self, result: Any) -> None:
        self.progress.advance(self.overall)
        self.console.print(f"[green]done[/green] {_label(result.number)} ({result.seconds:.1f} s): "
                           + ", ".join(p.name for p in result.paths))
        self.results.append(result)


def _summary(results: list[Any], title: str) -> Any:
    """The closing table: seconds and files per item."""
    from rich.table import Table

    summary = Table(title=title)
    summary.add_column("item")
    summary.add_column("seconds", justify="right")
    summary.add_column("files", justify="right")
    for r in results:
        summary.add_row(f"figure {r.number}: {r.title}" if isinstance(r.number, int) else r.title,
                        f"{r.seconds:.1f}", str(len(r.paths)))
    return summary


def run(args: argparse.Namespace) -> int:
    """Entry point of ``sspo figures``."""
    import time
    from pathlib import Path

    from rich.console import Console

    import paper_figures

    numbers, table = paper_figures.parse_only(args.only)
    out = Path(args.out)
    runs_dir = Path(args.runs_dir) if args.runs_dir else out / "runs"
    console = Console()
    t_start = time.perf_counter()
    display = _Display(console, len(numbers) + int(table), "quick" if args.quick else "full")
    with display.progress:
        ctx = paper_figures.Context(quick=args.quick, runs_dir=runs_dir, report=lambda m: console.print(f"  {m}"),
                                    advance=display.advance, keep_checkpoints=args.keep_checkpoints)
        paper_figures.make_figures(out, numbers, table, ctx, on_start=display.on_start, on_done=display.on_done)
    console.print(_summary(display.results, f"sspo figures -> {out}/ ({time.perf_counter() - t_start:.0f} s)"))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m paper_figures.cli [options]``: ``sspo figures`` without the installed entry point."""
    from sspo_analysis.cli import own_process, run_command

    own_process()
    parser = argparse.ArgumentParser(prog="sspo")
    register(parser.add_subparsers(dest="command", required=True))
    return run_command(parser, ["figures", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
