"""The ``sspo`` command line: one sub-command per area of the package, plus installed extensions.

Each area registers its own sub-commands with ``register(subparsers)``; this
file only lists the areas, imported lazily so that ``sspo gates`` does not pay
for transformers. Helpers the areas share live in :mod:`sspo_analysis.cli_common`.

Extensions. Another package adds a command through the entry-point group
``sspo_analysis.commands`` (``name = "module:register"``, where ``register(sub)``
adds the sub-command ``name`` as an area does); this repository's
``paper_figures`` adds ``sspo figures`` that way (see ``pyproject.toml``). The
library never imports an extension to build its parser: :func:`build_parser`
lists each extension by its name, read from the installed metadata only, and
:func:`main` imports the extension's module when, and only when, its command is
the one being run (``sspo figures ...``, ``sspo figures --help`` included). So
importing this module, :func:`build_parser`, ``sspo --help`` and every area's
command leave ``paper_figures`` unimported, and the dependency points one way:
``paper_figures`` uses the library, never the reverse. An area's command wins
over an extension of the same name.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings
from typing import Any

# area module -> the sub-commands it registers
AREAS: dict[str, tuple[str, ...]] = {
    "sspo_analysis.plotting.gates_cli": ("gates",),
    "sspo_analysis.theory.cli": ("theory",),
    "sspo_analysis.simulation.cli": ("simulate",),
    "sspo_analysis.training.cli": ("pretrain", "train", "sweep", "config", "export", "plot"),
    "sspo_analysis.check_cli": ("check",),
    "sspo_analysis.study.cli": ("study",),
}
EXTENSION_GROUP = "sspo_analysis.commands"
"""The entry-point group through which installed packages add ``sspo`` sub-commands."""


def extension_commands() -> dict[str, Any]:
    """The installed extensions, ``{command name: importlib.metadata.EntryPoint}``; nothing is imported."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=EXTENSION_GROUP)}


def build_parser() -> argparse.ArgumentParser:
    """The ``sspo`` parser: every area's sub-commands, and a placeholder per extension (see the module docstring)."""
    from sspo_analysis import __version__

    parser = argparse.ArgumentParser(prog="sspo", description="Soft versus hard clipping in LLM policy optimisation.")
    parser.add_argument("--version", action="version", version=f"sspo {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in AREAS:
        importlib.import_module(module).register(sub)
    for name, entry in extension_commands().items():
        if name in sub.choices:
            continue
        # add_help=False: "sspo NAME --help" is answered by the extension's own parser, once it is loaded.
        p = sub.add_parser(name, add_help=False, help=f"extension ({entry.value}); sspo {name} --help for its options")
        p.set_defaults(extension=entry)
    return parser


def run_command(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse ``argv`` with ``parser`` and run the chosen command (:func:`run_args`)."""
    return run_args(parser.parse_args(argv))


def _one_line_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                      line: str | None = None) -> str:
    """A warning as one line (no source file, no code line): what a CLI user needs is the message."""
    return f"sspo: warning: {message}\n"


def _quiet_transformers() -> None:
    """``--no-progress`` silences transformers' own bars too (loading and saving weights)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def run_args(args: argparse.Namespace) -> int:
    """Run the parsed command ``args.func``; a ``ValueError`` becomes one line on stderr and status 2."""
    warnings.formatwarning = _one_line_warning
    if getattr(args, "no_progress", False):
        _quiet_transformers()
    try:
        return int(args.func(args) or 0)
    except ValueError as err:  # bad input: one clear line, no traceback
        print(f"sspo {args.command}: error: {err}", file=sys.stderr)
        return 2


def _extension_parser(entry: Any) -> argparse.ArgumentParser:
    """A parser with the extension's own sub-command, registered by loading (importing) it now."""
    parser = argparse.ArgumentParser(prog="sspo")
    entry.load()(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sspo``."""
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    entry = getattr(args, "extension", None)
    if entry is not None:
        return run_command(_extension_parser(entry), [args.command, *rest])
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return run_args(args)


if __name__ == "__main__":
    sys.exit(main())
