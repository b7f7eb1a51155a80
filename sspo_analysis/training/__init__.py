"""A compact RL trainer for causal LMs that runs every registered objective.

``from sspo_analysis.training import TrainConfig, load_config, train, pretrain, sweep, read_metrics, read_log_ratios``
"""

from sspo_analysis.training.config import TrainConfig, load_config
from sspo_analysis.training.trainer import pretrain, read_log_ratios, read_metrics, sweep, train

__all__ = ["TrainConfig", "load_config", "train", "pretrain", "sweep", "read_metrics", "read_log_ratios"]
