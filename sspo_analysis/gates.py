"""Gate functions: the soft (and hard) maps that bound how far a ratio may move.

A gate ``g`` acts on a deviation ``u`` from the on-policy point: ``u = r - 1`` in
ratio space (SAPO-style) or ``u = l = log r`` in log space (SSPO-style). Its
*weight* ``g'(u)`` multiplies the policy-gradient term of every token, so the
weight is what decides how much signal survives off-policy.

Every family is written in ``u`` only; where the ``u`` comes from is the
objective's business (``docs/theory.md``, "Gates", states the families and
admissibility). The families live in one open registry: the built-in ones
are registered with :func:`register_gate` like any user's, and every caller that
takes a gate by name (objectives, theory, ``sspo gates``, the engine
integrations, the CLI) resolves it through :func:`resolve_gate_name`, which also
accepts an import path ``package.module:function``::

    from sspo_analysis import register_gate

    register_gate("cauchy2", lambda u, tau: (tau * u / (1 + (tau * u) ** 2) + torch.atan(tau * u)) / (2 * tau))
    get_objective("sspo", gate="cauchy2")  # the weight comes from autograd
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

Tensor = torch.Tensor
TauLike = float | Tensor
GateFn = Callable[[Tensor, TauLike], Tensor]

SPACES: tuple[str, ...] = ("ratio", "log")
PARAMETERS: tuple[str, ...] = ("tau", "eps", "none")
_ALIASES = {"clip": "hard-clip", "hard": "hard-clip", "hard_clip": "hard-clip", "none": "identity"}

_SQRT_PI = math.sqrt(math.pi)


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Low-precision inputs are evaluated in float32 and cast back on return.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class GateFamily:
    """A registry entry: a gate's value and weight as functions of ``(u, tau)``.

    - ``parameter``: what sets the gate's width: ``"tau"`` (a temperature, the
      soft gates), ``"eps"`` (a clip range; the second argument is then
      ``(eps_lo, eps_hi)``) or ``"none"`` (the identity).
    - ``symmetric``: the family claims ``g(-u) = -g(u)`` (checked by the testing kit).
    - ``dead_zone``: the weight is zero *by definition* on a region (the hard
      clip's flat part); the theory counts tokens there as dead, and only there.
    """

    name: str
    value: GateFn
    weight: GateFn
    doc: str = ""
    parameter: str = "tau"
    symmetric: bool = False
    dead_zone: bool = False

    @property
    def soft(self) -> bool:
        """A temperature-parametrised gate (what ``soft-NAME`` and :data:`SOFT_GATES` list)."""
        return self.parameter == "tau"


_REGISTRY: dict[str, GateFamily] = {}
_BUILTIN: set[str] = set()


def _autograd_weight(value: GateFn) -> GateFn:
    """The derivative of an element-wise ``value(u, tau)`` in ``u``, by autograd."""

    def weight(u: Tensor, tau: TauLike) -> Tensor:
        shape = torch.broadcast_shapes(u.shape, tau.shape) if isinstance(tau, Tensor) else u.shape
        with torch.enable_grad():
            x = u.detach().expand(shape).clone().requires_grad_(True)
            y = value(x, tau)
            (grad,) = torch.autograd.grad(y.sum(), x, allow_unused=True)
        return torch.zeros_like(x) if grad is None else grad.detach()

    return weight


def _check_name(name: object) -> str:
    if not isinstance(name, str) or not name or any(c in name for c in ", \t\n"):
        raise ValueError(f"gate name: must be a non-empty string without commas or spaces, got {name!r}")
    if name in _BUILTIN or name in _ALIASES:
        raise ValueError(f"gate name: {name!r} is a built-in gate; choose another name")
    return name


def register_gate(
    name: str,
    value: GateFn,
    weight: GateFn | None = None,
    *,
    doc: str = "",
    parameter: str = "tau",
    symmetric: bool = False,
    dead_zone: bool = False,
) -> GateFamily:
    """Register a gate family under ``name``; it then works wherever a built-in gate does.

    Args:
        name: the registry key (used by ``get_gate``, ``get_objective(..., gate=name)``,
            the theory, ``sspo gates``, ``soft-NAME`` in TRL and verl, ``--gate``).
        value: ``value(u, tau) -> Tensor``, element-wise, with ``value(0) = 0``; ``tau``
            is a float or a tensor broadcastable against ``u``.
        weight: its derivative in ``u``, ``weight(u, tau)``; omitted, autograd computes it.
        doc: one line shown by ``sspo gates`` and the reports.
        parameter: ``"tau"``, ``"eps"`` or ``"none"`` (see :class:`GateFamily`).
        symmetric: claim that the gate is odd (its weight even); the testing kit checks it.
        dead_zone: the weight is zero by definition on a region (see :class:`GateFamily`).

    Re-registering a user name replaces it (a notebook cell run twice); the
    built-in names cannot be replaced. Returns the entry.
    """
    if not callable(value) or (weight is not None and not callable(weight)):
        raise ValueError(f"gate {name!r}: value and weight must be callables (u, tau) -> Tensor")
    if parameter not in PARAMETERS:
        raise ValueError(f"gate parameter: unknown value {parameter!r}; allowed values: {', '.join(PARAMETERS)}")
    family = GateFamily(_check_name(name), value, weight or _autograd_weight(value), doc or (value.__doc__ or ""),
                        parameter, symmetric, dead_zone)
    _REGISTRY[name] = family
    return family


def is_builtin(name: str) -> bool:
    """Whether ``name`` is one of the package's own gate families (or an alias of one)."""
    return _ALIASES.get(name, name) in _BUILTIN


def unregister_gate(name: str) -> None:
    """Remove a user gate from the registry (built-ins stay)."""
    if name in _BUILTIN:
        raise ValueError(f"gate name: {name!r} is a built-in gate and cannot be removed")
    _REGISTRY.pop(name, None)


class _RegistryView(Sequence[str]):
    """A live, read-only view of the registered gate names (optionally only the soft ones)."""

    def __init__(self, soft_only: bool) -> None:
        self._soft_only = soft_only

    def _names(self) -> tuple[str, ...]:
        return tuple(n for n, f in _REGISTRY.items() if f.soft or not self._soft_only)

    def __getitem__(self, index):  # type: ignore[override]
        return self._names()[index]

    def __len__(self) -> int:
        return len(self._names())

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __contains__(self, name: object) -> bool:
        return name in self._names()

    def __eq__(self, other: object) -> bool:
        return tuple(self) == tuple(other) if isinstance(other, (tuple, list, _RegistryView)) else NotImplemented

    def __hash__(self) -> int:
        return hash(self._names())

    def __repr__(self) -> str:
        return repr(self._names())


GATES: Sequence[str] = _RegistryView(soft_only=False)
"""Every registered gate name, built-ins first (a live view of the registry)."""
SOFT_GATES: Sequence[str] = _RegistryView(soft_only=True)
"""The registered gates with a temperature (a live view of the registry)."""


def _import_gate(path: str) -> GateFamily:
    """Import ``package.module:attribute`` and register it under ``path``.

    The attribute is the gate's value ``(u, tau) -> Tensor`` (its weight comes
    from autograd), or a :class:`GateFamily` returned by :func:`register_gate`.
    """
    module_name, _, attr = path.partition(":")
    try:
        target = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"gate: cannot import {path!r} ({type(err).__name__}: {err}); "
                         "give package.module:function with the module on PYTHONPATH") from None
    if isinstance(target, GateFamily):
        _check_protocol(path, target.value, target.parameter)
        return register_gate(path, target.value, target.weight, doc=target.doc, parameter=target.parameter,
                             symmetric=target.symmetric, dead_zone=target.dead_zone)
    if not callable(target):
        raise ValueError(f"gate: {path!r} is not a function (u, tau) -> Tensor")
    _check_protocol(path, target, "tau")
    doc = (target.__doc__ or "").strip().splitlines()
    return register_gate(path, target, doc=doc[0] if doc else f"{path} (imported)")


