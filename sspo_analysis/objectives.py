"""Policy-optimisation objectives as plain functions, behind one registry.

Each objective is a function of the (clamped, masked) token log-ratio
``l = log pi_theta - log pi_old``, the advantages and the mask, registered with
:func:`register_objective`. It returns :class:`Terms`: the surrogate ``J`` to
maximise (per token, or per sequence for sequence-level objectives) and, from
its own closed form, the gradient coefficient ``c`` (``docs/theory.md``, section 2)::

    grad J = sum_{i,t} n_{i,t} * c_{i,t} * grad log pi_theta(y_{i,t})

where ``n`` is the aggregation's normalisation (:meth:`Objective.normalisation`).
:class:`Objective` wraps a registered function with its parameters and an
aggregation mode, and computes the loss and the metrics. The trainer and the
engine integrations go through :func:`get_objective`; the theory and the
simulators through :func:`resolve_objective`, which also knows the reference
estimators ``is-token`` and ``is-seq`` (registered with ``reference=True``:
yardsticks for the theory, not offered for training).

Adding an objective is one function and one decorator::

    @register_objective("my-pg", level="token", agg="token-mean", defaults={"beta": 1.0})
    def my_pg(log_ratio, adv, mask, *, beta):
        r = log_ratio.exp()
        return Terms(surrogate=beta * r * adv, coefficient=beta * r.detach() * adv, weight=r)

The objective also declares there which analytic methods the theory may use
for it (``theory=("quadrature",)``, or ``theory={"closed-form": hook}``); see
:func:`register_objective`. Monte Carlo needs no declaration.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from sspo_analysis import gates
from sspo_analysis.primitives import (
    LOG_RATIO_CLAMP,
    clamp_log_ratio,
    geometric_mean_weight,
    k3_kl,
    masked_mean,
    masked_sum,
    masked_var,
    reduce_dtype,
    sequence_mean,
)

__all__ = [
    "AGG_MODES",
    "LOG_RATIO_CLAMP",
    "REFERENCE_ESTIMATORS",
    "THEORY_METHODS",
    "Objective",
    "ObjectiveSpec",
    "Terms",
    "all_objective_names",
    "check_parameters_read",
    "compute_metrics",
    "get_objective",
    "get_spec",
    "objective_names",
    "read_parameters",
    "register_objective",
    "resolve_objective",
    "unread_parameters",
]

Tensor = torch.Tensor

AGG_MODES: tuple[str, ...] = (
    "seq-mean-token-mean",
    "token-mean",
    "seq-mean-token-sum",
    "seq-mean-token-sum-norm",
)
TOKEN_SUM_MODES = ("seq-mean-token-sum", "seq-mean-token-sum-norm")


class Terms(NamedTuple):
    """What an objective function returns.

    - ``surrogate``: ``J`` to maximise, differentiable in the log-ratio;
      shape (B, T) for token-level objectives, (B,) for sequence-level ones.
    - ``coefficient``: analytic gradient coefficient ``c``, shape (B, T), detached.
    - ``weight``: the importance weight: token ratio (B, T) or sequence weight (B,).
    - ``gate_weight``: per-token multiplier of the gradient from gating/clipping (B, T).
    - ``clipped_low`` / ``clipped_high``: bool (B, T), tokens whose gradient was cut
      by the lower / upper bound.
    """

    surrogate: Tensor
    coefficient: Tensor
    weight: Tensor
    gate_weight: Tensor | None = None
    clipped_low: Tensor | None = None
    clipped_high: Tensor | None = None


LogGate = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
"""``(l, positive_advantage) -> (phi(l), phi'(l))`` of a geometric-mean objective."""


THEORY_METHODS: tuple[str, ...] = ("closed-form", "quadrature", "monte-carlo")
"""The methods an objective may declare for the theory (Monte Carlo is available without a declaration)."""

TheoryHook = Callable[..., Any] | str
"""A theory method's implementation for one objective: a function, or its ``"module:function"`` path."""


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registry entry: the function and its metadata (see :func:`register_objective`)."""

    name: str
    fn: Callable[..., Terms]
    level: str
    agg: str
    defaults: dict[str, Any]
    make_log_gate: Callable[..., LogGate] | None = None
    theory: dict[str, TheoryHook | None] = field(default_factory=dict)
    reference: bool = False
    needs_log_prob: bool = False  # the function also takes ``log_prob=`` (clip-cov, kl-cov)


_REGISTRY: dict[str, ObjectiveSpec] = {}
_REFERENCES: dict[str, ObjectiveSpec] = {}


def register_objective(
    name: str,
    *,
    level: str,
    agg: str,
    defaults: dict[str, Any] | None = None,
    log_gate: Callable[..., LogGate] | None = None,
    theory: tuple[str, ...] | dict[str, TheoryHook | None] = (),
    reference: bool = False,
    needs_log_prob: bool = False,
) -> Callable[[Callable[..., Terms]], Callable[..., Terms]]:
    """Register ``fn(log_ratio, adv, mask, **params) -> Terms`` under ``name``.

    Args:
        name: registry key, used by ``get_objective``, the CLI and the engines.
        level: ``"token"`` or ``"sequence"``.
        agg: default aggregation mode (one of :data:`AGG_MODES`).
        defaults: every parameter the function takes, with its default.
        log_gate: for geometric-mean objectives, a factory ``(**params) -> LogGate``
            so that the theory can integrate the per-token gate directly.
        needs_log_prob: the function also takes ``log_prob`` (the current
            log-probabilities, detached, zero where masked), for objectives that
            rank tokens by them (``clip-cov``, ``kl-cov``).
        theory: the methods of :mod:`sspo_analysis.theory` that hold for this
            objective under the log-normal model, in order of preference: a
            tuple of :data:`THEORY_METHODS` (the generic implementation of each)
            or a dict ``{method: hook}`` (``None`` for the generic one). A hook
            is a function or its ``"module:function"`` path, imported by the
            theory on first use (so a hook written in the theory layer needs no
            import here). ``auto`` takes the first analytic method that applies,
            else Monte Carlo, which every objective has.

            - ``"closed-form"`` (a hook is required):
              ``hook(params, grid, sign) -> {stat: array}``, the six statistics of
              ``sspo_analysis.theory.STATS`` over a
              :class:`sspo_analysis.theory.closed_forms.LogNormalGrid`
              (``grid.correlation`` may be non-zero), ``sign`` +1 or -1.
            - ``"quadrature"``: generic, the objective's own code on the nodes of
              one token (token objectives, any correlation; the weight is taken
              to be the ratio ``r``) or its ``log_gate`` (geometric means), used
              while the ``gate`` parameter, if any, is smooth; or
              ``hook(objective, grid, sign, quad_nodes) -> {stat: array}``.
            - ``"monte-carlo"``: only to replace the generic sampler,
              ``hook(objective, model, sign, n_samples, seed) -> (stats, stderr)``.

            An objective with a ``log_gate``, and a quadrature hook, are used
            under independent tokens only (Monte Carlo otherwise).
        reference: a yardstick for the theory and the simulators
            (:func:`resolve_objective`), not a training objective: left out of
            :func:`objective_names` and :func:`get_objective`.

    Example: ``theory=("quadrature",)`` for a smooth token objective;
    ``theory={"closed-form": "my_pkg.theory:my_moments"}`` for one with a known
    closed form.
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"level: unknown value {level!r}; allowed values: token, sequence")
    if agg not in AGG_MODES:
        raise ValueError(f"agg: unknown value {agg!r}; allowed values: {', '.join(AGG_MODES)}")
    methods = _check_theory(theory, level, log_gate is not None)

    def decorator(fn: Callable[..., Terms]) -> Callable[..., Terms]:
        spec = ObjectiveSpec(name, fn, level, agg, dict(defaults or {}), log_gate, methods, reference, needs_log_prob)
        (_REFERENCES if reference else _REGISTRY)[name] = spec
        return fn

    return decorator


