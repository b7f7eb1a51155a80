"""Theory of VESPO, LUSPO, Clip-Cov and KL-Cov: quadrature and closed forms against Monte Carlo of the
package's own code (within 4 standard errors), against direct integration, and the batch model's limits."""

import json
import math

import numpy as np
import pytest
from scipy import integrate, stats

from sspo_analysis import cli
from sspo_analysis.objectives import resolve_objective
from sspo_analysis.theory import STATS, LogNormalRatios, analyse, available_methods, sweep
from sspo_analysis.theory.sequence_ratio import batch_monte_carlo

MC_CHECKED = ("mean_coefficient", "var_coefficient", "mean_weight", "var_weight", "ess_fraction")


def assert_within_4_se(exact, mc):
    for key in MC_CHECKED:
        se = mc.mc_stderr[key]
        assert abs(getattr(exact, key) - getattr(mc, key)) <= 4 * se + 1e-12, (key, getattr(exact, key),
                                                                             getattr(mc, key), se)


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize(("std", "length"), [(0.3, 10), (0.1, 32), (0.5, 4), (1.0, 2)])
def test_vespo_quadrature_matches_monte_carlo(std, length, sign):
    model = LogNormalRatios(std, length)
    exact = analyse("vespo", model, sign)
    assert exact.method == "quadrature"
    assert_within_4_se(exact, analyse("vespo", model, sign, method="monte-carlo", n_samples=20_000, seed=sign + 5))


def test_vespo_parameters_reach_the_quadrature():
    model = LogNormalRatios(0.4, 6)
    params = dict(k_pos=0.5, lambda_pos=0.8, k_neg=5.0, lambda_neg=4.0)
    for sign in (1, -1):
        exact = analyse("vespo", model, sign, **params)
        assert_within_4_se(exact, analyse("vespo", model, sign, method="monte-carlo", seed=3, **params))
    assert analyse("vespo", model, 1, **params).mean_coefficient != analyse("vespo", model, 1).mean_coefficient


@pytest.mark.parametrize(("sign", "k", "lam"), [(1, 2.0, 3.0), (-1, 3.0, 2.0)])
@pytest.mark.parametrize(("std", "length"), [(0.3, 10), (0.8, 5)])
def test_vespo_against_direct_integration(std, length, sign, k, lam):
    """``E[phi(W)^q]`` by scipy's adaptive quadrature of the formula, ``log W ~ N(L m, L s^2)``."""
    m = -std**2 / 2
    density = stats.norm(length * m, std * math.sqrt(length)).pdf

    def moment(q):
        def f(x):
            x = min(max(x, math.log(1e-8)), 20.0)
            return math.exp(q * (lam + k * x - lam * math.exp(x)))

        return integrate.quad(lambda x: f(x) * density(x), -np.inf, np.inf, epsabs=1e-13, epsrel=1e-11, limit=200)[0]

    r = analyse("vespo", LogNormalRatios(std, length), sign)
    m1, m2 = moment(1), moment(2)
    assert r.mean_coefficient == pytest.approx(m1, rel=1e-8)
    assert r.var_coefficient == pytest.approx(m2 - m1**2, rel=1e-7)
    assert r.ess_fraction == pytest.approx(m1**2 / m2, rel=1e-8)


@pytest.mark.parametrize("sign", [1, -1])
def test_vespo_on_policy_limit(sign):
    results = [analyse("vespo", LogNormalRatios(std, 16), sign) for std in (1e-2, 1e-4, 1e-6)]
    assert abs(results[-1].mean_coefficient - 1) < 1e-4 and results[-1].var_coefficient < 1e-8
    assert abs(results[0].mean_coefficient - 1) > abs(results[-1].mean_coefficient - 1)


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize(("std", "length", "eps"), [(0.05, 16, 0.01), (0.3, 8, 0.2)])
def test_luspo_closed_form_is_gspos_and_matches_monte_carlo(std, length, eps, sign):
    model = LogNormalRatios(std, length)
    luspo, gspo = analyse("luspo", model, sign, eps=eps), analyse("gspo", model, sign, eps=eps)
    assert luspo.method == "closed-form"
    assert all(getattr(luspo, k) == getattr(gspo, k) for k in STATS)
    mc = analyse("luspo", model, sign, method="monte-carlo", seed=1, eps=eps)
    assert_within_4_se(luspo, mc)
    assert abs(luspo.dead_fraction - mc.dead_fraction) <= 4 * mc.mc_stderr["dead_fraction"] + 1e-12


@pytest.mark.parametrize("name", ["clip-cov", "kl-cov"])
def test_batch_objectives_are_monte_carlo_only(name):
    model = LogNormalRatios(0.3, 4)
    assert available_methods(name, model) == ("monte-carlo",)
    assert analyse(name, model, 1, n_samples=1024).method == "monte-carlo"
    with pytest.raises(ValueError, match="allowed values: auto, monte-carlo"):
        analyse(name, model, 1, method="quadrature")


