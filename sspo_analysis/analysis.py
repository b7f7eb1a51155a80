"""Analysis of training runs and theory sweeps: the numbers behind the figures, the results table and notebook 03.

Everything here reads plain tables or arrays and returns plain tables or numbers;
nothing plots, trains or writes files. Inputs:

- a tidy per-step metrics table, one row per (run, step), with the run's ``run``
  (its name), ``objective``, ``seed`` and ``staleness`` and every key of the
  trainer's ``metrics.jsonl`` (``reward_mean``, ``entropy``, ``grad_norm``, ...);
- a list of run records ``{"name", "objective", "seed", "staleness", "done"}``;
- for the theory side, :class:`sspo_analysis.theory.TheoryResult` objects and the
  trainer's logged log-ratios (``{"log_ratios", "lengths", "advantages", "update"}``).

The run summaries (:func:`summarise_runs`, :func:`results_frame`), the
entropy-reward law fit (:func:`fit_entropy_reward`), the entropy-mechanism
agreement (:func:`entropy_agreement`), the bias-variance frontier's error
(:func:`frontier_errors`, :func:`lowest_mse`, :func:`frontier_summary`) and the
theory on logged log-ratios (:func:`predict_from_log_ratios`) live here, below
``paper_figures`` and the notebooks, which only draw them. Whether a run failed (the
summaries' ``diverged``, the stability study's :func:`instability`) is decided by
:mod:`sspo_analysis.failure`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

# What failed is defined once, in sspo_analysis.failure: the run summaries use its "diverged" and final reward, and
# the stability study reads its verdict (instability) and the constants it states through this module.
from sspo_analysis.failure import (  # noqa: F401
    ENTROPY_COLLAPSE_FRACTION,
    ENTROPY_COLLAPSE_STEPS,
    REWARD_COLLAPSE_FRACTION,
    REWARD_SMOOTHING,
    SOLVED_REWARD,
    diverged,
    final_mean,
    instability,
    smoothed_reward,
)

SPIKE_FACTOR = 3.0
"""A grad-norm spike exceeds this many times the median of the previous :data:`SPIKE_WINDOW` steps."""
SPIKE_WINDOW = 10
SPIKE_WARMUP = 3
"""The first steps have too little history to judge a spike."""
PREDICTION_KINDS = ("empirical", "lognormal")
"""How :func:`predict_from_log_ratios` models the logged log-ratios: as they are, or by two moments."""


# --------------------------------------------------------------------------- per-run summaries


def spike_count(grad_norm: Sequence[float], factor: float = SPIKE_FACTOR, window: int = SPIKE_WINDOW) -> int:
    """Number of grad-norm spikes: steps whose norm exceeds ``factor`` times the median of the previous ``window``.

    The first :data:`SPIKE_WARMUP` steps are never spikes; a non-finite norm counts as a spike.
    """
    g = np.asarray(grad_norm, dtype=float)
    count = 0
    for t in range(SPIKE_WARMUP, len(g)):
        if not np.isfinite(g[t]):
            count += 1
            continue
        past = g[max(0, t - window):t]
        past = past[np.isfinite(past)]
        if past.size and g[t] > factor * np.median(past):
            count += 1
    return count


def mean_height(values: Sequence[float]) -> float:
    """Area under the curve over unit steps (trapezoid rule) divided by its span: runs of any length compare."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v[0]) if len(v) else float("nan")
    return float((v[:-1] + v[1:]).sum() / 2 / (len(v) - 1))


def summarise_run(run: Mapping[str, Any], steps: Any) -> dict[str, Any]:
    """One run's summary: ``steps``, ``final_reward``, ``end_entropy``, ``auc_reward``, ``weight_var``, ``spikes``,
    ``diverged``, plus the record's ``name, objective, seed, staleness``.

    ``auc_reward`` is :func:`mean_height` of the reward curve (the mean reward over
    training); ``weight_var`` the mean over steps of the logged importance-weight
    variance ``seq_weight_var``. A run without steps has NaN summaries and diverged.
    """
    row = {k: run[k] for k in ("name", "objective", "seed", "staleness")}
    if steps is None or steps.empty:
        nan = float("nan")
        row.update(steps=0, final_reward=nan, end_entropy=nan, auc_reward=nan, weight_var=nan, spikes=nan,
                   diverged=True)
        return row
    reward = steps.reward_mean.to_numpy(dtype=float)
    row.update(steps=len(steps), final_reward=final_mean(reward), end_entropy=final_mean(steps.entropy),
               auc_reward=mean_height(reward), weight_var=float(np.nanmean(steps.seq_weight_var)),
               spikes=spike_count(steps.grad_norm), diverged=diverged(run, steps))
    return row


