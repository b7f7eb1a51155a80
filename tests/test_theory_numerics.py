"""Theory numerics: variances never negative beyond rounding, errors that blame the right input, the grid as JSON,
and Monte Carlo streamed in chunks (the same estimate as one shot, memory that does not grow with the samples);
extreme stds finite and correct or one error, a grid point beyond float64 named, a Monte Carlo run that would take
minutes refused."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import integrate, stats
from test_runs import _env

from sspo_analysis import cli
from sspo_analysis.cli import main
from sspo_analysis.theory import (
    RESULT_KEYS,
    STATS,
    EmpiricalRatios,
    LogNormalRatios,
    all_objective_names,
    analyse,
    resolve_objective,
)
from sspo_analysis.theory import analysis as theory_analysis
from sspo_analysis.theory.analysis import MAX_SUM_VARIANCE
from sspo_analysis.theory.moments import VARIANCE_RTOL, clamp_variance, variance

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = Path(__file__).resolve().parents[1]
GRID_STDS = (1e-8, 1e-6, 1e-4, 1e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 1000.0)
GRID_LENGTHS = (1, 10**6)


# --------------------------------------------------------------------------- variances


@pytest.mark.parametrize("name", all_objective_names())
def test_the_whole_grid_gives_no_negative_variance_and_no_nan(name):
    # before: 100 cells of this grid had a negative variance (sspo std 1e-8: var_weight -2.2e-16; sspo-sigmoid at
    # length 1e6: -2.2e-10, the rounding of M^L). Each cell is an answer or one line naming a model out of range.
    for std in GRID_STDS:
        for length in GRID_LENGTHS:
            model = LogNormalRatios(std, length)
            for sign in (1, -1):
                try:
                    result = analyse(name, model, sign, n_samples=2048)
                except ValueError as err:
                    message = str(err)
                    assert "\n" not in message
                    if message.startswith("n_samples:"):  # Monte Carlo over 2e9 tokens: refused, not run
                        assert length == 10**6 and "would take minutes" in message
                    else:
                        assert message.startswith(f"log_ratio_std: {std:g}"), message
                        assert model.sum_variance() >= MAX_SUM_VARIANCE, message  # the model really is out of range
                    continue
                values = {k: getattr(result, k) for k in STATS}
                assert all(math.isfinite(v) for v in values.values()), (name, std, length, sign, values)
                assert values["var_coefficient"] >= 0 and values["var_weight"] >= 0, (name, std, length, sign, values)


def _normal_expectation(f, mean, std, scale):
    """``E[f(l)]``, ``l ~ N(mean, std^2)``, by adaptive quadrature in ``z`` (scipy), independent of the package's;
    to an absolute 1e-10 of ``scale``, the size of ``f``'s variation (a mean near 0 has no relative accuracy)."""
    value, _ = integrate.quad(lambda z: f(mean + std * z) * stats.norm.pdf(z), -12, 12, epsabs=1e-10 * scale,
                              epsrel=1e-10, limit=400, points=[0.0])
    return value


@pytest.mark.parametrize("name", ["sspo", "sspo-sigmoid"])
@pytest.mark.parametrize("std", [1e-8, 1e-3, 0.3])
@pytest.mark.parametrize("sign", [1, -1])
def test_geometric_weight_variance_at_length_1e6_matches_its_limit(name, std, sign):
    # log w = mean_t phi(l_t) over 1e6 i.i.d. tokens: Var[w] = E[w]^2 expm1(Var(phi) / L + O(L^-2)), so
    # Var[w] ~ e^{2 E[phi]} Var(phi) / L to a relative 1e-6. Before: -2.2e-10 at std 1e-8 (true value ~1e-22).
    obj, model = resolve_objective(name), LogNormalRatios(std, 10**6)

    def phi(x):
        with torch.no_grad():
            return float(obj.log_gate(torch.tensor([[x]], dtype=torch.float64), torch.tensor([[sign > 0]]))[0])

    kappa1 = _normal_expectation(phi, model.mean, std, std)
    var_phi = _normal_expectation(lambda x: (phi(x) - kappa1) ** 2, model.mean, std, std**2)
    result = analyse(obj, model, sign)
    assert result.var_weight == pytest.approx(math.exp(2 * kappa1) * var_phi / model.length, rel=1e-5)
    assert result.mean_weight == pytest.approx(math.exp(kappa1), rel=1e-6)


