"""The tuned study: every objective at its own learning rate, on held-out accuracy, over independent warm starts.

The protocol (``sspo study tuned``), in three stages per task:

1. **Tuning**: each arm climbs a factor-2 learning-rate ladder on *tuning* pairs
   (warm start, seed) at each update count. It starts at three rungs and adds the next
   rung up until a run is unstable, the next rung down while the best held-out AUC
   sits at its lowest rung, and rungs until it has at least :attr:`TunedPlan.min_lrs`
   (successive search: hopeless rungs far from the edge are never trained). The
   chosen learning rate is the rung with the highest held-out AUC.
2. **Evaluation**: each arm at its chosen rate and at twice it (the next rung: the
   margin a practitioner has) on *evaluation* pairs: every warm start with fresh
   seeds. No (warm start, seed) pair is used in both roles.
3. **Analysis** (:mod:`~sspo_analysis.study.tuned_report`): paired comparisons by
   (warm start, seed), stable windows, movement, entropy.

Every finished run is compacted into ``runs.jsonl.gz`` (its held-out scores and the
per-step metrics the analysis reads): the analysis reads only that file, so anyone
re-derives every number without training, and a later call extends the study without
retraining what is there. A stage's decisions are re-derived from the finished runs
on every call, so a killed study resumes where it was.
"""

from __future__ import annotations

import gzip
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sspo_analysis.study.design import Arm

STEP_KEYS = ("reward_mean", "entropy", "kl_old_k3", "log_ratio_std", "grad_norm", "skipped_updates")
"""Per-step metrics kept for each run in ``runs.jsonl.gz``."""


@dataclass(frozen=True)
class TunedRun:
    """One run: an arm on a task at a learning rate and update count, from a warm start with a seed, in a role."""

    arm: Arm
    task: str
    lr: float
    updates: int
    warm_start: int
    seed: int
    role: str  # tune | eval

    @property
    def name(self) -> str:
        return f"{self.task}/u{self.updates}/{self.arm.label}/lr{self.lr:.2e}_ws{self.warm_start}_seed{self.seed}"

    @property
    def key(self) -> dict[str, Any]:
        return {"arm": self.arm.label, "task": self.task, "lr": self.lr, "updates": self.updates,
                "warm_start": self.warm_start, "seed": self.seed, "role": self.role}

    def text(self) -> str:
        return (f"{self.arm.label} | {self.task} lr {self.lr:.1e} u{self.updates} | "
                f"ws {self.warm_start} seed {self.seed} ({self.role})")


@dataclass(frozen=True)
class TunedTask:
    """A task of the study: its ``label``, trainer settings (task, answer length) and a one-line ``description``."""

    label: str
    settings: tuple[str, ...]
    description: str = ""
    arms: dict[int, tuple[str, ...]] | None = None
    """Per update count, the arms tuned (and evaluated) on this task; a count missing: every arm of the plan, an
    empty tuple: none (the trimming to a time budget)."""


@dataclass(frozen=True)
class TunedPlan:
    """The whole tuned study."""

    name: str
    tasks: tuple[TunedTask, ...]
    arms: tuple[Arm, ...]
    ladder: tuple[float, ...]
    start: dict[int, tuple[float, ...]]
    """The first rungs tried at each update count."""
    tune_updates: tuple[int, ...]
    eval_updates: tuple[int, ...]
    tune_pairs: tuple[tuple[int, int], ...]
    """(warm start, seed) pairs of the tuning runs."""
    warm_starts: tuple[int, ...]
    eval_seeds: tuple[int, ...]
    steps: int
    settings: tuple[str, ...]
    eval_every: int = 25
    min_lrs: int = 4

    def arms_at(self, updates: int, task: TunedTask) -> tuple[Arm, ...]:
        """The arms tuned (and evaluated) on ``task`` at ``updates`` updates per batch."""
        labels = (task.arms or {}).get(updates)
        return self.arms if labels is None else tuple(a for a in self.arms if a.label in labels)

    @property
    def eval_pairs(self) -> tuple[tuple[int, int], ...]:
        return tuple((w, s) for w in self.warm_starts for s in self.eval_seeds)

    def check(self) -> None:
        """Tuning and evaluation never share a (warm start, seed) pair."""
        shared = set(self.tune_pairs) & set(self.eval_pairs)
        if shared:
            raise ValueError(f"plan {self.name!r}: (warm start, seed) pairs {sorted(shared)} are in both roles")

    def overrides(self, run: TunedRun) -> list[str]:
        task = next(t for t in self.tasks if t.label == run.task)
        return [*self.settings, *task.settings, f"steps={self.steps}", f"log.eval_every={self.eval_every}",
                f"warm_start.seed={run.warm_start}",
                f"optim.lr={run.lr}", f"algo.updates_per_batch={run.updates}", *run.arm.overrides(),
                f"seed={run.seed}"]


