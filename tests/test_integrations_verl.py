"""verl 0.9: the registered package losses, and the package against verl's own losses (``clip_cov`` and
``kl_cov`` included).

Runs where verl is installed (``.venv-verl``, built by ``.ci/integrations.sh``);
skipped elsewhere. Every number on the verl side comes from verl's own code
(``get_policy_loss_fn`` and ``agg_loss``).
"""

import dataclasses
import math
import warnings

import pytest
import torch

pytest.importorskip("verl.trainer.ppo.core_algos")
pytestmark = pytest.mark.verl

from verl.trainer.ppo.core_algos import POLICY_LOSS_REGISTRY, get_policy_loss_fn  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402
from verl.workers.config.actor import PolicyLossConfig  # noqa: E402

from sspo_analysis.integrations import verl as sv  # noqa: E402
from sspo_analysis.objectives import AGG_MODES, get_objective, get_spec  # noqa: E402

F64 = torch.float64
TOL = dict(rtol=1e-10, atol=1e-12)


def actor_config(**kw):
    base = dict(strategy="fsdp", ppo_micro_batch_size_per_gpu=1, rollout_n=2)
    base.update(kw)
    return ActorConfig(**base)


def batch(seed=0, b=6, t=7, std=0.5, empty_row=None, token_adv=False):
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(b, t, generator=g, dtype=F64) * 3 - 0.1
    lp = old + std * torch.randn(b, t, generator=g, dtype=F64)
    adv = torch.randn(b, 1, generator=g, dtype=F64).expand(b, t).clone()
    if token_adv:
        adv = adv + 0.3 * torch.randn(b, t, generator=g, dtype=F64)
    lengths = torch.randint(2, t + 1, (b,), generator=g)
    mask = torch.arange(t)[None, :] < lengths[:, None]
    if empty_row is not None:
        mask[empty_row] = False
    return lp, old, adv, mask


def run(fn, lp, old, adv, mask, mode, config, **kw):
    lp = lp.clone().requires_grad_(True)
    loss, metrics = fn(old_log_prob=old, log_prob=lp, advantages=adv, response_mask=mask, loss_agg_mode=mode,
                       config=config, **kw)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, metrics


def package(name, lp, old, adv, mask, agg, **params):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        obj = get_objective(name, agg=agg, **params)
    lp = lp.clone().requires_grad_(True)
    loss, metrics = obj(lp, old, adv, mask)
    (grad,) = torch.autograd.grad(loss, lp)
    return loss.detach(), grad, metrics


# ----------------------------------------------------------------------------- registration


def test_names_resolve_after_import():
    for name in ("sspo", "sspo_sigmoid", "sspo-sigmoid", "soft_erf", "soft-erf", "soft_softsign_one_sided",
                 "soft-softsign-one-sided", "gmpo", "vespo", "luspo", "pg", "grpo", "dapo", "package:clip_cov",
                 "package:clip-cov", "package:gspo"):
        assert name in POLICY_LOSS_REGISTRY
        assert get_policy_loss_fn(name).__module__ == sv.__name__
    assert sv.REGISTERED == [*sv.LOSS_MODES, *sv.ALIASES]


def test_every_package_objective_has_a_verl_name():
    """Each registered objective under verl's spelling (or package:<name> where verl has the name), hyphens aliased."""
    from sspo_analysis.objectives import objective_names

    for name in objective_names():
        verl_name = name.replace("-", "_")
        assert f"package:{verl_name}" in sv.LOSS_MODES
        assert (verl_name in sv.VERL_LOSSES) != (verl_name in sv.LOSS_MODES)
        if "-" in name and verl_name in sv.LOSS_MODES:
            assert sv.ALIASES[name] == verl_name
    assert not any("-" in mode for mode in sv.LOSS_MODES)
    ours = {name for name, fn in POLICY_LOSS_REGISTRY.items() if fn.__module__ == sv.__name__}
    assert set(POLICY_LOSS_REGISTRY) - ours == sv.VERL_LOSSES  # verl 0.9.1's own losses, all left in place
    with pytest.raises(ValueError, match="^loss_mode: 'clip_cov' is verl's own loss; the package's is package:clip"):
        sv.make_policy_loss("clip_cov")