@pytest.mark.parametrize(("std", "length"), [(1e-8, 10**6), (1e-4, 10**6), (0.3, 1000)])
def test_log_normal_variances_are_exact_where_raw_moments_cancel(std, length):
    # Var[r] = e^{s^2} - 1 at the default mean; E[r^2] - E[r]^2 gave 0 or +-2.2e-16 at s = 1e-8, where it is 1e-16
    token, sequence = analyse("is-token", LogNormalRatios(std)), analyse("is-seq", LogNormalRatios(std, length))
    assert token.var_coefficient == pytest.approx(math.expm1(std**2), rel=1e-12)
    assert token.var_weight == pytest.approx(math.expm1(std**2), rel=1e-12)
    assert sequence.var_weight == pytest.approx(math.expm1(length * std**2), rel=1e-12)
    assert sequence.ess_fraction == pytest.approx(math.exp(-length * std**2), rel=1e-12)


def test_a_variance_negative_within_rounding_is_zero_and_beyond_it_an_error():
    assert float(variance(1.0, 1.0 - 2**-52)) == 0.0  # one ulp below E[X]^2: rounding
    assert float(clamp_variance(-0.5 * VARIANCE_RTOL * 4.0, 4.0)) == 0.0
    assert float(clamp_variance(3e-17, 1.0)) == 3e-17  # a positive variance is kept, however small
    assert math.isinf(float(clamp_variance(-math.inf, math.inf)))  # non-finite passes through for the range check
    with pytest.raises(ValueError, match=r"var_weight: -1e-06 is negative beyond rounding \(tolerance 4.5e-13"):
        variance(1.0, 1.0 - 1e-6, "var_weight")
    with pytest.raises(ValueError, match="negative beyond rounding"):
        clamp_variance(np.array([0.0, -2 * VARIANCE_RTOL]), np.array([1.0, 1.0]))


def inconsistent_closed_form(params, grid, sign):
    """A closed-form hook whose variance is negative far beyond rounding (a bug, which the theory must report)."""
    zeros = grid.zeros
    return {"mean_coefficient": zeros + 1.0, "var_coefficient": zeros - 1e-6, "dead_fraction": zeros,
            "mean_weight": zeros + 1.0, "var_weight": zeros, "ess_fraction": zeros + 1.0}


def test_a_hook_that_returns_a_negative_variance_is_an_error(scratch_objectives):
    scratch_objectives("t-negative", level="token", agg="token-mean",
                       theory={"closed-form": inconsistent_closed_form})(resolve_objective("is-token").spec.fn)
    with pytest.raises(ValueError, match="var_coefficient: -1e-06 is negative beyond rounding"):
        analyse("t-negative", LogNormalRatios(0.3))
    from sspo_analysis.theory import sweep

    with pytest.raises(ValueError, match="var_coefficient: -1e-06 is negative beyond rounding"):
        sweep(["t-negative"], [0.3], [1])


# --------------------------------------------------------------------------- the CLI


@pytest.fixture
def theory_cli(monkeypatch, capsys):
    """``sspo`` with only ``theory`` registered; returns (exit code, stdout, stderr) of one call."""
    monkeypatch.setattr(cli, "AREAS", {"sspo_analysis.theory.cli": ("theory",)})

    def run(*argv):
        code = cli.main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.mark.parametrize("extra", [[], ["--method", "monte-carlo", "--n-samples", "200"]])
def test_an_overflowing_temperature_is_blamed_on_tau(theory_cli, extra):
    # before: "log_ratio_std: 0.3 (length 1) puts var_coefficient beyond float64", for a model far inside the range
    code, out, err = theory_cli("theory", "--objective", "sspo-sigmoid", "--tau", "1e300", "--log-ratio-std", "0.3",
                                *extra)
    assert code == 2 and out == ""
    assert err.count("\n") == 1, err  # one line: no traceback, no numpy warnings
    assert err.startswith("sspo theory: error: tau_pos, tau_neg: 1e+300, 1e+300 put var_coefficient"), err
    assert "log_ratio_std: 0.3" not in err and "use smaller values" in err


def test_an_overflowing_temperature_in_a_grid_is_blamed_on_tau(theory_cli):
    code, _, err = theory_cli("theory", "--grid", "--objectives", "sspo-sigmoid", "--taus", "1,1e300", "--stds", "0.3")
    assert code == 2 and err.startswith("sspo theory: error: tau_pos, tau_neg: 1e+300"), err


def test_a_model_out_of_range_is_still_blamed_on_the_model(theory_cli):
    code, _, err = theory_cli("theory", "--objective", "grpo", "--log-ratio-std", "40")
    assert code == 2 and err.startswith("sspo theory: error: log_ratio_std: 40 (length 1)"), err