def _check_theory(theory: Any, level: str, has_log_gate: bool) -> dict[str, TheoryHook | None]:
    """The ``theory`` declaration as ``{method: hook or None}``, or a ValueError naming what is wrong."""
    if isinstance(theory, str) or not isinstance(theory, (tuple, list, dict)):
        raise ValueError(f"theory: expected a tuple or a dict of {', '.join(THEORY_METHODS)}, got {theory!r}")
    methods = dict(theory) if isinstance(theory, dict) else dict.fromkeys(theory)
    unknown = [m for m in methods if m not in THEORY_METHODS]
    if unknown:
        raise ValueError(f"theory: unknown method(s) {', '.join(map(repr, unknown))}; "
                         f"allowed values: {', '.join(THEORY_METHODS)}")
    if "closed-form" in methods and methods["closed-form"] is None:
        raise ValueError("theory: 'closed-form' needs its hook, e.g. {'closed-form': 'my_pkg.theory:moments'}")
    if methods.get("quadrature", "hook") is None and level == "sequence" and not has_log_gate:
        raise ValueError("theory: the generic 'quadrature' of a sequence objective integrates its log_gate; "
                         "give log_gate or a quadrature hook")
    return methods


def objective_names() -> tuple[str, ...]:
    """Names of every registered training objective (the reference estimators are not among them)."""
    return tuple(_REGISTRY)


def all_objective_names() -> tuple[str, ...]:
    """The training objectives followed by the reference estimators the theory adds."""
    return objective_names() + tuple(n for n in _REFERENCES if n not in _REGISTRY)


def get_spec(name: str, *, include_references: bool = False) -> ObjectiveSpec:
    """The registry entry of ``name``; reference estimators only with ``include_references``."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if include_references and name in _REFERENCES:
        return _REFERENCES[name]
    allowed = all_objective_names() if include_references else objective_names()
    raise ValueError(f"objective: unknown name {name!r}; allowed values: {', '.join(allowed)}")


# --------------------------------------------------------------------------- helpers


def _by_sign(side: Tensor, pos: float, neg: float, like: Tensor) -> Tensor:
    """``pos`` where ``side`` is True, else ``neg``, in ``like``'s shape and dtype (a parameter per sign of A)."""
    return torch.where(side, torch.full_like(like, pos), torch.full_like(like, neg))


def _sign_select(adv: Tensor, pos: float, neg: float) -> Tensor:
    """Per-element parameter chosen by the advantage's sign (``A > 0`` -> ``pos``)."""
    return _by_sign(adv > 0, pos, neg, adv)


