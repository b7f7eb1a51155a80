"""Atomic file output: a reader never sees a half-written result."""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success it replaces ``target``.

    On an exception the temporary file is removed and ``target`` is untouched. ``tmp``: the
    temporary path to use, for a writer that owns the directory and must know by name what a
    killed write leaves (default: a fresh unique name).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    if tmp is None:
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp creates 0600; give the result the usual permissions (umask).
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp_path, 0o666 & ~umask)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(target: str | os.PathLike, text: str, tmp: str | os.PathLike | None = None) -> Path:
    """Write ``text`` to ``target`` atomically (through ``tmp``: see :func:`atomic_path`)."""
    with atomic_path(target, tmp) as path:
        path.write_text(text)
    return Path(target)


def write_frame(frame: Any, target: str | os.PathLike) -> Path:
    """Write a pandas DataFrame to ``target`` as CSV (no index, 6 significant digits), atomically."""
    with atomic_path(target) as tmp:
        frame.to_csv(tmp, index=False, float_format="%.6g")
    return Path(target)


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, inf) replaced by ``None``, through dicts, lists and tuples:
    what JSON can hold (``json.dumps`` would write ``NaN``, which is not JSON)."""
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return None if isinstance(value, float) and not math.isfinite(value) else value


def write_json(target: str | os.PathLike, obj: Any, tmp: str | os.PathLike | None = None) -> Path:
    """Write ``obj`` as indented JSON to ``target`` atomically (non-finite floats as ``null``; ``tmp``: see
    :func:`atomic_path`)."""
    return write_text(target, json.dumps(json_safe(obj), indent=2, sort_keys=True, allow_nan=False) + "\n", tmp)
