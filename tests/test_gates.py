"""Gate families: the property battery of :mod:`sspo_analysis.testing` on every built-in family,
hand-computed values, the registry, dtypes and bad input."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sspo_analysis import gates, register_gate, testing

BUILTIN = ("identity", "sigmoid", "erf", "arctan", "softsign", "hard-clip")
# What each built-in family is known to break (by its definition, not by running it).
KNOWN_FAILURES = {"identity": ["vanishing_tails"], "hard-clip": ["c1"]}


@pytest.mark.parametrize("name", BUILTIN)
def test_builtin_gates_pass_the_battery_except_what_they_break_by_design(name):
    report = testing.check_gate(name, taus=(0.05, 1.0, 20.0), max_examples=60)
    assert report.failures == KNOWN_FAILURES.get(name, []), str(report)
    assert report["symmetry"].ok is True  # every built-in claims symmetry, and has it


@pytest.mark.parametrize("eps", [0.01, 0.3, 2.0])
def test_hard_clip_fails_exactly_c1_with_a_counterexample_at_its_edge(eps):
    report = testing.check_gate("hard-clip", eps=eps, max_examples=30)
    assert report.failures == ["c1"]
    at = float(report["c1"].counterexample.rsplit("u = ", 1)[1])
    assert abs(abs(at) - eps) < 1e-3 * eps + 1e-9


@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(BUILTIN[1:5]), tau=testing.temperatures())
def test_soft_families_are_admissible_at_any_temperature(name, tau):
    report = gates.get_gate(name, tau=tau).check_admissible()
    assert report.admissible, (name, tau, report.failures(), report.witnesses)


def test_a_weight_peaking_off_origin_is_caught_where_it_peaks():
    # g(u) = sqrt(pi) erf(u) - u exp(-u^2) has weight (1 + 2u^2) exp(-u^2): smooth, vanishing,
    # equal to 1 at 0 but rising to 2/sqrt(e) ~ 1.2131 at |u| = 1/sqrt(2).
    try:
        register_gate("test-bump", lambda u, tau: math.sqrt(math.pi) * torch.erf(u) - u * torch.exp(-u * u))
        report = gates.get_gate("test-bump").check_admissible()
        assert report.failures() == ["max_at_origin", "monotone"]
        assert "1.21306" in report.witnesses["max_at_origin"] and "0.7071" in report.witnesses["max_at_origin"]
    finally:
        gates.unregister_gate("test-bump")


@pytest.mark.parametrize(
    ("name", "tau", "u", "value", "weight"),
    [
        ("sigmoid", 2.0, 1.0, math.tanh(1.0), 1 / math.cosh(1.0) ** 2),
        ("erf", 0.5, 2.0, math.sqrt(math.pi) * math.erf(1.0), math.exp(-1.0)),
        ("arctan", 3.0, 1.0, math.atan(3.0) / 3.0, 0.1),
        ("softsign", 1.0, -3.0, -0.75, 1 / 16),
        ("hard-clip", 1.0, 0.5, 0.2, 0.0),
        ("identity", 1.0, 7.0, 7.0, 1.0),
    ],
)
def test_known_values(name, tau, u, value, weight):
    gate = gates.get_gate(name, tau=tau, eps=0.2)
    x = torch.tensor([u], dtype=torch.float64)
    assert float(gate(x)) == pytest.approx(value, rel=1e-12)
    assert float(gate.weight(x)) == pytest.approx(weight, rel=1e-12, abs=1e-15)


def test_sapo_gate_is_sigmoid_family_plus_constant():
    # SAPO's (4/tau) sigmoid(tau u) equals the sigmoid family's (2/tau) tanh(tau u / 2) + 2/tau.
    tau = 1.7
    u = torch.linspace(-3, 3, 101, dtype=torch.float64)
    sapo = (4 / tau) * torch.sigmoid(tau * u)
    assert torch.allclose(sapo, gates.get_gate("sigmoid", tau=tau)(u) + 2 / tau, atol=1e-12)


@pytest.mark.parametrize("name", gates.GATES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_dtype_and_shape_preserved(name, dtype):
    u = torch.randn(3, 4, 5).to(dtype)
    gate = gates.get_gate(name, tau=1.3)
    for out in (gate(u), gate.weight(u)):
        assert out.dtype == dtype and out.shape == u.shape
        assert torch.isfinite(out).all()


def test_tensor_tau_broadcasts():
    u = torch.linspace(-2, 2, 7)
    tau = torch.tensor([[1.0], [2.0]])
    out = gates.get_gate("arctan", tau=tau)(u)
    assert out.shape == (2, 7)
    assert torch.allclose(out[1], gates.get_gate("arctan", tau=2.0)(u))


def test_one_sided_gates_only_the_dangerous_side():
    gate = gates.get_gate("arctan", tau=2.0)
    u = torch.tensor([-1.0, 1.0])
    up_value, up_weight = gates.one_sided(gate, u, torch.tensor(True))
    assert up_value[0] == -1.0 and up_weight[0] == 1.0  # below: identity
    assert up_value[1] == gate(u)[1] and up_weight[1] == gate.weight(u)[1]
    down_value, down_weight = gates.one_sided(gate, u, torch.tensor(False))
    assert down_value[1] == 1.0 and down_weight[0] == gate.weight(u)[0]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"name": "tanh"}, "gate: unknown name 'tanh'"),
        ({"name": "erf", "tau": 0.0}, "gate tau"),
        ({"name": "erf", "space": "prob"}, "gate space"),
        ({"name": "hard-clip", "eps": -0.1}, "gate eps"),
    ],
)
def test_bad_input_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        gates.get_gate(**kwargs)


# --------------------------------------------------------------------------- the registry


def test_a_registered_gate_gets_its_weight_from_autograd():
    # arctan's value, registered without a weight: autograd must give 1 / (1 + (tau u)^2) (by hand).
    try:
        register_gate("test-atan", lambda u, tau: torch.atan(tau * u) / tau)
        u = torch.linspace(-4, 4, 81, dtype=torch.float64)
        for tau in (0.3, 2.0, torch.tensor([[0.5], [3.0]], dtype=torch.float64)):
            weight = gates.get_gate("test-atan", tau=tau).weight(u)
            assert torch.allclose(weight, 1 / (1 + (tau * u) ** 2), rtol=1e-12)
        assert gates.get_gate("test-atan").weight(u.float()).dtype == torch.float32
    finally:
        gates.unregister_gate("test-atan")


def test_gates_and_soft_gates_are_live_views_of_the_registry():
    assert tuple(gates.GATES) == BUILTIN and tuple(gates.SOFT_GATES) == BUILTIN[1:5]
    try:
        register_gate("test-live", lambda u, tau: torch.tanh(tau * u) / tau, symmetric=True)
        assert "test-live" in gates.GATES and gates.SOFT_GATES[-1] == "test-live"
        assert ", ".join(gates.GATES).endswith("hard-clip, test-live")
    finally:
        gates.unregister_gate("test-live")
    assert "test-live" not in gates.GATES


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: register_gate("erf", lambda u, tau: u), "'erf' is a built-in gate"),
        (lambda: register_gate("clip", lambda u, tau: u), "'clip' is a built-in gate"),
        (lambda: register_gate("a,b", lambda u, tau: u), "without commas"),
        (lambda: register_gate("x", 3.0), "must be callables"),
        (lambda: register_gate("x", lambda u, tau: u, parameter="width"), "gate parameter: unknown value 'width'"),
        (lambda: gates.unregister_gate("arctan"), "cannot be removed"),
        (lambda: gates.get_gate("no_such_module_xyz:f"), "cannot import 'no_such_module_xyz:f'"),
        (lambda: gates.get_gate("math:pi"), "'math:pi' is not a function"),
    ],
)
def test_registry_bad_input_names_the_field(call, message):
    with pytest.raises(ValueError, match=message):
        call()
