"""Hostile and careless use: run ownership, honest resumes and sweep reuse, diverged runs, strict inputs,
one-line errors for file and data problems, bounded work (issue 13)."""

from __future__ import annotations

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sspo_analysis.cli import main
from sspo_analysis.failure import ENTROPY_COLLAPSE_NATS, ENTROPY_COLLAPSE_STEPS, assess
from sspo_analysis.training import load_config, read_metrics, sweep, train
from sspo_analysis.training.runs import LOCK_NAME, RunBusyError, run_lock
from sspo_analysis.training.trainer import TIMING_KEYS

ROOT = Path(__file__).resolve().parents[1]
FAST = ["model.preset=\"micro\"", "model.warm_start=false", "rollout.prompts=4", "rollout.group_size=4",
        "rollout.max_new_tokens=4", "log.progress=false", "log.log_ratios_every=0", "log.checkpoint_every=2",
        "threads=1", "optim.lr=1e-3"]


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")


def _sets(overrides: list[str]) -> list[str]:
    """``--set`` flags for each override."""
    return [flag for o in overrides for flag in ("--set", o)]


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
        assert main(["train", "--set", "steps=1", *_sets(FAST), "--out", str(run)]) == 2
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


def test_pretrain_and_sweep_respect_an_owned_directory(tmp_path, capsys):
    from sspo_analysis.training import pretrain

    with run_lock(tmp_path / "ws"):
        with pytest.raises(RunBusyError, match=f"process {os.getpid()}"):
            pretrain(None, tmp_path / "ws", overrides=["model.preset=\"micro\"", "log.progress=false"])
    (tmp_path / "sw" / "grpo_seed0").mkdir(parents=True)
    with run_lock(tmp_path / "sw" / "grpo_seed0"):
        assert sweep(["grpo"], [0], None, tmp_path / "sw", FAST + ["steps=1"]) == []
    assert "skipped" in capsys.readouterr().out
    assert not (tmp_path / "sw" / "grpo_seed0" / "FAILED").exists()  # not ours to mark


def _cli_train(run: Path, over: list[str]) -> list[str]:
    return [sys.executable, "-m", "sspo_analysis.cli", "train", "--no-progress", "--out", str(run),
            *_sets(over)]