# --------------------------------------------------------------------------- the stages' decisions


def rung_above(ladder: tuple[float, ...], lr: float) -> float | None:
    i = ladder.index(lr)
    return ladder[i + 1] if i + 1 < len(ladder) else None


def next_rungs(plan: TunedPlan, updates: int, outcomes: dict[float, dict[str, Any]]) -> list[float]:
    """The learning rates one arm's tuning needs next, given its finished tuning ``outcomes`` by rate (each with
    ``unstable`` and ``heldout_auc``, averaged over the tuning pairs); [] when its search is over."""
    start = [lr for lr in plan.start[updates] if lr not in outcomes]
    if start:
        return start
    tried = sorted(outcomes)
    lo, hi = plan.ladder.index(tried[0]), plan.ladder.index(tried[-1])
    wanted = []
    if not any(o["unstable"] > 0 for o in outcomes.values()) and hi + 1 < len(plan.ladder):
        wanted.append(plan.ladder[hi + 1])
    best = choose(outcomes)
    if best == tried[0] and lo > 0:
        wanted.append(plan.ladder[lo - 1])
    if not wanted and len(tried) < plan.min_lrs:
        wanted.append(plan.ladder[hi + 1] if hi + 1 < len(plan.ladder) else plan.ladder[lo - 1])
    return wanted


def choose(outcomes: dict[float, dict[str, Any]]) -> float:
    """The learning rate with the highest held-out AUC (ties: the smaller rate)."""
    return max(sorted(outcomes), key=lambda lr: (_finite(outcomes[lr]["heldout_auc"]), -lr))


def _finite(x: float) -> float:
    return x if math.isfinite(x) else -math.inf


# --------------------------------------------------------------------------- the compact record of each run


def compact(run: TunedRun, run_dir: Path, planned_steps: int, eval_every: int) -> dict[str, Any]:
    """One line of ``runs.jsonl.gz``: the run's key, end state, held-out scores and the kept per-step metrics."""
    from sspo_analysis.training import read_metrics
    from sspo_analysis.training.heldout import read_heldout

    metrics = read_metrics(run_dir)
    heldout = read_heldout(run_dir)
    verdict = json.loads((run_dir / "DIVERGED").read_text()) if (run_dir / "DIVERGED").exists() else None
    steps = {k: [_round(v) for v in metrics[k].tolist()] for k in ("step", *STEP_KEYS) if k in metrics}
    return {**run.key, "state": "diverged" if verdict else "done", "verdict": verdict, "planned_steps": planned_steps,
            "eval_every": eval_every,
            "heldout": {k: [_round(v) for v in heldout[k].tolist()] for k in heldout.columns if k != "prompts"},
            "heldout_prompts": int(heldout.prompts.iloc[0]) if len(heldout) else 0, "steps": steps}


def _round(v: Any) -> Any:
    return round(v, 5) if isinstance(v, float) and math.isfinite(v) else (None if isinstance(v, float) else v)


def record_key(row: dict[str, Any]) -> tuple:
    return (row["arm"], row["task"], float(row["lr"]), int(row["updates"]), int(row["warm_start"]),
            int(row["seed"]), row["role"])


