"""Objectives: the property battery of :mod:`sspo_analysis.testing` (autograd against the analytic
coefficient, on-policy identities, extreme inputs, padding, aggregation) on every objective and
aggregation mode, hand-computed values, the registry, the metrics, inputs refused rather than silently
misread; then the peer objectives (VESPO, LUSPO, Clip-Cov, KL-Cov): autograd against the analytic coefficient,
on-policy identities, hand-computed weights and selections, determinism of the random selection, extreme
inputs, bad parameters."""

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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


def test_objective_api_refuses_what_would_silently_mislead():
    import torch

    from sspo_analysis.objectives import get_objective

    for horizon in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="horizon"):
            get_objective("grpo", agg="seq-mean-token-sum-norm", horizon=horizon)
    obj = get_objective("grpo")
    lp, adv = torch.zeros(2, 3), torch.tensor([1.0, -1.0])
    with pytest.raises(ValueError, match="mask: must be boolean or exactly 0/1"):
        obj(lp, lp, adv, torch.full((2, 3), 0.5))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="advantages: must be finite"):
            obj(lp, lp, torch.tensor([bad, 1.0]), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="advantages: expected"):
        obj(lp, lp, "1", torch.ones(2, 3, dtype=torch.bool))
    # numpy inputs and a 0/1 float mask give what the tensors give (the mask's zero token drops out)
    mask = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    lp_np = np.array([[0.1, -0.2, 5.0], [0.0, 0.3, -0.1]])
    got = obj(lp_np, np.zeros((2, 3)), np.array([1.0, -1.0]), mask)[0]
    want = obj(torch.tensor(lp_np), torch.zeros(2, 3, dtype=torch.float64), torch.tensor([1.0, -1.0]),
               torch.tensor(mask).bool())[0]
    assert float(got) == float(want)


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


# --------------------------------------------------------------------------- peer objectives
# VESPO, LUSPO, Clip-Cov and KL-Cov (objectives of other papers): autograd against the analytic coefficient,
# on-policy identities, hand-computed weights and selections, determinism of the random selection, extreme
# inputs, bad parameters.

F64 = torch.float64
FIELD = ("vespo", "luspo", "clip-cov", "kl-cov")

# Defaults, plus settings that make the rare events (selection, clipping) happen on small batches.
VARIANTS = [(name, {}) for name in FIELD]
VARIANTS += [
    ("vespo", {"k_pos": 0.5, "lambda_pos": 0.7, "k_neg": 4.0, "lambda_neg": 1.5}),
    ("luspo", {"eps": 0.2}),
    ("clip-cov", {"clip_cov_ratio": 0.3, "clip_cov_lb": 0.05, "clip_cov_ub": 3.0}),
    ("clip-cov", {"clip_cov_ratio": 0.3, "clip_cov_lb": -1.0, "clip_cov_ub": 1.0, "seed": 7}),
    ("kl-cov", {"kl_cov_ratio": 0.3, "ppo_kl_coef": 0.7}),
]


@st.composite
def batches(draw, max_abs_log_ratio=2.0):
    """Random (log_prob, old_log_prob, advantages, mask) in float64, with empty rows and both advantage signs."""
    b, t = draw(st.integers(1, 6)), draw(st.integers(1, 7))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    log_prob = -torch.rand(b, t, generator=gen, dtype=F64) * 5
    log_ratio = (torch.rand(b, t, generator=gen, dtype=F64) * 2 - 1) * max_abs_log_ratio / math.sqrt(t)
    mask = torch.rand(b, t, generator=gen) < draw(st.floats(0.3, 1.0))
    if draw(st.booleans()):
        mask[draw(st.integers(0, b - 1))] = False  # an empty response
    shape = (b, t) if draw(st.booleans()) else (b,)
    adv = torch.randn(shape, generator=gen, dtype=F64)
    return log_prob, log_prob - log_ratio, adv, mask


def token_adv(adv, mask):
    return torch.where(mask, adv if adv.dim() == 2 else adv[:, None].expand_as(mask), 0.0)


def covariance(adv, log_prob, mask):
    """The centred product by hand, in numpy: the oracle of the covariance ranking."""
    a, lp, m = token_adv(adv, mask).numpy(), log_prob.numpy(), mask.numpy()
    out = (a - a[m].mean()) * (lp - lp[m].mean()) if m.any() else np.zeros_like(a)
    return np.where(m, out, -np.inf)


# --------------------------------------------------------------------------- peers: autograd and on-policy


