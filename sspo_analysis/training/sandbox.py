"""Run untrusted Python (model-written programs) against tests in a subprocess that nothing outlives.

``run_python(program, tests)`` returns a :class:`SandboxResult` with the number
of tests passed, their total, a status and a short message; ``grade_many``
grades many programs in parallel with a bounded thread pool, each thread
driving one subprocess, so a slow or hostile program costs at most its own
timeout.

How a run works (Linux):

- a fresh ``python -I -S`` (isolated mode, no site-packages: the standard
  library only) started in a new session, with an environment that holds
  nothing but ``TMPDIR`` and ``HOME`` pointing at a temporary working
  directory, which is removed afterwards; the tests arrive on stdin, so no file
  in that directory holds them;
- the process (the harness, ``training/harness.py``) is a trusted reaper: it
  forks one worker that starts its own session, sets ``RLIMIT_CPU``,
  ``RLIMIT_AS`` (``memory_mb``), ``RLIMIT_NPROC``, ``RLIMIT_FSIZE`` and
  ``RLIMIT_CORE = 0`` on itself, then runs the program and each test (each
  top-level ``assert``, each ``test_*`` function, or HumanEval's
  ``check(candidate)``) separately, reporting pass/fail on a private pipe, not
  through the program's stdout;
- at the deadline, or when the worker ends, the reaper kills the worker's
  process group and then, as a Linux child subreaper, every process that left
  the group (``setsid`` daemons, double forks), until it has no child left.
  The limits are set in the forked worker rather than in a ``preexec_fn``,
  which is unsafe when threads (``grade_many``) start subprocesses.

What it cannot guarantee. It is meant for model output on your own machine
(runaway loops, fork storms, memory blow-ups, stray files, accidental daemons),
**not as a security boundary against a determined attacker**: there is no
network isolation (no namespaces), no file-system isolation (the program can
read and write any path the user can; only relative paths and ``tempfile``
land in the removed temporary directory), no system-call filter, and the
program runs as the same user, so it can signal other processes of that user,
including the reaper (a killed reaper leaves at most the worker's own process
group, which the library then kills) and the trainer. ``RLIMIT_NPROC`` counts
all processes of the user and is not enforced for root; under root the number
of processes a program starts is bounded only by its timeout, after which all
of them are killed. ``RLIMIT_AS`` limits each process, not their sum.
Processes are found through ``/proc`` and ``prctl``; other systems are not
supported. For hostile code use OS isolation (containers, gVisor, nsjail,
firejail) around the whole grader.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

STATUSES = ("ok", "failed", "timeout", "memory", "crashed", "syntax")
HARNESS = Path(__file__).with_name("harness.py")
GRACE_S = 10.0
"""Extra seconds the library waits for the reaper beyond the program's timeout (start-up and clean-up)."""


@dataclass(frozen=True)
class SandboxResult:
    """``passed`` of ``total`` tests; ``status`` in :data:`STATUSES`; ``message``: why, in one line.

    ``ok``: every test passed. ``failed``: the program ran and a test failed
    (an ``AssertionError`` or any other exception, also in the tests' own setup).
    ``timeout``: the wall-clock or CPU limit ended it. ``memory``: an allocation
    failed (``MemoryError`` under the address-space limit). ``crashed``: the
    program raised at import, is missing the entry point, exited, or died from a
    signal before the tests finished. ``syntax``: it does not compile.
    Tests that passed before a timeout or crash still count in ``passed``.
    """

    passed: int
    total: int
    status: str
    message: str = ""

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0


def split_tests(tests: str, entry_point: str | None = None) -> list[tuple[str, str]]:
    """The test source as ordered ``(kind, source)`` steps: ``setup``, ``test`` or ``entry``.

    Each top-level ``assert`` is one test; each top-level ``def test_*()`` is
    defined (setup) and then called as one test; other statements are setup,
    run in order. With ``entry_point``, the program's function of that name is
    bound to ``candidate``, and a ``check`` function with no other tests (the
    HumanEval layout) becomes the single test ``check(candidate)``.
    """
    try:
        module = ast.parse(tests)
    except SyntaxError as err:
        raise ValueError(f"tests: not valid Python (line {err.lineno}: {err.msg})") from None
    steps: list[tuple[str, str]] = [("entry", entry_point)] if entry_point else []
    for node in module.body:
        if isinstance(node, ast.Assert):
            steps.append(("test", ast.unparse(node)))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test"):
            steps += [("setup", ast.unparse(node)), ("test", f"{node.name}()")]
        else:
            steps.append(("setup", ast.unparse(node)))
    has_check = any(isinstance(n, ast.FunctionDef) and n.name == "check" for n in module.body)
    if entry_point and has_check and not any(kind == "test" for kind, _ in steps):
        steps.append(("test", "check(candidate)"))
    if not any(kind == "test" for kind, _ in steps):
        raise ValueError("tests: no test found; allowed: top-level assert statements, test_* functions, "
                         "or check(candidate) with an entry point")
    return steps