def test_grid_json_is_json(theory_cli):
    code, out, _ = theory_cli("theory", "--grid", "--objectives", "grpo,sspo,pg", "--stds", "0.1,0.3",
                              "--lengths", "1,8", "--json")
    assert code == 0
    rows = json.loads(out, parse_constant=lambda name: pytest.fail(f"{name} is not JSON"))
    assert len(rows) == 3 * 2 * 2 * 2  # objectives x stds x lengths x signs
    assert all(set(RESULT_KEYS) | {"gate", "tau", "eps", "one_sided", "params"} == set(row) for row in rows)
    for row in rows[::5]:
        expect = analyse(row["objective"], LogNormalRatios(row["log_ratio_std"], row["length"]),
                         row["advantage_sign"], **row["params"])
        assert row["params"] == expect.params
        for key in STATS:
            assert row[key] == pytest.approx(getattr(expect, key), rel=1e-12, abs=1e-15), key
    grpo = next(row for row in rows if row["objective"] == "grpo")
    assert grpo["tau"] is None and grpo["eps"] == 0.2 and grpo["mc_stderr"] is None  # NaN (absent) as null


def test_grid_json_with_monte_carlo_and_its_conflict_with_markdown(theory_cli):
    code, out, _ = theory_cli("theory", "--grid", "--objectives", "sspo", "--stds", "0.3", "--signs", "-",
                              "--method", "monte-carlo", "--n-samples", "500", "--json")
    (row,) = json.loads(out)
    assert code == 0 and row["method"] == "monte-carlo" and set(row["mc_stderr"]) == set(STATS)
    code, _, err = theory_cli("theory", "--grid", "--stds", "0.3", "--json", "--markdown")
    assert code == 2 and "--json, --markdown: give one of them" in err


# --------------------------------------------------------------------------- streamed Monte Carlo


def _one_shot(obj, model, sign, n, seed):
    """The Monte Carlo estimate from all samples at once, written out from its definition: per-sequence sums,
    ratio estimators over sequences, delta-method errors (what the package computed before it streamed)."""
    values, mask = model.sample(n, np.random.default_rng(seed))
    lt, mt = torch.from_numpy(values), torch.from_numpy(mask)
    t = obj.terms(lt, torch.zeros_like(lt), torch.full((len(values),), float(sign), dtype=torch.float64), mt)[0]
    T = mask.sum(-1).astype(float)
    x = np.where(mask, t.coefficient.numpy() * sign * (T[:, None] if obj.level == "sequence" else 1.0), 0.0)
    w = t.weight.numpy()
    w_seq = (w, w * w, np.ones_like(w)) if w.ndim == 1 else (np.where(mask, w, 0).sum(-1),
                                                            np.where(mask, w * w, 0).sum(-1), T)
    dead = (mask & (t.coefficient.numpy() == 0)).sum(-1)  # the soft gates here never reach 0 at these stds

    def moments(s1, s2, den):
        total, k = den.sum(), len(den)
        mean, second = s1.sum() / total, s2.sum() / total
        d1, d2 = s1 - mean * den, s2 - second * den

        def se(psi):
            return math.sqrt((psi**2).sum() * k / (k - 1)) / total

        return {"mean": (mean, se(d1)), "var": (second - mean**2, se(d2 - 2 * mean * d1)),
                "ess": (mean**2 / second, se(2 * mean / second * d1 - mean**2 / second**2 * d2))}

    coef, weight = moments(x.sum(-1), (x * x).sum(-1), T), moments(*w_seq)
    dead_mean = dead.sum() / T.sum()
    dead_se = math.sqrt(((dead - dead_mean * T) ** 2).sum() * n / (n - 1)) / T.sum()
    return {"mean_coefficient": coef["mean"], "var_coefficient": coef["var"], "dead_fraction": (dead_mean, dead_se),
            "mean_weight": weight["mean"], "var_weight": weight["var"], "ess_fraction": weight["ess"]}


def _empirical():
    rng = np.random.default_rng(5)
    return EmpiricalRatios([rng.normal(-0.02, 0.3, rng.integers(1, 12)) for _ in range(40)])


@pytest.mark.parametrize(("name", "model"), [
    ("grpo", LogNormalRatios(0.4)),
    ("sspo", LogNormalRatios(0.3, 6)),
    ("gspo", LogNormalRatios(0.3, 5, correlation=0.4)),
    ("gmpo", _empirical()),
    ("sapo", _empirical()),
])
def test_a_streamed_estimate_equals_the_one_shot_estimate(monkeypatch, name, model):
    obj, n, seed = resolve_objective(name), 1500, 11
    reference = _one_shot(obj, model, -1, n, seed)
    for chunk_tokens in (1, 97, 10**6):  # one sequence per chunk, a few dozen, all at once
        monkeypatch.setattr(theory_analysis, "MC_CHUNK_TOKENS", chunk_tokens)
        result = analyse(obj, model, -1, method="monte-carlo", n_samples=n, seed=seed)
        for key in STATS:
            (value, stderr), got = reference[key], getattr(result, key)
            assert got == pytest.approx(value, rel=1e-10, abs=1e-15), (key, chunk_tokens)
            assert result.mc_stderr[key] == pytest.approx(stderr, rel=1e-8, abs=1e-15), (key, chunk_tokens)


