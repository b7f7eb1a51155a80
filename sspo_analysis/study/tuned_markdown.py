"""``results.md`` of the tuned study: the answer first, then the tables it rests on, the protocol and what was
trimmed. Every number is computed here from the study's tables."""

from __future__ import annotations

from typing import Any

import numpy as np

from sspo_analysis.study.stats import ALPHA
from sspo_analysis.study.tuned import TunedPlan, TunedTask
from sspo_analysis.study.tuned_report import MEANING, UNSTABLE_LIMIT

SOFT = ("sspo", "sspo-sigmoid-tau2", "sapo", "vespo")
"""Soft gates or soft weights: sequence-level (both SSPO readings, VESPO) and token-level (SAPO)."""


def _fmt(m: float, lo: float, hi: float, digits: int = 3) -> str:
    if not np.isfinite(m):
        return "n/a"
    if not np.isfinite(lo):
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _cell(row: Any, key: str, digits: int = 3) -> str:
    return _fmt(row[key], row[f"{key}_ci_low"], row[f"{key}_ci_high"], digits)


def _lr(x: float) -> str:
    """A learning rate as ``2.5e-5``; ``none`` for NaN."""
    if not np.isfinite(x):
        return "none"
    mantissa, exponent = f"{x:.1e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def answer(best: Any, comps: Any, movement: Any, task: str, updates: int) -> list[str]:
    """The lead: which arms differ from grpo at their own rates, on held-out accuracy, movement and stability."""
    b = best[(best.task == task) & (best.updates == updates)]
    c = comps[(comps.task == task) & (comps.updates == updates) & (comps.reference == "grpo")]
    lines = []
    for key in ("heldout_final", "heldout_auc", "heldout_at_kl"):
        sub = c[c.outcome == key]
        higher = sorted(sub[sub.verdict == "higher"].arm)
        lower = sorted(sub[sub.verdict == "lower"].arm)
        same = sorted(sub[sub.verdict == "no significant difference"].arm)
        parts = []
        if higher:
            parts.append(f"higher than grpo: {', '.join(higher)}")
        if lower:
            parts.append(f"lower than grpo: {', '.join(lower)}")
        if same:
            parts.append(f"no significant difference from grpo: {', '.join(same)}")
        lines.append(f"- **{MEANING[key]}**: {'; '.join(parts) or 'no comparison'}.")
    grpo = b[b.arm == "grpo"]
    if len(grpo):
        g = grpo.iloc[0]
        lines.append(f"- **grpo at its chosen rate** ({_lr(g.chosen_lr)}) gains {_cell(g, 'heldout_gain')} held-out "
                     f"accuracy over its warm starts (n = {g.n_eval} runs over {g.warm_starts_eval} warm starts).")
    soft = b[b.arm.isin(SOFT)]
    hard = b[~b.arm.isin(SOFT)]
    if len(soft) and len(hard):
        lines.append(f"- **Chosen learning rates**: soft arms {_rates(soft)}; hard-clipping and truncation arms "
                     f"{_rates(hard)}.")
        lines.append(f"- **Unstable at twice the chosen rate**: soft arms {_fractions(soft)}; "
                     f"others {_fractions(hard)}.")
    m = movement[(movement.task == task) & (movement.updates == updates)] if len(movement) else movement
    if len(m):
        lines.append(f"- **Movement per unit learning rate** at lr {_lr(float(m.lr.iloc[0]))} (first 5 steps, "
                     "paired ratio to grpo): " + ", ".join(f"{r.arm} {r.ratio_to_grpo:.2f}x" for r in m.itertuples()
                                                            if r.arm != "grpo") + ".")
    return lines


def _rates(df: Any) -> str:
    return ", ".join(f"{r.arm} {_lr(r.chosen_lr)}" for r in df.itertuples())


def _fractions(df: Any) -> str:
    return ", ".join(f"{r.arm} {r.unstable_2x * r.n_eval_2x:.0f}/{r.n_eval_2x}" for r in df.itertuples())


