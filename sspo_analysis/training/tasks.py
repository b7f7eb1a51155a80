"""Tasks with verifiable rewards: a task samples prompts with reference answers and grades completions.

Built in: n-digit ``addition``, ``countdown`` (reach a target from given numbers
with + - *), sequence ``reversal``; and ``jsonl``: local records (a JSONL or JSON
file, or a parquet file or ``save_to_disk`` directory read with the ``datasets``
library) of ``{prompt, answer}``, GSM8K's ``{question, answer: "... #### 42"}``,
TRL's conversational ``prompt`` (a list of ``{role, content}``) or verl's RL layout
(``prompt`` as chat messages, ``reward_model.ground_truth``), graded by exact match,
by the final number of the completion, or by ``math-verify`` (the ``math`` extra;
the final number when it is not installed); ``code``: local ``{prompt, tests,
entry_point?}`` records graded by running the completion's code against the
tests in :mod:`sspo_analysis.sandbox`; ``synthesis``: write an
expression in ``x`` for a hidden function shown by input/output pairs, graded in
the sandbox on held-out inputs.

Every task, built in or not, is a :class:`Task` subclass registered with
:func:`register_task`, which says which ``task.*`` config fields it reads, how
they are checked, which graders it allows and whether it reads ``task.path``;
:func:`make_task_from` and the config's validation go through :data:`TASKS`.
Adding a task is one class and one decorator, in any file imported before the
config is loaded::

    @register_task("copy", fields=("length",))
    @dataclass
    class Copy(Task):
        length: int = 3

        def sample(self, rng, n):
            words = ["".join(rng.choice(list("abc"), size=self.length)) for _ in range(n)]
            return [f"{w}=" for w in words], words
"""

from __future__ import annotations

import contextlib
import functools
import json
import re
import tempfile
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from sspo_analysis.training.config import TaskConfig, _choice, _number

if TYPE_CHECKING:
    from sspo_analysis.training.config import TrainConfig

GRADERS = ("exact", "number", "math")
"""Graders of the ``jsonl`` task."""
TEST_GRADERS = ("tests-fraction", "tests-all")
"""Graders of the ``code`` and ``synthesis`` tasks: the fraction of tests passed, or 1 only when all pass."""
REVERSAL_GRADERS = ("exact", "chars")
"""Graders of the ``reversal`` task: the whole string, or the fraction of characters in place."""


