"""The tuned study's numbers, figures and ``results.md``, from ``runs.jsonl.gz`` alone (no training).

- ``sweep.csv``: one row per run (:func:`sweep_table`);
- ``best.csv``: per task, update count and arm, the chosen learning rate, the stable
  window, the evaluation outcomes with intervals and the paired comparisons with grpo
  (:func:`best_table`);
- ``comparisons.csv``: every arm against every reference arm, paired by (warm start,
  seed), on every outcome (:func:`comparisons`);
- ``figures/``: the tuning ladders, the evaluation, held-out and entropy curves, and
  accuracy against movement, each with the CSV of what it draws.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from sspo_analysis.study.stats import fraction_ci, mean_ci, paired_difference
from sspo_analysis.study.tuned import TunedPlan, outcomes, read_records

UNSTABLE_LIMIT = 0.2
"""A learning rate is inside the stable window when at most this fraction of its runs is unstable."""
REFERENCES = ("grpo", "gmpo")
"""Every arm is compared, paired, with these."""
COMPARED = ("heldout_final", "heldout_auc", "heldout_gain", "heldout_greedy_final", "unstable", "end_entropy",
            "heldout_at_kl")
"""The outcomes of the paired comparisons."""
MEANING = {
    "heldout_final": "held-out accuracy at the end (sampled, mean of 4 samples a prompt)",
    "heldout_gain": "held-out accuracy at the end minus the run's warm start's",
    "heldout_auc": "held-out accuracy averaged over the run (every 25 steps from step 0)",
    "heldout_greedy_final": "held-out greedy accuracy at the end",
    "heldout_pass_final": "held-out pass@4 at the end",
    "unstable": "fraction of runs unstable (trainer stop, reward collapse or entropy collapse)",
    "end_entropy": "token entropy over the last 20% of steps (nats)",
    "cum_kl": "KL to the behaviour policy summed over the steps (k3, nats)",
    "heldout_at_kl": "held-out accuracy at equal movement (when the run's cumulative KL reaches the common budget)",
    "movement_per_lr": "sqrt(KL to the behaviour policy per step, first 5 steps) / learning rate",
}


# --------------------------------------------------------------------------- tables


def sweep_table(records: dict[tuple, dict[str, Any]]):
    """One row per recorded run: its key, state and every outcome of :func:`~.tuned.outcomes`."""
    import pandas as pd

    rows = []
    for rec in records.values():
        row = {k: rec[k] for k in ("arm", "task", "lr", "updates", "warm_start", "seed", "role", "state")}
        row.update(outcomes(rec))
        row["movement_per_lr"] = float(np.sqrt(max(row["early_kl"], 0.0)) / row["lr"])
        rows.append(row)
    df = pd.DataFrame(rows)
    return df.sort_values(["task", "updates", "role", "arm", "lr", "warm_start", "seed"], ignore_index=True)


def chosen_rates(plan: TunedPlan, sweep) -> dict[tuple[str, int, str], float]:
    """``{(task, updates, arm): lr}``: the tuning rung with the highest held-out AUC (mean over tuning pairs)."""
    from sspo_analysis.study.tuned import choose

    tune = sweep[sweep.role == "tune"]
    out = {}
    for (task, updates, arm), g in tune.groupby(["task", "updates", "arm"]):
        by_lr = g.groupby("lr")[["unstable", "heldout_auc"]].mean()
        out[(task, int(updates), arm)] = choose({float(lr): r.to_dict() for lr, r in by_lr.iterrows()})
    return out


def stable_window(runs) -> float:
    """The largest learning rate such that it and every smaller one tried has at most :data:`UNSTABLE_LIMIT`
    of its runs unstable (NaN when even the smallest has more)."""
    window = float("nan")
    for lr, g in runs.groupby("lr"):
        if g.unstable.mean() > UNSTABLE_LIMIT:
            break
        window = float(lr)
    return window


def kl_budget(sweep, chosen) -> dict[tuple[str, int], float]:
    """Per (task, updates): the common movement budget, the smallest cumulative KL of any evaluation run at its
    arm's chosen rate (every such run reaches it, so every pair is compared)."""
    out: dict[tuple[str, int], float] = {}
    for (task, updates, arm), lr in chosen.items():
        g = sweep[(sweep.role == "eval") & (sweep.task == task) & (sweep.updates == updates) & (sweep.arm == arm)
                  & np.isclose(sweep.lr, lr)]
        if len(g):
            out[(task, updates)] = min(out.get((task, updates), np.inf), float(g.cum_kl.min()))
    return out


