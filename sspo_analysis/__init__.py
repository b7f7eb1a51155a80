"""Soft versus hard clipping in LLM policy optimisation: gates, objectives, theory, training."""

from sspo_analysis.gates import GATES, Gate, get_gate, register_gate
from sspo_analysis.objectives import Objective, Terms, get_objective, objective_names, register_objective

__version__ = "0.1.0"

__all__ = [
    "GATES",
    "Gate",
    "Objective",
    "Terms",
    "get_gate",
    "get_objective",
    "objective_names",
    "register_gate",
    "register_objective",
]
