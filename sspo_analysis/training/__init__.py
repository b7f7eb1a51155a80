"""A compact RL trainer for causal LMs that runs every registered objective.

``from sspo_analysis.training import TrainConfig, load_config, train, pretrain, sweep, read_metrics, read_log_ratios``
(and ``Task``, ``register_task`` to add a task)

The names load on first use (:mod:`sspo_analysis.lazy`), so ``sspo --help`` imports no torch.
"""

from sspo_analysis.lazy import lazy_exports

_MODULES = {
    "sspo_analysis.training.config": ("TrainConfig", "load_config"),
    "sspo_analysis.training.readers": ("read_log_ratios", "read_metrics"),
    "sspo_analysis.training.sweeps": ("sweep",),
    "sspo_analysis.training.tasks": ("Task", "register_task"),
    "sspo_analysis.training.trainer": ("train",),
    "sspo_analysis.training.warm_start": ("pretrain",),
}
__all__ = sorted(n for names in _MODULES.values() for n in names)
__getattr__, __dir__ = lazy_exports(__name__, {n: m for m, names in _MODULES.items() for n in names})
