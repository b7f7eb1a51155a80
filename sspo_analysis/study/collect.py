"""The study's numbers: one row per run, confidence intervals per arm and regime, paired tests, theory's ranking.

- :func:`tidy`: one row per run (``stability.csv``): the regime, the arm, the seed,
  whether and when it became unstable (:func:`sspo_analysis.analysis.instability`),
  final reward, reward AUC, end entropy, importance-weight variance, log-ratio spread.
- :func:`summarise`: per regime and arm, every outcome's mean over seeds with a 95%
  bootstrap interval (``summary.csv``).
- :func:`compare`: in the headline regime, every arm against ``grpo`` and ``gmpo``,
  paired by seed (``comparisons.csv``).
- :func:`theory_ranking`: per regime, each arm's gradient shrinkage, dead fraction and
  coefficient variance predicted by :mod:`sspo_analysis.theory` at the regime's logged
  log-ratio spread and length, beside the observed instability (``theory.csv``), and the
  rank correlation of each prediction with the observation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from sspo_analysis import analysis
from sspo_analysis.study.design import Plan, StudyRun
from sspo_analysis.study.stats import fraction_ci, mean_ci, paired_difference, spearman_permutation

OUTCOMES: dict[str, str] = {
    "unstable": "fraction of runs unstable",
    "time_to_instability": "steps to instability (censored at the run length)",
    "final_reward": "final reward (mean of the last 20% of steps)",
    "reward_auc": "reward AUC (mean reward over all steps)",
    "end_entropy": "end entropy (nats per token, last 20% of steps)",
    "weight_var": "importance-weight variance (per step, mean over steps)",
}
"""The outcomes every arm is summarised and compared on, with their meaning."""
SHORT_NAMES: dict[str, str] = {
    "unstable": "fraction unstable", "time_to_instability": "steps to instability\n(censored at run length)",
    "final_reward": "final reward\n(last 20% of steps)", "reward_auc": "reward AUC\n(mean over steps)",
    "end_entropy": "end entropy\n(nats/token, last 20%)", "weight_var": "importance-weight variance\n(mean over steps)",
}
"""Panel titles of :data:`OUTCOMES`."""
EARLY_STEPS = 3
"""Theory is fed the log-ratio spread of the first steps, before any run has become unstable."""
REFERENCES = ("grpo", "gmpo")
"""The arms every other arm is compared with in the headline regime."""


def _verdict(run: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run / "DIVERGED").read_text()) if (run / "DIVERGED").exists() else None
    except (OSError, ValueError):
        return {"step": None, "kind": "trainer", "reason": "unreadable DIVERGED"}


def read_runs(plan: Plan, root: Path) -> dict[StudyRun, Any]:
    """Every run's per-step metrics (:func:`sspo_analysis.training.read_metrics`), or ``None`` for a run without."""
    from sspo_analysis.training import read_metrics

    runs = {}
    for spec in plan.runs():
        run = spec.run_dir(root / "runs")
        runs[spec] = read_metrics(run) if (run / "metrics.jsonl").exists() else None
    return runs


def run_row(spec: StudyRun, run: Path, df: Any, steps_planned: int) -> dict[str, Any]:
    """The tidy row of one run from its metrics ``df`` (NaN outcomes for a run with no metrics)."""
    row = {"arm": spec.arm.label, "objective": spec.arm.objective, **spec.regime.as_columns(), "seed": spec.seed,
           "run": spec.name}
    if df is None or df.empty:
        nan = float("nan")
        return {**row, "steps": 0, "unstable": np.nan, "step_unstable": np.nan, "kind": "", "time_to_instability": nan,
                "final_reward": nan, "reward_auc": nan, "end_entropy": nan, "weight_var": nan,
                "early_log_ratio_std": nan, "response_length": nan, "spikes": nan, "peak_step": -1}
    df = df.sort_values("step")
    verdict = analysis.instability(df, _verdict(run))
    reward = df.reward_mean.to_numpy(dtype=float)
    n_steps = int(df.step.max())
    # A run the trainer stopped has stopped improving: its last reward stands for the steps it did not run.
    full = np.concatenate([reward, np.full(max(0, steps_planned - len(reward)), reward[-1])])
    return {
        **row, "steps": n_steps, "unstable": float(verdict["unstable"]),
        "step_unstable": verdict["step_unstable"] if verdict["unstable"] else np.nan, "kind": verdict["kind"],
        "time_to_instability": float(verdict["step_unstable"] if verdict["unstable"] else steps_planned),
        "final_reward": analysis.final_mean(full), "reward_auc": analysis.mean_height(full),
        "end_entropy": analysis.final_mean(df.entropy), "weight_var": float(np.nanmean(df.seq_weight_var)),
        "early_log_ratio_std": float(np.nanmean(df.log_ratio_std.to_numpy(dtype=float)[:EARLY_STEPS])),
        "response_length": float(np.nanmean(df.response_length)), "spikes": analysis.spike_count(df.grad_norm),
        "peak_step": _peak_step(df),
    }


def _peak_step(df: Any) -> int:
    """The step of the highest smoothed reward (the running peak :func:`~sspo_analysis.analysis.instability` uses)."""
    smooth = analysis.smoothed_reward(df.reward_mean)
    return int(df.step.iloc[int(np.nanargmax(smooth))]) if np.isfinite(smooth).any() else -1


