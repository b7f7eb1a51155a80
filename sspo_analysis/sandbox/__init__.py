"""Grade untrusted Python (model-written programs) against tests: the program computes, the grader decides.

``run_python(program, tests)`` returns a :class:`SandboxResult` with the number of tests passed,
their total, a status and a short message; ``grade_many`` grades many programs in parallel with a
bounded thread pool, each thread driving one sandbox, so a slow or hostile program costs at most
its own timeout.

**The verdict.** The tests never run next to the program. They are read in this process
(:mod:`~sspo_analysis.sandbox.checks`) into the calls they make of the program's functions and the
checks on the values; the sandbox receives only the program and the calls (literal arguments), and
sends back each call's value as plain data (a Python literal of builtin types: no objects with
their own ``__eq__``). The checks run here, on those values. Overriding builtins, walking frames,
writing to any pipe, exiting early or killing the harness change only what the sandbox sends, and
a test passes only when a value for its call compares right with an expected value the program
never sees (a second value for the same call fails it); so a program gets nothing for a test it
did not compute. (A program that writes the right value for a call on the channel itself has, for
grading, returned it: a lookup table of known answers is a program like any other.) A value's text
is at most ``harness.MAX_VALUE_CHARS`` (64 KiB) and the channel at most :data:`MAX_CHANNEL_BYTES`,
which bounds what this process parses. Tests the grader cannot read that way are refused
(``checks.TestsError``).

**Containment** (``sandbox="bwrap"``, the default): each run is a fresh ``python -I -S``
(standard library only) under bubblewrap (``bwrap``, Debian/Ubuntu package ``bubblewrap``) with

- new user, PID, network, IPC, UTS and cgroup namespaces: no network (not even the host's
  loopback), no view of the host's processes (``/proc`` is the sandbox's own), and every process
  the program starts dies with the sandbox (``--die-with-parent``; the grader kills ``bwrap`` at
  the deadline); all capabilities dropped; a new session (no terminal);
- a read-only file system holding only ``/usr``, the ``/bin`` and ``/lib*`` links, ``/etc/ld.so.cache``
  and the Python installation (``sys.base_prefix``), plus a private ``/tmp`` (tmpfs of bounded size,
  also the working directory and ``HOME``) and a minimal ``/dev``; nothing of the host's home, the
  working tree or other temporary files is visible or writable;
- an empty environment (``HOME`` and ``TMPDIR`` only; ``bwrap`` itself is started with an empty
  environment, so ``/proc/1/environ`` is empty too);
- the limits set in the worker: ``RLIMIT_CPU`` (``timeout_s``), ``RLIMIT_AS`` (``memory_mb``),
  ``RLIMIT_NPROC``, ``RLIMIT_FSIZE`` (``max_file_mb``), no core dumps; and the wall clock, kept by
  the harness's reaper and again by this process, which reads the result channel with a deadline
  and a size limit whatever the program does to its pipes.

What it does not contain: the program still reads the read-only system files above (and Python's
own installation), uses CPU and memory up to the limits, and runs as the same user id (root stays
root inside a user namespace, without capabilities); there is no system-call filter (seccomp), so
a kernel exploit is out of its scope; ``RLIMIT_NPROC`` is not enforced for root (the number of
processes is then bounded by the timeout, after which all are killed) and ``RLIMIT_AS`` limits each
process, not their sum. Where ``bwrap`` is missing or cannot create namespaces, ``run_python``
raises :class:`SandboxUnavailable` saying so; ``sandbox="unsafe-process"`` is the explicit opt-in
to the weaker fallback, announced by one warning: the same harness and verdict, but in a plain
process (its own session, an environment of ``HOME``/``TMPDIR`` only, a temporary working directory
removed afterwards, the same limits, a reaper that kills every descendant, though a program that
kills the reaper first can leave processes that left its process group) with **no** file-system,
network or process isolation: the program can read and write the user's files, read other
processes' environments, use the network and signal the user's processes. Linux only.
"""

from __future__ import annotations

import functools
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sspo_analysis.sandbox.checks import Plan, TestsError, parse_tests, verdict
from sspo_analysis.sandbox.harness import MAX_VALUE_CHARS, decode

