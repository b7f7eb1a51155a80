"""Checks of a task's data against the model, made before the first step: bounded work, no silent ``<unk>``."""

from __future__ import annotations

import collections
import warnings
from typing import Any


def _records(task: Any) -> tuple[list[str], list[str]]:
    """A file-backed task's ``(prompts, what the answers make the model write)``; empty for the generated tasks
    (short, in the alphabet). ``task.written`` maps an answer to what the model must write (code: the names of
    the functions the tests call, not the tests)."""
    written = getattr(task, "written", lambda answer: answer)
    return list(getattr(task, "prompts", [])), [written(a) for a in getattr(task, "answers", [])]


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
    prompts, _ = _records(task)
    if not prompts:
        return
    texts = format_prompts(prompts) if format_prompts else prompts
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False).input_ids]
    limit = context - max_new_tokens
    too_long = [n for n in lengths if n > limit]
    if too_long:
        raise ValueError(f"task.path: {len(too_long)} of {len(prompts)} prompts are longer than {limit} tokens "
                         f"(the model's context {context} minus rollout.max_new_tokens {max_new_tokens}); "
                         f"the longest has {max(too_long)}; shorten or drop them")