def read_records(path: Path) -> dict[tuple, dict[str, Any]]:
    """``runs.jsonl.gz`` by run key (empty when missing); a damaged line is an error naming it."""
    if not path.is_file():
        return {}
    records = {}
    with gzip.open(path, "rt") as f:
        for number, line in enumerate(f, 1):
            try:
                row = json.loads(line)
                records[record_key(row)] = row
            except (ValueError, KeyError) as err:
                raise ValueError(f"{path}, line {number}: not a run record ({err}); the file is damaged") from err
    return records


def write_records(path: Path, records: dict[tuple, dict[str, Any]]) -> None:
    """All records, sorted by key, atomically (gzip without a timestamp, so equal records give equal bytes)."""
    from sspo_analysis.io import atomic_path
    from sspo_analysis.training.runs import temp_path

    with atomic_path(path, temp_path(path)) as tmp, open(tmp, "wb") as raw, \
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as f:
        for key in sorted(records, key=lambda k: tuple(str(x) for x in k)):
            f.write((json.dumps(records[key], sort_keys=True) + "\n").encode())


# --------------------------------------------------------------------------- one run's outcomes


def outcomes(record: dict[str, Any]) -> dict[str, Any]:
    """The numbers of one run that the study compares, from its compact record.

    Held-out scores are read on the plan's evaluation grid (every ``eval_every`` steps
    from 0); a run the trainer stopped keeps the score it had when it stopped for the
    steps it did not run (so breaking never flatters a run). ``heldout_auc`` is the mean
    height of the sampled held-out accuracy over the grid; ``cum_kl`` sums the per-step
    KL to the behaviour policy (k3, mean over the step's updates); ``early_kl`` is its mean
    over the first :data:`EARLY_STEPS` steps, the per-step movement before anything broke.
    """
    import numpy as np
    import pandas as pd

    from sspo_analysis import analysis, failure

    steps = pd.DataFrame(record["steps"])
    held = record["heldout"]
    grid = list(range(0, record["planned_steps"] + 1, record["eval_every"]))
    if grid[-1] != record["planned_steps"]:
        grid.append(record["planned_steps"])
    curves = {k: _on_grid(held["step"], held[k], grid) for k in held if k != "step"}
    pass_key = next((k for k in held if k.startswith("pass@")), None)
    verdict = failure.instability(steps, record["verdict"]) if len(steps) else {"unstable": True,
                                                                                 "step_unstable": 0, "kind": "trainer"}
    kl = steps.kl_old_k3.to_numpy(dtype=float) if len(steps) else np.array([np.nan])
    entropy = steps.entropy.to_numpy(dtype=float) if len(steps) else np.array([np.nan])
    sampled = curves.get("sampled", [float("nan")])
    return {
        "heldout_start": sampled[0], "heldout_final": sampled[-1], "heldout_gain": sampled[-1] - sampled[0],
        "heldout_auc": analysis.mean_height(sampled), "heldout_greedy_final": curves.get("greedy", [np.nan])[-1],
        "heldout_pass_final": curves[pass_key][-1] if pass_key else float("nan"), "pass_k": pass_key or "",
        "unstable": float(verdict["unstable"]), "step_unstable": verdict["step_unstable"], "kind": verdict["kind"],
        "steps": int(steps.step.max()) if len(steps) else 0, "cum_kl": float(np.nansum(kl)),
        "early_kl": float(np.nanmean(kl[:EARLY_STEPS])), "start_entropy": float(entropy[0]),
        "end_entropy": analysis.final_mean(entropy), "min_entropy": float(np.nanmin(entropy)),
        "reward_auc": analysis.mean_height(steps.reward_mean.to_numpy(dtype=float)) if len(steps) else float("nan"),
    }


EARLY_STEPS = 5
"""Steps over which the per-update movement is measured (before any run of the study broke)."""


def _on_grid(steps: list[int], values: list[float], grid: list[int]) -> list[float]:
    """``values`` at each ``grid`` step: the last recorded value at or before it (NaN before the first)."""
    out, j, last = [], 0, float("nan")
    for g in grid:
        while j < len(steps) and steps[j] <= g:
            last = float("nan") if values[j] is None else values[j]
            j += 1
        out.append(last)
    return out