__all__ = ["SANDBOXES", "STATUSES", "SandboxResult", "SandboxUnavailable", "TestsError", "extract_code",
           "grade_many", "parse_tests", "require_sandbox", "run_python"]

STATUSES = ("ok", "failed", "timeout", "memory", "crashed", "syntax")
SANDBOXES = ("bwrap", "unsafe-process")
"""``bwrap``: contained (see the module docstring); ``unsafe-process``: process limits only (explicit opt-in)."""
HARNESS = Path(__file__).with_name("harness.py")
GRACE_S = 5.0
"""Extra seconds this process waits beyond the program's timeout (start-up and clean-up)."""
DRAIN_S = 0.2
"""How long the channel is still read after the sandbox's first process has ended."""
MAX_CHANNEL_BYTES = 4 << 20
"""The most the result channel may carry; a program that writes more is stopped."""
INSIDE_HARNESS = "/sandbox/harness.py"


class SandboxUnavailable(RuntimeError):
    """``sandbox="bwrap"`` was asked for and bubblewrap is missing or cannot create namespaces here."""


@dataclass(frozen=True)
class SandboxResult:
    """``passed`` of ``total`` tests; ``status`` in :data:`STATUSES`; ``message``: why, in one line.

    ``ok``: every test passed. ``failed``: the program ran and a test failed (a wrong value, an
    exception, a value that is not plain data). ``timeout``: the wall-clock or CPU limit ended it.
    ``memory``: an allocation failed (``MemoryError`` under the address-space limit). ``crashed``:
    the program raised at import, is missing the entry point, exited, or died from a signal before
    the calls were made. ``syntax``: it does not compile. The status is what the sandbox reported
    and only explains; ``passed`` is decided here (tests computed before a timeout or crash count).
    """

    passed: int
    total: int
    status: str
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


def run_python(program: str, tests: str, *, timeout_s: float = 5.0, memory_mb: int = 512,
               entry_point: str | None = None, max_processes: int = 64, max_file_mb: int = 16,
               sandbox: str = "bwrap") -> SandboxResult:
    """Grade ``program`` against ``tests`` in a fresh sandbox (see the module docstring).

    Args:
        program: the untrusted source; never executed in this process.
        tests: trusted test source (see :func:`~sspo_analysis.sandbox.checks.parse_tests`).
        timeout_s: wall-clock limit of the program and all its calls (the CPU limit is the same
            number of seconds, rounded up).
        memory_mb: address-space limit of each process.
        entry_point: the function the tests call as ``candidate`` (optional).
        max_processes: ``RLIMIT_NPROC`` (not enforced for root, see above).
        max_file_mb: the largest file the program may write (and the size of its ``/tmp``).
        sandbox: ``bwrap`` or ``unsafe-process`` (:data:`SANDBOXES`).
    """
    if not timeout_s > 0 or memory_mb < 32 or max_processes < 1 or max_file_mb < 0:
        raise ValueError("run_python: need timeout_s > 0, memory_mb >= 32, max_processes >= 1, max_file_mb >= 0")
    require_sandbox(sandbox)
    plan = parse_tests(tests, entry_point)
    spec = {"program": program, "calls": [[c.name, c.args, c.kwargs] for c in plan.calls],
            "entry_point": entry_point, "timeout_s": float(timeout_s), "memory_mb": int(memory_mb),
            "max_processes": int(max_processes), "max_file_mb": int(max_file_mb)}
    channel = _run(spec, sandbox, timeout_s + GRACE_S)
    return judge(plan, channel, timeout_s)


# --------------------------------------------------------------------------- which sandbox


def require_sandbox(sandbox: str) -> None:
    """Refuse an unknown ``sandbox``; :class:`SandboxUnavailable` if bwrap cannot run; a warning for the fallback."""
    if sandbox not in SANDBOXES:
        raise ValueError(f"sandbox: unknown value {sandbox!r}; allowed values: {', '.join(SANDBOXES)}")
    if sandbox == "bwrap":
        problem = bwrap_problem()
        if problem:
            raise SandboxUnavailable(
                f"sandbox: bubblewrap ('bwrap', the default) cannot run here ({problem}); install it (apt-get install "
                "bubblewrap, dnf install bubblewrap) and allow unprivileged user namespaces, or opt in to the "
                "uncontained fallback with sandbox = \"unsafe-process\" (task.sandbox in a training config)")
    else:
        _warn_unsafe()


