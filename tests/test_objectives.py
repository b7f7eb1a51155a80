"""Objectives: the property battery of :mod:`sspo_analysis.testing` (autograd against the analytic
coefficient, on-policy identities, extreme inputs, padding, aggregation) on every objective and
aggregation mode, hand-computed values, the registry and the metrics."""

import math
import warnings

import pytest
import torch

from sspo_analysis import objectives, testing
from sspo_analysis.objectives import AGG_MODES, Terms, get_objective, objective_names, register_objective

TOKEN = ("pg", "grpo", "dapo", "cispo", "sapo")
SEQUENCE = ("gspo", "gmpo", "sspo", "sspo-sigmoid")

BUILTIN_GATES = ("identity", "sigmoid", "erf", "arctan", "softsign", "hard-clip")
# Every gate family inside sapo (ratio space) and sspo (log space, both sides or one), and non-default widths.
GATED_VARIANTS = [("sapo", {"gate": g, "tau_pos": 1.5, "tau_neg": 0.7}) for g in BUILTIN_GATES if g != "sigmoid"]
GATED_VARIANTS += [
    ("sspo", {"gate": g, "one_sided": side, "tau_pos": 2.0, "tau_neg": 0.5})
    for g in BUILTIN_GATES
    for side in (False, True)
]
GATED_VARIANTS += [("gspo", {"eps": 0.2}), ("cispo", {"eps_max": 1.2}), ("sspo-sigmoid", {"tau": 2.0})]


def quiet_objective(name, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_objective(name, **kw)


def expected_failures(name, params):
    """What an objective is known to break: the geometric mean of SAPO gates is off by tau / 2 on-policy."""
    if name == "sspo-sigmoid" and params.get("tau") != 2.0:
        return ["on_policy"]
    return []


# --------------------------------------------------------------------------- the battery (sspo_analysis.testing)
# Every objective under every aggregation mode, then every gate family inside sapo and sspo: the
# kit draws the batches (A = 0 included, ragged masks, empty rows) and shrinks a failure to its data.


@pytest.mark.parametrize("agg", AGG_MODES)
@pytest.mark.parametrize("name", objective_names())
def test_objective_battery(name, agg):
    report = testing.check_objective(name, agg=agg, max_examples=20)
    assert report.failures == expected_failures(name, {}), str(report)


@pytest.mark.parametrize("variant", GATED_VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}")
def test_gated_variant_battery(variant):
    name, params = variant
    report = testing.check_objective(name, max_examples=20, **params)
    assert report.failures == expected_failures(name, params), str(report)


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 3.0])
def test_sspo_sigmoid_on_policy_factor_is_tau_over_two(tau):
    report = testing.check_objective("sspo-sigmoid", tau_pos=tau, tau_neg=2 * tau, max_examples=10)
    factors = testing.on_policy_factors(quiet_objective("sspo-sigmoid", tau_pos=tau, tau_neg=2 * tau))
    assert factors == pytest.approx({"A>0": tau / 2, "A<0": tau}, rel=1e-12)
    assert report.failures == ["on_policy"]  # tau_neg = 2 tau is never 2 together with tau_pos
    assert f"A>0: {tau / 2:g}" in report.notes["on-policy c / A"]


def test_sspo_sigmoid_is_admissible_only_at_tau_two():
    lp = torch.zeros(1, 4, dtype=torch.float64)
    mask = torch.ones(1, 4, dtype=torch.bool)
    adv = torch.tensor([1.0], dtype=torch.float64)
    gspo = get_objective("gspo").coefficient(lp, lp, adv, mask)
    for tau in (0.5, 1.0, 2.0, 3.0):
        c = get_objective("sspo-sigmoid", tau=tau).coefficient(lp, lp, adv, mask)
        assert torch.allclose(c, gspo * tau / 2)
    assert testing.check_objective("sspo-sigmoid", tau=2.0, max_examples=10).ok


# --------------------------------------------------------------------------- known values
# The 2x3 example: log-ratios l (old log-probs zero), second row's last token masked.
L = [[0.1, -0.2, 0.3], [0.0, 0.5, 0.0]]
MASK = [[True, True, True], [True, True, False]]
A = [1.0, -0.5]
e = math.exp


def sig(x):
    return 1 / (1 + e(-x))


def row_mean(xs):
    return sum(xs) / len(xs)