def _check_protocol(path: str, value: GateFn, parameter: str) -> None:
    """Refuse an imported callable that is not a gate value: ``value(u, tau)`` (``(u, (eps_lo, eps_hi))`` for an
    ``eps`` family) must return a floating tensor of ``u``'s shape. Whether it is an admissible gate is the
    testing kit's question (``sspo_analysis.testing.check_gate``), not this one."""
    u = torch.tensor([-0.5, 0.0, 0.5], dtype=torch.float64)
    try:
        out = value(u, (0.2, 0.2) if parameter == "eps" else 1.0)
    except Exception as err:  # foreign code: any failure means it does not take (u, tau)
        raise ValueError(f"gate: {path!r} is not a gate: value(u, tau) raised {type(err).__name__}: "
                         f"{str(err)[:120]}; a gate is a function (u: Tensor, tau: float) -> Tensor") from None
    if not (isinstance(out, Tensor) and out.shape == u.shape and out.is_floating_point()):
        got = f"a tensor of shape {tuple(out.shape)}" if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"gate: {path!r} is not a gate: value(u, tau) returned {got}, expected a floating "
                         "tensor of u's shape")


def resolve_gate_name(name: str) -> str:
    """The canonical registry name of a gate name, alias or import path ``package.module:function``.

    An import path is imported on first use and registered under that string.
    Raises one ValueError line naming the allowed values otherwise.
    """
    if not isinstance(name, str):
        raise ValueError(f"gate: must be a name, got {name!r}; allowed values: {', '.join(GATES)}")
    key = _ALIASES.get(name, name)
    if key in _REGISTRY:
        return key
    if ":" in key:
        return _import_gate(key).name
    raise ValueError(f"gate: unknown name {name!r}; allowed values: {', '.join(GATES)}, "
                     "or an import path package.module:function")


