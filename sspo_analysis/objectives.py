"""Policy-optimisation objectives as plain functions, behind one registry.

Each objective is a function of the (clamped, masked) token log-ratio
``l = log pi_theta - log pi_old``, the advantages and the mask, registered with
:func:`register_objective`. It returns :class:`Terms`: the surrogate ``J`` to
maximise (per token, or per sequence for sequence-level objectives) and, from
its own closed form, the gradient coefficient ``c`` (``docs/theory.md``, section 2)::

    grad J = sum_{i,t} n_{i,t} * c_{i,t} * grad log pi_theta(y_{i,t})

where ``n`` is the aggregation's normalisation (:meth:`Objective.normalisation`).
:class:`Objective` wraps a registered function with its parameters and an
aggregation mode, and computes the loss and the metrics. The trainer, the
theory and the engine integrations all go through :func:`get_objective`.

Adding an objective is one function and one decorator::

    @register_objective("my-pg", level="token", agg="token-mean", defaults={"beta": 1.0})
    def my_pg(log_ratio, adv, mask, *, beta):
        r = log_ratio.exp()
        return Terms(surrogate=beta * r * adv, coefficient=beta * r.detach() * adv, weight=r)
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from sspo_analysis import gates

Tensor = torch.Tensor

LOG_RATIO_CLAMP = 20.0
"""Log-ratios are clamped to ``[-20, 20]`` before ``exp`` (``e^20 ~ 5e8``)."""

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


@dataclass(frozen=True)
class ObjectiveSpec:
    """A registry entry: the function and its metadata."""

    name: str
    fn: Callable[..., Terms]
    level: str
    agg: str
    defaults: dict[str, Any]
    make_log_gate: Callable[..., LogGate] | None = None
    doc: str = ""


_REGISTRY: dict[str, ObjectiveSpec] = {}


def register_objective(
    name: str,
    *,
    level: str,
    agg: str,
    defaults: dict[str, Any] | None = None,
    log_gate: Callable[..., LogGate] | None = None,
) -> Callable[[Callable[..., Terms]], Callable[..., Terms]]:
    """Register ``fn(log_ratio, adv, mask, **params) -> Terms`` under ``name``.

    Args:
        name: registry key, used by ``get_objective``, the CLI and the engines.
        level: ``"token"`` or ``"sequence"``.
        agg: default aggregation mode (one of :data:`AGG_MODES`).
        defaults: every parameter the function takes, with its default.
        log_gate: for geometric-mean objectives, a factory ``(**params) -> LogGate``
            so that the theory can integrate the per-token gate directly.
    """
    if level not in ("token", "sequence"):
        raise ValueError(f"level: unknown value {level!r}; allowed values: token, sequence")
    if agg not in AGG_MODES:
        raise ValueError(f"agg: unknown value {agg!r}; allowed values: {', '.join(AGG_MODES)}")

    def decorator(fn: Callable[..., Terms]) -> Callable[..., Terms]:
        _REGISTRY[name] = ObjectiveSpec(name, fn, level, agg, dict(defaults or {}), log_gate, fn.__doc__ or "")
        return fn

    return decorator


def objective_names() -> tuple[str, ...]:
    """Names of every registered objective."""
    return tuple(_REGISTRY)


def get_spec(name: str) -> ObjectiveSpec:
    if name not in _REGISTRY:
        raise ValueError(f"objective: unknown name {name!r}; allowed values: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


# --------------------------------------------------------------------------- helpers


def _sign_select(adv: Tensor, pos: float, neg: float) -> Tensor:
    """Per-element parameter chosen by the advantage's sign (``A > 0`` -> ``pos``)."""
    return torch.where(adv > 0, torch.full_like(adv, pos), torch.full_like(adv, neg))


def _token_count(mask: Tensor) -> Tensor:
    return mask.sum(-1).to(torch.float32)


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
    n = _token_count(mask).clamp(min=1.0).to(log_ratio.dtype)
    mean_phi = torch.where(mask, phi, 0.0).sum(-1) / n
    w = mean_phi.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP).exp()
    dphi = torch.where(mask, dphi, 0.0)
    coefficient = (adv[:, None] * w[:, None] * dphi / n[:, None]).detach()
    return Terms(w * adv, coefficient, w, dphi.detach())