@functools.cache
def _warn_unsafe() -> None:
    warnings.warn("sandbox 'unsafe-process': model-written code runs with process limits only, without "
                  "file-system, network or process isolation (install bubblewrap and use sandbox 'bwrap')",
                  RuntimeWarning, stacklevel=4)


@functools.cache
def bwrap_problem() -> str | None:
    """None if bubblewrap starts this Python in a sandbox here, else why not (one line). Checked once."""
    if shutil.which("bwrap") is None:
        return "the bwrap command is not on PATH"
    try:
        done = subprocess.run(bwrap_command(1) + ["-c", "pass"], env={}, capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"bwrap did not start: {err}"
    if done.returncode != 0:
        lines = done.stderr.decode("utf-8", "replace").strip().splitlines()
        return lines[-1] if lines else f"bwrap exited with status {done.returncode}"
    return None


def _interpreter() -> str:
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


def bwrap_command(max_file_mb: int) -> list[str]:
    """The ``bwrap ... python -I -S`` command line of one sandbox (see the module docstring)."""
    python = _interpreter()
    command = ["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL", "--clearenv",
               "--setenv", "HOME", "/tmp", "--setenv", "TMPDIR", "/tmp", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            command += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            command += ["--ro-bind", top, top]
    python_dirs = {os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(python))}
    for path in sorted(p for p in python_dirs if not p.startswith("/usr/") and p != "/usr"):
        command += ["--ro-bind", path, path]
    if os.path.isfile("/etc/ld.so.cache"):
        command += ["--ro-bind", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    size = (2 * max(1, max_file_mb) + 8) << 20
    command += ["--ro-bind", str(HARNESS), INSIDE_HARNESS, "--proc", "/proc", "--dev", "/dev",
                "--size", str(size), "--tmpfs", "/tmp", "--remount-ro", "/dev", "--remount-ro", "/",
                "--chdir", "/tmp", python, "-I", "-S"]
    return command


# --------------------------------------------------------------------------- one run


@dataclass
class Channel:
    """What came back from a sandbox (untrusted except ``timed_out``, ``overflow``: this process's own facts)."""

    lines: list[str]
    timed_out: bool
    overflow: bool


def _run(spec: dict, sandbox: str, limit_s: float) -> Channel:
    """Start the sandbox, send ``spec``, read its channel until it ends or ``limit_s`` passes; nothing survives."""
    data = json.dumps(spec).encode()
    if sandbox == "bwrap":
        command = bwrap_command(spec["max_file_mb"]) + [INSIDE_HARNESS]
        return _exchange(command, data, limit_s, env={}, cwd=None)
    workdir = Path(tempfile.mkdtemp(prefix="sspo-sandbox-"))
    try:
        env = {"TMPDIR": str(workdir), "HOME": str(workdir)}
        return _exchange([sys.executable, "-I", "-S", str(HARNESS)], data, limit_s, env=env, cwd=workdir)
    finally:
        _remove_tree(workdir)


def _exchange(command: list[str], data: bytes, limit_s: float, env: dict, cwd: Path | None) -> Channel:
    """Run ``command`` with ``data`` on stdin; its stdout as lines. Kills its process group before reaping it."""
    proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env=env, cwd=cwd, start_new_session=True)
    out, timed_out, overflow = bytearray(), False, False
    try:
        timed_out, overflow = _talk(proc, data, time.monotonic() + limit_s, out)
    finally:
        _kill_group(proc.pid)  # bwrap (its sandbox dies with it) or the fallback's reaper: not reaped yet
        lines = out.decode("utf-8", "replace").split("\n")[:-1]  # the last piece has no newline: dropped
        worker = next((line[2:] for line in lines if line.startswith("W ")), "")
        if cwd is not None and worker.isdigit() and int(worker) > 1 and int(worker) != os.getpgrp():
            _kill_group(int(worker))  # the fallback's worker group, should the program have killed the reaper
        proc.stdin.close()
        proc.stdout.close()
        proc.wait()
    return Channel(lines, timed_out, overflow)


def _talk(proc: subprocess.Popen, data: bytes, deadline: float, out: bytearray) -> tuple[bool, bool]:
    """Write ``data`` to stdin and read stdout into ``out`` until end of file, the process's end (plus
    :data:`DRAIN_S`), ``deadline`` or :data:`MAX_CHANNEL_BYTES`; ``(timed out, overflow)``. Never blocks
    past the deadline, whatever the sandbox does to its pipes."""
    todo = memoryview(data)
    ended_at = None
    with selectors.DefaultSelector() as selector:
        for stream, event in ((proc.stdin, selectors.EVENT_WRITE), (proc.stdout, selectors.EVENT_READ)):
            os.set_blocking(stream.fileno(), False)
            selector.register(stream, event)
        while True:
            now = time.monotonic()
            if now >= deadline:
                return True, False
            ended_at = ended_at or (now if _ended(proc.pid) else None)
            if ended_at is not None and now - ended_at > DRAIN_S:
                return False, False
            for key, _ in selector.select(min(deadline - now, 0.05)):
                if key.fileobj is proc.stdin:
                    todo = _write_some(proc.stdin, todo, selector)
                    continue
                chunk = _read_some(proc.stdout)
                if chunk == b"":
                    return False, False
                out += chunk or b""
                if len(out) > MAX_CHANNEL_BYTES:
                    return False, True


def _write_some(stream: Any, todo: memoryview, selector: selectors.BaseSelector) -> memoryview:
    try:
        todo = todo[os.write(stream.fileno(), todo[:65536]):]
    except BlockingIOError:
        return todo
    except OSError:  # the sandbox closed its stdin (it ended): nothing more to send
        todo = todo[len(todo):]
    if not todo:
        selector.unregister(stream)
        stream.close()  # end of file: the harness reads its spec to the end
    return todo


def _read_some(stream: Any) -> bytes | None:
    """What the stream holds now; ``b""`` at end of file, None if nothing yet."""
    try:
        return os.read(stream.fileno(), 1 << 16)
    except BlockingIOError:
        return None


def _ended(pid: int) -> bool:
    """Whether ``pid`` (our child) has ended, without reaping it (its pid stays ours to kill)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _remove_tree(path: Path) -> None:
    """Remove the working directory, also when the program made parts of it unreadable."""
    shutil.rmtree(path, ignore_errors=True)
    if path.exists():
        for root, dirs, _ in os.walk(path):
            for d in dirs:
                p = os.path.join(root, d)
                if not os.path.islink(p):
                    os.chmod(p, 0o700)
        os.chmod(path, 0o700)
        shutil.rmtree(path, ignore_errors=True)


# --------------------------------------------------------------------------- the verdict


@dataclass
class Report:
    """The sandbox's lines, read as untrusted data: values and reasons per call, and what it said happened."""

    values: dict[int, Any] = field(default_factory=dict)
    reasons: dict[int, str] = field(default_factory=dict)
    events: dict[str, str] = field(default_factory=dict)  # first L, S, E, M, D, Z line: its text

    @classmethod
    def read(cls, lines: list[str], n_calls: int) -> Report:
        report, seen = cls(), set()
        for line in lines:
            tag, _, rest = line.partition(" ")
            if tag in ("V", "R"):
                report._reply(tag, rest, n_calls, seen)
            elif tag in ("L", "S", "E", "M", "D", "Z"):
                report.events.setdefault(tag, rest)
        return report

    def _reply(self, tag: str, rest: str, n_calls: int, seen: set[int]) -> None:
        """One call's value or reason; a second reply for the same call voids both (one answer per call)."""
        index, _, body = rest.partition(" ")
        if not (index.isdigit() and int(index) < n_calls):
            return
        i = int(index)
        if i in seen:
            self.values.pop(i, None)
            self.reasons[i] = "more than one value came back for this call"
            return
        seen.add(i)
        if tag == "R":
            self.reasons[i] = body[:200]
            return
        if len(body) > MAX_VALUE_CHARS:
            self.reasons[i] = f"the value that came back is longer than {MAX_VALUE_CHARS} characters"
            return
        try:
            self.values[i] = decode(body)
        except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError, OverflowError):
            self.reasons[i] = "the value that came back is not a plain literal"


