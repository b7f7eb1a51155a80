"""Theory: closed forms and quadrature against Monte Carlo through the real objective code,
identities of the log-normal model, independent checks with scipy, models, sweeps, bad input; the peer
objectives (VESPO, LUSPO, Clip-Cov, KL-Cov) against Monte Carlo, direct integration and the batch model's limits."""

import json
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import integrate, stats

from sspo_analysis import cli
from sspo_analysis.gates import SOFT_GATES
from sspo_analysis.objectives import Terms, get_objective
from sspo_analysis.theory import (
    REFERENCE_ESTIMATORS,
    RESULT_KEYS,
    STATS,
    EmpiricalRatios,
    LogNormalRatios,
    all_objective_names,
    analyse,
    available_methods,
    resolve_objective,
    sweep,
)
from sspo_analysis.theory.models import sum_variance
from sspo_analysis.theory.sequence_ratio import batch_monte_carlo

CLOSED_FORM = ("grpo", "dapo", "cispo", "gspo", "gmpo", "is-token", "is-seq")
# Deterministic examples: Monte Carlo at 4 standard errors must not flake in CI.
PROPERTY = settings(max_examples=10, deadline=None, derandomize=True)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def assert_agrees_with_monte_carlo(exact, mc, n_sequences):
    """Every statistic within 4 Monte Carlo standard errors.

    A probability estimated as exactly 0 or 1 has a zero standard error; the
    rule of three (3 / n) bounds what n samples can resolve there.
    """
    assert mc.method == "monte-carlo" and exact.method != "monte-carlo"
    for key in STATS:
        a, b, se = getattr(exact, key), getattr(mc, key), mc.mc_stderr[key]
        floor = 3.0 / n_sequences if key == "dead_fraction" else 0.0
        assert abs(a - b) <= 4 * se + floor + 1e-9 * max(1.0, abs(a)), (key, a, b, se)


def closed_form_params(name, eps, std, length):
    if name == "cispo":
        return {"eps_max": 1.0 + 4 * eps}  # truncation inside the bulk of r
    if name == "gspo":
        # GSPO clips the geometric mean, whose std is s / sqrt(L): scale eps so the clip bites.
        return {"eps": eps * std / math.sqrt(length)}
    if name in ("grpo", "dapo", "gmpo"):
        return {"eps": eps}
    return {}


