"""The distribution of each objective's gradient coefficient: closed forms, quadrature, Monte Carlo.

For an objective, an advantage sign and a model of the token log-ratio ``l``,
:func:`analyse` reports (``docs/theory.md``, sections 6 and 7):

- ``mean_coefficient``: ``E[c / A]`` (token objectives) or ``E[c T / A]``
  (sequence objectives), over tokens; 1 on-policy, so ``mean_coefficient - 1``
  is the gate's bias;
- ``var_coefficient``: the variance of the same normalised coefficient;
- ``dead_fraction``: ``P(c = 0)``, the tokens whose gradient the gate removes;
- ``mean_weight`` / ``var_weight``: moments of the importance weight (``r`` for
  token objectives, ``s_i`` for GSPO, ``w_i`` for the geometric means, ``W`` for
  ``is-seq``, 1 for ``pg``);
- ``ess_fraction``: ``E[w]^2 / E[w^2]``, the effective sample size per sample.

Three methods, one answer. Each objective declares at registration which of
the two analytic ones hold for it (``register_objective(..., theory=...)``);
this module never dispatches on an objective's name:

- ``closed-form``: the objective's closed-form hook (:mod:`.closed_forms`):
  log-normal partial moments ``E[r^k 1{a < l < b}]`` for the hard clips
  (``grpo``, ``dapo``, ``cispo``, ``gspo``), the products (``is-token``,
  ``is-seq``) and GMPO's ``E[w^q] = M(q/L)^L``;
- ``quadrature``: composite Gauss-Legendre against the normal density in ``l``
  (refined around ``l = 0`` at the gate's width, :func:`normal_nodes`) for the soft gates, evaluated by the
  objective's own code (``objective.coefficient`` on the nodes for token
  objectives, ``objective.log_gate`` for geometric means, whose moments factor
  over i.i.d. tokens: ``E[w^q] = E[exp(q phi(l) / L)]^L`` and
  ``E[c T / A] = E[exp(phi / L) phi'] E[exp(phi / L)]^(L - 1)``);
- ``monte-carlo``: sampled ``(n, T)`` log-ratios through ``objective.terms``;
  needed for correlated and empirical models, available for all, with
  delta-method standard errors in ``mc_stderr``; streamed in chunks into
  running sums (:mod:`.moments`), so memory does not grow with ``n_samples``.

Sequences are the unit of independence: Monte Carlo statistics are ratio
estimators over sequences, so tokens of one sequence may be correlated.
"""

from __future__ import annotations

import functools
import importlib
import json
import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sspo_analysis import gates as gates_mod
from sspo_analysis.objectives import Objective, ObjectiveSpec, all_objective_names, get_spec, resolve_objective
from sspo_analysis.theory.closed_forms import LogNormalGrid, geometric_moments, lognormal_weight
from sspo_analysis.theory.models import (
    EmpiricalRatios,
    LogNormalRatios,
    check_correlation,
    check_length,
    check_std,
)
from sspo_analysis.theory.moments import MonteCarloSums, clamp_variance

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["TheoryResult", "analyse", "sweep", "available_methods", "parse_sign", "METHODS", "STATS"]

METHODS: tuple[str, ...] = ("auto", "closed-form", "quadrature", "monte-carlo")
STATS: tuple[str, ...] = (
    "mean_coefficient", "var_coefficient", "dead_fraction", "mean_weight", "var_weight", "ess_fraction")
RESULT_KEYS: tuple[str, ...] = (
    "objective", "log_ratio_mean", "log_ratio_std", "length", "advantage_sign", *STATS, "method", "mc_stderr")

DEFAULT_N_SAMPLES = 20_000
"""Monte Carlo sequences per point when ``n_samples`` is not given (parametric models)."""
DEFAULT_QUAD_NODES = 8
"""Gauss-Legendre nodes per quadrature panel (see :func:`normal_nodes`)."""
MAX_SUM_VARIANCE = 709.0
"""Below this ``Var(sum_t l_t)`` the second moment of the sequence weight, ``exp(Var)``, fits in float64
(``log`` of the largest float64); beyond it a statistic may overflow, and :func:`analyse` says so."""
MC_MAX_TOKENS = 10**9
"""Monte Carlo refuses more tokens than this (``n_samples x length``): over a minute at ~15 M tokens/s (one CPU
thread); lower the samples or the length, or use a closed form or the quadrature."""
MC_WARN_TOKENS = 10**8
"""Monte Carlo over more tokens than this warns that it will take several seconds."""
MC_CHUNK_TOKENS = 1 << 18
"""Monte Carlo draws and evaluates at most this many tokens at a time (one sequence, if longer) and keeps only
running sums, so its memory is bounded by one chunk whatever ``n_samples``: about 100 MB above the interpreter for
the built-in objectives (``docs/theory.md``, "Monte Carlo")."""