def test_version_guard():
    assert sv.check_verl_version("0.9.1") == "0.9.1"
    for bad in ("0.8.5", "0.10.0"):
        with pytest.raises(ImportError, match="verl >=0.9,<0.10"):
            sv.check_verl_version(bad)


def test_unknown_loss_mode_names_allowed_values():
    with pytest.raises(ValueError, match="^loss_mode: unknown value 'sspo2'; allowed values: pg, grpo"):
        sv.make_policy_loss("sspo2")


CONFIG = dict(tau_pos=1.3, tau_neg=2.0, clip_ratio_low=0.3, clip_ratio_high=0.25)
POLICY = dict(clip_cov_ratio=0.2, clip_cov_lb=0.05, clip_cov_ub=3.0, kl_cov_ratio=0.2, ppo_kl_coef=0.5)


def expected_params(name, fixed):
    """The parameters the actor config above sets, spelled out by hand (verl's meaning of each field)."""
    from sspo_analysis.objectives import get_spec, read_parameters

    by_hand = dict(tau_pos=1.3, tau_neg=2.0, eps_lo=0.3, eps_hi=0.25, eps_max=1.25, **POLICY)
    read = read_parameters(name, fixed)
    return {**fixed, **{k: v for k, v in by_hand.items() if k in read and k not in fixed}}, get_spec(name)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("loss_mode", list(sv.LOSS_MODES))
