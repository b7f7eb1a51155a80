"""Checks of a task's data against the model, made before the first step: bounded work, no silent ``<unk>``."""

from __future__ import annotations

import collections
import warnings
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from sspo_analysis.training.config import TrainConfig
    from sspo_analysis.training.tasks import Task


def _records(task: Any) -> tuple[list[str], list[str]]:
    """A file-backed task's ``(prompts, what the answers make the model write)``; empty for the generated tasks
    (short, in the alphabet). ``task.written`` maps an answer to what the model must write (code: the names of
    the functions the tests call, not the tests). A prompt given as chat messages counts as the text of its
    messages."""
    written = getattr(task, "written", lambda answer: answer)
    prompts = [p if isinstance(p, str) else "\n".join(m["content"] for m in p) for p in getattr(task, "prompts", [])]
    return prompts, [written(a) for a in getattr(task, "answers", [])]


def check_chat(task: Any, tokenizer: Any, chat_template: bool) -> None:
    """Refuse, before any work, prompts that need a chat template the tokenizer lacks: every prompt under
    ``task.chat_template = true``, and prompts given as chat messages (TRL's conversational format, verl's
    layout) always."""
    if getattr(tokenizer, "chat_template", None):
        return
    if chat_template:
        raise ValueError("task.chat_template: true, but the tokenizer has no chat template; use model.path with "
                         "a tokenizer that has one, or set task.chat_template = false")
    n_chat = sum(isinstance(p, list) for p in getattr(task, "prompts", []))
    if n_chat:
        raise ValueError(f"task.path: {n_chat} prompts are chat messages (lists of {{role, content}}), which need "
                         "a tokenizer with a chat template; use model.path with a chat model's tokenizer")


def check_alphabet(task: Any, chars: str, name: str = "task") -> None:
    """Characters outside the character tokenizer's ``chars`` would become ``<unk>``: reported in prompts
    (a warning with the count and the characters), refused in answers (ValueError: the policy could never
    write them)."""
    allowed = set(chars)
    prompts, answers = _records(task)
    answer_chars = collections.Counter(ch for a in answers for ch in a if ch not in allowed)
    if answer_chars:
        n_bad = sum(1 for a in answers if any(ch not in allowed for ch in a))
        raise ValueError(f"{name}: {n_bad} of {len(answers)} answers use characters the character tokenizer "
                         f"lacks ({_listing(answer_chars)}); they could never be produced; use model.path "
                         "(a model with its own tokenizer) or drop those records")
    prompt_chars = collections.Counter(ch for p in prompts for ch in p if ch not in allowed)
    if prompt_chars:
        warnings.warn(f"{name}: prompts hold {sum(prompt_chars.values())} characters the character tokenizer "
                      f"lacks ({_listing(prompt_chars)}); the model sees them as <unk>", UserWarning, stacklevel=2)


def _listing(counts: collections.Counter) -> str:
    shown = ", ".join(f"{ch!r} x{n}" for ch, n in counts.most_common(8))
    return shown + (f", and {len(counts) - 8} more" if len(counts) > 8 else "")


def check_prompt_lengths(task: Any, tokenizer: Any, context: int, max_new_tokens: int,
                         format_prompts: Any = None) -> None:
    """Refuse a task whose prompts (as the model sees them) leave fewer than ``max_new_tokens`` of the
    ``context`` positions: the count, the longest and the limit in one ValueError."""
    prompts = list(getattr(task, "prompts", []))
    if not prompts:
        return
    texts = format_prompts(prompts) if format_prompts else _records(task)[0]
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]
    limit = context - max_new_tokens
    too_long = [n for n in lengths if n > limit]
    if too_long:
        raise ValueError(f"task.path: {len(too_long)} of {len(prompts)} prompts are longer than {limit} tokens "
                         f"(the model's context {context} minus rollout.max_new_tokens {max_new_tokens}); "
                         f"the longest has {max(too_long)}; shorten or drop them")


def check_room(cfg: TrainConfig, task: Task, tokenizer) -> None:
    """Fail early when a generated task's answers (plus ``<eos>``) cannot fit in ``rollout.max_new_tokens``, or
    a warm start is asked of a task without reference solutions."""
    from sspo_analysis.training.tasks import task_spec

    spec = task_spec(cfg.task.name)
    if not spec.references and cfg.model.warm_start:
        raise ValueError(f"model.warm_start: task {spec.name!r} has no reference solutions to warm-start from; "
                         "set model.path (a checkpoint that can already attempt it) or model.warm_start = false")
    if spec.reads_file:
        return
    _, answers = task.sample(np.random.default_rng(12345), 256)
    need = max(len(tokenizer(a, add_special_tokens=False).input_ids) for a in answers) + 1
    if need > cfg.rollout.max_new_tokens:
        raise ValueError(f"rollout.max_new_tokens: {cfg.rollout.max_new_tokens} is too small for task "
                         f"{cfg.task.name!r} (answers need up to {need} tokens with <eos>); allowed: >= {need}")


def check_before_loading(cfg: TrainConfig, task: Task) -> None:
    """The checks made before any model loads (a warm start included): with the presets' character tokenizer, the
    task's chat format, characters, answer room and prompt lengths; with a checkpoint told to use it, the characters."""
    from sspo_analysis.training.models import CHARS, PRESETS, char_tokenizer

    if cfg.model.path and cfg.model.tokenizer == "chars":
        check_alphabet(task, CHARS, "task.path")
    if not cfg.model.path:  # the character tokenizer: check before the warm start is made
        check_chat(task, char_tokenizer(), cfg.task.chat_template)
        check_alphabet(task, CHARS, "task.path")
        check_room(cfg, task, char_tokenizer())
        check_prompt_lengths(task, char_tokenizer(), PRESETS[cfg.model.preset]["max_position_embeddings"],
                             cfg.rollout.max_new_tokens)