_SIGNS = {"+": 1, "-": -1, "+1": 1, "-1": -1, "1": 1, "pos": 1, "neg": -1, "positive": 1, "negative": -1}


# --------------------------------------------------------------------------- the result


@dataclass(frozen=True)
class TheoryResult:
    """The moments of one objective's gradient coefficient and importance weight under one model.

    ``to_dict()`` gives the documented keys (:data:`RESULT_KEYS`); ``params`` holds
    the objective's parameters and is not among them.
    """

    objective: str
    log_ratio_mean: float
    log_ratio_std: float
    length: float
    advantage_sign: int
    mean_coefficient: float
    var_coefficient: float
    dead_fraction: float
    mean_weight: float
    var_weight: float
    ess_fraction: float
    method: str
    mc_stderr: dict[str, float] | None = None
    params: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def bias(self) -> float:
        """``mean_coefficient - 1``: the gate's relative bias of the gradient's scale."""
        return self.mean_coefficient - 1.0

    def to_dict(self) -> dict[str, Any]:
        """The result as plain Python values, keyed by :data:`RESULT_KEYS`."""
        out = {k: getattr(self, k) for k in RESULT_KEYS}
        out["mc_stderr"] = dict(self.mc_stderr) if self.mc_stderr is not None else None
        return out


# --------------------------------------------------------------------------- input checks


def parse_sign(advantage_sign: int | float | str) -> int:
    """``+1`` or ``-1`` from ``1``, ``-1``, ``"+"``, ``"-"``, ``"+1"``, ``"-1"``, ``"pos"``, ``"neg"``."""
    if isinstance(advantage_sign, str) and advantage_sign.strip().lower() in _SIGNS:
        return _SIGNS[advantage_sign.strip().lower()]
    if isinstance(advantage_sign, (int, float, np.integer, np.floating)) and not isinstance(advantage_sign, bool) \
            and advantage_sign in (1, -1):
        return int(advantage_sign)
    raise ValueError(f"advantage_sign: unknown value {advantage_sign!r}; allowed values: +1, -1, +, -, pos, neg")


def _check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"method: unknown value {method!r}; allowed values: {', '.join(METHODS)}")
    return method


def _zero_by_definition(obj: Objective) -> bool:
    """Whether a zero coefficient is a dead token: a hard clip's flat region, not a soft gate's
    weight underflowing to 0.0 in float64 (which the gate never is)."""
    if "gate" in obj.params:
        return gates_mod.gate_family(obj.params["gate"]).dead_zone
    return obj.name != "sspo-sigmoid"  # the only gated objective without a gate parameter: soft


def _analytic_methods(obj: Objective, iid: bool) -> tuple[str, ...]:
    """The analytic methods the objective declared at registration that hold for this model, in its order.

    A geometric mean (an objective with a ``log_gate``) factorises over
    independent tokens only, and a quadrature hook is taken to assume them; the
    generic quadrature needs a smooth gate (a kink inside a panel would cost it
    its accuracy). Everything else is the objective's own declaration
    (``register_objective(..., theory=...)``).
    """
    spec = obj.spec
    smooth = not gates_mod.gate_family(obj.params.get("gate", "identity")).dead_zone
    out = []
    for method, hook in spec.theory.items():
        generic_quadrature = method == "quadrature" and hook is None
        if method == "monte-carlo" or (generic_quadrature and not smooth):
            continue
        if not iid and (spec.make_log_gate is not None or (method == "quadrature" and hook is not None)):
            continue
        out.append(method)
    return tuple(out)


def available_methods(objective: str | Objective, model: LogNormalRatios | EmpiricalRatios | None = None,
                      **params: Any) -> tuple[str, ...]:
    """The methods :func:`analyse` accepts for this objective and model (besides ``auto``)."""
    obj = resolve_objective(objective, **params)
    if isinstance(model, EmpiricalRatios):
        return ("monte-carlo",)
    return (*_analytic_methods(obj, model is None or model.iid), "monte-carlo")


# --------------------------------------------------------------------------- closed forms