def judge(plan: Plan, channel: Channel, timeout_s: float) -> SandboxResult:
    """The result of one run: tests decided here, from the values alone; the status explains."""
    report = Report.read(channel.lines, len(plan.calls))
    total, loaded = len(plan.tests), "L" in report.events
    failures = [(test, verdict(test, report.values, report.reasons) if loaded else "the program did not load")
                for test in plan.tests]
    failures = [(test, why) for test, why in failures if why is not None]
    passed = total - len(failures)
    if not failures:
        return SandboxResult(passed, total, "ok", f"{total}/{total} passed")
    status, why = _status(report, channel, timeout_s, passed)
    if status == "failed":
        why = f"{passed}/{total} passed; {failures[0][0].source}: {failures[0][1]}"
    return SandboxResult(passed, total, status, why)


def _status(report: Report, channel: Channel, timeout_s: float, passed: int) -> tuple[str, str]:
    """The status and message of a run that did not pass every test (from the sandbox's own account)."""
    events = report.events
    timed_out, code, sig = (events.get("Z", "") + " - - -").split()[:3]
    if channel.timed_out or timed_out == "1" or sig == str(int(signal.SIGXCPU)):
        return "timeout", f"stopped after {timeout_s:g} s ({passed} passed)"
    if channel.overflow:
        return "crashed", f"the program wrote more than {MAX_CHANNEL_BYTES >> 20} MB to the result channel"
    for tag, status, prefix in (("S", "syntax", ""), ("M", "memory", "out of memory: "), ("E", "crashed", "")):
        if tag in events:
            return status, prefix + events[tag]
    if "D" in events:
        return "failed", ""
    how = f"signal {signal.Signals(int(sig)).name}" if sig.isdigit() else f"exit code {code}"
    return "crashed", f"the program ended the process ({how}) after {passed} passed"


