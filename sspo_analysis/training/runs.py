"""A run directory's lifecycle: who owns it (a lock file), and which config changes a resume or a reuse may make.

Ownership. :func:`run_lock` holds an exclusive ``flock`` on ``RUN/.lock`` while one process
writes the run; a second writer fails at once with :class:`RunBusyError` naming the
directory and the owner (the file records ``{"pid", "host"}``). The kernel releases the
lock when its process dies, so a lock left by ``kill -9`` is taken over (with a warning)
by exactly one of any number of takers. The trainer's temporary files have fixed names
(:func:`temp_path`) and :func:`remove_leftovers` removes them by those names only.

Resumes and reuse. :func:`config_changes` lists the fields in which two configs differ;
:func:`refused_changes` the ones that would change what the run *means* (everything but
:data:`HONOURED_FIELDS`, the log settings and ``steps`` under a constant schedule); :func:`claim_run` decides,
under the lock, whether a new run or a resume may go on.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sspo_analysis.io import atomic_path

MIN_FREE_BYTES = 256 * 2**20
"""Below this free space an output directory gets a warning (a tiny-preset checkpoint is a few MB, a 0.5B model's
several GB: the warning is a floor, not a guarantee)."""
LOCK_NAME = ".lock"
"""The lock file inside a run directory."""
TEMP_SUFFIX = ".sspo.tmp"
"""The suffix of the trainer's temporary files (see :func:`temp_path`)."""
RUN_FILES = ("config.toml", "metrics.jsonl", "DONE", "DIVERGED", "final", "checkpoint/state.pt", "warm_start.json")
"""The files (and the ``final`` directory) the trainer writes in a run directory through :func:`temp_path`,
besides ``log_ratios/step_NNNNNN.npz``."""
_LOG_RATIO_FILE = re.compile(r"step_\d{6,}\.npz")
_EVENTS_FILE = re.compile(r"events\.out\.tfevents\..+")
_LOG_RATIO_TEMP = re.compile(r"\.step_\d{6,}\.npz" + re.escape(TEMP_SUFFIX))
HONOURED_FIELDS = frozenset({"threads", "warm_start.dir", "optim.token_budget", "optim.logprob_chunk", "model.lean"})
"""Fields a resume or a reused run may change without changing the run's meaning (speed and memory only),
besides every ``log.*`` field and ``steps`` (see :func:`refused_changes`)."""


class RunBusyError(ValueError):
    """Another live process owns the run directory (a ValueError: the CLI prints it as one line)."""


class RunInterrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (SIGINT) after ``step`` complete steps of ``run``; its message says how to go on
    (a resume continues from the last checkpoint and gives the same run)."""

    def __init__(self, run: Path, step: int, resumable: bool) -> None:
        how = f"resume with sspo train --resume {run}" if resumable else "nothing to resume; start it again"
        super().__init__(f"stopped at step {step}; {how}")
        self.run, self.step = run, step


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
    """The lock's ``{"pid", "host"}``, or None when it vanished, is empty or is unreadable."""
    try:
        owner = json.loads(lock.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) and isinstance(owner.get("pid"), int) else None


def _open_locked(lock: Path) -> int | None:
    """A descriptor holding the exclusive ``flock`` of the file at ``lock`` (created if missing), or None when
    another open file holds it. The lock is the kernel's, so a killed owner's is released with its process: there
    is no stale owner to judge, hence no race between two takers."""
    for _ in range(100):
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if _is_file_of(fd, lock):
            return fd
        os.close(fd)  # the owner removed the file between our open and our lock: lock the current one
    return None


