"""``sspo study stability`` as a function: train the plan (or reuse it), then write the tables, figures and report.

Outputs under ``out``: ``runs/`` (one trainer run directory per arm, regime and
seed), ``stability.csv``, ``summary.csv``, ``comparisons.csv``, ``theory.csv``,
``theory_correlations.csv``, ``figures/``, ``timing.json`` and ``results.md``. The study
directory is owned by one process at a time (a lock file); every file is written
atomically. The warm starts live in the trainer's one cache (``$SSPO_CACHE`` or
``~/.cache/sspo_analysis``), shared with every entry point.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from sspo_analysis.io import write_frame, write_json, write_text
from sspo_analysis.study import collect, report
from sspo_analysis.study.design import Plan
from sspo_analysis.study.execute import Display, execute, validate


def read_timing(root: Path) -> dict[str, Any]:
    """``timing.json``: the training wall time summed over every call that trained, and each such call."""
    import json

    path = root / "timing.json"
    try:
        record = json.loads(path.read_text()) if path.exists() else {"train_seconds": 0.0, "calls": []}
        record["train_seconds"] = float(record["train_seconds"])
        list(record["calls"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path}: not a study timing record ({err}); remove it to start the record afresh") from err
    return record


def record_call(root: Path, record: dict[str, Any], seconds: float, trained: int,
              load: tuple[float, ...]) -> dict[str, Any]:
    """``record`` with this call's training time added (when it trained), written to ``timing.json``."""
    if trained:
        record["train_seconds"] += seconds
        record["calls"].append({"seconds": round(seconds, 1), "runs_trained": trained, "cpus": os.cpu_count(),
                                "load_average_1min_start_end": [round(x, 2) for x in load]})
    write_json(root / "timing.json", record)
    return record


def analyse_stability(plan: Plan, root: Path) -> dict[str, Any]:
    """Every table of the study from its runs (no training)."""
    import pandas as pd

    runs = collect.read_runs(plan, root)
    df = collect.tidy(plan, root, runs)
    frames = [m.assign(arm=s.arm.label, seed=s.seed) for s, m in runs.items()
              if s.regime == plan.headline and m is not None]
    per_arm, corr = collect.theory_ranking(df, plan)
    return {"tidy": df, "summary": collect.summarise(df), "comparisons": collect.compare(df, plan.headline.label),
            "theory": per_arm, "theory_corr": corr,
            "metrics": pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()}


def write_outputs(plan: Plan, root: Path, data: dict[str, Any], command: str, timing: dict[str, Any]) -> list[Path]:
    """The CSVs, figures and ``results.md`` of a study."""
    paths = []
    for stem, key in (("stability", "tidy"), ("summary", "summary"), ("comparisons", "comparisons"),
                      ("theory", "theory"), ("theory_correlations", "theory_corr")):
        paths.append(write_frame(data[key], root / f"{stem}.csv"))
    arms = [a.label for a in plan.arms]
    regimes = plan.regime_labels()
    paths += report.figures(root, data, arms, regimes, plan.headline.label)
    paths += report.staleness_figure(root / "figures", plan.arms, plan.gradient_batches)
    calls = timing["calls"]
    loads = [x for c in calls for x in c["load_average_1min_start_end"]]
    load = (f"{calls[-1]['cpus']} CPUs, 1-minute load average {min(loads):.1f} to {max(loads):.1f} at the start "
            "and end of training") if calls else "all runs reused"
    data = {**data, "peak_note": report.peak_note(data["tidy"])}
    text = report.stability_markdown(data, plan, command, timing["train_seconds"], load)
    paths.append(write_text(root / "results.md", text))
    return paths


def stability(plan: Plan, out: str | Path, *, jobs: int = 2, console: Any = None, progress: bool = True,  # noqa: PLR0913
              rerun: bool = False, command: str = "", executor: str = "local") -> list[Path]:
    """Train (or reuse) every run of ``plan`` under ``out`` with ``jobs`` processes (or Ray tasks, with
    ``executor = "ray"``: :mod:`~sspo_analysis.study.pools`), then write the outputs.

    Returns the written paths. A ValueError before any work if a setting is invalid,
    ``out`` cannot be written, or an existing run was made with other settings (unless ``rerun``).
    """
    from rich.console import Console

    from sspo_analysis.training.runs import check_output_dir, run_lock

    if not (isinstance(jobs, int) and jobs >= 1):
        raise ValueError(f"--jobs: must be an integer >= 1, got {jobs!r}")
    root = check_output_dir(out, "--out")
    root.mkdir(parents=True, exist_ok=True)
    console = console or Console()
    with run_lock(root):
        if not rerun:
            validate(plan, root)
        record = read_timing(root)  # a damaged record is refused before any training
        display = Display(console, progress)
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        with display.progress:
            execute(plan, root, jobs, display, rerun, executor)
        trained = sum(display.counts.values())
        timing = record_call(root, record, time.perf_counter() - t0, trained, (load0, os.getloadavg()[0]))
        console.print("study: analysing the runs and drawing the figures")
        data = analyse_stability(plan, root)
        return write_outputs(plan, root, data, command or f"sspo study stability --out {out}", timing)
