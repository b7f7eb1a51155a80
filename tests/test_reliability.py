"""Hostile and careless use: run ownership, honest resumes and sweep reuse, diverged runs, strict inputs,
one-line errors for file and data problems, bounded work (issue 13)."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sspo_analysis.cli import main
from sspo_analysis.training import load_config, read_metrics, sweep, train
from sspo_analysis.training.health import ENTROPY_COLLAPSE_NATS, ENTROPY_COLLAPSE_STEPS, assess
from sspo_analysis.training.runs import LOCK_NAME, RunBusyError, run_lock
from sspo_analysis.training.trainer import TIMING_KEYS

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model.preset=\"micro\"", "model.warm_start=false", "rollout.prompts=4", "rollout.group_size=4",
        "rollout.max_new_tokens=4", "log.progress=false", "log.log_ratios_every=0", "log.checkpoint_every=2",
        "threads=1", "optim.lr=1e-3"]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _same_metrics(a, b) -> None:
    """Two runs' metrics are identical, timings aside."""
    assert list(a.step) == list(b.step)
    for key in a.columns:
        if key in TIMING_KEYS or key in ("run", "generation_time", "step_time"):
            continue
        x, y = a[key].to_numpy(), b[key].to_numpy()
        assert (np.array_equal(x, y, equal_nan=True) if x.dtype.kind == "f" else (x == y).all()), key


# --------------------------------------------------------------------------- run ownership