def theory_hook(spec: ObjectiveSpec, method: str) -> Any:
    """The objective's own implementation of ``method`` (None: the generic one), importing a path on first use."""
    hook = spec.theory.get(method)
    return _import_hook(spec.name, hook) if isinstance(hook, str) else hook


@functools.cache
def _import_hook(name: str, path: str) -> Any:
    module, _, attr = path.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"objective {name!r}: theory hook {path!r} cannot be imported ({err})") from None


def _closed_form(obj: Objective, m: np.ndarray, s: np.ndarray, L: np.ndarray, sign: int,
                 rho: float) -> dict[str, np.ndarray]:
    """The objective's closed-form hook; ``m``, ``s`` (S, 1) and ``L`` (1, K) broadcast to (S, K)."""
    return theory_hook(obj.spec, "closed-form")(dict(obj.params), LogNormalGrid(m, s, L, rho), sign)


# --------------------------------------------------------------------------- quadrature


_Z_LIMIT = 8.5  # the normal mass beyond is 2e-17
_COARSE_PANELS = 34  # panels of width 0.5 in z across [-8.5, 8.5]
_FINE_PANELS = 32  # panels of width 0.5 / tau in l across [-8 / tau, 8 / tau]


@functools.lru_cache(maxsize=8)
def _legendre(order: int) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(order, (int, np.integer)) or order < 2:
        raise ValueError(f"quad_nodes: must be an integer >= 2, got {order!r}")
    return np.polynomial.legendre.leggauss(int(order))