@settings(max_examples=60, deadline=None)
@given(data=batches(), variant=st.sampled_from(VARIANTS), agg=st.sampled_from(AGG_MODES))
def test_autograd_equals_analytic_coefficient(data, variant, agg):
    name, params = variant
    log_prob, old, adv, mask = data
    obj = quiet_objective(name, agg=agg, **params)
    log_prob = log_prob.clone().requires_grad_()
    loss, _, terms = obj.evaluate(log_prob, old, adv, mask)
    (grad,) = torch.autograd.grad(loss, log_prob)
    expected = -terms.coefficient * obj.normalisation(mask, F64)
    assert torch.allclose(grad, expected, rtol=1e-10, atol=1e-14), (name, params, agg)
    assert (terms.coefficient[~mask] == 0).all() and (grad[~mask] == 0).all()
    # the random selection is a function of the tensors and the seed: the coefficient call agrees
    assert torch.equal(terms.coefficient, obj.coefficient(log_prob, old, adv, mask))


@settings(max_examples=40, deadline=None)
@given(data=batches(), variant=st.sampled_from(VARIANTS))
def test_on_policy_coefficient(data, variant):
    """On-policy ``c = A`` (VESPO: ``phi(1) = 1``; KL-Cov: ``sign(0) = 0``), LUSPO ``c = A / T``;
    Clip-Cov ``c = A`` except on its chosen tokens, which are zero."""
    name, params = variant
    log_prob, _, adv, mask = data
    obj = quiet_objective(name, **params)
    c = obj.coefficient(log_prob, log_prob, adv, mask)
    a = token_adv(adv, mask)
    if name == "luspo":
        n = mask.sum(-1, keepdim=True).clamp(min=1)
        expected = torch.where(mask, a.sum(-1, keepdim=True) / n / n, 0.0)
    elif name == "clip-cov":
        chosen = mask & (c == 0) & (a != 0)
        cov = covariance(adv, log_prob, mask)
        p = obj.params
        candidates = torch.from_numpy((cov > p["clip_cov_lb"]) & (cov < p["clip_cov_ub"])) & mask
        assert not (chosen & ~candidates).any()  # on-policy nothing is PPO-clipped: only the window counts
        budget = max(int(p["clip_cov_ratio"] * int(mask.sum())), 1)
        assert int(chosen.sum()) == min(budget, int(candidates.sum()))
        expected = torch.where(chosen, 0.0, a)
    else:
        expected = a
    assert torch.allclose(c, expected, rtol=1e-12, atol=1e-15), name


def test_vespo_phi_of_one_is_one_with_trls_normalisation():
    """``phi(W) = e^lambda W^k e^(-lambda W)`` at ``W = 1`` is ``e^lambda e^-lambda = 1`` for any ``k, lambda``."""
    for k, lam in ((2.0, 3.0), (3.0, 2.0), (0.3, 11.0)):
        obj = get_objective("vespo", k_pos=k, lambda_pos=lam, k_neg=k, lambda_neg=lam)
        lp = torch.tensor([[0.3, -0.3, 0.0]], dtype=F64)  # sum of log-ratios 0: W = 1
        mask = torch.ones(1, 3, dtype=torch.bool)
        c = obj.coefficient(lp, torch.zeros_like(lp), torch.tensor([1.5], dtype=F64), mask)
        assert torch.allclose(c, torch.full_like(c, 1.5), rtol=1e-14)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_vespo_weight_by_hand(sign):
    """The gamma weight of the product ratio, against its definition, per advantage sign."""
    l = torch.tensor([[0.2, -0.5, 0.4, 9.0], [0.1, 0.3, -0.2, 0.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False], [True, True, True, True]])
    params = dict(k_pos=2.0, lambda_pos=3.0, k_neg=3.0, lambda_neg=2.0)
    c = get_objective("vespo", **params).coefficient(l, torch.zeros_like(l), torch.full((2,), sign, dtype=F64), mask)
    k, lam = (2.0, 3.0) if sign > 0 else (3.0, 2.0)
    for i, w in enumerate((math.exp(0.1), math.exp(0.2))):
        phi = math.exp(lam) * w**k * math.exp(-lam * w)
        assert c[i][mask[i]].tolist() == pytest.approx([sign * phi] * int(mask[i].sum()), rel=1e-13)


