"""What the ``sspo`` sub-commands share: list parsing, the objective-parameter flags, the config flags, CSV output.

Every area's ``cli.py`` imports these from here, so that no area's command line
imports another's. Parsing helpers raise ``ValueError`` naming the flag; ``sspo``
turns that into one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

OBJECTIVE_FLAGS = ("gate", "tau", "tau_pos", "tau_neg", "eps", "eps_lo", "eps_hi", "eps_max", "one_sided")
"""The objective parameters :func:`add_objective_flags` adds, as ``argparse`` destinations."""
ALIASES = {"tau": "tau_pos", "eps": "eps_lo"}
"""Flags that set a pair of parameters (``--tau``: ``tau_pos`` and ``tau_neg``), by the parameter that marks support."""


def float_list(text: str, name: str) -> list[float]:
    """``"0.1,0.3"`` or ``"lo:hi:n"`` (``n`` log-spaced values) as floats; ValueError naming ``name``."""
    import numpy as np

    try:
        if ":" in text:
            lo, hi, n = text.split(":")
            if int(n) < 1 or float(lo) <= 0 or float(hi) <= 0:
                raise ValueError
            return [float(v) for v in np.geomspace(float(lo), float(hi), int(n))]
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated numbers or lo:hi:n (log-spaced, lo, hi > 0), "
                         f"got {text!r}") from None


def one_float(text: str | None, name: str) -> float | None:
    """``None``, or the single number of ``text`` (a list is an error naming ``name``)."""
    if text is None:
        return None
    values = float_list(text, name)
    if len(values) != 1:
        raise ValueError(f"{name}: expected one number (lists need --grid), got {text!r}")
    return values[0]


def int_list(text: str, name: str) -> list[int]:
    """``"1,16,256"`` as ints; ValueError naming ``name``."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated integers, got {text!r}") from None


def str_list(text: str) -> list[str]:
    """``"a, b,,c"`` -> ``["a", "b", "c"]``."""
    return [v.strip() for v in text.split(",") if v.strip()]


def add_objective_flags(p: argparse.ArgumentParser, lists: bool = False) -> None:
    """The objective-parameter flags shared by ``sspo theory`` and ``sspo simulate``."""
    many = " (comma-separated list with --grid)" if lists else ""
    p.add_argument("--gate", "--gates", dest="gate", help=f"gate family of sapo / sspo{many}")
    p.add_argument("--tau", "--taus", dest="tau", help=f"temperature, sets tau_pos and tau_neg{many}")
    p.add_argument("--tau-pos", type=float, help="temperature for A > 0")
    p.add_argument("--tau-neg", type=float, help="temperature for A < 0")
    p.add_argument("--eps", help=f"clip width, sets eps_lo and eps_hi{many}")
    p.add_argument("--eps-lo", type=float, help="lower clip width")
    p.add_argument("--eps-hi", type=float, help="upper clip width")
    p.add_argument("--eps-max", type=float, help="cispo's truncation of the ratio")
    p.add_argument("--one-sided", action="store_true", default=None,
                   help="sspo: gate only the side sign(A) makes dangerous")


def objective_params(name: str, args: argparse.Namespace, strict: bool) -> dict[str, Any]:
    """The objective parameters given on the command line (:func:`add_objective_flags`) that ``name`` takes.

    With ``strict`` a parameter the objective does not take is an error (one
    objective); otherwise it is skipped (a list of objectives).
    """
    from sspo_analysis.objectives import all_objective_names, get_spec

    defaults = get_spec(name, include_references=True).defaults if name in all_objective_names() else {}
    given = {key: getattr(args, key) for key in OBJECTIVE_FLAGS}
    given["tau"] = one_float(args.tau, "--tau")
    given["eps"] = one_float(args.eps, "--eps")
    out: dict[str, Any] = {}
    for key, value in given.items():
        if value is None:
            continue
        if ALIASES.get(key, key) in defaults:
            out[key] = value
        elif strict:
            flags = sorted({*defaults, *(k for k, v in ALIASES.items() if v in defaults)})
            allowed = ", ".join("--" + k.replace("_", "-") for k in flags) or "(none)"
            raise ValueError(f"--{key.replace('_', '-')}: objective {name!r} has no such parameter; allowed: {allowed}")
    return out


def add_config_args(p: argparse.ArgumentParser) -> None:
    """``--config``, ``--set KEY=VALUE`` (repeatable) and ``--no-progress``: the trainer commands' flags."""
    p.add_argument("--config", default=None,
                   help="TOML config (default: the built-in defaults, shipped as sspo_analysis/configs/default.toml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set objective.name=sspo --set objective.tau_pos=2 (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def progress_over(items: list[Any], label: str, enabled: bool = True):
    """Yield ``items`` while a progress bar on stderr counts them (``--no-progress``: plain iteration)."""
    if not enabled:
        yield from items
        return
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=len(items), info="")
        for item in items:
            bar.update(task, info=str(item[0] if isinstance(item, tuple) else item))
            yield item
            bar.advance(task)


def write_csv(frame: Any, path: str | Path | None) -> None:
    """Write a DataFrame to ``path`` atomically (nothing if ``path`` is empty) and say so on stderr."""
    from sspo_analysis.io import atomic_path

    if path:
        with atomic_path(path) as tmp:
            frame.to_csv(tmp, index=False)
        print(f"wrote {len(frame)} rows to {path}", file=sys.stderr)