def grade_many(programs: Sequence[str], tests: str | Sequence[str], *, workers: int | None = None,
               entry_points: str | Sequence[str | None] | None = None, **limits) -> list[SandboxResult]:
    """Grade many programs in parallel (a bounded thread pool); results in input order.

    ``tests`` and ``entry_points`` are one value for all programs or one per program; ``limits``
    are :func:`run_python`'s keyword arguments (``sandbox`` too). A grader error (tests it cannot
    read, a failed start) gives a ``crashed`` result for that program, never an exception for the
    batch; a sandbox that cannot run here is an exception (:class:`SandboxUnavailable`) before any work.
    """
    n = len(programs)
    tests_list = [tests] * n if isinstance(tests, str) else list(tests)
    entries = [entry_points] * n if entry_points is None or isinstance(entry_points, str) else list(entry_points)
    if len(tests_list) != n or len(entries) != n:
        raise ValueError(f"grade_many: tests and entry_points need one value or {n} values")
    require_sandbox(limits.get("sandbox", "bwrap"))
    workers = max(1, min(n, workers or min(8, os.cpu_count() or 1)))

    def one(i: int) -> SandboxResult:
        try:
            return run_python(programs[i], tests_list[i], entry_point=entries[i], **limits)
        except Exception as err:  # noqa: BLE001 - one bad item must not stop the batch
            return SandboxResult(0, 0, "crashed", f"grader error: {err}")

    if workers == 1:
        return [one(i) for i in range(n)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(one, range(n)))


def extract_code(completion: str) -> str:
    """The last fenced code block of a completion (``` or ~~~, any info string), or the whole completion."""
    blocks, current, fence = [], None, ""
    for line in completion.splitlines():
        stripped = line.strip()
        if current is None and stripped[:3] in ("```", "~~~"):
            current, fence = [], stripped[:3]
        elif current is not None and stripped.startswith(fence) and stripped.strip(fence[0]) == "":
            blocks.append("\n".join(current))
            current = None
        elif current is not None:
            current.append(line)
    if current is not None:  # an unclosed last fence (truncated generation): keep what was written
        blocks.append("\n".join(current))
    return blocks[-1] if blocks else completion
