"""``sspo study tuned`` as a function: train what the plan needs (or nothing), then write the tables, figures and
report from ``runs.jsonl.gz`` alone."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from sspo_analysis.study.execute import Display
from sspo_analysis.study.stability import read_timing, record_call
from sspo_analysis.study.tuned import TunedPlan
from sspo_analysis.study.tuned_execute import execute_tuned


def tuned(plan: TunedPlan, out: str | Path, *, jobs: int = 2, console: Any = None, progress: bool = True,  # noqa: PLR0913
          train: bool = True, command: str = "", executor: str = "local") -> list[Path]:
    """Train (unless ``train`` is false) what ``plan`` still needs under ``out`` on ``jobs`` processes (or Ray
    tasks: ``executor``), then write every output.

    Returns the written paths. A ValueError before any work for an invalid plan, an
    unwritable ``out`` or a damaged ``runs.jsonl.gz``.
    """
    from rich.console import Console

    from sspo_analysis.study import tuned_report
    from sspo_analysis.study.tuned import read_records
    from sspo_analysis.training.runs import check_output_dir, run_lock

    if not (isinstance(jobs, int) and jobs >= 1):
        raise ValueError(f"--jobs: must be an integer >= 1, got {jobs!r}")
    plan.check()
    root = check_output_dir(out, "--out")
    root.mkdir(parents=True, exist_ok=True)
    console = console or Console()
    with run_lock(root):
        read_records(root / "runs.jsonl.gz")  # a damaged archive is refused before any training
        record = read_timing(root)
        trained = 0
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        if train:
            display = Display(console, progress)
            with display.progress:
                trained = execute_tuned(plan, root, jobs, display, executor)
        timing = record_call(root, record, time.perf_counter() - t0, trained, (load0, os.getloadavg()[0]))
        console.print("study: analysing the recorded runs and drawing the figures")
        return tuned_report.write_outputs(plan, root, command or f"sspo study tuned --out {out}", timing)
