"""The package's objectives as verl policy losses (verl 0.9.x).

Importing this module registers, with ``verl.trainer.ppo.core_algos.register_policy_loss``,
every objective of :mod:`sspo_analysis.objectives` under verl's spelling (underscores),
the registry's hyphenated name as an alias:

==============================  ===============================================================
``loss_mode``                   objective (``sspo_analysis.objectives``)
==============================  ===============================================================
``sspo``                        ``sspo``: geometric mean of ``arctan`` log-space gates
``sspo_sigmoid``                ``sspo-sigmoid``: geometric mean of SAPO's ratio-space gates
``soft_<gate>``                 ``sspo`` with ``gate=<gate>``, gate in sigmoid, erf, arctan, softsign
``soft_<gate>_one_sided``       the same with ``one_sided=True`` (gate only on the side ``sign(A)`` makes dangerous)
``soft_<user gate>``            a registered user gate or import path: ``register("soft_mymod:mygate")``
``gmpo``                        ``gmpo``: GMPO through ``agg_loss`` (verl's own ``geo_mean`` ignores
                                ``loss_agg_mode`` and the global batch info; see docs/integrations.md)
``pg``, ``grpo``, ``dapo``,     the package objective of that name
``vespo``, ``luspo``
``package:<objective>``         any package objective, also those verl ships under the same name
                                (``package:gspo``, ``package:sapo``, ``package:cispo``,
                                ``package:clip_cov``, ``package:kl_cov``); ``gspo``, ``sapo``,
                                ``cispo``, ``clip_cov``, ``kl_cov`` stay verl's own
==============================  ===============================================================

``sspo-sigmoid``, ``soft-erf-one-sided``, ``package:clip-cov`` ... are registered too.
Enable it in a verl run with either::

    VERL_USE_EXTERNAL_MODULES=sspo_analysis.integrations.verl python -m verl.trainer.main_ppo ...
    python -m verl.trainer.main_ppo ... actor_rollout_ref.model.external_lib=sspo_analysis.integrations.verl

and select the loss with ``actor_rollout_ref.actor.policy_loss.loss_mode=sspo``.

Parameters, read from the actor config (``actor_rollout_ref.actor.*``) at each call
(:data:`VERL_PARAM_FIELDS`), in verl's meaning:

- ``tau_pos`` / ``tau_neg`` (verl's SAPO temperatures, defaults 1.0 / 1.05, the
  package's defaults too): the gate temperature for ``A > 0`` / ``A <= 0``;
- ``clip_ratio_low`` / ``clip_ratio_high`` (or ``clip_ratio``): the clip range of
  ``grpo``, ``dapo``, ``gspo``, ``luspo``, ``clip_cov`` and ``gmpo``'s log-space range
  (GMPO's paper uses 0.4; verl's default is 0.2); ``cispo``'s cap is ``1 + clip_ratio_high``;
- ``policy_loss.clip_cov_ratio``, ``_lb``, ``_ub``, ``policy_loss.kl_cov_ratio``,
  ``policy_loss.ppo_kl_coef``: Clip-Cov's and KL-Cov's;
- ``loss_agg_mode``: verl's aggregation, honoured through verl's ``agg_loss`` with
  ``global_batch_info`` so the loss does not depend on data-parallel sharding or
  micro-batching. SSPO's default is ``seq-mean-token-mean`` (verl's default is
  ``token-mean``, which weights each sequence by its length: set it explicitly);
- ``loss_scale_factor``: the horizon of ``seq-mean-token-sum-norm``;
- the gate family and ``one_sided`` come from the registered name; parameters verl
  has no field for (``vespo``'s ``k_pos``, ..., Clip-Cov's ``seed``) keep the package's
  defaults (``get_spec(name).defaults``).

``rollout_is_weights`` (verl's rollout correction) multiply the per-token loss of
token objectives; sequence objectives get their geometric mean per sequence, as
verl's ``geo_mean`` does.

The loss function returns ``(pg_loss, metrics)``: verl's ``actor/pg_clipfrac``,
``actor/pg_clipfrac_lower`` and ``actor/ppo_kl``, and every package metric as
``actor/<loss_mode>/<key>`` (gate_weight_mean, dead_frac, seq_weight_mean,
seq_weight_var, ess_frac, ...), ``<loss_mode>`` in verl's spelling.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import torch

from sspo_analysis.integrations import (
    PACKAGE_PREFIX,
    SOFT_NAMES,
    canonical_loss_type,
    check_engine_version,
    hyphenated_name,
    soft_loss,
    weighted_surrogate,
)
from sspo_analysis.objectives import (
    AGG_MODES,
    Objective,
    compute_metrics,
    get_objective,
    objective_names,
    read_parameters,
)

Tensor = torch.Tensor

VERL_MIN, VERL_MAX = "0.9", "0.10"
"""Tested verl range: ``>= 0.9, < 0.10`` (the loss signature and ``global_batch_info`` are 0.9's)."""

VERL_LOSSES: frozenset[str] = frozenset({
    "vanilla", "gspo", "sapo", "cispo", "clip_cov", "kl_cov", "geo_mean", "gpg", "dro", "dppo_tv", "dppo_kl",
    "bypass_mode",
})
"""verl 0.9.1's own policy losses: left in place; a package objective of the same name is ``package:<name>``."""


def _loss_modes() -> dict[str, tuple[str, dict[str, Any]]]:
    """verl's spelling of each package loss -> (package objective, fixed parameters)."""
    modes: dict[str, tuple[str, dict[str, Any]]] = {}
    for name in objective_names():
        if canonical_loss_type(name) not in VERL_LOSSES:
            modes[canonical_loss_type(name)] = (name, {})
    modes.update({canonical_loss_type(soft): value for soft, value in SOFT_NAMES.items()})
    modes.update({f"{PACKAGE_PREFIX}{canonical_loss_type(name)}": (name, {}) for name in objective_names()})
    return modes


LOSS_MODES: dict[str, tuple[str, dict[str, Any]]] = _loss_modes()
"""verl ``loss_mode`` (underscored) -> (package objective, fixed parameters)."""



def _hyphenated_mode(mode: str) -> str:
    """``sspo_sigmoid`` -> ``sspo-sigmoid``, ``package:clip_cov`` -> ``package:clip-cov``."""
    prefix = PACKAGE_PREFIX if mode.startswith(PACKAGE_PREFIX) else ""
    return prefix + hyphenated_name(mode.removeprefix(prefix))


ALIASES: dict[str, str] = {_hyphenated_mode(mode): mode for mode in LOSS_MODES if _hyphenated_mode(mode) != mode}
"""The package registry's hyphenated spelling -> verl's (``sspo-sigmoid`` -> ``sspo_sigmoid``)."""

VERL_PARAM_FIELDS: dict[str, str] = {
    "tau_pos": "tau_pos",
    "tau_neg": "tau_neg",
    "eps_lo": "clip_ratio_low",
    "eps_hi": "clip_ratio_high",
    "eps_max": "clip_ratio_high",  # cispo's cap is 1 + clip_ratio_high, as verl's cispo clamps r
    **{key: f"policy_loss.{key}" for key in ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub", "kl_cov_ratio",
                                             "ppo_kl_coef")},
}
"""Package objective parameter -> the actor config field (``actor_rollout_ref.actor.<field>``) that sets it."""


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
    """``config.<key>`` (a dotted path into nested configs), or ``default`` where it is missing or None."""
    for part in key.split("."):
        if config is None:
            return default
        config = config.get(part, None) if hasattr(config, "get") else getattr(config, part, None)
    return default if config is None else config


