"""Gate functions: the soft (and hard) maps that bound how far a ratio may move.

A gate ``g`` acts on a deviation ``u`` from the on-policy point: ``u = r - 1`` in
ratio space (SAPO-style) or ``u = l = log r`` in log space (SSPO-style). Its
*weight* ``g'(u)`` multiplies the policy-gradient term of every token, so the
weight is what decides how much signal survives off-policy.

Every family is written in ``u`` only; where the ``u`` comes from is the
objective's business. The families and admissibility are stated in ``docs/theory.md`` ("Gates").
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

Tensor = torch.Tensor
TauLike = float | Tensor

GATES: tuple[str, ...] = ("identity", "sigmoid", "erf", "arctan", "softsign", "hard-clip")
SOFT_GATES: tuple[str, ...] = ("sigmoid", "erf", "arctan", "softsign")
SPACES: tuple[str, ...] = ("ratio", "log")
_ALIASES = {"clip": "hard-clip", "hard": "hard-clip", "hard_clip": "hard-clip", "none": "identity"}

_SQRT_PI = math.sqrt(math.pi)


def _compute_dtype(x: Tensor) -> torch.dtype:
    # Low-precision inputs are evaluated in float32 and cast back on return.
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# Each family: (value(u, tau), weight(u, tau)). ``tau`` broadcasts against ``u``.
_FAMILIES: dict[str, tuple[Callable[[Tensor, TauLike], Tensor], Callable[[Tensor, TauLike], Tensor]]] = {
    "identity": (lambda u, tau: u, lambda u, tau: torch.ones_like(u)),
    "sigmoid": (
        lambda u, tau: (2.0 / tau) * torch.tanh(tau * u / 2.0),
        # sech^2(x/2) = 4 sigmoid(x) sigmoid(-x): exact in the tails, unlike 1 - tanh^2.
        lambda u, tau: 4.0 * torch.sigmoid(tau * u) * torch.sigmoid(-tau * u),
    ),
    "erf": (
        lambda u, tau: _SQRT_PI / (2.0 * tau) * torch.erf(tau * u),
        lambda u, tau: torch.exp(-((tau * u) ** 2)),
    ),
    "arctan": (
        lambda u, tau: torch.atan(tau * u) / tau,
        lambda u, tau: 1.0 / (1.0 + (tau * u) ** 2),
    ),
    "softsign": (
        lambda u, tau: u / (1.0 + tau * u.abs()),
        lambda u, tau: 1.0 / (1.0 + tau * u.abs()) ** 2,
    ),
}


@dataclass(frozen=True)
class Admissibility:
    """Which of the four admissibility properties a gate's weight has.

    Each property is checked numerically on a dense grid; see
    :meth:`Gate.check_admissible`.
    """

    c1: bool
    max_at_origin: bool
    monotone: bool
    vanishing_tails: bool

    @property
    def admissible(self) -> bool:
        return self.c1 and self.max_at_origin and self.monotone and self.vanishing_tails

    def failures(self) -> list[str]:
        """Names of the properties that do not hold."""
        return [k for k in ("c1", "max_at_origin", "monotone", "vanishing_tails") if not getattr(self, k)]


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

    def _eval(self, u: Tensor, which: int) -> Tensor:
        uc = u.to(_compute_dtype(u))
        if self.name == "hard-clip":
            if which == 0:
                out = uc.clamp(-self.eps_lo, self.eps_hi)
            else:
                out = ((uc >= -self.eps_lo) & (uc <= self.eps_hi)).to(uc.dtype)
        else:
            tau = self.tau.to(uc.dtype) if isinstance(self.tau, Tensor) else self.tau
            out = _FAMILIES[self.name][which](uc, tau)
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
        scale = max(self.eps_lo, self.eps_hi) if self.name == "hard-clip" else 1.0 / float(self.tau)
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

        def max_jump(n: int) -> float:
            # Largest weight change across a window of fixed width around the
            # origin region, sampled at n points: shrinks with n iff continuous.
            grid = torch.linspace(-3 * scale, 3 * scale, n, dtype=torch.float64)
            return float(self.weight(grid).diff().abs().max())

        coarse, fine = max_jump(2_001), max_jump(20_001)
        continuous = fine < 0.5 * coarse or fine < 1e-6
        # Derivative consistency on a moderate grid (central differences).
        grid = torch.linspace(-3 * scale, 3 * scale, 6_001, dtype=torch.float64)
        h = 1e-6 * scale
        fd = (self(grid + h) - self(grid - h)) / (2 * h)
        consistent = bool(torch.allclose(fd, self.weight(grid), atol=1e-4))

        w0 = float(self.weight(torch.zeros(1, dtype=torch.float64)))
        origin = abs(w0 - 1.0) < 1e-12 and bool((w <= 1.0 + 1e-12).all())

        mid = u.numel() // 2
        right, left = w[mid:], w[: mid + 1]
        tol = 1e-12
        monotone = bool((right.diff() <= tol).all() and (left.diff() >= -tol).all())

        tails = bool(w[0] < 1e-3 and w[-1] < 1e-3)
        return Admissibility(
            c1=continuous and consistent, max_at_origin=origin, monotone=monotone, vanishing_tails=tails
        )


def get_gate(
    name: str,
    tau: TauLike = 1.0,
    eps: float | tuple[float, float] = 0.2,
    space: str = "log",
) -> Gate:
    """Build a gate by family name.

    Args:
        name: one of :data:`GATES` (aliases: ``clip``, ``hard`` for ``hard-clip``).
        tau: temperature of a soft family (> 0); float or broadcastable tensor.
        eps: hard-clip half-width, or ``(eps_lo, eps_hi)`` for an asymmetric range.
        space: ``"ratio"`` (``u = r - 1``) or ``"log"`` (``u = log r``).
    """
    key = _ALIASES.get(name, name)
    if key not in GATES:
        raise ValueError(f"gate: unknown name {name!r}; allowed values: {', '.join(GATES)}")
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