def gate_family(name: str) -> GateFamily:
    """The registry entry of a gate name, alias or import path."""
    return _REGISTRY[resolve_gate_name(name)]


# --------------------------------------------------------------------------- the built-in families


def _clip_value(u: Tensor, eps: tuple[float, float]) -> Tensor:
    return u.clamp(-eps[0], eps[1])


def _clip_weight(u: Tensor, eps: tuple[float, float]) -> Tensor:
    return ((u >= -eps[0]) & (u <= eps[1])).to(u.dtype)


def _register_builtins() -> None:
    """The built-in families, through the same :func:`register_gate` as a user's."""
    soft = {
        "sigmoid": (
            lambda u, tau: (2.0 / tau) * torch.tanh(tau * u / 2.0),
            # sech^2(x/2) = 4 sigmoid(x) sigmoid(-x): exact in the tails, unlike 1 - tanh^2.
            lambda u, tau: 4.0 * torch.sigmoid(tau * u) * torch.sigmoid(-tau * u),
            "(2/tau) tanh(tau u / 2); weight sech^2(tau u / 2)",
        ),
        "erf": (
            lambda u, tau: _SQRT_PI / (2.0 * tau) * torch.erf(tau * u),
            lambda u, tau: torch.exp(-((tau * u) ** 2)),
            "sqrt(pi) / (2 tau) erf(tau u); weight exp(-(tau u)^2)",
        ),
        "arctan": (
            lambda u, tau: torch.atan(tau * u) / tau,
            lambda u, tau: 1.0 / (1.0 + (tau * u) ** 2),
            "arctan(tau u) / tau; weight 1 / (1 + (tau u)^2)",
        ),
        "softsign": (
            lambda u, tau: u / (1.0 + tau * u.abs()),
            lambda u, tau: 1.0 / (1.0 + tau * u.abs()) ** 2,
            "u / (1 + tau |u|); weight 1 / (1 + tau |u|)^2",
        ),
    }
    register_gate("identity", lambda u, tau: u, lambda u, tau: torch.ones_like(u), doc="u; weight 1 (no gate)",
                  parameter="none", symmetric=True)
    for name, (value, weight, doc) in soft.items():
        register_gate(name, value, weight, doc=doc, symmetric=True)
    register_gate("hard-clip", _clip_value, _clip_weight, doc="clamp(u, -eps_lo, eps_hi); weight 1 inside, 0 outside",
                  parameter="eps", symmetric=True, dead_zone=True)
    _BUILTIN.update(_REGISTRY)


_register_builtins()


ADMISSIBILITY: tuple[str, ...] = ("c1", "max_at_origin", "monotone", "vanishing_tails")