# --------------------------------------------------------------------------- the plans

TUNED_ARMS: tuple[Arm, ...] = (
    Arm("grpo", "grpo"), Arm("dapo", "dapo"), Arm("cispo", "cispo"), Arm("gspo", "gspo"), Arm("gmpo", "gmpo"),
    Arm("sapo", "sapo"), Arm("sspo", "sspo"),
    Arm("sspo-sigmoid-tau2", "sspo-sigmoid", (("tau_pos", 2.0), ("tau_neg", 2.0))), Arm("vespo", "vespo"),
)
"""Both SSPO readings (arctan ``sspo``; ``sspo-sigmoid`` at the admissible tau = 2) and their rivals."""

TUNED_SETTINGS: tuple[str, ...] = (
    'model.preset="tiny"', "threads=1", "log.progress=false", "log.entropy_taylor=false", "log.entropy_change=false",
    "algo.track_kl_ref=false", "log.log_ratios_every=0", "log.samples_every=0", "log.checkpoint_every=25",
    "log.eval_prompts=256", "log.eval_samples=4",
)
"""Every run: the tiny preset, one torch thread, only the measurements the study reads."""

LADDER: tuple[float, ...] = (1.25e-5, 2.5e-5, 5e-5, 1e-4, 2e-4, 4e-4, 8e-4, 1.6e-3, 3.2e-3)
"""Learning rates a factor 2 apart: twice a rung is the next rung."""

ADDITION = TunedTask("addition", ('task.name="addition"', "task.digits=2"), "2-digit addition, exact match",
                     arms={8: ("grpo", "gmpo", "sspo", "sspo-sigmoid-tau2")})

COUNTDOWN = TunedTask(
    "countdown", ('task.name="countdown"', "task.numbers=3", "rollout.max_new_tokens=7"),
    "3 numbers and a target to an expression of 5 characters that makes it, any correct one scoring 1",
    arms={2: ("grpo", "gmpo", "gspo", "sspo", "sspo-sigmoid-tau2"), 8: ()})
"""The second task: longer answers than addition's, and more than one correct answer, so RL can find answers the
supervised phase never showed; trimmed to grpo, the sequence-level rivals and both SSPO readings at 2 updates."""

FULL_TUNED = TunedPlan(
    name="full", tasks=(ADDITION, COUNTDOWN), arms=TUNED_ARMS, ladder=LADDER,
    start={2: (1e-4, 2e-4, 4e-4), 8: (2.5e-5, 5e-5, 1e-4)},
    tune_updates=(2, 8), eval_updates=(2,), tune_pairs=((0, 1000),), warm_starts=(0, 1, 2), eval_seeds=(0, 1, 2),
    steps=200, settings=TUNED_SETTINGS,
)
"""The committed study (``docs/results/tuned``): every arm tuned at 2 updates per batch on one tuning pair and
evaluated over 3 warm starts x 3 seeds at its chosen rate and twice it; grpo, gmpo and both SSPO readings also tuned
at 8 updates (trimmed to the 2.5-hour budget); 200 steps a run."""

QUICK_TUNED = TunedPlan(
    name="quick", tasks=(ADDITION,), arms=tuple(a for a in TUNED_ARMS if a.label in ("grpo", "sspo")),
    ladder=(1e-4, 1e-3, 1e-2), start={2: (1e-4, 1e-3)}, tune_updates=(2,), eval_updates=(2,),
    tune_pairs=((0, 1000),), warm_starts=(0,), eval_seeds=(0,), steps=6, eval_every=3, min_lrs=2,
    settings=(*TUNED_SETTINGS, "rollout.prompts=8", "rollout.group_size=4",
              "log.eval_prompts=32", "log.checkpoint_every=3"),
)
"""CI's smoke plan: every stage and code path in about a minute, no conclusions."""

TUNED_PLANS: dict[str, TunedPlan] = {"full": FULL_TUNED, "quick": QUICK_TUNED}
