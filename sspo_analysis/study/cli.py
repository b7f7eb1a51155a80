"""``sspo study stability``: the stability study's command line."""

from __future__ import annotations

import argparse
import sys

EXECUTORS = ("local", "ray")  # sspo_analysis.study.pools.EXECUTORS (not imported here: the CLI starts fast)
EXECUTOR_HELP = ("where runs train: local (a process pool on this machine, the default) or ray (pip install -e "
                 "'.[ray]'; a local Ray instance with --jobs CPUs, or the cluster RAY_ADDRESS names)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("study", help="studies built from many training runs (tuned, stability)")
    studies = p.add_subparsers(dest="study", metavar="STUDY", required=True)
    s = studies.add_parser(
        "stability", help="where and how each objective becomes unstable: a map, a paired headline comparison, "
        "theory's ranking",
        description="Train every objective over a grid of regimes (learning rate, updates per rollout batch, "
        "staleness, answer length) and seeds; report which runs become unstable and when, a paired comparison "
        "with bootstrap CIs in the headline regime, and theory's predicted ranking. Finished runs are reused, "
        "killed runs resume, a crashed run is recorded and the others go on.")
    s.add_argument("--quick", action="store_true", help="the CI smoke plan (a few minutes; no conclusions)")
    s.add_argument("--out", default=None, help="output directory (default: study_stability[_quick]/)")
    s.add_argument("--seeds", default=None, metavar="LIST",
                   help="headline seeds, comma-separated (the map uses the first few, as many as the plan has "
                   "map seeds); default: the plan's")
    s.add_argument("--jobs", type=int, default=2, help="runs trained at once, one torch thread each (default 2)")
    s.add_argument("--executor", default="local", choices=EXECUTORS, help=EXECUTOR_HELP)
    s.add_argument("--rerun", action="store_true", help="train again the runs that exist (made with other settings)")
    s.add_argument("--no-progress", action="store_true", help="no live display (one line per finished run)")
    s.set_defaults(func=run_stability)
    t = studies.add_parser(
        "tuned", help="every objective at its own learning rate: tuning ladders, paired evaluation on held-out "
        "accuracy over independent warm starts",
        description="Tune each objective's learning rate on tuning (warm start, seed) pairs, evaluate it at the "
        "chosen rate and twice it on disjoint pairs over every warm start, and compare the objectives paired, "
        "on held-out accuracy, stability, movement and entropy. Every finished run is recorded in "
        "OUT/runs.jsonl.gz; a call re-derives every table, figure and results.md from it and trains only what "
        "the plan still needs.")
    t.add_argument("--quick", action="store_true", help="the CI smoke plan (about a minute; no conclusions)")
    t.add_argument("--out", default=None, help="output directory (default: study_tuned[_quick]/)")
    t.add_argument("--jobs", type=int, default=2, help="runs trained at once, one torch thread each (default 2)")
    t.add_argument("--executor", default="local", choices=EXECUTORS, help=EXECUTOR_HELP)
    t.add_argument("--analyse-only", action="store_true",
                   help="train nothing: re-derive the outputs from OUT/runs.jsonl.gz as it is")
    t.add_argument("--no-progress", action="store_true", help="no live display (one line per finished run)")
    t.set_defaults(func=run_tuned)


def _seeds(text: str) -> tuple[int, ...]:
    try:
        seeds = tuple(dict.fromkeys(int(x) for x in text.split(",") if x.strip()))
    except ValueError:
        raise ValueError(f"--seeds: expected comma-separated integers >= 0, got {text!r}") from None
    if not seeds or min(seeds) < 0:
        raise ValueError(f"--seeds: expected comma-separated integers >= 0, got {text!r}")
    return seeds


def run_stability(args: argparse.Namespace) -> int:
    """Entry point of ``sspo study stability``."""
    import os

    os.environ.setdefault("MPLBACKEND", "Agg")
    from sspo_analysis.study import PLANS
    from sspo_analysis.study.stability import stability

    plan = PLANS["quick" if args.quick else "full"]
    if args.seeds is not None:
        plan = plan.with_seeds(_seeds(args.seeds))
    out = args.out or f"study_stability{'_quick' if args.quick else ''}"
    command = "sspo study stability " + " ".join(sys.argv[3:]) if sys.argv[1:3] == ["study", "stability"] else ""
    try:
        paths = stability(plan, out, jobs=args.jobs, progress=not args.no_progress, rerun=args.rerun,
                          command=command, executor=args.executor)
    except KeyboardInterrupt:
        print(f"study: interrupted; finished runs are kept and the same command resumes ({out}/)", file=sys.stderr)
        return 130
    print(f"study: wrote {len(paths)} files under {out}/: results.md, timing.json, stability.csv, summary.csv, "
          "comparisons.csv, theory.csv, theory_correlations.csv, figures/")
    return 0


def run_tuned(args: argparse.Namespace) -> int:
    """Entry point of ``sspo study tuned``."""
    import os

    os.environ.setdefault("MPLBACKEND", "Agg")
    from sspo_analysis.study.tuned import TUNED_PLANS
    from sspo_analysis.study.tuned_study import tuned

    plan = TUNED_PLANS["quick" if args.quick else "full"]
    out = args.out or f"study_tuned{'_quick' if args.quick else ''}"
    # the outputs do not depend on --jobs, --executor, --analyse-only or --no-progress: results.md names only OUT
    command = f"sspo study tuned{' --quick' if args.quick else ''} --out {out}"
    try:
        paths = tuned(plan, out, jobs=args.jobs, progress=not args.no_progress, train=not args.analyse_only,
                      command=command, executor=args.executor)
    except KeyboardInterrupt:
        print(f"study: interrupted; recorded runs are kept and the same command resumes ({out}/)", file=sys.stderr)
        return 130
    print(f"study: wrote {len(paths)} files under {out}/: results.md, sweep.csv, best.csv, comparisons.csv, "
          "figures/")
    return 0