def best_table(plan: TunedPlan, sweep, records) -> tuple[Any, Any]:
    """``(best, comparisons)``: per task, update count and arm, the chosen rate and its evaluation; and the paired
    comparisons of every arm with :data:`REFERENCES` at each arm's own chosen rate."""
    import pandas as pd

    chosen = chosen_rates(plan, sweep)
    budgets = kl_budget(sweep, chosen)
    sweep = sweep.copy()
    sweep["heldout_at_kl"] = [heldout_at_kl(records, r, budgets.get((r.task, r.updates), np.nan))
                              for r in sweep.itertuples()]
    rows, picked = [], {}
    for (task, updates, arm), lr in chosen.items():
        runs = sweep[(sweep.task == task) & (sweep.updates == updates) & (sweep.arm == arm)]
        tune = runs[runs.role == "tune"]
        ev = runs[(runs.role == "eval") & np.isclose(runs.lr, lr)]
        ev2 = runs[(runs.role == "eval") & np.isclose(runs.lr, 2 * lr)]
        row = {"task": task, "updates": updates, "arm": arm, "chosen_lr": lr,
               "tuning_lrs": " ".join(f"{x:.2e}" for x in sorted(tune.lr.unique())),
               "tuning_unstable_lrs": " ".join(f"{x:.2e}" for x in sorted(tune[tune.unstable > 0].lr.unique())),
               "stable_window_lr": stable_window(runs), "kl_budget": budgets.get((task, updates), np.nan),
               "n_eval": len(ev), "warm_starts_eval": ev.warm_start.nunique(), "n_eval_2x": len(ev2)}
        for key in ("heldout_final", "heldout_gain", "heldout_auc", "heldout_greedy_final", "heldout_pass_final",
                    "end_entropy", "cum_kl", "heldout_at_kl", "movement_per_lr"):
            row.update(_ci(key, ev[key]))
        row.update(_fraction("unstable", ev.unstable))
        row.update(_fraction("unstable_2x", ev2.unstable))
        row.update(_ci("heldout_final_2x", ev2.heldout_final))
        rows.append(row)
        picked[(task, updates, arm)] = ev.set_index(["warm_start", "seed"])
    best = pd.DataFrame(rows)
    comps = comparisons(picked)
    if len(best) and len(comps):
        for ref in REFERENCES:
            for key in ("heldout_final", "heldout_auc"):
                sub = comps[(comps.reference == ref) & (comps.outcome == key)]
                cols = {c: f"vs_{ref}_{key}_{c}" for c in ("diff", "ci_low", "ci_high", "p_value", "verdict")}
                best = best.merge(sub[["task", "updates", "arm", *cols]].rename(columns=cols),
                                  on=["task", "updates", "arm"], how="left")
    return best, comps


def comparisons(picked: dict[tuple[str, int, str], Any]):
    """Every arm against each reference arm on :data:`COMPARED`, paired by (warm start, seed)."""
    import pandas as pd

    rows = []
    for (task, updates, arm), runs in picked.items():
        for ref in REFERENCES:
            other = picked.get((task, updates, ref))
            if ref == arm or other is None:
                continue
            pairs = runs.index.intersection(other.index)
            for key in COMPARED:
                test = paired_difference(runs.loc[pairs, key].to_numpy(dtype=float),
                                         other.loc[pairs, key].to_numpy(dtype=float))
                rows.append({"task": task, "updates": updates, "arm": arm, "reference": ref, "outcome": key, **test})
    return pd.DataFrame(rows)


def movement_at_common_rate(sweep, task: str, updates: int):
    """Per arm, the movement per unit learning rate of its evaluation runs at the one rate every arm was
    evaluated at (each arm's chosen rate or twice it), and its ratio to grpo's, paired by (warm start, seed)."""
    import pandas as pd

    ev = sweep[(sweep.role == "eval") & (sweep.task == task) & (sweep.updates == updates)]
    rates = set.intersection(*(set(g.lr.round(12)) for _, g in ev.groupby("arm"))) if len(ev) else set()
    if not rates or "grpo" not in set(ev.arm):
        return pd.DataFrame()
    lr = min(rates)
    at = ev[np.isclose(ev.lr, lr)].set_index(["warm_start", "seed"])
    ref = at[at.arm == "grpo"].movement_per_lr
    rows = []
    for arm, g in at.groupby("arm", sort=False):
        pairs = g.index.intersection(ref.index)
        ratio = g.movement_per_lr.loc[pairs] / ref.loc[pairs]
        rows.append({"task": task, "updates": updates, "arm": arm, "lr": lr, "n": len(pairs),
                     **_ci("movement_per_lr", g.movement_per_lr), **_ci("ratio_to_grpo", ratio)})
    return pd.DataFrame(rows)


def _ci(key: str, values) -> dict[str, float]:
    mean, lo, hi = mean_ci(values.to_numpy(dtype=float))
    return {key: mean, f"{key}_ci_low": lo, f"{key}_ci_high": hi}


def _fraction(key: str, flags) -> dict[str, float]:
    frac, lo, hi = fraction_ci(flags.to_numpy(dtype=float))
    return {key: frac, f"{key}_ci_low": lo, f"{key}_ci_high": hi}


# --------------------------------------------------------------------------- curves


