"""``sspo check gate|objective``: run the property kit from the command line (exit 1 on a failure).

Usable in a user's CI::

    sspo check gate mymod:mygate --tau 0.5,1,4
    sspo check objective sspo --set gate=mymod:mygate --set agg=token-mean
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``sspo check``."""
    p = sub.add_parser("check", help="property-test a gate or an objective (exit 1 if a property fails)",
                       description="Run the package's property battery on a gate or an objective; print the "
                                   "report; exit 0 when every property holds, 1 otherwise.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    g = kinds.add_parser("gate", help="a registered gate or an import path package.module:function")
    g.add_argument("name", help="gate name or import path package.module:function (the gate's value)")
    g.add_argument("--tau", "--taus", dest="tau", default="0.5,1,4",
                   help="comma-separated temperatures (default 0.5,1,4)")
    g.add_argument("--eps", type=float, default=0.2, help="clip width of a clip gate (default 0.2)")
    g.add_argument("--examples", type=int, default=100, help="hypothesis examples per property (default 100)")
    g.set_defaults(func=run_gate)
    o = kinds.add_parser("objective", help="a registered objective, with parameters")
    o.add_argument("name", help="objective name")
    o.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter (gate, tau, tau_pos, eps, ..., agg, horizon); VALUE is JSON or a plain string")
    o.add_argument("--examples", type=int, default=100, help="hypothesis examples per property (default 100)")
    o.set_defaults(func=run_objective)


def parse_sets(items: list[str]) -> dict[str, Any]:
    """``["tau=2", "gate=erf"]`` -> ``{"tau": 2, "gate": "erf"}`` (JSON values, else strings)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return out


def _examples(n: int) -> int:
    if n < 1:
        raise ValueError(f"--examples: must be an integer >= 1, got {n}")
    return n


def _print(report: Any) -> int:
    from rich.console import Console
    from rich.markup import escape

    console = Console()
    console.print(report.table())
    for name in report.failures:
        result = report[name]
        console.print(f"FAILED {name}: {escape(result.counterexample or result.detail)}", highlight=False)
    return 0 if report.ok else 1


def run_gate(args: argparse.Namespace) -> int:
    """Entry point of ``sspo check gate``."""
    from sspo_analysis.testing import check_gate

    try:
        taus = [float(v) for v in args.tau.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--tau: expected comma-separated numbers > 0, got {args.tau!r}") from None
    return _print(check_gate(args.name, taus, eps=args.eps, max_examples=_examples(args.examples)))


def run_objective(args: argparse.Namespace) -> int:
    """Entry point of ``sspo check objective``."""
    from sspo_analysis.testing import check_objective

    params = parse_sets(args.set)
    return _print(check_objective(args.name, max_examples=_examples(args.examples), **params))
