"""Standard outputs of a training run, beside the trainer's own ``metrics.jsonl`` and checkpoint.

- ``log.report_to = ["tensorboard"]`` (TRL's list form; ``["none"]`` the default) writes
  every numeric metric of every step to ``RUN/tensorboard/`` (needs the ``tensorboard``
  extra: ``pip install -e '.[tensorboard]'``).
- At the end of a run, and with ``sspo export RUN`` from its last checkpoint, the policy
  and tokenizer are saved with ``save_pretrained`` to ``RUN/final/``: a transformers
  checkpoint that ``AutoModelForCausalLM.from_pretrained`` loads, in the dtype of the checkpoint the
  run started from, and ``AutoTokenizer.from_pretrained`` reloads its tokenizer with the same encodings
  (the presets' character tokenizer is a byte-level ``PreTrainedTokenizerFast``, see
  :func:`sspo_analysis.training.models.char_tokenizer`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import shutil
from pathlib import Path
from typing import Any

REPORTERS = ("none", "tensorboard")
"""Values of ``log.report_to``."""


def check_report_to(report_to: Any) -> list[str]:
    """Validate ``log.report_to`` (a list of :data:`REPORTERS`); ValueError naming the field otherwise."""
    if isinstance(report_to, str) or not isinstance(report_to, (list, tuple)):
        raise ValueError(f"log.report_to: must be a list such as [\"tensorboard\"], got {report_to!r}; "
                         f"allowed values: {', '.join(REPORTERS)}")
    for name in report_to:
        if name not in REPORTERS:
            raise ValueError(f"log.report_to: unknown value {name!r}; allowed values: {', '.join(REPORTERS)}")
    if "none" in report_to and len(report_to) > 1:
        raise ValueError(f"log.report_to: 'none' cannot be combined with others, got {list(report_to)!r}")
    if "tensorboard" in report_to and importlib.util.find_spec("tensorboard") is None:
        raise ValueError("log.report_to: 'tensorboard' needs the tensorboard package: "
                         "pip install -e '.[tensorboard]' (or pip install tensorboard)")
    return list(report_to)


class Reporters:
    """The run's standard loggers: ``log(line, step)`` after each step, ``close()`` at the end."""

    def __init__(self, run: str | Path, report_to: list[str]):
        self.writer = None
        if "tensorboard" in check_report_to(report_to):
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(run) / "tensorboard"))

    def log(self, line: dict[str, Any], step: int) -> None:
        """Every finite number of ``line`` as a scalar at ``step`` (strings and missing values are skipped)."""
        if self.writer is None:
            return
        for key, value in line.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool) \
                    and math.isfinite(value):
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def __enter__(self) -> Reporters:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def save_final(run: str | Path, policy, tokenizer, dtype=None) -> Path:
    """Save ``policy`` (its weights in ``dtype``, the checkpoint's own) and ``tokenizer`` with
    :func:`~sspo_analysis.training.models.save_pretrained` to ``RUN/final`` (replaced whole); returns it."""
    from sspo_analysis.training.models import save_pretrained

    final = Path(run) / "final"
    tmp = final.with_name(f".final.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_pretrained(policy, tokenizer, tmp, dtype=dtype)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def export_run(run: str | Path) -> Path:
    """``RUN/final`` from the run's last checkpoint (``sspo export RUN``): the policy as trained so far."""
    import torch

    from sspo_analysis.training.models import checkpoint_dtype, load_model
    from sspo_analysis.training.runs import recorded_config

    run = Path(run)
    ckpt_path = run / "checkpoint" / "state.pt"
    if not (run / "config.toml").exists() or not ckpt_path.exists():
        raise ValueError(f"run: {str(run)!r} is not a run directory with a checkpoint "
                         "(needs config.toml and checkpoint/state.pt)")
    cfg = recorded_config(run)
    # the architecture and tokenizer the run started from; the weights come from the checkpoint
    policy, tok = load_model(cfg.model.preset, path=cfg.model.path or None, seed=cfg.seed,
                             tokenizer=cfg.model.tokenizer)
    state = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    policy.load_state_dict(state["model"])
    return save_final(run, policy, tok, checkpoint_dtype(cfg.model.path))