@PROPERTY
@given(
    name=st.sampled_from(CLOSED_FORM),
    std=st.floats(0.01, 1.0),
    length=st.integers(1, 256),
    eps=st.floats(0.05, 0.5),
    sign=st.sampled_from([1, -1]),
)
def test_closed_form_matches_monte_carlo(name, std, length, eps, sign):
    if name == "is-seq":
        std = min(std, 1.0 / math.sqrt(length))  # Var W = e^{L s^2} - 1: keep the MC variance finite in practice
    model = LogNormalRatios(std, length)
    params = closed_form_params(name, eps, std, length)
    exact = analyse(name, model, sign, **params)
    assert exact.method == "closed-form"
    n = max(2000, 300_000 // length)
    mc = analyse(name, model, sign, method="monte-carlo", n_samples=n, seed=length, **params)
    assert_agrees_with_monte_carlo(exact, mc, n)


SOFT_VARIANTS = (
    [("sapo", {"gate": g}) for g in SOFT_GATES]
    + [("sspo", {"gate": g, "one_sided": side}) for g in SOFT_GATES for side in (False, True)]
    + [("sspo", {"gate": "identity"}), ("sspo-sigmoid", {})]
)


@PROPERTY
@given(
    variant=st.sampled_from(SOFT_VARIANTS),
    std=st.floats(0.01, 1.0),
    length=st.integers(1, 256),
    tau=st.floats(0.25, 8.0),
    sign=st.sampled_from([1, -1]),
)
def test_quadrature_matches_monte_carlo(variant, std, length, tau, sign):
    name, params = variant
    model = LogNormalRatios(std, length)
    exact = analyse(name, model, sign, tau=tau, **params)
    assert exact.method == "quadrature"
    n = max(2000, 300_000 // length)
    mc = analyse(name, model, sign, method="monte-carlo", n_samples=n, seed=length, tau=tau, **params)
    assert_agrees_with_monte_carlo(exact, mc, n)


@pytest.mark.parametrize(("name", "params"), SOFT_VARIANTS)
def test_every_soft_gate_matches_monte_carlo_at_a_hard_point(name, params):
    """Wide ratios, a sharp gate and a short sequence: where a coarse quadrature would fail."""
    model = LogNormalRatios(1.0, 2)
    for sign in (1, -1):
        exact = analyse(name, model, sign, tau=8.0, **params)
        mc = analyse(name, model, sign, method="monte-carlo", n_samples=40_000, seed=1, tau=8.0, **params)
        assert_agrees_with_monte_carlo(exact, mc, 40_000)


def test_quadrature_is_converged():
    """Doubling the nodes per panel changes no statistic beyond 1e-8 (relative)."""
    kw = {"taus": [0.25, 10.0], "gates": SOFT_GATES}
    coarse = sweep(["sapo", "sspo", "sspo-sigmoid"], [0.01, 1.0, 2.0], [1, 16, 256], quad_nodes=8, **kw)
    fine = sweep(["sapo", "sspo", "sspo-sigmoid"], [0.01, 1.0, 2.0], [1, 16, 256], quad_nodes=16, **kw)
    for key in ("mean_coefficient", "mean_weight", "ess_fraction"):
        np.testing.assert_allclose(coarse[key], fine[key], rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(coarse["var_coefficient"], fine["var_coefficient"], rtol=1e-6, atol=1e-10)


# --------------------------------------------------------------------------- identities


@pytest.mark.parametrize("std", [0.05, 0.3, 1.0])
@pytest.mark.parametrize("length", [1, 7, 64])
def test_is_seq_variance_and_unbiasedness(std, length):
    r = analyse("is-seq", LogNormalRatios(std, length))
    assert r.mean_coefficient == pytest.approx(1.0, rel=1e-12)
    assert r.var_coefficient == pytest.approx(math.expm1(length * std**2), rel=1e-10)
    assert r.ess_fraction == pytest.approx(math.exp(-length * std**2), rel=1e-10)


@pytest.mark.parametrize(("std", "length", "rho"), [(0.3, 1, 0.0), (0.5, 16, 0.0), (0.2, 256, 0.0), (0.4, 16, 0.6)])
def test_gspo_log_weight_variance(std, length, rho):
    """The real GSPO code's sequence weight has log-variance s^2 / L (i.i.d.), Var(sum l) / L^2 (AR(1))."""
    model = LogNormalRatios(std, length, correlation=rho)
    values, mask = model.sample(10_000, np.random.default_rng(0))
    lt = torch.from_numpy(values)
    terms = get_objective("gspo").terms(lt, torch.zeros_like(lt), torch.ones(len(lt), dtype=torch.float64),
                                        torch.from_numpy(mask))[0]
    log_w = terms.weight.log().numpy()
    expected = std**2 / length if rho == 0 else model.sum_variance() / length**2
    # sample variance of n Gaussians: relative std sqrt(2 / (n - 1)) ~ 1.4 %
    assert log_w.var(ddof=1) == pytest.approx(expected, rel=0.06)
    r = analyse("gspo", model)
    assert r.mean_weight == pytest.approx(math.exp(model.mean + expected / 2), rel=1e-12)
    assert r.var_weight == pytest.approx(math.expm1(expected) * math.exp(2 * model.mean + expected), rel=1e-10)


@pytest.mark.parametrize("name", all_objective_names())
@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize("length", [1, 16, 256])
def test_on_policy_limit(name, sign, length):
    """As std -> 0 every mean coefficient tends to 1 and every variance to 0 (sspo-sigmoid: tau / 2)."""
    if name in ("clip-cov", "kl-cov"):  # they act on their chosen tokens on-policy too
        pytest.skip("batch-dependent selection; its on-policy limits are the peer-objective tests below")
    obj = resolve_objective(name)
    target = 1.0
    if name == "sspo-sigmoid":
        target = (obj.params["tau_pos"] if sign > 0 else obj.params["tau_neg"]) / 2
    results = [analyse(obj, LogNormalRatios(std, length), sign) for std in (1e-2, 1e-4, 1e-6)]
    gaps = [abs(r.mean_coefficient - target) for r in results]
    assert gaps[-1] < 1e-4 and gaps[-1] <= gaps[0] + 1e-15
    # 1e-6 is far below every clip width (GSPO's is 3e-4), so nothing is clipped any more
    assert results[-1].var_coefficient < 1e-8 and results[-1].var_weight < 1e-8
    assert results[-1].dead_fraction < 1e-8 and results[-1].ess_fraction > 1 - 1e-8


@pytest.mark.parametrize("sign", [1, -1])
@pytest.mark.parametrize(("std", "eps"), [(0.05, 0.2), (0.3, 0.2), (1.0, 0.1), (0.3, 0.5)])
def test_hard_clip_dead_fraction_is_the_log_normal_tail(sign, std, eps):
    m = -std**2 / 2
    token = stats.lognorm(s=std, scale=math.exp(m))
    expect = token.sf(1 + eps) if sign > 0 else token.cdf(1 - eps)
    assert analyse("grpo", LogNormalRatios(std, 4), sign, eps=eps).dead_fraction == pytest.approx(expect, rel=1e-9)
    # GSPO: the geometric mean is log-normal with std s / sqrt(L)
    seq = stats.lognorm(s=std / math.sqrt(16), scale=math.exp(m))
    expect = seq.sf(1 + eps / 4) if sign > 0 else seq.cdf(1 - eps / 4)
    assert analyse("gspo", LogNormalRatios(std, 16), sign, eps=eps / 4).dead_fraction == pytest.approx(expect,
                                                                                                        rel=1e-9)
    # GMPO clips log-ratios: a normal tail
    expect = stats.norm(m, std).sf(eps) if sign > 0 else stats.norm(m, std).cdf(-eps)
    assert analyse("gmpo", LogNormalRatios(std, 16), sign, eps=eps).dead_fraction == pytest.approx(expect, rel=1e-9)


@pytest.mark.parametrize("sign", [1, -1])
def test_partial_moments_against_numerical_integration(sign):
    """The PPO and CISPO closed forms against scipy's adaptive quadrature of the log-normal density."""
    std, eps, eps_max = 0.4, 0.2, 1.3
    pdf = stats.lognorm(s=std, scale=math.exp(-std**2 / 2)).pdf
    lo, hi = (0.0, 1 + eps) if sign > 0 else (1 - eps, np.inf)
    mean = integrate.quad(lambda r: r * pdf(r), lo, hi)[0]
    second = integrate.quad(lambda r: r * r * pdf(r), lo, hi)[0]
    r = analyse("grpo", LogNormalRatios(std), sign, eps=eps)
    assert r.mean_coefficient == pytest.approx(mean, rel=1e-8)
    assert r.var_coefficient == pytest.approx(second - mean**2, rel=1e-7)
    tail = integrate.quad(pdf, eps_max, np.inf)[0]
    mean = integrate.quad(lambda r: r * pdf(r), 0, eps_max)[0] + eps_max * tail
    second = integrate.quad(lambda r: r * r * pdf(r), 0, eps_max)[0] + eps_max**2 * tail
    r = analyse("cispo", LogNormalRatios(std), sign, eps_max=eps_max)
    assert r.mean_coefficient == pytest.approx(mean, rel=1e-8)
    assert r.var_coefficient == pytest.approx(second - mean**2, rel=1e-7)


def test_gmpo_moment_factorisation_against_direct_integration():
    """E[w^q] = M(q/L)^L for GMPO, M from an independent numerical integral."""
    std, length, eps = 0.5, 8, 0.3
    m = -std**2 / 2
    dens = stats.norm(m, std).pdf

    def M(k):
        below = integrate.quad(lambda l: math.exp(k * l) * dens(l), -np.inf, eps)[0]
        return below + math.exp(k * eps) * stats.norm(m, std).sf(eps)

    r = analyse("gmpo", LogNormalRatios(std, length), +1, eps=eps)
    assert r.mean_weight == pytest.approx(M(1 / length) ** length, rel=1e-8)
    assert r.var_weight == pytest.approx(M(2 / length) ** length - M(1 / length) ** (2 * length), rel=1e-6)


def test_nondefault_mean_is_used():
    """A log-ratio mean other than -s^2/2 gives E[r] != 1 and is reported."""
    r = analyse("is-token", LogNormalRatios(0.3, mean=0.1))
    assert r.log_ratio_mean == 0.1
    assert r.mean_weight == pytest.approx(math.exp(0.1 + 0.045), rel=1e-12)


# --------------------------------------------------------------------------- models


def test_ar1_sum_variance_and_samples():
    std, rho, length = 0.5, 0.7, 12
    cov = std**2 * rho ** np.abs(np.subtract.outer(np.arange(length), np.arange(length)))
    assert sum_variance(std, length, rho) == pytest.approx(cov.sum(), rel=1e-12)
    values, mask = LogNormalRatios(std, length, correlation=rho).sample(40_000, np.random.default_rng(0))
    assert mask.all() and values.shape == (40_000, length)
    assert values[:, -1].std() == pytest.approx(std, rel=0.02)  # the marginal is kept
    assert np.corrcoef(values[:, 3], values[:, 4])[0, 1] == pytest.approx(rho, abs=0.02)


@pytest.mark.parametrize("name", ["gspo", "is-seq", "grpo", "sapo"])
def test_correlated_closed_forms_match_monte_carlo(name):
    """Token marginals and sums of Gaussians stay analytic under AR(1)."""
    model = LogNormalRatios(0.2, 16, correlation=0.5)
    params = {"eps": 0.05} if name == "gspo" else {}
    exact = analyse(name, model, +1, **params)
    assert exact.method in ("closed-form", "quadrature")
    mc = analyse(name, model, +1, method="monte-carlo", n_samples=20_000, seed=3, **params)
    assert_agrees_with_monte_carlo(exact, mc, 20_000)


def test_correlated_geometric_means_need_monte_carlo():
    model = LogNormalRatios(0.3, 16, correlation=0.5)
    assert available_methods("sspo", model) == ("monte-carlo",)
    r = analyse("sspo", model, -1, n_samples=4000)
    assert r.method == "monte-carlo" and set(r.mc_stderr) == set(STATS)
    with pytest.raises(ValueError, match="quadrature.*not available.*allowed values: auto, monte-carlo"):
        analyse("sspo", model, method="quadrature")


def test_empirical_model_reproduces_the_objective_metrics():
    """Theory on measured log-ratios equals the objective's own coef_norm / dead_frac metrics."""
    gen = torch.Generator().manual_seed(0)
    lengths = [5, 1, 9, 3, 7, 6]
    seqs = [0.4 * torch.randn(n, generator=gen, dtype=torch.float64).numpy() for n in lengths]
    model = EmpiricalRatios(seqs)
    values, mask = model.sample(None, np.random.default_rng(0))
    lt, mt = torch.from_numpy(values), torch.from_numpy(mask)
    for name in ("grpo", "gspo", "sspo", "gmpo"):
        obj = get_objective(name)
        for sign in (1, -1):
            adv = torch.full((len(lengths),), float(sign), dtype=torch.float64)
            _, metrics = obj(lt, torch.zeros_like(lt), adv, mt)
            r = analyse(obj, model, sign)
            assert r.method == "monte-carlo" and r.length == pytest.approx(np.mean(lengths))
            assert r.mean_coefficient == pytest.approx(metrics["coef_norm_mean"], rel=1e-5)
            assert r.var_coefficient == pytest.approx(metrics["coef_norm_var"], rel=1e-4, abs=1e-6)
            assert r.dead_fraction == pytest.approx(metrics["dead_frac"], abs=1e-6)


def test_empirical_layouts_and_from_run(tmp_path):
    rng = np.random.default_rng(0)
    run = tmp_path / "run"
    (run / "log_ratios").mkdir(parents=True)
    parts = []
    for step in (1, 2, 5):
        lengths = rng.integers(0, 6, size=4)
        values = rng.normal(0, 0.1, lengths.sum()).astype(np.float32)
        adv = np.array([1.0, -1.0, 0.5, -0.5])
        np.savez(run / "log_ratios" / f"step_{step:06d}.npz", log_ratios=values, lengths=lengths, advantages=adv)
        parts.append((values, lengths, adv))
    model = EmpiricalRatios.from_run(run)
    kept = np.concatenate([p[1] for p in parts])
    assert model.n_sequences == (kept > 0).sum()
    np.testing.assert_allclose(model.values, np.concatenate([p[0] for p in parts]).astype(np.float64))
    one = EmpiricalRatios.from_run(run, steps=2)
    assert one.values.size == parts[1][1].sum()
    pos = model.subset(+1)
    assert (pos.advantages > 0).all() and pos.n_sequences == (np.concatenate([p[2] for p in parts])[kept > 0] > 0).sum()
    same = EmpiricalRatios(np.concatenate([p[0] for p in parts]), kept)
    np.testing.assert_array_equal(same.lengths, model.lengths)
    square = EmpiricalRatios(rng.normal(size=(3, 4)))
    assert square.n_sequences == 3 and square.mean_length == 4
    with pytest.raises(ValueError, match="steps"):
        EmpiricalRatios.from_run(run, steps=[3])
    with pytest.raises(ValueError, match="run_dir"):
        EmpiricalRatios.from_run(tmp_path / "missing")


# --------------------------------------------------------------------------- sweep and results


def test_sweep_is_the_pointwise_analysis():
    frame = sweep(["grpo", "sspo", "gmpo", "is-seq", "sapo"], [0.1, 0.5], [1, 16], taus=[0.5, 2.0], eps=[0.1, 0.3])
    # grpo, gmpo: 2 eps; sspo, sapo: 2 taus; is-seq: 1 -> 9 settings x 2 stds x 2 lengths x 2 signs
    assert len(frame) == 9 * 8
    assert set(RESULT_KEYS) <= set(frame.columns) and {"gate", "tau", "eps", "params"} <= set(frame.columns)
    for row in frame.sample(12, random_state=0).itertuples():
        params = {"tau": row.tau} if row.objective in ("sspo", "sapo") else (
            {"eps": row.eps} if row.objective in ("grpo", "gmpo") else {})
        r = analyse(row.objective, LogNormalRatios(row.log_ratio_std, row.length), row.advantage_sign, **params)
        for key in STATS:
            assert getattr(row, key) == pytest.approx(getattr(r, key), rel=1e-10, abs=1e-14)


def test_sweep_monte_carlo_and_all():
    frame = sweep("all", [0.2], [4], signs=["+"])
    assert sorted(frame["objective"]) == sorted(all_objective_names())
    assert set(REFERENCE_ESTIMATORS) <= set(frame["objective"])
    mc = sweep(["sspo"], [0.2], [4], signs=[-1], method="monte-carlo", n_samples=2000)
    assert (mc["method"] == "monte-carlo").all() and set(mc["mc_stderr"].iloc[0]) == set(STATS)


def test_result_dict_keys():
    d = analyse("sspo", LogNormalRatios(0.3, 16), "-").to_dict()
    assert tuple(d) == RESULT_KEYS
    assert d["advantage_sign"] == -1 and d["mc_stderr"] is None and d["length"] == 16


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("std", [0.0, -0.1, float("nan"), float("inf"), "x"])
def test_bad_std(std):
    with pytest.raises(ValueError, match="log_ratio_std: must be a finite number > 0"):
        LogNormalRatios(std)


@pytest.mark.parametrize("length", [0, -3, 1.5, True])
def test_bad_length(length):
    with pytest.raises(ValueError, match="length: must be an integer >= 1"):
        LogNormalRatios(0.1, length)
    with pytest.raises(ValueError, match="length"):
        sweep(["grpo"], [0.1], [length])


def test_bad_objective_sign_method_and_params():
    model = LogNormalRatios(0.2)
    with pytest.raises(ValueError, match="objective: unknown name 'ppo'; allowed values: pg, grpo.*is-token, is-seq"):
        analyse("ppo", model)
    with pytest.raises(ValueError, match="advantage_sign: unknown value 0; allowed values: \\+1, -1"):
        analyse("grpo", model, 0)
    with pytest.raises(ValueError, match="method: unknown value 'exact'; allowed values: auto, closed-form"):
        analyse("grpo", model, method="exact")
    with pytest.raises(ValueError, match="'closed-form' is not available for objective 'sapo'.*quadrature"):
        analyse("sapo", model, method="closed-form")
    with pytest.raises(ValueError, match="'quadrature' is not available for objective 'grpo'.*closed-form"):
        analyse("grpo", model, method="quadrature")
    with pytest.raises(ValueError, match="unknown parameter"):
        analyse("is-seq", model, eps=0.2)
    with pytest.raises(ValueError, match="correlation: must be a number in \\(-1, 1\\)"):
        LogNormalRatios(0.2, 4, correlation=1.0)
    with pytest.raises(ValueError, match="n_samples"):
        analyse("grpo", model, method="monte-carlo", n_samples=1)
    with pytest.raises(ValueError, match="model"):
        analyse("grpo", 0.3)


def test_docstring_examples():
    """The examples in the docstrings are run, so they cannot rot."""
    import doctest

    from sspo_analysis import theory
    from sspo_analysis.theory import analysis, models

    for module in (theory, analysis, models):
        result = doctest.testmod(module)
        assert result.failed == 0 and (module is models or result.attempted > 0), module.__name__


@pytest.mark.parametrize("sign", [1, -1])
def test_sspo_with_a_one_sided_hard_clip_is_gmpo(sign):
    """A non-smooth gate inside sspo falls back to Monte Carlo, and agrees with GMPO's closed form.

    One-sided, the hard clip (``get_gate``'s default width 0.2) is GMPO's clip at ``eps = 0.2``.
    """
    model = LogNormalRatios(0.4, 8)
    assert available_methods("sspo", model, gate="hard-clip") == ("monte-carlo",)
    mc = analyse("sspo", model, sign, gate="hard-clip", one_sided=True, n_samples=30_000, seed=5)
    exact = analyse("gmpo", model, sign, eps=0.2)
    assert_agrees_with_monte_carlo(exact, mc, 30_000)


# --------------------------------------------------------------------------- registration-time theory declarations


def _scaled_is(log_ratio, adv, mask, *, beta):
    r = log_ratio.exp()
    return Terms(beta * r * adv, (beta * adv * r).detach(), r)


def lognormal_scaled_ratio(params, grid, sign):
    """``c / A = beta r`` with ``r`` log-normal: the moments by hand (an independent closed form)."""
    s2 = grid.std**2
    mean_r, second_r = np.exp(grid.mean + s2 / 2), np.exp(2 * grid.mean + 2 * s2)
    beta, zeros = params["beta"], grid.zeros
    return {"mean_coefficient": beta * mean_r + zeros, "var_coefficient": beta**2 * (second_r - mean_r**2) + zeros,
            "dead_fraction": zeros, "mean_weight": mean_r + zeros, "var_weight": second_r - mean_r**2 + zeros,
            "ess_fraction": mean_r**2 / second_r + zeros}


def test_a_new_objective_declares_its_theory_in_one_place(scratch_objectives):
    """No declaration: Monte Carlo only. ``theory=("quadrature",)``: the quadrature runs the objective's own
    code. A closed-form hook (a callable, or its "module:function" path) is what ``closed-form`` evaluates."""
    model = LogNormalRatios(0.3)
    scratch_objectives("t-plain", level="token", agg="token-mean", defaults={"beta": 2.0})(_scaled_is)
    scratch_objectives("t-quad", level="token", agg="token-mean", defaults={"beta": 2.0},
                       theory=("quadrature",))(_scaled_is)
    scratch_objectives("t-closed", level="token", agg="token-mean", defaults={"beta": 2.0},
                       theory={"closed-form": lognormal_scaled_ratio})(_scaled_is)
    scratch_objectives("t-path", level="token", agg="token-mean", defaults={"beta": 2.0},
                       theory={"closed-form": f"{__name__}:lognormal_scaled_ratio"})(_scaled_is)
    assert available_methods("t-plain", model) == ("monte-carlo",)
    assert available_methods("t-quad", model) == ("quadrature", "monte-carlo")
    assert available_methods("t-closed", model) == ("closed-form", "monte-carlo")
    # beta r, r log-normal with E[r] = 1: E[c / A] = beta, Var = beta^2 (e^{s^2} - 1)
    for name in ("t-quad", "t-closed", "t-path"):
        r = analyse(name, model, beta=3.0)
        assert r.mean_coefficient == pytest.approx(3.0, rel=1e-10)
        assert r.var_coefficient == pytest.approx(9.0 * math.expm1(0.09), rel=1e-8)
    mc = analyse("t-plain", model, beta=3.0, n_samples=20_000)
    assert_agrees_with_monte_carlo(analyse("t-closed", model, beta=3.0), mc, 20_000)


def sequence_ratio_quadrature(objective, grid, sign, quad_nodes):
    """A quadrature hook: ``is-seq``'s ``W = exp(sum_t l)`` integrated in ``log W ~ N(L m, L s^2)`` by Gauss-Hermite."""
    x, w = np.polynomial.hermite_e.hermegauss(64)
    w = w / w.sum()
    log_w = grid.length * grid.mean + np.sqrt(grid.length) * grid.std * x[:, None, None]  # (n, S, K)
    mean, second = (np.exp(log_w) * w[:, None, None]).sum(0), (np.exp(2 * log_w) * w[:, None, None]).sum(0)
    return {"mean_coefficient": mean, "var_coefficient": second - mean**2, "dead_fraction": grid.zeros,
            "mean_weight": mean, "var_weight": second - mean**2, "ess_fraction": mean**2 / second}


def counting_monte_carlo(objective, model, sign, n_samples, seed):
    """A Monte Carlo hook that returns a marker, to see that it replaced the generic sampler."""
    stats = dict.fromkeys(STATS, float(seed))
    return stats, dict.fromkeys(STATS, 0.0)


def test_quadrature_and_monte_carlo_hooks_replace_the_generic_ones(scratch_objectives):
    from sspo_analysis.objectives import get_spec

    is_seq = resolve_objective("is-seq").spec.fn
    scratch_objectives("t-seq", level="sequence", agg="seq-mean-token-mean",
                       theory={"quadrature": sequence_ratio_quadrature,
                               "monte-carlo": f"{__name__}:counting_monte_carlo"})(is_seq)
    assert get_spec("t-seq").theory["quadrature"] is sequence_ratio_quadrature
    model = LogNormalRatios(0.3, 8)
    assert available_methods("t-seq", model) == ("quadrature", "monte-carlo")
    # a quadrature hook is taken to assume independent tokens
    assert available_methods("t-seq", LogNormalRatios(0.3, 8, correlation=0.5)) == ("monte-carlo",)
    quad, exact = analyse("t-seq", model), analyse("is-seq", model)
    assert quad.method == "quadrature" and exact.method == "closed-form"
    for key in STATS:
        assert getattr(quad, key) == pytest.approx(getattr(exact, key), rel=1e-9, abs=1e-12), key
    assert analyse("t-seq", model, method="monte-carlo", seed=7).mean_coefficient == 7.0


def test_theory_declarations_are_checked_at_registration(scratch_objectives):
    with pytest.raises(ValueError, match=r"theory: unknown method\(s\) 'exact'"):
        scratch_objectives("t-bad", level="token", agg="token-mean", theory=("exact",))
    with pytest.raises(ValueError, match="theory: expected a tuple or a dict"):
        scratch_objectives("t-bad", level="token", agg="token-mean", theory="quadrature")
    with pytest.raises(ValueError, match="'closed-form' needs its hook"):
        scratch_objectives("t-bad", level="token", agg="token-mean", theory=("closed-form",))
    with pytest.raises(ValueError, match="log_gate"):
        scratch_objectives("t-bad", level="sequence", agg="seq-mean-token-mean", theory=("quadrature",))
    scratch_objectives("t-missing", level="token", agg="token-mean", defaults={"beta": 1.0},
                       theory={"closed-form": f"{__name__}:no_such_function"})(_scaled_is)
    with pytest.raises(ValueError, match="hook .*:no_such_function. cannot be imported"):
        analyse("t-missing", LogNormalRatios(0.3), beta=1.0)


def test_reference_estimators_are_objectives_but_not_training_objectives():
    from sspo_analysis.objectives import get_objective, objective_names

    assert "is-seq" not in objective_names() and "is-token" not in objective_names()
    assert all_objective_names() == (*objective_names(), "is-token", "is-seq")
    with pytest.raises(ValueError, match="objective: unknown name 'is-seq'; allowed values: pg, grpo"):
        get_objective("is-seq")
    assert resolve_objective("is-seq").level == "sequence" and resolve_objective("is-token").level == "token"


# --------------------------------------------------------------------------- peer objectives
# VESPO, LUSPO, Clip-Cov and KL-Cov: quadrature and closed forms against Monte Carlo of the package's own code
# (within 4 standard errors), against direct integration, and the batch model's limits.

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