def _is_file_of(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd``."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


def _busy(run: Path, lock: Path) -> RunBusyError:
    """The error for a run another process owns, naming the owner when its record can be read."""
    owner = _read_owner(lock)
    if owner is None or (owner.get("host") == socket.gethostname() and not pid_alive(owner["pid"])):
        who = "another process (it holds the lock and has not recorded itself yet)"
    else:
        who = f"process {owner['pid']} on {owner.get('host')!r}"
    return RunBusyError(f"run {str(run)!r} is being written by {who}; wait for it or use another directory")


def acquire(run: str | os.PathLike) -> tuple[Path, int]:
    """Take ``RUN/.lock`` for this process (creating ``run``): ``(lock path, descriptor)``, held until
    :func:`release` or the process's end; :class:`RunBusyError` at once if another open file holds it."""
    run = Path(run)
    run.mkdir(parents=True, exist_ok=True)
    lock = run / LOCK_NAME
    fd = _open_locked(lock)
    if fd is None:
        raise _busy(run, lock)
    previous = _read_owner(lock)  # a record left behind: its process died without releasing (kill -9)
    if previous is not None:
        warnings.warn(f"run {str(run)!r}: taking over the stale lock of dead process {previous['pid']}",
                      stacklevel=3)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
    return lock, fd


def release(lock: Path, fd: int) -> None:
    """Remove ``lock`` (while still holding it: a process that opened it meanwhile sees it gone and retries),
    then let go of it."""
    try:
        if _is_file_of(fd, lock):
            lock.unlink()
    finally:
        os.close(fd)


@contextlib.contextmanager
def run_lock(run: str | os.PathLike) -> Iterator[Path]:
    """Own ``run`` for the duration of the ``with`` block (see :func:`acquire`); a directory the lock had to create
    is removed again if nothing was written to it (a run refused before any work leaves no trace)."""
    created = not Path(run).exists()
    lock, fd = acquire(run)
    try:
        yield lock
    finally:
        release(lock, fd)
        if created:
            with contextlib.suppress(OSError):
                Path(run).rmdir()  # only when empty


def temp_path(target: Path) -> Path:
    """The one temporary path the trainer writes ``target`` through before renaming it into place. It is fixed
    (the run's lock allows one writer), so what a killed write leaves is known by its exact name."""
    return target.with_name(f".{target.name}{TEMP_SUFFIX}")


def remove_leftovers(run: Path) -> None:
    """Remove the temporary files a killed writer of ``run`` can leave, each by its exact name (the
    :func:`temp_path` of :data:`RUN_FILES` and of the log-ratio files); nothing else under ``run`` is touched."""
    _remove([temp_path(run / name) for name in RUN_FILES] + _matching(run / "log_ratios", _LOG_RATIO_TEMP))


def clear_run(run: Path) -> None:
    """Remove what the trainer wrote in ``run`` (so that it can start afresh), each by its exact name:
    :data:`RUN_FILES`, ``FAILED``, ``samples.jsonl``, ``log_ratios/step_NNNNNN.npz``, TensorBoard's event files and
    their temporary files; folders only when that leaves them empty. Anything else under ``run`` is kept."""
    remove_leftovers(run)
    names = [*RUN_FILES, "FAILED", "samples.jsonl"]
    paths = [run / name for name in names]
    paths += _matching(run / "log_ratios", _LOG_RATIO_FILE) + _matching(run / "tensorboard", _EVENTS_FILE)
    _remove(paths)
    for folder in ("checkpoint", "log_ratios", "tensorboard", "wandb"):
        with contextlib.suppress(OSError):
            (run / folder).rmdir()  # only when empty


def _remove(paths: list[Path]) -> None:
    """Delete each of ``paths`` that exists: a file, or a folder the trainer writes whole (``RUN/final`` and its
    temporary twin, written by ``save_pretrained`` and replaced whole)."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _matching(folder: Path, pattern: re.Pattern) -> list[Path]:
    """The entries of ``folder`` whose whole name matches ``pattern`` (none when it is not a folder)."""
    return [folder / name for name in os.listdir(folder) if pattern.fullmatch(name)] if folder.is_dir() else []


def checkpointed_rows(path: Path, n_lines: int) -> list[dict[str, Any]]:
    """The first ``n_lines`` rows of a run's ``metrics.jsonl``, the steps ``1 .. n_lines`` a checkpoint follows,
    parsed; ValueError naming the file (and the line) when any is missing or damaged. Reads only."""
    try:
        lines = path.read_bytes().splitlines(keepends=True) if n_lines and path.exists() else []
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror}); the checkpoint follows {n_lines} steps "
                         "recorded there; the run cannot continue exactly") from err
    complete = [line for line in lines[:n_lines] if line.endswith(b"\n")]
    if len(complete) < n_lines:
        raise ValueError(f"{path}: holds {len(complete)} complete lines, but the checkpoint follows {n_lines} "
                         "steps; steps are missing (the file was deleted, cut short or replaced), so the run "
                         "cannot continue exactly; start a new run")
    rows = []
    for i, line in enumerate(complete, 1):
        try:
            row = json.loads(line)
        except (UnicodeDecodeError, ValueError) as err:
            raise ValueError(f"{path}: line {i}: not a JSON metrics row ({getattr(err, 'msg', err)}); "
                             "the file is damaged; nothing was changed") from err
        if not isinstance(row, dict) or row.get("step") != i:
            raise ValueError(f"{path}: line {i}: expected the metrics row of step {i}, got "
                             f"{str(row)[:60]!r}; the file is damaged; nothing was changed")
        rows.append(row)
    return rows


def read_checkpoint(path: Path) -> dict[str, Any]:
    """The trainer's checkpoint at ``path`` (loaded on the CPU); a damaged one (cut off, overwritten, empty) is one
    ValueError naming it (:func:`damaged_checkpoint`)."""
    import pickle
    import zipfile

    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)  # RNG states must stay on CPU
    except (RuntimeError, EOFError, OSError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            pickle.UnpicklingError, zipfile.BadZipFile) as err:
        raise damaged_checkpoint(path, err) from err
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise damaged_checkpoint(path, TypeError(f"a {type(ckpt).__name__} without the model's weights"))
    return ckpt


def damaged_checkpoint(path: Path, err: BaseException) -> ValueError:
    """The one-line error for a checkpoint that cannot be used, naming the file and the first line of why."""
    why = (str(err).strip().splitlines() or [""])[0][:200]
    return ValueError(f"{path}: not a readable checkpoint of this run ({type(err).__name__}: {why}); the run "
                      "cannot continue from it; nothing was changed")


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
    """The config recorded in ``RUN/config.toml``, with ``overrides`` on top (an error in the record names the
    file; one in the overrides, the field).

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
    try:
        return load_config(path, before + list(overrides))
    except ValueError as err:
        if str(path) in str(err) or not _same_error(lambda: load_config(path, before), err):
            raise  # named already, or the overrides are wrong
        raise ValueError(f"{path}: {err}") from None  # the record itself is damaged or out of bounds


def _same_error(call: Any, err: ValueError) -> bool:
    """Whether ``call()`` fails with ``err``'s message."""
    try:
        call()
    except ValueError as again:
        return str(again) == str(err)
    return False


def is_file_error(err: BaseException) -> bool:
    """Whether ``err`` is a file-system error a user can fix (disk full, read-only, permissions, missing path)."""
    return isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM,
                                                     errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EDQUOT)


