"""The ``sspo`` command line: one sub-command per area of the package.

Each area registers its own sub-commands with ``register(subparsers)``; this
file only lists the areas, imported lazily so that ``sspo gates`` does not pay
for transformers.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# area module -> the sub-commands it registers
AREAS: dict[str, tuple[str, ...]] = {
    "sspo_analysis.plotting.gates_cli": ("gates",),
    "sspo_analysis.theory.cli": ("theory",),
    "sspo_analysis.simulation.cli": ("simulate",),
    "sspo_analysis.training.cli": ("pretrain", "train", "sweep", "plot"),
    "sspo_analysis.figures_cli": ("figures",),
    "sspo_analysis.check_cli": ("check",),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sspo", description="Soft versus hard clipping in LLM policy optimisation.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in AREAS:
        importlib.import_module(module).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"sspo {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
