"""``sspo theory``: one objective's coefficient moments, or a grid of them.

Examples::

    sspo theory --objective grpo --log-ratio-std 0.3 --advantage-sign + --json
    sspo theory --objective sspo --gate erf --tau 2 --log-ratio-std 0.3 --length 16 --advantage-sign -
    sspo theory --grid --objectives all --stds 0.3 --lengths 1,16,256 --markdown
    sspo theory --grid --objectives grpo,sspo --stds 0.01:1:40 --lengths 1,16,256 --taus 0.5,1,2 --csv grid.csv
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from sspo_analysis.cli_common import add_objective_flags, float_list, int_list, objective_params, str_list, write_csv
from sspo_analysis.io import json_safe

__all__ = ["register", "run_theory", "markdown_table", "grid_records"]

_STAT_LABELS = {
    "mean_coefficient": "E[c]", "var_coefficient": "Var[c]", "dead_fraction": "P(c=0)",
    "mean_weight": "E[w]", "var_weight": "Var[w]", "ess_fraction": "ESS",
}


# --------------------------------------------------------------------------- commands


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``sspo theory``."""
    p = sub.add_parser(
        "theory", help="moments of an objective's gradient coefficient under a log-ratio model (or a grid)",
        description="Bias, variance, dead fraction and effective sample size of each objective's gradient "
                    "coefficient, normalised so that the on-policy value is 1.")
    p.add_argument("--objective", help="one objective (registered, or is-token / is-seq / pg)")
    p.add_argument("--log-ratio-std", type=float, help="std s of the token log-ratio (> 0)")
    p.add_argument("--log-ratio-mean", type=float, help="mean m of the token log-ratio (default -s^2/2: E[r] = 1)")
    p.add_argument("--length", type=int, default=1, help="tokens per sequence L (default 1)")
    p.add_argument("--correlation", type=float, default=0.0, help="AR(1) correlation along the sequence (default 0)")
    p.add_argument("--advantage-sign", default="+", help="sign of A: +, -, +1, -1, pos, neg (default +)")
    p.add_argument("--run", help="use the log-ratios a training run logged (RUN/log_ratios) instead of a log-normal")
    p.add_argument("--steps", help="with --run: comma-separated steps to pool (default all)")
    p.add_argument("--method", default="auto", help="auto, closed-form, quadrature or monte-carlo (default auto)")
    p.add_argument("--n-samples", type=int,
                   help="Monte Carlo sequences (streamed: memory is bounded by one chunk of 2^18 tokens, or one "
                        "sequence if longer, whatever the number)")
    p.add_argument("--seed", type=int, default=0, help="Monte Carlo seed (default 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object (with --grid: a JSON list, one per row)")
    add_objective_flags(p, lists=True)
    g = p.add_argument_group("grid (--grid)")
    g.add_argument("--grid", action="store_true", help="sweep a grid; write it with --csv or print it")
    g.add_argument("--objectives", default="all", help="comma-separated objectives, or all (default all)")
    g.add_argument("--stds", help="comma-separated stds, or lo:hi:n log-spaced")
    g.add_argument("--lengths", default="1", help="comma-separated lengths (default 1)")
    g.add_argument("--signs", default="+,-", help="comma-separated advantage signs (default +,-)")
    g.add_argument("--csv", help="write the grid to this CSV file")
    g.add_argument("--markdown", action="store_true", help="print the grid as a markdown table")
    p.set_defaults(func=run_theory)


def run_theory(args: argparse.Namespace) -> int:
    """Entry point of ``sspo theory``."""
    return _run_grid(args) if args.grid else _run_one(args)


def _run_one(args: argparse.Namespace) -> int:
    from sspo_analysis.objectives import resolve_objective
    from sspo_analysis.theory import EmpiricalRatios, LogNormalRatios, analyse

    if args.objective is None:
        raise ValueError("--objective: required (or use --grid)")
    resolve_objective(args.objective)  # an unknown name is reported before its parameters
    obj = resolve_objective(args.objective, **objective_params(args.objective, args, strict=True))
    if args.run:
        steps = None if args.steps is None else int_list(args.steps, "--steps")
        model: Any = EmpiricalRatios.from_run(args.run, steps)
    else:
        if args.log_ratio_std is None:
            raise ValueError("--log-ratio-std: required (a number > 0), or give --run")
        model = LogNormalRatios(args.log_ratio_std, args.length, args.log_ratio_mean, args.correlation)
    result = analyse(obj, model, args.advantage_sign, method=args.method, n_samples=args.n_samples, seed=args.seed)
    out = result.to_dict()
    if args.json:
        print(json.dumps(json_safe(out), allow_nan=False))
        return 0
    params_text = ", ".join(f"{k}={v}" for k, v in sorted(result.params.items())) or "no parameters"
    print(f"{out['objective']} ({params_text}); A {out['advantage_sign']:+d}; log-ratio mean "
          f"{out['log_ratio_mean']:.4g}, std {out['log_ratio_std']:.4g}; length {out['length']:g}; {out['method']}")
    se = out["mc_stderr"] or {}
    for key, label in _STAT_LABELS.items():
        err = f" +- {se[key]:.2g}" if key in se else ""
        print(f"  {key:<17} {label:<7} {out[key]:.6g}{err}")
    return 0


