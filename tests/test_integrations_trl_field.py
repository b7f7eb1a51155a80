"""TRL 1.16's ``vespo`` and ``luspo`` against the package's, on the same float64 tensors.

The TRL side is TRL's own ``GRPOTrainer._compute_loss`` on a trainer made without
``__init__``, built by the helpers of ``tests/test_integrations_trl.py``.
"""

import pytest
import torch

pytest.importorskip("trl")
pytestmark = pytest.mark.trl

from test_integrations_trl import TOL, bare_trainer, batch, make_config, package_loss, trl_loss  # noqa: E402

from sspo_analysis.integrations import trl as st  # noqa: E402
from sspo_analysis.objectives import get_objective  # noqa: E402

VESPO_TRL = dict(vespo_k_pos=1.5, vespo_lambda_pos=2.5, vespo_k_neg=2.5, vespo_lambda_neg=1.25)
VESPO_PKG = dict(k_pos=1.5, lambda_pos=2.5, k_neg=2.5, lambda_neg=1.25)


def vespo_old_term(objective, lp, old, adv, mask):
    """TRL's VESPO loss is ``-phi A log_prob``, the package's ``-phi A l``: they differ by ``phi A old_log_prob``."""
    t = objective.terms(lp, old, adv, mask)[0]
    return objective.aggregate(t.coefficient * old, mask.bool())


@pytest.mark.parametrize(("trl_kw", "pkg_kw"), [({}, {}), (VESPO_TRL, VESPO_PKG)])
@pytest.mark.parametrize("seed", [0, 1])
def test_vespo_gradient_equals_trl_loss_uses_log_prob(trl_kw, pkg_kw, seed, tmp_path):
    args = make_config(tmp_path, loss_type="vespo", **trl_kw)
    lp, old, adv, mask = batch(seed=seed, std=0.4)
    loss, grad = trl_loss(bare_trainer(args), lp, old, adv, mask)
    objective = get_objective("vespo", **pkg_kw)
    ref_loss, ref_grad = package_loss(objective, lp, old, adv, mask)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    torch.testing.assert_close(loss, ref_loss - vespo_old_term(objective, lp, old, adv, mask), **TOL)
    assert (adv > 0).any() and (adv < 0).any()
    # the weights are far from 1 on this batch, so the test sees the gamma function, not the on-policy point
    phi = objective.terms(lp, old, adv, mask)[0].weight[:, 0]
    assert (phi - 1).abs().max() > 0.3


def test_vespo_empty_row_and_extremes_match_trl(tmp_path):
    """An empty completion and log-ratios of +-15 (W clamped at 1e-8 and e^20 inside TRL too)."""
    args = make_config(tmp_path, loss_type="vespo")
    lp, old, adv, mask = batch(seed=2, std=0.5, empty_row=2)
    lp[0, 0] += 15.0
    lp[3, 0] -= 15.0
    loss, grad = trl_loss(bare_trainer(args), lp, old, adv, mask)
    objective = get_objective("vespo")
    ref_loss, ref_grad = package_loss(objective, lp, old, adv, mask)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    torch.testing.assert_close(loss, ref_loss - vespo_old_term(objective, lp, old, adv, mask), **TOL)


@pytest.mark.parametrize("seed", [0, 3])
def test_luspo_equals_trl_at_sequence_level(seed, tmp_path):
    args = make_config(tmp_path, loss_type="luspo", importance_sampling_level="sequence", epsilon=0.01,
                       epsilon_high=0.012)
    lp, old, adv, mask = batch(seed=seed, std=0.05)
    loss, grad = trl_loss(bare_trainer(args), lp, old, adv, mask)
    objective = get_objective("luspo", eps_lo=0.01, eps_hi=0.012)
    ref_loss, ref_grad = package_loss(objective, lp, old, adv, mask)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    _, metrics = objective(lp, old, adv, mask.bool())
    assert 0 < metrics["clip_frac_low"] + metrics["clip_frac_high"] < 1  # both sides of the clip are exercised


def test_luspo_empty_completion_counts_in_trl(tmp_path):
    """Pinned difference: TRL's ``luspo`` averages over all ``B`` rows, the package over the non-empty ones."""
    args = make_config(tmp_path, loss_type="luspo", importance_sampling_level="sequence", epsilon=0.01)
    lp, old, adv, mask = batch(seed=4, std=0.05, empty_row=1)
    loss, grad = trl_loss(bare_trainer(args), lp, old, adv, mask)
    ref_loss, ref_grad = package_loss(get_objective("luspo", eps=0.01), lp, old, adv, mask)
    torch.testing.assert_close(loss, ref_loss * 5 / 6, **TOL)
    torch.testing.assert_close(grad, ref_grad * 5 / 6, **TOL)


def test_luspo_at_token_level_is_grpo_summed_over_tokens(tmp_path):
    """TRL's default ``importance_sampling_level="token"`` turns ``luspo`` into token PPO-clip, seq-mean-token-sum."""
    args = make_config(tmp_path, loss_type="luspo", epsilon=0.2, epsilon_high=0.28)
    lp, old, adv, mask = batch(seed=5, std=0.5)
    loss, grad = trl_loss(bare_trainer(args), lp, old, adv, mask)
    ref_loss, ref_grad = package_loss(get_objective("grpo", agg="seq-mean-token-sum", eps_lo=0.2, eps_hi=0.28),
                                      lp, old, adv, mask)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)


@pytest.mark.parametrize("loss_type", ["vespo", "luspo"])
def test_sspo_trainer_passes_trls_own_types_through(loss_type, tmp_path):
    kw = dict(loss_type=loss_type, importance_sampling_level="sequence" if loss_type == "luspo" else "token")
    args = make_config(tmp_path, cls=st.SSPOConfig, **kw)
    assert st.resolve_loss_type(loss_type) is None and args.package_objective() is None
    lp, old, adv, mask = batch(seed=7, std=0.3)
    got = trl_loss(bare_trainer(args, cls=st.SSPOTrainer), lp, old, adv, mask)
    ref = trl_loss(bare_trainer(make_config(tmp_path, **kw)), lp, old, adv, mask)
    torch.testing.assert_close(got[0], ref[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=0, atol=0)


def test_package_vespo_in_sspo_trainer_has_trls_gradient(tmp_path):
    """``package:vespo`` through SSPOTrainer (token-mean over the generation batch) has TRL's ``vespo`` gradient."""
    lp, old, adv, mask = batch(seed=8, std=0.4)
    ref = trl_loss(bare_trainer(make_config(tmp_path, loss_type="vespo")), lp, old, adv, mask)
    tr = bare_trainer(make_config(tmp_path, cls=st.SSPOConfig, loss_type="package:vespo"), cls=st.SSPOTrainer)
    got = trl_loss(tr, lp, old, adv, mask)
    torch.testing.assert_close(got[1], ref[1], **TOL)