def test_registered_loss_returns_package_values(loss_mode, mode):
    """Every registered name against the package's own loss on the same tensors, its parameters from verl's config."""
    from verl.workers.config.actor import PolicyLossConfig

    name, fixed = sv.LOSS_MODES[loss_mode]
    cfg = actor_config(**CONFIG, loss_agg_mode=mode, policy_loss=PolicyLossConfig(loss_mode=loss_mode, **POLICY))
    lp, old, adv, mask = batch(seed=1)
    params, spec = expected_params(name, fixed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, grad, metrics = run(get_policy_loss_fn(loss_mode), lp, old, adv, mask, mode, cfg)
    token_adv = adv if spec.level == "token" else adv[:, 0]
    ref_loss, ref_grad, ref_metrics = package(name, lp, old, token_adv, mask, mode, **params)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    for key in ("gate_weight_mean", "dead_frac", "seq_weight_mean", "seq_weight_var", "ess_frac"):
        assert metrics[f"actor/{loss_mode}/{key}"] == pytest.approx(ref_metrics[key], rel=1e-6, abs=1e-9)
    assert metrics["actor/ppo_kl"] == pytest.approx(-ref_metrics["log_ratio_mean"], rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("alias", list(sv.ALIASES))
def test_hyphenated_alias_is_the_same_loss(alias):
    lp, old, adv, mask = batch(seed=2)
    cfg = actor_config(**CONFIG)
    mode = "seq-mean-token-mean"
    loss, grad, metrics = run(get_policy_loss_fn(alias), lp, old, adv, mask, mode, cfg)
    ref_loss, ref_grad, ref_metrics = run(get_policy_loss_fn(sv.ALIASES[alias]), lp, old, adv, mask, mode, cfg)
    assert torch.equal(loss, ref_loss) and torch.equal(grad, ref_grad) and metrics == ref_metrics


def test_gmpo_clip_fractions_by_hand():
    """verl's pg_clipfrac / pg_clipfrac_lower / ppo_kl for gmpo, counted token by token from the raw tensors."""
    lp, old, adv, mask = batch(seed=3, std=0.8)
    cfg = actor_config(clip_ratio_low=0.3, clip_ratio_high=0.25, loss_agg_mode="seq-mean-token-mean")
    _, _, metrics = run(get_policy_loss_fn("gmpo"), lp, old, adv, mask, "seq-mean-token-mean", cfg)
    tokens = [(float(lp[i, t] - old[i, t]), float(adv[i, t])) for i in range(lp.shape[0])
              for t in range(lp.shape[1]) if mask[i, t]]
    high = sum(a > 0 and x > 0.25 for x, a in tokens) / len(tokens)
    low = sum(a < 0 and x < -0.3 for x, a in tokens) / len(tokens)
    assert high > 0 and low > 0  # the batch exercises both sides
    assert metrics["actor/pg_clipfrac"] == pytest.approx(high, rel=1e-6)
    assert metrics["actor/pg_clipfrac_lower"] == pytest.approx(low, rel=1e-6)
    assert metrics["actor/ppo_kl"] == pytest.approx(-sum(x for x, _ in tokens) / len(tokens), rel=1e-5)


def test_temperatures_come_from_the_actor_config():
    lp, old, adv, mask = batch(seed=2, std=1.0)
    fn = get_policy_loss_fn("sspo")
    mode = "seq-mean-token-mean"
    a = run(fn, lp, old, adv, mask, mode, actor_config(tau_pos=1.0, tau_neg=1.0))[1]
    b = run(fn, lp, old, adv, mask, mode, actor_config(tau_pos=4.0, tau_neg=4.0))[1]
    assert not torch.allclose(a, b)
    ref = package("sspo", lp, old, adv[:, 0], mask, mode, tau=4.0)[1]
    torch.testing.assert_close(b, ref, **TOL)


@pytest.mark.parametrize("mode", AGG_MODES + ("token-sum",))
@pytest.mark.parametrize("loss_mode", ["sspo", "gmpo", "soft-softsign"])
def test_sharding_does_not_change_the_loss(loss_mode, mode):
    """Two data-parallel ranks with config.global_batch_info: the DP-averaged loss and gradient equal one rank's."""
    lp, old, adv, mask = batch(seed=3, b=8)
    fn = get_policy_loss_fn(loss_mode)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        full_loss, full_grad, _ = run(fn, lp, old, adv, mask, mode, actor_config())
        info = dict(dp_size=2, batch_num_tokens=int(mask.sum()), global_batch_size=int(mask.any(-1).sum()))
        # uneven shards: 3 and 5 sequences, different token counts
        parts = [slice(0, 3), slice(3, 8)]
        losses, grads = [], []
        for s in parts:
            cfg = actor_config()
            cfg.global_batch_info.update(info)
            loss, grad, _ = run(fn, lp[s], old[s], adv[s], mask[s], mode, cfg)
            losses.append(loss)
            grads.append(grad)
    # DDP/FSDP average the ranks' gradients; each rank's loss is scaled by dp_size in agg_loss.
    torch.testing.assert_close(sum(losses) / 2, full_loss, **TOL)
    torch.testing.assert_close(torch.cat(grads) / 2, full_grad, **TOL)


def test_rollout_is_weights_scale_sequences_by_their_geometric_mean():
    lp, old, adv, mask = batch(seed=4)
    w = torch.rand(lp.shape, dtype=F64) + 0.5
    fn = get_policy_loss_fn("sspo")
    mode = "seq-mean-token-mean"
    loss_w = run(fn, lp, old, adv, mask, mode, actor_config(), rollout_is_weights=w)[0]
    g = torch.exp(torch.where(mask, w.log(), 0.0).sum(-1) / mask.sum(-1))
    obj = get_objective("sspo")
    t = obj.terms(lp, old, adv, mask)[0]
    torch.testing.assert_close(loss_w, -obj.aggregate(t.surrogate * g, mask), **TOL)


# ----------------------------------------------------------------------------- verl's own losses vs the package


@pytest.mark.parametrize("mode", AGG_MODES)
def test_vanilla_equals_grpo_without_dual_clip(mode):
    lp, old, adv, mask = batch(seed=5)
    cfg = actor_config(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=1e9)
    loss, grad, _ = run(get_policy_loss_fn("vanilla"), lp, old, adv, mask, mode, cfg)
    ref_loss, ref_grad, _ = package("grpo", lp, old, adv, mask, mode, eps_lo=0.2, eps_hi=0.28)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)


def test_vanilla_dual_clip_cuts_negative_advantage_at_large_ratio():
    """Pinned difference: verl's default clip_ratio_c=3 (dual clip) zeroes c when A < 0 and r > 3."""
    lp, old, adv, mask = batch(seed=6)
    mask[:] = True
    adv[0] = -1.0
    lp[0, 0] = old[0, 0] + 1.5  # r = e^1.5 > 3
    mode = "token-mean"
    grad = run(get_policy_loss_fn("vanilla"), lp, old, adv, mask, mode, actor_config())[1]
    ref = package("grpo", lp, old, adv, mask, mode)[1]
    assert grad[0, 0] == 0.0 and ref[0, 0] > 0.0
    cut = (adv < 0) & (torch.exp(lp - old) > 3.0)
    assert (grad[cut] == 0).all() and (ref[cut] != 0).all()
    torch.testing.assert_close(grad[~cut], ref[~cut], **TOL)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_sapo_ignores_loss_agg_mode(mode):
    """Pinned difference: verl's sapo always aggregates seq-mean-token-mean, whatever loss_agg_mode says."""
    lp, old, adv, mask = batch(seed=7, std=0.8)
    cfg = actor_config(tau_pos=1.0, tau_neg=1.05)
    loss, grad, _ = run(get_policy_loss_fn("sapo"), lp, old, adv, mask, mode, cfg)
    ref_loss, ref_grad, _ = package("sapo", lp, old, adv, mask, "seq-mean-token-mean", tau_pos=1.0, tau_neg=1.05)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)
    if mode != "seq-mean-token-mean":
        other = package("sapo", lp, old, adv, mask, mode)[0]
        assert not torch.allclose(loss, other)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_gspo_stop_gradient_form_equals_sequence_clip(mode):
    """verl's token form sg[s_i] pi/sg[pi] has the gradient of the sequence objective under every agg mode."""
    lp, old, adv, mask = batch(seed=8, std=0.05)
    cfg = actor_config(clip_ratio_low=0.01, clip_ratio_high=0.012)
    loss, grad, _ = run(get_policy_loss_fn("gspo"), lp, old, adv, mask, mode, cfg)
    ref_loss, ref_grad, m = package("gspo", lp, old, adv, mask, mode, eps_lo=0.01, eps_hi=0.012)
    assert 0 < m["dead_frac"] < 1  # some sequences clipped, some kept
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)


