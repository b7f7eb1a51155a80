"""Training the tuned study: the runs each stage needs now, given the runs already recorded, two jobs at a time.

A run goes through the trainer's sweep (so a killed run resumes from its checkpoint and
a crashed one writes ``FAILED``); when it ends, it is compacted into ``runs.jsonl.gz``
and the stages' decisions are re-derived, which may add runs (a rung up the ladder, an
arm's evaluation once its tuning is over). A recorded run is never trained again.
"""

from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Future, wait
from pathlib import Path
from typing import Any

from sspo_analysis.study.execute import Display, run_state, train_job, warm_start
from sspo_analysis.study.pools import open_pool
from sspo_analysis.study.tuned import (
    TunedPlan,
    TunedRun,
    choose,
    compact,
    next_rungs,
    outcomes,
    read_records,
    record_key,
    rung_above,
    write_records,
)


def tuning_outcomes(plan: TunedPlan, records: dict[tuple, dict[str, Any]], arm, task: str,
                    updates: int) -> dict[float, dict[str, Any]]:
    """One arm's finished tuning rungs: ``{lr: {"unstable", "heldout_auc"}}`` averaged over the tuning pairs
    (a rung counts only when all its pairs are recorded)."""
    out = {}
    for lr in plan.ladder:
        rows = [records.get(record_key(TunedRun(arm, task, lr, updates, w, s, "tune").key)) for w, s in plan.tune_pairs]
        if all(rows):
            measured = [outcomes(r) for r in rows]
            out[lr] = {k: sum(m[k] for m in measured) / len(measured) for k in ("unstable", "heldout_auc")}
    return out


def wanted_runs(plan: TunedPlan, records: dict[tuple, dict[str, Any]]) -> list[TunedRun]:
    """Every run the study needs now and has not recorded, in the order to train them (per task and update
    count: tuning, then evaluation)."""
    runs: list[TunedRun] = []
    for task in plan.tasks:
        for updates in sorted(set(plan.tune_updates) | set(plan.eval_updates)):
            for role in ("tune", "eval"):
                for arm in plan.arms_at(updates, task):
                    runs += _arm_runs(plan, records, arm, task.label, updates, role)
    return [r for r in runs if record_key(r.key) not in records]


def _arm_runs(plan: TunedPlan, records, arm, task: str, updates: int, role: str) -> list[TunedRun]:
    tuned = tuning_outcomes(plan, records, arm, task, updates)
    rungs = next_rungs(plan, updates, tuned)
    if role == "tune":
        return [TunedRun(arm, task, lr, updates, w, s, "tune") for lr in rungs for w, s in plan.tune_pairs]
    if rungs or updates not in plan.eval_updates:
        return []  # evaluation waits for the arm's tuning to end
    best = choose(tuned)
    rates = [best] + ([rung_above(plan.ladder, best)] if rung_above(plan.ladder, best) else [])
    return [TunedRun(arm, task, lr, updates, w, s, "eval") for lr in rates for w, s in plan.eval_pairs]


def execute_tuned(plan: TunedPlan, root: Path, jobs: int, display: Display, executor: str = "local") -> int:
    """Train what the study needs under ``root/runs`` until nothing more is wanted, on the ``executor``'s pool;
    returns the runs trained."""
    archive = root / "runs.jsonl.gz"
    records = read_records(archive)
    todo = wanted_runs(plan, records)
    display.start(len(records) + len(todo), len(records))
    if not todo:
        display.phase("every run the plan needs is recorded")
        return 0
    trained, failed, pending = 0, set(), {}
    with open_pool(executor, jobs) as pool:
        display.phase("warm starts (shipped with the package, or made once and cached)")
        firsts = {(r.task, w): TunedRun(r.arm, r.task, r.lr, r.updates, w, 0, "eval") for r in todo
                  for w in plan.warm_starts}
        for fut in [pool.submit(warm_start, plan.overrides(r)) for r in firsts.values()]:
            display.note(f"warm start ready: {fut.result()}")
        display.phase(f"training ({jobs} jobs)")
        known = {r.name for r in todo}
        while True:
            todo = [r for r in wanted_runs(plan, records) if r.name not in failed]
            new = [r for r in todo if r.name not in known]
            if new:
                display.grow(len(new))
                known.update(r.name for r in new)
            for run in todo:
                if len(pending) >= jobs:
                    break
                if run.name not in {p.name for p in pending.values()}:
                    pending[_submit(pool, plan, root, run)] = run
                    display.running(run)
            if not pending:
                return trained
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                run = pending.pop(fut)
                messages, seconds = fut.result()
                state = run_state(run_dir(root, run))
                display.finished(run, state, seconds, messages)
                if state in ("done", "diverged"):
                    records[record_key(run.key)] = compact(run, run_dir(root, run), plan.steps, plan.eval_every)
                    write_records(archive, records)
                    trained += 1
                else:
                    failed.add(run.name)


def run_dir(root: Path, run: TunedRun) -> Path:
    """Where ``run`` trains: the sweep's ``OBJECTIVE_seedSEED`` inside a folder named after the run."""
    return root / "runs" / run.name / f"{run.arm.objective}_seed{run.seed}"


def _submit(pool: Any, plan: TunedPlan, root: Path, run: TunedRun) -> Future:
    return pool.submit(train_job, run.arm.objective, run.seed, str(run_dir(root, run).parent), plan.overrides(run),
                       "", False)
