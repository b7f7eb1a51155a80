"""Checks of a task's data against the model before the first step (``sspo_analysis.training.inputs``): prompts
longer than the context refused, characters outside the tokenizer's alphabet reported or refused."""

from __future__ import annotations

import json

import pytest
from test_runs import FAST

from sspo_analysis.training import train


def test_prompts_longer_than_the_context_are_refused_before_training(tmp_path):
    path = tmp_path / "long.jsonl"
    records = [{"prompt": "1+1=", "answer": "2"}, {"prompt": "1" * 600, "answer": "1"},
               {"prompt": "2" * 509, "answer": "2"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    over = FAST + ["task.name=\"jsonl\"", f"task.path=\"{path}\"", "steps=1"]
    # micro: 512 positions, 4 new tokens: prompts of 509 and 600 characters do not fit, 508 would
    with pytest.raises(ValueError, match=r"2 of 3 prompts are longer than 508 tokens.*longest has 600"):
        train(None, tmp_path / "r", overrides=over)


def test_characters_outside_the_alphabet_are_reported_or_refused(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text(json.dumps({"prompt": "1+1 ≈", "answer": "2"}) + "\n")
    over = FAST + ["task.name=\"jsonl\"", f"task.path=\"{path}\"", "steps=1"]
    with pytest.warns(UserWarning, match="1 characters the character tokenizer lacks \\('≈' x1\\)"):
        train(None, tmp_path / "r", overrides=over)
    path.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" + json.dumps({"prompt": "x", "answer": "é"}))
    with pytest.raises(ValueError, match="1 of 2 answers use characters .*'é'"):
        train(None, tmp_path / "r2", overrides=over)
