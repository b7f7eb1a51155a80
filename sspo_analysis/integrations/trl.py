"""The package's objectives inside TRL's ``GRPOTrainer`` (TRL 1.16.x).

:class:`SSPOConfig` and :class:`SSPOTrainer` subclass ``GRPOConfig`` and
``GRPOTrainer`` the way ``trl.experimental.gmpo`` does: only ``_compute_loss``
changes. ``loss_type`` takes

- TRL's own types (``grpo``, ``bnpo``, ``dr_grpo``, ``dapo``, ``cispo``, ``sapo``,
  ``luspo``, ``vespo``): passed to TRL unchanged;
- ``sspo``, ``sspo-sigmoid``, ``gmpo``, ``gspo``, ``pg``: the package's objective of that name;
- ``soft-<gate>`` / ``soft-<gate>-one-sided``: ``sspo`` with that log-space gate family;
- ``package:<name>``: any registered package objective, also those whose name TRL
  uses too (``package:grpo`` is the package's GRPO, ``grpo`` is TRL's).

A package objective's parameters are config fields (``gate``, ``tau_pos``,
``tau_neg``, ``one_sided``, ``eps_lo``, ``eps_hi``, ``eps_max``); unset ones take
the objective's defaults (``get_spec(name).defaults``), not TRL's ``epsilon``.
``objective_agg`` picks the aggregation (default: the objective's own), and
``objective_horizon`` the constant of ``seq-mean-token-sum-norm`` (default
``max_completion_length``, as TRL's ``dr_grpo``). Data parallelism and gradient
accumulation follow TRL's conventions: ``token-mean`` normalises by the tokens of
the whole generation batch across processes (as TRL's ``dapo``), the other modes
by the local batch and the accumulation steps (as TRL's ``grpo`` and ``dr_grpo``).

Every package metric is logged into TRL's metrics as ``objective/<key>``
(``objective/gate_weight_mean``, ``objective/dead_frac``,
``objective/seq_weight_mean``, ``objective/seq_weight_var``,
``objective/ess_frac``, ...), averaged over processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from sspo_analysis.integrations import SOFT_NAMES, check_engine_version, soft_loss, weighted_surrogate
from sspo_analysis.integrations.rewards import code_reward, make_code_reward  # noqa: F401  (re-exported for reward_funcs)
from sspo_analysis.objectives import AGG_MODES, Objective, compute_metrics, get_objective, get_spec, objective_names
from sspo_analysis.primitives import k3_kl, masked_sum

TRL_MIN, TRL_MAX = "1.16", "1.17"
"""Tested TRL range: ``>= 1.16, < 1.17`` (``_compute_loss`` is private and moves between minors)."""

TRL_LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
"""TRL 1.16's own loss types: passed through to ``GRPOTrainer`` unchanged."""

PACKAGE_PREFIX = "package:"

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
    if loss_type in TRL_LOSS_TYPES:
        return None
    name = loss_type[len(PACKAGE_PREFIX):] if loss_type.startswith(PACKAGE_PREFIX) else loss_type
    soft = soft_loss(name)  # soft-NAME[-one-sided]: built-in gates, registered user gates, import paths
    if soft is not None:
        return soft
    if name in objective_names():
        return name, {}
    allowed = list(TRL_LOSS_TYPES) + [n for n in objective_names() if n not in TRL_LOSS_TYPES] + list(SOFT_NAMES)
    raise ValueError(
        f"loss_type: unknown value {loss_type!r}; allowed values: {', '.join(allowed)}, "
        f"or {PACKAGE_PREFIX}<objective> for any of {', '.join(objective_names())}"
    )


