"""Tasks with verifiable rewards: a task samples prompts with reference answers and grades completions.

Built in: n-digit ``addition``, ``countdown`` (reach a target from given numbers
with + - *), sequence ``reversal``; and ``jsonl``: local ``{prompt, answer}``
records (GSM8K's ``{question, answer: "... #### 42"}`` too) graded by exact
match, by the last number in the completion, or by ``math-verify`` (the
``math`` extra, imported only when used); ``code``: local ``{prompt, tests,
entry_point?}`` records graded by running the completion's code against the
tests in :mod:`sspo_analysis.training.sandbox`; ``synthesis``: write an
expression in ``x`` for a hidden function shown by input/output pairs, graded in
the sandbox on held-out inputs.
"""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

GRADERS = ("exact", "number", "math")
"""Graders of the ``jsonl`` task."""
TEST_GRADERS = ("tests-fraction", "tests-all")
"""Graders of the ``code`` and ``synthesis`` tasks: the fraction of tests passed, or 1 only when all pass."""
REVERSAL_GRADERS = ("exact", "chars")
"""Graders of the ``reversal`` task: the whole string, or the fraction of characters in place."""
TASK_GRADERS = {"jsonl": GRADERS, "code": TEST_GRADERS, "synthesis": TEST_GRADERS, "reversal": REVERSAL_GRADERS}
"""Allowed ``task.grader`` values per task (an empty ``task.grader`` means the task's default, listed first)."""


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


@dataclass
class Addition(Task):
    """``"12+34="`` -> ``"46"``: sum of two uniformly drawn ``digits``-digit numbers."""

    digits: int = 2
    name = "addition"

    def sample(self, rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
        lo, hi = 10 ** (self.digits - 1) if self.digits > 1 else 0, 10**self.digits
        a, b = rng.integers(lo, hi, size=n), rng.integers(lo, hi, size=n)
        return [f"{x}+{y}=" for x, y in zip(a, b)], [str(x + y) for x, y in zip(a, b)]


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


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def last_number(text: str) -> str | None:
    """The last number in ``text`` without thousands separators (``"1,234.0"`` -> ``"1234.0"``)."""
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def _same_number(a: str | None, b: str | None) -> bool:
    if a is None or b is None:
        return False
    try:
        return abs(float(a) - float(b)) < 1e-6
    except ValueError:
        return False


@dataclass
class JsonlTask(Task):
    """Records from a local JSONL file; prompts are drawn uniformly with replacement.

    Each line has ``prompt_key`` and ``answer_key`` (defaults ``prompt``/``answer``,
    falling back to GSM8K's ``question``); an answer containing ``####`` keeps the
    part after it (GSM8K). ``grader``: ``exact`` (stripped string equality),
    ``number`` (last number in the completion equals the answer numerically), or
    ``math`` (``math_verify.verify``; needs ``pip install math-verify``).
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
        if self.grader == "math":
            self._math()  # fail before any work if the extra is missing

    def _record(self, rec: dict[str, Any], where: str) -> tuple[str, str]:
        prompt = rec.get(self.prompt_key, rec.get("question"))
        answer = rec.get(self.answer_key)
        if prompt is None or answer is None:
            raise ValueError(f"{where} lacks {self.prompt_key!r} or {self.answer_key!r}")
        answer = str(answer)
        if "####" in answer:  # GSM8K: the final answer follows ####
            answer = answer.split("####")[-1].strip()
        return str(prompt), answer

    @staticmethod
    def _math():
        try:
            import math_verify
        except ImportError as err:
            raise ValueError("task.grader: 'math' needs the math extra (pip install math-verify)") from err
        return math_verify

    def sample(self, rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
        idx = rng.integers(0, len(self.prompts), size=n)
        return [self.prompts[i] for i in idx], [self.answers[i] for i in idx]

    def reward(self, completion: str, answer: str) -> float:
        if self.grader == "exact":
            return float(completion.strip() == answer.strip())
        if self.grader == "number":
            return float(_same_number(last_number(completion), last_number(answer)))
        mv = self._math()
        return float(bool(mv.verify(mv.parse(answer), mv.parse(completion))))


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
    """A task graded by running code in :mod:`~sspo_analysis.training.sandbox`.

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
        from sspo_analysis.training.sandbox import SandboxUnavailable, require_sandbox

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
        from sspo_analysis.training import sandbox

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


@dataclass
class CodeTask(SandboxTask):
    """Records ``{prompt, tests, entry_point?}`` from a local JSONL file, graded by running tests in the sandbox.

    ``tests`` is Python source: top-level ``assert`` lines, ``test_*``
    functions, or HumanEval's ``check(candidate)`` with ``entry_point``, in the
    forms :func:`~sspo_analysis.training.checks.parse_tests` reads (a record whose
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
        from sspo_analysis.training.sandbox import parse_tests

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
        from sspo_analysis.training.sandbox import extract_code

        tests, entry = parse_tests_answer(answer)
        return extract_code(completion), tests, entry

    def written(self, answer: str) -> str:
        """A definition of each function the tests call (``def name(): return``): the names are what the
        model must be able to write; the tests themselves are never written."""
        from sspo_analysis.training.sandbox import parse_tests

        return " ".join(f"def {name}(): return" for name in parse_tests(*parse_tests_answer(answer)).functions)


_REFERENCE = re.compile(r"(?:(\d)\*)?x(\*x)?(?:\+(\d))?")
_EXPRESSION_CHARS = set("0123456789x+-*() ")


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

    A UTF-8 byte-order mark is skipped; a line that is not UTF-8, not JSON, or not a JSON
    object is a ValueError naming the file and the line.
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
        if not isinstance(rec, dict):
            raise ValueError(f"{where}:{lineno}: expected a JSON object, got a JSON {type(rec).__name__}")
        yield lineno, rec


def load_records(path: str, fields: str, parse) -> tuple[list[str], list[str]]:
    """``(prompts, answers)`` of a local JSONL task file, ``parse(record, where)`` giving each pair.

    ``where`` names the file and line for ``parse``'s errors; ``fields`` describes a record in the
    message for a missing file.
    """
    if not Path(path).is_file():
        raise ValueError(f"task.path: {path!r} is not a file (a local JSONL of {fields} records)")
    pairs = [parse(rec, f"task.path: {path}:{lineno}") for lineno, rec in jsonl_records(path)]
    if not pairs:
        raise ValueError(f"task.path: {path} has no records")
    return [p for p, _ in pairs], [a for _, a in pairs]


TASKS = ("addition", "countdown", "reversal", "jsonl", "code", "synthesis")


def make_task(name: str, **params) -> Task:
    """Build a task by name: ``addition`` (digits), ``countdown`` (numbers, max_value),
    ``reversal`` (length, grader), ``jsonl`` (path, grader, prompt_key, answer_key), ``code`` (path, grader,
    prompt_key, tests_key, entry_point_key, timeout_s, memory_mb), ``synthesis`` (grader, timeout_s,
    memory_mb). An empty ``grader`` means the task's default."""
    classes = {"addition": Addition, "countdown": Countdown, "reversal": Reversal, "jsonl": JsonlTask,
               "code": CodeTask, "synthesis": Synthesis}
    if name not in classes:
        raise ValueError(f"task.name: unknown value {name!r}; allowed values: {', '.join(TASKS)}")
    if params.get("grader") == "":
        params.pop("grader")
    return classes[name](**params)