def normal_nodes(m: np.ndarray, s: np.ndarray, scale: float, order: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Nodes ``l`` and weights ``w`` with ``E[f(l)] ~ sum w f(l)`` for ``l ~ N(m, s^2)``, rows of (S, 1) ``m, s``.

    Composite Gauss-Legendre against the normal density, on panels of width
    ``0.5`` in ``z = (l - m) / s`` plus panels of width ``0.5 / scale`` in ``l``
    around the on-policy point ``l = 0``, which is also a breakpoint (the
    softsign gate and the one-sided gates have a kink there). Plain
    Gauss-Hermite puts its nodes about ``pi s / sqrt(n)`` apart near the centre
    and misses a gate of width ``1 / tau`` when ``tau s >> 1`` (2 % error in the
    mean coefficient at ``tau = 10``, ``s = 1`` with 160 nodes); this rule's
    error stays below 1e-8 there with 536 nodes per row.
    """
    x, gw = _legendre(order)
    m, s = np.broadcast_arrays(np.asarray(m, dtype=float), np.asarray(s, dtype=float))
    coarse = np.broadcast_to(np.linspace(-_Z_LIMIT, _Z_LIMIT, _COARSE_PANELS + 1), (m.shape[0], _COARSE_PANELS + 1))
    fine_l = np.linspace(-8.0 / scale, 8.0 / scale, _FINE_PANELS + 1)
    fine = np.clip((fine_l - m) / s, -_Z_LIMIT, _Z_LIMIT)
    edges = np.sort(np.concatenate([coarse, fine], axis=1), axis=1)
    half, mid = (edges[:, 1:] - edges[:, :-1]) / 2, (edges[:, 1:] + edges[:, :-1]) / 2
    z = (mid[..., None] + half[..., None] * x).reshape(m.shape[0], -1)
    w = (half[..., None] * gw).reshape(m.shape[0], -1) * np.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return m + s * z, w


def _gate_scale(obj: Objective) -> float:
    """The inverse width of the objective's gate around ``l = 0`` (its largest temperature, at least 1)."""
    taus = [float(obj.params[k]) for k in ("tau_pos", "tau_neg") if k in obj.params]
    return max([1.0, *taus])


def _quadrature(obj: Objective, m: np.ndarray, s: np.ndarray, L: np.ndarray, sign: int,
                quad_nodes: int) -> dict[str, np.ndarray]:
    """Quadrature in ``l`` through the objective's own code (or its hook); ``m``, ``s`` (S, 1), ``L`` (1, K)."""
    hook = theory_hook(obj.spec, "quadrature")
    if hook is not None:
        return hook(obj, LogNormalGrid(m, s, L), sign, quad_nodes)
    nodes, w = normal_nodes(m, s, _gate_scale(obj), quad_nodes)  # (S, n)
    zeros = np.zeros(np.broadcast_shapes(m.shape, L.shape))
    lt = torch.from_numpy(np.ascontiguousarray(nodes, dtype=np.float64))
    if obj.level == "token":  # a token objective's weight is the ratio r
        return lognormal_weight(_token_quadrature(obj, lt, w, sign), m, s * s, zeros)
    return _geometric_quadrature(obj, lt, w, sign, np.broadcast_to(L, zeros.shape))


def centred_quadrature(values: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The quadrature ``sum w x`` of the mean and ``sum w (x - mean)^2`` of the variance along the last axis.

    The centred form is non-negative by construction, where ``sum w x^2 - mean^2`` cancels to rounding noise
    (of either sign) when the variance is small against ``mean^2``. Overflow to inf is left for the caller.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        mean = (values * w).sum(-1, keepdims=True)
        return mean, (np.square(values - mean) * w).sum(-1, keepdims=True)


def _token_quadrature(obj: Objective, lt: torch.Tensor, w: np.ndarray, sign: int) -> dict[str, np.ndarray]:
    """Moments of one token's normalised coefficient ``c / A``, the objective evaluated at the nodes ``lt`` (S, n)."""
    flat = lt.reshape(-1, 1)
    adv = torch.full((flat.shape[0],), float(sign), dtype=torch.float64)
    c = obj.coefficient(flat, torch.zeros_like(flat), adv, torch.ones_like(flat, dtype=torch.bool))
    c = c.reshape(lt.shape).numpy()
    xn = c * sign
    mean, var = centred_quadrature(xn, w)
    dead = ((c == 0) * w).sum(-1, keepdims=True) * _zero_by_definition(obj)
    return {"mean_coefficient": mean, "var_coefficient": var, "dead_fraction": dead}


def _geometric_quadrature(obj: Objective, lt: torch.Tensor, w: np.ndarray, sign: int,
                          L: np.ndarray) -> dict[str, np.ndarray]:
    """A geometric mean's moments from its log gate at the nodes ``lt`` (S, n), for lengths ``L`` (S, K)."""
    with torch.no_grad():
        phi, dphi = obj.log_gate(lt, torch.full(lt.shape, sign > 0))
    phi, dphi, w = phi.numpy()[:, None, :], dphi.numpy()[:, None, :], w[:, None, :]  # (S, 1, n)
    k = (1.0 / L)[..., None]  # (S, K, 1)
    u = np.expm1(k * phi)  # e^(phi / L) - 1, exact where phi / L is tiny
    u1, v1 = centred_quadrature(u, w)
    c1, cv = centred_quadrature((1 + u) * dphi, w)
    out = geometric_moments(u1[..., 0], v1[..., 0], c1[..., 0], cv[..., 0], L)
    zeros = np.zeros(L.shape)
    out["dead_fraction"] = ((dphi == 0) * w).sum(-1) * _zero_by_definition(obj) + zeros
    return {k_: v + zeros for k_, v in out.items()}


# --------------------------------------------------------------------------- Monte Carlo


def _monte_carlo(obj: Objective, model: LogNormalRatios | EmpiricalRatios, sign: int, n_samples: int | None,
                 seed: int) -> tuple[dict[str, float], dict[str, float]]:
    """Sample log-ratios, evaluate ``objective.terms`` on them (or the objective's hook); (stats, standard errors).

    Streamed: the samples are drawn and evaluated in chunks of :data:`MC_CHUNK_TOKENS` tokens (one sequence when a
    sequence is longer) and only running sums are kept (:class:`~.moments.MonteCarloSums`), so memory is bounded by
    the chunk, not by ``n_samples``. The chunks split one random stream: the same seed gives the same samples
    whatever the chunk size.
    """
    _check_mc_work(model, n_samples)
    hook = theory_hook(obj.spec, "monte-carlo")
    if hook is not None:
        return hook(obj, model, sign, n_samples, seed)
    rng = np.random.default_rng(seed)
    sums = MonteCarloSums()
    for values, mask in model.chunks(n_samples, rng, MC_CHUNK_TOKENS):
        _return_freed_memory()
        _add_chunk(sums, obj, torch.from_numpy(values), torch.from_numpy(mask), sign)
    return sums.stats()


def _add_chunk(sums: MonteCarloSums, obj: Objective, lt: torch.Tensor, mt: torch.Tensor, sign: int) -> None:
    """One chunk of sequences through ``objective.terms``, into the running sums (one row per sequence)."""
    adv = torch.full((lt.shape[0],), float(sign), dtype=torch.float64)
    with torch.no_grad():
        t = obj.terms(lt, torch.zeros_like(lt), adv, mt)[0]
    n_tok = mt.sum(-1).to(torch.float64)
    c = t.coefficient.to(torch.float64)
    x = torch.where(mt, c * sign * (n_tok[:, None] if obj.level == "sequence" else 1.0), 0.0)
    w = t.weight.to(torch.float64)
    if w.dim() == 1:  # one weight per sequence
        w1, w2, wn, w_mask = w, w * w, torch.ones_like(w), torch.ones_like(w, dtype=torch.bool)
    else:
        w, w_mask = torch.where(mt, w, 0.0), mt
        w1, w2, wn = w.sum(-1), (w * w).sum(-1), n_tok
    dead = (mt & (c == 0)).sum(-1) * _zero_by_definition(obj)
    columns = torch.stack([n_tok, x.sum(-1), (x * x).sum(-1), dead.to(torch.float64), w1, w2, wn])
    sums.add(columns.numpy(), (x, mt), (w, w_mask))


# --------------------------------------------------------------------------- public API


def _resolve_method(obj: Objective, model: LogNormalRatios | EmpiricalRatios, method: str) -> str:
    allowed = available_methods(obj, model)
    if method == "auto":
        return allowed[0]
    if method not in allowed:
        what = "an empirical model" if isinstance(model, EmpiricalRatios) else (
            "correlated tokens" if not model.iid else "this model")
        raise ValueError(f"method: {method!r} is not available for objective {obj.name!r} with {what}; "
                         f"allowed values: auto, {', '.join(allowed)}")
    return method


def analyse(
    objective: str | Objective,
    model: LogNormalRatios | EmpiricalRatios,
    advantage_sign: int | str = +1,
    method: str = "auto",
    n_samples: int | None = None,
    seed: int = 0,
    quad_nodes: int = DEFAULT_QUAD_NODES,
    **params: Any,
) -> TheoryResult:
    """Moments of an objective's normalised gradient coefficient and importance weight.

    Args:
        objective: a registered objective name, a reference estimator
            (``pg``, ``is-token``, ``is-seq``) or an :class:`Objective`.
        model: :class:`LogNormalRatios` or :class:`EmpiricalRatios`.
        advantage_sign: ``+1`` / ``-1`` (also ``"+"``, ``"-"``, ``"pos"``, ``"neg"``):
            the sign of ``A`` every sequence gets; the gates depend on it.
        method: ``auto`` (closed form, else quadrature, else Monte Carlo),
            ``closed-form``, ``quadrature`` or ``monte-carlo``.
        n_samples: Monte Carlo sequences (default :data:`DEFAULT_N_SAMPLES`; for an
            empirical model, default all of its sequences, else a bootstrap of ``n``).
            Streamed in chunks of :data:`MC_CHUNK_TOKENS` tokens: memory does not grow with it.
        seed: Monte Carlo seed.
        quad_nodes: Gauss-Legendre nodes per panel of the quadrature (:func:`normal_nodes`).
        **params: the objective's parameters (``eps``, ``tau``, ``gate``, ...).

    Returns:
        A :class:`TheoryResult`; ``mc_stderr`` holds the standard errors when
        Monte Carlo was used. Variances are non-negative: a negative within
        rounding (:data:`~.moments.VARIANCE_RTOL` of ``E[X]^2``) is 0, a larger
        one a ValueError; a statistic beyond float64 is a ValueError naming the
        model or, when the model is in range, the objective's parameters.

    Example::

        GRPO's dead fraction for ``A > 0`` is ``P(r > 1 + eps)``, a log-normal tail:

        >>> r = analyse("grpo", LogNormalRatios(0.3), advantage_sign=+1)
        >>> s, m = 0.3, -0.3**2 / 2
        >>> round(r.dead_fraction, 4), round(0.5 * math.erfc((math.log(1.2) - m) / (s * math.sqrt(2))), 4)
        (0.2243, 0.2243)
    """
    obj = resolve_objective(objective, **params)
    if not isinstance(model, (LogNormalRatios, EmpiricalRatios)):
        raise ValueError(f"model: expected LogNormalRatios or EmpiricalRatios, got {type(model).__name__}")
    sign = parse_sign(advantage_sign)
    method = _resolve_method(obj, model, _check_method(method))
    if isinstance(model, LogNormalRatios):
        length: float = model.length
    else:
        length = model.mean_length
    stderr = None
    if method == "monte-carlo":
        if n_samples is None and isinstance(model, LogNormalRatios):
            n_samples = DEFAULT_N_SAMPLES
        if n_samples is not None and (not isinstance(n_samples, (int, np.integer)) or n_samples < 2):
            raise ValueError(f"n_samples: must be an integer >= 2, got {n_samples!r}")
        stats, stderr = _monte_carlo(obj, model, sign, n_samples, seed)
    else:
        m = np.array([[model.log_ratio_mean]])
        s = np.array([[model.log_ratio_std]])
        L = np.array([[float(model.length)]])
        arrays = (_closed_form(obj, m, s, L, sign, model.correlation) if method == "closed-form"
                  else _quadrature(obj, m, s, L, sign, quad_nodes))
        stats = {k: float(arrays[k].reshape(-1)[0]) for k in STATS}
    stats = {k: float(v) for k, v in _checked_variances(stats).items()}
    _check_finite(stats, model, obj)
    return TheoryResult(obj.name, model.log_ratio_mean, model.log_ratio_std, length, sign, method=method,
                        mc_stderr=stderr, params=dict(obj.params), **stats)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's ``malloc_trim``, or None off glibc."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _return_freed_memory() -> None:
    """Hand the previous chunk's freed pages back to the system. Without it glibc, which raises its mmap threshold
    after the first large free, serves every later chunk from a heap that only grows: 12 GB resident at length
    1e5 x 3000 samples, where the chunks themselves need a few MB."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _check_mc_work(model: LogNormalRatios | EmpiricalRatios, n_samples: int | None) -> None:
    """Refuse Monte Carlo beyond :data:`MC_MAX_TOKENS` tokens, warn beyond :data:`MC_WARN_TOKENS` (memory stays
    bounded either way: the samples are drawn and evaluated in chunks of :data:`MC_CHUNK_TOKENS`)."""
    n = model.n_sequences if n_samples is None else n_samples
    tokens = float(n) * float(model.mean_length)
    if tokens > MC_MAX_TOKENS:
        raise ValueError(f"n_samples: Monte Carlo over {n} sequences x length {model.mean_length:g} = {tokens:.3g} "
                         f"tokens would take minutes; allowed: n_samples x length <= {MC_MAX_TOKENS:.0e} "
                         "(fewer samples, a shorter length, or method closed-form / quadrature)")
    if tokens > MC_WARN_TOKENS:
        warnings.warn(f"Monte Carlo over {tokens:.3g} tokens: expect several seconds", UserWarning, stacklevel=3)


def _checked_variances(stats: dict[str, Any]) -> dict[str, Any]:
    """``stats`` with each variance clamped at 0 within rounding of its mean's square; a larger negative raises.

    The theory's own variances are non-negative by construction or already clamped (:mod:`.moments`); this is the
    rule for every hook's, a user's included: :func:`~.moments.clamp_variance` against ``E[X]^2``, the term that
    ``E[X^2] - E[X]^2`` subtracts.
    """
    out = dict(stats)
    for var_key, mean_key in (("var_coefficient", "mean_coefficient"), ("var_weight", "mean_weight")):
        with np.errstate(over="ignore"):
            square = np.square(np.asarray(stats[mean_key], dtype=float))
        out[var_key] = clamp_variance(stats[var_key], square, var_key)
    return out


def _blamed_params(obj: Objective) -> dict[str, Any]:
    """The objective's numeric parameters set away from their defaults (all numeric ones if none is)."""
    numeric = {k: v for k, v in obj.params.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    changed = {k: v for k, v in numeric.items() if obj.spec.defaults.get(k) != v}
    return changed or numeric


def _check_finite(stats: dict[str, float], model: LogNormalRatios | EmpiricalRatios, obj: Objective) -> None:
    """A statistic beyond float64 is a ValueError naming the culprit, never an inf or a NaN.

    The weight's variance grows like ``exp(Var(sum of log-ratios))``: beyond :data:`MAX_SUM_VARIANCE` the model is
    to blame and the error names ``log_ratio_std``; inside it, the objective's parameters are (a temperature of
    1e300 squares to inf), and the error names those set away from their defaults.
    """
    bad = sorted(k for k, v in stats.items() if not math.isfinite(v))
    if bad:
        sum_var = model.sum_variance() if isinstance(model, LogNormalRatios) else float("nan")
        blamed = _blamed_params(obj)
        if sum_var < MAX_SUM_VARIANCE and blamed:
            raise ValueError(f"{', '.join(blamed)}: {', '.join(f'{v:g}' for v in blamed.values())} put "
                             f"{', '.join(bad)} of objective {obj.name!r} beyond float64 at log_ratio_std "
                             f"{model.log_ratio_std:g} (length {model.mean_length:g}), a model inside the supported "
                             f"range (Var(sum of log-ratios) = {sum_var:.4g} < {MAX_SUM_VARIANCE:g}); use smaller "
                             "values")
        raise ValueError(f"log_ratio_std: {model.log_ratio_std:g} (length {model.mean_length:g}) puts "
                         f"{', '.join(bad)} beyond float64 (Var(sum of log-ratios) = {sum_var:.4g}; the weight's "
                         f"moments grow like exp of it); supported: Var(sum of log-ratios) < {MAX_SUM_VARIANCE:g}")


def _grid_settings(name: str, taus: Sequence[float] | None, eps: Sequence[float] | None,
                   gates: Sequence[str] | None) -> list[dict[str, Any]]:
    """The parameter settings a sweep visits for one objective name.

    A gated objective sweeps ``tau`` for its soft gates and ``eps`` for the hard
    clip, never both: the other parameter does not act on that gate.
    """
    defaults = get_spec(name, include_references=True).defaults if name in all_objective_names() else {}
    settings: list[dict[str, Any]] = [{}]
    if gates is not None and "gate" in defaults:
        settings = [{"gate": g} for g in gates]
    out = []
    for setting in settings:
        hard = setting.get("gate", defaults.get("gate")) == "hard-clip"
        grids = []
        if taus is not None and "tau_pos" in defaults and not hard:
            grids.append([("tau", float(t)) for t in taus])
        if eps is not None and "eps_lo" in defaults and (hard or "gate" not in defaults):
            grids.append([("eps", float(e)) for e in eps])
        expanded = [setting]
        for grid in grids:
            expanded = [{**s, k: v} for s in expanded for k, v in grid]
        out += expanded
    return out


def _effective(params: dict[str, Any], sign: int) -> tuple[float, float]:
    """The temperature and clip width in force for one advantage sign (NaN where absent or inert)."""
    tau = params.get("tau_pos" if sign > 0 else "tau_neg", math.nan)
    eps = params.get("eps_hi" if sign > 0 else "eps_lo", params.get("eps_max", math.nan))
    if "gate" in params:  # a gated objective: tau acts on soft gates, eps on the hard clip
        if params["gate"] == "hard-clip":
            tau = math.nan
        else:
            eps = math.nan
    return float(tau), float(eps)


def sweep(  # noqa: PLR0913 - the grid axes plus analyse()'s keyword options, as scipy-style APIs do
    objectives: Iterable[str | Objective] | str,
    stds: Iterable[float],
    lengths: Iterable[int],
    signs: Iterable[int | str] = (1, -1),
    taus: Iterable[float] | None = None,
    eps: Iterable[float] | None = None,
    method: str = "auto",
    *,
    gates: Iterable[str] | None = None,
    log_ratio_mean: float | None = None,
    correlation: float = 0.0,
    n_samples: int | None = None,
    seed: int = 0,
    quad_nodes: int = DEFAULT_QUAD_NODES,
) -> pd.DataFrame:
    """Analyse every objective over a grid; one row per point, as a tidy DataFrame.

    The analytic paths are vectorised over ``stds`` x ``lengths`` (one evaluation
    per objective setting and sign); Monte Carlo, where needed or requested, runs
    per point.

    Args:
        objectives: names (``"all"`` for every registered objective and reference
            estimator) or :class:`Objective` instances (used as they are).
        stds: token log-ratio standard deviations (> 0).
        lengths: sequence lengths (>= 1).
        signs: advantage signs.
        taus: temperatures for the objectives that have one (``tau_pos = tau_neg = tau``).
        eps: clip widths for the objectives with ``eps_lo`` / ``eps_hi`` (both set).
        method: as in :func:`analyse`.
        gates: gate families for the objectives with a ``gate`` parameter.
        log_ratio_mean: fixed mean ``m`` (default ``-std^2 / 2`` at each std).
        correlation: AR(1) correlation of the log-normal model.
        n_samples, seed, quad_nodes: as in :func:`analyse`.

    Returns:
        Columns :data:`RESULT_KEYS` plus ``gate``, ``tau``, ``eps`` (the values in
        force for the row's sign), ``one_sided`` and ``params`` (JSON of all).
    """
    import pandas as pd

    if isinstance(objectives, str):
        objectives = all_objective_names() if objectives == "all" else [objectives]
    s_arr = np.array([check_std(v) for v in stds], dtype=float)
    l_arr = np.array([check_length(v) for v in lengths], dtype=float)
    if s_arr.size == 0 or l_arr.size == 0:
        raise ValueError("stds, lengths: need at least one value each")
    sign_list = [parse_sign(v) for v in signs]
    rho = check_correlation(correlation)
    _check_method(method)
    taus, eps, gates = (None if v is None else list(v) for v in (taus, eps, gates))
    m_arr = -s_arr**2 / 2 if log_ratio_mean is None else np.full_like(s_arr, float(log_ratio_mean))
    grid = _SweepGrid(m_arr, s_arr, l_arr, rho, n_samples or DEFAULT_N_SAMPLES, seed, quad_nodes)
    blocks: list[dict[str, Any]] = []
    for item in objectives:
        settings = [None] if isinstance(item, Objective) else _grid_settings(item, taus, eps, gates)
        for setting in settings:
            obj = item if setting is None else resolve_objective(item, **setting)
            probe = LogNormalRatios(float(s_arr[0]), int(l_arr[0]), correlation=rho)
            chosen = _resolve_method(obj, probe, method)
            blocks += [_sweep_block(obj, sign, chosen, grid) for sign in sign_list]
    if not blocks:
        raise ValueError("objectives: need at least one objective")
    columns = {k: np.concatenate([b[k] for b in blocks]) for k in blocks[0]}
    return pd.DataFrame(columns)


@dataclass(frozen=True)
class _SweepGrid:
    """The points of a sweep: means and stds (S,), lengths (K,), and how to evaluate them."""

    mean: np.ndarray
    std: np.ndarray
    length: np.ndarray
    correlation: float
    n_samples: int
    seed: int
    quad_nodes: int


def _grid_stats(obj: Objective, sign: int, method: str, g: _SweepGrid) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Every statistic over the (S, K) grid, and the Monte Carlo standard errors (None elsewhere)."""
    S, K = g.std.size, g.length.size
    if method != "monte-carlo":
        m_col, s_col, L_row = g.mean[:, None], g.std[:, None], g.length[None, :]
        stats = _checked_variances(_closed_form(obj, m_col, s_col, L_row, sign, g.correlation)
                                   if method == "closed-form" else _quadrature(obj, m_col, s_col, L_row, sign,
                                                                               g.quad_nodes))
        for k in STATS:
            bad = np.argwhere(~np.isfinite(np.broadcast_to(np.asarray(stats[k], dtype=float), (S, K))))
            if bad.size:
                i, j = bad[0]
                _check_finite({k: float("nan")}, LogNormalRatios(float(g.std[i]), int(g.length[j]),
                                                                 float(g.mean[i]), g.correlation), obj)
        return stats, np.full((S, K), None, dtype=object)
    stats = {k: np.empty((S, K)) for k in STATS}
    errs = np.empty((S, K), dtype=object)
    for i in range(S):
        for j in range(K):
            model = LogNormalRatios(float(g.std[i]), int(g.length[j]), float(g.mean[i]), g.correlation)
            vals, errs[i, j] = _monte_carlo(obj, model, sign, g.n_samples, g.seed)
            vals = _checked_variances(vals)
            _check_finite(vals, model, obj)
            for k in STATS:
                stats[k][i, j] = vals[k]
    return stats, errs


def _sweep_block(obj: Objective, sign: int, method: str, g: _SweepGrid) -> dict[str, np.ndarray]:
    """The sweep's columns for one objective setting and sign, one row per (std, length)."""
    stats, errs = _grid_stats(obj, sign, method, g)
    n, K = g.std.size * g.length.size, g.length.size
    tau, eps_eff = _effective(obj.params, sign)
    return {
        "objective": np.full(n, obj.name, dtype=object),
        "log_ratio_mean": np.repeat(g.mean, K),
        "log_ratio_std": np.repeat(g.std, K),
        "length": np.tile(g.length.astype(int), g.std.size),
        "advantage_sign": np.full(n, sign),
        **{k: np.asarray(stats[k], dtype=float).reshape(-1) for k in STATS},
        "method": np.full(n, method, dtype=object),
        "mc_stderr": errs.reshape(-1),
        "gate": np.full(n, obj.params.get("gate"), dtype=object),
        "tau": np.full(n, tau),
        "eps": np.full(n, eps_eff),
        "one_sided": np.full(n, obj.params.get("one_sided"), dtype=object),
        "params": np.full(n, json.dumps(obj.params, sort_keys=True), dtype=object),
    }