def _token_count(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """Unmasked tokens per sequence (B,), at least 1 so that an empty sequence divides safely."""
    return mask.sum(-1).clamp(min=1).to(dtype)


def _ppo_clip(ratio: Tensor, adv: Tensor, eps_lo: float, eps_hi: float) -> Terms:
    """``min(r A, clip(r, 1-eps_lo, 1+eps_hi) A)``; ``r`` of any shape broadcasting with ``adv``."""
    clipped = ratio.clamp(1.0 - eps_lo, 1.0 + eps_hi)
    surrogate = torch.minimum(ratio * adv, clipped * adv)
    high = (adv > 0) & (ratio > 1.0 + eps_hi)
    low = (adv < 0) & (ratio < 1.0 - eps_lo)
    kept = ~(high | low)
    coefficient = (adv * ratio * kept).detach()
    return Terms(surrogate, coefficient, ratio, kept.to(ratio.dtype), low, high)


def _geometric_mean(log_ratio: Tensor, adv: Tensor, mask: Tensor, log_gate: LogGate) -> Terms:
    """``w_i A_i`` with ``w_i = exp(mean_t phi(l_t))``: GMPO, SSPO and variants.

    ``adv`` is (B,), already reduced per sequence.
    """
    positive = (adv > 0)[:, None].expand_as(log_ratio)
    phi, dphi = log_gate(log_ratio, positive)
    n = _token_count(mask, log_ratio.dtype)
    w = geometric_mean_weight(phi, mask)
    dphi = torch.where(mask, dphi, 0.0)
    coefficient = (adv[:, None] * w[:, None] * dphi / n[:, None]).detach()
    return Terms(w * adv, coefficient, w, dphi.detach())


# --------------------------------------------------------------------------- objectives


@register_objective(
    "pg",
    level="token",
    agg="seq-mean-token-mean",
    theory={"closed-form": "sspo_analysis.theory.closed_forms:on_policy"},
)
def pg(log_ratio: Tensor, adv: Tensor, mask: Tensor) -> Terms:
    """On-policy policy gradient, ``A * l`` with ``pi_old = sg[pi_theta]``: ``c = A``.

    The old log-probs are ignored: the gradient is that of the current policy.
    """
    lp = log_ratio - log_ratio.detach()  # zero value, unit gradient
    return Terms(adv * lp, adv.detach(), torch.ones_like(log_ratio))


@register_objective(
    "grpo",
    level="token",
    agg="seq-mean-token-mean",
    defaults={"eps_lo": 0.2, "eps_hi": 0.2},
    theory={"closed-form": "sspo_analysis.theory.closed_forms:ppo_clip"},
)
def grpo(log_ratio: Tensor, adv: Tensor, mask: Tensor, *, eps_lo: float, eps_hi: float) -> Terms:
    """PPO-clip per token: ``c = A r 1[kept]``."""
    return _ppo_clip(log_ratio.exp(), adv, eps_lo, eps_hi)


# DAPO is GRPO's function with clip-higher (eps_hi = 0.28) and token-mean aggregation.
dapo = register_objective(
    "dapo",
    level="token",
    agg="token-mean",
    defaults={"eps_lo": 0.2, "eps_hi": 0.28},
    theory={"closed-form": "sspo_analysis.theory.closed_forms:ppo_clip"},
)(grpo)


@register_objective(
    "cispo",
    level="token",
    agg="token-mean",
    defaults={"eps_max": 5.0},
    theory={"closed-form": "sspo_analysis.theory.closed_forms:truncated_ratio"},
)
def cispo(log_ratio: Tensor, adv: Tensor, mask: Tensor, *, eps_max: float) -> Terms:
    """Clipped IS-weight policy optimisation: ``sg[min(r, eps_max)] A l``; ``c = A min(r, eps_max)``."""
    ratio = log_ratio.exp()
    truncated = ratio.clamp(max=eps_max).detach()
    high = ratio > eps_max
    return Terms(
        truncated * adv * log_ratio,
        (adv * truncated).detach(),
        ratio,
        torch.where(high, eps_max / ratio, 1.0).detach(),
        torch.zeros_like(high),
        high,
    )


@register_objective(
    "sapo",
    level="token",
    agg="seq-mean-token-mean",
    defaults={"gate": "sigmoid", "tau_pos": 1.0, "tau_neg": 1.05},
    theory=("quadrature",),
)
def sapo(log_ratio: Tensor, adv: Tensor, mask: Tensor, *, gate: str, tau_pos: float, tau_neg: float) -> Terms:
    """Token soft gate in ratio space: ``f_tau(r) A``; ``c = A r g'(r - 1)``.

    With ``gate="sigmoid"`` the value is SAPO's ``(4/tau) sigmoid(tau (r-1)) A``
    (the family's ``(2/tau) tanh`` plus the constant ``2/tau``); other families
    use ``(1 + g(r - 1)) A``, which equals PPO's ``r A`` on-policy.
    """
    ratio = log_ratio.exp()
    tau = _sign_select(adv, tau_pos, tau_neg).to(ratio.dtype)
    g = gates.get_gate(gate, tau=tau, space="ratio")
    u = ratio - 1.0
    if g.name == "sigmoid":
        value = (4.0 / tau) * torch.sigmoid(tau * u)
    else:
        value = 1.0 + g(u)
    weight = g.weight(u)
    return Terms(value * adv, (adv * ratio * weight).detach(), ratio, weight.detach())


@register_objective(
    "gspo",
    level="sequence",
    agg="seq-mean-token-mean",
    defaults={"eps_lo": 3e-4, "eps_hi": 4e-4},
    theory={"closed-form": "sspo_analysis.theory.closed_forms:sequence_ppo_clip"},
)
def gspo(log_ratio: Tensor, adv: Tensor, mask: Tensor, *, eps_lo: float, eps_hi: float) -> Terms:
    """Sequence-level PPO-clip on ``s_i = exp(mean_t l)``; ``c = A s_i 1[kept_i] / T_i``."""
    n = _token_count(mask, log_ratio.dtype)
    s = geometric_mean_weight(log_ratio, mask)
    t = _ppo_clip(s, adv, eps_lo, eps_hi)
    coefficient = torch.where(mask, t.coefficient[:, None] / n[:, None], 0.0)
    kept = t.gate_weight[:, None].expand_as(log_ratio)
    return Terms(t.surrogate, coefficient, s, kept, t.clipped_low[:, None] & mask, t.clipped_high[:, None] & mask)


def _gmpo_log_gate(eps_lo: float, eps_hi: float) -> LogGate:
    # The hard clip to [-eps_lo, eps_hi] in log space, on the side sign(A) makes dangerous only:
    # A > 0 clips the top, A < 0 the bottom.
    clip = gates.get_gate("hard-clip", eps=(eps_lo, eps_hi))

    def log_gate(l: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
        return gates.one_sided(clip, l, positive)

    return log_gate


@register_objective(
    "gmpo",
    level="sequence",
    agg="seq-mean-token-mean",
    defaults={"eps_lo": 0.4, "eps_hi": 0.4},
    log_gate=_gmpo_log_gate,
    theory={"closed-form": "sspo_analysis.theory.closed_forms:gmpo"},
)
def gmpo(log_ratio: Tensor, adv: Tensor, mask: Tensor, *, eps_lo: float, eps_hi: float) -> Terms:
    """Geometric mean of token ratios, hard-clipped in log space on the side set by ``sign(A)``."""
    t = _geometric_mean(log_ratio, adv, mask, _gmpo_log_gate(eps_lo, eps_hi))
    # A token is clipped where the gate cut its gradient; A = 0 counts on neither side.
    cut = (t.gate_weight == 0) & mask
    return t._replace(clipped_low=cut & (adv < 0)[:, None], clipped_high=cut & (adv > 0)[:, None])


def _sspo_log_gate(gate: str, tau_pos: float, tau_neg: float, one_sided: bool, eps_lo: float, eps_hi: float) -> LogGate:
    def log_gate(l: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
        tau = _by_sign(positive, tau_pos, tau_neg, l)
        g = gates.get_gate(gate, tau=tau, eps=(eps_lo, eps_hi), space="log")
        if one_sided:
            return gates.one_sided(g, l, positive)
        return g(l), g.weight(l)

    return log_gate


@register_objective(
    "sspo",
    level="sequence",
    agg="seq-mean-token-mean",
    defaults={"gate": "arctan", "tau_pos": 1.0, "tau_neg": 1.05, "one_sided": False, "eps_lo": 0.2, "eps_hi": 0.2},
    log_gate=_sspo_log_gate,
    theory=("quadrature",),
)
def sspo(  # noqa: PLR0913 - the registry passes each of the paper's parameters by name
    log_ratio: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    gate: str,
    tau_pos: float,
    tau_neg: float,
    one_sided: bool,
    eps_lo: float,
    eps_hi: float,
) -> Terms:
    """Soft sequence policy optimisation: ``w_i = exp(mean_t phi_tau(l_t))``; ``c = A w_i phi'(l) / T_i``.

    A reconstruction (see docs/objectives.md): ``phi`` is a log-space gate of any family,
    ``arctan`` by default, its temperature chosen by ``sign(A)``. ``eps_lo`` /
    ``eps_hi`` are used only by ``gate="hard-clip"`` (the range ``[-eps_lo, eps_hi]``
    in log space; with ``one_sided=True`` that is GMPO).
    """
    log_gate = _sspo_log_gate(gate, tau_pos, tau_neg, one_sided, eps_lo, eps_hi)
    return _geometric_mean(log_ratio, adv, mask, log_gate)


def _sspo_sigmoid_log_gate(tau_pos: float, tau_neg: float) -> LogGate:
    def log_gate(l: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
        tau = _by_sign(positive, tau_pos, tau_neg, l)
        z = tau * torch.expm1(l)  # tau (r - 1)
        # log(f_tau(r) / f_tau(1)) = log(2 sigmoid(z)); derivative in l: tau r (1 - sigmoid(z)).
        return F.logsigmoid(z) + math.log(2.0), tau * l.exp() * torch.sigmoid(-z)

    return log_gate


@register_objective(
    "sspo-sigmoid",
    level="sequence",
    agg="seq-mean-token-mean",
    defaults={"tau_pos": 1.0, "tau_neg": 1.05},
    log_gate=_sspo_sigmoid_log_gate,
    theory=("quadrature",),
)
def sspo_sigmoid(log_ratio: Tensor, adv: Tensor, mask: Tensor, *, tau_pos: float, tau_neg: float) -> Terms:
    """Geometric mean of SAPO's ratio-space gates: ``w_i = exp(mean_t log(f(r)/f(1)))``.

    Its on-policy coefficient is ``tau/2`` times GSPO's: only ``tau = 2`` is admissible.
    """
    return _geometric_mean(log_ratio, adv, mask, _sspo_sigmoid_log_gate(tau_pos, tau_neg))


# --------------------------------------------------------------------------- reference estimators

REFERENCE_ESTIMATORS: tuple[str, ...] = ("pg", "is-token", "is-seq")
"""The theory's yardsticks: on-policy ``pg`` (also a training objective) and the two importance samplers."""

SEQ_LOG_WEIGHT_CLAMP = 4.0 * LOG_RATIO_CLAMP
"""``is-seq`` clamps ``sum_t l`` to ``[-80, 80]`` before ``exp``; a token clamp would be meaningless for a sum."""


@register_objective(
    "is-token",
    level="token",
    agg="seq-mean-token-mean",
    theory={"closed-form": "sspo_analysis.theory.closed_forms:token_ratio"},
    reference=True,
)
def is_token(log_ratio: Tensor, adv: Tensor, mask: Tensor) -> Terms:
    """Token importance sampling ``r A``: ``c = A r``."""
    r = log_ratio.exp()
    return Terms(r * adv, (adv * r).detach(), r)


@register_objective(
    "is-seq",
    level="sequence",
    agg="seq-mean-token-mean",
    theory={"closed-form": "sspo_analysis.theory.closed_forms:sequence_ratio"},
    reference=True,
)
def is_seq(log_ratio: Tensor, adv: Tensor, mask: Tensor) -> Terms:
    """Sequence importance sampling ``W A / T`` with ``W = exp(sum_t l)``: ``c = A W / T``.

    Unbiased off policy, with variance ``exp(L s^2) - 1`` under the log-normal
    model. The ``1 / T`` keeps the normalised coefficient ``c T / A = W``, so that
    it is 1 on-policy like every sequence-level objective's.
    """
    n = _token_count(mask, log_ratio.dtype)
    w = torch.where(mask, log_ratio, 0.0).sum(-1).clamp(-SEQ_LOG_WEIGHT_CLAMP, SEQ_LOG_WEIGHT_CLAMP).exp()
    coefficient = torch.where(mask, (adv * w / n)[:, None], 0.0).detach()
    return Terms(w * adv / n, coefficient, w)


# --------------------------------------------------------------------------- the wrapper


def _as_tensor(name: str, value: Any) -> Tensor:
    """A tensor, or a numpy array / nested list converted to one; else ValueError naming the argument."""
    if isinstance(value, Tensor):
        return value
    try:
        return torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"{name}: expected a torch.Tensor or numpy array, got {type(value).__name__}") from err


def _checked_inputs(log_prob: Any, old_log_prob: Any, advantages: Any, mask: Any) -> tuple[Tensor, ...]:
    """The four inputs as tensors; a mask must be boolean or exactly 0/1, advantages finite (else ValueError;
    :meth:`Objective.terms` checks ``old_log_prob`` under the mask once the shapes agree)."""
    log_prob, old_log_prob = _as_tensor("log_prob", log_prob), _as_tensor("old_log_prob", old_log_prob)
    advantages, mask = _as_tensor("advantages", advantages), _as_tensor("mask", mask)
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask: must be boolean or exactly 0/1; got other values (a soft mask is not supported)")
        mask = mask.bool()
    if not advantages.is_floating_point() and advantages.dtype != torch.bool:
        advantages = advantages.double()
    if not bool(torch.isfinite(advantages).all()):
        raise ValueError("advantages: must be finite; got NaN or inf")
    return log_prob, old_log_prob, advantages, mask


def _as_token_advantages(advantages: Tensor, shape: torch.Size) -> Tensor:
    if advantages.dim() == 1:
        if advantages.shape[0] != shape[0]:
            raise ValueError(f"advantages: shape {tuple(advantages.shape)} does not match batch size {shape[0]}")
        return advantages[:, None].expand(shape)
    if advantages.shape != shape:
        raise ValueError(f"advantages: shape {tuple(advantages.shape)}; allowed: ({shape[0]},) or {tuple(shape)}")
    return advantages


@dataclass
class Objective:
    """A registered objective bound to its parameters and an aggregation mode.

    Call it as ``objective(log_prob, old_log_prob, advantages, mask)`` to get
    ``(loss, metrics)``; ``loss`` is the scalar to minimise (``-J``).
    """

    name: str
    params: dict[str, Any]
    agg: str
    horizon: int | None = None
    spec: ObjectiveSpec = field(repr=False, default=None)  # type: ignore[assignment]

    @property
    def level(self) -> str:
        return self.spec.level

    @property
    def log_gate(self) -> LogGate | None:
        """``(l, positive) -> (phi, phi')`` for geometric-mean objectives, else None."""
        return self.spec.make_log_gate(**self.params) if self.spec.make_log_gate else None

    # -- core
    def terms(
        self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, mask: Tensor
    ) -> tuple[Terms, Tensor, Tensor, Tensor]:
        """Evaluate the objective function; returns ``(terms, log_ratio, adv, mask)``.

        ``adv`` is (B, T) for token objectives and (B,) for sequence objectives
        (the masked token mean, which equals ``A_i`` for sequence advantages).
        """
        log_prob, old_log_prob, advantages, mask = _checked_inputs(log_prob, old_log_prob, advantages, mask)
        if log_prob.shape != old_log_prob.shape or log_prob.shape != mask.shape or log_prob.dim() != 2:
            raise ValueError(
                "log_prob, old_log_prob, mask: must share one (B, T) shape; got "
                f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(mask.shape)}"
            )
        dtype = reduce_dtype(log_prob, old_log_prob)
        mask = mask.bool()
        if not bool(torch.isfinite(old_log_prob[mask]).all()):  # like the advantages: data, not a diverged policy
            raise ValueError("old_log_prob: must be finite where mask is true; got NaN or inf")
        diff = log_prob.to(dtype) - old_log_prob.to(dtype)
        # where, not multiply: a masked inf must not become inf * 0 = nan.
        log_ratio = clamp_log_ratio(torch.where(mask, diff, 0.0))
        adv = torch.where(mask, _as_token_advantages(advantages, log_prob.shape).to(dtype), 0.0)
        if self.level == "sequence":
            adv = sequence_mean(adv, mask)
        extra = {"log_prob": torch.where(mask, log_prob.detach().to(dtype), 0.0)} if self.spec.needs_log_prob else {}
        t = self.spec.fn(log_ratio, adv, mask, **self.params, **extra)
        zero = torch.zeros((), dtype=dtype)
        t = t._replace(coefficient=torch.where(mask, t.coefficient, zero))
        return t, log_ratio, adv, mask

    def token_weights(self, mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """Weight of each token's surrogate in the loss under the aggregation mode (B, T)."""
        m = mask.bool().to(dtype)
        n_tok = m.sum(-1, keepdim=True)
        n_seq = (n_tok > 0).sum().clamp(min=1)
        if self.agg == "seq-mean-token-mean":
            return m / n_tok.clamp(min=1.0) / n_seq
        if self.agg == "token-mean":
            return m / m.sum().clamp(min=1.0)
        if self.agg == "seq-mean-token-sum":
            return m / n_seq
        horizon = self.horizon if self.horizon is not None else mask.shape[-1]
        return m / (mask.shape[0] * horizon)  # seq-mean-token-sum-norm

    def normalisation(self, mask: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        """``n_{i,t}``: ``d loss / d log_prob = -n * c`` for this aggregation (B, T)."""
        per = self.token_weights(mask, dtype)
        if self.level == "sequence":
            # A sequence surrogate is broadcast to its tokens, so d loss / d J_i
            # collects the weights of all of them.
            per = per.sum(-1, keepdim=True) * mask.bool().to(dtype)
        return per

    def aggregate(self, surrogate: Tensor, mask: Tensor) -> Tensor:
        """Reduce a surrogate, (B, T) per token or (B,) per sequence, to the scalar ``J``."""
        per = self.token_weights(mask, surrogate.dtype)
        if surrogate.dim() == 1:
            return (surrogate * per.sum(-1)).sum()
        return torch.where(mask.bool(), surrogate, 0.0).mul(per).sum()

    def coefficient(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        """Analytic gradient coefficient ``c`` (B, T), zero on masked tokens."""
        with torch.no_grad():
            return self.terms(log_prob, old_log_prob, advantages, mask)[0].coefficient

    def loss(self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
        """The scalar loss alone (no metrics): what a training step differentiates."""
        t, _, _, mask = self.terms(log_prob, old_log_prob, advantages, mask)
        return -self.aggregate(t.surrogate, mask)

    def evaluate(
        self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[str, float], Terms]:
        """``(loss, metrics, terms)`` in one pass, for callers that also need ``terms.coefficient``."""
        t, log_ratio, adv, mask = self.terms(log_prob, old_log_prob, advantages, mask)
        loss = -self.aggregate(t.surrogate, mask)
        return loss, compute_metrics(t, log_ratio, adv, mask, loss), t

    def __call__(
        self, log_prob: Tensor, old_log_prob: Tensor, advantages: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[str, float]]:
        loss, metrics, _ = self.evaluate(log_prob, old_log_prob, advantages, mask)
        return loss, metrics


def compute_metrics(
    t: Terms, log_ratio: Tensor, adv: Tensor, mask: Tensor, loss: Tensor | None = None
) -> dict[str, float]:
    """Ratio, weight, gate and clipping statistics over unmasked tokens, as floats.

    ``dead_frac`` counts tokens whose advantage is non-zero but whose coefficient
    is zero (gradient removed by clipping); tokens with ``A = 0`` carry no signal
    under any objective and are left out, so the number measures the gate alone.
    ``coef_norm_mean`` / ``coef_norm_var`` are the moments of the coefficient
    normalised to 1 on-policy (``c / A`` per token, ``c T_i / A_i`` per
    sequence) over the same tokens: the measured counterparts of the theory's
    ``mean_coefficient`` and ``var_coefficient``.
    """
    with torch.no_grad():
        f32 = torch.float32
        lr = log_ratio.detach().to(f32)
        values = {
            "loss": loss.detach().to(f32) if loss is not None else torch.tensor(float("nan")),
            **_ratio_metrics(lr, mask),
            **_sequence_weight_metrics(t, lr, mask),
            **_coefficient_metrics(t, adv, mask),
            **_gate_metrics(t, lr, mask),
            "kl_old_k3": _mean32(k3_kl(lr), mask),
            "n_tokens": mask.sum().clamp(min=1).to(f32),
        }
        # float64 at the end: a normalised coefficient over a tiny A (kl-cov's A-free penalty) squares past f32.
        stacked = torch.stack([v.to(torch.float64).reshape(()) for v in values.values()]).tolist()
        return dict(zip(values.keys(), stacked))


def _mean32(x: Tensor, where: Tensor) -> Tensor:
    """Masked mean in float32 (the metrics' precision whatever the objective's dtype)."""
    return masked_mean(x.to(torch.float32), where)


def _var32(x: Tensor, where: Tensor) -> Tensor:
    return masked_var(x.to(torch.float32), where)


def _ratio_metrics(lr: Tensor, m: Tensor) -> dict[str, Tensor]:
    ratio = lr.exp()
    big = torch.finfo(torch.float32).max
    return {
        "ratio_mean": _mean32(ratio, m),
        "ratio_std": _var32(ratio, m).sqrt(),
        "ratio_min": torch.where(m, ratio, big).min() if m.any() else torch.tensor(1.0),
        "ratio_max": torch.where(m, ratio, -big).max() if m.any() else torch.tensor(1.0),
        "log_ratio_mean": _mean32(lr, m),
        "log_ratio_std": _var32(lr, m).sqrt(),
    }


def _sequence_weight_metrics(t: Terms, lr: Tensor, m: Tensor) -> dict[str, Tensor]:
    """Moments and effective sample size of the sequence weights (the geometric-mean ratio for token objectives)."""
    seq_ok = m.any(-1)
    seq_w = t.weight.detach().to(torch.float32) if t.weight.dim() == 1 else geometric_mean_weight(lr, m)
    w_ok = torch.where(seq_ok, seq_w, 0.0)
    ess = w_ok.sum() ** 2 / ((w_ok**2).sum() * seq_ok.sum().clamp(min=1)).clamp(min=1e-30)
    return {
        "seq_weight_mean": _mean32(seq_w, seq_ok),
        "seq_weight_var": _var32(seq_w, seq_ok),
        "ess_frac": ess if seq_ok.any() else torch.tensor(1.0),
    }


def _coefficient_metrics(t: Terms, adv: Tensor, m: Tensor) -> dict[str, Tensor]:
    f64 = torch.float64
    tok_adv = adv if adv.dim() == 2 else adv[:, None].expand_as(m)
    signal = m & (tok_adv.to(torch.float32) != 0)  # an advantage that underflows float32 carries no signal
    # c normalised so that on-policy it is 1: c / A (token), c T_i / A_i (sequence). In float64: a coefficient
    # with an A-free part (kl-cov's penalty) over a tiny A is huge, and its square must stay finite.
    scale = m.sum(-1).clamp(min=1).to(f64)[:, None] if t.weight.dim() == 1 else torch.ones_like(m, dtype=f64)
    coef_norm = torch.where(signal, t.coefficient.to(f64) * scale / torch.where(signal, tok_adv.to(f64), 1.0), 0.0)
    return {
        "dead_frac": _mean32(t.coefficient == 0, signal),
        "coef_norm_mean": masked_mean(coef_norm, signal),
        "coef_norm_var": masked_var(coef_norm, signal),
    }


def _gate_metrics(t: Terms, lr: Tensor, m: Tensor) -> dict[str, Tensor]:
    zeros = torch.zeros_like(m)
    low = t.clipped_low if t.clipped_low is not None else zeros
    high = t.clipped_high if t.clipped_high is not None else zeros
    gate_w = t.gate_weight if t.gate_weight is not None else torch.ones_like(lr)
    return {
        "clip_frac_low": _mean32(low, m),
        "clip_frac_high": _mean32(high, m),
        "gate_weight_mean": _mean32(gate_w, m),
    }


def get_objective(name: str, agg: str | None = None, horizon: int | None = None, **params: Any) -> Objective:
    """Build a training objective by registry name.

    Args:
        name: one of :func:`objective_names`.
        agg: aggregation mode (default: the objective's paper's); one of :data:`AGG_MODES`.
        horizon: constant length for ``seq-mean-token-sum-norm`` (default: the mask's T).
        **params: the objective's parameters (see ``get_spec(name).defaults``);
            ``eps`` sets ``eps_lo`` and ``eps_hi`` together, ``tau`` sets
            ``tau_pos`` and ``tau_neg`` together.
    """
    return _build(get_spec(name), agg, horizon, params)


def resolve_objective(objective: str | Objective, **params: Any) -> Objective:
    """An :class:`Objective` from a name (a training objective or a reference estimator) and its parameters.

    The theory and the simulators resolve names here, so they accept ``is-token``
    and ``is-seq`` too. An :class:`Objective` instance is returned as it is
    (``params`` must then be empty).
    """
    if isinstance(objective, Objective):
        if params:
            raise ValueError(f"objective: parameters {sorted(params)} given with an Objective instance; "
                             "build the instance with them instead")
        return objective
    if not isinstance(objective, str):
        raise ValueError(f"objective: expected a name or an Objective, got {type(objective).__name__}")
    return _build(get_spec(objective, include_references=True), None, None, params)


def _build(spec: ObjectiveSpec, agg: str | None, horizon: int | None, params: dict[str, Any]) -> Objective:
    """Bind ``spec`` to its parameters (defaults merged, ``eps`` / ``tau`` expanded, checked) and an aggregation."""
    name = spec.name
    merged = dict(spec.defaults)
    params = dict(params)
    _check_param_types(name, merged, params)
    if horizon is not None and (isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1):
        raise ValueError(f"horizon: must be an integer >= 1 (or None: the mask's T), got {horizon!r}")
    if "eps" in params and "eps_lo" in merged:
        eps = params.pop("eps")
        merged["eps_lo"], merged["eps_hi"] = (eps, eps) if isinstance(eps, (int, float)) else eps
    if "tau" in params and "tau_pos" in merged:
        merged["tau_pos"] = merged["tau_neg"] = params.pop("tau")
    unknown = set(params) - set(merged)
    if unknown:
        allowed = ", ".join(sorted(merged)) or "(none)"
        raise ValueError(f"objective {name!r}: unknown parameter(s) {', '.join(sorted(unknown))}; allowed: {allowed}")
    merged.update(params)
    _validate_params(name, merged)
    agg = agg or spec.agg
    if agg not in AGG_MODES:
        raise ValueError(f"agg: unknown value {agg!r}; allowed values: {', '.join(AGG_MODES)}")
    if spec.level == "sequence" and agg in TOKEN_SUM_MODES and agg != spec.agg:  # luspo weights by length on purpose
        warnings.warn(
            f"objective {name!r} is sequence-level: agg={agg!r} weights each sequence by its length, "
            "so long responses count more",
            UserWarning,
            stacklevel=3,
        )
    return Objective(name, merged, agg, horizon, spec)


PARAM_ALIASES: dict[str, tuple[str, str]] = {"eps": ("eps_lo", "eps_hi"), "tau": ("tau_pos", "tau_neg")}
"""Shorthands :func:`get_objective` accepts: ``eps`` sets ``eps_lo`` and ``eps_hi``, ``tau`` both temperatures."""

_GATE_PARAMETERS = {"tau": ("tau_pos", "tau_neg"), "eps": ("eps_lo", "eps_hi")}
"""What sets a gate's width (:attr:`gates.GateFamily.parameter`) -> the objective parameters that carry it."""


def read_parameters(name: str, params: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The parameters objective ``name`` reads when ``params`` are set (the others at their defaults).

    All of its parameters, except that a ``gate`` reads only the width its family has:
    ``tau_pos`` / ``tau_neg`` for a soft gate, ``eps_lo`` / ``eps_hi`` for the hard clip
    (``sspo``'s arctan gate never reads ``eps_lo``).
    """
    spec = get_spec(name)
    gate = {**spec.defaults, **(params or {})}.get("gate")
    unread: set[str] = set()
    if isinstance(gate, str):
        width = gates.gate_family(gate).parameter
        unread = {p for kind, keys in _GATE_PARAMETERS.items() if kind != width for p in keys}
    return tuple(k for k in spec.defaults if k not in unread)


def unread_parameters(name: str, given: Mapping[str, Any]) -> list[str]:
    """The keys of ``given`` (parameters, ``eps`` / ``tau`` too) that objective ``name`` does not read with them."""
    params = {k: v for k, v in given.items() if k not in PARAM_ALIASES}
    read = set(read_parameters(name, params))
    return [k for k in given if not read & set(PARAM_ALIASES.get(k, (k,)))]


def check_parameters_read(name: str, given: Mapping[str, Any], labels: Mapping[str, str] | None = None) -> None:
    """Raise ValueError naming the first parameter of ``given`` that objective ``name`` does not read.

    ``given`` holds only what the user set (not the defaults); ``labels`` names each
    parameter as the caller's config spells it (``eps_lo`` -> ``epsilon`` in TRL,
    ``objective.eps_lo`` in the trainer's config); without a label a parameter keeps
    its own name, and with ``labels`` the message lists only the labelled ones. The
    trainer's config and the TRL integration both check here.
    """
    unread = unread_parameters(name, given)
    if not unread:
        return
    params = {k: v for k, v in given.items() if k not in PARAM_ALIASES}
    read = read_parameters(name, params)
    if labels is not None:
        read = tuple(k for k in read if k in labels)
    label = (lambda k: labels.get(k, k)) if labels is not None else str
    gate = {**get_spec(name).defaults, **params}.get("gate")
    with_gate = f" with gate {gate!r}" if isinstance(gate, str) else ""
    reads = ", ".join(dict.fromkeys(label(k) for k in read)) or "none of them"
    raise ValueError(f"{label(unread[0])}: not used by objective {name!r}{with_gate}, which reads {reads}; "
                     "leave it unset")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_param_types(name: str, defaults: dict[str, Any], params: dict[str, Any]) -> None:
    """Each parameter has its default's one type: a bool is a bool (never ``"no"`` or 1), a number never a bool,
    a string a string; ``eps`` is a number or a pair ``(eps_lo, eps_hi)``."""
    aliases = {"eps": "eps_lo", "tau": "tau_pos"}
    for key, value in params.items():
        default = defaults.get(aliases.get(key, key))
        if value is None:  # the parameter's own check says whether None is allowed (clip-cov's seed)
            continue
        if key == "eps" and isinstance(value, (list, tuple)):
            ok = len(value) == 2 and all(_is_number(v) for v in value)
            kind = "a number or a pair of numbers (eps_lo, eps_hi)"
        elif isinstance(default, bool):
            ok, kind = isinstance(value, bool), "true or false"
        elif _is_number(default):
            ok, kind = _is_number(value), "a number"
        elif isinstance(default, str):
            ok, kind = isinstance(value, str) or (key == "gate" and callable(value)), "a string"
        else:
            continue
        if not ok:
            raise ValueError(f"objective {name!r}: {key} must be {kind}, got {value!r}")


def _validate_params(name: str, p: dict[str, Any]) -> None:
    for key in ("eps_lo", "eps_hi", "eps_max"):
        if key in p and not (isinstance(p[key], (int, float)) and p[key] >= 0 and math.isfinite(p[key])):
            raise ValueError(f"objective {name!r}: {key} must be a finite number >= 0, got {p[key]!r}")
    for key in ("tau_pos", "tau_neg"):
        if key in p and not (isinstance(p[key], (int, float)) and p[key] > 0 and math.isfinite(p[key])):
            raise ValueError(f"objective {name!r}: {key} must be a finite number > 0, got {p[key]!r}")
    if "gate" in p:  # a registered name, an alias or an import path package.module:function
        try:
            p["gate"] = gates.resolve_gate_name(p["gate"])
        except ValueError as err:
            raise ValueError(f"objective {name!r}: {err}") from None
    _validate_field_params(name, p)


# --------------------------------------------------------------------------- the field's other objectives
# VESPO and LUSPO as TRL 1.16 ships them, Clip-Cov and KL-Cov as verl 0.9.1 ships them; parameters
# carry the engines' names. Where the package and the engine differ, docs/integrations.md says so.

VESPO_LOG_W_MIN = math.log(1e-8)
"""TRL's lower clamp of VESPO's sequence log-ratio ``log W`` (the upper one is :data:`LOG_RATIO_CLAMP`)."""
VESPO_LAMBDA_MIN = 1e-4
"""TRL floors VESPO's ``lambda`` here, so that ``phi`` decays for large ``W``."""


def vespo_log_phi(log_w: Tensor, k: Tensor | float, lam: Tensor | float) -> Tensor:
    """``log phi(W) = lambda + k log W - lambda W``: the log of VESPO's gamma weight, ``phi(1) = 1``."""
    return lam + k * log_w - lam * log_w.exp()


@register_objective(
    "vespo",
    level="token",
    agg="token-mean",
    defaults={"k_pos": 2.0, "lambda_pos": 3.0, "k_neg": 3.0, "lambda_neg": 2.0},
    theory={"quadrature": "sspo_analysis.theory.sequence_ratio:vespo_quadrature"},
)
def vespo(
    log_ratio: Tensor, adv: Tensor, mask: Tensor, *, k_pos: float, lambda_pos: float, k_neg: float, lambda_neg: float
) -> Terms:
    """VESPO: ``sg[phi(W)] A l`` with ``phi(W) = e^lambda W^k e^(-lambda W)`` of the product ratio; ``c = A phi(W)``.

    ``W = exp(sum_t l_t)`` is the sequence's product ratio, ``log W`` clamped to
    ``[log 1e-8, 20]``; ``(k, lambda)`` is ``(k_pos, lambda_pos)`` for ``A >= 0``,
    ``(k_neg, lambda_neg)`` for ``A < 0`` (TRL's ``vespo_*`` fields; ``lambda`` floored
    at ``1e-4``). ``phi(1) = 1``, so on-policy ``c = A``. The weight reported is
    ``phi(W)`` per token; ``gate_weight`` is ``phi(W) / W``, the factor against plain
    sequence importance sampling.
    """
    log_w = masked_sum(log_ratio, mask, dim=-1).clamp(VESPO_LOG_W_MIN, LOG_RATIO_CLAMP)[:, None]
    nonneg = adv >= 0  # VESPO splits at A >= 0, as TRL does
    k = _by_sign(nonneg, k_pos, k_neg, log_ratio)
    lam = _by_sign(nonneg, max(lambda_pos, VESPO_LAMBDA_MIN), max(lambda_neg, VESPO_LAMBDA_MIN), log_ratio)
    log_phi = vespo_log_phi(log_w, k, lam).detach()
    phi = log_phi.exp()
    return Terms(phi * adv * log_ratio, (phi * adv).detach(), phi, (log_phi - log_w).exp().detach())


@register_objective(
    "luspo",
    level="sequence",
    agg="seq-mean-token-sum",
    defaults={"eps_lo": 3e-4, "eps_hi": 4e-4},
    theory={"closed-form": "sspo_analysis.theory.closed_forms:sequence_ppo_clip"},  # gspo's normalised coefficient
)
def luspo(log_ratio: Tensor, adv: Tensor, mask: Tensor, *, eps_lo: float, eps_hi: float) -> Terms:
    """LUSPO: GSPO's sequence clip, each sequence's surrogate counted ``T_i`` times (seq-mean-token-sum).

    The same ``J_i`` and ``c = A s 1[kept] / T_i`` as :func:`gspo`; only the
    aggregation differs, so each token's gradient is ``T_i`` times GSPO's and long
    answers are not down-weighted. ``eps_lo`` / ``eps_hi`` are TRL's ``epsilon`` /
    ``epsilon_high`` (GSPO's defaults here; TRL's own default is 0.2).
    """
    return gspo(log_ratio, adv, mask, eps_lo=eps_lo, eps_hi=eps_hi)


def _token_covariance(adv: Tensor, log_prob: Tensor, mask: Tensor) -> Tensor:
    """``(A - mean A)(log pi - mean log pi)`` per token, the means over the batch's unmasked tokens."""
    return (adv - masked_mean(adv, mask)) * (log_prob - masked_mean(log_prob, mask))


def _random_subset(candidates: Tensor, count: int, seed: int | None) -> Tensor:
    """``count`` of the ``True`` entries of ``candidates`` drawn uniformly (row-major order, then a permutation).

    ``seed=None`` draws from torch's global generator, as verl does (so ``torch.manual_seed(s)``
    before the call reproduces verl's choice); an integer seeds a private generator afresh
    on every call, so the same tensors always give the same selection.
    """
    idx = torch.nonzero(candidates)
    chosen = torch.zeros_like(candidates)
    if len(idx) > 0:
        generator = None if seed is None else torch.Generator().manual_seed(int(seed))
        idx = idx[torch.randperm(len(idx), generator=generator)[:count]]
        chosen[idx[:, 0], idx[:, 1]] = True
    return chosen


@register_objective(
    "clip-cov",
    level="token",
    agg="token-mean",
    defaults={"eps_lo": 0.2, "eps_hi": 0.2, "clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0, "seed": 0},
    needs_log_prob=True,
    theory={"monte-carlo": "sspo_analysis.theory.sequence_ratio:batch_monte_carlo"},
)
def clip_cov(  # noqa: PLR0913 - verl's parameters, passed by name by the registry
    log_ratio: Tensor,
    adv: Tensor,
    mask: Tensor,
    *,
    log_prob: Tensor,
    eps_lo: float,
    eps_hi: float,
    clip_cov_ratio: float,
    clip_cov_lb: float,
    clip_cov_ub: float,
    seed: int | None,
) -> Terms:
    """Clip-Cov: PPO-clip with a random few high-covariance tokens detached; ``c = A r 1[kept] 1[not chosen]``.

    Candidates are the unmasked tokens PPO did not clip whose covariance
    ``(A - mean A)(log pi - mean log pi)`` lies in ``(clip_cov_lb, clip_cov_ub)``;
    ``max(int(clip_cov_ratio * N), 1)`` of them (``N`` unmasked tokens) are chosen
    uniformly at random and contribute neither value nor gradient, even on-policy.
    The choice is deterministic given ``seed`` (see :func:`_random_subset`); given the
    choice, ``c`` is per token. ``eps_lo`` / ``eps_hi`` are verl's ``clip_ratio_low`` / ``_high``.
    """
    t = _ppo_clip(log_ratio.exp(), adv, eps_lo, eps_hi)
    cov = _token_covariance(adv, log_prob, mask)
    candidates = mask & ~(t.clipped_low | t.clipped_high) & (cov > clip_cov_lb) & (cov < clip_cov_ub)
    chosen = _random_subset(candidates, max(int(clip_cov_ratio * int(mask.sum())), 1), seed)
    return t._replace(
        surrogate=torch.where(chosen, 0.0, t.surrogate),
        coefficient=torch.where(chosen, 0.0, t.coefficient),
        gate_weight=torch.where(chosen, 0.0, t.gate_weight),
    )


def _top_covariance(cov: Tensor, mask: Tensor, ratio: float) -> Tensor:
    """The ``max(1, int(ratio * N))`` unmasked tokens of largest ``cov`` (none when ``N = 0``)."""
    chosen = torch.zeros_like(mask)
    n = int(mask.sum())
    if n > 0:
        flat = torch.nonzero(mask.reshape(-1), as_tuple=True)[0]
        top = flat[torch.topk(cov[mask], max(1, int(n * ratio))).indices]
        chosen.view(-1)[top] = True
    return chosen


@register_objective(
    "kl-cov",
    level="token",
    agg="token-mean",
    defaults={"kl_cov_ratio": 2e-4, "ppo_kl_coef": 0.1},
    needs_log_prob=True,
    theory={"monte-carlo": "sspo_analysis.theory.sequence_ratio:batch_monte_carlo"},
)
def kl_cov(
    log_ratio: Tensor, adv: Tensor, mask: Tensor, *, log_prob: Tensor, kl_cov_ratio: float, ppo_kl_coef: float
) -> Terms:
    """KL-Cov: ``r A``, minus ``ppo_kl_coef |l|`` on the top-covariance tokens; ``c = A r - coef sign(l) 1[chosen]``.

    The ``max(1, int(kl_cov_ratio * N))`` unmasked tokens of largest covariance
    ``(A - mean A)(log pi - mean log pi)`` are chosen deterministically (``topk``).
    No ratio is clipped. On-policy ``sign(0) = 0``, so ``c = A``.
    """
    ratio = log_ratio.exp()
    chosen = _top_covariance(_token_covariance(adv, log_prob, mask).detach(), mask, kl_cov_ratio)
    penalty = torch.where(chosen, ppo_kl_coef * log_ratio.abs(), 0.0)
    coefficient = adv * ratio - torch.where(chosen, ppo_kl_coef * log_ratio.sign(), 0.0)
    return Terms(ratio * adv - penalty, coefficient.detach(), ratio)


def _validate_field_params(name: str, p: dict[str, Any]) -> None:
    """The parameters of vespo, luspo, clip-cov and kl-cov (called from :func:`_validate_params`)."""
    for key in ("k_pos", "k_neg", "ppo_kl_coef"):
        if key in p and not (isinstance(p[key], (int, float)) and p[key] >= 0 and math.isfinite(p[key])):
            raise ValueError(f"objective {name!r}: {key} must be a finite number >= 0, got {p[key]!r}")
    for key in ("lambda_pos", "lambda_neg", "clip_cov_ratio", "kl_cov_ratio"):
        if key in p and not (isinstance(p[key], (int, float)) and p[key] > 0 and math.isfinite(p[key])):
            raise ValueError(f"objective {name!r}: {key} must be a finite number > 0, got {p[key]!r}")
    if "clip_cov_lb" in p:
        lb, ub = p["clip_cov_lb"], p["clip_cov_ub"]
        if not (isinstance(lb, (int, float)) and isinstance(ub, (int, float)) and lb < ub):
            raise ValueError(f"objective {name!r}: clip_cov_lb must be a number below clip_cov_ub, got {lb!r}, {ub!r}")
    if "seed" in p and p["seed"] is not None and (isinstance(p["seed"], bool) or not isinstance(p["seed"], int)):
        raise ValueError(f"objective {name!r}: seed must be an integer or None, got {p['seed']!r}")
