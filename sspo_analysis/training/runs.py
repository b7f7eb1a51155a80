"""A run directory's lifecycle: who owns it (a lock file), and which config changes a resume or a reuse may make.

Ownership. :func:`run_lock` holds ``RUN/.lock`` (``{"pid", "host"}``) while one process
writes the run; a second writer fails at once with :class:`RunBusyError` naming the
directory and the owner. The lock is made atomically (a complete temporary file
hard-linked to the lock name, so no reader ever sees it half-written), removed on exit,
and a lock whose process on this host is dead (``kill -9``) is taken over with a warning.

Resumes and reuse. :func:`config_changes` lists the fields in which two configs differ;
:func:`refused_changes` the ones that would change what the run *means* (everything but
:data:`HONOURED_FIELDS`, the log settings and ``steps`` under a constant schedule).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

MIN_FREE_BYTES = 256 * 2**20
"""Below this free space an output directory gets a warning (a tiny-preset checkpoint is a few MB, a 0.5B model's
several GB: the warning is a floor, not a guarantee)."""
LOCK_NAME = ".lock"
"""The lock file inside a run directory."""
HONOURED_FIELDS = frozenset({"threads", "warm_start.dir", "optim.token_budget", "optim.logprob_chunk", "model.lean"})
"""Fields a resume or a reused run may change without changing the run's meaning (speed and memory only),
besides every ``log.*`` field and ``steps`` (see :func:`refused_changes`)."""


class RunBusyError(ValueError):
    """Another live process owns the run directory (a ValueError: the CLI prints it as one line)."""


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _read_owner(lock: Path) -> dict[str, Any] | None:
    """The lock's ``{"pid", "host"}``, or None when it vanished or is unreadable."""
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _try_create(lock: Path, me: dict[str, Any]) -> bool:
    """Create ``lock`` holding ``me`` atomically; False if it already exists."""
    tmp = lock.with_name(f"{LOCK_NAME}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(me))
    try:
        os.link(tmp, lock)
        return True
    except FileExistsError:
        return False
    finally:
        tmp.unlink(missing_ok=True)


def acquire(run: str | os.PathLike) -> Path:
    """Take ``RUN/.lock`` for this process (creating ``run``); :class:`RunBusyError` if a live process owns it."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    lock = run / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(3):  # a stale lock removed by us (or a racing taker) needs another try
        if _try_create(lock, me):
            return lock
        owner = _read_owner(lock)
        if owner is None:
            raise RunBusyError(f"run {str(run)!r}: lock file {str(lock)!r} exists but is unreadable; "
                               "delete it if no process is writing this run")
        if owner.get("host") != me["host"] or pid_alive(owner["pid"]):
            raise RunBusyError(f"run {str(run)!r} is being written by process {owner['pid']} on "
                               f"{owner.get('host')!r}; wait for it or use another directory")
        warnings.warn(f"run {str(run)!r}: taking over the stale lock of dead process {owner['pid']}", stacklevel=2)
        lock.unlink(missing_ok=True)
    raise RunBusyError(f"run {str(run)!r}: could not take the lock {str(lock)!r}")


def release(lock: Path) -> None:
    """Remove ``lock`` if this process still owns it."""
    owner = _read_owner(lock)
    if owner is not None and owner["pid"] == os.getpid():
        lock.unlink(missing_ok=True)


@contextlib.contextmanager
def run_lock(run: str | os.PathLike) -> Iterator[Path]:
    """Own ``run`` for the duration of the ``with`` block (see :func:`acquire`); a directory the lock had to create
    is removed again if nothing was written to it (a run refused before any work leaves no trace)."""
    created = not Path(run).exists()
    lock = acquire(run)
    try:
        yield lock
    finally:
        release(lock)
        if created:
            with contextlib.suppress(OSError):
                Path(run).rmdir()  # only when empty


def check_output_dir(path: str | os.PathLike, what: str = "out") -> Path:
    """``path`` if a directory can be made or written there; else ValueError naming ``what`` and why.

    Checked before any model is loaded: a regular file in the way, a pseudo file system
    (``/proc``, ``/sys``), or a directory this process may not write.
    """
    path = Path(path)
    resolved = path.resolve()
    if resolved.parts[:2] in (("/", "proc"), ("/", "sys"), ("/", "dev")):
        raise ValueError(f"{what}: {str(path)!r} is on a pseudo file system; choose a normal directory")
    existing = resolved
    while not existing.exists():
        existing = existing.parent
    if existing != resolved and not existing.is_dir():
        raise ValueError(f"{what}: {str(path)!r} cannot be created: {str(existing)!r} is a file")
    if not existing.is_dir():
        raise ValueError(f"{what}: {str(path)!r} is a file, expected a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{what}: {str(existing)!r} is not writable")
    free = shutil.disk_usage(existing).free
    if free < MIN_FREE_BYTES:
        warnings.warn(f"{what}: only {free / 2**20:.0f} MiB free under {str(existing)!r}; checkpoints may not fit",
                      UserWarning, stacklevel=2)
    return path


def flat_config(cfg: Any) -> dict[str, Any]:
    """A ``TrainConfig`` as ``{"section.field": value}`` (top-level fields keep their names)."""
    out = {}
    for section, value in cfg.to_dict().items():
        if isinstance(value, dict):
            out.update({f"{section}.{k}": v for k, v in value.items()})
        else:
            out[section] = value
    return out


def config_changes(old: Any, new: Any) -> list[str]:
    """The fields (``section.field``) whose values differ between two configs, sorted."""
    a, b = flat_config(old), flat_config(new)
    return sorted(k for k in a.keys() | b.keys() if a.get(k, _MISSING) != b.get(k, _MISSING))


_MISSING = object()


def is_honoured(key: str) -> bool:
    """Whether a change of ``key`` (``section.field``) leaves the run's meaning alone (speed, memory, logging)."""
    return key in HONOURED_FIELDS or key.startswith("log.")


def refused_changes(old: Any, new: Any, done_steps: int) -> list[str]:
    """The changes from ``old`` to ``new`` a resume cannot honour, each with why (empty: all honoured).

    ``steps`` may grow, or shrink down to the steps already done, when the LR schedule
    does not depend on the total (``optim.schedule = "constant"``): the continued run is then
    the run a straight start with the new ``steps`` would give. Under ``linear`` or ``cosine``
    the schedule is a function of the total, so a new total would rewrite the past: refused.
    """
    refused = []
    for key in config_changes(old, new):
        if is_honoured(key):
            continue
        if key == "steps":
            if new.optim.schedule != "constant":
                refused.append(f"steps (optim.schedule = {new.optim.schedule!r} depends on the total steps)")
            elif new.steps < done_steps:
                refused.append(f"steps ({done_steps} already done)")
            continue
        refused.append(key)
    return refused


def recorded_config(run: str | os.PathLike, overrides=()) -> Any:
    """The config recorded in ``RUN/config.toml``, with ``overrides`` on top.

    The trainer records every field. A record without ``model.kernels`` was made before that
    field existed, with what is now ``"exact"``, so it reads as ``"exact"`` (the default, ``"fast"``,
    would silently change how a resumed run computes and misdescribe its first part).
    """
    from sspo_analysis.training.config import load_config, tomllib

    path = Path(run) / "config.toml"
    try:
        model = tomllib.loads(path.read_text()).get("model", {})
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        model = {}  # load_config names the problem
    before = [] if "kernels" in model else ['model.kernels="exact"']
    return load_config(path, before + list(overrides))


def is_file_error(err: BaseException) -> bool:
    """Whether ``err`` is a file-system error a user can fix (disk full, read-only, permissions, missing path)."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM,
                                                     errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EDQUOT)