def test_gspo_token_advantages_differ():
    """Pinned difference: verl's gspo keeps per-token A_{i,t}; the package averages A over the sequence."""
    lp, old, adv, mask = batch(seed=9, std=0.05, token_adv=True)
    mode = "seq-mean-token-mean"
    cfg = actor_config(clip_ratio_low=1.0, clip_ratio_high=1e6)  # no clipping
    grad = run(get_policy_loss_fn("gspo"), lp, old, adv, mask, mode, cfg)[1]
    # verl: c_{i,t} = A_{i,t} s_i / T_i; the package: mean_t(A_{i,t}) s_i / T_i.
    n = mask.sum(-1, keepdim=True).to(F64)
    s = torch.exp(torch.where(mask, lp - old, 0.0).sum(-1, keepdim=True) / n)
    b = mask.any(-1).sum()
    torch.testing.assert_close(grad, torch.where(mask, -adv * s / n / b, 0.0), **TOL)
    ref = package("gspo", lp, old, adv, mask, mode, eps_lo=1.0, eps_hi=1e6)[1]
    assert not torch.allclose(grad, ref)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_geo_mean_equals_gmpo_sequence_mean(mode):
    """verl's geo_mean ignores loss_agg_mode: a plain mean over the micro-batch's sequences."""
    lp, old, adv, mask = batch(seed=10)
    cfg = actor_config(clip_ratio_low=0.4, clip_ratio_high=0.3)
    loss, grad, _ = run(get_policy_loss_fn("geo_mean"), lp, old, adv, mask, mode, cfg)
    ref_loss, ref_grad, m = package("gmpo", lp, old, adv, mask, "seq-mean-token-mean", eps_lo=0.4, eps_hi=0.3)
    assert m["clip_frac_low"] + m["clip_frac_high"] > 0
    torch.testing.assert_close(loss, ref_loss, rtol=1e-7, atol=1e-10)  # verl adds 1e-8 to token counts
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-10)