def summarise_runs(metrics: Any, runs: Iterable[Mapping[str, Any]]) -> Any:
    """One row per run (:func:`summarise_run`), in the order of ``runs``, from the per-step ``metrics`` table."""
    import pandas as pd

    rows = []
    for run in runs:
        steps = metrics[metrics.run == run["name"]].sort_values("step") if len(metrics) else metrics
        rows.append(summarise_run(run, steps))
    return pd.DataFrame(rows)


SUMMARY_COLUMNS = ("final_reward", "end_entropy", "auc_reward", "weight_var", "spikes")
"""The per-run summaries :func:`results_frame` averages over seeds."""


def results_frame(summary: Any, order: Sequence[str] = ()) -> Any:
    """Per objective (staleness 0 runs): mean and sample std over seeds of every summary, and the diverged count.

    Objectives named in ``order`` come first, in that order; the others follow alphabetically.
    Columns: ``objective, runs, diverged`` and ``<summary>_mean``, ``<summary>_std`` (NaN for one run).
    """
    import pandas as pd

    main = summary[summary.staleness == 0]
    present = set(main.objective)
    names = [o for o in order if o in present]
    names += sorted(present - set(names))
    rows = []
    for name in names:
        g = main[main.objective == name]
        row = {"objective": name, "runs": len(g), "diverged": int(g.diverged.sum())}
        for key in SUMMARY_COLUMNS:
            row[f"{key}_mean"] = float(g[key].mean())
            row[f"{key}_std"] = float(g[key].std(ddof=1)) if len(g) > 1 else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- entropy


def entropy_reward_law(h: Any, a: float, b: float) -> Any:
    """The entropy-reward law of Cui et al. (arXiv 2505.22617): ``R = -a exp(H) + b``."""
    return -a * np.exp(h) + b


def _fit_law(h: np.ndarray, r: np.ndarray) -> dict[str, float]:
    """Least-squares ``a, b`` of :func:`entropy_reward_law`, their standard errors and ``r2``."""
    from scipy.optimize import curve_fit

    (fa, fb), cov = curve_fit(entropy_reward_law, h, r, p0=(0.1, float(r.mean()) + 0.1 * np.exp(h.mean())))
    resid = r - entropy_reward_law(h, fa, fb)
    ss_tot = float(((r - r.mean()) ** 2).sum())
    se = np.sqrt(np.diag(cov)) if np.isfinite(cov).all() else (np.nan, np.nan)
    return {"a": float(fa), "b": float(fb), "a_se": float(se[0]), "b_se": float(se[1]),
            "r2": 1.0 - float((resid**2).sum()) / ss_tot if ss_tot > 0 else np.nan}


def fit_entropy_reward(metrics: Any, objectives: Sequence[str] | None = None) -> Any:
    """Fit ``R = -a exp(H) + b`` per objective on every (seed, step) of staleness 0 (``scipy.optimize.curve_fit``).

    ``objectives`` defaults to those in ``metrics``, in order of appearance. Returns
    one row per objective: ``a``, ``b``, their standard errors, ``r2`` and the number
    of points ``n`` (NaN fits below three points or without entropy spread);
    ``a > 0`` means reward is bought with entropy.
    """
    import pandas as pd

    main = metrics[metrics.staleness == 0]
    rows = []
    for name in objectives if objectives is not None else list(dict.fromkeys(main.objective)):
        g = main[main.objective == name][["entropy", "reward_mean"]].dropna()
        h, r = g.entropy.to_numpy(dtype=float), g.reward_mean.to_numpy(dtype=float)
        row = {"objective": name, "n": len(h), "a": np.nan, "b": np.nan, "a_se": np.nan, "b_se": np.nan,
               "r2": np.nan}
        if len(h) >= 3 and np.ptp(h) > 0:
            row.update(_fit_law(h, r))
        rows.append(row)
    return pd.DataFrame(rows)