def _run_grid(args: argparse.Namespace) -> int:
    from sspo_analysis.objectives import all_objective_names
    from sspo_analysis.theory import sweep

    if args.stds is None:
        if args.log_ratio_std is None:
            raise ValueError("--stds: required with --grid (comma-separated, or lo:hi:n)")
        args.stds = str(args.log_ratio_std)
    names = all_objective_names() if args.objectives == "all" else str_list(args.objectives)
    fixed = {"tau_pos": args.tau_pos, "tau_neg": args.tau_neg, "eps_lo": args.eps_lo, "eps_hi": args.eps_hi,
             "eps_max": args.eps_max, "one_sided": args.one_sided}
    if any(v is not None for v in fixed.values()):
        raise ValueError("--tau-pos, --tau-neg, --eps-lo, --eps-hi, --eps-max, --one-sided: single-point only; "
                         "with --grid use --taus, --eps, --gates")
    if args.json and args.markdown:
        raise ValueError("--json, --markdown: give one of them")
    frame = sweep(
        names,
        float_list(args.stds, "--stds"),
        int_list(args.lengths, "--lengths"),
        signs=str_list(args.signs),
        taus=None if args.tau is None else float_list(args.tau, "--taus"),
        eps=None if args.eps is None else float_list(args.eps, "--eps"),
        method=args.method,
        gates=None if args.gate is None else str_list(args.gate),
        log_ratio_mean=args.log_ratio_mean,
        correlation=args.correlation,
        n_samples=args.n_samples,
        seed=args.seed,
    )
    if args.csv:  # mc_stderr as JSON, like the params column
        write_csv(frame.assign(mc_stderr=[None if v is None else json.dumps(v, sort_keys=True)
                                          for v in frame["mc_stderr"]]), args.csv)
    if args.json:
        print(json.dumps(json_safe(grid_records(frame)), allow_nan=False))
    elif args.markdown:
        print(markdown_table(frame))
    elif not args.csv:
        cols = ["objective", "gate", "tau", "eps", "advantage_sign", "log_ratio_std", "length", *_STAT_LABELS, "method"]
        print(frame[cols].to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return 0


def grid_records(frame: Any) -> list[dict[str, Any]]:
    """The grid as plain rows for JSON: the frame's columns, ``params`` as an object, NaN kept for ``json_safe``."""
    records = frame.to_dict(orient="records")
    for row in records:
        row["params"] = json.loads(row["params"])
        for key, value in row.items():
            if hasattr(value, "item"):  # a numpy scalar
                row[key] = value.item()
    return records


def _setting(row: Any) -> str:
    parts = []
    if isinstance(row.gate, str):
        parts.append(row.gate)
    if not math.isnan(row.tau):
        parts.append(f"tau={row.tau:g}")
    if not math.isnan(row.eps):
        parts.append(f"{'eps_max' if 'eps_max' in row.params else 'eps'}={row.eps:g}")
    if row.one_sided is True:
        parts.append("one-sided")
    return ", ".join(parts)


def markdown_table(frame: Any, stats: tuple[str, ...] = ("mean_coefficient", "var_coefficient", "dead_fraction",
                                                           "ess_fraction")) -> str:
    """A compact markdown table: one row per objective setting, sign and std; each cell lists the lengths."""
    lengths = sorted(frame["length"].unique())
    head = "L = " + " / ".join(str(v) for v in lengths)
    lines = [f"| objective | parameters | A | std | {' | '.join(_STAT_LABELS[s] for s in stats)} |",
             "|---|---|---|---|" + "---|" * len(stats),
             f"| | | | | {' | '.join(head for _ in stats)} |"]
    keys = ["objective", "params", "advantage_sign", "log_ratio_std"]
    for _, group in frame.groupby(keys, sort=False):
        group = group.sort_values("length")
        first = group.iloc[0]
        cells = [" / ".join(_fmt(v) for v in group[s]) for s in stats]
        lines.append(f"| {first.objective} | {_setting(first)} | {'+' if first.advantage_sign > 0 else '-'} | "
                     f"{first.log_ratio_std:g} | {' | '.join(cells)} |")
    return "\n".join(lines)


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.2g}"
    return f"{v:.3f}"