KNOWN_LOSS = {
    # seq-mean-token-mean of min(rA, clip(r, 0.8, 1.2)A): e^0.3 is clipped at 1.2 (A > 0)
    "grpo": -(row_mean([e(0.1), e(-0.2), 1.2]) + row_mean([-0.5, -0.5 * e(0.5)])) / 2,
    # token-mean over 5 tokens, clip-higher 1.28
    "dapo": -(e(0.1) + e(-0.2) + 1.28 - 0.5 - 0.5 * e(0.5)) / 5,
    "pg": 0.0,
    # token-mean of min(r, 5) A l
    "cispo": -(e(0.1) * 0.1 + e(-0.2) * -0.2 + e(0.3) * 0.3 - 0.5 * (0.0 + e(0.5) * 0.5)) / 5,
    # (4/tau) sigmoid(tau (r - 1)) A, tau = 1 for A > 0, 1.05 for A < 0
    "sapo": -(
        row_mean([4 * sig(e(x) - 1) for x in (0.1, -0.2, 0.3)])
        - 0.5 * row_mean([4 / 1.05 * sig(1.05 * (e(x) - 1)) for x in (0.0, 0.5)])
    )
    / 2,
    # s_1 = e^(0.2/3) > 1.0004 is clipped (A > 0); s_2 = e^0.25 kept (A < 0 keeps the top)
    "gspo": -(1.0004 - 0.5 * e(0.25)) / 2,
    # no token crosses the 0.4 log-space clip on its dangerous side
    "gmpo": -(e(0.2 / 3) - 0.5 * e(0.25)) / 2,
    "sspo": -(
        e(row_mean([math.atan(x) for x in (0.1, -0.2, 0.3)]))
        - 0.5 * e(row_mean([math.atan(1.05 * x) / 1.05 for x in (0.0, 0.5)]))
    )
    / 2,
    "sspo-sigmoid": -(
        e(row_mean([math.log(2 * sig(e(x) - 1)) for x in (0.1, -0.2, 0.3)]))
        - 0.5 * e(row_mean([math.log(2 * sig(1.05 * (e(x) - 1))) for x in (0.0, 0.5)]))
    )
    / 2,
}

KNOWN_COEFFICIENT = {
    "grpo": [[e(0.1), e(-0.2), 0.0], [-0.5, -0.5 * e(0.5), 0.0]],
    "pg": [[1.0, 1.0, 1.0], [-0.5, -0.5, 0.0]],
    "cispo": [[e(0.1), e(-0.2), e(0.3)], [-0.5, -0.5 * e(0.5), 0.0]],
    "gspo": [[0.0, 0.0, 0.0], [-0.5 * e(0.25) / 2, -0.5 * e(0.25) / 2, 0.0]],
    "sspo": [
        [e(row_mean([math.atan(x) for x in (0.1, -0.2, 0.3)])) / (1 + x * x) / 3 for x in (0.1, -0.2, 0.3)],
        [
            -0.5 * e(row_mean([math.atan(1.05 * x) / 1.05 for x in (0.0, 0.5)])) / (1 + (1.05 * x) ** 2) / 2
            for x in (0.0, 0.5)
        ]
        + [0.0],
    ],
}


@pytest.mark.parametrize("name", sorted(KNOWN_LOSS))
def test_known_loss(name):
    lp = torch.tensor(L, dtype=torch.float64)
    loss, _ = get_objective(name)(lp, torch.zeros_like(lp), torch.tensor(A, dtype=torch.float64), torch.tensor(MASK))
    assert float(loss) == pytest.approx(KNOWN_LOSS[name], rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("name", sorted(KNOWN_COEFFICIENT))
def test_known_coefficient(name):
    lp = torch.tensor(L, dtype=torch.float64)
    c = get_objective(name).coefficient(
        lp, torch.zeros_like(lp), torch.tensor(A, dtype=torch.float64), torch.tensor(MASK)
    )
    assert torch.allclose(c, torch.tensor(KNOWN_COEFFICIENT[name], dtype=torch.float64), rtol=1e-10)


def test_known_metrics():
    lp = torch.tensor(L, dtype=torch.float64)
    _, m = get_objective("grpo")(lp, torch.zeros_like(lp), torch.tensor(A, dtype=torch.float64), torch.tensor(MASK))
    assert m["dead_frac"] == pytest.approx(1 / 5)  # e^0.3 clipped for A > 0
    assert m["clip_frac_high"] == pytest.approx(1 / 5) and m["clip_frac_low"] == 0.0
    assert m["ratio_max"] == pytest.approx(e(0.5), rel=1e-6)
    assert m["ratio_min"] == pytest.approx(e(-0.2), rel=1e-6)
    assert m["kl_old_k3"] == pytest.approx(row_mean([e(x) - 1 - x for x in (0.1, -0.2, 0.3, 0.0, 0.5)]), rel=1e-6)
    s = [e(0.2 / 3), e(0.25)]
    assert m["seq_weight_mean"] == pytest.approx(row_mean(s), rel=1e-6)
    assert m["ess_frac"] == pytest.approx(sum(s) ** 2 / (2 * sum(x * x for x in s)), rel=1e-6)
    assert m["n_tokens"] == 5


@pytest.mark.parametrize("name", objective_names())
def test_zero_advantages_and_empty_batch_give_zero_gradient(name):
    lp = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    old = torch.randn(3, 5, dtype=torch.float64)
    for adv, mask in (
        (torch.zeros(3, dtype=torch.float64), torch.ones(3, 5, dtype=torch.bool)),
        (torch.ones(3, dtype=torch.float64), torch.zeros(3, 5, dtype=torch.bool)),
    ):
        loss, _ = get_objective(name)(lp, old, adv, mask)
        (grad,) = torch.autograd.grad(loss, lp)
        if name == "kl-cov" and mask.any():  # its |l| penalty on the top-covariance tokens acts whatever A (verl's)
            assert torch.isfinite(loss) and (grad != 0).sum() <= 1
            continue
        assert torch.isfinite(loss) and (grad == 0).all()


# --------------------------------------------------------------------------- aggregation, API, errors


def test_token_level_advantages_reach_each_token():
    lp = torch.zeros(1, 3, dtype=torch.float64)
    adv = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    mask = torch.ones(1, 3, dtype=torch.bool)
    assert torch.equal(get_objective("grpo").coefficient(lp, lp, adv, mask), adv)
    # sequence objectives use the sequence's mean advantage
    c = get_objective("gspo").coefficient(lp, lp, adv, mask)
    assert torch.allclose(c, torch.full_like(adv, adv.mean().item() / 3))


def test_aggregation_modes_on_known_lengths():
    per_token = torch.tensor([[1.0, 1.0, 1.0], [2.0, 2.0, 0.0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    expected = {
        "seq-mean-token-mean": (1 + 2) / 2,
        "token-mean": 7 / 5,
        "seq-mean-token-sum": (3 + 4) / 2,
        "seq-mean-token-sum-norm": 7 / (2 * 10),
    }
    for agg, value in expected.items():
        obj = get_objective("grpo", agg=agg, horizon=10)
        assert float(obj.aggregate(per_token, mask)) == pytest.approx(value)


@pytest.mark.parametrize("agg", objectives.TOKEN_SUM_MODES)
@pytest.mark.parametrize("name", SEQUENCE)
def test_sequence_objective_with_token_sum_warns(name, agg):
    with pytest.warns(UserWarning, match="weights each sequence by its length"):
        get_objective(name, agg=agg)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "ppo"}, "objective: unknown name 'ppo'; allowed values: pg, grpo"),
        ({"name": "grpo", "agg": "mean"}, "agg: unknown value 'mean'; allowed values: seq-mean-token-mean"),
        ({"name": "grpo", "tau": 1.0}, "unknown parameter"),
        ({"name": "sspo", "gate": "tanh"}, "objective 'sspo': gate: unknown name 'tanh'; allowed values: identity"),
        ({"name": "sspo", "tau_pos": -1.0}, "tau_pos must be a finite number > 0"),
        ({"name": "grpo", "eps_hi": float("nan")}, "eps_hi must be a finite number >= 0"),
    ],
)
def test_bad_parameters_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        get_objective(**kwargs)


