"""Forward + backward time of every objective on B=256, T=1024 float32 CPU tensors.

Prints each objective's median time and its ratio to ``grpo``. Goal: ``sspo``
within 1.5x of ``grpo``. Run: ``python benchmarks/objectives.py [--threads N]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import machine
import torch

from sspo_analysis.objectives import get_objective, objective_names

VARIANTS = [(name, {}) for name in objective_names()] + [
    ("sspo", {"gate": "erf"}),
    ("sspo", {"one_sided": True}),
    ("sapo", {"gate": "arctan"}),
]


def make_step(name: str, params: dict, batch: tuple, with_metrics: bool):
    """One forward + backward of an objective, with or without its metrics."""
    log_prob, old, adv, mask = batch
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = get_objective(name, **params)

    def step() -> None:
        lp = log_prob.detach().requires_grad_()
        if with_metrics:
            loss, _ = obj(lp, old, adv, mask)
        else:  # the loss alone, as an engine that does not log would use it
            terms, *_ = obj.terms(lp, old, adv, mask)
            loss = -obj.aggregate(terms.surrogate, mask)
        loss.backward()

    return step


def interleaved_medians(steps: dict, repeats: int) -> dict:
    """Median seconds per step, timing every step once per round, round after round.

    Interleaving spreads any drift in machine load evenly over all variants.
    """
    times: dict = {key: [] for key in steps}
    for round_ in range(repeats + 2):
        for key, step in steps.items():
            start = time.perf_counter()
            step()
            if round_ >= 2:  # warm-up rounds
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(ts) for key, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine.header(), flush=True)
    gen = torch.Generator().manual_seed(0)
    b, t = args.batch, args.length
    log_prob = -torch.rand(b, t, generator=gen) * 3
    old = log_prob + torch.randn(b, t, generator=gen) * 0.2
    lengths = torch.randint(t // 4, t + 1, (b,), generator=gen)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    adv = torch.randn(b, generator=gen)
    batch = (log_prob, old, adv, mask)
    print(f"B={b} T={t} float32, {args.threads} thread(s), median of {args.repeats} forward+backward passes")
    print(f"{'objective':<28}{'loss+metrics ms':>16}{'ratio':>8}{'loss only ms':>14}{'ratio':>8}")
    steps = {}
    for name, params in VARIANTS:
        label = name + ("" if not params else " " + ",".join(f"{k}={v}" for k, v in params.items()))
        for with_metrics in (True, False):
            steps[label, with_metrics] = make_step(name, params, batch, with_metrics)
    med = interleaved_medians(steps, args.repeats)
    for label in dict.fromkeys(k[0] for k in steps):
        full, bare = med[label, True], med[label, False]
        print(f"{label:<28}{full * 1e3:>16.1f}{full / med['grpo', True]:>8.2f}"
              f"{bare * 1e3:>14.1f}{bare / med['grpo', False]:>8.2f}")


if __name__ == "__main__":
    main()
