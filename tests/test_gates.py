"""Gate families: values, weights, admissibility, dtypes and extreme inputs."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sspo_analysis import gates

TAUS = st.floats(0.05, 20.0)
U = st.floats(-50.0, 50.0, allow_nan=False)


@settings(max_examples=25, deadline=None)
@given(name=st.sampled_from(gates.SOFT_GATES), tau=TAUS)
def test_soft_families_are_admissible(name, tau):
    report = gates.get_gate(name, tau=tau).check_admissible()
    assert report.admissible, (name, tau, report.failures())


@settings(max_examples=10, deadline=None)
@given(eps=st.floats(0.01, 2.0))
def test_hard_clip_fails_exactly_c1(eps):
    report = gates.get_gate("hard-clip", eps=eps).check_admissible()
    assert report.failures() == ["c1"]


def test_identity_fails_exactly_tails():
    assert gates.get_gate("identity").check_admissible().failures() == ["vanishing_tails"]


def test_admissibility_check_catches_a_weight_peaking_off_origin(monkeypatch):
    # g(u) = sqrt(pi) erf(u) - u exp(-u^2) has weight (1 + 2u^2) exp(-u^2): smooth, vanishing,
    # equal to 1 at 0 but rising to 2/sqrt(e) ~ 1.21 at |u| = 1/sqrt(2).
    family = (
        lambda u, tau: math.sqrt(math.pi) * torch.erf(u) - u * torch.exp(-u * u),
        lambda u, tau: (1 + 2 * u * u) * torch.exp(-u * u),
    )
    monkeypatch.setitem(gates._FAMILIES, "bump", family)
    report = gates.Gate("bump").check_admissible()
    assert report.failures() == ["max_at_origin", "monotone"]


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(gates.GATES), tau=TAUS, u=U)
def test_weight_is_the_derivative_of_the_value(name, tau, u):
    gate = gates.get_gate(name, tau=tau, eps=0.3)
    x = torch.tensor([u], dtype=torch.float64, requires_grad=True)
    if name == "hard-clip" and abs(abs(u) - 0.3) < 1e-6:
        return  # the kink
    (grad,) = torch.autograd.grad(gate(x).sum(), x)
    assert torch.allclose(grad, gate.weight(x.detach()), rtol=1e-9, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(gates.SOFT_GATES), tau=TAUS)
def test_on_policy_point(name, tau):
    gate = gates.get_gate(name, tau=tau)
    zero = torch.zeros(1, dtype=torch.float64)
    assert float(gate(zero)) == 0.0
    assert float(gate.weight(zero)) == 1.0


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


@pytest.mark.parametrize("name", gates.GATES)
@pytest.mark.parametrize("space", gates.SPACES)
def test_extreme_inputs_are_finite(name, space):
    u = torch.tensor([-1e30, -1e4, -20.0, 0.0, 20.0, 1e4, 1e30], dtype=torch.float32)
    gate = gates.get_gate(name, tau=20.0, space=space)
    weight = gate.weight(u)
    assert torch.isfinite(weight).all() and (weight >= 0).all() and (weight <= 1).all()
    if name != "identity":
        assert torch.isfinite(gate(u)).all()


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
