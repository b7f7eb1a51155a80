"""The package's objectives inside TRL's ``GRPOTrainer`` (TRL 1.16.x).

:class:`SSPOConfig` and :class:`SSPOTrainer` subclass ``GRPOConfig`` and
``GRPOTrainer`` the way ``trl.experimental.gmpo`` does: only ``_compute_loss``
changes. ``loss_type`` takes

- TRL's own types (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo``,
  ``luspo``, ``vespo``): passed to TRL unchanged;
- ``sspo``, ``sspo_sigmoid``, ``gmpo``, ``gspo``, ``pg``: the package's objective of that name;
- ``soft_<gate>`` / ``soft_<gate>_one_sided``: ``sspo`` with that log-space gate family;
- ``package:<name>``: any registered package objective, also those whose name TRL
  uses too (``package:grpo`` is the package's GRPO, ``grpo`` is TRL's).

Names are spelled as TRL spells its own (underscores); the hyphenated spelling
(``soft-erf-one-sided``) is accepted and respelled. TRL's fields keep TRL's
meaning: ``epsilon`` / ``epsilon_high`` set the clip range (``eps_lo`` / ``eps_hi``,
or ``eps_max`` for cispo), ``sapo_temperature_pos`` / ``_neg`` the soft gates'
temperatures, ``vespo_*`` vespo's shape; ``importance_sampling_level`` must be the
objective's level. The package adds only ``gate``, ``one_sided``,
``objective_agg`` and ``objective_horizon`` (default ``max_completion_length``,
as TRL's ``dr_grpo``). A field the chosen loss does not read is a ValueError
(with a plain ``GRPOConfig``, whose fields always hold TRL's defaults, a warning
once). Data parallelism and gradient accumulation follow TRL's conventions:
``token-mean`` normalises by the tokens of the whole generation batch across
processes (as TRL's ``dapo``), the other modes by the local batch and the
accumulation steps (as TRL's ``grpo`` and ``dr_grpo``).

Every package metric is logged into TRL's metrics as ``objective/<key>``
(``objective/gate_weight_mean``, ``objective/dead_frac``,
``objective/seq_weight_mean``, ``objective/seq_weight_var``,
``objective/ess_frac``, ...), averaged over processes, and TRL's
``clip_ratio/low_mean``, ``high_mean``, ``region_mean``, ``low_min``, ``high_max``
from the objective's clip flags (zero for a soft gate).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
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
from sspo_analysis.integrations.rewards import code_reward, make_code_reward  # noqa: F401  (re-exported for reward_funcs)
from sspo_analysis.objectives import (
    AGG_MODES,
    Objective,
    check_parameters_read,
    compute_metrics,
    get_objective,
    get_spec,
    objective_names,
    read_parameters,
    unread_parameters,
)
from sspo_analysis.primitives import geometric_mean_weight, k3_kl, masked_sum

TRL_MIN, TRL_MAX = "1.16", "1.17"
"""Tested TRL range: ``>= 1.16, < 1.17`` (``_compute_loss`` is private and moves between minors)."""

TRL_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
"""TRL 1.16's own loss types: passed through to ``GRPOTrainer`` unchanged."""

TRL_EQUIVALENTS: dict[str, tuple[str, str]] = {
    "grpo": ("grpo", "seq-mean-token-mean"),
    "bnpo": ("grpo", "token-mean"),
    "dr_grpo": ("grpo", "seq-mean-token-sum-norm"),
    "dapo": ("grpo", "token-mean"),
    "cispo": ("cispo", "token-mean"),
    "sapo": ("sapo", "seq-mean-token-mean"),
}
"""TRL loss type -> (package objective, aggregation) computing the same loss (see :func:`trl_equivalent`)."""


def check_trl_version(version: str | None = None) -> str:
    """Raise ImportError unless TRL (or ``version``) is in the tested range; returns the version."""
    why = "it overrides GRPOTrainer._compute_loss, whose internals change between minor versions"
    return check_engine_version("trl", version, TRL_MIN, TRL_MAX, why)


check_trl_version()

from trl import GRPOConfig, GRPOTrainer  # noqa: E402