def test_bad_shapes_name_the_inputs():
    obj = get_objective("grpo")
    with pytest.raises(ValueError, match="advantages"):
        obj(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="must share one"):
        obj(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3, dtype=torch.bool))


def test_a_new_objective_is_one_function_and_one_decorator():
    try:

        @register_objective("test-reinforce-is", level="token", agg="token-mean", defaults={"beta": 2.0})
        def reinforce_is(log_ratio, adv, mask, *, beta):
            r = log_ratio.exp()
            return Terms(beta * r * adv, (beta * r * adv).detach(), r)

        obj = get_objective("test-reinforce-is", beta=3.0)
        lp = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
        old, adv, mask = torch.randn(2, 4, dtype=torch.float64), torch.tensor([1.0, -1.0]), torch.ones(2, 4).bool()
        loss, metrics = obj(lp, old, adv, mask)
        (grad,) = torch.autograd.grad(loss, lp)
        assert torch.allclose(grad, -obj.coefficient(lp, old, adv, mask) * obj.normalisation(mask, torch.float64))
        assert "gate_weight_mean" in metrics and obj.params == {"beta": 3.0}
    finally:
        objectives._REGISTRY.pop("test-reinforce-is", None)


def test_defaults_are_the_papers():
    assert get_objective("dapo").params == {"eps_lo": 0.2, "eps_hi": 0.28} and get_objective("dapo").agg == "token-mean"
    assert get_objective("gspo").params == {"eps_lo": 3e-4, "eps_hi": 4e-4}
    assert get_objective("gmpo").params == {"eps_lo": 0.4, "eps_hi": 0.4}
    assert get_objective("sapo").params["tau_pos"] == 1.0 and get_objective("sapo").params["tau_neg"] == 1.05
    assert get_objective("sspo").params["gate"] == "arctan"
    assert {get_objective(n).level for n in TOKEN} == {"token"}
    assert {get_objective(n).level for n in SEQUENCE} == {"sequence"}


def test_sspo_with_one_sided_hard_clip_is_gmpo():
    lp = torch.randn(4, 6, dtype=torch.float64)
    old = lp + 0.5 * torch.randn(4, 6, dtype=torch.float64)
    adv, mask = torch.tensor([1.0, -1.0, 0.5, -2.0], dtype=torch.float64), torch.rand(4, 6) < 0.8
    sspo = get_objective("sspo", gate="hard-clip", one_sided=True, eps=0.3)
    gmpo = get_objective("gmpo", eps=0.3)
    assert torch.allclose(sspo(lp, old, adv, mask)[0], gmpo(lp, old, adv, mask)[0])
    assert torch.allclose(sspo.coefficient(lp, old, adv, mask), gmpo.coefficient(lp, old, adv, mask))
