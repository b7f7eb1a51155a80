"""Held-out evaluation: a fixed prompt set the policy never trains on, scored sampled, greedy and pass@k.

The training reward is a noisy progress signal (16 prompts a step are worth about
+/-0.05) measured on the prompts being optimised. With ``log.eval_every = N`` the
trainer scores the policy every N steps (and before the first step) on
``log.eval_prompts`` prompts drawn once from a seed of their own, the same for every
run of a task, and removes those prompts from the training draws. Each evaluation
samples with a generator seeded by the step, so two runs with equal weights get
equal scores and arms compared at one step see the same sampling noise.
The rows go to ``RUN/heldout.jsonl``; :func:`read_heldout` reads them back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sspo_analysis.io import write_text
from sspo_analysis.training.runs import temp_path
from sspo_analysis.training.tasks import Task

HELDOUT_SEED = 20_260_219
"""Seed of the held-out prompt set (shared by every run of a task, apart from every training seed)."""

CORRECT = 1.0 - 1e-9
"""A completion counts towards pass@k when its reward reaches 1 (partial credit below that does not)."""


@dataclass(frozen=True)
class HeldOut:
    """The fixed evaluation prompts of a task, with their answers."""

    prompts: tuple[str, ...]
    answers: tuple[str, ...]

    @property
    def excluded(self) -> frozenset[str]:
        return frozenset(self.prompts)


def heldout_set(task: Task, n: int) -> HeldOut:
    """``n`` distinct prompts of ``task`` from :data:`HELDOUT_SEED` (fewer when the task has fewer)."""
    rng = np.random.default_rng(HELDOUT_SEED)
    prompts, answers, seen = [], [], set()
    for _ in range(20):  # a task with few distinct prompts ends the search
        batch_prompts, batch_answers = task.sample(rng, n)
        for p, a in zip(batch_prompts, batch_answers):
            key = json.dumps(p) if not isinstance(p, str) else p
            if key not in seen and len(prompts) < n:
                seen.add(key)
                prompts.append(p)
                answers.append(a)
        if len(prompts) == n:
            break
    return HeldOut(tuple(prompts), tuple(answers))


def training_prompts(task: Task, rng: np.random.Generator, n: int,
                     excluded: frozenset[str]) -> tuple[list, list]:
    """``n`` training prompts from ``rng`` with every held-out prompt redrawn (no redraw when none is held out,
    so a run without evaluation draws exactly what it drew before)."""
    prompts, answers = task.sample(rng, n)
    for _ in range(100):
        bad = [i for i, p in enumerate(prompts) if isinstance(p, str) and p in excluded]
        if not bad:
            return prompts, answers
        more_prompts, more_answers = task.sample(rng, len(bad))
        for i, p, a in zip(bad, more_prompts, more_answers):
            prompts[i], answers[i] = p, a
    raise ValueError("log.eval_prompts: the held-out set leaves too few training prompts for this task; "
                     "allowed: a smaller log.eval_prompts or log.eval_every = 0")


def score(model, tok, task: Task, cfg, held: HeldOut, *, temperature: float, samples: int,
          generator: torch.Generator | None) -> np.ndarray:
    """Rewards ``(prompts, samples)`` of completions of ``held``'s prompts sampled at ``temperature`` (0: greedy)
    with the rollout's length limit and top-p."""
    prompts, answers = list(held.prompts), list(held.answers)
    from sspo_analysis.training.models import Sampling, generate
    from sspo_analysis.training.rollout import eos_ids, format_prompts
    from sspo_analysis.training.state import autocast

    device = next(model.parameters()).device
    enc = tok(format_prompts(tok, prompts, cfg.task.chat_template), padding=True, add_special_tokens=False,
              return_tensors="pt")
    ids = enc.input_ids.repeat_interleave(samples, 0).to(device)
    attn = enc.attention_mask.repeat_interleave(samples, 0).to(device)
    was_training = model.training
    model.eval()
    with torch.no_grad(), autocast(cfg, device):
        sampling = Sampling(cfg.rollout.max_new_tokens, temperature, cfg.rollout.top_p)
        tokens, *_ = generate(model, ids, attn, sampling, eos_id=eos_ids(model, tok), pad_id=tok.pad_token_id,
                              generator=generator, forward=cfg.model.forward)
    model.train(was_training)
    completions = tok.batch_decode(tokens.cpu(), skip_special_tokens=True)
    repeated = [a for a in answers for _ in range(samples)]
    return np.asarray(task.rewards(completions, repeated), dtype=np.float64).reshape(len(prompts), samples)


def evaluate_heldout(model, tok, task: Task, cfg, held: HeldOut, step: int) -> dict[str, Any]:
    """One held-out row: mean sampled reward over ``log.eval_samples`` samples a prompt, greedy reward, and
    pass@k (a prompt passes when one of its k samples is fully correct)."""
    k = cfg.log.eval_samples
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(HELDOUT_SEED + step)
    sampled = score(model, tok, task, cfg, held, temperature=cfg.rollout.temperature, samples=k, generator=gen)
    greedy = score(model, tok, task, cfg, held, temperature=0.0, samples=1, generator=None)
    return {"step": step, "sampled": float(sampled.mean()), "greedy": float(greedy.mean()),
            f"pass@{k}": float((sampled >= CORRECT).any(axis=1).mean()), "prompts": len(held.prompts)}


def read_heldout(run_dir: str | Path):
    """``RUN/heldout.jsonl`` as a DataFrame (one row per evaluation, by step); empty when the run has none."""
    import pandas as pd

    path = Path(run_dir) / "heldout.jsonl"
    if not path.is_file():
        return pd.DataFrame()
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except ValueError as err:
            raise ValueError(f"{path}, line {number}: not a JSON object ({err}); the run's held-out record is "
                             "damaged") from err
    return pd.DataFrame(rows)


def keep_heldout(path: Path, last_step: int) -> None:
    """Drop the held-out rows after ``last_step`` (written after the checkpoint a resume goes back to)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= last_step]
    if len(kept) != len(lines):
        write_text(path, "".join(line + "\n" for line in kept), temp_path(path))