def test_kill_9_at_a_random_moment_then_resume_reproduces_the_run(tmp_path):
    over = FAST + ["steps=30", "log.checkpoint_every=1"]
    straight = read_metrics(train(None, tmp_path / "straight", overrides=over))
    interrupted = 0
    for seed in range(3):
        run = tmp_path / f"killed{seed}"
        proc = subprocess.Popen(_cli_train(run, over), env=_env(), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        metrics = run / "metrics.jsonl"
        while not (metrics.exists() and metrics.stat().st_size) and proc.poll() is None:
            time.sleep(0.005)
        time.sleep(random.Random(seed).uniform(0.0, 0.6))  # somewhere in the 30 steps (~1 s on one thread)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        interrupted += not (run / "DONE").exists()
        with pytest.warns(UserWarning, match="stale lock"):
            train(None, run, resume=True, progress=False)
        assert (run / "DONE").exists() and not list(run.glob("**/.*.tmp"))
        _same_metrics(straight, read_metrics(run))
    assert interrupted >= 1  # at least one kill landed mid-run, so a resume was tested


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
    # a run made on a bigger machine: its threads are refused here unless the resume sets them
    config = run / "config.toml"
    config.write_text(config.read_text().replace("threads = 1", "threads = 99999"))
    with pytest.raises(ValueError, match="threads"):
        train(None, run, resume=True)
    train(None, run, overrides=["threads=1"], resume=True)


def test_config_files_with_a_bom_or_bad_bytes(tmp_path):
    (tmp_path / "bom.toml").write_bytes(b"\xef\xbb\xbfseed = 3\n")
    assert load_config(tmp_path / "bom.toml").seed == 3
    (tmp_path / "bad.toml").write_bytes(b"seed = 3\n# \xff\n")
    with pytest.raises(ValueError, match=r"config: .*bad\.toml: 'utf-8' codec"):
        load_config(tmp_path / "bad.toml")


def test_more_steps_extend_a_finished_run_as_a_straight_run_would(tmp_path):
    straight = read_metrics(train(None, tmp_path / "straight", overrides=FAST + ["steps=4"]))
    run = train(None, tmp_path / "short", overrides=FAST + ["steps=2"])
    assert main(["train", "--no-progress", "--resume", str(run), "--set", "steps=4"]) == 0
    assert (run / "DONE").read_text().startswith("finished 4 steps")
    assert load_config(run / "config.toml").steps == 4
    _same_metrics(straight, read_metrics(run))
    with pytest.raises(ValueError, match="steps.*already done"):
        train(None, run, overrides=["steps=3"], resume=True)
    (run / "checkpoint" / "state.pt").unlink()
    with pytest.raises(ValueError, match="no checkpoint to extend from"):
        train(None, run, overrides=["steps=6"], resume=True)
    assert len(read_metrics(run)) == 4 and (run / "DONE").exists()  # nothing lost


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

    original = objectives.Objective.loss

    def poisoned(self, *args, **kwargs):
        return original(self, *args, **kwargs) * math.nan

    monkeypatch.setattr(objectives.Objective, "loss", poisoned)
    out = tmp_path / "dead"
    args = ["train", "--no-progress", "--out", str(out), *_sets(FAST + ["steps=10"])]
    assert main(args) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "diverged at step 4" in err and "8 of 8 updates skipped" in err
    assert not (out / "DONE").exists()
    marker = json.loads((out / "DIVERGED").read_text())
    assert marker["step"] == 4 and marker["kind"] == "skipped"
    assert len(read_metrics(out)) == 4  # the run stopped there
    with pytest.raises(ValueError, match="diverged"):
        train(None, out, resume=True)
    import pandas as pd

    from sspo_analysis.failure import diverged

    healthy = pd.DataFrame({"step": [1, 2, 3, 4], "reward_mean": [0.5] * 4, "entropy": [1.0] * 4,
                            "loss": [0.1] * 4, "skipped_updates": [0] * 4})
    assert not diverged({"done": True, "run_dir": tmp_path / "elsewhere"}, healthy)
    assert diverged({"done": True, "run_dir": out}, healthy)  # the marker alone decides


# --------------------------------------------------------------------------- strict inputs


@pytest.mark.parametrize("override, field", [
    ("objective.one_sided=\"no\"", "one_sided"), ("objective.one_sided=1", "one_sided"),
    ("objective.tau=true", "tau"), ("objective.eps=[1,2,3]", "eps"), ("objective.gate=[1]", "gate"),
    ("log.progress=\"no\"", "log.progress"), ("model.warm_start=1", "model.warm_start"),
    ("steps=[5]", "steps"), ("optim.lr=true", "optim.lr"), ("task.name=[\"addition\"]", "task.name"),
    ("seed=123456789012345678901", "seed"), ("seed=-1", "seed"), ("warm_start.seed=18446744073709551616", "seed"),
])
def test_a_field_of_the_wrong_type_or_range_is_one_error_naming_it(override, field):
    with pytest.raises(ValueError, match=field):
        load_config(None, ["objective.name=\"sspo\"", override])


def test_eps_true_is_refused_not_one():
    with pytest.raises(ValueError, match="eps must be a number"):
        load_config(None, ["objective.eps=true"])
    assert load_config(None, ["objective.eps=[0.1,0.3]"]).build_objective().params["eps_hi"] == 0.3


def test_threads_are_bounded_by_the_machine():
    n = os.cpu_count() or 1
    assert load_config(None, [f"threads={n}"]).threads == n
    with pytest.raises(ValueError, match=f"threads: .*<= {n}"):
        load_config(None, [f"threads={n + 1}"])


def test_objective_api_refuses_what_would_silently_mislead():
    import torch

    from sspo_analysis.objectives import get_objective

    for horizon in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="horizon"):
            get_objective("grpo", agg="seq-mean-token-sum-norm", horizon=horizon)
    obj = get_objective("grpo")
    lp, adv = torch.zeros(2, 3), torch.tensor([1.0, -1.0])
    with pytest.raises(ValueError, match="mask: must be boolean or exactly 0/1"):
        obj(lp, lp, adv, torch.full((2, 3), 0.5))
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="advantages: must be finite"):
            obj(lp, lp, torch.tensor([bad, 1.0]), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="advantages: expected"):
        obj(lp, lp, "1", torch.ones(2, 3, dtype=torch.bool))
    # numpy inputs and a 0/1 float mask give what the tensors give (the mask's zero token drops out)
    mask = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    lp_np = np.array([[0.1, -0.2, 5.0], [0.0, 0.3, -0.1]])
    got = obj(lp_np, np.zeros((2, 3)), np.array([1.0, -1.0]), mask)[0]
    want = obj(torch.tensor(lp_np), torch.zeros(2, 3, dtype=torch.float64), torch.tensor([1.0, -1.0]),
               torch.tensor(mask).bool())[0]
    assert float(got) == float(want)