def _hold_lock(run: Path) -> subprocess.Popen:
    """Another process that owns ``run`` until killed."""
    code = ("import sys, time\nfrom sspo_analysis.training.runs import run_lock\n"
            "with run_lock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(120)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(run)], stdout=subprocess.PIPE, text=True, env=_env())
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_second_writer_fails_at_once_naming_the_owner(tmp_path, capsys):
    run = tmp_path / "run"
    owner = _hold_lock(run)
    try:
        t0 = time.perf_counter()
        with pytest.raises(RunBusyError, match=rf"{run.name}.*process {owner.pid}"):
            train(None, run, overrides=FAST + ["steps=1"])
        assert time.perf_counter() - t0 < 5  # before any model is built
        assert main(["train", "--set", "steps=1", *sum([["--set", s] for s in FAST], []), "--out", str(run)]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(owner.pid) in err and str(run) in err
        assert not (run / "metrics.jsonl").exists() and not (run / "config.toml").exists()
    finally:
        owner.kill()
        owner.wait()
    # the owner died without releasing: its lock is stale and taken over with a warning
    assert (run / LOCK_NAME).exists()
    with pytest.warns(UserWarning, match="stale lock"):
        train(None, run, overrides=FAST + ["steps=1"])
    assert (run / "DONE").exists() and not (run / LOCK_NAME).exists()


def test_lock_is_released_on_error_and_reentry_is_refused(tmp_path):
    with run_lock(tmp_path / "r") as lock:
        assert json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(RunBusyError):  # the same process, a second writer: also refused
            with run_lock(tmp_path / "r"):
                pass
    assert not lock.exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "metrics.jsonl").write_text("")
    with pytest.raises(ValueError, match="already holds a run"):  # raised while the lock is held
        train(None, tmp_path / "bad", overrides=FAST + ["steps=1"])
    assert not (tmp_path / "bad" / LOCK_NAME).exists()


def _cli_train(run: Path, steps: int) -> list[str]:
    over = FAST + [f"steps={steps}", "log.checkpoint_every=1"]
    return [sys.executable, "-m", "sspo_analysis.cli", "train", "--no-progress", "--out", str(run),
            *sum([["--set", s] for s in over], [])]


def test_kill_9_at_a_random_moment_then_resume_reproduces_the_run(tmp_path):
    straight = read_metrics(train(None, tmp_path / "straight", overrides=FAST + ["steps=5", "log.checkpoint_every=1"]))
    for seed in range(3):
        run = tmp_path / f"killed{seed}"
        proc = subprocess.Popen(_cli_train(run, 5), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while not (run / LOCK_NAME).exists() and proc.poll() is None:
            time.sleep(0.05)
        time.sleep(random.Random(seed).uniform(0.0, 2.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if (run / "config.toml").exists():
            with pytest.warns(UserWarning, match="stale lock"):
                train(None, run, resume=True, progress=False)
        else:  # killed before the config was written: start again over the stale lock
            with pytest.warns(UserWarning, match="stale lock"):
                train(None, run, overrides=FAST + ["steps=5", "log.checkpoint_every=1"])
        assert (run / "DONE").exists() and not list(run.glob("**/.*.tmp"))
        _same_metrics(straight, read_metrics(run))


# --------------------------------------------------------------------------- honest resumes and sweep reuse


def test_resume_refuses_changes_of_meaning_and_names_each_field(tmp_path):
    run = train(None, tmp_path / "r", overrides=FAST + ["steps=2"])
    with pytest.raises(ValueError, match=r"objective\.name.*seed|seed.*objective\.name") as err:
        train(None, run, overrides=["objective.name=\"sspo\"", "seed=7"], resume=True)
    assert "optim.lr" not in str(err.value)
    with pytest.raises(ValueError, match="optim.lr"):
        train(None, run, overrides=["optim.lr=0.1"], resume=True)
    assert load_config(run / "config.toml").objective.name == "grpo"
    train(None, run, overrides=["threads=1", "log.progress=false"], resume=True)  # honoured: no meaning


def test_more_steps_extend_a_finished_run_as_a_straight_run_would(tmp_path):
    straight = read_metrics(train(None, tmp_path / "straight", overrides=FAST + ["steps=4"]))
    run = train(None, tmp_path / "short", overrides=FAST + ["steps=2"])
    assert main(["train", "--no-progress", "--resume", str(run), "--set", "steps=4"]) == 0
    assert (run / "DONE").read_text().startswith("finished 4 steps")
    assert load_config(run / "config.toml").steps == 4
    _same_metrics(straight, read_metrics(run))
    with pytest.raises(ValueError, match="steps.*already done"):
        train(None, run, overrides=["steps=3"], resume=True)


def test_more_steps_under_a_decaying_schedule_are_refused(tmp_path):
    run = train(None, tmp_path / "cos", overrides=FAST + ["steps=2", "optim.schedule=\"cosine\""])
    with pytest.raises(ValueError, match="steps.*cosine"):
        train(None, run, overrides=["steps=4"], resume=True)


def test_sweep_reuses_only_a_run_made_with_the_requested_config(tmp_path, capsys):
    over = FAST + ["steps=1"]
    (run,) = sweep(["grpo"], [0], None, tmp_path, over)
    mtime = (run / "metrics.jsonl").stat().st_mtime_ns
    assert sweep(["grpo"], [0], None, tmp_path, over) == [run]
    assert (run / "metrics.jsonl").stat().st_mtime_ns == mtime  # reused as is
    with pytest.raises(ValueError, match=r"grpo_seed0: optim\.lr"):
        sweep(["grpo"], [0], None, tmp_path, over + ["optim.lr=2e-3"])
    assert main(["sweep", "--objectives", "grpo", "--seeds", "0", "--out", str(tmp_path), "--no-progress",
                 *sum([["--set", s] for s in over + ["optim.lr=2e-3"]], [])]) == 2
    assert "optim.lr" in capsys.readouterr().err
    assert sweep(["grpo"], [0], None, tmp_path, over + ["optim.lr=2e-3"], rerun=True) == [run]
    assert load_config(run / "config.toml").optim.lr == 2e-3
    assert sweep(["grpo"], [0], None, tmp_path, over + ["optim.lr=2e-3", "steps=2"]) == [run]  # extended
    assert list(read_metrics(run).step) == [1, 2]


def test_sweep_survives_a_run_path_that_is_a_file(tmp_path, capsys):
    (tmp_path / "grpo_seed0").write_text("in the way")
    runs = sweep(["grpo", "sapo"], [0], None, tmp_path, FAST + ["steps=1"])
    assert [r.name for r in runs] == ["sapo_seed0"]
    assert "grpo_seed0 failed" in capsys.readouterr().out


# --------------------------------------------------------------------------- diverged runs


def test_assess_applies_each_criterion_at_the_step_it_first_holds():
    ok = {"reward_mean": 0.5, "entropy": 1.0, "skipped_updates": 0}
    rows = [dict(ok, step=s) for s in range(1, 6)]
    assert not assess(rows, 2).diverged
    nan = [*rows[:2], dict(ok, step=3, entropy=None), *rows[3:]]
    assert (assess(nan, 2).kind, assess(nan, 2).step) == ("nonfinite", 3)
    low = [dict(ok, step=s, entropy=ENTROPY_COLLAPSE_NATS / 2 if s > 1 else 1.0) for s in range(1, 8)]
    assert (assess(low, 2).kind, assess(low, 2).step) == ("entropy_collapse", 1 + ENTROPY_COLLAPSE_STEPS)
    blip = [dict(ok, step=s, entropy=ENTROPY_COLLAPSE_NATS / 2 if s % 2 else 1.0) for s in range(1, 8)]
    assert not assess(blip, 2).diverged  # never the required consecutive steps
    # 2 updates a step; every update of steps 1-4 skipped: 8 of 8 > half once 8 were tried (step 4)
    skipped = [dict(ok, step=s, skipped_updates=2) for s in range(1, 6)]
    assert (assess(skipped, 2).kind, assess(skipped, 2).step) == ("skipped", 4)
    one = [dict(ok, step=1, skipped_updates=1), *rows[1:]]
    assert not assess(one, 2).diverged


def test_a_run_whose_updates_are_all_skipped_is_marked_diverged(tmp_path, monkeypatch, capsys):
    import sspo_analysis.objectives as objectives

    original = objectives.Objective.evaluate

    def poisoned(self, *args, **kwargs):
        loss, metrics, terms = original(self, *args, **kwargs)
        return loss * math.nan, metrics, terms

    monkeypatch.setattr(objectives.Objective, "evaluate", poisoned)
    out = tmp_path / "dead"
    args = ["train", "--no-progress", "--out", str(out), *sum([["--set", s] for s in FAST + ["steps=10"]], [])]
    assert main(args) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "diverged at step 4" in err and "8 of 8 updates skipped" in err
    assert not (out / "DONE").exists()
    marker = json.loads((out / "DIVERGED").read_text())
    assert marker["step"] == 4 and marker["kind"] == "skipped"
    assert len(read_metrics(out)) == 4  # the run stopped there
    with pytest.raises(ValueError, match="diverged"):
        train(None, out, resume=True)
    from sspo_analysis.analysis import diverged

    steps = read_metrics(out).iloc[:0]
    assert diverged({"done": True, "run_dir": out}, steps.assign(reward_mean=[]))