def test_vespo_clamps_log_w_like_trl():
    """``log W`` is clamped to ``[log 1e-8, 20]``: a very negative sum gives ``phi(1e-8)``, not 0 or NaN."""
    l = torch.full((1, 5), -10.0, dtype=F64)
    c = get_objective("vespo").coefficient(l, torch.zeros_like(l), torch.ones(1, dtype=F64),
                                           torch.ones(1, 5, dtype=torch.bool))
    w = 1e-8
    assert c[0, 0].item() == pytest.approx(math.exp(3.0) * w**2 * math.exp(-3.0 * w), rel=1e-12)


def test_luspo_is_gspo_times_length():
    """Same sequence clip as GSPO; each token's gradient is ``T_i`` times GSPO's (length-unbiased)."""
    gen = torch.Generator().manual_seed(3)
    old = -torch.rand(5, 8, generator=gen, dtype=F64) * 3
    lp = old + 0.2 * torch.randn(5, 8, generator=gen, dtype=F64)
    adv, mask = torch.randn(5, generator=gen, dtype=F64), torch.rand(5, 8, generator=gen) < 0.7
    grads = []
    for name in ("luspo", "gspo"):
        x = lp.clone().requires_grad_()
        grads.append(torch.autograd.grad(get_objective(name, eps=0.05)(x, old, adv, mask)[0], x)[0])
    assert torch.allclose(grads[0], grads[1] * mask.sum(-1, keepdim=True), rtol=1e-12, atol=1e-15)
    assert (grads[1] == 0).any() and (grads[1] != 0).any()  # some sequences clipped, some not


# --------------------------------------------------------------------------- peers: the covariance selections


def field_batch(seed, b=8, t=6, std=0.3):
    gen = torch.Generator().manual_seed(seed)
    lp = -torch.rand(b, t, generator=gen, dtype=F64) * 4
    old = lp - std * torch.randn(b, t, generator=gen, dtype=F64)
    adv = torch.randn(b, generator=gen, dtype=F64)
    mask = torch.rand(b, t, generator=gen) < 0.8
    return lp, old, adv, mask