def test_output_paths_are_checked_before_any_model_loads(tmp_path, monkeypatch, capsys):
    import sspo_analysis.training.trainer as trainer

    monkeypatch.setattr(trainer, "build_policy", lambda *a, **k: pytest.fail("model loaded"))
    (tmp_path / "file").write_text("x")
    cases = {str(tmp_path / "file"): "is a file", str(tmp_path / "file" / "run"): "is a file",
             "/proc/sspo_run": "pseudo file system"}
    if os.geteuid() != 0:
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        cases[str(ro / "run")] = "not writable"
    for out, why in cases.items():
        with pytest.raises(ValueError, match=why):
            train(None, out, overrides=FAST + ["steps=1"])
        assert main(["pretrain", "--out", out, "--set", "model.preset=\"micro\""]) == 2
        assert why in capsys.readouterr().err


# --------------------------------------------------------------------------- one line for file and data errors


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


def test_read_metrics_skips_a_cut_off_last_line_and_names_a_bad_one(tmp_path, capsys):
    run = tmp_path / "r"
    run.mkdir()
    metrics = run / "metrics.jsonl"
    metrics.write_text('{"step": 1, "reward_mean": 0.5, "entropy": 1.0}\n{"step": 2, "rewa')
    with pytest.warns(UserWarning, match="line 2 is cut off"):
        assert list(read_metrics(run).step) == [1]
    metrics.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics\.jsonl: line 2"):
        read_metrics(run)
    metrics.write_text("")
    assert main(["plot", str(run), "--out", str(tmp_path / "fig")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no complete step" in err


def test_a_corrupt_log_ratio_file_is_one_line(tmp_path, capsys):
    (tmp_path / "log_ratios").mkdir()
    (tmp_path / "log_ratios" / "step_000001.npz").write_bytes(b"PK\x03\x04 cut off")
    assert main(["theory", "--objective", "grpo", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step_000001.npz" in err


def test_a_failed_checkpoint_write_leaves_no_temporary_file(tmp_path, monkeypatch, capsys):
    import torch

    def full_disk(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 123 vs 456")

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "r"
    assert main(["train", "--no-progress", "--out", str(out), *_sets(FAST + ["steps=2"])]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "checkpoint" in err and "disk full" in err
    assert not list(out.glob("**/*.tmp")) and not (out / "checkpoint" / "state.pt").exists()


# --------------------------------------------------------------------------- bounded work


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


def test_theory_extreme_stds_are_finite_and_correct_or_one_error(capsys):
    from scipy import integrate, stats

    from sspo_analysis.theory.closed_forms import partial_moment

    # E[r^2 1{a < l < b}] at s = 40, m = -s^2/2, by direct integration of the normal density (an independent
    # oracle): the scale exp(2m + 2 s^2) overflows alone, the answer does not
    s, m, a, b = 40.0, -800.0, math.log(0.8), math.log(1.2)
    want = integrate.quad(lambda x: math.exp(2 * x) * stats.norm.pdf(x, m, s), a, b)[0]
    got = float(partial_moment(2.0, a, b, np.array(m), np.array(s)))
    assert got == pytest.approx(want, rel=1e-6) and want > 0
    assert main(["theory", "--objective", "grpo", "--log-ratio-std", "40", "--advantage-sign", "+", "--json"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "supported: Var(sum of log-ratios) < 709" in err
    assert main(["theory", "--objective", "grpo", "--log-ratio-std", "20", "--advantage-sign", "+", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert all(v is None or math.isfinite(v) for v in out.values() if isinstance(v, float))
    assert 0 <= out["dead_fraction"] <= 1 and out["var_coefficient"] >= 0


def test_theory_monte_carlo_that_would_take_minutes_is_refused(capsys):
    t0 = time.perf_counter()
    assert main(["theory", "--objective", "sspo", "--log-ratio-std", "0.3", "--length", "1000000",
                 "--method", "monte-carlo"]) == 2
    assert time.perf_counter() - t0 < 5
    assert "would take minutes" in capsys.readouterr().err


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


def test_theory_grid_beyond_float64_names_the_point():
    from sspo_analysis.theory import sweep as theory_sweep

    with pytest.raises(ValueError, match=r"log_ratio_std: 40 \(length 1\)"):
        theory_sweep(["grpo"], stds=[0.1, 40.0], lengths=[1])
    frame = theory_sweep(["grpo", "gspo"], stds=[0.1, 1.0], lengths=[1, 256])
    assert np.isfinite(frame[["mean_coefficient", "var_coefficient", "var_weight"]].to_numpy(float)).all()


def _peak_rss_kib(n_samples: int) -> int:
    code = ("import resource\nfrom sspo_analysis.theory import LogNormalRatios, analyse\n"
            f"analyse('grpo', LogNormalRatios(0.3, 100000), method='monte-carlo', n_samples={n_samples})\n"
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), check=True)
    return int(out.stdout.split()[-1])


def test_theory_monte_carlo_memory_does_not_grow_with_the_samples():
    # length 1e5: each chunk holds 5 sequences (a few MB); before the chunks' memory was handed back, the resident
    # size grew by ~13 MB per chunk (~600 MB more at 300 samples than at 60). The interpreter's own size depends on
    # the environment, so the test compares two sample counts in the same one.
    growth_mib = (_peak_rss_kib(300) - _peak_rss_kib(60)) / 1024
    assert growth_mib < 150


def test_written_json_is_always_json(tmp_path):
    from sspo_analysis.io import write_json

    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    path = write_json(tmp_path / "x.json", {"loss": math.nan, "history": [{"v": math.inf}, 1.5], "n": 2})
    assert json.loads(path.read_text(), parse_constant=refuse) == {"loss": None, "history": [{"v": None}, 1.5], "n": 2}


def test_a_run_recorded_before_model_kernels_existed_resumes_with_the_exact_kernels(tmp_path):
    # records made before the field existed were computed with what is now "exact"; the default is "fast"
    straight = read_metrics(train(None, tmp_path / "straight", overrides=FAST + ["steps=4", 'model.kernels="exact"']))
    run = train(None, tmp_path / "old", overrides=FAST + ["steps=2", 'model.kernels="exact"'])
    config = run / "config.toml"
    config.write_text(config.read_text().replace('kernels = "exact"\n', ""))
    assert load_config(config).model.kernels == "fast"  # what a plain read would wrongly say
    train(None, run, overrides=["steps=4"], resume=True)
    _same_metrics(straight, read_metrics(run))
    assert load_config(config).model.kernels == "exact"
