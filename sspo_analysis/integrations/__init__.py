"""Engine integrations: the package's objectives inside TRL and verl.

- :mod:`sspo_analysis.integrations.trl`: ``SSPOConfig`` / ``SSPOTrainer``, a
  ``GRPOConfig`` / ``GRPOTrainer`` pair for TRL 1.16 whose ``loss_type`` also
  takes ``sspo``, ``sspo_sigmoid``, ``gmpo``, ``gspo``, ``soft_<gate>`` and
  ``package:<objective>`` (TRL's underscore spelling; hyphens accepted).
- :mod:`sspo_analysis.integrations.verl`: registers every package objective
  (``sspo``, ``sspo_sigmoid``, ``soft_<gate>``, ``gmpo``, ``vespo``, ``luspo``, ...;
  ``package:<objective>`` for all, also those verl ships itself) with verl 0.9's
  ``register_policy_loss``, hyphenated names as aliases; enable it with
  ``VERL_USE_EXTERNAL_MODULES=sspo_analysis.integrations.verl``.

Both compute the loss with :mod:`sspo_analysis.objectives` (``Objective.terms``,
``Objective.aggregate``, ``compute_metrics``); only the engine's glue lives here.
Neither submodule is imported by this package: each needs its engine installed.
"""

from __future__ import annotations

import torch

from sspo_analysis import gates
from sspo_analysis.objectives import objective_names
from sspo_analysis.primitives import geometric_mean_weight

Tensor = torch.Tensor

SOFT_NAMES: dict[str, tuple[str, dict]] = {
    f"soft-{g}": ("sspo", {"gate": g}) for g in gates.SOFT_GATES
}
"""``soft-<gate>``: SSPO (geometric mean of a log-space gate) with that gate family."""
SOFT_NAMES.update({f"soft-{g}-one-sided": ("sspo", {"gate": g, "one_sided": True}) for g in gates.SOFT_GATES})


def soft_loss(name: str) -> tuple[str, dict] | None:
    """``soft-NAME`` or ``soft-NAME-one-sided`` -> ``("sspo", fixed parameters)``; None for other names.

    ``NAME`` is any registered soft gate (a user's too) or an import path
    ``package.module:function``, imported and registered on first use.
    """
    if name in SOFT_NAMES:
        base, fixed = SOFT_NAMES[name]
        return base, dict(fixed)
    if not name.startswith("soft-"):
        return None
    gate = name[len("soft-"):]
    one_sided = gate.endswith("-one-sided")
    gate = gate[: -len("-one-sided")] if one_sided else gate
    try:
        family = gates.gate_family(gate)
    except ValueError as err:
        raise ValueError(f"loss_type {name!r}: {err}") from None
    if not family.soft:
        raise ValueError(f"loss_type {name!r}: gate {gate!r} has no temperature; soft-NAME takes one of "
                         f"{', '.join(gates.SOFT_GATES)} or an import path")
    return "sspo", {"gate": family.name, **({"one_sided": True} if one_sided else {})}


PACKAGE_PREFIX = "package:"
"""``package:<objective>`` names any package objective in an engine, also one whose name the engine uses itself."""


def canonical_loss_type(loss_type: str) -> str:
    """The engines' spelling (underscores) of a loss name: ``soft-erf-one-sided`` -> ``soft_erf_one_sided``.

    TRL's loss types and verl's loss modes are underscored; the package registry's
    names are hyphenated, accepted as aliases. Only the package's own names are
    respelled; a user gate's import path (``soft_pkg.mod:fn``) keeps its characters after ``soft_``.
    """
    if ":" in loss_type and not loss_type.startswith(PACKAGE_PREFIX):
        return loss_type
    if loss_type.startswith(("soft-", "soft_")):
        gate = loss_type[5:]
        for suffix in ("-one-sided", "_one_sided"):
            if gate.endswith(suffix):
                return f"soft_{gate[: -len(suffix)]}_one_sided"
        return f"soft_{gate}"
    return loss_type.replace("-", "_")


def hyphenated_name(name: str) -> str:
    """The package registry's spelling of a canonical name (``sspo_sigmoid`` -> ``sspo-sigmoid``)."""
    if name.startswith("soft_"):
        gate = name[5:]
        one_sided = gate.endswith("_one_sided")
        gate = gate[: -len("_one_sided")] if one_sided else gate
        return f"soft-{gate}" + ("-one-sided" if one_sided else "")
    by_canonical = {n.replace("-", "_"): n for n in objective_names()}
    return by_canonical.get(name, name)


def check_engine_version(engine: str, version: str | None, lo: str, hi: str, why: str) -> str:
    """Raise ImportError unless ``engine`` (installed, or ``version``) is in ``[lo, hi)``; returns the version.

    ``why`` says which engine internals the integration relies on, so the error
    explains the pin.
    """
    from packaging.version import Version

    if version is None:
        import importlib

        version = getattr(importlib.import_module(engine), "__version__", "0")
    if not (Version(lo) <= Version(version) < Version(hi)):
        raise ImportError(
            f"sspo_analysis.integrations.{engine} supports {engine} >={lo},<{hi} ({why}); found {engine} {version}. "
            f"Install `sspo-analysis[{engine}]` or pin {engine}>={lo},<{hi}."
        )
    return version


def sequence_is_weight(is_weights: Tensor, mask: Tensor) -> Tensor:
    """Per-sequence weight (B,) from rollout importance weights, (B, T) or (B, 1) or (B,).

    Token weights are combined by their geometric mean over the unmasked tokens,
    as verl's ``geo_mean`` loss does, so that a sequence-level surrogate gets one
    weight per sequence; an already per-sequence weight is used as it is.
    """
    if is_weights.dim() == 1:
        return is_weights
    if is_weights.shape[-1] == 1:
        return is_weights[:, 0]
    return geometric_mean_weight(is_weights.clamp(min=1e-30).log(), mask.bool())


def weighted_surrogate(surrogate: Tensor, is_weights: Tensor | None, mask: Tensor) -> Tensor:
    """Multiply a surrogate, (B, T) per token or (B,) per sequence, by rollout importance weights."""
    if is_weights is None:
        return surrogate
    if surrogate.dim() == 1:
        return surrogate * sequence_is_weight(is_weights, mask).to(surrogate.dtype)
    return surrogate * is_weights.to(surrogate.dtype)
