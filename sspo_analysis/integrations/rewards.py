"""The compact trainer's code grader as engine reward functions (TRL and verl); imports neither engine.

- :func:`code_reward` (and :func:`make_code_reward` for other settings): a TRL
  ``reward_funcs`` entry, ``(prompts, completions, **kwargs) -> list[float]``,
  reading the tests from the data set column ``tests`` (optional column
  ``entry_point``); also re-exported as ``sspo_analysis.integrations.trl.code_reward``.
- :func:`compute_score`: verl's ``custom_reward_function`` signature
  ``(data_source, solution_str, ground_truth, extra_info=None) -> float``;
  ``ground_truth`` is the test source or ``{"tests", "entry_point"}``
  (a dict or its JSON). In verl's config::

      custom_reward_function.path=/path/to/sspo_analysis/integrations/rewards.py
      custom_reward_function.name=compute_score

Both take the program from the completion's last fenced code block (or the
whole completion), run it in :mod:`sspo_analysis.sandbox`, and return
the fraction of tests passed (``grader="tests-all"``: 1 only when all pass). A
grading error gives 0 and a warning, never an exception in the engine's loop; a
sandbox that cannot run here (bubblewrap missing, ``sandbox.SandboxUnavailable``)
is an exception, so that training never goes on with rewards that are all zero.
``sandbox="unsafe-process"`` (``extra_info["sandbox"]`` for verl) opts in to the
uncontained fallback.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

from sspo_analysis.sandbox import SandboxUnavailable, extract_code, grade_many, run_python
from sspo_analysis.training.tasks import TEST_GRADERS, parse_tests_answer


def completion_text(completion: Any) -> str:
    """A completion as text: TRL passes strings, or for conversational data a list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, Sequence) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def _score(result, grader: str) -> float:
    return result.fraction if grader == "tests-fraction" else float(result.status == "ok")


def make_code_reward(tests_column: str = "tests", entry_point_column: str = "entry_point", *,
                     grader: str = "tests-fraction", timeout_s: float = 5.0, memory_mb: int = 512,
                     workers: int | None = None, sandbox: str = "bwrap") -> Callable[..., list[float]]:
    """A TRL reward function grading each completion against its row's ``tests_column`` in the sandbox."""
    if grader not in TEST_GRADERS:
        raise ValueError(f"grader: unknown value {grader!r}; allowed values: {', '.join(TEST_GRADERS)}")

    def code_reward(prompts=None, completions=None, **kwargs) -> list[float]:
        if completions is None:
            raise ValueError("code_reward: TRL passes completions=...; got none")
        tests = kwargs.get(tests_column)
        if tests is None or len(tests) != len(completions):
            raise ValueError(f"code_reward: needs the data set column {tests_column!r} (one test source per row)")
        entries = kwargs.get(entry_point_column) or [None] * len(completions)
        programs = [extract_code(completion_text(c)) for c in completions]
        results = grade_many(programs, [str(t) for t in tests], entry_points=[e or None for e in entries],
                             workers=workers, timeout_s=timeout_s, memory_mb=memory_mb, sandbox=sandbox)
        bad = [r.message for r in results if r.message.startswith("grader error")]
        if bad:
            warnings.warn(f"code_reward: {len(bad)} completion(s) could not be graded ({bad[0]}); reward 0",
                          RuntimeWarning, stacklevel=2)
        return [_score(r, grader) for r in results]

    code_reward.__name__ = "code_reward" if grader == "tests-fraction" else "code_reward_all"
    return code_reward


code_reward = make_code_reward()
"""TRL reward function: fraction of the row's ``tests`` passed by the completion's code (see the module)."""


def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None) -> float:
    """verl ``custom_reward_function``: fraction of tests passed (``extra_info["grader"] = "tests-all"``: 0 or 1).

    ``extra_info`` may also set ``entry_point``, ``timeout_s``, ``memory_mb`` and ``sandbox``.
    """
    info = extra_info or {}
    try:
        tests, entry = parse_tests_answer(ground_truth)
        grader = info.get("grader", "tests-fraction")
        if grader not in TEST_GRADERS:
            raise ValueError(f"grader: unknown value {grader!r}; allowed values: {', '.join(TEST_GRADERS)}")
        result = run_python(extract_code(solution_str), tests, entry_point=info.get("entry_point") or entry,
                            timeout_s=float(info.get("timeout_s", 5.0)), memory_mb=int(info.get("memory_mb", 512)),
                            sandbox=info.get("sandbox", "bwrap"))
    except SandboxUnavailable:
        raise
    except Exception as err:  # noqa: BLE001 - one bad row must not stop verl's reward loop
        warnings.warn(f"compute_score ({data_source}): grading failed ({err}); score 0", RuntimeWarning,
                      stacklevel=2)
        return 0.0
    return _score(result, grader)
