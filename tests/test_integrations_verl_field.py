"""verl 0.9.1's ``clip_cov`` and ``kl_cov`` against the package's ``clip-cov`` and ``kl-cov``.

Runs in ``.venv-verl`` (``.ci/integrations.sh``); skipped elsewhere. The verl numbers
come from verl's own ``compute_policy_loss_clip_cov`` / ``compute_policy_loss_kl_cov``.
Clip-Cov's random choice is reproduced by seeding: verl draws ``torch.randperm`` from
torch's global generator, the package's ``seed=s`` from a private generator seeded
with ``s``, which draws the same permutation as the global one after ``torch.manual_seed(s)``.
"""

import dataclasses
import math

import pytest
import torch

pytest.importorskip("verl.trainer.ppo.core_algos")
pytestmark = pytest.mark.verl

from test_integrations_verl import TOL, actor_config, batch, package, run  # noqa: E402
from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig  # noqa: E402

from sspo_analysis.integrations import verl as sv  # noqa: E402
from sspo_analysis.objectives import AGG_MODES, get_objective, get_spec  # noqa: E402


def config(loss_mode, clip_low=0.2, clip_high=0.28, **policy_loss):
    return actor_config(clip_ratio_low=clip_low, clip_ratio_high=clip_high,
                        policy_loss=PolicyLossConfig(loss_mode=loss_mode, **policy_loss))


CLIP_COV = dict(clip_cov_ratio=0.2, clip_cov_lb=0.05, clip_cov_ub=3.0)
KL_COV = dict(kl_cov_ratio=0.2, ppo_kl_coef=0.5)


def chosen_by_package(lp, old, adv, mask, **params):
    t = get_objective("clip-cov", **params).terms(lp, old, adv, mask)[0]
    return mask & (t.gate_weight == 0) & ~(t.clipped_low | t.clipped_high)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize(("seed", "token_adv"), [(0, False), (1, True), (2, False)])
def test_clip_cov_equals_verl_given_the_seed(mode, seed, token_adv):
    lp, old, adv, mask = batch(seed=10 + seed, b=8, std=0.4, token_adv=token_adv)
    torch.manual_seed(seed)
    loss, grad, metrics = run(get_policy_loss_fn("clip_cov"), lp, old, adv, mask, mode, config("clip_cov", **CLIP_COV))
    params = dict(eps_lo=0.2, eps_hi=0.28, seed=seed, **CLIP_COV)
    ref_loss, ref_grad, _ = package("clip-cov", lp, old, adv, mask, mode, **params)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    chosen = chosen_by_package(lp, old, adv, mask, **params)
    assert int(chosen.sum()) >= 2 and (grad[chosen] == 0).all()  # the selection is exercised
    assert metrics["actor/pg_clipfrac"] == pytest.approx(float(chosen.sum() / mask.sum()), rel=1e-6)


def test_clip_cov_defaults_equal_verl():
    """verl's defaults (ratio 2e-4: one token; window (1, 5); clip 0.2) against the package's defaults."""
    lp, old, adv, mask = batch(seed=20, b=8, std=0.3)
    adv = adv * 3.0  # wide enough advantages that some covariances fall in (1, 5)
    torch.manual_seed(0)
    loss, grad, _ = run(get_policy_loss_fn("clip_cov"), lp, old, adv, mask, "token-mean",
                        actor_config(policy_loss=PolicyLossConfig(loss_mode="clip_cov")))
    ref_loss, ref_grad, _ = package("clip-cov", lp, old, adv, mask, "token-mean")
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    assert int(chosen_by_package(lp, old, adv, mask).sum()) == 1


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize(("seed", "token_adv"), [(0, False), (1, True)])
def test_kl_cov_equals_verl(mode, seed, token_adv):
    lp, old, adv, mask = batch(seed=30 + seed, b=8, std=0.4, token_adv=token_adv)
    loss, grad, _ = run(get_policy_loss_fn("kl_cov"), lp, old, adv, mask, mode, config("kl_cov", **KL_COV))
    ref_loss, ref_grad, _ = package("kl-cov", lp, old, adv, mask, mode, **KL_COV)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    plain = package("kl-cov", lp, old, adv, mask, mode, kl_cov_ratio=0.2, ppo_kl_coef=0.0)[1]
    assert not torch.allclose(grad, plain)  # the penalty is exercised


def test_kl_cov_defaults_equal_verl():
    lp, old, adv, mask = batch(seed=40, b=8, std=0.4)
    loss, grad, _ = run(get_policy_loss_fn("kl_cov"), lp, old, adv, mask, "token-mean",
                        actor_config(policy_loss=PolicyLossConfig(loss_mode="kl_cov")))
    ref_loss, ref_grad, _ = package("kl-cov", lp, old, adv, mask, "token-mean")
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)


def test_defaults_are_verls_config_defaults():
    verl = {f.name: f.default for f in dataclasses.fields(PolicyLossConfig)}
    for name, keys in (("clip-cov", ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub")),
                       ("kl-cov", ("kl_cov_ratio", "ppo_kl_coef"))):
        assert {k: get_spec(name).defaults[k] for k in keys} == {k: verl[k] for k in keys}


def test_integration_leaves_verls_clip_cov_and_kl_cov_in_place():
    """They are verl's: the verl integration leaves verl's own losses in place (the package's: package:clip_cov)."""
    for loss_mode in ("clip_cov", "kl_cov"):
        assert POLICY_LOSS_REGISTRY[loss_mode].__module__ == "verl.trainer.ppo.core_algos"
        assert loss_mode not in sv.REGISTERED
    assert not {"clip-cov", "kl-cov", "clip_cov", "kl_cov"} & set(sv.LOSS_MODES)


def test_log_ratio_beyond_twenty_differs():
    """Pinned difference: verl exponentiates the raw log-ratio; the package clamps it to [-20, 20] first."""
    lp, old, adv, mask = batch(seed=50, b=4, std=0.2)
    mask[:] = True
    lp[0, 0] = old[0, 0] + 25.0
    cfg = config("kl_cov", kl_cov_ratio=0.01, ppo_kl_coef=0.0)
    grad = run(get_policy_loss_fn("kl_cov"), lp, old, adv, mask, "token-mean", cfg)[1]
    ref = package("kl-cov", lp, old, adv, mask, "token-mean", kl_cov_ratio=0.01, ppo_kl_coef=0.0)[1]
    n = int(mask.sum())
    r = math.exp((lp - old)[0, 0].item())
    assert grad[0, 0].item() == pytest.approx(-adv[0, 0].item() * r / n, rel=1e-9)
    assert ref[0, 0] == 0.0
    torch.testing.assert_close(grad[1:], ref[1:], **TOL)