def test_geo_mean_counts_empty_sequences_and_ignores_global_batch_info():
    """Pinned differences: geo_mean divides by all rows (empty ones too) and sums over micro-batches."""
    lp, old, adv, mask = batch(seed=11, b=6, empty_row=2)
    mode = "seq-mean-token-mean"
    cfg = actor_config(clip_ratio=0.4, clip_ratio_low=0.4, clip_ratio_high=0.4)
    loss = run(get_policy_loss_fn("geo_mean"), lp, old, adv, mask, mode, cfg)[0]
    ref = package("gmpo", lp, old, adv, mask, mode)[0]
    torch.testing.assert_close(loss, ref * 5 / 6, rtol=1e-7, atol=1e-10)
    # two micro-batches on one rank, global batch info set as verl's engine sets it: the engine backpropagates
    # the sum of micro-batch losses. The package's gmpo gives the full-batch loss; geo_mean twice a mean.
    lp, old, adv, mask = batch(seed=12, b=6)
    info = dict(dp_size=1, batch_num_tokens=int(mask.sum()), global_batch_size=int(mask.any(-1).sum()))
    sums = {}
    for name in ("geo_mean", "gmpo"):
        total = 0.0
        for s in (slice(0, 3), slice(3, 6)):
            c = actor_config(clip_ratio=0.4, clip_ratio_low=0.4, clip_ratio_high=0.4)
            c.global_batch_info.update(info)
            total = total + run(get_policy_loss_fn(name), lp[s], old[s], adv[s], mask[s], mode, c)[0]
        sums[name] = total
    full = package("gmpo", lp, old, adv, mask, mode)[0]
    torch.testing.assert_close(sums["gmpo"], full, **TOL)
    halves = [package("gmpo", lp[s], old[s], adv[s], mask[s], mode)[0] for s in (slice(0, 3), slice(3, 6))]
    torch.testing.assert_close(sums["geo_mean"], halves[0] + halves[1], rtol=1e-7, atol=1e-10)
    assert not torch.allclose(sums["geo_mean"], full)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_cispo_gradient_equal_loss_uses_log_prob(mode):
    """verl's cispo: with clip_ratio_low=1 (no lower clip) the gradient is the package's with eps_max=1+clip_high;
    its loss value is -sg[min(r, eps_max)] A log_prob (not the log-ratio): it differs by the old log-prob term."""
    lp, old, adv, mask = batch(seed=13, std=1.0)
    cfg = actor_config(clip_ratio_low=1.0, clip_ratio_high=1.5)
    loss, grad, _ = run(get_policy_loss_fn("cispo"), lp, old, adv, mask, mode, cfg)
    ref_loss, ref_grad, m = package("cispo", lp, old, adv, mask, mode, eps_max=2.5)
    assert m["clip_frac_high"] > 0
    torch.testing.assert_close(grad, ref_grad, **TOL)
    obj = get_objective("cispo", agg=mode, eps_max=2.5)
    old_term = obj.aggregate(torch.exp(lp - old).clamp(max=2.5) * adv * old, mask)
    torch.testing.assert_close(loss, ref_loss - old_term, **TOL)


