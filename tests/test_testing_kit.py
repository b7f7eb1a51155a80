"""The public testing kit and the open gate registry, end to end: a user's own gate module,
deliberately broken gates and objectives, the ``sspo check`` CLI, and gates in the theory."""

import importlib
import json
import math
import sys
import textwrap

import pytest
import torch
from hypothesis import find, settings

from sspo_analysis import gates, objectives, testing
from sspo_analysis.cli import main
from sspo_analysis.objectives import Objective, Terms, get_objective, register_objective

USER_MODULE = textwrap.dedent('''
    """A user's gates: one admissible, three broken on purpose."""
    import math

    import torch


    def cauchy2(u, tau):
        """Weight 1 / (1 + (tau u)^2)^2."""
        x = tau * u
        return (x / (1 + x * x) + torch.atan(x)) / (2 * tau)


    def off_peak(u, tau):
        """Weight (1 + 2 x^2) exp(-x^2): its maximum is at |x| = 1/sqrt(2), not 0."""
        x = tau * u
        return (math.sqrt(math.pi) * torch.erf(x) - x * torch.exp(-x * x)) / tau


    def heavy_tail(u, tau):
        """Weight 1/2 + 1 / (2 (1 + x^2)): tends to 1/2."""
        return 0.5 * u + 0.5 * torch.atan(tau * u) / tau


    def kinked(u, tau):
        """Weight 1 for |x| <= 1, 1 / (2 x^2) beyond: the value has a kink at |x| = 1."""
        x = tau * u
        return torch.where(x.abs() <= 1, x, torch.sign(x) * (1.5 - 0.5 / x.abs().clamp(min=1.0))) / tau


    def wrong_weight(u, tau):
        return torch.atan(tau * u) / tau


    family = None  # set by the test: a GateFamily with a wrong weight
''')


