"""The package's objectives as verl policy losses (verl 0.9.x).

Importing this module registers, with ``verl.trainer.ppo.core_algos.register_policy_loss``:

============================  ===============================================================
``loss_mode``                 objective (``sspo_analysis.objectives``)
============================  ===============================================================
``sspo``                      ``sspo``: geometric mean of ``arctan`` log-space gates
``sspo-sigmoid``              ``sspo-sigmoid``: geometric mean of SAPO's ratio-space gates
``soft-<gate>``               ``sspo`` with ``gate=<gate>``, gate in sigmoid, erf, arctan, softsign
``soft-<gate>-one-sided``     the same with ``one_sided=True`` (gate only on the side ``sign(A)`` makes dangerous)
``soft-<user gate>``          a registered user gate or import path: ``register("soft-mymod:mygate")``
``gmpo``                      ``gmpo``: GMPO through ``agg_loss`` (verl's own ``geo_mean`` ignores
                              ``loss_agg_mode`` and the global batch info; see the README)
============================  ===============================================================

Enable it in a verl run with either::

    VERL_USE_EXTERNAL_MODULES=sspo_analysis.integrations.verl python -m verl.trainer.main_ppo ...
    python -m verl.trainer.main_ppo ... actor_rollout_ref.model.external_lib=sspo_analysis.integrations.verl

and select the loss with ``actor_rollout_ref.actor.policy_loss.loss_mode=sspo``.

Parameters, all read from the actor config (``actor_rollout_ref.actor.*``) at each call:

- ``tau_pos`` / ``tau_neg`` (verl's SAPO temperatures, defaults 1.0 / 1.05, the
  package's defaults too): the gate temperature for ``A > 0`` / ``A <= 0``;
- ``clip_ratio_low`` / ``clip_ratio_high`` (or ``clip_ratio``): ``gmpo``'s log-space
  clip range (GMPO's paper uses 0.4; verl's default is 0.2);
- ``loss_agg_mode``: verl's aggregation, honoured through verl's ``agg_loss`` with
  ``global_batch_info`` so the loss does not depend on data-parallel sharding or
  micro-batching. SSPO's default is ``seq-mean-token-mean`` (verl's default is
  ``token-mean``, which weights each sequence by its length: set it explicitly);
- ``loss_scale_factor``: the horizon of ``seq-mean-token-sum-norm``;
- the gate family and ``one_sided`` come from the registered name; the other
  SSPO parameters use the package defaults (``get_spec("sspo").defaults``).

``rollout_is_weights`` (verl's rollout correction) multiply the per-token loss of
token objectives; sequence objectives get their geometric mean per sequence, as
verl's ``geo_mean`` does.

The loss function returns ``(pg_loss, metrics)``: verl's ``actor/pg_clipfrac``,
``actor/pg_clipfrac_lower`` and ``actor/ppo_kl``, and every package metric as
``actor/<loss_mode>/<key>`` (gate_weight_mean, dead_frac, seq_weight_mean,
seq_weight_var, ess_frac, ...).
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from sspo_analysis.integrations import SOFT_NAMES, check_engine_version, soft_loss, weighted_surrogate
from sspo_analysis.objectives import AGG_MODES, Objective, compute_metrics, get_objective, get_spec

Tensor = torch.Tensor

VERL_MIN, VERL_MAX = "0.9", "0.10"
"""Tested verl range: ``>= 0.9, < 0.10`` (the loss signature and ``global_batch_info`` are 0.9's)."""

LOSS_MODES: dict[str, tuple[str, dict[str, Any]]] = {
    "sspo": ("sspo", {}),
    "sspo-sigmoid": ("sspo-sigmoid", {}),
    **SOFT_NAMES,
    "gmpo": ("gmpo", {}),
}
"""verl ``loss_mode`` -> (package objective, fixed parameters)."""


def check_verl_version(version: str | None = None) -> str:
    """Raise ImportError unless verl (or ``version``) is in the tested range; returns the version."""
    why = "its policy-loss signature and config.global_batch_info"
    return check_engine_version("verl", version, VERL_MIN, VERL_MAX, why)


@functools.lru_cache(maxsize=64)
def _objective(name: str, agg: str, params: tuple[tuple[str, Any], ...]) -> Objective:
    with warnings.catch_warnings():  # a token-sum agg for a sequence objective is verl's choice: warn once, below
        warnings.simplefilter("ignore")
        return get_objective(name, agg=agg, **dict(params))


def _config_get(config: Any, key: str, default: Any = None) -> Any:
    if config is None:
        return default
    if hasattr(config, "get"):
        value = config.get(key, default)
    else:
        value = getattr(config, key, default)
    return default if value is None else value


def _loss_mode(loss_mode: str) -> tuple[str, dict[str, Any]]:
    """(package objective, fixed parameters) of a name of :data:`LOSS_MODES` or any ``soft-NAME``."""
    resolved = LOSS_MODES.get(loss_mode) or soft_loss(loss_mode)
    if resolved is None:
        raise ValueError(f"loss_mode: unknown value {loss_mode!r}; allowed values: {', '.join(LOSS_MODES)}, "
                         "or soft-NAME for a registered gate or import path")
    return resolved


def objective_for(loss_mode: str, loss_agg_mode: str, config: Any) -> Objective:
    """The package objective that ``loss_mode`` runs, with its parameters read from the actor ``config``."""
    name, fixed = _loss_mode(loss_mode)
    defaults = get_spec(name).defaults
    params = dict(fixed)
    if "tau_pos" in defaults:
        params["tau_pos"] = float(_config_get(config, "tau_pos", defaults["tau_pos"]))
        params["tau_neg"] = float(_config_get(config, "tau_neg", defaults["tau_neg"]))
    if "eps_lo" in defaults:
        clip = _config_get(config, "clip_ratio", None)
        for key, field in (("eps_lo", "clip_ratio_low"), ("eps_hi", "clip_ratio_high")):
            params[key] = float(_config_get(config, field, clip if clip is not None else defaults[key]))
    # The package's agg only shapes its metrics' normalisation; the loss goes through verl's agg_loss.
    agg = loss_agg_mode if loss_agg_mode in AGG_MODES else "token-mean"
    return _objective(name, agg, tuple(sorted(params.items())))


def make_policy_loss(loss_mode: str):
    """Build verl's policy-loss function for ``loss_mode`` (a key of :data:`LOSS_MODES`)."""
    from verl.trainer.ppo.core_algos import agg_loss

    base, _ = _loss_mode(loss_mode)  # a bad name fails here, not at the first step

    def policy_loss(
        old_log_prob: Tensor,
        log_prob: Tensor,
        advantages: Tensor,
        response_mask: Tensor,
        loss_agg_mode: str = "seq-mean-token-mean",
        config: Any = None,
        rollout_is_weights: Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Any]]:
        objective = objective_for(loss_mode, loss_agg_mode, config)
        if objective.level == "sequence" and loss_agg_mode in ("token-mean", "token-sum", "seq-mean-token-sum",
                                                                "seq-mean-token-sum-norm"):
            _warn_length_weighting(loss_mode, loss_agg_mode)
        t, log_ratio, adv, mask = objective.terms(log_prob, old_log_prob, advantages, response_mask)
        surrogate = weighted_surrogate(t.surrogate, rollout_is_weights, mask)
        if surrogate.dim() == 1:  # a sequence surrogate counts once per token of its sequence
            surrogate = surrogate[:, None].expand_as(log_ratio)
        batch_info = dict(_config_get(config, "global_batch_info", {}) or {})
        loss = agg_loss(loss_mat=-surrogate, loss_mask=mask, loss_agg_mode=loss_agg_mode, **batch_info)
        values = compute_metrics(t, log_ratio, adv, mask, loss)
        metrics: dict[str, Any] = {
            "actor/pg_clipfrac": values["clip_frac_high"],
            "actor/pg_clipfrac_lower": values["clip_frac_low"],
            "actor/ppo_kl": -values["log_ratio_mean"],
        }
        metrics.update({f"actor/{loss_mode}/{k}": v for k, v in values.items() if k != "loss"})
        return loss, metrics

    policy_loss.__name__ = f"compute_policy_loss_{loss_mode.replace('-', '_')}"
    policy_loss.__doc__ = f"verl policy loss {loss_mode!r}: the package's {base!r} objective."
    return policy_loss