def main_table(best: Any, task: str, updates: int) -> list[str]:
    b = best[(best.task == task) & (best.updates == updates)]
    out = ["| arm | chosen lr | stable window (lr) | runs (warm starts) | held-out at end | gain over warm start | "
           "held-out AUC | greedy at end | pass@4 at end | unstable at lr | unstable at 2x lr | held-out at 2x lr | "
           "end entropy |", "|" + " --- |" * 13]
    for r in b.itertuples():
        d = r._asdict()
        out.append(f"| {r.arm} | {_lr(r.chosen_lr)} | {_lr(r.stable_window_lr)} | {r.n_eval} ({r.warm_starts_eval}) | "
                   f"{_cell(d, 'heldout_final')} | {_cell(d, 'heldout_gain')} | {_cell(d, 'heldout_auc')} | "
                   f"{_cell(d, 'heldout_greedy_final')} | {_cell(d, 'heldout_pass_final')} | "
                   f"{r.unstable * r.n_eval:.0f}/{r.n_eval} | {r.unstable_2x * r.n_eval_2x:.0f}/{r.n_eval_2x} | "
                   f"{_cell(d, 'heldout_final_2x')} | {_cell(d, 'end_entropy')} |")
    return out


def comparison_table(comps: Any, task: str, updates: int) -> list[str]:
    """One row per arm: its paired difference from grpo and gmpo on the main outcomes (**bold**: significant)."""
    c = comps[(comps.task == task) & (comps.updates == updates)].set_index(["arm", "reference", "outcome"])
    cols = [("grpo", "heldout_final"), ("grpo", "heldout_auc"), ("grpo", "heldout_at_kl"), ("grpo", "end_entropy"),
            ("gmpo", "heldout_final"), ("gmpo", "heldout_auc")]
    out = ["| arm | " + " | ".join(f"vs {ref}: {SHORT[key]}" for ref, key in cols) + " |", "|" + " --- |" * 7]
    for arm in dict.fromkeys(a for a, _, _ in c.index):
        cells = []
        for ref, key in cols:
            if (arm, ref, key) not in c.index:
                cells.append("")
                continue
            r = c.loc[(arm, ref, key)]
            text = f"{_fmt(r['diff'], r.ci_low, r.ci_high)}, p {r.p_value:.2g} (n {r.n})"
            cells.append(f"**{text}**" if r.verdict != "no significant difference" else text)
        out.append(f"| {arm} | " + " | ".join(cells) + " |")
    return out


SHORT = {"heldout_final": "held-out at end", "heldout_auc": "held-out AUC", "heldout_at_kl": "held-out at equal KL",
         "end_entropy": "end entropy"}


def movement_table(movement: Any, best: Any, task: str, updates: int) -> list[str]:
    """Per arm: movement per unit learning rate at the one rate every arm was evaluated at, its paired ratio to
    grpo's, and the held-out accuracy at equal movement."""
    m = movement[(movement.task == task) & (movement.updates == updates)] if len(movement) else movement
    if not len(m):
        return ["No rate at which every arm was evaluated."]
    b = best[(best.task == task) & (best.updates == updates)].set_index("arm")
    out = [f"At lr {_lr(float(m.lr.iloc[0]))}, where every arm has evaluation runs:", "",
           "| arm | movement per unit lr | ratio to grpo (paired) | pairs | held-out at equal KL (own rate) |",
           "| --- | --- | --- | --- | --- |"]
    for r in m.itertuples():
        d = r._asdict()
        at_kl = _cell(b.loc[r.arm].to_dict(), "heldout_at_kl") if r.arm in b.index else "n/a"
        out.append(f"| {r.arm} | {_cell(d, 'movement_per_lr', 1)} | {_cell(d, 'ratio_to_grpo', 2)} | {r.n} | "
                   f"{at_kl} |")
    return out


