"""Held-out evaluation: a fixed prompt set kept out of training, scored sampled, greedy and pass@k, written at the
right steps, and trimmed with the metrics on a resume."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sspo_analysis.training import heldout as heldout_module
from sspo_analysis.training import load_config, train
from sspo_analysis.training.heldout import HeldOut, evaluate_heldout, heldout_set, read_heldout, training_prompts
from sspo_analysis.training.tasks import Addition

pytestmark = pytest.mark.filterwarnings("ignore:no learning signal")  # a random micro model scores 0

FAST = ['model.preset="micro"', "model.warm_start=false", "rollout.prompts=4", "rollout.group_size=4",
        "rollout.max_new_tokens=4", "log.progress=false", "log.log_ratios_every=0", "threads=1",
        "log.eval_prompts=8", "log.eval_samples=2"]


def test_heldout_set_is_fixed_distinct_and_independent_of_the_run():
    a, b = heldout_set(Addition(2), 64), heldout_set(Addition(2), 64)
    assert a == b and len(set(a.prompts)) == 64
    assert all(str(int(p[:2]) + int(p[3:5])) == ans for p, ans in zip(a.prompts, a.answers))


def test_a_task_with_few_prompts_gives_what_it_has():
    held = heldout_set(Addition(1), 500)  # 10 x 10 one-digit sums
    assert len(held.prompts) == 100


def test_training_prompts_never_draw_a_heldout_prompt_and_are_unchanged_without_one():
    task, held = Addition(1), heldout_set(Addition(1), 50)
    prompts, answers = training_prompts(task, np.random.default_rng(3), 400, held.excluded)
    assert not set(prompts) & held.excluded
    assert all(str(int(p[0]) + int(p[2])) == a for p, a in zip(prompts, answers))
    plain = training_prompts(task, np.random.default_rng(3), 40, frozenset())
    assert plain == task.sample(np.random.default_rng(3), 40)


def test_training_prompts_refuse_a_heldout_set_that_leaves_nothing():
    task = Addition(1)
    with pytest.raises(ValueError, match="log.eval_prompts"):
        training_prompts(task, np.random.default_rng(0), 4, heldout_set(task, 100).excluded)


def test_scores_are_sampled_mean_greedy_and_pass_at_k(monkeypatch):
    # 3 prompts x 2 samples: rewards [1, 0], [0, 0], [0.5, 1] -> sampled 2.5 / 6, pass@2: 2 of 3 prompts.
    sampled = np.array([[1.0, 0.0], [0.0, 0.0], [0.5, 1.0]])
    greedy = np.array([[1.0], [0.0], [1.0]])
    monkeypatch.setattr(heldout_module, "score", lambda *a, temperature, **k: sampled if temperature else greedy)
    cfg = load_config(None, ["log.eval_samples=2"])

    class Model:
        def parameters(self):
            yield __import__("torch").zeros(1)

    row = evaluate_heldout(Model(), None, Addition(1), cfg, HeldOut(("1+1=",) * 3, ("2",) * 3), step=7)
    assert row == {"step": 7, "sampled": pytest.approx(2.5 / 6), "greedy": pytest.approx(2 / 3),
                   "pass@2": pytest.approx(2 / 3), "prompts": 3}


def test_a_run_scores_before_the_first_step_every_n_steps_and_at_the_end(tmp_path):
    run = train(None, tmp_path / "r", overrides=FAST + ["steps=5", "log.eval_every=2"])
    df = read_heldout(run)
    assert list(df.step) == [0, 2, 4, 5]
    assert ((df.sampled >= 0) & (df.sampled <= 1) & (df["pass@2"] >= df.sampled - 1e-12)).all()


def test_a_resume_drops_the_rows_written_after_its_checkpoint(tmp_path):
    run = train(None, tmp_path / "r", overrides=FAST + ["steps=4", "log.eval_every=1", "log.checkpoint_every=2"])
    full = read_heldout(run)
    # a row written after the last checkpoint (step 4), as a kill between an evaluation and a checkpoint leaves
    import torch
    assert torch.load(run / "checkpoint" / "state.pt", weights_only=False)["step"] == 4
    (run / "heldout.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full.to_dict("records"))
                                       + json.dumps({"step": 99, "sampled": 1.0}) + "\n")
    train(None, run, overrides=["steps=5"], resume=True, progress=False)
    assert list(read_heldout(run).step) == [0, 1, 2, 3, 4, 5]


def test_evaluation_settings_are_checked_before_work(tmp_path):
    with pytest.raises(ValueError, match="log.eval_every"):
        train(None, tmp_path / "bad", overrides=FAST + ["log.eval_every=-1"])
    assert not (tmp_path / "bad").exists()


def test_a_damaged_heldout_record_is_named(tmp_path):
    (tmp_path / "heldout.jsonl").write_text('{"step": 0, "sampled": 0.5}\n{"step": 1, "samp\n')
    with pytest.raises(ValueError, match="line 2"):
        read_heldout(tmp_path)
