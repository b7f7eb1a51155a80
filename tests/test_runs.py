"""A run directory's lifecycle (``sspo_analysis.training.runs``): a trainer that touches only its own files
(temporary files removed by exact name, an atomic lock, export included), damaged run files reported in one line
with nothing changed, bounds checked up front, non-finite sampling as DIVERGED, Ctrl-C as one line; who owns a run
(a second writer refused, a stale lock taken over, kill -9 then resume reproducing the run), honest resumes (changes
of meaning refused, more steps extending a finished run as a straight run would), output paths checked before any
model loads, and a failed checkpoint write leaving no temporary file."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from sspo_analysis.cli import main
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


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 4-step run with checkpoints at steps 2 and 4 (copied by each test that changes it)."""
    return train(None, tmp_path_factory.mktemp("finished") / "run", overrides=FAST + ["steps=4"])


@pytest.fixture()
def killed(finished, tmp_path) -> Path:
    """A copy of :func:`finished` as a run killed after its step-4 checkpoint (no DONE, no final/)."""
    run = shutil.copytree(finished, tmp_path / "run")
    (run / "DONE").unlink()
    shutil.rmtree(run / "final")
    return run


# --------------------------------------------------------------------------- only its own files


def test_train_leaves_temporary_files_it_did_not_make(tmp_path, capsys):
    out = tmp_path / "v"
    (out / "p" / "deep").mkdir(parents=True)
    (out / "p" / "deep" / ".draft.tmp").write_text("x\n")
    (out / ".notes.tmp").write_text("y\n")
    assert main(["train", "--no-progress", "--out", str(out), *_sets(FAST + ["steps=2"])]) == 0
    assert (out / "p" / "deep" / ".draft.tmp").read_text() == "x\n" and (out / ".notes.tmp").read_text() == "y\n"


def test_a_resume_removes_its_own_leftovers_by_name_and_nothing_else(killed):
    ours = [killed / ".metrics.jsonl.sspo.tmp", killed / "checkpoint" / ".state.pt.sspo.tmp",
            killed / "log_ratios" / ".step_000002.npz.sspo.tmp", killed / ".final.sspo.tmp" / "model.safetensors"]
    theirs = [killed / "checkpoint" / ".notes.tmp", killed / "log_ratios" / ".step_000002.npz.mine.tmp",
              killed / ".state.pt.sspo.tmp", killed / "final.sspo.tmp"]
    for path in ours + theirs:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("left behind")
    train(None, killed, resume=True)
    assert (killed / "DONE").exists()
    assert not any(p.exists() for p in ours) and not (killed / ".final.sspo.tmp").exists()
    assert all(p.read_text() == "left behind" for p in theirs)


RACE = r"""
import importlib.util, json, os, signal, sys, warnings
from pathlib import Path

# runs.py alone (it imports only the standard library): forks of a process without torch are cheap
spec = importlib.util.spec_from_file_location("runs", sys.argv[3])
runs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(runs)
run_lock = runs.run_lock
warnings.simplefilter("ignore")


def leave_stale_lock(run):
    pid = os.fork()
    if pid == 0:
        with run_lock(run):
            os.kill(os.getpid(), signal.SIGKILL)
    os.waitpid(pid, 0)


def contend(run, go, result, done):
    os.read(go, 1)
    try:
        with run_lock(run):
            os.write(result, b"1")
            os.read(done, 1)  # hold the lock until both have tried
    except Exception:
        os.write(result, b"0")
    os._exit(0)


wins = []
for trial in range(int(sys.argv[2])):
    run = Path(sys.argv[1]) / str(trial)
    leave_stale_lock(run)
    (go_r, go_w), (res_r, res_w), (done_r, done_w) = os.pipe(), os.pipe(), os.pipe()
    kids = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            contend(run, go_r, res_w, done_r)
        kids.append(pid)
    os.write(go_w, b"gg")  # both start at once
    got = os.read(res_r, 1) + os.read(res_r, 1)
    os.write(done_w, b"dd")
    for pid in kids:
        os.waitpid(pid, 0)
    for fd in (go_r, go_w, res_r, res_w, done_r, done_w):
        os.close(fd)
    wins.append(got.count(b"1"))
print(json.dumps(wins))
"""