@functools.cache
def _warn_length_weighting(loss_mode: str, loss_agg_mode: str) -> None:
    warnings.warn(
        f"verl loss_mode={loss_mode!r} is a sequence-level objective; loss_agg_mode={loss_agg_mode!r} weights each "
        "sequence by its length. SSPO's own aggregation is 'seq-mean-token-mean'.", UserWarning, stacklevel=3)


def register(*extra: str) -> list[str]:
    """Register every name of :data:`LOSS_MODES`, and ``extra`` ones, with verl (idempotent); returns the names.

    ``extra`` takes ``soft-NAME`` / ``soft-NAME-one-sided`` for a user's gate, e.g.
    ``register("soft-mymod:mygate")`` in a module listed in ``VERL_USE_EXTERNAL_MODULES``.
    """
    check_verl_version()
    from verl.trainer.ppo import core_algos

    for loss_mode in [*LOSS_MODES, *extra]:
        existing = core_algos.POLICY_LOSS_REGISTRY.get(loss_mode)
        if existing is not None and not existing.__module__ == __name__:
            warnings.warn(f"verl already has a policy loss {loss_mode!r}; sspo_analysis replaces it", UserWarning,
                          stacklevel=2)
        core_algos.register_policy_loss(loss_mode)(make_policy_loss(loss_mode))
    return [*LOSS_MODES, *extra]


REGISTERED = register()