@pytest.mark.parametrize("seed", range(4))
def test_kl_cov_penalises_the_top_covariance_tokens(seed):
    lp, old, adv, mask = field_batch(seed)
    obj = get_objective("kl-cov", kl_cov_ratio=0.1, ppo_kl_coef=0.5)
    t = obj.terms(lp, old, adv, mask)[0]
    n = max(1, int(int(mask.sum()) * 0.1))
    cov = covariance(adv, lp, mask)
    top = np.argsort(-cov, axis=None)[:n]
    expected = np.zeros(cov.size, dtype=bool)
    expected[top] = True
    l = lp - old
    a = token_adv(adv, mask)
    penalised = mask & ~torch.isclose(t.coefficient, a * l.exp(), rtol=1e-12, atol=0)
    assert np.array_equal(penalised.numpy().reshape(-1), expected)
    hand = torch.where(mask, a * l.exp() - torch.from_numpy(expected.reshape(l.shape)) * 0.5 * l.sign(), 0.0)
    assert torch.allclose(t.coefficient, hand, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("seed", range(4))
def test_clip_cov_chooses_among_unclipped_tokens_in_the_window(seed):
    lp, old, adv, mask = field_batch(seed, std=0.4)
    params = dict(eps=0.1, clip_cov_ratio=0.2, clip_cov_lb=0.1, clip_cov_ub=2.0, seed=seed)
    t = get_objective("clip-cov", **params).terms(lp, old, adv, mask)[0]
    r, a = (lp - old).exp(), token_adv(adv, mask)
    ppo_clipped = ((a > 0) & (r > 1.1)) | ((a < 0) & (r < 0.9))
    cov = torch.from_numpy(covariance(adv, lp, mask))
    candidates = mask & ~ppo_clipped & (cov > 0.1) & (cov < 2.0)
    chosen = mask & ~ppo_clipped & (t.coefficient == 0)
    assert not (chosen & ~candidates).any()
    assert int(chosen.sum()) == min(max(int(0.2 * int(mask.sum())), 1), int(candidates.sum()))
    assert ppo_clipped.any() and int(chosen.sum()) >= 1
    kept = torch.where(mask & ~ppo_clipped & ~chosen, a * r, 0.0)
    assert torch.allclose(t.coefficient, kept, rtol=1e-13, atol=1e-15)


def test_clip_cov_selection_is_deterministic_given_the_seed():
    lp, old, adv, mask = field_batch(11, b=16, t=8)
    params = dict(clip_cov_ratio=0.05, clip_cov_lb=0.0, clip_cov_ub=10.0)

    def chosen(seed):
        return get_objective("clip-cov", seed=seed, **params).terms(lp, old, adv, mask)[0].gate_weight == 0

    assert torch.equal(chosen(5), chosen(5))
    assert len({tuple(torch.nonzero(chosen(s)).reshape(-1).tolist()) for s in range(6)}) > 1
    # seed=None draws from torch's global generator, as verl does: torch.manual_seed reproduces it
    torch.manual_seed(123)
    first = chosen(None)
    torch.manual_seed(123)
    assert torch.equal(first, chosen(None))
    # and an integer seed is the global generator's draw after torch.manual_seed(seed)
    torch.manual_seed(5)
    assert torch.equal(chosen(None), chosen(5))


# --------------------------------------------------------------------------- peers: extremes and errors


def extreme_batch(dtype):
    lp = torch.zeros(3, 6, dtype=dtype)
    old = torch.zeros(3, 6, dtype=dtype)
    lp[0, :3] = 1e4
    old[1, :4] = 1e4  # log-ratio -1e4
    old[0, 2] = -1e4
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[2, 4:] = False
    lp[2, 5] = float("-inf")  # inf under the mask
    old[2, 4] = float("inf")
    return lp, old, mask


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_extremes_give_finite_loss_gradient_and_metrics(variant, dtype):
    name, params = variant
    lp, old, mask = extreme_batch(dtype)
    lp.requires_grad_()
    obj = quiet_objective(name, **params)
    loss, metrics = obj(lp, old, torch.tensor([1.0, -1.0, -2.0], dtype=dtype), mask)
    (grad,) = torch.autograd.grad(loss, lp)
    assert torch.isfinite(loss) and torch.isfinite(grad).all() and (grad[~mask] == 0).all()
    assert all(math.isfinite(v) for v in metrics.values()), metrics


def test_luspo_default_aggregation_does_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert get_objective("luspo").agg == "seq-mean-token-sum"
    with pytest.warns(UserWarning, match="sequence-level"):
        get_objective("luspo", agg="seq-mean-token-sum-norm")


@pytest.mark.parametrize(
    ("name", "kwargs", "message"),
    [
        ("vespo", {"lambda_pos": 0.0}, "lambda_pos must be a finite number > 0"),
        ("vespo", {"k_neg": -1.0}, "k_neg must be a finite number >= 0"),
        ("clip-cov", {"clip_cov_ratio": 0.0}, "clip_cov_ratio must be a finite number > 0"),
        ("clip-cov", {"clip_cov_lb": 5.0}, "clip_cov_lb must be a number below clip_cov_ub"),
        ("clip-cov", {"seed": 1.5}, "seed must be an integer or None"),
        ("kl-cov", {"kl_cov_ratio": float("nan")}, "kl_cov_ratio must be a finite number > 0"),
        ("kl-cov", {"ppo_kl_coef": -0.1}, "ppo_kl_coef must be a finite number >= 0"),
        ("kl-cov", {"clip_cov_ratio": 0.1}, "unknown parameter"),
    ],
)
def test_bad_peer_parameters_name_the_field(name, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_objective(name, **kwargs)


def test_defaults_are_the_engines():
    assert get_objective("vespo").params == {"k_pos": 2.0, "lambda_pos": 3.0, "k_neg": 3.0, "lambda_neg": 2.0}
    assert get_objective("clip-cov").params == {"eps_lo": 0.2, "eps_hi": 0.2, "clip_cov_ratio": 2e-4,
                                                "clip_cov_lb": 1.0, "clip_cov_ub": 5.0, "seed": 0}
    assert get_objective("kl-cov").params == {"kl_cov_ratio": 2e-4, "ppo_kl_coef": 0.1}
    assert {get_objective(n).agg for n in ("vespo", "clip-cov", "kl-cov")} == {"token-mean"}


def test_kl_cov_metrics_stay_finite_over_a_tiny_advantage():
    """KL-Cov's penalty does not scale with A: its normalised coefficient over A = -1.16e-26 is ~1e25, and the
    variance of that (~1e49) must come back finite, not inf (found by ``sspo check objective kl-cov``)."""
    log_prob = torch.tensor([[0.0, -1e4], [0.0, 0.0]], dtype=torch.float32)
    mask = torch.tensor([[True, True], [True, False]])
    adv = torch.tensor([-1.16e-26, 0.0])
    _, metrics = get_objective("kl-cov")(log_prob, torch.zeros_like(log_prob), adv, mask)
    assert all(math.isfinite(v) for v in metrics.values()), metrics
    assert metrics["coef_norm_var"] > 1e40