def trl_equivalent(loss_type: str, args: Any) -> Objective:
    """The package objective that computes TRL's ``loss_type`` with ``args``' parameters.

    ``args`` needs TRL's ``epsilon``, ``epsilon_high``, ``sapo_temperature_pos`` /
    ``_neg``, ``importance_sampling_level`` and ``max_completion_length``. With
    ``importance_sampling_level="sequence"``, ``grpo`` is the package's ``gspo``.
    The match is exact for every batch without empty completions; the README's
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


_PARAM_FIELDS = ("gate", "tau_pos", "tau_neg", "one_sided", "eps_lo", "eps_hi", "eps_max")


@dataclass
class SSPOConfig(GRPOConfig):
    r"""``GRPOConfig`` whose ``loss_type`` also takes the package's objectives.

    Parameters (besides all of ``GRPOConfig``'s):
        loss_type (`str`, defaults to `"sspo"`): a TRL loss type, a package objective
            (``sspo``, ``sspo-sigmoid``, ``gmpo``, ``gspo``, ``pg``), ``soft-<gate>``,
            ``soft-<gate>-one-sided`` or ``package:<objective>``.
        objective_agg (`str`, optional): aggregation of a package objective, one of
            ``seq-mean-token-mean``, ``token-mean``, ``seq-mean-token-sum``,
            ``seq-mean-token-sum-norm``; default the objective's own.
        objective_horizon (`int`, optional): constant of ``seq-mean-token-sum-norm``;
            default ``max_completion_length``.
        gate, tau_pos, tau_neg, one_sided, eps_lo, eps_hi, eps_max: the objective's
            parameters; ``None`` keeps the objective's default.
    """

    loss_type: str = field(
        default="sspo",
        metadata={"help": "A TRL loss type (grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo) or a package "
                  "objective: sspo, sspo-sigmoid, gmpo, gspo, pg, soft-<gate>[-one-sided], package:<objective>."},
    )
    objective_agg: str | None = field(
        default=None, metadata={"help": f"Aggregation of a package objective: {', '.join(AGG_MODES)}."})
    objective_horizon: int | None = field(
        default=None, metadata={"help": "Horizon of seq-mean-token-sum-norm (default: max_completion_length)."})
    gate: str | None = field(default=None, metadata={"help": "Gate family (sspo: log space; sapo: ratio space)."})
    tau_pos: float | None = field(default=None, metadata={"help": "Gate temperature for A > 0."})
    tau_neg: float | None = field(default=None, metadata={"help": "Gate temperature for A <= 0."})
    one_sided: bool | None = field(default=None, metadata={"help": "sspo: gate only the side sign(A) makes risky."})
    eps_lo: float | None = field(default=None, metadata={"help": "Lower clip range (grpo, dapo, gspo, gmpo)."})
    eps_hi: float | None = field(default=None, metadata={"help": "Upper clip range (grpo, dapo, gspo, gmpo)."})
    eps_max: float | None = field(default=None, metadata={"help": "cispo: cap of the importance weight."})

    def __post_init__(self):
        super().__post_init__()
        if self.objective_agg is not None and self.objective_agg not in AGG_MODES:
            raise ValueError(
                f"objective_agg: unknown value {self.objective_agg!r}; allowed values: {', '.join(AGG_MODES)}")
        self.package_objective()  # validate the loss type and parameters now, not at the first step

    def package_objective(self) -> Objective | None:
        """The package objective this config selects, or ``None`` for a TRL loss type."""
        resolved = resolve_loss_type(self.loss_type)
        if resolved is None:
            return None
        name, params = resolved
        accepted = get_spec(name).defaults
        for key in _PARAM_FIELDS:
            value = getattr(self, key)
            if value is None:
                continue
            if key not in accepted:
                raise ValueError(f"{key}: not a parameter of objective {name!r} (loss_type={self.loss_type!r}); "
                                 f"its parameters: {', '.join(accepted) or '(none)'}")
            if key in params and params[key] != value:
                raise ValueError(f"{key}: loss_type={self.loss_type!r} fixes {key}={params[key]!r}, got {value!r}")
            params[key] = value
        agg = self.objective_agg or get_spec(name).agg
        horizon = None
        if agg == "seq-mean-token-sum-norm":
            horizon = self.objective_horizon if self.objective_horizon is not None else self.max_completion_length
        return get_objective(name, agg=agg, horizon=horizon, **params)


def objective_from_args(args: GRPOConfig) -> Objective | None:
    """The package objective ``args`` selects (``None`` for TRL's loss types).

    A plain ``GRPOConfig`` may name a package objective too; it then runs with the
    objective's default parameters and aggregation.
    """
    if isinstance(args, SSPOConfig):
        return args.package_objective()
    resolved = resolve_loss_type(args.loss_type)
    if resolved is None:
        return None
    name, params = resolved
    return get_objective(name, **params)


class SSPOTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose loss is a package objective when ``args.loss_type`` names one.

    TRL's own loss types run TRL's ``_compute_loss`` unchanged. For a package
    objective, the loss is ``Objective.terms`` + ``Objective.aggregate`` on TRL's
    per-token log-probs, with TRL's KL term (``beta``), vLLM importance-sampling
    correction (token weights; sequence objectives get their geometric mean),
    MoE auxiliary loss, data-parallel and gradient-accumulation normalisation.
    Not supported with a package objective (a ValueError says so):
    ``top_entropy_quantile < 1``, ``off_policy_mask_threshold``, the entropy bonus.
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
            ref = inputs["ref_per_token_logps"]
            per_token_kl = k3_kl(ref - per_token_logps)
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

    def _log_objective_metrics(self, mode, t, log_ratio, adv, m, policy_loss) -> None:
        values = compute_metrics(t, log_ratio, adv, m, policy_loss)
        device = log_ratio.device
        local = torch.tensor(list(values.values()), dtype=torch.float32, device=device)
        per_process = self.accelerator.gather(local[None])  # (num_processes, n_metrics)
        for key, value in zip(values, per_process.reshape(-1, len(values)).mean(0).tolist()):
            self._metrics[mode][f"objective/{key}"].append(value)

    def _global_masked_mean(self, x: torch.Tensor, m: torch.Tensor) -> float:
        """Mean of ``x`` over the unmasked tokens of every process (sums reduced, then divided)."""
        total = masked_sum(x.detach(), m)
        sums = torch.stack([total, m.sum().to(total.dtype)])
        totals = self.accelerator.reduce(sums, reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

