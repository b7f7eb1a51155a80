"""``sspo theory`` and ``sspo simulate`` through the real ``sspo`` entry point; a corrupt log-ratio file is one line."""

import json

import pandas as pd
import pytest
import torch

from sspo_analysis import cli
from sspo_analysis.cli import main
from sspo_analysis.theory import RESULT_KEYS, LogNormalRatios, all_objective_names, analyse


@pytest.fixture(autouse=True)
def only_theory(monkeypatch):
    """The real ``sspo`` main, with only these areas registered (other areas have their own tests)."""
    monkeypatch.setattr(cli, "AREAS", {"sspo_analysis.theory.cli": ("theory",),
                                       "sspo_analysis.simulation.cli": ("simulate",)})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize(("flag", "sign"), [("+", 1), ("-", -1), ("+1", 1), ("-1", -1), ("pos", 1), ("neg", -1)])
def test_json_answer(capsys, flag, sign):
    code, out, _ = run(capsys, "theory", "--objective", "grpo", "--eps", "0.2", "--log-ratio-std", "0.3",
                       "--advantage-sign", flag, "--json")
    assert code == 0
    d = json.loads(out)
    assert tuple(d) == RESULT_KEYS
    assert d["advantage_sign"] == sign and d["objective"] == "grpo" and d["mc_stderr"] is None
    expect = analyse("grpo", LogNormalRatios(0.3), sign, eps=0.2)
    assert d["mean_coefficient"] == pytest.approx(expect.mean_coefficient, rel=1e-12)


def test_json_monte_carlo_and_gate_flags(capsys):
    code, out, _ = run(capsys, "theory", "--objective", "sspo", "--gate", "erf", "--tau", "2", "--one-sided",
                       "--log-ratio-std", "0.2", "--length", "8", "--correlation", "0.3", "--advantage-sign", "-",
                       "--n-samples", "3000", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["method"] == "monte-carlo" and set(d["mc_stderr"]) >= {"mean_coefficient", "var_coefficient"}
    assert d["length"] == 8 and d["log_ratio_mean"] == pytest.approx(-0.02)


def test_text_answer(capsys):
    code, out, _ = run(capsys, "theory", "--objective", "sspo-sigmoid", "--tau", "2", "--log-ratio-std", "0.1",
                       "--length", "16")
    assert code == 0 and "mean_coefficient" in out and "quadrature" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--objective", "grpo", "--log-ratio-std", "0"], "log_ratio_std: must be a finite number > 0"),
    (["--objective", "grpo", "--log-ratio-std", "-0.5"], "log_ratio_std: must be a finite number > 0"),
    (["--objective", "ppo", "--log-ratio-std", "0.3"], "objective: unknown name 'ppo'; allowed values: pg, grpo"),
    (["--objective", "grpo", "--log-ratio-std", "0.3", "--length", "0"], "length: must be an integer >= 1"),
    (["--objective", "grpo", "--log-ratio-std", "0.3", "--advantage-sign", "up"], "advantage_sign: unknown value"),
    (["--objective", "grpo", "--tau", "2", "--log-ratio-std", "0.3"], "--tau: objective 'grpo' has no such"),
    (["--objective", "grpo", "--log-ratio-std", "0.3", "--method", "exact"], "method: unknown value 'exact'"),
    (["--objective", "grpo"], "--log-ratio-std: required"),
])
def test_bad_input_is_one_line(capsys, argv, message):
    code, out, err = run(capsys, "theory", *argv)
    assert code == 2 and out == ""
    assert message in err and len(err.strip().splitlines()) == 1


def test_grid_csv_and_markdown(capsys, tmp_path):
    path = tmp_path / "grid.csv"
    code, _, _ = run(capsys, "theory", "--grid", "--objectives", "grpo,sspo,is-seq", "--stds", "0.01:1:5",
                     "--lengths", "1,16,256", "--taus", "0.5,2", "--csv", str(path))
    assert code == 0
    frame = pd.read_csv(path)
    # grpo 1 + sspo 2 taus + is-seq 1 = 4 settings x 5 stds x 3 lengths x 2 signs
    assert len(frame) == 4 * 5 * 3 * 2 and set(RESULT_KEYS) <= set(frame.columns)
    code, out, _ = run(capsys, "theory", "--grid", "--objectives", "all", "--stds", "0.3", "--lengths", "1,16,256",
                       "--markdown")
    assert code == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith("| objective |") and "L = 1 / 16 / 256" in lines[2]
    assert len(lines) == 3 + len(all_objective_names()) * 2  # every objective and reference estimator, both signs


def test_simulate_writes_csv(capsys, tmp_path):
    bandit, seq = tmp_path / "bandit.csv", tmp_path / "seq.csv"
    code, out, _ = run(capsys, "simulate", "bandit", "--objectives", "grpo,sspo", "--steps", "5", "--tau", "2",
                       "--csv", str(bandit))
    assert code == 0 and "final_entropy" in out
    frame = pd.read_csv(bandit)
    assert len(frame) == 10 and {"entropy_change_pred", "entropy_change_real"} <= set(frame.columns)
    code, out, _ = run(capsys, "simulate", "sequence", "--objectives", "pg,is-seq", "--staleness", "0,2",
                       "--n-batches", "50", "--csv", str(seq))
    assert code == 0
    frame = pd.read_csv(seq)
    assert len(frame) == 4 and {"bias", "variance", "staleness"} <= set(frame.columns)
    code, _, err = run(capsys, "simulate", "bandit", "--objectives", "grpo", "--tau", "2", "--steps", "2")
    assert code == 2 and "--tau: objective 'grpo' has no such parameter" in err


def test_theory_on_a_run(capsys, tmp_path):
    """``--run`` analyses the log-ratios a training run logged (Monte Carlo over its sequences)."""
    import numpy as np

    folder = tmp_path / "run" / "log_ratios"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for step in (0, 1):
        lengths = np.array([3, 5, 2, 4])
        np.savez(folder / f"step_{step:06d}.npz", log_ratios=rng.normal(0, 0.3, lengths.sum()).astype(np.float32),
                 lengths=lengths, advantages=np.array([1.0, -1.0, 1.0, -1.0]))
    code, out, _ = run(capsys, "theory", "--objective", "gmpo", "--run", str(tmp_path / "run"), "--steps", "1",
                       "--advantage-sign", "-", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["method"] == "monte-carlo" and d["length"] == pytest.approx(3.5) and d["advantage_sign"] == -1
    code, _, err = run(capsys, "theory", "--objective", "gmpo", "--run", str(tmp_path / "none"))
    assert code == 2 and "run_dir: no log-ratio files" in err


def test_a_corrupt_log_ratio_file_is_one_line(tmp_path, capsys):
    (tmp_path / "log_ratios").mkdir()
    (tmp_path / "log_ratios" / "step_000001.npz").write_bytes(b"PK\x03\x04 cut off")
    assert main(["theory", "--objective", "grpo", "--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step_000001.npz" in err