def _loss_mode(loss_mode: str) -> tuple[str, dict[str, Any]]:
    """(package objective, fixed parameters) of a name of :data:`LOSS_MODES`, an alias, ``soft_NAME`` for a user's
    gate or ``package:<objective>`` for an objective registered after this module was imported."""
    canonical = ALIASES.get(loss_mode, canonical_loss_type(loss_mode))
    if canonical in LOSS_MODES:
        return LOSS_MODES[canonical]
    name = hyphenated_name(canonical.removeprefix(PACKAGE_PREFIX))
    resolved = soft_loss(name)
    if resolved is not None:
        return resolved
    if canonical.startswith(PACKAGE_PREFIX) and name in objective_names():
        return name, {}
    if canonical in VERL_LOSSES:
        raise ValueError(f"loss_mode: {loss_mode!r} is verl's own loss; the package's is {PACKAGE_PREFIX}{canonical}")
    raise ValueError(f"loss_mode: unknown value {loss_mode!r}; allowed values: {', '.join(LOSS_MODES)}, "
                     "or soft_NAME for a registered gate or import path (hyphens accepted for underscores)")


def objective_for(loss_mode: str, loss_agg_mode: str, config: Any) -> Objective:
    """The package objective that ``loss_mode`` runs, with its parameters read from the actor ``config``."""
    name, fixed = _loss_mode(loss_mode)
    params = dict(fixed)
    clip = _config_get(config, "clip_ratio", None)  # verl's fallback for clip_ratio_low / _high
    for key in read_parameters(name, fixed):
        if key in fixed or key not in VERL_PARAM_FIELDS:
            continue
        value = _config_get(config, VERL_PARAM_FIELDS[key], clip if key in ("eps_lo", "eps_hi", "eps_max") else None)
        if value is not None:
            params[key] = 1.0 + float(value) if key == "eps_max" else float(value)
    # The package's agg only shapes its metrics' normalisation; the loss goes through verl's agg_loss.
    agg = loss_agg_mode if loss_agg_mode in AGG_MODES else "token-mean"
    return _objective(name, agg, tuple(sorted(params.items())))


