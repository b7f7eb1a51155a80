"""Simulators: the bandit's first-order entropy prediction, and the staleness study's bias and variance."""

import math

import numpy as np
import pytest
import torch

from sspo_analysis.primitives import ADVANTAGE_EPS, group_advantages
from sspo_analysis.primitives import entropy_from_logits as entropy
from sspo_analysis.simulation import TabularPolicy, entropy_change_first_order, run_bandit, staleness_study

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_first_order_entropy_change_is_the_directional_derivative():
    """-Cov_pi(log pi, dz) equals d/dt H(z + t dz) at t = 0 (central differences)."""
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(4, 17, generator=gen, dtype=torch.float64)
    dz = torch.randn(4, 17, generator=gen, dtype=torch.float64)
    h = 1e-6
    fd = (entropy(z + h * dz) - entropy(z - h * dz)) / (2 * h)
    torch.testing.assert_close(entropy_change_first_order(z, dz), fd, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("name", ["pg", "grpo", "sspo", "cispo"])
def test_bandit_prediction_error_is_second_order(name):
    """The gap between predicted and realised entropy change shrinks ~4x when lr halves; the change only ~2x."""
    errors, changes = [], []
    for lr in (0.1, 0.05, 0.025):
        df = run_bandit(name, steps=3, lr=lr, seed=1)
        errors.append((df.entropy_change_pred - df.entropy_change_real).abs().max())
        changes.append(df.entropy_change_real.abs().max())
    assert min(changes) > 0
    for big, small in zip(errors, errors[1:]):
        assert 3.0 < big / small < 6.0, errors
    for big, small in zip(changes, changes[1:]):
        assert 1.6 < big / small < 2.6, changes
    assert errors[-1] < 0.05 * changes[-1]


def test_bandit_records_and_learns():
    df = run_bandit("grpo", steps=60, seed=0)
    assert list(df.step) == list(range(60))
    expected = {"step", "objective", "entropy", "reward", "expected_reward", "entropy_change_pred",
                "entropy_change_real", "entropy_change_pred_pg", "dead_frac", "clip_frac_high", "lr", "seed"}
    assert expected <= set(df.columns)
    assert df.expected_reward.iloc[-1] > 0.5 > df.expected_reward.iloc[0]
    # the prediction tracks the realised change along the whole run
    assert np.corrcoef(df.entropy_change_pred, df.entropy_change_real)[0, 1] > 0.95
    # off-policy updates: some tokens are clipped at this learning rate
    assert df.dead_frac.max() > 0
    np.testing.assert_allclose(np.diff(df.entropy), df.entropy_change_real.iloc[:-1], atol=1e-12)
    again = run_bandit("grpo", steps=60, seed=0)
    assert again.equals(df)


def test_pg_reference_prediction():
    """With one on-policy update the policy-gradient reference step is the step itself."""
    df = run_bandit("pg", steps=20, updates_per_batch=1, seed=2)
    np.testing.assert_allclose(df.entropy_change_pred_pg, df.entropy_change_pred, rtol=1e-9, atol=1e-15)
    # a tight clip removes most of the step: the reference predicts a larger drift than the realised one
    gspo = run_bandit("gspo", steps=20, seed=2)
    assert gspo.entropy_change_pred_pg.abs().sum() > 2 * gspo.entropy_change_real.abs().sum()


def test_bandit_advantages_are_the_primitive_by_hand():
    """The bandit's first update uses (R - mean) / (std + 1e-4): checked against its pg step, computed by hand.

    With one on-policy ``pg`` update the logit step is ``lr / B * sum_i A_i (e_{a_i} - pi)``; redoing the
    bandit's sampling with its seed gives the actions, so the recorded ``dz_norm`` pins the advantages,
    including the epsilon (1e-4, shared with the trainer; the bandit used 1e-6 before).
    """
    n_actions, group, lr, seed = 8, 4, 0.5, 3
    df = run_bandit("pg", steps=1, n_actions=n_actions, group_size=group, updates_per_batch=1, lr=lr, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_actions, generator=gen, dtype=torch.float64)
    correct = torch.zeros(n_actions, dtype=torch.float64)
    correct[torch.randperm(n_actions, generator=gen)[: max(1, n_actions // 8)]] = 1.0
    p = torch.softmax(z, -1)
    actions = torch.multinomial(p, group, replacement=True, generator=gen)
    rewards = correct[actions].tolist()
    mean = sum(rewards) / group
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / (group - 1))
    adv = [(r - mean) / (std + 1e-4) for r in rewards]
    dz = torch.zeros(n_actions, dtype=torch.float64)
    for a_i, action in zip(adv, actions.tolist()):
        onehot = torch.zeros(n_actions, dtype=torch.float64)
        onehot[action] = 1.0
        dz += lr / group * a_i * (onehot - p)
    assert float(df.dz_norm.iloc[0]) == pytest.approx(float(dz.norm()), rel=1e-12)
    assert ADVANTAGE_EPS == 1e-4


def test_group_advantages():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    a = group_advantages(r)
    # by hand: mean 0.5, sample std sqrt(1/3), so +-0.5 / (0.57735 + 1e-4)
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-4)
    torch.testing.assert_close(a[0], torch.tensor([expected, -expected, -expected, expected]))
    assert (a[1] == 0).all()
    torch.testing.assert_close(group_advantages(r, scale=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))


def test_tabular_policy_enumeration():
    space = TabularPolicy(length=3, vocab=3)
    theta = torch.randn(space.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ys = space.sequences()
    probs = space.token_log_probs(theta, ys).sum(-1).exp()
    assert ys.shape == (27, 3) and float(probs.sum()) == pytest.approx(1.0, abs=1e-12)
    assert float(space.reward(ys).mean()) == pytest.approx(1 / 3)
    # the exact gradient against finite differences of J
    g = space.exact_gradient(theta)
    d = torch.randn(space.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h = 1e-6
    fd = (space.expected_reward(theta + h * d) - space.expected_reward(theta - h * d)) / (2 * h)
    assert float((g * d).sum()) == pytest.approx(float(fd), rel=1e-6)


STUDY = {"staleness": (0, 4, 8), "n_batches": 1500, "seed": 0}


@pytest.mark.parametrize("name", ["pg", "grpo", "gspo", "sapo", "sspo", "is-token", "is-seq"])
def test_on_policy_estimates_are_unbiased(name):
    """At lag 0 every objective's estimate is unbiased for the exact gradient: the error is only noise."""
    row = staleness_study(name, **STUDY).iloc[0]
    assert row.staleness == 0 and row.kl == 0
    # |mean - g*|^2 has expectation variance / n_batches when unbiased (chi-square, ~48 dimensions)
    assert row.bias_raw**2 < 2.0 * row.mean_stderr**2
    assert abs(row.scale - 1) < 4 * row.mean_stderr


def test_staleness_separates_the_estimators():
    is_seq = staleness_study("is-seq", **STUDY)
    grpo = staleness_study("grpo", **STUDY)
    sig = staleness_study("sspo-sigmoid", **STUDY)
    assert (np.diff(is_seq.kl) > 0).all() and (np.diff(is_seq.log_ratio_std) > 0).all()
    # sequence importance sampling stays unbiased off-policy ...
    stale = is_seq.iloc[-1]
    assert stale.bias_raw**2 < 2.0 * stale.mean_stderr**2
    # ... PPO clipping does not: far beyond the noise once the policy has moved
    assert grpo.iloc[-1].bias > 10 * grpo.iloc[-1].mean_stderr and grpo.iloc[-1].dead_frac > 0.1
    # sspo-sigmoid at tau = 1 has half the on-policy gradient (its on-policy coefficient is tau / 2 times GSPO's)
    assert abs(sig.iloc[0].scale - 0.5) < 4 * sig.iloc[0].mean_stderr


def test_bad_simulation_input():
    with pytest.raises(ValueError, match="objective: unknown name"):
        run_bandit("nope", steps=2)
    with pytest.raises(ValueError, match="lr: must be a finite number > 0"):
        run_bandit("pg", steps=2, lr=0.0)
    with pytest.raises(ValueError, match="group_size: must be an integer >= 2"):
        run_bandit("pg", steps=2, group_size=1)
    with pytest.raises(ValueError, match="staleness"):
        staleness_study("pg", staleness=(-1,))
    with pytest.raises(ValueError, match="too many to enumerate"):
        TabularPolicy(length=20, vocab=4)