def test_chunk_boundaries_keep_the_seeding_promise(monkeypatch):
    # the same seed gives the same numbers whatever the chunk size (the chunks split one random stream), and a
    # different seed different ones
    model = LogNormalRatios(0.3, 7)
    results = []
    for chunk_tokens in (5, 64, 1 << 18):
        monkeypatch.setattr(theory_analysis, "MC_CHUNK_TOKENS", chunk_tokens)
        results.append(analyse("sspo", model, method="monte-carlo", n_samples=3000, seed=4))
    for key in STATS:
        assert [getattr(r, key) for r in results] == pytest.approx([getattr(results[0], key)] * 3, rel=1e-12)
    assert analyse("sspo", model, method="monte-carlo", n_samples=3000, seed=5).mean_coefficient != \
        results[0].mean_coefficient


def _peak_rss_mib(n_samples: int) -> float:
    code = ("import resource\nfrom sspo_analysis.theory import LogNormalRatios, analyse\n"
            f"analyse('grpo', LogNormalRatios(0.3), method='monte-carlo', n_samples={n_samples})\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return int(out.stdout.split()[-1]) / 1024


def test_monte_carlo_memory_does_not_grow_with_the_samples():
    # length 1: 3e6 sequences are 12 chunks. Before the sums were streamed, 7 float64 per sequence were kept and
    # concatenated (~300 MB more at 3e6 than at 3e5); now the peak is one chunk's. The interpreter's own size
    # depends on the environment, so the test compares two sample counts in the same one.
    growth = _peak_rss_mib(3_000_000) - _peak_rss_mib(300_000)
    assert growth < 60, f"peak resident memory grew by {growth:.0f} MiB"

# --------------------------------------------------------------------------- extreme inputs and bounded work


def test_theory_extreme_stds_are_finite_and_correct_or_one_error(capsys):
    from scipy import integrate, stats

    from sspo_analysis.theory.closed_forms import partial_moment

    # E[r^2 1{a < l < b}] at s = 40, m = -s^2/2, by direct integration of the normal density (an independent
    # oracle): the scale exp(2m + 2 s^2) overflows alone, the answer does not
    s, m, a, b = 40.0, -800.0, math.log(0.8), math.log(1.2)
    want = integrate.quad(lambda x: math.exp(2 * x) * stats.norm.pdf(x, m, s), a, b)[0]
    got = float(partial_moment(2.0, a, b, np.array(m), np.array(s)))
    assert got == pytest.approx(want, rel=1e-6) and want > 0
    assert main(["theory", "--objective", "grpo", "--log-ratio-std", "40", "--advantage-sign", "+", "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "supported: Var(sum of log-ratios) < 709" in err
    assert main(["theory", "--objective", "grpo", "--log-ratio-std", "20", "--advantage-sign", "+", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert all(v is None or math.isfinite(v) for v in out.values() if isinstance(v, float))
    assert 0 <= out["dead_fraction"] <= 1 and out["var_coefficient"] >= 0


def test_theory_monte_carlo_that_would_take_minutes_is_refused(capsys):
    t0 = time.perf_counter()
    assert main(["theory", "--objective", "sspo", "--log-ratio-std", "0.3", "--length", "1000000",
                 "--method", "monte-carlo"]) == 2
    assert time.perf_counter() - t0 < 5
    assert "would take minutes" in capsys.readouterr().err


def test_theory_grid_beyond_float64_names_the_point():
    from sspo_analysis.theory import sweep as theory_sweep

    with pytest.raises(ValueError, match=r"log_ratio_std: 40 \(length 1\)"):
        theory_sweep(["grpo"], stds=[0.1, 40.0], lengths=[1])
    frame = theory_sweep(["grpo", "gspo"], stds=[0.1, 1.0], lengths=[1, 256])
    assert np.isfinite(frame[["mean_coefficient", "var_coefficient", "var_weight"]].to_numpy(float)).all()


def _peak_rss_kib(n_samples: int) -> int:
    code = ("import resource\nfrom sspo_analysis.theory import LogNormalRatios, analyse\n"
            f"analyse('grpo', LogNormalRatios(0.3, 100000), method='monte-carlo', n_samples={n_samples})\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    return int(out.stdout.split()[-1])


def test_theory_monte_carlo_memory_does_not_grow_with_the_samples():
    # length 1e5: each chunk holds 5 sequences (a few MB); before the chunks' memory was handed back, the resident
    # size grew by ~13 MB per chunk (~600 MB more at 300 samples than at 60). The interpreter's own size depends on
    # the environment, so the test compares two sample counts in the same one.
    growth_mib = (_peak_rss_kib(300) - _peak_rss_kib(60)) / 1024
    assert growth_mib < 150