def updates_line(sweep: Any, task: str, updates: int = 8) -> list[str]:
    """The lead's line on ``updates`` per batch: each tuned arm's best rate and first unstable rung (tuning pair)."""
    t = sweep[(sweep.task == task) & (sweep.role == "tune") & (sweep.updates == updates)]
    if not len(t):
        return []
    parts = []
    for arm, g in t.groupby("arm", sort=False):
        bad = g[g.unstable > 0].lr
        edge = _lr(float(bad.min())) if len(bad) else f"none up to {_lr(float(g.lr.max()))}"
        parts.append(f"{arm} best at {_lr(float(g.loc[g.heldout_auc.idxmax(), 'lr']))}, broke at {edge}")
    return [f"- **{updates} updates per batch** (tuning pair only, one run a rung): {'; '.join(parts)}."]


def updates_table(best: Any, sweep: Any, task: str) -> list[str]:
    """8 updates against 2, on the tuning pair: each arm's best held-out AUC and chosen rate at each."""
    t = sweep[(sweep.task == task) & (sweep.role == "tune")]
    out = []
    for arm, g in t.groupby("arm", sort=False):
        if g.updates.nunique() < 2:  # tuned at one update count only
            continue
        cells = {}
        for u in (2, 8):
            h = g[g.updates == u].groupby("lr").heldout_auc.mean()
            cells[u] = (h.max(), h.idxmax()) if len(h) else (np.nan, np.nan)
        bad = g[(g.updates == 8) & (g.unstable > 0)].lr.unique()
        diff = cells[8][0] - cells[2][0]
        out.append(f"| {arm} | {cells[2][0]:.3f} ({_lr(cells[2][1])}) | {cells[8][0]:.3f} ({_lr(cells[8][1])}) | "
                   f"{diff:+.3f} | {' '.join(_lr(x) for x in sorted(bad)) or 'none'} |")
    if not out:  # no arm tuned at both counts on this task
        return []
    return ["| arm | best held-out AUC, 2 updates (lr) | best held-out AUC, 8 updates (lr) | 8 minus 2 | "
            "unstable rungs at 8 updates |", "| --- | --- | --- | --- | --- |", *out]


def entropy_lines(best: Any, sweep: Any, task: str, updates: int) -> list[str]:
    """Entropy over the run at each arm's chosen rate: start, end, and the accuracy over the last quarter."""
    e = sweep[(sweep.task == task) & (sweep.updates == updates) & (sweep.role == "eval")]
    b = best[(best.task == task) & (best.updates == updates)].set_index("arm")
    out = ["| arm | entropy at step 1 | end entropy (last 20%) | end / start | lowest entropy in a run (min over "
           "runs) | held-out at end |", "| --- | --- | --- | --- | --- | --- |"]
    for arm in b.index:
        g = e[(e.arm == arm) & np.isclose(e.lr, b.loc[arm, "chosen_lr"])]
        if not len(g):
            continue
        start, end = g.start_entropy.mean(), g.end_entropy.mean()
        out.append(f"| {arm} | {start:.3f} | {end:.3f} | {end / start:.2f} | {g.min_entropy.min():.3f} | "
                   f"{g.heldout_final.mean():.3f} |")
    return out