def test_two_processes_taking_over_a_stale_lock_exactly_one_wins(tmp_path):
    runs_py = ROOT / "sspo_analysis" / "training" / "runs.py"
    out = subprocess.run([sys.executable, "-c", RACE, str(tmp_path), "200", str(runs_py)], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    wins = json.loads(out.stdout)
    assert len(wins) == 200 and wins.count(1) == 200, {n: wins.count(n) for n in set(wins)}


def test_export_is_refused_while_another_process_owns_the_run(killed, capsys):
    owner = _hold_lock(killed)
    try:
        assert main(["export", str(killed)]) == 2
        assert str(owner.pid) in _one_line(capsys) and not (killed / "final").exists()
    finally:
        owner.kill()
        owner.wait()
    assert main(["export", str(killed)]) == 0 and (killed / "final" / "config.json").exists()


# --------------------------------------------------------------------------- damaged run files


def test_a_garbled_metrics_line_is_named_and_nothing_is_changed(killed, capsys):
    metrics = killed / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:50] + "#garbled#" + lines[1][50:]
    metrics.write_text("".join(lines))
    before = metrics.read_bytes()
    assert main(["train", "--resume", str(killed)]) == 2
    err = _one_line(capsys)
    assert "metrics.jsonl: line 2" in err
    assert metrics.read_bytes() == before and not (killed / "DONE").exists()


@pytest.mark.parametrize("keep", [None, 2], ids=["deleted", "short"])
def test_missing_metrics_steps_are_refused_not_resumed_with_a_gap(killed, capsys, keep):
    metrics = killed / "metrics.jsonl"
    if keep is None:
        metrics.unlink()
    else:
        metrics.write_text("".join(metrics.read_text().splitlines(keepends=True)[:keep]))
    before = metrics.read_bytes() if metrics.exists() else None
    assert main(["train", "--resume", str(killed)]) == 2
    err = _one_line(capsys)
    assert "metrics.jsonl" in err and f"holds {keep or 0} complete lines" in err and "follows 4 steps" in err
    assert (metrics.read_bytes() if metrics.exists() else None) == before


@pytest.mark.parametrize("damage", ["truncated", "random", "empty"])
def test_a_damaged_checkpoint_is_one_line_and_the_finished_run_is_kept(finished, tmp_path, capsys, damage):
    run = shutil.copytree(finished, tmp_path / "run")
    ckpt = run / "checkpoint" / "state.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes({"truncated": data[:len(data) // 2], "random": os.urandom(4096), "empty": b""}[damage])
    metrics = (run / "metrics.jsonl").read_bytes()
    assert main(["train", "--resume", str(run), "--set", "steps=6"]) == 2  # extend the finished run
    assert "state.pt: not a readable checkpoint" in _one_line(capsys)
    assert (run / "DONE").exists() and (run / "metrics.jsonl").read_bytes() == metrics
    assert main(["export", str(run)]) == 2
    assert "state.pt: not a readable checkpoint" in _one_line(capsys)


def test_a_missing_checkpoint_with_metrics_is_refused_not_restarted(killed, capsys):
    (killed / "checkpoint" / "state.pt").unlink()
    metrics = (killed / "metrics.jsonl").read_bytes()
    assert main(["train", "--resume", str(killed)]) == 2
    assert "state.pt' is missing" in _one_line(capsys)
    assert (killed / "metrics.jsonl").read_bytes() == metrics and not (killed / "DONE").exists()


def test_a_run_killed_before_its_first_checkpoint_restarts(killed):
    (killed / "checkpoint" / "state.pt").unlink()
    metrics = killed / "metrics.jsonl"
    metrics.write_text(metrics.read_text().splitlines(keepends=True)[0])  # one step, checkpoints every 2
    train(None, killed, resume=True)
    assert (killed / "DONE").exists() and len(metrics.read_text().splitlines()) == 4


@pytest.mark.parametrize("old, new, message", [("seed = 0", "seed = = 0", "line 1"),
                                                ("beta1 = 0.9", "beta1 = 1.0", "optim.beta1")])
def test_a_damaged_config_is_one_line_naming_it(killed, capsys, old, new, message):
    config = killed / "config.toml"
    config.write_text(config.read_text().replace(old, new))
    assert main(["train", "--resume", str(killed)]) == 2
    err = _one_line(capsys)
    assert message in err and "config.toml" in err


# --------------------------------------------------------------------------- bounds, divergence, Ctrl-C


@pytest.mark.parametrize("override, message", [
    ("seed=9223372036854775807", "seed: must be an integer >= 0 and <= 4294967295"),
    ("optim.beta1=1.0", "optim.beta1: must be a number >= 0.0 and < 1.0"),
    ("objective.tau_pos=1e308", "objective.tau_pos: must be a number of magnitude <= 3.403e+38"),
    ("rollout.temperature=1e-300", "rollout.temperature: must be a number >= 0.001"),
    ("rollout.prompts=1000000000", "rollout.prompts: must be an integer >= 1 and <= 16384 (at most 65536 sequences"),
    ("rollout.max_new_tokens=100000", "rollout.max_new_tokens: must be an integer >= 1 and <= 511"),
    ("objective.gate=\"os:system\"", "gate: 'os:system' is not a gate"),
    ("warm_start.batch_size=1000000000", "warm_start.batch_size: must be an integer >= 1 and <= 65536"),
])
def test_values_that_would_fail_later_are_refused_up_front(override, message, tmp_path, capsys):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, FAST + ["objective.name=\"sspo\"", override])
    assert main(["train", "--set", "objective.name=\"sspo\"", *_sets(FAST + ["steps=1"]), "--set", override,
                 "--out", str(tmp_path / "r")]) == 2
    assert not (tmp_path / "r").exists()
    assert message in _one_line(capsys)


