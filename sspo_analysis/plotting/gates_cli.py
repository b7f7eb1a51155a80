"""``sspo gates``: plot every registered gate family and print the admissibility table."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "gates", help="plot every gate family (value, weight; ratio and log space) and check admissibility"
    )
    p.add_argument("--out", default="figures", help="output directory (default: figures/)")
    p.add_argument("--tau", type=float, default=1.0, help="soft-gate temperature (default 1.0)")
    p.add_argument("--eps", type=float, default=0.2, help="hard-clip half-width (default 0.2)")
    p.add_argument("--gate", action="append", default=[], metavar="NAME",
                   help="also draw this gate: an import path package.module:function (repeatable)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from sspo_analysis.gates import resolve_gate_name
    from sspo_analysis.plotting.gates import admissibility_table, plot_gates

    if not args.tau > 0:
        raise ValueError(f"--tau: must be > 0, got {args.tau}")
    if not args.eps > 0:
        raise ValueError(f"--eps: must be > 0, got {args.eps}")
    for name in args.gate:  # registers an import path, so the registry's tables and figure include it
        resolve_gate_name(name)
    console = Console()
    with console.status("checking admissibility and plotting gates"):
        rows = admissibility_table(args.tau, args.eps)
        paths = plot_gates(args.out, args.tau, args.eps)
    table = Table(title=f"Gate admissibility (tau={args.tau:g}, hard-clip eps={args.eps:g})")
    for col in rows[0]:
        table.add_column(col)
    for row in rows:
        table.add_row(*(("yes" if v else "NO") if isinstance(v, bool) else str(v) for v in row.values()))
    console.print(table)
    for path in paths:
        console.print(f"wrote {path}")
    return 0