def tidy(plan: Plan, root: Path, runs: dict[StudyRun, Any]) -> Any:
    """One row per run of ``plan`` under ``root/runs`` (``stability.csv``) from their metrics ``runs``
    (:func:`read_runs`), with ``headline`` marking the headline regime's runs."""
    import pandas as pd

    rows = [run_row(s, s.run_dir(root / "runs"), df, plan.steps) for s, df in runs.items()]
    df = pd.DataFrame(rows)
    df["headline"] = df.regime == plan.headline.label
    return df


def summarise(df: Any) -> Any:
    """Per (regime, arm): ``n`` (runs with metrics; a crashed run counts in ``n_without_metrics`` only) and, per
    outcome of :data:`OUTCOMES`, ``<outcome>``, ``<outcome>_ci_low`` and ``<outcome>_ci_high`` (mean over seeds,
    95% percentile bootstrap)."""
    import pandas as pd

    rows = []
    for (regime, arm), g in df.groupby(["regime", "arm"], sort=False):
        row = {"regime": regime, "arm": arm, **{k: g[k].iloc[0] for k in ("length", "lr", "updates", "staleness")},
               "n": int(g.unstable.notna().sum()), "n_without_metrics": int(g.unstable.isna().sum())}
        for key in OUTCOMES:
            values = g[key].to_numpy(dtype=float)
            mean, low, high = fraction_ci(values) if key == "unstable" else mean_ci(values)
            row.update({key: mean, f"{key}_ci_low": low, f"{key}_ci_high": high})
        rows.append(row)
    return pd.DataFrame(rows)


def compare(df: Any, regime: str) -> Any:
    """In ``regime``: every arm against each of :data:`REFERENCES`, per outcome, paired by seed
    (:func:`~sspo_analysis.study.stats.paired_difference`; ``diff`` is arm minus reference)."""
    import pandas as pd

    head = df[df.regime == regime]
    wide = {key: head.pivot(index="seed", columns="arm", values=key) for key in OUTCOMES}
    rows = []
    for ref in REFERENCES:
        if ref not in wide["unstable"].columns:
            continue
        for arm in dict.fromkeys(head.arm):
            if arm == ref:
                continue
            for key, table in wide.items():
                test = paired_difference(table[arm].to_numpy(dtype=float), table[ref].to_numpy(dtype=float))
                rows.append({"regime": regime, "arm": arm, "reference": ref, "outcome": key, **test})
    return pd.DataFrame(rows)


def predict(arm_objective: str, params: dict[str, Any], std: float, length: float) -> dict[str, float]:
    """Theory at log-ratio spread ``std`` over ``length`` tokens, averaged over the two advantage signs."""
    from sspo_analysis.theory import LogNormalRatios, analyse

    if not (np.isfinite(std) and std > 0 and np.isfinite(length)):
        return {"shrinkage": np.nan, "dead_fraction": np.nan, "var_coefficient": np.nan}
    model = LogNormalRatios(float(std), length=max(1, round(length)))
    res = [analyse(arm_objective, model, advantage_sign=sign, **params) for sign in (1, -1)]
    return {"shrinkage": float(np.mean([r.mean_coefficient for r in res])),
            "dead_fraction": float(np.mean([r.dead_fraction for r in res])),
            "var_coefficient": float(np.mean([r.var_coefficient for r in res]))}


PREDICTORS = ("shrinkage", "dead_fraction", "var_coefficient")
"""Theory's predictions set beside the observed instability."""


def theory_ranking(df: Any, plan: Plan) -> tuple[Any, Any]:
    """``(per_arm, correlations)``: theory's predictions per (regime, arm) beside the observed instability rate
    and final reward, and per regime the Spearman correlation of each prediction with the instability rate.

    Every arm of a regime is evaluated at the same spread, the median over the regime's runs of the log-ratio
    spread of their first :data:`EARLY_STEPS` steps, and at the regime's mean response length: the ranking
    then reflects the objectives, not how far each run had already drifted.
    """
    import pandas as pd
    params = {a.label: (a.objective, dict(a.params)) for a in plan.arms}
    rows, corr = [], []
    for regime, g in df.groupby("regime", sort=False):
        std, length = float(np.nanmedian(g.early_log_ratio_std)), float(np.nanmean(g.response_length))
        part = []
        for arm, h in g.groupby("arm", sort=False):
            objective, kw = params[arm]
            part.append({"regime": regime, "arm": arm, "log_ratio_std": std, "length": length,
                         **predict(objective, kw, std, length), "observed_unstable": float(h.unstable.mean()),
                         "observed_final_reward": float(h.final_reward.mean())})
        rows += part
        frame = pd.DataFrame(part)
        for key in PREDICTORS:
            ok = frame[[key, "observed_unstable"]].dropna()
            rho, p = spearman_permutation(ok[key], ok.observed_unstable)
            corr.append({"regime": regime, "predictor": key, "spearman_rho": float(rho), "p_value": float(p),
                         "n_arms": len(ok)})
    return pd.DataFrame(rows), pd.DataFrame(corr)