def test_cispo_default_also_clips_below():
    """Pinned difference: verl's cispo clamps r to [1 - clip_low, 1 + clip_high]; the package only caps it above."""
    lp, old, adv, mask = batch(seed=14, std=1.0)
    mode = "token-mean"
    cfg = actor_config(clip_ratio_low=0.2, clip_ratio_high=1.5)
    grad = run(get_policy_loss_fn("cispo"), lp, old, adv, mask, mode, cfg)[1]
    ref = package("cispo", lp, old, adv, mask, mode, eps_max=2.5)[1]
    low = mask & (torch.exp(lp - old) < 0.8)
    assert low.any()
    torch.testing.assert_close(grad[~low], ref[~low], **TOL)
    ratio = torch.exp(lp - old)
    torch.testing.assert_close(grad[low] / ref[low], (0.8 / ratio)[low], **TOL)


TWINS = {  # the registered package loss -> (verl's own loss computing the same, actor config, agg modes, std)
    "grpo": ("vanilla", dict(clip_ratio_low=0.2, clip_ratio_high=0.2, clip_ratio_c=1e9), AGG_MODES, 0.5),
    "dapo": ("vanilla", dict(clip_ratio_low=0.2, clip_ratio_high=0.28, clip_ratio_c=1e9), AGG_MODES, 0.5),
    "package:gspo": ("gspo", dict(clip_ratio_low=0.01, clip_ratio_high=0.012), AGG_MODES, 0.05),
    "package:sapo": ("sapo", dict(tau_pos=1.0, tau_neg=1.05), ("seq-mean-token-mean",), 0.8),
    "gmpo": ("geo_mean", dict(clip_ratio_low=0.4, clip_ratio_high=0.3), ("seq-mean-token-mean",), 0.5),
    "package:cispo": ("cispo", dict(clip_ratio_low=1.0, clip_ratio_high=1.5), AGG_MODES, 1.0),
    "package:clip_cov": ("clip_cov", dict(clip_ratio_low=0.2, clip_ratio_high=0.28), AGG_MODES, 0.4),
    "package:kl_cov": ("kl_cov", {}, AGG_MODES, 0.4),
}


@pytest.mark.parametrize("loss_mode", list(TWINS))
def test_registered_loss_equals_verls_own(loss_mode):
    """Each objective verl ships, registered loss against verl's function, both from the same actor config.

    Pinned differences as above: cispo's loss value (the gradient is compared), geo_mean's 1e-8 in token counts.
    Clip-Cov: the package's default seed=0 draws verl's permutation after torch.manual_seed(0).
    """
    from verl.workers.config.actor import PolicyLossConfig

    verl_name, fields, modes, std = TWINS[loss_mode]
    tol = dict(rtol=1e-7, atol=1e-10) if verl_name == "geo_mean" else TOL
    lp, old, adv, mask = batch(seed=21, b=8, std=std)
    for mode in modes:
        results = []
        for name in (loss_mode, verl_name):
            policy = PolicyLossConfig(loss_mode=name, clip_cov_ratio=0.2, clip_cov_lb=0.05, clip_cov_ub=3.0,
                                      kl_cov_ratio=0.2, ppo_kl_coef=0.5)
            torch.manual_seed(0)
            results.append(run(get_policy_loss_fn(name), lp, old, adv, mask, mode,
                               actor_config(**fields, loss_agg_mode=mode, policy_loss=policy)))
        (loss, grad, _), (verl_loss, verl_grad, _) = results
        torch.testing.assert_close(grad, verl_grad, **tol)
        if verl_name != "cispo":
            torch.testing.assert_close(loss, verl_loss, **tol)
        assert grad.abs().max() > 0


