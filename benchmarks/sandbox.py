"""Sandbox grading throughput: programs per second through ``grade_many`` and one at a time, per sandbox.

Grades ``--n`` small programs (three asserts each; a mix of correct, wrong and
non-compiling ones, as a policy early in training writes) with ``--workers``
threads, and a quarter of them one after another through ``run_python`` (what a
per-completion ``task.reward`` costs), under bubblewrap (``bwrap``, the default)
and, as the baseline in the same process, the uncontained ``unsafe-process``
fallback. Run: ``python benchmarks/sandbox.py [--n 200 --workers 4]``.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import machine

from sspo_analysis.sandbox import grade_many, run_python

TESTS = "assert f(1) == 3\nassert f(2) == 5\nassert f(4) == 9\n"


def programs(n: int) -> list[str]:
    bodies = ["2*x+1", "x+2", "x*x", "(x", "3*x-1"]
    return [f"def f(x):\n    return {bodies[i % len(bodies)]} + 0*{i}\n" for i in range(n)]


def throughput(batch: list[str], workers: int, sandbox: str) -> tuple[float, float, dict[str, int]]:
    """``(programs/s with grade_many, programs/s one at a time, statuses)``."""
    start = time.perf_counter()
    results = grade_many(batch, TESTS, workers=workers, sandbox=sandbox)
    parallel = len(batch) / (time.perf_counter() - start)
    serial_batch = batch[: max(1, len(batch) // 4)]
    start = time.perf_counter()
    for program in serial_batch:
        run_python(program, TESTS, sandbox=sandbox)
    serial = len(serial_batch) / (time.perf_counter() - start)
    return parallel, serial, {s: sum(r.status == s for r in results) for s in sorted({r.status for r in results})}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    print(machine.header(), flush=True)
    batch = programs(args.n)
    warnings.filterwarnings("ignore", "sandbox 'unsafe-process'")
    measured = {sandbox: throughput(batch, args.workers, sandbox) for sandbox in ("bwrap", "unsafe-process")}
    for sandbox, (parallel, serial, statuses) in measured.items():
        print(f"{sandbox:>14}: grade_many ({args.workers} workers) {parallel:.1f} programs/s; run_python one at a "
              f"time {serial:.1f} programs/s; statuses {statuses}")
    ratio = measured["bwrap"][0] / measured["unsafe-process"][0]
    print(f"bwrap / unsafe-process (grade_many): {ratio:.2f}x; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