@dataclass(frozen=True)
class Admissibility:
    """Which of the four admissibility properties a gate's weight has.

    Each property is checked numerically on a dense grid; see
    :meth:`Gate.check_admissible`. ``witnesses`` holds, for each property that
    fails, where on the grid it fails (``"weight(0.7071) = 1.213 > 1"``).
    """

    c1: bool
    max_at_origin: bool
    monotone: bool
    vanishing_tails: bool
    witnesses: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def admissible(self) -> bool:
        return self.c1 and self.max_at_origin and self.monotone and self.vanishing_tails

    def failures(self) -> list[str]:
        """Names of the properties that do not hold."""
        return [k for k in ADMISSIBILITY if not getattr(self, k)]


Check = tuple[bool, str]
"""A grid check's verdict and, when it fails, where."""


def _continuity(gate: Gate, scale: float) -> Check:
    """The weight is continuous and is the derivative of the value (central differences)."""

    def jumps(n: int) -> Tensor:
        # Weight changes between neighbours in a window of fixed width around the
        # origin, sampled at n points: the largest shrinks with n iff continuous.
        grid = torch.linspace(-3 * scale, 3 * scale, n, dtype=torch.float64)
        return gate.weight(grid).diff().abs()

    coarse, fine = jumps(2_001), jumps(20_001)
    if not (float(fine.max()) < 0.5 * float(coarse.max()) or float(fine.max()) < 1e-6):
        at = float(torch.linspace(-3 * scale, 3 * scale, 20_001, dtype=torch.float64)[int(fine.argmax())])
        return False, f"weight jumps by {float(fine.max()):.4g} at u = {at:.6g}"
    grid = torch.linspace(-3 * scale, 3 * scale, 6_001, dtype=torch.float64)
    h = 1e-6 * scale
    error = ((gate(grid + h) - gate(grid - h)) / (2 * h) - gate.weight(grid)).abs()
    if not float(error.max()) <= 1e-4:
        i = int(error.argmax())
        return False, f"weight({float(grid[i]):.6g}) differs from the value's slope by {float(error[i]):.4g}"
    return True, ""


def _max_at_origin(u: Tensor, w: Tensor, w0: float) -> Check:
    if abs(w0 - 1.0) >= 1e-12:
        return False, f"weight(0) = {w0:.6g}, not 1"
    if not bool((w <= 1.0 + 1e-12).all()):
        i = int(w.argmax())
        return False, f"weight({float(u[i]):.6g}) = {float(w[i]):.6g} > weight(0) = 1"
    return True, ""


def _monotone(u: Tensor, w: Tensor) -> Check:
    mid, tol = u.numel() // 2, 1e-12
    rises = torch.cat([(w[mid:].diff() > tol), (w[: mid + 1].diff() < -tol)])  # growth away from 0
    if bool(rises.any()):
        j = int(rises.nonzero()[0])
        i = mid + j + 1 if j < u.numel() - mid - 1 else j - (u.numel() - mid - 1)
        return False, f"weight grows with |u| at u = {float(u[i]):.6g} (weight {float(w[i]):.12g})"
    return True, ""


def _tails(u: Tensor, w: Tensor) -> Check:
    if not bool(w[0] < 1e-3 and w[-1] < 1e-3):
        i = 0 if w[0] >= 1e-3 else -1
        return False, f"weight({float(u[i]):.6g}) = {float(w[i]):.6g} >= 1e-3"
    return True, ""


