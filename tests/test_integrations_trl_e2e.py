"""End to end, CPU, offline: a 3-step GRPOTrainer run with SSPOTrainer, one and two processes.

The run is ``examples/trl_sspo_tiny.py``: the package's ``micro`` Qwen2 preset
(hidden 64, 2 layers) and character tokenizer saved to a temporary directory,
an in-memory data set and a Python reward.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")
pytest.importorskip("datasets")
pytestmark = pytest.mark.trl

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "trl_sspo_tiny.py"
GATE_KEYS = ("gate_weight_mean", "dead_frac", "seq_weight_mean", "seq_weight_var", "ess_frac")


def load_example():
    spec = importlib.util.spec_from_file_location("trl_sspo_tiny", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_history(history, steps=3):
    steps_logged = [h for h in history if "objective/gate_weight_mean" in h]
    assert len(steps_logged) == steps
    for h in steps_logged:
        for key in GATE_KEYS:
            assert f"objective/{key}" in h
    # num_iterations=2: the second pass over a batch is off-policy and the gate shrinks the weights
    moved = [h for h in steps_logged if h["objective/log_ratio_std"] > 0]
    assert moved, "no off-policy step: the gates were never exercised"
    assert all(h["objective/gate_weight_mean"] < 1.0 for h in moved)
    assert all(0.0 < h["objective/ess_frac"] <= 1.0 for h in steps_logged)


@pytest.mark.parametrize("loss_type", ["sspo", "gmpo"])
def test_three_steps_single_process(loss_type, tmp_path):
    out = tmp_path / "history.json"
    history = load_example().main(["--loss-type", loss_type, "--steps", "3", "--out", str(out)])
    check_history(history)
    saved = json.loads(out.read_text())
    assert saved["num_processes"] == 1 and saved["log_history"] == history


@pytest.mark.parametrize("loss_type", ["sspo", "gmpo"])
def test_three_steps_two_processes_gloo(loss_type, tmp_path):
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("accelerate launcher not installed")
    out = tmp_path / "history.json"
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0",
           str(EXAMPLE), "--loss-type", loss_type, "--steps", "3", "--out", str(out)]
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=170, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads(out.read_text())
    assert saved["num_processes"] == 2
    assert saved["backend"] == "gloo"
    check_history(saved["log_history"])