def entropy_agreement(df: Any, pred: str = "entropy_change_pred", real: str = "entropy_change_real") -> Any:
    """Per objective: Pearson correlation of ``real`` with ``pred``, least-squares slope through 0, sign agreement.

    Non-finite pairs are dropped; the correlation is NaN below three pairs or without spread.
    """
    import pandas as pd

    rows = []
    for name, g in df.groupby("objective", sort=False):
        p = g[pred].to_numpy(dtype=float)
        r = g[real].to_numpy(dtype=float)
        ok = np.isfinite(p) & np.isfinite(r)
        p, r = p[ok], r[ok]
        corr = float(np.corrcoef(p, r)[0, 1]) if len(p) > 2 and p.std() > 0 and r.std() > 0 else float("nan")
        slope = float((p @ r) / (p @ p)) if len(p) and (p @ p) > 0 else float("nan")
        rows.append({"objective": name, "predictor": pred, "n": int(len(p)), "pearson_r": corr,
                     "slope_through_0": slope,
                     "sign_agreement": float(np.mean(np.sign(p) == np.sign(r))) if len(p) else float("nan")})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- bias-variance frontier


def frontier_errors(results: Mapping[int, Any]) -> dict[str, float]:
    """The coefficient's error at one setting from its theory results per advantage sign ``{+1: r, -1: r}``.

    Returns ``bias_pos``, ``bias_neg`` (``E[c/A] - 1`` per sign) and, averaged over the
    signs (group-normalised advantages are positive and negative equally often),
    ``var_coefficient``, ``mse = bias^2 + variance`` and ``dead_fraction``.
    """
    bias = {s: r.mean_coefficient - 1.0 for s, r in results.items()}
    return {"bias_pos": bias[1], "bias_neg": bias[-1],
            "var_coefficient": float(np.mean([r.var_coefficient for r in results.values()])),
            "mse": float(np.mean([bias[s] ** 2 + r.var_coefficient for s, r in results.items()])),
            "dead_fraction": float(np.mean([r.dead_fraction for r in results.values()]))}


TIE_RTOL = 0.01
"""Frontier MSEs within this relative tolerance of the lowest count as a tie (:func:`lowest_mse`)."""


def lowest_mse(df: Any, rtol: float = TIE_RTOL) -> dict[str, dict]:
    """Per objective of a frontier table, the row of the lowest-MSE swept setting; ``"overall"``: the best of all.

    ``df`` has columns ``objective, value, mse, is_default``; each row gets
    ``at_edge``: whether the best value is an end of the swept range. The
    ``"overall"`` row also gets ``tied``: every objective whose lowest MSE is within
    ``rtol`` (relative) of the overall lowest, the winner first, and ``rtol``; so
    two objectives that reach the same MSE (gspo and gmpo, which coincide once
    neither clips) are reported as a tie, not as one winner.
    """
    swept = df[~df.is_default]
    best = {}
    for name, g in swept.groupby("objective", sort=False):
        row = g.loc[g.mse.idxmin()].to_dict()
        row["at_edge"] = bool(row["value"] in (g.value.min(), g.value.max()))
        best[name] = row
    overall = dict(min(best.values(), key=lambda b: b["mse"]))
    ranked = sorted(best.values(), key=lambda b: b["mse"])
    overall["tied"] = [b["objective"] for b in ranked if b["mse"] <= overall["mse"] * (1.0 + rtol)]
    overall["rtol"] = rtol
    best["overall"] = overall
    return best


def frontier_summary(df: Any, rtol: float = TIE_RTOL) -> Any:
    """Per objective: the lowest-MSE setting (and whether it sits at the edge of the swept range) and the defaults.

    ``overall_best`` is true for every objective tied at the lowest MSE (within
    ``rtol``, relative; see :func:`lowest_mse`), ``tie_rtol`` records the tolerance.
    """
    import pandas as pd

    best = lowest_mse(df, rtol)
    tied = set(best["overall"]["tied"])
    rows = []
    for name, g in df.groupby("objective", sort=False):
        b, d = best[name], g[g.is_default].iloc[0]
        rows.append({"objective": name, "log_ratio_std": b["log_ratio_std"], "length": b["length"],
                     "param": b["param"], "best_value": b["value"], "best_at_grid_edge": b["at_edge"],
                     "best_mse": b["mse"], "best_var": b["var_coefficient"], "best_bias_pos": b["bias_pos"],
                     "best_bias_neg": b["bias_neg"], "default_params": d["params"], "default_mse": d["mse"],
                     "default_var": d["var_coefficient"], "default_bias_pos": d["bias_pos"],
                     "default_bias_neg": d["bias_neg"], "overall_best": name in tied, "tie_rtol": rtol})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- theory on logged log-ratios


