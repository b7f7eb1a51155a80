"""sspo_analysis.analysis: run summaries, the entropy-reward fit, the agreement of entropy predictions, the
frontier's error and the pooling of theory results, each against numbers worked out by hand or a closed form
derived here independently of the theory module."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sspo_analysis import analysis as an


def test_spike_count_counts_jumps_over_the_running_median():
    g = [1.0] * 20
    assert an.spike_count(g) == 0
    g[10] = 3.5  # > 3x the median of the previous 10
    g[15] = 2.9  # not
    g[17] = float("nan")  # a non-finite norm is a spike
    assert an.spike_count(g) == 2
    assert an.spike_count([100.0, 1.0, 1.0]) == 0  # too little history


@given(st.lists(st.floats(0.1, 10.0), min_size=1, max_size=60))
def test_spike_count_is_bounded_and_scale_free(values):
    n = an.spike_count(values)
    assert 0 <= n <= max(0, len(values) - 3)
    assert an.spike_count([7.0 * v for v in values]) == n


def test_final_mean_uses_the_last_fifth():
    assert an.final_mean(list(range(10))) == 8.5
    assert an.final_mean([3.0]) == 3.0
    assert math.isnan(an.final_mean([]))


def test_mean_height_is_the_trapezoid_area_per_step():
    assert an.mean_height([0.0, 1.0, 0.0]) == 0.5  # a triangle of area 1 over 2 steps
    assert an.mean_height([2.0]) == 2.0
    assert math.isnan(an.mean_height([]))


def synthetic_metrics(objectives=("grpo", "sspo"), seeds=(0, 1, 2), staleness=(0,), steps=12):
    """Per-step metrics in the trainer's layout: entropy falls and reward rises, by a known amount."""
    rng = np.random.default_rng(0)
    rows, runs = [], []
    for o in objectives:
        for k in staleness:
            for s in seeds:
                name = f"{o}_k{k}_s{s}"
                runs.append({"name": name, "objective": o, "seed": s, "staleness": k, "done": True})
                for t in range(steps):
                    d = -0.01 * (1 + k)
                    rows.append({"run": name, "objective": o, "seed": s, "staleness": k, "step": t,
                                 "reward_mean": 0.3 + 0.02 * t, "entropy": 1.0 + d * t, "loss": 0.0,
                                 "seq_weight_var": 0.01 * (1 + k), "grad_norm": 1.0 + 0.01 * rng.random(),
                                 "skipped_updates": 0, "coef_norm_var": 0.02, "dead_frac": 0.01,
                                 "entropy_change_pred": d + 0.001 * rng.standard_normal(),
                                 "entropy_change_real": d})
    return pd.DataFrame(rows), runs


def test_summaries_and_results_frame_from_known_curves():
    metrics, runs = synthetic_metrics()
    summary = an.summarise_runs(metrics, runs)
    assert len(summary) == 6 and not summary.diverged.any()
    # reward 0.3 + 0.02 t over 12 steps: last 20 % = steps 10, 11 -> 0.51; AUC per step = mean of the line = 0.41
    assert np.allclose(summary.final_reward, 0.51)
    assert np.allclose(summary.auc_reward, 0.41)
    assert np.allclose(summary.weight_var, 0.01)
    assert (summary.spikes == 0).all()
    table = an.results_frame(summary, order=("sspo",))
    assert list(table.objective) == ["sspo", "grpo"]  # named first, then the rest
    assert (table.runs == 3).all() and (table.diverged == 0).all()
    assert np.allclose(table.final_reward_mean, 0.51) and np.allclose(table.final_reward_std, 0.0)


def test_a_run_without_steps_has_nan_summaries_and_diverged():
    metrics, runs = synthetic_metrics(objectives=("grpo",), seeds=(0,))
    runs.append({"name": "missing", "objective": "grpo", "seed": 1, "staleness": 0, "done": False})
    row = an.summarise_runs(metrics, runs).iloc[1]
    assert row.steps == 0 and row.diverged and math.isnan(row.final_reward)