@pytest.mark.parametrize("sign", [1, -1])
def test_clip_cov_with_an_empty_window_is_ppo_clip(sign):
    """No covariance lies in (1e9, 2e9): nothing is chosen, and the batch Monte Carlo must give GRPO's closed form."""
    model = LogNormalRatios(0.3, 6)
    exact = analyse("grpo", model, sign, eps=0.2)
    mc = analyse("clip-cov", model, sign, n_samples=16_384, seed=2, clip_cov_lb=1e9, clip_cov_ub=2e9)
    assert_within_4_se(exact, mc)
    assert abs(exact.dead_fraction - mc.dead_fraction) <= 4 * mc.mc_stderr["dead_fraction"]


@pytest.mark.parametrize("sign", [1, -1])
def test_kl_cov_without_penalty_is_token_importance_sampling(sign):
    """``ppo_kl_coef = 0`` leaves ``c = A r``: the batch Monte Carlo must give ``is-token``'s closed form."""
    model = LogNormalRatios(0.3, 6)
    exact = analyse("is-token", model, sign)
    assert_within_4_se(exact, analyse("kl-cov", model, sign, n_samples=16_384, seed=4, ppo_kl_coef=0.0))


def test_clip_cov_removes_about_its_ratio_of_tokens():
    """With every unclipped token a candidate, about ``clip_cov_ratio`` of all tokens lose their gradient on top of
    the PPO clip; on-policy (tiny std) PPO clips nothing and the dead fraction is the ratio itself."""
    model = LogNormalRatios(1e-6, 8)
    mc = analyse("clip-cov", model, 1, n_samples=8192, seed=5, clip_cov_ratio=0.1, clip_cov_lb=-1e9, clip_cov_ub=1e9)
    expected = int(0.1 * 64 * 8) / (64 * 8)  # int(ratio * N) of the N = 64 x 8 tokens of each batch
    assert abs(mc.dead_fraction - expected) <= 4 * mc.mc_stderr["dead_fraction"]
    assert mc.mean_coefficient == pytest.approx(1 - mc.dead_fraction, abs=4 * mc.mc_stderr["mean_coefficient"])


def test_kl_cov_on_policy_penalty_moves_only_the_chosen_tokens():
    """On-policy ``c / A = 1 - coef sign(l) / A`` on the chosen tokens: the mean stays 1 (``sign(l)`` is symmetric)
    while the variance comes from the chosen fraction alone."""
    model = LogNormalRatios(1e-6, 8)
    mc = analyse("kl-cov", model, -1, n_samples=8192, seed=6, kl_cov_ratio=0.05, ppo_kl_coef=0.1)
    assert abs(mc.mean_coefficient - 1) <= 4 * mc.mc_stderr["mean_coefficient"]
    assert 0 < mc.var_coefficient < 0.05 * 0.1**2 * 200  # coef^2 / A^2 on about 5 % of tokens, A bounded away from 0


def test_batch_monte_carlo_is_deterministic_and_checks_its_input():
    obj = resolve_objective("clip-cov", clip_cov_ratio=0.05)
    model = LogNormalRatios(0.3, 4)
    a = batch_monte_carlo(obj, model, 1, 1024, seed=9)
    assert a == batch_monte_carlo(obj, model, 1, 1024, seed=9)
    with pytest.raises(ValueError, match="batch_size: must be an integer >= 2"):
        batch_monte_carlo(obj, model, 1, 1024, seed=0, batch_size=1)
    with pytest.raises(ValueError, match="n_samples: need at least 2 batches"):
        batch_monte_carlo(obj, model, 1, 100, seed=0)


def test_sweep_includes_the_field():
    frame = sweep(["vespo", "luspo", "clip-cov", "kl-cov"], [0.1, 0.3], [4, 16], n_samples=2048)
    assert set(frame["objective"]) == {"vespo", "luspo", "clip-cov", "kl-cov"}
    methods = dict(zip(frame["objective"], frame["method"]))
    assert methods == {"vespo": "quadrature", "luspo": "closed-form", "clip-cov": "monte-carlo",
                       "kl-cov": "monte-carlo"}
    row = frame[(frame.objective == "vespo") & (frame.length == 16) & (frame.log_ratio_std == 0.3)
                & (frame.advantage_sign == 1)].iloc[0]
    assert row.mean_coefficient == pytest.approx(analyse("vespo", LogNormalRatios(0.3, 16), 1).mean_coefficient,
                                                 rel=1e-12)


def test_cli_vespo_matches_its_monte_carlo(capsys):
    """The done-when check: ``sspo theory --objective vespo ... --json`` against ``--method monte-carlo``."""
    base = ["theory", "--objective", "vespo", "--log-ratio-std", "0.3", "--length", "10", "--advantage-sign", "+",
            "--json"]
    out = {}
    for method in ("auto", "monte-carlo"):
        assert cli.main([*base, "--method", method]) in (0, None)
        out[method] = json.loads(capsys.readouterr().out)
    assert out["auto"]["method"] == "quadrature"
    for key in MC_CHECKED:
        assert abs(out["auto"][key] - out["monte-carlo"][key]) <= 4 * out["monte-carlo"]["mc_stderr"][key]