@dataclass(frozen=True)
class Gate:
    """A gate family at a temperature (soft) or a clip range (hard).

    ``tau`` may be a float or a tensor broadcastable against ``u`` (objectives
    pick the temperature per token from the advantage's sign). ``eps_lo`` and
    ``eps_hi`` are the hard clip's range ``[-eps_lo, eps_hi]`` in ``u``.
    ``space`` records whether ``u`` means ``r - 1`` or ``log r``; the formulas
    do not depend on it, only the plots and the admissibility grid do.
    """

    name: str
    tau: TauLike = 1.0
    eps_lo: float = 0.2
    eps_hi: float = 0.2
    space: str = "log"

    def __call__(self, u: Tensor) -> Tensor:
        """Gate value ``g(u)``, in ``u``'s dtype."""
        return self._eval(u, 0)

    def weight(self, u: Tensor) -> Tensor:
        """Gate weight ``g'(u)``, in ``u``'s dtype."""
        return self._eval(u, 1)

    @property
    def family(self) -> GateFamily:
        """The registry entry this gate evaluates."""
        return _REGISTRY[self.name]

    def _eval(self, u: Tensor, which: int) -> Tensor:
        uc = u.to(_compute_dtype(u))
        family = self.family
        fn = family.value if which == 0 else family.weight
        if family.parameter == "eps":
            out = fn(uc, (self.eps_lo, self.eps_hi))
        else:
            out = fn(uc, self.tau.to(uc.dtype) if isinstance(self.tau, Tensor) else self.tau)
        return out.to(u.dtype)

    def check_admissible(self, half_width: float | None = None, points: int = 200_001) -> Admissibility:
        """Check the four admissibility properties numerically.

        The weight is sampled on a symmetric grid around the on-policy point,
        ``|u| <= half_width`` (default: ``2000 / tau``, or ``2000 * eps`` for the
        hard clip, far into every tail), denser near the origin.

        - ``c1``: the weight is continuous (its largest jump between grid
          neighbours shrinks when the grid is refined tenfold) and equals the
          finite-difference derivative of the gate value.
        - ``max_at_origin``: weight(0) == 1 and weight <= 1 everywhere.
        - ``monotone``: non-increasing in ``|u|`` on each side.
        - ``vanishing_tails``: the weight at the grid's ends is below 1e-3.
        """
        if isinstance(self.tau, Tensor):
            raise ValueError("check_admissible needs a scalar tau, got a tensor")
        scale = max(self.eps_lo, self.eps_hi) if self.family.parameter == "eps" else 1.0 / float(self.tau)
        half = half_width if half_width is not None else 2000.0 * scale
        # Geometric spacing gives resolution near 0 and reach into the tails.
        pos = torch.cat(
            [
                torch.zeros(1, dtype=torch.float64),
                torch.logspace(math.log10(half) - 9, math.log10(half), points // 2, dtype=torch.float64),
            ]
        )
        u = torch.cat([-pos.flip(0)[:-1], pos])
        w = self.weight(u)
        w0 = float(self.weight(torch.zeros(1, dtype=torch.float64)))
        checks = {"c1": _continuity(self, scale), "max_at_origin": _max_at_origin(u, w, w0),
                  "monotone": _monotone(u, w), "vanishing_tails": _tails(u, w)}
        return Admissibility(**{k: ok for k, (ok, _) in checks.items()},
                             witnesses={k: why for k, (ok, why) in checks.items() if not ok})


def get_gate(
    name: str,
    tau: TauLike = 1.0,
    eps: float | tuple[float, float] = 0.2,
    space: str = "log",
) -> Gate:
    """Build a gate by family name.

    Args:
        name: one of :data:`GATES` (aliases: ``clip``, ``hard`` for ``hard-clip``), or an
            import path ``package.module:function`` (see :func:`resolve_gate_name`).
        tau: temperature of a soft family (> 0); float or broadcastable tensor.
        eps: hard-clip half-width, or ``(eps_lo, eps_hi)`` for an asymmetric range.
        space: ``"ratio"`` (``u = r - 1``) or ``"log"`` (``u = log r``).
    """
    key = resolve_gate_name(name)
    if space not in SPACES:
        raise ValueError(f"gate space: unknown value {space!r}; allowed values: {', '.join(SPACES)}")
    if not isinstance(tau, Tensor) and not (tau > 0 and math.isfinite(tau)):
        raise ValueError(f"gate tau: must be a finite number > 0, got {tau!r}")
    eps_lo, eps_hi = (eps, eps) if isinstance(eps, (int, float)) else eps
    if not (eps_lo >= 0 and eps_hi >= 0):
        raise ValueError(f"gate eps: must be >= 0, got {eps!r}")
    return Gate(key, tau, float(eps_lo), float(eps_hi), space)


def one_sided(gate: Gate, u: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """Apply ``gate`` only on the side of ``u`` that the advantage makes dangerous.

    ``upper`` (bool, broadcastable) is True where the dangerous side is
    ``u > 0`` (positive advantage: the ratio grows) and False where it is
    ``u < 0``. Elsewhere the gate is the identity. Because every gate has
    ``g(0) = 0`` and ``g'(0) = 1``, the result stays C^1 at the origin.

    Returns ``(value, weight)``.
    """
    gated = torch.where(upper, u > 0, u < 0)
    value = torch.where(gated, gate(u), u)
    weight = torch.where(gated, gate.weight(u), torch.ones_like(u))
    return value, weight