def claim_run(recorded: Any | None, cfg: Any, run: Path) -> bool:
    """Under the lock: whether there is work to do in ``run`` (ValueError if the request cannot be honoured)."""
    remove_leftovers(run)  # our own temporary files, left by a process killed mid-write; we own the run now
    if recorded is None:
        if (run / "metrics.jsonl").exists() or (run / "checkpoint").exists():
            raise ValueError(f"out: {str(run)!r} already holds a run; use --resume or another directory")
        return True
    if (run / "DIVERGED").exists():
        raise ValueError(f"--resume: run {str(run)!r} diverged ({divergence_reason(run)}); start a new run")
    done = recorded.steps if (run / "DONE").exists() else count_lines(run / "metrics.jsonl")
    refused = refused_changes(recorded, cfg, done)
    if refused:
        raise ValueError(f"--resume: run {str(run)!r} cannot change {'; '.join(refused)} (it would change what "
                         "the run means); start a new run in another directory")
    if (run / "DONE").exists():
        if cfg.steps <= recorded.steps:
            return False
        if not (run / "checkpoint" / "state.pt").is_file():
            raise ValueError(f"--resume: run {str(run)!r} has no checkpoint to extend from; start a new run")
    check_checkpoint_present(run, done)
    return True


def check_checkpoint_present(run: Path, done: int) -> None:
    """ValueError when ``run`` has recorded more steps than its first checkpoint comes after but has no
    checkpoint: restarting would silently replace its metrics (a run killed before its first checkpoint
    has none to lose and restarts exactly)."""
    every = recorded_config(run).log.checkpoint_every  # as written, before this resume's overrides
    ckpt = run / "checkpoint" / "state.pt"
    if done >= every and not ckpt.exists():
        raise ValueError(f"--resume: {str(ckpt)!r} is missing, but metrics.jsonl records {done} steps (a checkpoint "
                         f"is written every {every}); the run cannot continue exactly; start a new run")


def divergence_reason(run: Path) -> str:
    """The reason recorded in ``RUN/DIVERGED``."""
    try:
        return str(json.loads((run / "DIVERGED").read_text()).get("reason", "no reason recorded"))
    except (OSError, ValueError, AttributeError):
        return "no reason recorded"


def count_lines(path: Path) -> int:
    """The complete lines of ``path`` (0 when it is missing): the steps a metrics file records."""
    return path.read_bytes().count(b"\n") if path.is_file() else 0


def keep_lines(path: Path, n_lines: int) -> None:
    """Keep the first ``n_lines`` lines of ``path`` (creating it empty if missing)."""
    lines = path.read_bytes().splitlines(keepends=True)[:n_lines] if path.exists() else []
    with atomic_path(path, temp_path(path)) as tmp:
        tmp.write_bytes(b"".join(lines))
