"""``sspo simulate bandit|sequence``: the simulators from the command line, writing CSV.

Examples::

    sspo simulate bandit --objectives grpo,sapo,sspo --steps 200 --csv bandit.csv
    sspo simulate sequence --objectives pg,grpo,gspo,sspo,is-seq --staleness 0,1,2,4,8 --csv staleness.csv
"""

from __future__ import annotations

import argparse
from typing import Any

from sspo_analysis.cli_common import (
    add_objective_flags,
    int_list,
    objective_params,
    progress_over,
    str_list,
    write_csv,
)

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``sspo simulate`` with its ``bandit`` and ``sequence`` sub-commands."""
    p = sub.add_parser("simulate", help="softmax bandit (entropy drift) and tabular sequence policy (staleness)")
    kinds = p.add_subparsers(dest="simulator", metavar="SIMULATOR", required=True)

    b = kinds.add_parser("bandit", help="train a softmax bandit; per-step entropy, reward, entropy change")
    b.add_argument("--objectives", default="pg,grpo,sapo,gspo,gmpo,sspo", help="comma-separated objectives")
    b.add_argument("--steps", type=int, default=200)
    b.add_argument("--n-actions", type=int, default=64)
    b.add_argument("--n-correct", type=int, help="rewarded actions (default n_actions // 8)")
    b.add_argument("--group-size", type=int, default=16)
    b.add_argument("--n-groups", type=int, default=1)
    b.add_argument("--updates-per-batch", type=int, default=4)
    b.add_argument("--lr", type=float, default=0.25)
    b.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    b.add_argument("--csv", help="write the per-step records to this CSV file")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_objective_flags(b)
    b.set_defaults(func=run_bandit_cli)

    q = kinds.add_parser("sequence", help="tabular autoregressive policy; gradient bias and variance vs staleness")
    q.add_argument("--objectives", default="pg,grpo,cispo,sapo,gspo,gmpo,sspo,is-token,is-seq",
                   help="comma-separated objectives")
    q.add_argument("--staleness", default="0,1,2,4,8", help="comma-separated policy lags (default 0,1,2,4,8)")
    q.add_argument("--length", type=int, default=4)
    q.add_argument("--vocab", type=int, default=3)
    q.add_argument("--group-size", type=int, default=8)
    q.add_argument("--groups-per-batch", type=int, default=4)
    q.add_argument("--n-batches", type=int, default=2000)
    q.add_argument("--path-lr", type=float, default=3.0)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--csv", help="write the per-lag records to this CSV file")
    q.add_argument("--no-progress", action="store_true", help="hide the progress bar (one tick per objective)")
    add_objective_flags(q)
    q.set_defaults(func=run_sequence_cli)


def _objectives(args: argparse.Namespace) -> list[tuple[str, dict[str, Any]]]:
    from sspo_analysis.objectives import resolve_objective

    names = str_list(args.objectives)
    if not names:
        raise ValueError("--objectives: need at least one objective")
    out = []
    for name in names:
        resolve_objective(name)  # unknown names first
        params = objective_params(name, args, strict=len(names) == 1)
        out.append((name, params))
    return out


def run_bandit_cli(args: argparse.Namespace) -> int:
    """Entry point of ``sspo simulate bandit``."""
    import pandas as pd

    from sspo_analysis.simulation import run_bandit

    runs = [(name, params, seed) for name, params in _objectives(args) for seed in int_list(args.seeds, "--seeds")]
    frames = [run_bandit(name, args.steps, args.n_actions, args.group_size, args.updates_per_batch, args.lr, seed,
                         n_correct=args.n_correct, n_groups=args.n_groups, **params)
              for name, params, seed in progress_over(runs, "bandit", not args.no_progress)]
    frame = pd.concat(frames, ignore_index=True)
    write_csv(frame, args.csv)
    summary = frame.groupby("objective", sort=False).agg(
        final_entropy=("entropy", "last"), final_expected_reward=("expected_reward", "last"),
        mean_dead_frac=("dead_frac", "mean"))
    print(summary.to_string(float_format=lambda v: f"{v:.4g}"))
    return 0


def run_sequence_cli(args: argparse.Namespace) -> int:
    """Entry point of ``sspo simulate sequence``."""
    import pandas as pd

    from sspo_analysis.simulation import staleness_study

    frames = [staleness_study(name, int_list(args.staleness, "--staleness"), length=args.length, vocab=args.vocab,
                              group_size=args.group_size, n_batches=args.n_batches,
                              groups_per_batch=args.groups_per_batch, path_lr=args.path_lr, seed=args.seed, **params)
              for name, params in progress_over(_objectives(args), "sequence", not args.no_progress)]
    frame = pd.concat(frames, ignore_index=True)
    write_csv(frame, args.csv)
    cols = ["objective", "staleness", "kl", "bias", "variance", "cosine", "scale", "dead_frac"]
    print(frame[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0