def make_policy_loss(loss_mode: str):
    """Build verl's policy-loss function for ``loss_mode`` (a key of :data:`LOSS_MODES`)."""
    from verl.trainer.ppo.core_algos import agg_loss

    base, _ = _loss_mode(loss_mode)  # a bad name fails here, not at the first step
    canonical = ALIASES.get(loss_mode, canonical_loss_type(loss_mode))  # one metric prefix for a name and its alias

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
        if objective.level == "sequence" and loss_agg_mode != objective.spec.agg and loss_agg_mode in (
                "token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-sum-norm"):
            _warn_length_weighting(canonical, loss_agg_mode, objective.spec.agg)
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
        metrics.update({f"actor/{canonical}/{k}": v for k, v in values.items() if k != "loss"})
        return loss, metrics

    policy_loss.__name__ = f"compute_policy_loss_{canonical.replace(':', '_')}"
    policy_loss.__doc__ = f"verl policy loss {loss_mode!r}: the package's {base!r} objective."
    return policy_loss


@functools.cache
def _warn_length_weighting(loss_mode: str, loss_agg_mode: str, own_agg: str) -> None:
    warnings.warn(
        f"verl loss_mode={loss_mode!r} is a sequence-level objective; loss_agg_mode={loss_agg_mode!r} weights each "
        f"sequence by its length. The objective's own aggregation is {own_agg!r}.", UserWarning, stacklevel=3)


def register(*extra: str) -> list[str]:
    """Register every name of :data:`LOSS_MODES` and :data:`ALIASES`, and ``extra`` ones, with verl (idempotent);
    returns the names.

    ``extra`` takes ``soft_NAME`` / ``soft_NAME_one_sided`` for a user's gate, e.g.
    ``register("soft_mymod:mygate")`` in a module listed in ``VERL_USE_EXTERNAL_MODULES``, and
    ``package:<objective>`` for an objective registered after this module was imported.
    """
    check_verl_version()
    from verl.trainer.ppo import core_algos

    names = [*LOSS_MODES, *ALIASES, *extra]
    for loss_mode in names:
        existing = core_algos.POLICY_LOSS_REGISTRY.get(loss_mode)
        if existing is not None and not existing.__module__ == __name__:
            warnings.warn(f"verl already has a policy loss {loss_mode!r}; sspo_analysis replaces it", UserWarning,
                          stacklevel=2)
        core_algos.register_policy_loss(loss_mode)(make_policy_loss(loss_mode))
    return names


REGISTERED = register()
