"""Sandbox grading throughput: programs per second through ``grade_many`` and one at a time.

Grades ``--n`` small programs (three asserts each; a mix of correct, wrong and
non-compiling ones, as a policy early in training writes) with ``--workers``
threads, and the same programs one after another through ``run_python`` (what a
per-completion ``task.reward`` costs). Run: ``python benchmarks/sandbox.py [--n 200 --workers 4]``.
"""

from __future__ import annotations

import argparse
import os
import time

from sspo_analysis.training.sandbox import grade_many, run_python

TESTS = "assert f(1) == 3\nassert f(2) == 5\nassert f(4) == 9\n"


def programs(n: int) -> list[str]:
    bodies = ["2*x+1", "x+2", "x*x", "(x", "3*x-1"]
    return [f"def f(x):\n    return {bodies[i % len(bodies)]} + 0*{i}\n" for i in range(n)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args(argv)
    batch = programs(args.n)
    start = time.perf_counter()
    results = grade_many(batch, TESTS, workers=args.workers)
    parallel = args.n / (time.perf_counter() - start)
    start = time.perf_counter()
    for program in batch[: max(1, args.n // 4)]:
        run_python(program, TESTS)
    serial = max(1, args.n // 4) / (time.perf_counter() - start)
    statuses = {s: sum(r.status == s for r in results) for s in {r.status for r in results}}
    print(f"grade_many ({args.workers} workers): {parallel:.1f} programs/s; run_python one at a time: "
          f"{serial:.1f} programs/s; statuses {statuses}; load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
