"""What the RL step reads and advances, in one object, and the small helpers every stage shares."""

from __future__ import annotations

import collections
import contextlib
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sspo_analysis.objectives import Objective
from sspo_analysis.training.config import TrainConfig
from sspo_analysis.training.tasks import Task


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on ``device`` (CUDA or CPU) when the config asks for it, else a no-op context.

    Parameters, gradients and optimiser state stay float32; the log-probs are
    reduced in float32 (``models.token_logprobs`` upcasts the logits).
    """
    if cfg.model.precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def params_of(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The trainable parameters of ``model``, in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def run_device(cfg: TrainConfig) -> torch.device:
    """The device ``cfg.device`` names (``auto``: CUDA when available, else the CPU); ValueError when it is absent."""
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: 'cuda' requested but no CUDA device is available; allowed here: cpu, auto")
    return torch.device(cfg.device)


@dataclass
class RunState:
    """The models, optimiser and random streams of a run: everything a step reads or advances.

    ``sampler`` is ``policy`` itself, or (with ``algo.staleness``) a frozen copy that
    loads ``snapshots[0]``, the policy ``staleness`` optimiser updates old.
    ``gen`` draws the samples and the minibatch order; ``np_rng`` draws the prompts.
    """

    cfg: TrainConfig
    objective: Objective
    policy: torch.nn.Module
    sampler: torch.nn.Module
    reference: torch.nn.Module | None
    snapshots: collections.deque
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    tok: Any
    task: Task
    gen: torch.Generator
    np_rng: np.random.Generator
    device: torch.device
    eos_ids: list[int]
    heldout: Any = None
    """The held-out evaluation set (:class:`~sspo_analysis.training.heldout.HeldOut`) when ``log.eval_every``."""

    def autocast(self):
        return autocast(self.cfg, self.device)

    def snapshot(self) -> None:
        """Remember the policy's current weights (the behaviour policy of a later step, under staleness)."""
        self.snapshots.append({k: v.detach().clone() for k, v in self.policy.state_dict().items()})

    def rng_state(self) -> dict[str, Any]:
        """Every random stream of the run, for an exact resume."""
        return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                "sampler": self.gen.get_state(), "tasks": self.np_rng.bit_generator.state,
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        self.gen.set_state(state["sampler"])
        self.np_rng.bit_generator.state = state["tasks"]
        if state.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
