"""Soft versus hard clipping in LLM policy optimisation: gates, objectives, theory, training.

The names below load on first use (:mod:`sspo_analysis.lazy`): ``import sspo_analysis`` imports no torch.
"""

from sspo_analysis.lazy import lazy_exports

__version__ = "0.1.0"

_MODULES = {"sspo_analysis.gates": ("GATES", "Gate", "get_gate", "register_gate"),
            "sspo_analysis.objectives": ("Objective", "Terms", "get_objective", "objective_names",
                                         "register_objective")}
__all__ = sorted(n for names in _MODULES.values() for n in names)
__getattr__, __dir__ = lazy_exports(__name__, {name: module for module, names in _MODULES.items() for name in names})