def curve(record: dict[str, Any], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, values)`` of one run: a held-out score on its evaluation grid, or a per-step metric."""
    if key in record["heldout"]:
        return np.asarray(record["heldout"]["step"], float), np.asarray(record["heldout"][key], float)
    return np.asarray(record["steps"]["step"], float), np.asarray(record["steps"][key], float)


def cumulative_kl_at(record: dict[str, Any], steps: np.ndarray) -> np.ndarray:
    """The run's cumulative KL to the behaviour policy after each of ``steps`` (0 at step 0)."""
    s, kl = curve(record, "kl_old_k3")
    cum = np.concatenate([[0.0], np.nancumsum(kl)])
    return np.interp(steps, np.concatenate([[0.0], s]), cum)


def heldout_at_kl(records, row, budget: float) -> float:
    """Held-out accuracy of a run when its cumulative KL reaches ``budget`` (linear between evaluations; NaN when
    it never gets there)."""
    rec = records.get((row.arm, row.task, float(row.lr), int(row.updates), int(row.warm_start), int(row.seed),
                       row.role))
    if rec is None or not np.isfinite(budget):
        return float("nan")
    steps, acc = curve(rec, "sampled")
    kl = cumulative_kl_at(rec, steps)
    if kl[-1] < budget:
        return float("nan")
    return float(np.interp(budget, np.maximum.accumulate(kl), acc))


def load(root: Path):
    """``(records, sweep)`` of a study directory."""
    records = read_records(Path(root) / "runs.jsonl.gz")
    return records, sweep_table(records)


# --------------------------------------------------------------------------- all outputs


def picks_at_chosen(sweep, chosen, task: str, updates: int, arms) -> dict[str, list[tuple]]:
    """Per arm, the record keys of its evaluation runs at its chosen rate."""
    out = {}
    for arm in arms:
        lr = chosen.get((task, updates, arm))
        g = sweep[(sweep.role == "eval") & (sweep.task == task) & (sweep.updates == updates) & (sweep.arm == arm)]
        if lr is not None:
            g = g[np.isclose(g.lr, lr)]
            out[arm] = [(arm, task, float(r.lr), int(r.updates), int(r.warm_start), int(r.seed), "eval")
                        for r in g.itertuples()]
    return out


def write_outputs(plan: TunedPlan, root: Path, command: str, timing: dict[str, Any]) -> list[Path]:
    """``sweep.csv``, ``best.csv``, ``comparisons.csv``, the figures and ``results.md`` from ``runs.jsonl.gz``."""
    import pandas as pd

    from sspo_analysis.io import write_frame, write_text
    from sspo_analysis.study import tuned_figures as figs
    from sspo_analysis.study.tuned_markdown import tuned_results_markdown

    records, sweep = load(root)
    if sweep.empty:
        raise ValueError(f"{root}/runs.jsonl.gz: no recorded runs to analyse")
    best, comps = best_table(plan, sweep, records)
    movement = [movement_at_common_rate(sweep, t.label, u) for t in plan.tasks for u in plan.eval_updates]
    movement = pd.concat(movement, ignore_index=True)
    paths = [write_frame(sweep, root / "sweep.csv"), write_frame(best, root / "best.csv"),
             write_frame(comps, root / "comparisons.csv"), write_frame(movement, root / "movement.csv")]
    chosen = chosen_rates(plan, sweep)
    grid = np.arange(0, plan.steps + 1, plan.eval_every, dtype=float)
    step_grid = np.arange(1, plan.steps + 1, dtype=float)
    drawn: dict[str, tuple[Any, Any]] = {}
    for task in (t for t in plan.tasks if (sweep.task == t.label).any()):
        on_task = set(sweep[sweep.task == task.label].arm)
        arms = [a.label for a in plan.arms if a.label in on_task]
        drawn[f"{task.label}_ladders"] = figs.plot_ladders(sweep, arms, chosen, task.label)
        for updates in plan.eval_updates:
            picks = picks_at_chosen(sweep, chosen, task.label, updates, arms)
            if not any(picks.values()):
                continue
            tag = f"{task.label}_u{updates}"
            budget = float(best[(best.task == task.label) & (best.updates == updates)].kl_budget.min())
            drawn[f"{tag}_evaluation"] = figs.plot_evaluation(best, arms, task.label, updates)
            drawn[f"{tag}_heldout"] = figs.plot_curves(
                records, picks, arms, "sampled", "held-out accuracy (sampled)",
                f"{task.label}, {updates} updates per batch: held-out accuracy at each objective's chosen rate", grid)
            drawn[f"{tag}_entropy"] = figs.plot_curves(
                records, picks, arms, "entropy", "token entropy (nats)",
                f"{task.label}, {updates} updates per batch: entropy at each objective's chosen rate", step_grid)
            drawn[f"{tag}_movement"] = figs.plot_movement(records, picks, arms, budget, grid,
                                                          f"{task.label}, {updates} updates per batch")
    paths += figs.save_all(root / "figures", drawn)
    prompts = next(iter(records.values()))["heldout_prompts"]
    text = tuned_results_markdown(plan, {"sweep": sweep, "best": best, "comparisons": comps, "movement": movement,
                                         "prompts": prompts}, command, timing)
    paths.append(write_text(root / "results.md", text))
    return paths
