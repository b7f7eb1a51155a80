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
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
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
DISTRIBUTION = "sspo-analysis"
"""This package's distribution name, whose metadata lists the extras (:func:`missing_extra`)."""
OWN_PACKAGES = ("sspo_analysis", "paper_figures")
"""The packages whose warnings are this command's own (:func:`own_warnings_one_line`), installed side by side."""
_PACKAGES_DIR = Path(__file__).resolve().parent.parent
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


def _quiet_transformers() -> None:
    """``--no-progress`` silences transformers' own bars too (loading and saving weights)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _is_own_warning(filename: str) -> bool:
    """Whether a warning is this package's: attributed to ``sspo_analysis`` or ``paper_figures`` code."""
    path = Path(filename).resolve()
    return any(path.is_relative_to(_PACKAGES_DIR / name) for name in OWN_PACKAGES)


def own_warnings_one_line(others: Callable[..., None]) -> Callable[..., None]:
    """A ``warnings.showwarning`` that prints the package's own warnings as one line (``sspo: warning: ...``)
    and hands every other library's to ``others``, so they read as that library's."""

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if not _is_own_warning(filename):
            others(message, category, filename, lineno, file, line)
            return
        try:
            (file or sys.stderr).write(f"sspo: warning: {message}\n")
        except OSError:  # no stderr (a closed pipe): a warning is not worth a crash
            pass

    return show


def missing_extra(err: ImportError) -> str | None:
    """One line naming the extra that installs the optional module ``err`` lacks; None if it is not an extra's.

    The extras are read from the installed metadata (``pyproject.toml``'s optional dependencies), so this stays
    true as they change; the message follows the chain of ``err`` (a library's own ImportError about the module).
    """
    name = next((e.name for e in _chain(err) if isinstance(e, ModuleNotFoundError) and e.name), None)
    if name is None:
        return None
    top = name.split(".")[0]
    extras = sorted(_extras_providing(top))
    if not extras:
        return None
    names = " or ".join(f"[{e}]" for e in extras)
    return f"needs {top}, which the {names} extra installs: pip install -e '.[{extras[0]}]' (or pip install {top})"


def _chain(err: BaseException) -> list[BaseException]:
    """``err`` and the exceptions it was raised from or while handling."""
    out: list[BaseException] = []
    while err is not None and err not in out:
        out.append(err)
        err = err.__cause__ or err.__context__
    return out


def _extras_providing(module: str) -> set[str]:
    """The extras of this distribution whose requirements include ``module`` (``math_verify``: ``math-verify``)."""
    import re
    from importlib.metadata import PackageNotFoundError, requires

    try:
        reqs = requires(DISTRIBUTION) or []
    except PackageNotFoundError:
        return set()
    found = set()
    for req in reqs:
        dist = re.split(r"[\s<>=!~;\[(]", req, maxsplit=1)[0]
        extra = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        if extra and re.sub(r"[-_.]+", "_", dist).lower() == module.lower():
            found.add(extra.group(1))
    return found


def run_args(args: argparse.Namespace) -> int:
    """Run the parsed command ``args.func``: a ``ValueError``, or an optional dependency that is not installed,
    becomes one line on stderr and status 2; the package's own warnings print as one line while it runs."""
    if getattr(args, "no_progress", False):
        _quiet_transformers()
    others = warnings.showwarning
    with warnings.catch_warnings():  # restores showwarning afterwards: a caller of run_args keeps its own
        warnings.showwarning = own_warnings_one_line(others)
        try:
            return int(args.func(args) or 0)
        except ValueError as err:  # bad input: one clear line, no traceback
            print(f"sspo {args.command}: error: {err}", file=sys.stderr)
            return 2
        except ImportError as err:
            line = missing_extra(err)
            if line is None:
                raise
            print(f"sspo {args.command}: error: {line}", file=sys.stderr)
            return 2


def _extension_parser(entry: Any) -> argparse.ArgumentParser:
    """A parser with the extension's own sub-command, registered by loading (importing) it now."""
    parser = argparse.ArgumentParser(prog="sspo")
    entry.load()(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return parser


def own_process() -> None:
    """Process setup of the ``sspo`` command (the library never does this): a non-interactive matplotlib backend,
    unless the user chose one (``MPLBACKEND``); set before matplotlib is imported, and inherited by job processes."""
    os.environ.setdefault("MPLBACKEND", "Agg")


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``sspo``."""
    own_process()
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
