"""benchmarks/machine.py: the machine header, the roofline measurement, the model-FLOPs count (no timing asserted)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM

from sspo_analysis.training.models import load_model

ROOT = Path(__file__).resolve().parents[1]


def _load_machine():
    spec = importlib.util.spec_from_file_location("machine", ROOT / "benchmarks" / "machine.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["machine"] = module
    spec.loader.exec_module(module)
    return module


machine = _load_machine()

# One layer, worked out by hand: q and o 4x4 each (32), k and v 4x2 each (16), gate, up and down 4x8 each (96).
ONE_LAYER = machine.Shape(hidden=4, intermediate=8, layers=1, heads=2, kv_heads=1, head_dim=2, vocab=5)


def _config(**kw):
    return AutoConfig.for_model("qwen2", hidden_size=8, intermediate_size=16, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, vocab_size=11,
                                attn_implementation="eager", **kw)


def test_one_layer_shape_by_hand():
    assert ONE_LAYER.layer_params == 144
    assert ONE_LAYER.head_params == 20


def test_forward_flops_of_one_layer_by_hand():
    """1 prompt of 3 tokens, 2 completions of 2 tokens; 2 x 144 FLOPs a token, 16 an attended pair, 40 a logit row.

    Each prompt once per completion: 10 tokens (2,880), 2 x 15 causal pairs (480), 4 logit rows (160): 3,520.
    The prompt once: 7 tokens (2,016), 6 + 2 x 9 pairs (384), 4 logit rows (160): 2,560.
    """
    batch = machine.Batch(prompts=1, group_size=2, prompt_len=3, completion_len=2)
    assert machine.forward_flops(ONE_LAYER, batch, prompt_runs=2) == 3520
    assert machine.forward_flops(ONE_LAYER, batch, prompt_runs=1) == 2560


def test_step_flops_count_each_pass():
    batch = machine.Batch(prompts=1, group_size=2, prompt_len=3, completion_len=2)
    trl = machine.step_flops(ONE_LAYER, batch, machine.Passes(2, 2, logprob=1))
    assert trl == {"sampling": 3520, "logprob": 3520, "training": 3 * 3520}
    ours = machine.step_flops(ONE_LAYER, batch, machine.Passes(1, 1, logprob=0))
    assert ours == {"sampling": 2560, "logprob": 0, "training": 3 * 2560}
    mixed = machine.step_flops(ONE_LAYER, batch, machine.Passes(1, 2, logprob=2))
    assert mixed == {"sampling": 2560, "logprob": 2 * 3520, "training": 3 * 3520}


@pytest.mark.parametrize("length", [1, 5, 9])
def test_forward_flops_agree_with_torch_flop_counter(length):
    """torch's FlopCounterMode on a real Qwen2 forward (eager attention computes every pair, masked or not: the
    count adds the masked half, 4 h d L S (S - 1) / 2), and forward plus backward is three forwards."""
    model = AutoModelForCausalLM.from_config(_config())
    shape = machine.Shape.of(model.config)
    ids = torch.arange(length)[None]
    counted = machine.forward_flops(shape, machine.Batch(1, 1, prompt_len=0, completion_len=length), 1)
    masked = 4 * shape.heads * shape.head_dim * shape.layers * length * (length - 1) / 2
    with FlopCounterMode(display=False) as forward, torch.no_grad():
        model(ids)
    assert forward.get_total_flops() == counted + masked
    with FlopCounterMode(display=False) as both:
        model(ids).logits.sum().backward()
    assert both.get_total_flops() == 3 * (counted + masked)


def test_shape_of_the_tiny_preset_matches_its_weights():
    model, _ = load_model("tiny", seed=0)
    shape = machine.Shape.of(model.config)
    layer = model.model.layers[0]
    projections = (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj, layer.self_attn.o_proj,
                   layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
    assert shape.layer_params == sum(p.weight.numel() for p in projections)
    assert shape.head_params == model.lm_head.weight.numel()
    assert (shape.hidden, shape.intermediate, shape.layers) == (128, 512, 4)


def test_product_shapes_forward_and_backward():
    shapes = machine.product_shapes(hidden=4, intermediate=8, kv_width=2, rows=3)
    forward = [(3, 4, 4), (3, 4, 2), (3, 4, 2), (3, 4, 4), (3, 4, 8), (3, 4, 8), (3, 8, 4)]  # q k v o gate up down
    input_grads = [(3, 4, 4), (3, 2, 4), (3, 2, 4), (3, 4, 4), (3, 8, 4), (3, 8, 4), (3, 4, 8)]
    weight_grads = [(4, 3, 4), (4, 3, 2), (4, 3, 2), (4, 3, 4), (4, 3, 8), (4, 3, 8), (8, 3, 4)]
    assert shapes == forward + input_grads + weight_grads
    assert sum(2 * m * k * n for m, k, n in shapes) == 3 * 2 * 3 * ONE_LAYER.layer_params  # 3 rows, fwd + bwd


def test_roofline_measures_both_kernels():
    roof = machine.roofline([(16, 8, 8), (8, 16, 8)], seconds=0.001)
    assert roof.matmul > 0
    assert roof.onednn is None or roof.onednn > 0
    assert roof.peak == max(roof.matmul, roof.onednn or 0.0)
    assert f"{roof.peak:.1f} GFLOP/s" in roof.line() and "float32" in roof.line()
    assert machine.gflops("onednn", [(8, 8, 8)], device="cpu", dtype=torch.bfloat16) is None  # float32 only


def test_utilisation_line_by_hand():
    """40 GFLOP/s over the step, 20 while sampling, 60 while training, against 100."""
    flops = {"sampling": 1e9, "logprob": 0.0, "training": 3e9}
    line = machine.utilisation_line(flops, step_s=0.1, generation_s=0.05, peak_gflops=100.0)
    assert line == "utilisation 40% (sampling 20%, training 60%)"


def test_header_names_the_machine():
    d = machine.describe()
    assert set(d) == {"cpu", "cpu_count", "torch_threads", "capability", "onednn", "mkl", "torch", "gpu"}
    assert d["torch_threads"] == torch.get_num_threads() and d["cpu_count"] >= 1
    assert d["capability"] == torch.backends.cpu.get_cpu_capability()
    line = machine.header()
    assert line.startswith(f"machine: {d['cpu']}, {d['cpu_count']} cores") and f"capability {d['capability']}" in line


def test_cpu_model_reads_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9B14\n")
    assert machine.cpu_model(info) == "AMD EPYC 9B14"
    assert machine.cpu_model(tmp_path / "missing")  # falls back to the platform's name or "unknown"


def test_mean_prompt_tokens_of_the_character_tokenizer():
    """'<bos>' then 'ab+cd=' (2-digit operands): 7 tokens, one a character."""
    _, tok = load_model("micro", seed=0)
    assert machine.mean_prompt_tokens(tok, n=64) == 7


@pytest.mark.slow
def test_trainer_benchmark_prints_the_machine_and_each_trainers_utilisation():
    """The smallest run of ``trainer_vs_trl.py``: the machine line, the roofline, then a row naming the CPU with a
    utilisation (whole step, sampling, training) for each trainer."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "trainer_vs_trl.py"), "--steps", "2", "--runs",
                          "1", "--long", "", "--no-memory"], capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0, out.stderr[-2000:]
    lines = [line for line in out.stdout.splitlines() if line.startswith(("machine:", "roofline:", "["))]
    assert lines[0].startswith(f"machine: {machine.cpu_model()}, ") and "(torch threads 1)" in lines[0]  # --threads 1
    assert lines[1].startswith("roofline: float32") and "oneDNN" in lines[1]
    row = lines[2]
    assert row.startswith("[ 16 new tokens, run 1] ratio ") and row.endswith(f"| {machine.cpu_model()}")
    pattern = r"utilisation \d+% \(sampling \d+%, training \d+%\)"
    assert [name for name in ("TRL", "sspo") if re.search(rf"\| {name} .*?{pattern}", row)] == ["TRL", "sspo"]