class Task:
    """A task: ``sample(rng, n) -> (prompts, answers)`` and ``reward(completion, answer) -> float``.

    ``prompt`` strings are what the model sees (the trainer adds the tokenizer's
    BOS token or chat template); ``answer`` is the reference the reward compares
    against, and also the supervised target of the warm start.
    """

    name = "task"

    def sample(self, rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
        raise NotImplementedError

    def reward(self, completion: str, answer: str) -> float:
        return float(completion.strip() == answer.strip())

    def rewards(self, completions: list[str], answers: list[str]) -> list[float]:
        """Rewards of a batch (the trainer's entry point; sandboxed tasks grade it in parallel)."""
        return [self.reward(c, a) for c, a in zip(completions, answers)]

    def written(self, answer: str) -> str:
        """What a completion must write to earn reward for ``answer`` (the tokenizer's alphabet must hold it)."""
        return answer


@dataclass(frozen=True)
class TaskSpec:
    """A registry entry: how the ``task.*`` config fields make a task (see :func:`register_task`)."""

    name: str
    build: Callable[..., Task]
    fields: dict[str, str]
    check: Callable[[TaskConfig], None] | None = None
    graders: tuple[str, ...] = ()
    reads_file: bool = False
    references: bool = True

    @property
    def defaults(self) -> dict[str, Any]:
        """The fields it reads with their defaults (``TaskConfig``'s, the one place they are set)."""
        return {f: getattr(TaskConfig(), f) for f in self.fields}


TASKS: dict[str, TaskSpec] = {}
"""The registered tasks by name, in the order of registration (the built-in ones first)."""
_BUILTIN: set[str] = set()


def register_task(name: str, *, fields: Iterable[str] | Mapping[str, str] = (),
                  check: Callable[[TaskConfig], None] | None = None, graders: tuple[str, ...] = (),
                  reads_file: bool = False, references: bool = True) -> Callable[[type], type]:
    """A class decorator registering a :class:`Task` subclass (or any ``build(**params) -> Task``) as ``name``.

    Args:
        name: the ``task.name`` value that selects it.
        fields: the ``task.*`` fields it reads (``TaskConfig``'s), passed to the class as keywords of the same
            name; a mapping ``{field: keyword}`` renames (``{"sandbox_timeout_s": "timeout_s"}``).
        check: ``check(cfg.task)`` raising ``ValueError`` naming the field and its allowed values. Every config
            holds every task's fields, so every registered check runs on every config: check only the ranges
            of the fields; checks that hold only when the task is chosen belong in the class's constructor.
        graders: the ``task.grader`` values it allows (an empty ``task.grader`` is not passed, so the class's
            default applies); give ``"grader"`` in ``fields`` too.
        reads_file: its records come from ``task.path``, which must then be a file or a directory; its
            answers are not sampled to size ``rollout.max_new_tokens``.
        references: its answers are what a completion should write, so a supervised warm start can learn them
            (``code``'s answers are tests: false).

    A built-in name cannot be replaced; a user's is (a notebook cell run twice).
    """
    if name in _BUILTIN:
        raise ValueError(f"task name: {name!r} is a built-in task; choose another name")
    unknown = [f for f in fields if f not in TaskConfig.__dataclass_fields__]
    if unknown:
        raise ValueError(f"task {name!r}: unknown field(s) {', '.join(unknown)}; allowed: "
                         f"{', '.join(TaskConfig.__dataclass_fields__)}")
    keywords = dict(fields) if isinstance(fields, Mapping) else {f: f for f in fields}

    def decorator(build: type) -> type:
        TASKS[name] = TaskSpec(name, build, keywords, check, tuple(graders), reads_file, references)
        return build

    return decorator


def unregister_task(name: str) -> None:
    """Remove a user task from the registry (built-ins stay)."""
    if name in _BUILTIN:
        raise ValueError(f"task name: {name!r} is a built-in task and cannot be removed")
    TASKS.pop(name, None)


def task_spec(name: str) -> TaskSpec:
    """The registry entry of ``name``; a ValueError listing the registered names when there is none."""
    _choice("task.name", name, TASKS)
    return TASKS[name]


def _check_addition(t: TaskConfig) -> None:
    _number("task.digits", t.digits, 1, 9, integer=True)


def _check_countdown(t: TaskConfig) -> None:
    _number("task.numbers", t.numbers, 2, 6, integer=True)
    _number("task.max_value", t.max_value, 1, 9999, integer=True)


def _check_reversal(t: TaskConfig) -> None:
    _number("task.length", t.length, 1, 64, integer=True)


def _check_sandbox(t: TaskConfig) -> None:
    from sspo_analysis.sandbox import SANDBOXES

    _number("task.sandbox_timeout_s", t.sandbox_timeout_s, 0.0, 3600.0, lo_open=True)
    _number("task.sandbox_memory_mb", t.sandbox_memory_mb, 32, integer=True)
    _choice("task.sandbox", t.sandbox, SANDBOXES)


_SANDBOX_FIELDS = {"grader": "grader", "sandbox_timeout_s": "timeout_s", "sandbox_memory_mb": "memory_mb",
                   "sandbox": "sandbox"}


@register_task("addition", fields=("digits",), check=_check_addition)
@dataclass
class Addition(Task):
    """``"12+34="`` -> ``"46"``: sum of two uniformly drawn ``digits``-digit numbers."""

    digits: int = 2
    name = "addition"

    def sample(self, rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
        lo, hi = 10 ** (self.digits - 1) if self.digits > 1 else 0, 10**self.digits
        a, b = rng.integers(lo, hi, size=n), rng.integers(lo, hi, size=n)
        return [f"{x}+{y}=" for x, y in zip(a, b)], [str(x + y) for x, y in zip(a, b)]


def evaluate_expression(expr: str) -> int | None:
    """Value of an expression of non-negative integers with ``+ - *`` (usual precedence); None if malformed."""
    expr = expr.replace(" ", "")
    if not re.fullmatch(r"\d{1,4}([+\-*]\d{1,4})*", expr):
        return None
    total = 0
    for sign, term in re.findall(r"([+\-]?)([\d*]+)", expr):
        value = 1
        for factor in term.split("*"):
            value *= int(factor)
        total += -value if sign == "-" else value
    return total


@register_task("countdown", fields=("numbers", "max_value"), check=_check_countdown)
@dataclass
class Countdown(Task):
    """``"3,5,7=22:"`` -> an expression such as ``"3*5+7"`` that uses the given numbers (each at most once).

    Targets are built from a random expression over all ``numbers`` numbers in
    1..``max_value``, so every prompt is solvable; the reward accepts any correct
    expression. The reference answer is that expression.
    """

    numbers: int = 3
    max_value: int = 9
    name = "countdown"

    def sample(self, rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
        prompts, answers = [], []
        for _ in range(n):
            nums = rng.integers(1, self.max_value + 1, size=self.numbers)
            order = rng.permutation(self.numbers)
            ops = rng.choice(list("+-*"), size=self.numbers - 1)
            expr = str(nums[order[0]]) + "".join(f"{o}{nums[i]}" for o, i in zip(ops, order[1:]))
            prompts.append(",".join(map(str, nums)) + f"={evaluate_expression(expr)}:")
            answers.append(expr)
        return prompts, answers

    def reward(self, completion: str, answer: str) -> float:
        target = evaluate_expression(answer)
        value = evaluate_expression(completion.strip())
        if value is None or value != target:
            return 0.0
        used = sorted(int(x) for x in re.findall(r"\d+", completion))
        available = sorted(int(x) for x in re.findall(r"\d+", answer))
        pool = list(available)
        for x in used:  # each given number at most once
            if x not in pool:
                return 0.0
            pool.remove(x)
        return 1.0


@register_task("reversal", fields=("length", "grader"), check=_check_reversal, graders=REVERSAL_GRADERS)
@dataclass
class Reversal(Task):
    """``"abcd>"`` -> ``"dcba"``: reverse a random lowercase string of ``length`` letters.

    ``grader``: ``exact`` (1 for the whole string, else 0) or ``chars`` (partial credit: the
    characters in their place, over the longer of answer and completion, so padding a
    completion out or cutting it short both cost). ``chars`` gives a long answer a reward
    that moves with every token, which sparse exact match does not.
    """

    length: int = 5
    grader: str = "exact"
    name = "reversal"

    def __post_init__(self) -> None:
        if self.grader not in REVERSAL_GRADERS:
            raise ValueError(f"task.grader: unknown value {self.grader!r} for task 'reversal'; "
                             f"allowed values: {', '.join(REVERSAL_GRADERS)}")

    def reward(self, completion: str, answer: str) -> float:
        got, want = completion.strip(), answer.strip()
        if self.grader == "exact":
            return float(got == want)
        return sum(a == b for a, b in zip(got, want)) / max(len(got), len(want), 1)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        words = ["".join(rng.choice(letters, size=self.length)) for _ in range(n)]
        return [f"{w}>" for w in words], [w[::-1] for w in words]


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_HASHES = re.compile(r"####")
_ANSWER_IS = re.compile(r"\banswer\s*(?:is\b|:)", re.IGNORECASE)
_BOXED = "\\boxed{"


def last_number(text: str) -> str | None:
    """The last number in ``text`` without thousands separators (``"1,234.0"`` -> ``"1234.0"``)."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def _last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text`` (braces balanced); None if there is none."""
    start = text.rfind(_BOXED)
    if start < 0:
        return None
    depth, begin = 1, start + len(_BOXED)
    for i in range(begin, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[begin:i]
    return None


def _line_after(pattern: re.Pattern, text: str) -> str | None:
    """The first non-blank line after the last match of ``pattern`` in ``text``; None without a match."""
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    rest = text[matches[-1].end():].strip()
    return rest.split("\n", 1)[0]


def marked_answer(text: str) -> str | None:
    """The final answer a completion marks as such, or None when it marks none.

    In this order: the content of the last ``\\boxed{...}`` (MATH, Qwen's answers), the line after the last
    ``####`` (GSM8K's reference solutions), the line after the last "answer is" or "answer:".
    """
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    hashes = _line_after(_HASHES, text)
    return hashes if hashes is not None else _line_after(_ANSWER_IS, text)


def final_number(text: str) -> str | None:
    """The number a completion gives as its answer: the first number of its :func:`marked_answer`, or,
    when it marks none, its last number (``"#### 72\\n\\nNote: step 3 of 4"`` -> ``"72"``)."""
    marked = marked_answer(text)
    if marked is None:
        return last_number(text)
    found = _NUMBER.search(marked)
    return found.group().replace(",", "") if found else None


def _same_number(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return False


def math_verifier():
    """The ``math_verify`` module, or None when the optional ``math`` extra is not installed."""
    try:
        import math_verify
    except ImportError:
        return None
    return math_verify


def math_reward(verifier, completion: str, answer: str) -> float:
    """1.0 when ``math_verify`` finds the completion's answer equal to ``answer``.

    The line after GSM8K's ``####`` is what is verified when the completion has one (math-verify does not know
    the marker); otherwise the whole completion (math-verify finds ``\\boxed{}`` and "the answer is" itself).
    Its time limits use ``SIGALRM``, which works in the main thread only: elsewhere they are off.
    """
    hashes = _line_after(_HASHES, completion)
    limit = 5 if threading.current_thread() is threading.main_thread() else None
    gold = _parsed_reference(verifier, answer, limit)
    got = verifier.parse(completion if hashes is None else hashes, parsing_timeout=limit)
    return float(bool(gold and got and verifier.verify(gold, got, timeout_seconds=limit)))


@functools.lru_cache(maxsize=4096)
def _parsed_reference(verifier, answer: str, limit: int | None) -> list:
    """A reference answer parsed once by ``math_verify`` (the same few answers are graded again and again)."""
    return verifier.parse(answer, parsing_timeout=limit)


@register_task("jsonl", fields=("path", "grader", "prompt_key", "answer_key"), graders=GRADERS, reads_file=True)
@dataclass
class JsonlTask(Task):
    """Records from a local data file; prompts are drawn uniformly with replacement.

    ``path``: a JSONL or JSON file, or a parquet file or a directory written by ``datasets``' ``save_to_disk``
    (its ``train`` split, or its only one), read with the ``datasets`` library (:func:`read_records`). A record
    gives its prompt in ``prompt_key`` (else ``prompt``, else GSM8K's ``question``): a string, or a list of
    chat messages ``{role, content}`` (TRL's conversational format, verl's layout), which always goes through
    the tokenizer's chat template. Its answer is ``answer_key`` (else ``answer``, else verl's
    ``reward_model.ground_truth``; a dotted key reaches into nested fields); an answer containing ``####``
    keeps the part after it (GSM8K); a numeric answer is written as its number (``72``, ``0.5``). An empty
    prompt or answer is refused, naming the file and line (or row).

    ``grader``: ``exact`` (stripped string equality), ``number`` (the completion's :func:`final_number`
    equals the answer's), or ``math`` (``math_verify`` when the ``math`` extra is installed; otherwise, with a
    warning, the ``number`` grader).
    """

    path: str = ""
    grader: str = "exact"
    prompt_key: str = "prompt"
    answer_key: str = "answer"
    name = "jsonl"

    def __post_init__(self) -> None:
        if self.grader not in GRADERS:
            raise ValueError(f"task.grader: unknown value {self.grader!r}; allowed values: {', '.join(GRADERS)}")
        self.prompts, self.answers = load_records(self.path, "{prompt, answer}", self._record)
        self._verifier = math_verifier() if self.grader == "math" else None
        if self.grader == "math" and self._verifier is None:
            warnings.warn("task.grader 'math': math-verify is not installed, so answers are compared as numbers "
                          "(the 'number' grader: the boxed, '####' or 'answer:' number, else the last one); "
                          "pip install 'sspo-analysis[math]' for symbolic answers", UserWarning, stacklevel=2)

    def _record(self, rec: dict[str, Any], where: str) -> tuple[str | list[dict[str, str]], str]:
        prompt_key, prompt = _first_field(rec, (self.prompt_key, "prompt", "question"))
        answer_key, answer = _first_field(rec, (self.answer_key, "answer", "reward_model.ground_truth"))
        if prompt is None or answer is None:
            missing = self.prompt_key if prompt is None else self.answer_key
            present = ", ".join(repr(key) for key, value in rec.items() if value is not None)
            raise ValueError(f"{where}: no field {missing!r} (the fields are {present}); "
                             "set task.prompt_key and task.answer_key")
        return record_prompt(prompt, where, prompt_key), record_answer(answer, where, answer_key)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
        idx = rng.integers(0, len(self.prompts), size=n)
        return [self.prompts[i] for i in idx], [self.answers[i] for i in idx]

    def reward(self, completion: str, answer: str) -> float:
        if self.grader == "exact":
            return float(completion.strip() == answer.strip())
        if self._verifier is None:
            return float(_same_number(final_number(completion), final_number(answer)))
        return math_reward(self._verifier, completion, answer)


def _first_field(rec: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, Any]:
    """``(key, value)`` of the first of ``keys`` that ``rec`` holds (not null); a dotted key reaches into
    nested records (``reward_model.ground_truth``). ``(keys[0], None)`` when none is there."""
    for key in keys:
        value: Any = rec
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return key, value
    return keys[0], None


def record_prompt(value: Any, where: str, key: str) -> str | list[dict[str, str]]:
    """A record's prompt: a non-blank string, or a non-empty list of chat messages with string ``role`` and
    ``content`` (some content non-blank); ValueError naming ``where`` and the field otherwise."""
    if isinstance(value, str):
        if not value.strip():
            raise ValueError(f"{where}: {key!r} is empty; a prompt needs text")
        return value
    messages = list(value) if isinstance(value, (list, tuple)) else None
    if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str)
                               and isinstance(m.get("content"), str) for m in messages):
        raise ValueError(f"{where}: {key!r} must be a string or a list of chat messages "
                         f"{{'role': str, 'content': str}}, got {_shown(value)}")
    if not any(m["content"].strip() for m in messages):
        raise ValueError(f"{where}: {key!r} holds no text (every message's content is empty)")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def record_answer(value: Any, where: str, key: str) -> str:
    """A record's reference answer as text: a string (the part after GSM8K's ``####`` when it has one) or a
    number (``72``, not ``72.0``); ValueError naming ``where`` and the field when it is empty or neither."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: {key!r} must be a string or a number, got {_shown(value)}")
    if isinstance(value, float):
        value = str(int(value)) if value.is_integer() else repr(value)
    answer = str(value)
    if "####" in answer:  # GSM8K: the final answer follows ####
        answer = answer.split("####")[-1]
    answer = answer.strip()
    if not answer:
        raise ValueError(f"{where}: {key!r} is empty; an empty answer would reward an empty completion")
    return answer


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60] + '...' if len(text) > 60 else text}"


def parse_tests_answer(answer) -> tuple[str, str | None]:
    """``(tests, entry_point)`` from a code task's reference: a dict or JSON object with ``tests`` (and
    optionally ``entry_point``), or a plain string of test source."""
    if isinstance(answer, str):
        text = answer.lstrip()
        if not text.startswith("{"):
            return answer, None
        answer = json.loads(text)
    if not isinstance(answer, dict) or not isinstance(answer.get("tests"), str):
        raise ValueError("tests: expected test source, or an object with a 'tests' string and an optional "
                         "'entry_point'")
    return answer["tests"], answer.get("entry_point") or None


@dataclass
class SandboxTask(Task):
    """A task graded by running code in :mod:`~sspo_analysis.sandbox`.

    ``reward`` never raises: a grader error (an unreadable reference, a failed
    start) gives reward 0 and is counted in ``reward_failures`` (the first one is
    also a warning), so one bad record cannot stop training. Results of
    deterministic outcomes (``ok``, ``failed``, ``syntax``) are cached by program
    and tests, so repeated completions are graded once. ``rewards`` grades a
    batch in parallel with ``sandbox.grade_many``.
    """

    grader: str = "tests-fraction"
    timeout_s: float = 5.0
    memory_mb: int = 512
    sandbox: str = "bwrap"
    reward_failures: int = field(default=0, init=False, repr=False)
    cache_size = 65536

    def __post_init__(self) -> None:
        from sspo_analysis.sandbox import SandboxUnavailable, require_sandbox

        if self.grader not in TEST_GRADERS:
            raise ValueError(f"task.grader: unknown value {self.grader!r} for task {self.name!r}; "
                             f"allowed values: {', '.join(TEST_GRADERS)}")
        try:  # before any work: a reward that could never be computed is not silently zero
            require_sandbox(self.sandbox)
        except (ValueError, SandboxUnavailable) as err:
            raise ValueError(f"task.{err}") from None
        self._cache: dict[tuple, object] = {}

    def program(self, completion: str, answer: str) -> tuple[str, str, str | None] | None:
        """``(program, tests, entry_point)`` to run, or None when the completion earns 0 without running."""
        raise NotImplementedError

    def reward(self, completion: str, answer: str) -> float:
        return self.rewards([completion], [answer])[0]

    def rewards(self, completions: list[str], answers: list[str], workers: int | None = None) -> list[float]:
        """Rewards of many completions, graded in parallel; failures count as 0 (see the class docstring)."""
        from sspo_analysis import sandbox

        jobs, out = {}, [0.0] * len(completions)
        for i, (completion, answer) in enumerate(zip(completions, answers)):
            try:
                job = self.program(completion, answer)
            except Exception as err:  # noqa: BLE001 - a bad reference gives 0, not a crash
                self._failed(err)
                continue
            if job is not None:
                jobs.setdefault(job, []).append(i)
        known = {job: self._cache.get(job) for job in jobs}
        todo = [job for job, result in known.items() if result is None]
        try:
            results = sandbox.grade_many([j[0] for j in todo], [j[1] for j in todo], workers=workers,
                                         entry_points=[j[2] for j in todo], timeout_s=self.timeout_s,
                                         memory_mb=self.memory_mb, sandbox=self.sandbox) if todo else []
        except Exception as err:  # noqa: BLE001 - the pool itself failed: this batch earns 0
            self._failed(err)
            return out
        for job, result in zip(todo, results):
            known[job] = result
            self._remember(job, result)
            if result.message.startswith("grader error"):
                self._failed(RuntimeError(result.message))
        for job, where in jobs.items():
            result = known[job]
            for i in where:
                out[i] = result.fraction if self.grader == "tests-fraction" else float(result.status == "ok")
        return out

    def _remember(self, job: tuple, result) -> None:
        if result.status in ("ok", "failed", "syntax"):
            if len(self._cache) >= self.cache_size:
                self._cache.clear()
            self._cache[job] = result

    def _failed(self, err: Exception) -> None:
        self.reward_failures += 1
        if self.reward_failures == 1:
            warnings.warn(f"task {self.name!r}: grading failed ({err}); the completion gets reward 0 "
                          "(further failures are counted in reward_failures)", RuntimeWarning, stacklevel=3)


@register_task("code", fields={"path": "path", "prompt_key": "prompt_key", "tests_key": "tests_key",
                               "entry_point_key": "entry_point_key", **_SANDBOX_FIELDS},
               check=_check_sandbox, graders=TEST_GRADERS, reads_file=True, references=False)
@dataclass
class CodeTask(SandboxTask):
    """Records ``{prompt, tests, entry_point?}`` from a local JSONL file, graded by running tests in the sandbox.

    ``tests`` is Python source: top-level ``assert`` lines, ``test_*``
    functions, or HumanEval's ``check(candidate)`` with ``entry_point``, in the
    forms :func:`~sspo_analysis.sandbox.checks.parse_tests` reads (a record whose
    tests it cannot read is refused with its file and line). The
    program is the completion's last fenced code block, or the whole completion
    when it has none. ``grader``: ``tests-fraction`` (fraction of tests passed)
    or ``tests-all`` (1 only when every test passes). The reference answer
    passed around is the JSON object ``{"tests", "entry_point"}``.
    """

    path: str = ""
    prompt_key: str = "prompt"
    tests_key: str = "tests"
    entry_point_key: str = "entry_point"
    name = "code"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.prompts, self.answers = load_records(self.path, "{prompt, tests}", self._record)

    def _record(self, rec: dict[str, Any], where: str) -> tuple[str, str]:
        from sspo_analysis.sandbox import parse_tests

        prompt, tests, entry = (rec.get(k) for k in (self.prompt_key, self.tests_key, self.entry_point_key))
        if not isinstance(prompt, str) or not isinstance(tests, str):
            raise ValueError(f"{where}: needs string fields {self.prompt_key!r} and {self.tests_key!r}")
        if entry is not None and not (isinstance(entry, str) and entry.isidentifier()):
            raise ValueError(f"{where}: {self.entry_point_key!r} must be a Python identifier, got {entry!r}")
        try:
            parse_tests(tests, entry)
        except ValueError as err:
            raise ValueError(f"{where}: {err}") from None
        return prompt, json.dumps({"tests": tests, "entry_point": entry})

    def sample(self, rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
        idx = rng.integers(0, len(self.prompts), size=n)
        return [self.prompts[i] for i in idx], [self.answers[i] for i in idx]

    def program(self, completion: str, answer: str) -> tuple[str, str, str | None]:
        from sspo_analysis.sandbox import extract_code

        tests, entry = parse_tests_answer(answer)
        return extract_code(completion), tests, entry

    def written(self, answer: str) -> str:
        """A definition of each function the tests call (``def name(): return``): the names are what the
        model must be able to write; the tests themselves are never written."""
        from sspo_analysis.sandbox import parse_tests

        return " ".join(f"def {name}(): return" for name in parse_tests(*parse_tests_answer(answer)).functions)


_REFERENCE = re.compile(r"(?:(\d)\*)?x(\*x)?(?:\+(\d))?")
_EXPRESSION_CHARS = set("0123456789x+-*() ")


@register_task("synthesis", fields=_SANDBOX_FIELDS, check=_check_sandbox, graders=TEST_GRADERS)
@dataclass
class Synthesis(SandboxTask):
    """``"f(0)=3,f(1)=5,f(2)=7:"`` -> an expression in ``x`` such as ``"2*x+3"``: synthesise a hidden function.

    Hidden functions are ``a*x+b`` (``a`` in 1..``max_slope``, ``b`` in
    0..``max_offset``) and, with ``squares``, ``x*x+b``, drawn uniformly; the
    prompt shows their values at ``shown``. The completion becomes
    ``def f(x): return <completion>`` and is graded in the sandbox on the
    ``held_out`` inputs (the reference values come from the known parameters,
    nothing is evaluated in this process). Completions with characters other
    than digits, ``x``, ``+ - * ( )`` and spaces earn 0 without running.
    Default grader: ``tests-all``. The reference answer is the shortest
    expression (at most 5 characters with the defaults).
    """

    grader: str = "tests-all"
    timeout_s: float = 2.0
    memory_mb: int = 256
    max_slope: int = 5
    max_offset: int = 9
    squares: bool = True
    shown: tuple[int, ...] = (0, 1, 2)
    held_out: tuple[int, ...] = (3, 5, 8, -4)
    name = "synthesis"

    def sample(self, rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
        offsets = self.max_offset + 1
        n_functions = (self.max_slope + int(self.squares)) * offsets
        prompts, answers = [], []
        for k in rng.integers(0, n_functions, size=n):
            a, b = divmod(int(k), offsets)
            expr = ("x*x" if a == self.max_slope else ("x" if a == 0 else f"{a + 1}*x")) + (f"+{b}" if b else "")
            # no spaces: a character tokenizer saved and reloaded by transformers drops them
            prompts.append(",".join(f"f({x})={self._value(expr, x)}" for x in self.shown) + ":")
            answers.append(expr)
        return prompts, answers

    @staticmethod
    def _value(reference: str, x: int) -> int:
        """The reference function at ``x``, from its parameters (a trusted parse, never ``eval``)."""
        match = _REFERENCE.fullmatch(reference)
        if match is None:
            raise ValueError(f"synthesis: {reference!r} is not a reference expression a*x+b or x*x+b")
        slope, square, offset = match.groups()
        return (x * x if square else int(slope or 1) * x) + int(offset or 0)

    def program(self, completion: str, answer: str) -> tuple[str, str, None] | None:
        expr = completion.strip()
        if not expr or len(expr) > 64 or not set(expr) <= _EXPRESSION_CHARS:
            return None
        tests = "\n".join(f"assert f({x}) == {self._value(answer, x)}" for x in self.held_out)
        return f"def f(x):\n    return ({expr})\n", tests, None


def jsonl_records(path: str | Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line number, record)`` for each non-blank line of a JSONL file of objects.

    A UTF-8 byte-order mark is skipped; a line that is not UTF-8, not JSON, not a JSON object, or that holds
    a lone surrogate (``"\\ud800"``, which is not text) is a ValueError naming the file and the line.
    """
    where = f"task.path: {path}"
    try:
        raw = Path(path).read_bytes()
    except OSError as err:
        raise ValueError(f"{where}: cannot be read ({err.strerror})") from err
    for lineno, line in enumerate(raw.removeprefix(b"\xef\xbb\xbf").splitlines(), 1):
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{where}:{lineno}: not UTF-8 (byte {err.start + 1})") from None
        if not text.strip():
            continue
        try:
            rec = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{where}:{lineno}: not JSON ({err.msg}, column {err.colno})") from None
        yield lineno, _json_object(rec, f"{where}:{lineno}")


def _json_object(rec: Any, where: str) -> dict[str, Any]:
    """``rec`` when it is a JSON object of text; a ValueError naming ``where`` when it is not an object, or when
    a field holds a lone surrogate (``"\\ud800"``: JSON allows the escape, but it is not text, and a tokenizer
    fails on it)."""
    if not isinstance(rec, dict):
        raise ValueError(f"{where}: expected a JSON object, got a JSON {type(rec).__name__}")
    for key, value in rec.items():
        try:
            json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:
            raise ValueError(f"{where}: {key!r} holds a lone surrogate (an escape such as \\ud800 that is not "
                             "text); fix or drop the record") from None
    return rec


def json_array_records(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for each object of a file holding one JSON array; ``where`` names the row (from 0).

    Not UTF-8, not JSON (with the line and column), not an array, or a row that is not an object of text
    is a ValueError naming the file.
    """
    where = f"task.path: {path}"
    try:
        records = json.loads(Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf"))
    except OSError as err:
        raise ValueError(f"{where}: cannot be read ({err.strerror})") from err
    except UnicodeDecodeError as err:
        raise ValueError(f"{where}: not UTF-8 (byte {err.start + 1})") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}:{err.lineno}: not JSON ({err.msg}, column {err.colno})") from None
    if not isinstance(records, list):
        raise ValueError(f"{where}: expected a JSON array of objects, got a JSON {type(records).__name__}")
    for i, rec in enumerate(records):
        yield f"{where}: row {i}", _json_object(rec, f"{where}: row {i}")


def read_records(path: str | Path, fields: str = "{prompt, answer}") -> list[tuple[str, dict[str, Any]]]:
    """``(where, record)`` for each record of a local task file.

    ``path`` is a directory written by ``Dataset.save_to_disk`` (a ``DatasetDict``'s ``train`` split, or its
    only one) or a ``.parquet`` file, both read with the ``datasets`` library (nothing cached: it prepares a
    parquet file in a temporary directory, removed at once); a file holding one JSON array of objects; or JSON
    Lines (any other file). JSON text is parsed by Python's ``json``, so every value is the file's own and
    a bad line is named: ``datasets``' JSON reader infers one Arrow type per column, and rewrites what does
    not fit it (``datasets`` 4.7, TRL's floor, reads a string prompt beside a list one as ``'"2+2="'``; 5.2
    drops a lone surrogate). ``where`` is ``"task.path: FILE:LINE"`` for JSON Lines and ``"task.path: FILE:
    row I"`` otherwise (``I`` counts from 0, as ``dataset[I]``). ``fields`` describes a record in the message
    for a missing path.
    """
    source = Path(path)
    if str(path) and source.is_dir():
        return _rows(_saved_dataset(source), f"task.path: {path}")
    if not source.is_file():
        raise ValueError(f"task.path: {str(path)!r} is not a file or a directory (a local JSONL, JSON or parquet "
                         f"file, or a datasets save_to_disk directory, of {fields} records)")
    if source.suffix == ".parquet":
        return _rows(_parquet(source), f"task.path: {path}")
    if _json_array(source):
        return list(json_array_records(source))
    return [(f"task.path: {path}:{lineno}", rec) for lineno, rec in jsonl_records(source)]


def _json_array(path: Path) -> bool:
    """Whether ``path`` holds one JSON array (its first character after a byte-order mark and blanks is ``[``)."""
    with path.open("rb") as f:
        head = f.read(4096).removeprefix(b"\xef\xbb\xbf").lstrip()
    return head.startswith(b"[")


def _rows(dataset, where: str) -> list[tuple[str, dict[str, Any]]]:
    return [(f"{where}: row {i}", rec) for i, rec in enumerate(dataset)]


@contextlib.contextmanager
def _quiet_datasets():
    """The ``datasets`` module with its progress bars off inside the block (as they were after it)."""
    import datasets

    shown = not datasets.are_progress_bars_disabled()
    datasets.disable_progress_bars()
    try:
        yield datasets
    finally:
        if shown:
            datasets.enable_progress_bars()


def _parquet(path: Path) -> list[dict[str, Any]]:
    """The records of a parquet file through ``datasets.load_dataset`` (a temporary cache)."""
    with _quiet_datasets() as datasets, tempfile.TemporaryDirectory(prefix="sspo-data-") as cache:
        try:
            return datasets.load_dataset("parquet", data_files=str(path.resolve()), split="train", cache_dir=cache,
                                         keep_in_memory=True).to_list()
        except Exception as err:  # noqa: BLE001 - datasets wraps the reader's error; show its cause in one line
            raise ValueError(f"task.path: {path}: not readable as parquet ({_root_cause(err)})") from None


def _saved_dataset(path: Path):
    """The records of a ``save_to_disk`` directory: a ``Dataset``, or a ``DatasetDict``'s ``train`` split (or
    its only one)."""
    with _quiet_datasets() as datasets:
        try:
            data = datasets.load_from_disk(str(path))
        except Exception as err:  # noqa: BLE001 - not a saved dataset: one line
            raise ValueError(f"task.path: {path}: a directory, but not a dataset saved with datasets' "
                             f"save_to_disk ({_root_cause(err)})") from None
    if isinstance(data, datasets.DatasetDict):
        if "train" not in data and len(data) != 1:
            raise ValueError(f"task.path: {path}: a DatasetDict without a 'train' split (splits: "
                             f"{', '.join(data)}); save the split to train on")
        data = data["train"] if "train" in data else next(iter(data.values()))
    return data.to_list()


def _root_cause(err: BaseException) -> str:
    """The innermost cause of ``err``, as ``Type: first line``."""
    for _ in range(32):  # a chain, not a cycle: bounded all the same
        inner = err.__cause__ or err.__context__
        if inner is None:
            break
        err = inner
    return f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"


def load_records(path: str, fields: str, parse) -> tuple[list, list[str]]:
    """``(prompts, answers)`` of a local task file (:func:`read_records`), ``parse(record, where)`` giving each pair.

    ``where`` names the file and line (or row) for ``parse``'s errors; ``fields`` describes a record in the
    message for a missing file.
    """
    pairs = [parse(rec, where) for where, rec in read_records(path, fields)]
    if not pairs:
        raise ValueError(f"task.path: {path} has no records")
    return [p for p, _ in pairs], [a for _, a in pairs]


_BUILTIN.update(TASKS)  # the tasks registered above are the built-in ones: a user's cannot replace them


def make_task(name: str, **params) -> Task:
    """Build the registered task ``name`` from its parameters (the keywords its class takes; see each class).
    An empty ``grader`` means the task's default."""
    spec = task_spec(name)
    if params.get("grader") == "":
        params.pop("grader")
    return spec.build(**params)


def make_task_from(cfg: TrainConfig) -> Task:
    """The task ``cfg.task`` configures (:func:`make_task` with the fields its registry entry reads)."""
    spec = task_spec(cfg.task.name)
    return make_task(spec.name, **{keyword: getattr(cfg.task, f) for f, keyword in spec.fields.items()})
