"""The task registry: a task is one class and one decorator, in any file. The ``copy`` task below is
registered from this test file alone, no package file touched, and trains like a built-in one. JSONL files:
errors that name the file and the line, a byte-order mark skipped."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

import numpy as np
import pytest
from test_runs import _sets

from sspo_analysis.cli import main
from sspo_analysis.training import Task, load_config, read_metrics, register_task, train
from sspo_analysis.training.tasks import TASKS, Reversal, Synthesis, make_task_from, unregister_task

FAST = ["model.preset=\"micro\"", "model.warm_start=false", "rollout.prompts=4", "rollout.group_size=4",
        "rollout.max_new_tokens=4", "log.progress=false", "threads=1", "optim.lr=1e-3", "steps=2"]


@dataclass
class Copy(Task):
    """``"abc="`` -> ``"abc"``: copy a random string of ``length`` letters from a, b, c (``=`` ends the prompt:
    the character tokenizer has no ``|``). ``grader``: ``exact`` or ``prefix`` (the leading characters right,
    over the longer of the two)."""

    length: int = 3
    grader: str = "exact"
    name = "copy"

    def sample(self, rng: np.random.Generator, n: int) -> tuple[list[str], list[str]]:
        words = ["".join(rng.choice(list("abc"), size=self.length)) for _ in range(n)]
        return [f"{w}=" for w in words], words

    def reward(self, completion: str, answer: str) -> float:
        got = completion.strip()
        if self.grader == "exact":
            return float(got == answer)
        right = next((i for i, (a, b) in enumerate(zip(got, answer)) if a != b), min(len(got), len(answer)))
        return right / max(len(got), len(answer), 1)


@pytest.fixture
def copy_task():
    register_task("copy", fields=("length", "grader"), graders=("exact", "prefix"))(Copy)
    yield TASKS["copy"]
    unregister_task("copy")


def test_a_task_registered_in_a_test_file_trains(copy_task, tmp_path):
    run = train(None, tmp_path / "copy", overrides=['task.name="copy"', "task.length=3", 'task.grader="prefix"',
                                                    "log.samples_every=1", *FAST])
    metrics = read_metrics(run)
    assert list(metrics["step"]) == [1, 2] and np.isfinite(metrics["reward_mean"]).all()
    rows = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert rows and all(r["prompt"].endswith("=") and r["prompt"][:-1] == r["answer"] for r in rows)
    assert all(r["reward"] == Copy(grader="prefix").reward(r["completion"], r["answer"]) for r in rows)


def test_the_registry_passes_the_fields_a_task_reads(copy_task):
    assert copy_task.defaults == {"length": 5, "grader": ""}  # TaskConfig's defaults, the one place they live
    assert make_task_from(load_config(None, ['task.name="copy"', "task.length=4"])) == Copy(length=4)
    assert make_task_from(load_config(None, ['task.name="copy"', 'task.grader="prefix"'])).grader == "prefix"
    with pytest.raises(ValueError, match=r"^task.grader: unknown value 'chars'; allowed values: exact, prefix$"):
        load_config(None, ['task.name="copy"', 'task.grader="chars"'])
    with pytest.raises(ValueError, match=r"^task.name: unknown value 'sudoku'; allowed values: addition, countdown, "
                                         r"reversal, jsonl, code, synthesis, copy$"):
        load_config(None, ['task.name="sudoku"'])


def test_built_in_tasks_read_their_fields_through_the_registry():
    reversal = make_task_from(load_config(None, ['task.name="reversal"', "task.length=7", 'task.grader="chars"']))
    assert reversal == Reversal(length=7, grader="chars")
    config = load_config(None, ['task.name="synthesis"', "task.sandbox_timeout_s=3", "task.sandbox_memory_mb=300",
                                'task.sandbox="unsafe-process"'])
    from sspo_analysis import sandbox

    sandbox._warn_unsafe.cache_clear()  # it warns once a process: an earlier test may have had it
    with pytest.warns(RuntimeWarning, match="unsafe-process"):
        synthesis = make_task_from(config)
    assert (synthesis.timeout_s, synthesis.memory_mb, synthesis.sandbox, synthesis.grader) == (
        3.0, 300, "unsafe-process", Synthesis.grader)


def test_registry_refusals():
    with pytest.raises(ValueError, match=r"^task name: 'addition' is a built-in task; choose another name$"):
        register_task("addition")(Copy)
    with pytest.raises(ValueError, match=r"^task name: 'jsonl' is a built-in task and cannot be removed$"):
        unregister_task("jsonl")
    with pytest.raises(ValueError, match=r"^task 'copy': unknown field\(s\) width; allowed: name, digits, "):
        register_task("copy", fields=("width",))(Copy)
    assert "copy" not in TASKS
    with pytest.raises(ValueError, match=r"^task.name: unknown value 'copy'; allowed values: addition, "):
        load_config(None, ['task.name="copy"'])


# --------------------------------------------------------------------------- JSONL files


@pytest.mark.parametrize("content, message", [
    (b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": bad}\n', r"bad\.jsonl:2: not JSON"),
    (b'{"prompt": "1+1=", "answer": "2"}\n{"prompt": "\xff"}\n', r"bad\.jsonl:2: not UTF-8"),
    (b'{"prompt": "1+1=", "answer": "2"}\n\n[1, 2]\n', r"bad\.jsonl:3: expected a JSON object, got a JSON list"),
])
def test_jsonl_task_errors_name_the_file_and_the_line(tmp_path, content, message, capsys):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(content)
    over = FAST + ["task.name=\"jsonl\"", f"task.path=\"{path}\"", "steps=1"]
    assert main(["train", "--no-progress", "--out", str(tmp_path / "r"), *_sets(over)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(message, err)


def test_a_byte_order_mark_is_skipped(tmp_path):
    from sspo_analysis.training.tasks import make_task

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "1+1=", "answer": "2"}\n')
    assert make_task("jsonl", path=str(path)).prompts == ["1+1="]