# --------------------------------------------------------------------------- objectives


@register_objective("pg", level="token", agg="seq-mean-token-mean")
def pg(log_ratio: Tensor, adv: Tensor, mask: Tensor) -> Terms:
    """On-policy policy gradient, ``A * l`` with ``pi_old = sg[pi_theta]``: ``c = A``.

    The old log-probs are ignored: the gradient is that of the current policy.
    """
    lp = log_ratio - log_ratio.detach()  # zero value, unit gradient
    return Terms(adv * lp, adv.detach(), torch.ones_like(log_ratio))


@register_objective("grpo", level="token", agg="seq-mean-token-mean", defaults={"eps_lo": 0.2, "eps_hi": 0.2})
def grpo(log_ratio: Tensor, adv: Tensor, mask: Tensor, *, eps_lo: float, eps_hi: float) -> Terms:
    """PPO-clip per token: ``c = A r 1[kept]``."""
    return _ppo_clip(log_ratio.exp(), adv, eps_lo, eps_hi)


@register_objective("dapo", level="token", agg="token-mean", defaults={"eps_lo": 0.2, "eps_hi": 0.28})
def dapo(log_ratio: Tensor, adv: Tensor, mask: Tensor, *, eps_lo: float, eps_hi: float) -> Terms:
    """GRPO with clip-higher (``eps_hi = 0.28``) and token-mean aggregation."""
    return _ppo_clip(log_ratio.exp(), adv, eps_lo, eps_hi)


@register_objective("cispo", level="token", agg="token-mean", defaults={"eps_max": 5.0})
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
    "sapo", level="token", agg="seq-mean-token-mean", defaults={"gate": "sigmoid", "tau_pos": 1.0, "tau_neg": 1.05}
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


@register_objective("gspo", level="sequence", agg="seq-mean-token-mean", defaults={"eps_lo": 3e-4, "eps_hi": 4e-4})
def gspo(log_ratio: Tensor, adv: Tensor, mask: Tensor, *, eps_lo: float, eps_hi: float) -> Terms:
    """Sequence-level PPO-clip on ``s_i = exp(mean_t l)``; ``c = A s_i 1[kept_i] / T_i``."""
    n = _token_count(mask).clamp(min=1.0).to(log_ratio.dtype)
    s = (torch.where(mask, log_ratio, 0.0).sum(-1) / n).exp()
    t = _ppo_clip(s, adv, eps_lo, eps_hi)
    coefficient = torch.where(mask, t.coefficient[:, None] / n[:, None], 0.0)
    kept = t.gate_weight[:, None].expand_as(log_ratio)
    return Terms(t.surrogate, coefficient, s, kept, t.clipped_low[:, None] & mask, t.clipped_high[:, None] & mask)


