"""``sspo pretrain | train | sweep | export | plot``: the trainer's sub-commands (the curves are drawn by
:mod:`sspo_analysis.plotting.runs`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sspo_analysis.cli_common import add_config_args


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="supervised warm start of a tiny preset on a task (20-60%% success)")
    add_config_args(p)
    p.add_argument("--out", default=None, help="output directory (default: the warm-start cache used by train)")
    p.set_defaults(func=run_pretrain)

    p = sub.add_parser("train", help="RL-train a causal LM with one objective (no arguments: tiny CPU addition run)",
                       description="RL-train a causal LM with one objective of sspo_analysis.objectives. With no "
                       "arguments: 60 grpo steps of the tiny preset on 2-digit addition on CPU, from a cached warm "
                       "start. The run directory gets config.toml, metrics.jsonl, checkpoint/, final/ (the policy "
                       "for from_pretrained) and, with log.report_to=[\"tensorboard\"], tensorboard/.",
                       epilog=config_sections_text(), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_args(p)
    p.add_argument("--out", default=None, help="run directory (default runs/<objective>_seed<seed>_<time>)")
    p.add_argument("--resume", default=None, metavar="RUN", help="continue the run in RUN from its checkpoint")
    p.set_defaults(func=run_train)

    p = sub.add_parser("sweep", help="objectives x seeds from one warm start, one directory per run")
    add_config_args(p)
    p.add_argument("--objectives", default="grpo,dapo,gspo,gmpo,sapo,sspo", help="comma-separated objective names")
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    p.add_argument("--tag", default="", help="suffix of each run directory name")
    p.add_argument("--out", default="runs/sweep", help="output directory (default runs/sweep)")
    p.add_argument("--rerun", action="store_true", help="run again the existing runs made with other settings")
    p.set_defaults(func=run_sweep)

    p = sub.add_parser("config", help="show the resolved trainer config (TOML) with each field's allowed values")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = actions.add_parser("show", help="print the resolved config as TOML, allowed values as comments",
                           description="Print the config that `sspo train` with the same --config/--set would run, "
                           "as TOML; each field's allowed values follow it as a comment.")
    add_config_args(q)
    q.set_defaults(func=run_config_show)

    p = sub.add_parser("export", help="save RUN's policy and tokenizer from its last checkpoint to RUN/final",
                       description="Save the policy of RUN's last checkpoint and its tokenizer with save_pretrained "
                       "to RUN/final (a finished run already has it): AutoModelForCausalLM.from_pretrained loads it.")
    p.add_argument("run", help="run directory (with config.toml and checkpoint/state.pt)")
    p.set_defaults(func=run_export)

    p = sub.add_parser("plot", help="training curves of one or more runs")
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", default="figures", help="output directory (default figures/)")
    p.set_defaults(func=run_plot)


def run_pretrain(args: argparse.Namespace) -> int:
    import json

    from sspo_analysis.training.config import load_config
    from sspo_analysis.training.warm_start import ensure_warm_start, pretrain

    cfg = load_config(args.config, args.overrides)
    progress = False if args.no_progress else None
    out = pretrain(cfg, args.out, progress=progress) if args.out else ensure_warm_start(cfg, progress)
    info = json.loads((Path(out) / "warm_start.json").read_text())
    print(f"warm start: {out}\n  success {info['success']:.3f} after {info['steps']} steps in {info['seconds']:.1f} s")
    return 0


def run_train(args: argparse.Namespace) -> int:
    from sspo_analysis.training.health import no_signal
    from sspo_analysis.training.readers import read_metrics
    from sspo_analysis.training.runs import RunInterrupted
    from sspo_analysis.training.trainer import train

    progress = False if args.no_progress else None
    if args.resume and args.config:
        raise ValueError("--resume: the run's own config.toml is used; drop --config")
    try:
        if args.resume:
            run = train(None, args.resume, overrides=args.overrides, resume=True, progress=progress)
        else:
            run = train(args.config, args.out, overrides=args.overrides, progress=progress)
    except RunInterrupted as stop:  # Ctrl-C: one line, the shell's status for SIGINT
        print(f"sspo train: {stop}", file=sys.stderr)
        return 130
    if (run / "DIVERGED").exists():
        import json

        why = json.loads((run / "DIVERGED").read_text())
        print(f"sspo train: run {run} diverged at step {why['step']}: {why['reason']}", file=sys.stderr)
        return 3
    df = read_metrics(run)
    k = max(1, min(5, len(df) // 4))
    print(f"run: {run}\n  reward {df.reward_mean.head(k).mean():.3f} (first {k} steps) -> "
          f"{df.reward_mean.tail(k).mean():.3f} (last {k}); entropy {df.entropy.iloc[0]:.3f} -> "
          f"{df.entropy.iloc[-1]:.3f}; {df.wall_time.iloc[-1]:.1f} s, {df.sequences_per_s.median():.0f} sequences/s")
    silent = no_signal(df.to_dict("records"))  # said once while training too
    if silent:
        print(f"  {silent}")
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    from sspo_analysis.training.sweeps import sweep

    runs = sweep(args.objectives, args.seeds, args.config, args.out, args.overrides, tag=args.tag,
                 progress=False if args.no_progress else None, rerun=args.rerun)
    n = len([x for x in args.objectives.split(",") if x]) * len([x for x in args.seeds.split(",") if x])
    diverged = sum((Path(r) / "DIVERGED").exists() for r in runs)
    print(f"sweep: {len(runs)}/{n} runs finished under {args.out}" + (f" ({diverged} diverged)" if diverged else ""))
    return 0 if len(runs) == n else 1


def config_sections_text() -> str:
    """The config's sections and their fields, for ``sspo train --help``."""
    import dataclasses

    from sspo_analysis.training.config import TrainConfig

    top, lines = [], ["config sections (set any field with --set SECTION.FIELD=VALUE; sspo config show lists "
                      "the allowed values):"]
    for f in dataclasses.fields(TrainConfig):
        value = getattr(TrainConfig(), f.name)
        if not dataclasses.is_dataclass(value):
            top.append(f.name)
            continue
        names = [g.name for g in dataclasses.fields(value) if g.name != "params"]
        if f.name == "objective":
            names.append("<the objective's parameters>")
        lines.append(f"  [{f.name}] {', '.join(names)}")
    lines.insert(1, f"  (top level) {', '.join(top)}")
    return "\n".join(lines)


def run_config_show(args: argparse.Namespace) -> int:
    from sspo_analysis.training.config import load_config
    from sspo_analysis.training.config_doc import annotated_toml

    print(annotated_toml(load_config(args.config, args.overrides)), end="")
    return 0


def run_export(args: argparse.Namespace) -> int:
    from sspo_analysis.training.outputs import export_run

    print(f"wrote {export_run(args.run)}")
    return 0


def run_plot(args: argparse.Namespace) -> int:
    from sspo_analysis.plotting.runs import plot_runs

    for path in plot_runs(args.runs, args.out):
        print(f"wrote {path}")
    return 0