def resolve_loss_type(loss_type: str) -> tuple[str, dict[str, Any]] | None:
    """``None`` for a TRL loss type, else ``(package objective name, parameters the name fixes)``."""
    if canonical_loss_type(loss_type) in TRL_LOSS_TYPES:
        return None
    name = loss_type[len(PACKAGE_PREFIX):] if loss_type.startswith(PACKAGE_PREFIX) else loss_type
    name = hyphenated_name(canonical_loss_type(name))
    soft = soft_loss(name)  # soft-NAME[-one-sided]: built-in gates, registered user gates, import paths
    if soft is not None:
        return soft
    if name in objective_names():
        return name, {}
    allowed = list(TRL_LOSS_TYPES) + [canonical_loss_type(n) for n in objective_names() if n not in TRL_LOSS_TYPES]
    allowed += [canonical_loss_type(n) for n in SOFT_NAMES]
    raise ValueError(
        f"loss_type: unknown value {loss_type!r}; allowed values: {', '.join(allowed)}, "
        f"or {PACKAGE_PREFIX}<objective> for any of {', '.join(objective_names())}"
    )


def trl_equivalent(loss_type: str, args: Any) -> Objective:
    """The package objective that computes TRL's ``loss_type`` with ``args``' parameters.

    ``args`` needs TRL's ``epsilon``, ``epsilon_high``, ``sapo_temperature_pos`` /
    ``_neg``, ``importance_sampling_level`` and ``max_completion_length``. With
    ``importance_sampling_level="sequence"``, ``grpo`` is the package's ``gspo``.
    The match is exact for every batch without empty completions; docs/integrations.md's
    table lists where the two differ.
    """
    if loss_type not in TRL_EQUIVALENTS:
        raise ValueError(f"loss_type: no package equivalent for {loss_type!r}; allowed: {', '.join(TRL_EQUIVALENTS)}")
    name, agg = TRL_EQUIVALENTS[loss_type]
    eps_lo = args.epsilon
    eps_hi = args.epsilon_high if args.epsilon_high is not None else args.epsilon
    if getattr(args, "importance_sampling_level", "token") == "sequence":
        if loss_type != "grpo":
            raise ValueError("importance_sampling_level: 'sequence' has a package equivalent only for loss_type='grpo'")
        return get_objective("gspo", agg=agg, eps_lo=eps_lo, eps_hi=eps_hi)
    if name == "grpo":
        horizon = args.max_completion_length if agg == "seq-mean-token-sum-norm" else None
        return get_objective("grpo", agg=agg, horizon=horizon, eps_lo=eps_lo, eps_hi=eps_hi)
    if name == "cispo":  # TRL's epsilon_high is CISPO's eps_max
        return get_objective("cispo", agg=agg, eps_max=eps_hi)
    return get_objective("sapo", agg=agg, tau_pos=args.sapo_temperature_pos, tau_neg=args.sapo_temperature_neg)


TRL_PARAM_FIELDS: dict[str, str] = {
    "eps_lo": "epsilon",
    "eps_hi": "epsilon_high",
    "eps_max": "epsilon_high",  # TRL's cispo reads epsilon_high as its cap, as here
    "tau_pos": "sapo_temperature_pos",
    "tau_neg": "sapo_temperature_neg",
    "k_pos": "vespo_k_pos",
    "lambda_pos": "vespo_lambda_pos",
    "k_neg": "vespo_k_neg",
    "lambda_neg": "vespo_lambda_neg",
}
"""Package objective parameter -> the ``GRPOConfig`` field that sets it (TRL's name, TRL's meaning)."""

PACKAGE_FIELDS = ("gate", "one_sided", "objective_agg", "objective_horizon")
"""What TRL has no name for: the gate family, one-sidedness, the aggregation and its horizon."""

_AT_DEFAULT_OR_ERROR = "not supported: a ValueError unless at TRL's default"
LOSS_FIELDS: dict[str, str] = {
    "loss_type": "selects the objective",
    "beta": "honoured: TRL's k3 KL to the reference, aggregated as the objective's loss",
    "use_bias_correction_kl": "honoured: the KL times the ratio at the objective's level, as TRL",
    **dict.fromkeys(("epsilon", "epsilon_high", "delta", "sapo_temperature_pos", "sapo_temperature_neg",
                     "vespo_k_pos", "vespo_lambda_pos", "vespo_k_neg", "vespo_lambda_neg"),
                    "the objective's parameter (TRL_PARAM_FIELDS); a ValueError if the objective does not read it"),
    "importance_sampling_level": "must be the objective's level",
    "max_completion_length": "the horizon of seq-mean-token-sum-norm (objective_horizon unset)",
    "steps_per_generation": "honoured: token-mean's normalisation, as TRL's dapo",
    "use_vllm": "honoured with vllm_importance_sampling_correction",
    "vllm_importance_sampling_correction": "honoured: token weights, a sequence objective's geometric mean; "
                                           "package:vespo multiplies them in (TRL's vespo puts them in phi): a warning",
    "router_aux_loss_coef": "honoured: the MoE auxiliary loss, as TRL",
    **dict.fromkeys(("top_entropy_quantile", "off_policy_mask_threshold", "entropy_coef", "use_adaptive_entropy",
                     "entropy_target", "entropy_coef_delta", "entropy_coef_min", "entropy_coef_max"),
                    _AT_DEFAULT_OR_ERROR),
}
"""What ``SSPOTrainer`` does, for a package objective, with each ``GRPOConfig`` field TRL's ``_compute_loss`` reads.

Every other field acts before the loss (generation, rewards, advantages, the old and reference log-probs) and
is TRL's own code, unchanged. The tests read TRL's ``_compute_loss`` and fail on a field missing here.
"""