def _gmpo_log_gate(eps_lo: float, eps_hi: float) -> LogGate:
    def log_gate(l: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
        # A > 0: only the top is clipped; A < 0: only the bottom.
        value = torch.where(positive, l.clamp(max=eps_hi), l.clamp(min=-eps_lo))
        kept = torch.where(positive, l <= eps_hi, l >= -eps_lo)
        return value, kept.to(l.dtype)

    return log_gate


@register_objective(
    "gmpo",
    level="sequence",
    agg="seq-mean-token-mean",
    defaults={"eps_lo": 0.4, "eps_hi": 0.4},
    log_gate=_gmpo_log_gate,
)
def gmpo(log_ratio: Tensor, adv: Tensor, mask: Tensor, *, eps_lo: float, eps_hi: float) -> Terms:
    """Geometric mean of token ratios, hard-clipped in log space on the side set by ``sign(A)``."""
    t = _geometric_mean(log_ratio, adv, mask, _gmpo_log_gate(eps_lo, eps_hi))
    positive = (adv > 0)[:, None]
    high = positive & (log_ratio > eps_hi) & mask
    low = (adv < 0)[:, None] & (log_ratio < -eps_lo) & mask
    return t._replace(clipped_low=low, clipped_high=high)


def _sspo_log_gate(gate: str, tau_pos: float, tau_neg: float, one_sided: bool, eps_lo: float, eps_hi: float) -> LogGate:
    def log_gate(l: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
        tau = torch.where(positive, torch.full_like(l, tau_pos), torch.full_like(l, tau_neg))
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
)
def sspo(
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

    A reconstruction (see the README): ``phi`` is a log-space gate of any family,
    ``arctan`` by default, its temperature chosen by ``sign(A)``. ``eps_lo`` /
    ``eps_hi`` are used only by ``gate="hard-clip"`` (the range ``[-eps_lo, eps_hi]``
    in log space; with ``one_sided=True`` that is GMPO).
    """
    log_gate = _sspo_log_gate(gate, tau_pos, tau_neg, one_sided, eps_lo, eps_hi)
    return _geometric_mean(log_ratio, adv, mask, log_gate)


def _sspo_sigmoid_log_gate(tau_pos: float, tau_neg: float) -> LogGate:
    def log_gate(l: Tensor, positive: Tensor) -> tuple[Tensor, Tensor]:
        tau = torch.where(positive, torch.full_like(l, tau_pos), torch.full_like(l, tau_neg))
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
)
def sspo_sigmoid(log_ratio: Tensor, adv: Tensor, mask: Tensor, *, tau_pos: float, tau_neg: float) -> Terms:
    """Geometric mean of SAPO's ratio-space gates: ``w_i = exp(mean_t log(f(r)/f(1)))``.

    Its on-policy coefficient is ``tau/2`` times GSPO's: only ``tau = 2`` is admissible.
    """
    return _geometric_mean(log_ratio, adv, mask, _sspo_sigmoid_log_gate(tau_pos, tau_neg))


# --------------------------------------------------------------------------- the wrapper


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
        if log_prob.shape != old_log_prob.shape or log_prob.shape != mask.shape or log_prob.dim() != 2:
            raise ValueError(
                "log_prob, old_log_prob, mask: must share one (B, T) shape; got "
                f"{tuple(log_prob.shape)}, {tuple(old_log_prob.shape)}, {tuple(mask.shape)}"
            )
        dtype = torch.float64 if torch.float64 in (log_prob.dtype, old_log_prob.dtype) else torch.float32
        mask = mask.bool()
        diff = log_prob.to(dtype) - old_log_prob.to(dtype)
        # where, not multiply: a masked inf must not become inf * 0 = nan.
        log_ratio = torch.where(mask, diff, 0.0).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        adv = torch.where(mask, _as_token_advantages(advantages, log_prob.shape).to(dtype), 0.0)
        if self.level == "sequence":
            adv = adv.sum(-1) / _token_count(mask).clamp(min=1.0).to(dtype)
        t = self.spec.fn(log_ratio, adv, mask, **self.params)
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
        m = mask
        n_tok = m.sum().clamp(min=1).to(f32)
        lr = log_ratio.detach().to(f32)
        ratio = lr.exp()

        def masked_mean(x: Tensor, where: Tensor = m) -> Tensor:
            return torch.where(where, x.to(f32), 0.0).sum() / where.sum().clamp(min=1).to(f32)

        def masked_var(x: Tensor, where: Tensor) -> Tensor:
            mu = masked_mean(x, where)
            return masked_mean((x.to(f32) - mu) ** 2, where)

        big = torch.finfo(f32).max
        seq_ok = m.any(-1)
        n_seq_tok = m.sum(-1).clamp(min=1).to(f32)
        if t.weight.dim() == 1:
            seq_w = t.weight.detach().to(f32)
        else:  # token objectives: the geometric-mean ratio of each sequence
            seq_w = (torch.where(m, lr, 0.0).sum(-1) / n_seq_tok).exp()
        w_ok = torch.where(seq_ok, seq_w, 0.0)
        ess = w_ok.sum() ** 2 / ((w_ok**2).sum() * seq_ok.sum().clamp(min=1)).clamp(min=1e-30)
        tok_adv = adv if adv.dim() == 2 else adv[:, None].expand_as(m)
        signal = m & (tok_adv != 0)
        dead = masked_mean((t.coefficient == 0).to(f32), signal)
        # c normalised so that on-policy it is 1: c / A (token), c T_i / A_i (sequence).
        scale = n_seq_tok[:, None] if t.weight.dim() == 1 else torch.ones_like(lr)
        coef_norm = torch.where(signal, t.coefficient.to(f32) * scale / torch.where(signal, tok_adv.to(f32), 1.0), 0.0)
        zeros = torch.zeros_like(m)
        low = t.clipped_low if t.clipped_low is not None else zeros
        high = t.clipped_high if t.clipped_high is not None else zeros
        gate_w = t.gate_weight if t.gate_weight is not None else torch.ones_like(lr)
        values = {
            "loss": loss.detach().to(f32) if loss is not None else torch.tensor(float("nan")),
            "ratio_mean": masked_mean(ratio),
            "ratio_std": masked_var(ratio, m).sqrt(),
            "ratio_min": torch.where(m, ratio, big).min() if m.any() else torch.tensor(1.0),
            "ratio_max": torch.where(m, ratio, -big).max() if m.any() else torch.tensor(1.0),
            "log_ratio_mean": masked_mean(lr),
            "log_ratio_std": masked_var(lr, m).sqrt(),
            "seq_weight_mean": masked_mean(seq_w, seq_ok),
            "seq_weight_var": masked_var(seq_w, seq_ok),
            "ess_frac": ess if seq_ok.any() else torch.tensor(1.0),
            "dead_frac": dead,
            "coef_norm_mean": masked_mean(coef_norm, signal),
            "coef_norm_var": masked_var(coef_norm, signal),
            "clip_frac_low": masked_mean(low.to(f32)),
            "clip_frac_high": masked_mean(high.to(f32)),
            "gate_weight_mean": masked_mean(gate_w),
            "kl_old_k3": masked_mean(torch.expm1(lr) - lr),
            "n_tokens": n_tok,
        }
        stacked = torch.stack([v.to(f32).reshape(()) for v in values.values()]).tolist()
        return dict(zip(values.keys(), stacked))


def get_objective(name: str, agg: str | None = None, horizon: int | None = None, **params: Any) -> Objective:
    """Build an objective by registry name.

    Args:
        name: one of :func:`objective_names`.
        agg: aggregation mode (default: the objective's paper's); one of :data:`AGG_MODES`.
        horizon: constant length for ``seq-mean-token-sum-norm`` (default: the mask's T).
        **params: the objective's parameters (see ``get_spec(name).defaults``);
            ``eps`` sets ``eps_lo`` and ``eps_hi`` together, ``tau`` sets
            ``tau_pos`` and ``tau_neg`` together.
    """
    spec = get_spec(name)
    merged = dict(spec.defaults)
    params = dict(params)
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
    if spec.level == "sequence" and agg in TOKEN_SUM_MODES:
        warnings.warn(
            f"objective {name!r} is sequence-level: agg={agg!r} weights each sequence by its length, "
            "so long responses count more",
            UserWarning,
            stacklevel=2,
        )
    return Objective(name, merged, agg, horizon, spec)


def _validate_params(name: str, p: dict[str, Any]) -> None:
    for key in ("eps_lo", "eps_hi", "eps_max"):
        if key in p and not (isinstance(p[key], (int, float)) and p[key] >= 0 and math.isfinite(p[key])):
            raise ValueError(f"objective {name!r}: {key} must be a finite number >= 0, got {p[key]!r}")
    for key in ("tau_pos", "tau_neg"):
        if key in p and not (isinstance(p[key], (int, float)) and p[key] > 0 and math.isfinite(p[key])):
            raise ValueError(f"objective {name!r}: {key} must be a finite number > 0, got {p[key]!r}")
    if "gate" in p:
        g = gates._ALIASES.get(p["gate"], p["gate"])
        allowed = gates.GATES
        if g not in allowed:
            raise ValueError(f"objective {name!r}: gate {p['gate']!r} unknown; allowed values: {', '.join(allowed)}")
        p["gate"] = g
