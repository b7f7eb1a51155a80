"""``sspo figures``: every paper figure and the results table, with a progress display.

The figures themselves live in the top-level ``paper_figures`` package; this is
the command line around :func:`paper_figures.make_figures`.
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "figures",
        help="make every paper figure (PNG, PDF, CSV) and the results table",
        description="Make the paper figures 1-8 and figures/results.{md,csv}. Training runs are kept under "
        "<out>/runs and reused, so a second call only replots.",
    )
    p.add_argument("--quick", action="store_true", help="fewer steps, seeds and samples (CI: <= 5 min on 2 cores)")
    p.add_argument("--only", default=None, metavar="LIST",
                   help="comma-separated figure numbers or ranges, and/or 'table' (e.g. 3,5 or 2-4,table)")
    p.add_argument("--out", default="figures", help="output directory (default: figures/)")
    p.add_argument("--runs-dir", default=None, help="training runs directory (default: <out>/runs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import time
    from pathlib import Path

    os.environ.setdefault("MPLBACKEND", "Agg")
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
    from rich.table import Table

    import paper_figures

    numbers, table = paper_figures.parse_only(args.only)
    out = Path(args.out)
    runs_dir = Path(args.runs_dir) if args.runs_dir else out / "runs"
    console = Console()
    t_start = time.perf_counter()
    progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=console, transient=False)
    total = len(numbers) + int(table)
    results = []
    with progress:
        overall = progress.add_task(f"figures ({'quick' if args.quick else 'full'})", total=total)
        sub = progress.add_task("", total=1, visible=False)

        def advance(done: int, n: int, description: str) -> None:
            progress.update(sub, completed=done, total=max(n, 1), description=f"  {description}", visible=True)

        def on_start(key: int | str, title: str) -> None:
            label = f"figure {key}" if isinstance(key, int) else str(key)
            progress.update(overall, description=f"{label}: {title}")
            progress.update(sub, visible=False, completed=0)

        def on_done(result: paper_figures.FigureResult) -> None:
            progress.advance(overall)
            label = f"figure {result.number}" if isinstance(result.number, int) else str(result.number)
            console.print(f"[green]done[/green] {label} ({result.seconds:.1f} s): "
                          + ", ".join(p.name for p in result.paths))
            results.append(result)

        ctx = paper_figures.Context(quick=args.quick, runs_dir=runs_dir, report=lambda m: console.print(f"  {m}"),
                                    advance=advance)
        paper_figures.make_figures(out, numbers, table, ctx, on_start=on_start, on_done=on_done)
    summary = Table(title=f"sspo figures -> {out}/ ({time.perf_counter() - t_start:.0f} s)")
    summary.add_column("item")
    summary.add_column("seconds", justify="right")
    summary.add_column("files", justify="right")
    for r in results:
        summary.add_row(f"figure {r.number}: {r.title}" if isinstance(r.number, int) else r.title,
                        f"{r.seconds:.1f}", str(len(r.paths)))
    console.print(summary)
    return 0
