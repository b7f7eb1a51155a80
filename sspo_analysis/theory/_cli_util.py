"""Command-line helpers shared by ``sspo theory`` and ``sspo simulate``: list parsing and the objective flags.

Both commands take an objective's parameters as the same flags (``--gate``,
``--tau``, ``--eps``, ...); this module owns them, so that neither command's
module imports the other's.
"""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_objective_flags", "float_list", "int_list", "objective_params", "str_list"]


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


def int_list(text: str, name: str) -> list[int]:
    """``"1,16,256"`` as ints; ValueError naming ``name``."""
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{name}: expected comma-separated integers, got {text!r}") from None


def str_list(text: str) -> list[str]:
    """``"a, b,,c"`` as ``["a", "b", "c"]``."""
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
    """The objective parameters given on the command line that ``name`` takes.

    With ``strict`` a parameter the objective does not take is an error (one
    objective); otherwise it is skipped (a list of objectives).
    """
    from sspo_analysis.objectives import all_objective_names, get_spec

    defaults = get_spec(name, include_references=True).defaults if name in all_objective_names() else {}
    given = {
        "gate": args.gate, "tau": _one_float(args.tau, "--tau"), "tau_pos": args.tau_pos, "tau_neg": args.tau_neg,
        "eps": _one_float(args.eps, "--eps"), "eps_lo": args.eps_lo, "eps_hi": args.eps_hi,
        "eps_max": args.eps_max, "one_sided": args.one_sided,
    }
    takes = {"tau": "tau_pos", "eps": "eps_lo"}
    out: dict[str, Any] = {}
    for key, value in given.items():
        if value is None:
            continue
        if takes.get(key, key) in defaults:
            out[key] = value
        elif strict:
            flags = sorted({*defaults, *(k for k, v in takes.items() if v in defaults)})
            allowed = ", ".join("--" + k.replace("_", "-") for k in flags) or "(none)"
            raise ValueError(f"--{key.replace('_', '-')}: objective {name!r} has no such parameter; allowed: {allowed}")
    return out


def _one_float(text: str | None, name: str) -> float | None:
    if text is None:
        return None
    values = float_list(text, name)
    if len(values) != 1:
        raise ValueError(f"{name}: expected one number (lists need --grid), got {text!r}")
    return values[0]