def pool_token_mixture(items: Sequence[tuple[float, Any]]) -> tuple[float, float]:
    """Variance and dead fraction of the token mixture of parts ``(n_tokens, TheoryResult)``.

    The law of total variance: ``E[c^2] - E[c]^2`` over the pooled tokens, with
    each part's ``E[c^2] = var + mean^2`` weighted by its token count.
    """
    total = sum(n for n, _ in items)
    mean = sum(n * r.mean_coefficient for n, r in items) / total
    second = sum(n * (r.var_coefficient + r.mean_coefficient**2) for n, r in items) / total
    dead = sum(n * r.dead_fraction for n, r in items) / total
    return second - mean**2, dead


def _sequences(data: Mapping[str, np.ndarray], idx: np.ndarray) -> list[np.ndarray]:
    """The logged log-ratios of sequences ``idx`` (the flat array split by ``lengths``), in float64."""
    offsets = np.concatenate([[0], np.cumsum(data["lengths"])])
    return [data["log_ratios"][offsets[j]:offsets[j + 1]].astype(np.float64) for j in idx]


def _predict_update(objective: str, params: Mapping[str, Any], data: Mapping[str, np.ndarray],
                    selected: np.ndarray) -> dict[str, tuple[float, float]]:
    """Pooled (variance, dead fraction) per kind for the sequences ``selected`` (a boolean mask) of one update."""
    from sspo_analysis.theory import EmpiricalRatios, LogNormalRatios, analyse

    parts: dict[str, list] = {kind: [] for kind in PREDICTION_KINDS}
    for sign in (1, -1):
        idx = np.flatnonzero(selected & (np.sign(data["advantages"]) == sign) & (data["lengths"] > 0))
        if idx.size == 0:
            continue
        model = EmpiricalRatios(_sequences(data, idx))
        n_tok = float(model.lengths.sum())
        res = analyse(objective, model, advantage_sign=sign, method="monte-carlo", **params)
        parts["empirical"].append((n_tok, res))
        if model.log_ratio_std > 0:
            lognormal = LogNormalRatios(model.log_ratio_std, length=max(1, round(model.mean_length)),
                                        mean=model.log_ratio_mean)
            parts["lognormal"].append((n_tok, analyse(objective, lognormal, advantage_sign=sign, **params)))
    return {kind: pool_token_mixture(items) for kind, items in parts.items() if items}


def predict_from_log_ratios(objective: str, params: Mapping[str, Any],
                            data: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Theory's coefficient variance and dead fraction for one logged step of a run.

    ``data`` is one step of the trainer's log-ratio dump: ``log_ratios`` (flat, all
    tokens), ``lengths`` and ``advantages`` per sequence and optionally ``update``
    (the minibatch update that saw the sequence). For each update the sequences are
    split by the sign of their advantage and each part is analysed two ways:

    - ``empirical``: :class:`sspo_analysis.theory.EmpiricalRatios` on the logged
      sequences themselves (Monte Carlo over all of them), a consistency check of the
      theory's coefficient against the trainer's;
    - ``lognormal``: :class:`sspo_analysis.theory.LogNormalRatios` with the part's
      log-ratio mean, std and mean length, the analytic model's prediction from two moments;

    the signs are pooled by token counts (:func:`pool_token_mixture`; the trainer
    counts every token with ``A != 0``) and the updates averaged, as the trainer
    averages ``coef_norm_var`` and ``dead_frac``. Returns ``{kind}_var_coefficient`` and
    ``{kind}_dead_fraction`` for each kind of :data:`PREDICTION_KINDS` (NaN when no part qualified).
    """
    updates = data.get("update", np.zeros(len(data["lengths"]), dtype=int))
    preds: dict[str, list[tuple[float, float]]] = {kind: [] for kind in PREDICTION_KINDS}
    for u in np.unique(updates):
        for kind, value in _predict_update(objective, params, data, updates == u).items():
            preds[kind].append(value)
    out = {}
    for kind, vals in preds.items():
        out[f"{kind}_var_coefficient"] = float(np.mean([v[0] for v in vals])) if vals else float("nan")
        out[f"{kind}_dead_fraction"] = float(np.mean([v[1] for v in vals])) if vals else float("nan")
    return out