def run_python(program: str, tests: str, *, timeout_s: float = 5.0, memory_mb: int = 512,
               entry_point: str | None = None, max_processes: int = 64, max_file_mb: int = 16) -> SandboxResult:
    """Run ``program`` and then each test of ``tests`` in a fresh sandboxed process (see the module docstring).

    Args:
        program: the untrusted source; never executed in this process.
        tests: trusted test source (see :func:`split_tests`).
        timeout_s: wall-clock limit of the program and all its tests (the CPU
            limit is the same number of seconds, rounded up).
        memory_mb: address-space limit of each process.
        entry_point: the function the tests call as ``candidate`` (optional).
        max_processes: ``RLIMIT_NPROC`` (not enforced for root, see above).
        max_file_mb: the largest file the program may write.
    """
    if not timeout_s > 0 or memory_mb < 32 or max_processes < 1 or max_file_mb < 0:
        raise ValueError("run_python: need timeout_s > 0, memory_mb >= 32, max_processes >= 1, max_file_mb >= 0")
    steps = split_tests(tests, entry_point)
    total = sum(kind == "test" for kind, _ in steps)
    spec = {"program": program, "items": steps, "timeout_s": float(timeout_s), "memory_mb": int(memory_mb),
            "max_processes": int(max_processes), "max_file_mb": int(max_file_mb)}
    workdir = Path(tempfile.mkdtemp(prefix="sspo-sandbox-"))
    try:
        shutil.copyfile(HARNESS, workdir / "_harness.py")
        report, worker = _launch(workdir, json.dumps(spec).encode(), timeout_s + GRACE_S)
    finally:
        _remove_tree(workdir)
    if report is None:
        if worker:  # the reaper died or hung: kill the worker's group ourselves
            _kill_group(worker)
        return SandboxResult(0, total, "crashed", "the sandbox's reaper did not report (killed by the program?)")
    return interpret(report, steps, total, timeout_s)


def _launch(workdir: Path, spec: bytes, limit_s: float) -> tuple[dict | None, int | None]:
    """Start the harness in ``workdir``; ``(its JSON report or None, the worker's pid or None)``."""
    env = {"TMPDIR": str(workdir), "HOME": str(workdir)}
    proc = subprocess.Popen([sys.executable, "-I", "-S", "_harness.py"], cwd=workdir, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(spec, timeout=limit_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)  # the reaper's own group: only the reaper itself
        out, _ = proc.communicate()
    lines = out.decode("utf-8", "replace").splitlines()
    worker = int(lines[0]) if lines and lines[0].isdigit() else None
    try:
        report = json.loads(lines[-1]) if len(lines) >= 2 else None
    except json.JSONDecodeError:
        report = None
    return report, worker


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


def interpret(report: dict, steps: list[tuple[str, str]], total: int, timeout_s: float) -> SandboxResult:
    """A :class:`SandboxResult` from the reaper's report (worker lines, deadline, exit status)."""
    lines = report["lines"]
    passed = min(total, sum(line.startswith("P ") for line in lines))
    tests = [source for kind, source in steps if kind == "test"]
    first = {line[0]: line[2:] for line in reversed(lines) if line[:1] in "SMEXF"}
    sig = report.get("signal")
    if report["timed_out"] or sig == signal.SIGXCPU:
        return SandboxResult(passed, total, "timeout", f"stopped after {timeout_s:g} s ({passed}/{total} passed)")
    if "S" in first:
        return SandboxResult(0, total, "syntax", first["S"])
    if "M" in first:
        return SandboxResult(passed, total, "memory", f"out of memory: {first['M']}")
    if "E" in first:
        return SandboxResult(0, total, "crashed", first["E"])
    if "D" in lines and report.get("exit_code") == 0:
        if passed == total:
            return SandboxResult(passed, total, "ok", f"{total}/{total} passed")
        index, _, why = first.get("F", "").partition(" ")
        which = tests[int(index)] if index.isdigit() and int(index) < total else "a test"
        return SandboxResult(passed, total, "failed", f"{passed}/{total} passed; {which}: {why}")
    if "X" in first:
        return SandboxResult(passed, total, "failed", f"test setup raised {first['X']}")
    how = f"signal {signal.Signals(sig).name}" if sig else f"exit code {report.get('exit_code')}"
    return SandboxResult(passed, total, "crashed", f"the program ended the process ({how}) after {passed} passed")


def grade_many(programs: Sequence[str], tests: str | Sequence[str], *, workers: int | None = None,
               entry_points: str | Sequence[str | None] | None = None, **limits) -> list[SandboxResult]:
    """Grade many programs in parallel (a bounded thread pool); results in input order.

    ``tests`` and ``entry_points`` are one value for all programs or one per
    program; ``limits`` are :func:`run_python`'s keyword arguments. A grader
    error (bad tests, a failed start) gives a ``crashed`` result for that
    program, never an exception for the batch.
    """
    n = len(programs)
    tests_list = [tests] * n if isinstance(tests, str) else list(tests)
    entries = [entry_points] * n if entry_points is None or isinstance(entry_points, str) else list(entry_points)
    if len(tests_list) != n or len(entries) != n:
        raise ValueError(f"grade_many: tests and entry_points need one value or {n} values")
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
