"""Time of the full theory grid, and the Monte Carlo throughput.

The grid: every objective and reference estimator that has an analytic method
(closed form or quadrature; ``clip-cov`` and ``kl-cov`` have only batch Monte
Carlo and are timed per point instead), 40 log-ratio stds
(0.01 to 0.5, log-spaced), 12 lengths (1 to 2048), both advantage signs, and the
soft-gated objectives (``sapo`` and ``sspo`` with each of the 4 soft families,
``sspo-sigmoid``) at 5 temperatures. Goal: under 2 s on a 2-core machine.

Monte Carlo throughput: ``analyse(..., method="monte-carlo")`` through the real
objective code, in sampled sequences and tokens per second.

Run: ``python benchmarks/theory.py [--threads N] [--repeats R]``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import machine
import numpy as np
import torch

from sspo_analysis.gates import SOFT_GATES
from sspo_analysis.theory import LogNormalRatios, all_objective_names, analyse, available_methods, sweep

STDS = np.geomspace(0.01, 0.5, 40)  # is-seq's moments leave float64 past L s^2 = 709 (the theory refuses there)
LENGTHS = [2**k for k in range(12)]  # 1 .. 2048
TAUS = [0.5, 1.0, 2.0, 4.0, 8.0]


ANALYTIC = [n for n in all_objective_names() if available_methods(n)[0] != "monte-carlo"]
MONTE_CARLO_ONLY = [n for n in all_objective_names() if n not in ANALYTIC]


def full_grid():  # noqa: ANN201 (pandas imported by sweep)
    """Every analytic objective on the full grid; soft gates at every family and temperature."""
    return sweep(ANALYTIC, STDS, LENGTHS, signs=(1, -1), taus=TAUS, gates=SOFT_GATES)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of the grid (default 5)")
    parser.add_argument("--mc-samples", type=int, default=8192, help="Monte Carlo sequences per point")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine.header(), flush=True)

    frame = full_grid()  # warm-up (imports, caches)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        frame = full_grid()
        times.append(time.perf_counter() - start)
    points = len(frame)
    med = statistics.median(times)
    print(f"full grid: {points} points ({frame.groupby(['objective', 'params']).ngroups} objective settings x "
          f"{len(STDS)} stds x {len(LENGTHS)} lengths x 2 signs)")
    print(f"  median {med:.3f} s over {args.repeats} repeats (min {min(times):.3f}, max {max(times):.3f}); "
          f"{points / med:,.0f} points/s; goal < 2 s: {'met' if med < 2 else 'NOT met'}")
    print(f"  methods: {dict(frame['method'].value_counts())}")

    for name in MONTE_CARLO_ONLY:  # batch Monte Carlo: one point, default samples
        start = time.perf_counter()
        analyse(name, LogNormalRatios(0.3, 16))
        print(f"  {name} (batch Monte Carlo only): one point in {time.perf_counter() - start:.2f} s")
    print("Monte Carlo throughput (objective.terms on sampled (n, L) float64 log-ratios):")
    for name, length in (("grpo", 256), ("gspo", 256), ("sspo", 256), ("sspo", 16)):
        model = LogNormalRatios(0.3, length)
        analyse(name, model, method="monte-carlo", n_samples=256)  # warm-up
        start = time.perf_counter()
        analyse(name, model, method="monte-carlo", n_samples=args.mc_samples)
        dt = time.perf_counter() - start
        print(f"  {name:5s} L={length:4d}: {args.mc_samples / dt:12,.0f} sequences/s  "
              f"{args.mc_samples * length / dt:14,.0f} tokens/s")


if __name__ == "__main__":
    main()
