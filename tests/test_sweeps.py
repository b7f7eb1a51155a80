"""Sweeps (``sspo_analysis.training.sweeps``): a run reused only when made with the requested config, a run path
that is a file, a diverged run recorded and the sweep going on, seeds that are not integers."""

from __future__ import annotations

import math

import pytest
from test_runs import FAST, _sets

from sspo_analysis.cli import main
from sspo_analysis.training import load_config, read_metrics, sweep


def test_sweep_reuses_only_a_run_made_with_the_requested_config(tmp_path, capsys):
    over = FAST + ["steps=1"]
    (run,) = sweep(["grpo"], [0], None, tmp_path, over)
    mtime = (run / "metrics.jsonl").stat().st_mtime_ns
    assert sweep(["grpo"], [0], None, tmp_path, over) == [run]
    assert (run / "metrics.jsonl").stat().st_mtime_ns == mtime  # reused as is
    with pytest.raises(ValueError, match=r"grpo_seed0: optim\.lr"):
        sweep(["grpo"], [0], None, tmp_path, over + ["optim.lr=2e-3"])
    assert main(["sweep", "--objectives", "grpo", "--seeds", "0", "--out", str(tmp_path), "--no-progress",
                 *_sets(over + ["optim.lr=2e-3"])]) == 2
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


def test_a_sweep_records_a_diverged_run_and_goes_on(tmp_path, monkeypatch, capsys):
    import sspo_analysis.objectives as objectives

    original = objectives.Objective.loss

    def poisoned(self, *args, **kwargs):
        loss = original(self, *args, **kwargs)
        return loss * math.nan if self.name == "sapo" else loss

    monkeypatch.setattr(objectives.Objective, "loss", poisoned)
    args = ["sweep", "--objectives", "sapo,grpo", "--seeds", "0", "--out", str(tmp_path), "--no-progress",
            *_sets(FAST + ["steps=5"])]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2/2 runs finished" in out and "(1 diverged)" in out
    assert (tmp_path / "sapo_seed0" / "DIVERGED").exists() and not (tmp_path / "sapo_seed0" / "FAILED").exists()
    assert (tmp_path / "grpo_seed0" / "DONE").exists()
    mtime = (tmp_path / "sapo_seed0" / "DIVERGED").stat().st_mtime_ns
    assert len(sweep(["sapo"], [0], None, tmp_path, FAST + ["steps=5"])) == 1  # a result: reused, not retried
    assert (tmp_path / "sapo_seed0" / "DIVERGED").stat().st_mtime_ns == mtime


def test_sweep_seeds_that_are_not_integers_are_one_error():
    with pytest.raises(ValueError, match="--seeds: expected comma-separated integers"):
        sweep(["grpo"], "0,x", None, "unused", FAST)
