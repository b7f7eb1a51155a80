"""Training a plan's runs: parallel jobs over the trainer's sweep, with a live display of runs and time left.

Each run goes through :func:`sspo_analysis.training.sweep`, so a finished run
(``DONE`` or ``DIVERGED``) is reused, a killed one resumes from its checkpoint,
a crashed one writes ``FAILED`` and the others go on, and a run directory made
with other settings is refused (``rerun`` starts it again). Jobs are separate
processes with one torch thread each; the warm starts (one per answer length)
are made first, once, and cached.
"""

from __future__ import annotations

import contextlib
import io
import sys
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any

from sspo_analysis.study.design import Plan, StudyRun
from sspo_analysis.study.pools import open_pool

Report = Callable[[str], None]


def warm_start(overrides: list[str]) -> str:
    """Job: the cached warm start of the config ``overrides`` describe (made if missing); returns its path."""
    from sspo_analysis.training import load_config
    from sspo_analysis.training.warm_start import ensure_warm_start

    # On a terminal the parent's display shows this phase; in a log, the warm start's own lines do.
    return str(ensure_warm_start(load_config(None, overrides), progress=not sys.stderr.isatty()))


def train_job(objective: str, seed: int, group: str, overrides: list[str], tag: str, rerun: bool) -> tuple[str, float]:
    """Job: one run through the trainer's sweep; returns its printed messages and seconds."""
    from sspo_analysis.training import sweep

    t0 = time.perf_counter()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        sweep([objective], [seed], None, group, overrides, tag=tag, progress=False, rerun=rerun)
    return out.getvalue().strip(), time.perf_counter() - t0


def run_state(run: Path) -> str:
    """``done``, ``diverged``, ``failed`` or ``missing``: what a run directory holds."""
    for marker, state in (("DIVERGED", "diverged"), ("DONE", "done"), ("FAILED", "failed")):
        if (run / marker).exists():
            return state
    return "missing"


def validate(plan: Plan, root: Path) -> None:
    """Every run's settings are valid and every existing run can be reused, before any work starts."""
    from sspo_analysis.training.sweeps import check_sweep

    for spec in plan.runs():
        run = spec.run_dir(root / "runs")
        check_sweep([spec.arm.objective], [spec.seed], None, run.parent, spec.overrides(plan), tag=spec.arm.tag)


def execute(plan: Plan, root: Path, jobs: int, display: Display, rerun: bool = False,
            executor: str = "local") -> None:
    """Train every run of ``plan`` under ``root/runs`` that is not finished, ``jobs`` at a time, on the
    ``executor``'s pool (:mod:`~sspo_analysis.study.pools`)."""
    specs = plan.runs()
    todo = [s for s in specs if run_state(s.run_dir(root / "runs")) in ("missing", "failed") or rerun]
    display.start(len(specs), len(specs) - len(todo))
    if not todo:
        display.phase("all runs reused")
        return
    with open_pool(executor, jobs) as pool:
        lengths = {s.regime.length: s for s in todo}
        display.phase(f"warm starts for answer lengths {', '.join(map(str, sorted(lengths)))} (made once, cached)")
        for fut in [pool.submit(warm_start, s.overrides(plan)) for s in lengths.values()]:
            display.note(f"warm start ready: {fut.result()}")
        display.phase(f"training ({jobs} jobs)")
        pending: dict[Future, StudyRun] = {}
        queue = list(todo)
        while queue or pending:
            while queue and len(pending) < jobs:
                spec = queue.pop(0)
                group = spec.run_dir(root / "runs").parent
                pending[pool.submit(train_job, spec.arm.objective, spec.seed, str(group),
                                    spec.overrides(plan), spec.arm.tag, rerun)] = spec
                display.running(spec)
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                spec = pending.pop(fut)
                messages, seconds = fut.result()
                display.finished(spec, run_state(spec.run_dir(root / "runs")), seconds, messages)


class Display:
    """The study's live display: a bar over all runs with the time left, and one line per run in progress."""

    def __init__(self, console, enabled: bool = True) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.console = console
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), console=console,
                                 disable=not enabled)
        self.overall = self.progress.add_task("runs", total=1)
        self.active: dict[str, int] = {}
        self.counts = {"done": 0, "diverged": 0, "failed": 0}
        self.t0 = time.perf_counter()

    def grow(self, more: int) -> None:
        """``more`` runs to train were added (a stage whose runs depend on the ones before)."""
        total = self.progress.tasks[self.overall].total or 0
        self.progress.update(self.overall, total=total + more)

    def start(self, total: int, reused: int) -> None:
        # The bar counts only the runs to train: reused runs would make the time-left estimate far too short.
        self.progress.update(self.overall, total=max(total - reused, 1), completed=0)
        self.console.print(f"study: {total} runs, {reused} reused, {total - reused} to train")

    def phase(self, text: str) -> None:
        """A new phase: the bar says it, and a line with the time so far, so a log shows where the time goes."""
        self.progress.update(self.overall, description=text)
        self.note(text)

    def note(self, text: str) -> None:
        self.console.print(f"study: {text} ({time.perf_counter() - self.t0:.0f} s)")

    def running(self, spec: Any) -> None:
        """A run started (a :class:`StudyRun` or any run with ``name`` and ``text()``)."""
        self.active[spec.name] = self.progress.add_task(f"  {_describe(spec)}", total=None)

    def finished(self, spec: Any, state: str, seconds: float, messages: str) -> None:
        self.progress.remove_task(self.active.pop(spec.name))
        self.progress.advance(self.overall)
        if state in self.counts:
            self.counts[state] += 1
        note = f" ({messages.splitlines()[-1]})" if state == "failed" and messages else ""
        self.console.print(f"{state:>8} {_describe(spec)} in {seconds:.0f} s{note}")


def _describe(spec: Any) -> str:
    if isinstance(spec, StudyRun):
        return f"{spec.arm.label} | {spec.regime.label} | seed {spec.seed}"
    return spec.text()