def task_sections(plan: TunedPlan, tables: dict[str, Any], task: TunedTask, level: str) -> list[str]:
    """One task's answer, tables and figures under headings of ``level`` (``##`` or ``###``)."""
    sweep, best, comps, movement = (tables[k] for k in ("sweep", "best", "comparisons", "movement"))
    label, updates = task.label, plan.eval_updates[0]
    tag = f"{label}_u{updates}"
    runs = sweep[sweep.task == label]
    n = {role: int((runs.role == role).sum()) for role in ("tune", "eval")}
    eight = updates_table(best, sweep, label)
    lines = [
        f"{level} The answer on `{label}` ({updates} updates per rollout batch, each arm at its own chosen rate)",
        "",
        f"{task.description}; {n['tune']} tuning runs and {n['eval']} evaluation runs.",
        "",
        *answer(best, comps, movement, label, updates),
        *updates_line(sweep, label),
        "",
        f"A difference is called significant only when the paired sign-flip test gives p < {ALPHA} and the 95% "
        "bootstrap interval excludes 0; pairs are (warm start, seed). The conclusions hold for this testbed "
        "and these seeds; they will be re-checked on warm starts and seeds the study did not use.",
        "",
        f"{level}# Each arm at its chosen rate and at twice it ({label})",
        "",
        *main_table(best, label, updates),
        "",
        f"Mean [95% bootstrap CI] over the evaluation runs. Stable window: the largest rate at which it and every "
        f"smaller rate tried had at most {UNSTABLE_LIMIT:.0%} of its runs (tuning and evaluation) unstable.",
        "",
        f"![evaluation](figures/{tag}_evaluation.png)",
        f"![held-out curves](figures/{tag}_heldout.png)",
        "",
        f"{level}# Paired comparisons ({label}: every arm against grpo and gmpo)",
        "",
        *comparison_table(comps, label, updates),
        "",
        "Each cell: the mean paired difference (arm minus reference) [95% bootstrap CI], the sign-flip p and the "
        "number of (warm start, seed) pairs; bold where significant. Held-out at equal KL: held-out accuracy when "
        "a run's cumulative KL to the behaviour policy reaches the common budget (the largest that every "
        "evaluation run at its arm's chosen rate reaches): arms compared at equal movement instead of equal "
        "steps. Smaller steps buy more accuracy per nat of KL, so between arms at different chosen rates this "
        "column compares the rates as much as the objectives; likewise entropy falls with movement, so an arm at "
        f"a smaller rate keeps more of it after {plan.steps} steps. Every outcome's comparison is in "
        "`comparisons.csv`.",
        "",
        f"{level}# Movement: how far a step moves the policy per unit learning rate ({label})",
        "",
        *movement_table(movement, best, label, updates),
        "",
        f"Movement per unit lr: {MEANING['movement_per_lr']}, so that it does not depend on the rate for small "
        "steps (KL grows as the square of the step). With Adam the step's size is set by the rate more than by "
        "the gradient's scale, so an objective moves further per unit rate when its update direction is more "
        "consistent across the minibatches of a batch, not only when its gradient is larger; the theory "
        "(`sspo theory`) predicts gradient coefficients, not Adam's steps, and is not set beside this column.",
        "",
        f"![movement](figures/{tag}_movement.png)",
        "",
        f"{level}# Entropy over the run ({label})",
        "",
        *entropy_lines(best, sweep, label, updates),
        "",
        f"![entropy](figures/{tag}_entropy.png)",
        "",
    ]
    if eight:
        lines += [
            f"{level}# 8 updates per batch against 2 ({label}, tuning pair only)",
            "",
            *eight,
            "",
            "One tuning run per rung: a description of the tuning pair, not a test. An unstable rung at 8 updates "
            "is the first rate at which that run broke; evaluation at 8 updates, and tuning there for the other "
            "arms, were trimmed to fit the time budget (see below).",
            "",
        ]
    return [*lines, f"![ladders](figures/{label}_ladders.png)", ""]


def trimmed(plan: TunedPlan) -> str:
    """What the plan leaves out to fit its budget, in one sentence."""
    parts = ["one tuning pair per rung"]
    for task in plan.tasks:
        for updates, labels in (task.arms or {}).items():
            if updates not in plan.tune_updates:
                continue
            tuned = ", ".join(labels) + " only" if labels else "none"
            evaluated = "" if not labels or updates in plan.eval_updates else " (tuned, not evaluated)"
            parts.append(f"`{task.label}` at {updates} updates per batch: {tuned}{evaluated}")
    return "; ".join(parts)