def test_a_collapsed_or_unfinished_run_counts_as_diverged():
    metrics, runs = synthetic_metrics(objectives=("grpo",), seeds=(0, 1, 2))
    metrics.loc[(metrics.seed == 0) & (metrics.step >= 8), "reward_mean"] = 0.05  # collapse
    metrics.loc[(metrics.seed == 1) & (metrics.step == 3), "entropy"] = float("nan")
    runs[2]["done"] = False
    summary = an.summarise_runs(metrics, runs)
    assert summary.diverged.tolist() == [True, True, True]
    assert an.results_frame(summary).diverged.iloc[0] == 3


def test_the_entropy_reward_fit_recovers_a_known_law():
    h = np.linspace(0.2, 1.5, 30)
    metrics = pd.DataFrame({"objective": "sspo", "staleness": 0, "entropy": h,
                            "reward_mean": -0.25 * np.exp(h) + 1.5})
    fit = an.fit_entropy_reward(metrics).iloc[0]
    assert fit.a == pytest.approx(0.25, rel=1e-6) and fit.b == pytest.approx(1.5, rel=1e-6)
    assert fit.r2 == pytest.approx(1.0) and fit.n == 30


def test_the_entropy_reward_fit_is_nan_without_entropy_spread():
    metrics = pd.DataFrame({"objective": "grpo", "staleness": 0, "entropy": [1.0] * 5, "reward_mean": range(5)})
    fit = an.fit_entropy_reward(metrics).iloc[0]
    assert fit.n == 5 and math.isnan(fit.a) and math.isnan(fit.r2)


def test_entropy_agreement_on_a_perfect_prediction():
    df = pd.DataFrame({"objective": ["a"] * 5, "entropy_change_pred": [-2.0, -1, 0.5, 1, 3],
                       "entropy_change_real": [-1.0, -0.5, 0.25, 0.5, 1.5]})
    row = an.entropy_agreement(df).iloc[0]
    assert row.pearson_r == pytest.approx(1.0) and row.slope_through_0 == pytest.approx(0.5)
    assert row.sign_agreement == 1.0 and row.n == 5


def test_token_mixture_pooling_of_two_advantage_signs():
    a = SimpleNamespace(mean_coefficient=1.0, var_coefficient=0.5, dead_fraction=0.1)
    b = SimpleNamespace(mean_coefficient=0.0, var_coefficient=0.0, dead_fraction=0.4)
    var, dead = an.pool_token_mixture([(3.0, a), (1.0, b)])
    # mixture: E[x] = 0.75, E[x^2] = 0.75 * 1.5 = 1.125 -> var 0.5625; dead 0.75 * 0.1 + 0.25 * 0.4
    assert var == pytest.approx(0.5625) and dead == pytest.approx(0.175)


# --------------------------------------------------------------------------- the frontier's error


def _truncated_moment(k: int, s: float, below: float | None = None, above: float | None = None) -> float:
    """``E[r^k 1[a < l < b]]`` for ``l ~ N(-s^2/2, s^2)``, ``r = exp(l)``: the log-normal partial moment.

    Completing the square, ``r^k`` tilts the normal's mean by ``k s^2`` and scales its mass by
    ``exp(k m + k^2 s^2 / 2)``.
    """
    from scipy.stats import norm

    m = -s * s / 2
    shift = m + k * s * s
    hi = norm.cdf((below - shift) / s) if below is not None else 1.0
    lo = norm.cdf((above - shift) / s) if above is not None else 0.0
    return math.exp(k * m + k * k * s * s / 2) * (hi - lo)