def test_max_new_tokens_is_bounded_by_a_local_model_s_positions(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    over = [f"model.path=\"{tmp_path}\"", "model.warm_start=false", "model.tokenizer=\"chars\""]
    assert load_config(None, over + ["rollout.max_new_tokens=63"]).rollout.max_new_tokens == 63
    with pytest.raises(ValueError, match="max_new_tokens: .*<= 63 .*64 positions"):
        load_config(None, over + ["rollout.max_new_tokens=64"])


def test_a_huge_learning_rate_ends_in_diverged_not_a_sampling_traceback(tmp_path, capsys):
    over = FAST + ["optim.lr=1e20", "optim.warmup_updates=0", "steps=6", "task.name=\"reversal\"",
                   "task.grader=\"chars\"", "task.length=3"]  # partial credit: advantages from the first step
    assert main(["train", "--no-progress", "--out", str(tmp_path / "r"), *_sets(over)]) == 3
    assert "non-finite logits while sampling" in _one_line(capsys)
    why = json.loads((tmp_path / "r" / "DIVERGED").read_text())
    assert why["kind"] == "nonfinite" and "logits" in why["reason"]


def test_non_finite_old_log_probs_under_the_mask_are_refused():
    import torch

    from sspo_analysis.objectives import get_objective

    obj = get_objective("sspo")
    lp, adv, mask = torch.zeros(2, 3), torch.tensor([1.0, -1.0]), torch.tensor([[1, 1, 0], [1, 1, 1]]).bool()
    for bad in (float("nan"), float("inf"), -float("inf")):
        old = torch.zeros(2, 3)
        old[1, 2] = bad
        with pytest.raises(ValueError, match="old_log_prob: must be finite where mask is true"):
            obj(lp, old, adv, mask)
        old = torch.zeros(2, 3)
        old[0, 2] = bad  # a padding position: ignored, as the mask says
        assert bool(torch.isfinite(obj(lp, old, adv, mask)[0]))


def test_ctrl_c_is_one_line_with_the_step_and_how_to_resume(tmp_path):
    run = tmp_path / "r"
    cmd = [sys.executable, "-m", "sspo_analysis.cli", "train", "--no-progress", "--out", str(run),
           *_sets(FAST + ["steps=400", "log.checkpoint_every=1"])]
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = run / "metrics.jsonl"
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    err = proc.communicate(timeout=60)[1].strip()
    assert proc.returncode == 130
    steps = metrics.read_text().count("\n")
    assert err.splitlines() == [f"sspo train: stopped at step {steps}; resume with sspo train --resume {run}"]
    assert not (run / ".lock").exists() and not (run / "DONE").exists()
    train(None, run, overrides=[f"steps={steps + 2}"], resume=True)  # a constant schedule: fewer steps honoured
    assert (run / "DONE").exists()


def test_a_sweep_keeps_a_users_files_in_a_folder_it_reuses(tmp_path, capsys):
    """A folder with a run's name that is not a run (or a stale run with a user's notes in it): the sweep writes
    the run beside the user's files and deletes only what the trainer itself writes there, by name."""
    run = tmp_path / "S" / "grpo_seed0"
    (run / "sub").mkdir(parents=True)
    (run / "notes.txt").write_text("keep")
    (run / "sub" / "paper.tex").write_text("keep2")
    assert main(["sweep", "--objectives", "grpo", "--seeds", "0", "--out", str(tmp_path / "S"), "--no-progress",
                 *_sets(FAST + ["steps=2"])]) == 0
    assert (run / "notes.txt").read_text() == "keep" and (run / "sub" / "paper.tex").read_text() == "keep2"
    assert (run / "DONE").exists()
    # a rerun with other settings starts the run afresh and still keeps them
    assert main(["sweep", "--objectives", "grpo", "--seeds", "0", "--out", str(tmp_path / "S"), "--no-progress",
                 "--rerun", *_sets(FAST + ["steps=2", "seed=0", "optim.lr=2e-4"])]) == 0
    assert (run / "notes.txt").read_text() == "keep" and (run / "sub" / "paper.tex").read_text() == "keep2"
    assert 'lr = 0.0002' in (run / "config.toml").read_text()


def test_a_device_this_machine_lacks_is_refused_before_any_folder_is_made(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = str(tmp_path / "runs" / "r")
    assert main(["train", "--no-progress", "--out", out, *_sets(FAST + ['device="cuda"'])]) == 2
    assert "device: 'cuda' requested" in _one_line(capsys)
    assert not (tmp_path / "runs").exists()


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


# --------------------------------------------------------------------------- honest resumes


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


# --------------------------------------------------------------------------- output paths and checkpoint writes


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