_TRL_DEFAULTS: dict[str, Any] = {
    f.name: f.default for f in GRPOConfig.__dataclass_fields__.values()
    if f.name in {*TRL_PARAM_FIELDS.values(), "delta", "importance_sampling_level"}
}
"""TRL's defaults of the loss fields ``SSPOConfig`` leaves unset (``None``) until it knows the loss type."""

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=4)


def _check_importance_level(args: Any, name: str) -> str:
    """``importance_sampling_level`` must agree with the objective's own level (unset: that level)."""
    level = get_spec(name).level
    given = getattr(args, "importance_sampling_level", None)
    if given is None or given == level:
        return level
    if given == "token" and not isinstance(args, SSPOConfig):  # a plain GRPOConfig always says "token"
        _warn_once(f"isl-{name}", f"importance_sampling_level: 'token' (TRL's default) is not used: objective "
                   f"{name!r} is {level}-level; set importance_sampling_level={level!r}")
        return level
    raise ValueError(f"importance_sampling_level: objective {name!r} is {level}-level; allowed values: {level!r} "
                     f"(or leave it unset), got {given!r}")


def _field_parameter(trl_field: str, name: str) -> str:
    """The parameter of objective ``name`` a TRL loss field sets (the field's own name if it sets none).

    ``epsilon_high`` is ``eps_hi``, or ``eps_max`` for cispo; ``delta`` sets no package parameter.
    """
    candidates = [p for p, f in TRL_PARAM_FIELDS.items() if f == trl_field]
    defaults = get_spec(name).defaults
    return next((p for p in candidates if p in defaults), candidates[0] if candidates else trl_field)