def grpo_mse_by_hand(s: float, eps: float) -> float:
    """MSE of GRPO's ``c / A`` against 1, averaged over the advantage signs, at one token.

    ``c / A = r`` while the token is kept: below ``log(1 + eps)`` for ``A > 0``, above
    ``log(1 - eps)`` for ``A < 0``; zero otherwise. ``E[(X - 1)^2] = E[X^2] - 2 E[X] + 1``.
    """
    pos = dict(below=math.log1p(eps))
    neg = dict(above=math.log1p(-eps))
    mse = [_truncated_moment(2, s, **kept) - 2 * _truncated_moment(1, s, **kept) + 1 for kept in (pos, neg)]
    return 0.5 * sum(mse)


def test_frontier_mse_of_grpo_matches_the_log_normal_closed_form():
    from paper_figures import theory_figs

    eps = np.array([0.1, 0.2, 0.4])
    df = theory_figs.data_frontier(std=0.3, length=8, grids={"grpo": ("eps", eps)})
    swept = df[~df.is_default]
    assert np.allclose(swept.value, eps)
    assert np.allclose(swept.mse, [grpo_mse_by_hand(0.3, e) for e in eps], rtol=1e-6)
    # the default eps = 0.2 row repeats the swept one at 0.2
    assert df[df.is_default].mse.iloc[0] == pytest.approx(grpo_mse_by_hand(0.3, 0.2), rel=1e-6)


def test_frontier_errors_average_the_two_signs():
    pos = SimpleNamespace(mean_coefficient=0.8, var_coefficient=0.1, dead_fraction=0.2)
    neg = SimpleNamespace(mean_coefficient=1.1, var_coefficient=0.3, dead_fraction=0.0)
    err = an.frontier_errors({1: pos, -1: neg})
    # bias^2 + var per sign: 0.04 + 0.1 and 0.01 + 0.3
    assert err["mse"] == pytest.approx((0.14 + 0.31) / 2)
    assert err["bias_pos"] == pytest.approx(-0.2) and err["bias_neg"] == pytest.approx(0.1)
    assert err["var_coefficient"] == pytest.approx(0.2) and err["dead_fraction"] == pytest.approx(0.1)


def test_lowest_mse_and_the_frontier_summary():
    df = pd.DataFrame({"objective": ["a"] * 4 + ["b"] * 4, "param": ["eps"] * 4 + ["tau"] * 4,
                       "value": [0.1, 0.2, 0.4, np.nan, 1.0, 2.0, 4.0, np.nan],
                       "mse": [0.5, 0.3, 0.4, 0.35, 0.2, 0.25, 0.3, 0.22],
                       "var_coefficient": 0.1, "bias_pos": 0.0, "bias_neg": 0.0, "log_ratio_std": 0.3, "length": 8,
                       "is_default": [False, False, False, True] * 2, "params": "{}"})
    best = an.lowest_mse(df)
    assert best["a"]["value"] == 0.2 and not best["a"]["at_edge"]
    assert best["b"]["value"] == 1.0 and best["b"]["at_edge"]
    assert best["overall"]["objective"] == "b"
    summary = an.frontier_summary(df).set_index("objective")
    assert summary.overall_best.tolist() == [False, True]
    assert summary.loc["a", "default_mse"] == 0.35


def test_predictions_from_logged_log_ratios_pool_the_signs_and_average_the_updates():
    rng = np.random.default_rng(0)
    lengths = np.array([4, 4, 4, 4, 0, 4])
    data = {"log_ratios": 0.1 * rng.standard_normal(lengths.sum()).astype(np.float32), "lengths": lengths,
            "advantages": np.array([1.0, -1.0, 1.0, -1.0, 1.0, 0.0]), "update": np.array([0, 0, 1, 1, 1, 1])}
    out = an.predict_from_log_ratios("pg", {}, data)
    # pg's coefficient is A itself: c / A = 1 on every token, never dead, whatever the ratios
    assert out["empirical_var_coefficient"] == pytest.approx(0.0, abs=1e-12)
    assert out["empirical_dead_fraction"] == 0.0 and out["lognormal_dead_fraction"] == 0.0
    assert set(out) == {f"{k}_{q}" for k in an.PREDICTION_KINDS for q in ("var_coefficient", "dead_fraction")}
