"""``sspo config show``: the resolved trainer config as TOML, each field followed by its allowed values.

The allowed values are not restated here: they are read from :meth:`TrainConfig.validate`
itself, by giving one field at a time a value no field accepts and keeping what the
error says about it (``must be an integer >= 1``, ``allowed values: cpu, cuda, auto``).
So the comments cannot drift from the checks.
"""

from __future__ import annotations

import copy
import math
import re
from typing import Any

from sspo_analysis.training.config import TrainConfig

_PROBES: dict[type, Any] = {bool: "not-a-bool", int: math.nan, float: math.nan, str: "\x00?", list: ["\x00?"]}


def _probe_message(cfg: TrainConfig, section: str | None, name: str) -> str | None:
    """What ``validate`` says about field ``section.name`` holding an impossible value; None if it accepts it."""
    probe = copy.deepcopy(cfg)
    target = getattr(probe, section) if section else probe
    in_params = section == "objective" and name in probe.objective.params
    current = probe.objective.params[name] if in_params else getattr(target, name)
    bad = _PROBES.get(type(current), "\x00?")
    if in_params:
        probe.objective.params[name] = bad
    else:
        setattr(target, name, bad)
    try:
        probe.validate()
    except (ValueError, TypeError) as err:
        return str(err)
    return None


def allowed_text(cfg: TrainConfig, section: str | None, name: str) -> str:
    """The allowed values of one field, from ``validate``'s own error message ('' if any value passes)."""
    message = _probe_message(cfg, section, name)
    key = f"{section}.{name}" if section else name
    if message is None or not re.match(rf"^({re.escape(key)}|{re.escape(name)}|{section})\b", message):
        return ""  # accepted, or the check that failed is about another field
    if "allowed values:" in message:
        return "allowed values:" + message.split("allowed values:", 1)[1]
    after = re.search(rf"\b{re.escape(name)}[: ]", message)
    text = message[after.end():] if after else ""
    return re.sub(r",? got .*$", "", text).strip(" :")


def annotated_toml(cfg: TrainConfig) -> str:
    """The resolved config as TOML, ``# ...`` after every restricted field saying what it allows.

    The ``[objective]`` table lists the parameters the objective reads, the defaults included.
    """
    from sspo_analysis.objectives import read_parameters

    cfg = copy.deepcopy(cfg)
    params = cfg.build_objective().params
    cfg.objective.params = {k: params[k] for k in read_parameters(cfg.objective.name, params)}  # reloads as it is
    lines, section = [], None
    for line in cfg.to_toml().splitlines():
        header = re.fullmatch(r"\[(\w+)\]", line.strip())
        if header:
            section = header.group(1)
        field = re.match(r"^(\w+) = ", line)
        note = allowed_text(cfg, section, field.group(1)) if field else ""
        lines.append(f"{line}  # {note}" if note else line)
    return "\n".join(lines) + "\n"