def _trl_fields(args: Any, name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(explicit, defaulted)``: the set TRL loss fields of ``args`` as objective parameters of ``name``.

    Only a plain ``GRPOConfig`` carries TRL's defaults whether or not the user wrote them (they count as
    ``defaulted``); ``SSPOConfig`` leaves them unset, so there any value was written by the user.
    """
    explicit, defaulted = {}, {}
    for trl_field, default in _TRL_DEFAULTS.items():
        value = getattr(args, trl_field, None)
        if trl_field == "importance_sampling_level" or value is None:
            continue
        given = defaulted if value == default and not isinstance(args, SSPOConfig) else explicit
        given[_field_parameter(trl_field, name)] = value
    return explicit, defaulted


def package_parameters(args: Any, name: str, fixed: dict[str, Any]) -> dict[str, Any]:
    """Objective parameters from TRL's fields (``epsilon``, ``sapo_temperature_pos``, ...) and ``gate``/``one_sided``.

    Unset fields keep the objective's defaults; a set field the objective does not read is a ValueError
    (:func:`sspo_analysis.objectives.check_parameters_read`, the trainer's own check).
    """
    params = dict(fixed)
    for key in ("gate", "one_sided"):
        value = getattr(args, key, None)
        if value is None:
            continue
        if key not in get_spec(name).defaults:
            raise ValueError(f"{key}: not a parameter of objective {name!r} (loss_type={args.loss_type!r})")
        if key in fixed and fixed[key] != value:
            raise ValueError(f"{key}: loss_type={args.loss_type!r} fixes {key}={fixed[key]!r}, got {value!r}")
        params[key] = value
    explicit, defaulted = _trl_fields(args, name)
    labels = {**TRL_PARAM_FIELDS, "gate": "gate", "one_sided": "one_sided", "delta": "delta"}
    check_parameters_read(name, {**params, **explicit}, labels)
    unread = unread_parameters(name, {**params, **defaulted})
    if unread:
        reads = ", ".join(labels[k] for k in read_parameters(name, params) if k in labels) or "none of TRL's fields"
        _warn_once(f"unused-{name}", f"{', '.join(labels[k] for k in unread)}: TRL's defaults, not used by "
                   f"objective {name!r} (it reads {reads}); SSPOConfig leaves them unset")
    read = read_parameters(name, params)
    params.update({k: v for k, v in {**defaulted, **explicit}.items() if k in read})
    if "eps_hi" in read and "eps_hi" not in params and "eps_lo" in params:
        params["eps_hi"] = params["eps_lo"]  # TRL: epsilon_high defaults to epsilon
    return params


def _loss_field(help_text: str, default: Any = None) -> Any:
    return field(default=default, metadata={"help": help_text})


@dataclass
class SSPOConfig(GRPOConfig):
    r"""``GRPOConfig`` whose ``loss_type`` also takes the package's objectives.

    TRL's fields keep TRL's meaning: ``epsilon`` / ``epsilon_high`` are the clip
    range of ``gmpo``, ``gspo``, ``package:grpo`` and ``sspo`` with the hard-clip
    gate; ``sapo_temperature_pos`` / ``_neg`` the soft gates' temperatures;
    ``importance_sampling_level`` must match the objective's level. Here they
    default to unset, so that a package objective keeps its own defaults (GMPO's
    0.4, GSPO's 3e-4 / 4e-4); TRL's own loss types get TRL's defaults. A set
    field the chosen loss does not read is a ValueError.

    Parameters (besides all of ``GRPOConfig``'s):
        loss_type (`str`, defaults to `"sspo"`): a TRL loss type, a package objective
            (``sspo``, ``sspo_sigmoid``, ``gmpo``, ``gspo``, ``pg``), ``soft_<gate>``,
            ``soft_<gate>_one_sided`` or ``package:<objective>``. Hyphens are accepted
            for underscores (``soft-erf-one-sided``).
        gate (`str`, optional): gate family of ``sspo`` (log space) or ``package:sapo``.
        one_sided (`bool`, optional): ``sspo``: gate only the side ``sign(A)`` makes risky.
        objective_agg (`str`, optional): aggregation of a package objective, one of
            ``seq-mean-token-mean``, ``token-mean``, ``seq-mean-token-sum``,
            ``seq-mean-token-sum-norm``; default the objective's own.
        objective_horizon (`int`, optional): constant of ``seq-mean-token-sum-norm``;
            default ``max_completion_length``.
    """

    loss_type: str = _loss_field(
        "A TRL loss type (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo) or a package objective: sspo, "
        "sspo_sigmoid, gmpo, gspo, pg, soft_<gate>[_one_sided], package:<objective>.", "sspo")
    epsilon: float | None = _loss_field(
        "Lower clip range (TRL's losses, gmpo, gspo, sspo with gate=hard-clip); unset: TRL's 0.2 for TRL's losses, "
        "the objective's default otherwise.")
    sapo_temperature_pos: float | None = _loss_field(
        "Gate temperature for A > 0 (sapo, sspo with a soft gate); unset: 1.0.")
    sapo_temperature_neg: float | None = _loss_field(
        "Gate temperature for A <= 0 (sapo, sspo with a soft gate); unset: 1.05.")
    vespo_k_pos: float | None = _loss_field("vespo: k for A > 0; unset: the loss's default.")
    vespo_lambda_pos: float | None = _loss_field("vespo: lambda for A > 0; unset: the loss's default.")
    vespo_k_neg: float | None = _loss_field("vespo: k for A <= 0; unset: the loss's default.")
    vespo_lambda_neg: float | None = _loss_field("vespo: lambda for A <= 0; unset: the loss's default.")
    importance_sampling_level: str | None = _loss_field(
        "token or sequence; for a package objective it must be the objective's level (unset: that level).")
    gate: str | None = _loss_field("Gate family (sspo: log space; package:sapo: ratio space).")
    one_sided: bool | None = _loss_field("sspo: gate only the side sign(A) makes risky.")
    objective_agg: str | None = _loss_field(f"Aggregation of a package objective: {', '.join(AGG_MODES)}.")
    objective_horizon: int | None = _loss_field(
        "Horizon of seq-mean-token-sum-norm (default: max_completion_length).")

    def __post_init__(self):
        if self.objective_agg is not None and self.objective_agg not in AGG_MODES:
            raise ValueError(
                f"objective_agg: unknown value {self.objective_agg!r}; allowed values: {', '.join(AGG_MODES)}")
        self.loss_type = canonical_loss_type(self.loss_type)  # TRL's spelling: dr-grpo -> dr_grpo
        if resolve_loss_type(self.loss_type) is None:
            for key in PACKAGE_FIELDS:
                if getattr(self, key) is not None:
                    raise ValueError(f"{key}: not used by TRL's loss_type={self.loss_type!r}; it applies to the "
                                     "package's objectives only")
            for key, default in _TRL_DEFAULTS.items():
                if getattr(self, key) is None:
                    setattr(self, key, default)
        else:
            self.package_objective()  # validate the loss type and parameters now, not at the first step
        super().__post_init__()

    def package_objective(self) -> Objective | None:
        """The package objective this config selects, or ``None`` for a TRL loss type."""
        return objective_from_args(self)


def objective_from_args(args: GRPOConfig) -> Objective | None:
    """The package objective ``args`` selects (``None`` for TRL's loss types).

    A plain ``GRPOConfig`` may name a package objective too: its TRL fields then
    count as set only where they differ from TRL's defaults.
    """
    resolved = resolve_loss_type(args.loss_type)
    if resolved is None:
        return None
    name, fixed = resolved
    _check_importance_level(args, name)
    params = package_parameters(args, name, fixed)
    agg = getattr(args, "objective_agg", None) or get_spec(name).agg
    horizon = None
    if agg == "seq-mean-token-sum-norm":
        horizon = getattr(args, "objective_horizon", None) or args.max_completion_length
    return get_objective(name, agg=agg, horizon=horizon, **params)


class SSPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is a package objective when ``args.loss_type`` names one.

    TRL's own loss types run TRL's ``_compute_loss`` unchanged. For a package
    objective, the loss is ``Objective.terms`` + ``Objective.aggregate`` on TRL's
    per-token log-probs, with TRL's KL term (``beta``; ``use_bias_correction_kl``, TRL's
    default, weights it by the importance ratio as TRL does), vLLM importance-sampling
    correction (token weights; sequence objectives get their geometric mean),
    MoE auxiliary loss, data-parallel and gradient-accumulation normalisation.
    Not supported with a package objective (a ValueError says so):
    ``top_entropy_quantile < 1``, ``off_policy_mask_threshold``, the entropy bonus.
    :data:`LOSS_FIELDS` lists what becomes of each field TRL's loss reads.
    """

    _tag_names = ["trl", "sspo"]

    def __init__(self, model, reward_funcs, args: GRPOConfig | None = None, **kwargs):
        if args is None:
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "model")
            args = SSPOConfig(f"{str(name).split('/')[-1]}-SSPO")
        self.objective = objective_from_args(args)
        if self.objective is not None:
            unsupported = {
                "top_entropy_quantile": args.top_entropy_quantile < 1.0,
                "off_policy_mask_threshold": args.off_policy_mask_threshold is not None,
                "entropy_coef": bool(getattr(args, "entropy_coef", 0.0)) or bool(getattr(args, "use_adaptive_entropy",
                                                                                       False)),
            }
            for key, bad in unsupported.items():
                if bad:
                    raise ValueError(f"{key}: not supported with the package objective loss_type={args.loss_type!r}; "
                                     "leave it at its default or use a TRL loss type")
            if self.objective.name == "vespo" and args.use_vllm and args.vllm_importance_sampling_correction:
                _warn_once("vespo-vllm", "vllm_importance_sampling_correction: package:vespo multiplies its per-token "
                           "loss by vLLM's ratio; TRL's own loss_type='vespo' puts the ratio inside phi(W)")
        super().__init__(model, reward_funcs, args=args, **kwargs)

    def _compute_loss(self, model, inputs):
        if self.objective is None:
            return super()._compute_loss(model, inputs)
        objective = self.objective
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        logits_to_keep = completion_ids.size(1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        per_token_logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model,
            input_ids,
            attention_mask,
            logits_to_keep,
            compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled,
            **{k: inputs.get(k) for k in ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                                          "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                                          "mm_token_type_ids", "image_position_ids")},
        )
        old_per_token_logps = inputs.get("old_per_token_logps")
        old_per_token_logps = per_token_logps.detach() if old_per_token_logps is None else old_per_token_logps

        t, log_ratio, adv, m = objective.terms(per_token_logps, old_per_token_logps, inputs["advantages"], mask)
        is_ratio = None
        if self.use_vllm and self.vllm_importance_sampling_correction:
            is_ratio = inputs["importance_sampling_ratio"]
        policy_loss = -objective.aggregate(weighted_surrogate(t.surrogate, is_ratio, m), m)
        loss = policy_loss
        if self.beta != 0.0:
            per_token_kl = self._per_token_kl(inputs["ref_per_token_logps"], per_token_logps, log_ratio, m)
            loss = loss + self.beta * objective.aggregate(per_token_kl.to(policy_loss.dtype), m)

        mode = "train" if self.model.training else "eval"
        if objective.agg == "token-mean":
            # As TRL's dapo: normalise by the tokens of the whole generation batch across processes.
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = normalizer * self.current_gradient_accumulation_steps / self.args.steps_per_generation
            loss = loss * m.sum().clamp(min=1).to(loss.dtype) / normalizer
        else:
            loss = loss / (self.current_gradient_accumulation_steps if mode == "train" else 1.0)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / (
                self.current_gradient_accumulation_steps if mode == "train" else 1.0)
            self._metrics[mode]["aux_loss"].append(self.accelerator.gather_for_metrics(aux_loss).mean().item())

        self._log_objective_metrics(mode, t, log_ratio, adv, m, policy_loss)
        self._metrics[mode]["entropy"].append(self._global_masked_mean(entropies, m))
        if self.beta != 0.0:
            self._metrics[mode]["kl"].append(self._global_masked_mean(per_token_kl, m))
        return loss

    def _per_token_kl(self, ref_logps: torch.Tensor, logps: torch.Tensor, log_ratio: torch.Tensor,
                      m: torch.Tensor) -> torch.Tensor:
        """TRL's k3 KL to the reference; with ``use_bias_correction_kl`` (TRL's default) times the importance
        ratio ``pi / pi_old`` at the objective's level (the token ratio, or the sequence's geometric mean), as TRL."""
        per_token_kl = k3_kl(ref_logps - logps)
        if not self.args.use_bias_correction_kl:
            return per_token_kl
        if self.objective.level == "sequence":
            return per_token_kl * geometric_mean_weight(log_ratio, m)[:, None]
        return per_token_kl * log_ratio.exp()

    def _log_objective_metrics(self, mode, t, log_ratio, adv, m, policy_loss) -> None:
        values = compute_metrics(t, log_ratio, adv, m, policy_loss)
        device = log_ratio.device
        local = torch.tensor(list(values.values()), dtype=torch.float32, device=device)
        per_process = self.accelerator.gather(local[None])  # (num_processes, n_metrics)
        for key, value in zip(values, per_process.reshape(-1, len(values)).mean(0).tolist()):
            self._metrics[mode][f"objective/{key}"].append(value)
        self._log_clip_ratios(mode, t, m)

    def _log_clip_ratios(self, mode, t, m) -> None:
        """TRL's ``clip_ratio/*`` metrics from the objective's clip flags (zero for a soft gate: nothing is cut).

        As TRL's: the token fractions cut below (``low_mean``), above (``high_mean``) or either
        (``region_mean``) over every process's tokens, and the extreme per-sequence fractions.
        """
        def token_flags(flags):  # (B, T), or (B,) for a per-sequence cut
            if flags is None:
                return torch.zeros_like(m, dtype=torch.bool)
            return (flags[:, None] if flags.dim() == 1 else flags).bool().expand_as(m)

        low, high = token_flags(t.clipped_low), token_flags(t.clipped_high)
        for key, flags in (("low", low), ("high", high), ("region", low | high)):
            self._metrics[mode][f"clip_ratio/{key}_mean"].append(self._global_masked_mean(flags.float(), m))
        count = m.sum(-1)
        for key, flags, reduce in (("low_min", low, torch.min), ("high_max", high, torch.max)):
            per_seq = torch.where(count > 0, masked_sum(flags.float(), m, dim=-1) / count.clamp(min=1), torch.nan)
            gathered = self.accelerator.gather(per_seq)
            finite = gathered[~torch.isnan(gathered)]
            self._metrics[mode][f"clip_ratio/{key}"].append(reduce(finite).item() if finite.numel() else float("nan"))

    def _global_masked_mean(self, x: torch.Tensor, m: torch.Tensor) -> float:
        """Mean of ``x`` over the unmasked tokens of every process (sums reduced, then divided)."""
        total = masked_sum(x.detach(), m)
        sums = torch.stack([total, m.sum().to(total.dtype)])
        totals = self.accelerator.reduce(sums, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