@pytest.mark.parametrize("mode", AGG_MODES)
def test_empty_sequence_through_agg_loss(mode):
    """An empty response: finite loss, zero gradient. verl's agg_loss and the package agree except in
    seq-mean-token-sum-norm, where verl divides by the non-empty sequences and the package by all B rows."""
    lp, old, adv, mask = batch(seed=15, b=6, empty_row=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss, grad, _ = run(get_policy_loss_fn("sspo"), lp, old, adv, mask, mode, actor_config())
    ref_loss, ref_grad, _ = package("sspo", lp, old, adv[:, 0], mask, mode)
    assert torch.isfinite(loss) and (grad[3] == 0).all()
    scale = 6 / 5 if mode == "seq-mean-token-sum-norm" else 1.0
    torch.testing.assert_close(loss, ref_loss * scale, **TOL)
    torch.testing.assert_close(grad, ref_grad * scale, **TOL)


def test_example_command_line_reaches_the_loss(tmp_path):
    """examples/verl_sspo_gsm8k.sh composes with verl's own ppo_trainer config; the actor config it
    builds selects the registered loss, with its temperatures and aggregation."""
    import os
    import subprocess
    from pathlib import Path

    import verl
    from hydra import compose, initialize_config_dir
    from verl.utils.config import omega_conf_to_dataclass

    script = Path(__file__).resolve().parents[1] / "examples" / "verl_sspo_gsm8k.sh"
    fake = tmp_path / "python3"  # prints the arguments the script would give verl's entry point
    fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@"\n')
    fake.chmod(0o755)
    env = dict(os.environ, PATH=f"{tmp_path}{os.pathsep}{os.environ['PATH']}", LOSS_MODE="soft-erf")
    argv = subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True, env=env).stdout.split("\n")
    assert argv[:2] == ["-m", "verl.trainer.main_ppo"]
    config_dir = os.path.join(os.path.dirname(verl.__file__), "trainer", "config")
    with initialize_config_dir(config_dir=config_dir, version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=[a for a in argv[2:] if a])
    assert cfg.actor_rollout_ref.model.external_lib == sv.__name__
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)
    assert (actor.policy_loss.loss_mode, actor.loss_agg_mode) == ("soft-erf", "seq-mean-token-mean")
    lp, old, adv, mask = batch(seed=16)
    loss, grad, _ = run(get_policy_loss_fn(actor.policy_loss.loss_mode), lp, old, adv, mask, actor.loss_agg_mode, actor)
    ref_loss, ref_grad, _ = package("sspo", lp, old, adv[:, 0], mask, "seq-mean-token-mean", gate="erf",
                                    tau_pos=actor.tau_pos, tau_neg=actor.tau_neg)
    torch.testing.assert_close(loss, ref_loss, **TOL)
    torch.testing.assert_close(grad, ref_grad, **TOL)


def test_example_prints_its_config_through_verls_entry_point(tmp_path):
    """``bash examples/verl_sspo_gsm8k.sh --cfg job`` runs verl's real main_ppo, which prints the composed config.

    Needs verl's entry point to import (``.ci/integrations.sh`` installs what it imports); skipped elsewhere.
    """
    import os
    import subprocess
    import sys
    from pathlib import Path

    probe = subprocess.run([sys.executable, "-c", "import verl.trainer.main_ppo"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"verl.trainer.main_ppo does not import here: {probe.stderr.strip().splitlines()[-1]}")
    script = Path(__file__).resolve().parents[1] / "examples" / "verl_sspo_gsm8k.sh"
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               LOSS_MODE="soft-erf", HF_HUB_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0")
    done = subprocess.run(["bash", str(script), "--cfg", "job"], capture_output=True, text=True, env=env, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loss_mode: soft-erf" in done.stdout
    assert f"external_lib: {sv.__name__}" in done.stdout


# ----------------------------------------------------------------------------- peer objectives (verl's own)
# verl 0.9.1's ``clip_cov`` and ``kl_cov`` against the package's ``clip-cov`` and ``kl-cov``. Clip-Cov's random
# choice is reproduced by seeding: verl draws ``torch.randperm`` from torch's global generator, the package's
# ``seed=s`` from a private generator seeded with ``s``, which draws the same permutation as the global one
# after ``torch.manual_seed(s)``.

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