@pytest.fixture()
def user_gates(tmp_path, monkeypatch):
    """``user_gates_mod`` importable from a temporary directory; its registrations undone afterwards."""
    (tmp_path / "user_gates_mod.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    before = set(gates.GATES)
    yield importlib.import_module("user_gates_mod")
    sys.modules.pop("user_gates_mod", None)
    for name in set(gates.GATES) - before:
        gates.unregister_gate(name)


# --------------------------------------------------------------------------- a user's own gate


def test_a_user_gate_by_import_path_is_admissible_and_works_everywhere(user_gates):
    path = "user_gates_mod:cauchy2"
    report = testing.check_gate(path, max_examples=50)
    assert report.ok and report.failures == [], str(report)
    # The weight comes from autograd; the oracle is the formula the module's docstring states.
    u = torch.linspace(-3, 3, 61, dtype=torch.float64)
    assert torch.allclose(gates.get_gate(path, tau=2.0).weight(u), 1 / (1 + (2 * u) ** 2) ** 2, rtol=1e-12)
    assert path in gates.SOFT_GATES
    for name, params in (("sspo", {}), ("sspo", {"one_sided": True}), ("sapo", {})):
        assert testing.check_objective(name, gate=path, max_examples=10, **params).ok


def test_theory_of_a_user_gate_agrees_with_monte_carlo(user_gates):
    from sspo_analysis.theory import LogNormalRatios, analyse

    model = LogNormalRatios(0.3, 16)
    quad = analyse("sspo", model, 1, gate="user_gates_mod:cauchy2")
    mc = analyse("sspo", model, 1, gate="user_gates_mod:cauchy2", method="monte-carlo", n_samples=40_000, seed=3)
    assert quad.method == "quadrature"
    for key in ("mean_coefficient", "var_coefficient", "mean_weight"):
        assert abs(getattr(quad, key) - getattr(mc, key)) < 4 * mc.mc_stderr[key] + 1e-12, key
    assert quad.dead_fraction == 0.0


def test_trl_loss_type_takes_a_user_gate(user_gates):
    pytest.importorskip("trl")
    from sspo_analysis.integrations.trl import resolve_loss_type

    assert resolve_loss_type("soft-user_gates_mod:cauchy2") == ("sspo", {"gate": "user_gates_mod:cauchy2"})
    assert resolve_loss_type("soft-user_gates_mod:cauchy2-one-sided")[1]["one_sided"] is True
    with pytest.raises(ValueError, match="has no temperature"):
        resolve_loss_type("soft-hard-clip")


@pytest.mark.trl
def test_trl_trains_three_steps_with_a_user_gate(user_gates, tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    from importlib.util import module_from_spec, spec_from_file_location
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "trl_sspo_tiny.py"
    spec = spec_from_file_location("trl_sspo_tiny", path)
    example = module_from_spec(spec)
    spec.loader.exec_module(example)
    history = example.main(["--loss-type", "soft-user_gates_mod:cauchy2", "--steps", "3", "--out", str(tmp_path / "h")])
    logged = [h for h in history if "objective/gate_weight_mean" in h]
    assert len(logged) == 3
    moved = [h for h in logged if h["objective/log_ratio_std"] > 0]  # num_iterations=2: one off-policy pass
    assert moved and all(h["objective/gate_weight_mean"] < 1.0 for h in moved)


def test_a_registered_family_with_a_wrong_weight_fails_the_derivative_check(user_gates):
    user_gates.family = gates.register_gate("test-wrong", user_gates.wrong_weight, lambda u, tau: 1 / (1 + tau * u * u))
    report = testing.check_gate("user_gates_mod:family", taus=(2.0,), max_examples=50)
    # 1/(1 + tau u^2) is not the slope of atan(tau u)/tau at tau = 2: the grid (c1) and hypothesis both see it
    assert report.failures == ["c1", "derivative"]
    assert "slope of the value" in report["derivative"].counterexample


# --------------------------------------------------------------------------- broken gates fail what they break


@pytest.mark.parametrize(
    ("attr", "broken"),
    [
        ("off_peak", ["max_at_origin", "monotone"]),
        ("heavy_tail", ["vanishing_tails"]),
        ("kinked", ["c1"]),
    ],
)
def test_a_broken_gate_fails_exactly_what_it_breaks_and_the_cli_exits_1(user_gates, attr, broken, capsys):
    path = f"user_gates_mod:{attr}"
    report = testing.check_gate(path, max_examples=50)
    assert report.failures == broken, str(report)
    assert all(report[name].counterexample for name in broken)
    with pytest.raises(AssertionError, match=f"fails {', '.join(broken)}"):
        testing.assert_gate(path, max_examples=10)
    assert main(["check", "gate", path, "--tau", "1", "--examples", "10"]) == 1
    out = capsys.readouterr().out
    assert all(f"FAILED {name}: tau=1 " in out for name in broken)


def test_counterexamples_point_at_the_defect(user_gates):
    peak = testing.check_gate("user_gates_mod:off_peak", taus=(1.0,))["max_at_origin"].counterexample
    assert "0.7071" in peak and "1.21306" in peak  # 2/sqrt(e) at |u| = 1/sqrt(2)
    kink = testing.check_gate("user_gates_mod:kinked", taus=(2.0,))["c1"].counterexample
    assert abs(abs(float(kink.rsplit("u = ", 1)[1])) - 0.5) < 1e-3  # |tau u| = 1


def test_check_gate_cli_passes_and_names_bad_input(user_gates, capsys):
    assert main(["check", "gate", "user_gates_mod:cauchy2", "--examples", "10"]) == 0
    assert "all properties hold" in capsys.readouterr().out
    assert main(["check", "gate", "no_such_gate"]) == 2
    assert "gate: unknown name 'no_such_gate'" in capsys.readouterr().err


# --------------------------------------------------------------------------- broken objectives


@pytest.fixture()
def broken_objectives():
    @register_objective("test-double-coef", level="token", agg="token-mean")
    def double_coef(log_ratio, adv, mask):  # claims twice its own gradient
        r = log_ratio.exp()
        return Terms(r * adv, (2 * r * adv).detach(), r)

    @register_objective("test-width", level="token", agg="token-mean")
    def width(log_ratio, adv, mask):  # the loss depends on the padded width
        r = log_ratio.exp()
        return Terms(r * adv + log_ratio.shape[-1], (r * adv).detach(), r)

    @register_objective("test-overflow", level="token", agg="token-mean")
    def overflow(log_ratio, adv, mask):  # exp(l^2) overflows float32 at |l| = 20: inf / inf
        r = log_ratio.exp()
        return Terms(r * adv * torch.exp(log_ratio**2) / torch.exp(log_ratio**2), (r * adv).detach(), r)

    yield
    for name in ("test-double-coef", "test-width", "test-overflow"):
        objectives._REGISTRY.pop(name, None)


@pytest.mark.parametrize(
    ("name", "broken"),
    [("test-double-coef", ["gradient", "on_policy"]), ("test-width", ["padding"]), ("test-overflow", ["extremes"])],
)
def test_a_broken_objective_fails_exactly_what_it_breaks(broken_objectives, name, broken, capsys):
    report = testing.check_objective(name, max_examples=40)
    assert report.failures == broken, str(report)
    assert all("Batch(log_ratio=" in report[p].counterexample for p in broken)
    assert main(["check", "objective", name, "--examples", "20"]) == 1
    assert f"FAILED {broken[0]}: " in capsys.readouterr().out


def test_a_wrong_aggregation_fails_the_aggregation_property():
    class Doubled(Objective):
        def token_weights(self, mask, dtype=torch.float32):
            return 2 * super().token_weights(mask, dtype)

    base = get_objective("grpo")
    report = testing.check_objective(Doubled(base.name, base.params, base.agg, None, base.spec), max_examples=20)
    assert report.failures == ["aggregation"]


def test_check_objective_cli_sets_parameters(capsys, user_gates):
    assert main(["check", "objective", "sspo", "--set", "gate=user_gates_mod:cauchy2", "--set", "tau=2",
                 "--set", "agg=token-mean", "--examples", "10"]) == 0
    out = capsys.readouterr().out
    assert "'gate': 'user_gates_mod:cauchy2'" in out and "token-mean" in out
    assert main(["check", "objective", "sspo-sigmoid", "--examples", "10"]) == 1
    assert "A>0: 0.5" in capsys.readouterr().out
    assert main(["check", "objective", "sspo", "--set", "tau"]) == 2


# --------------------------------------------------------------------------- the strategies reach what they promise


@pytest.mark.parametrize(
    ("what", "condition"),
    [
        ("a zero advantage", lambda b: bool((b.advantages == 0).any())),
        ("an empty row", lambda b: bool((~b.mask.any(-1)).any())),
        ("ragged lengths", lambda b: len(set(b.mask.sum(-1).tolist())) > 1),
        ("token-level advantages", lambda b: b.advantages.dim() == 2),
        ("inf on masked positions", lambda b: bool(torch.isinf(b.log_prob).any())),
        ("a log-ratio of 1e4", lambda b: bool(((b.log_prob - b.old_log_prob).abs() == 1e4).any())),
        ("bfloat16", lambda b: b.log_prob.dtype == torch.bfloat16),
    ],
)
def test_batches_draw_every_case(what, condition):
    strategy = testing.batches(extremes=True, dtype_choices=testing.DTYPES)
    found = find(strategy, condition, settings=settings(max_examples=2000, database=None))
    assert condition(found), what


def test_hypothesis_is_an_optional_dependency(monkeypatch):
    monkeypatch.setitem(sys.modules, "hypothesis", None)
    with pytest.raises(ImportError, match="needs hypothesis: pip install hypothesis"):
        testing.temperatures()


# --------------------------------------------------------------------------- gates in the theory


def test_a_soft_gate_is_never_dead_even_where_its_weight_underflows():
    from sspo_analysis.theory import LogNormalRatios, analyse

    # erf at tau 4: the weight exp(-(4u)^2) is 0.0 in float64 beyond |u| ~ 6.7, yet never zero by definition.
    model = LogNormalRatios(1.0, 1)
    for method in ("quadrature", "monte-carlo"):
        assert analyse("sapo", model, 1, gate="erf", tau=4.0, method=method, n_samples=20_000).dead_fraction == 0.0
    # The hard clip is dead by definition above eps on the A > 0 side: P(l > eps) for l ~ N(m, s^2), by hand.
    m, s, eps = -0.5, 1.0, 0.2
    hand = 0.5 * math.erfc((eps - m) / (s * math.sqrt(2)))
    hard = analyse("sspo", model, 1, gate="hard-clip", one_sided=True, eps=eps, n_samples=40_000, seed=1)
    assert abs(hard.dead_fraction - hand) < 4 * hard.mc_stderr["dead_fraction"]


def test_theory_grid_csv_writes_mc_stderr_as_json(tmp_path):
    import csv

    out = tmp_path / "grid.csv"
    assert main(["theory", "--grid", "--objectives", "sspo", "--gates", "hard-clip", "--stds", "0.3",
                 "--signs", "+", "--n-samples", "500", "--csv", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    stderr = json.loads(rows[0]["mc_stderr"])
    assert set(stderr) >= {"mean_coefficient", "dead_fraction"} and all(isinstance(v, float) for v in stderr.values())
    assert json.loads(rows[0]["params"])["gate"] == "hard-clip"