def tuned_results_markdown(plan: TunedPlan, tables: dict[str, Any], command: str, timing: dict[str, Any]) -> str:
    """The whole ``results.md`` from the study's ``tables`` (sweep, best, comparisons, movement)."""
    sweep = tables["sweep"]
    tune_pairs = ", ".join(f"(warm start {w}, seed {s})" for w, s in plan.tune_pairs)
    minutes = timing["train_seconds"] / 60
    n = {role: int((sweep.role == role).sum()) for role in ("tune", "eval")}
    tasks = "; ".join(f"`{t.label}` ({t.description})" for t in plan.tasks)
    lines = [
        "# Every objective at its own learning rate: the tuned study",
        "",
        f"Tasks: {tasks}. The `tiny` Qwen2 preset, {plan.steps} RL steps a run, 16 prompts x 8 samples a step, "
        f"held-out accuracy on {tables['prompts']} fixed prompts never trained on. {n['tune']} tuning runs and "
        f"{n['eval']} evaluation runs. Written by `{command}` from `runs.jsonl.gz` alone; run again, it re-derives "
        "every number here without training.",
        "",
    ]
    for i, task in enumerate(plan.tasks):
        if not (sweep.task == task.label).any():
            continue
        if i == 0:
            lines += task_sections(plan, tables, task, "##")
        else:
            lines += [f"## Task {i + 1}: `{task.label}`", "", *task_sections(plan, tables, task, "###")]
    lines += [
        "## Protocol",
        "",
        f"- **Tuning** ({tune_pairs}): each arm climbs the ladder {', '.join(_lr(x) for x in plan.ladder)} "
        f"from {', '.join(_lr(x) for x in plan.start[2])} (2 updates) and "
        f"{', '.join(_lr(x) for x in plan.start.get(8, ()))} (8 updates), adding the rung above until a run is "
        "unstable and the rung below while the best held-out AUC sits at the lowest rung, and at least "
        f"{plan.min_lrs} rungs. The chosen rate has the highest held-out AUC.",
        f"- **Evaluation**: warm starts {', '.join(map(str, plan.warm_starts))} x seeds "
        f"{', '.join(map(str, plan.eval_seeds))}, at the chosen rate and at twice it, at "
        f"{', '.join(map(str, plan.eval_updates))} updates per batch. No (warm start, seed) pair is in both roles.",
        "- **Warm starts**: supervised, from different seeds (`warm_start.seed`), each until its sampled success "
        "reaches 0.35; they ship with the package, so every machine starts from the same weights.",
        "- **Unstable**: the trainer stopped the run, or its training reward's 3-step mean fell below half its "
        "running peak and stayed there, or its entropy collapsed before the task was solved "
        "(`sspo_analysis.failure.instability`).",
        f"- **Trimmed to fit the budget**: {trimmed(plan)}.",
        "",
        "## The earlier shared-learning-rate study",
        "",
        "[`../stability/results.md`](../stability/results.md) ran every objective at one shared learning rate, far "
        "above every objective's useful range on its testbed, where no regime learned. What it shows is that at "
        "one shared learning rate, soft gates move further and break first; it does not compare objectives at "
        "settings their authors would choose.",
        "",
        "## What would change the verdict at scale",
        "",
        f"A 1M-parameter model, answers of 2 to 5 characters (one token each) and {plan.steps} steps: "
        "sequence-level weighting has little to do when a sequence is a few tokens, and entropy collapse over "
        "thousands of steps on long reasoning traces is out of reach here. Larger models, long answers and long "
        "horizons may separate the objectives where this testbed cannot.",
        "",
        "## Reproduce",
        "",
        f"`{command}` re-derives every number and figure here from `runs.jsonl.gz` in seconds. Training it from "
        f"scratch took {minutes:.0f} minutes of wall time with two jobs ({_calls(timing)}).",
    ]
    return "\n".join(lines) + "\n"


def _calls(timing: dict[str, Any]) -> str:
    calls = timing.get("calls", [])
    if not calls:
        return "no training call recorded"
    loads = [x for c in calls for x in c["load_average_1min_start_end"]]
    return (f"{calls[-1]['cpus']} CPUs, {sum(c['runs_trained'] for c in calls)} runs over {len(calls)} call(s), "
            f"1-minute load average {min(loads):.1f} to {max(loads):.1f} at the start and end of each call")
