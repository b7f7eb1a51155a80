"""Tasks with verifiable rewards: a task samples prompts with reference answers and grades completions.

Built in: n-digit ``addition``, ``countdown`` (reach a target from given numbers
with + - *), sequence ``reversal``; and ``jsonl``: local ``{prompt, answer}``
records (GSM8K's ``{question, answer: "... #### 42"}`` too) graded by exact
match, by the last number in the completion, or by ``math-verify`` (the
``math`` extra, imported only when used).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

GRADERS = ("exact", "number", "math")


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
    """``"abcd>"`` -> ``"dcba"``: reverse a random lowercase string of ``length`` letters."""

    length: int = 5
    name = "reversal"

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
        path = Path(self.path)
        if not path.is_file():
            raise ValueError(f"task.path: {self.path!r} is not a file (a local JSONL of {{prompt, answer}} records)")
        self.prompts: list[str] = []
        self.answers: list[str] = []
        with path.open() as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                rec = json.loads(line)
                prompt = rec.get(self.prompt_key, rec.get("question"))
                answer = rec.get(self.answer_key)
                if prompt is None or answer is None:
                    raise ValueError(f"task.path: {path}:{lineno} lacks {self.prompt_key!r} or {self.answer_key!r}")
                answer = str(answer)
                if "####" in answer:
                    answer = answer.split("####")[-1].strip()
                self.prompts.append(str(prompt))
                self.answers.append(answer)
        if not self.prompts:
            raise ValueError(f"task.path: {path} has no records")
        if self.grader == "math":
            self._math()  # fail before any work if the extra is missing

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


TASKS = ("addition", "countdown", "reversal", "jsonl")


def make_task(name: str, **params) -> Task:
    """Build a task by name: ``addition`` (digits), ``countdown`` (numbers, max_value),
    ``reversal`` (length), ``jsonl`` (path, grader, prompt_key, answer_key)."""
    classes = {"addition": Addition, "countdown": Countdown, "reversal": Reversal, "jsonl": JsonlTask}
    if name not in classes:
        raise ValueError(f"task.name: unknown value {name!r}; allowed values: {', '.join(TASKS)}")
    return classes[name](**params)
