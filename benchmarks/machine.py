"""The machine a benchmark ran on, the float32 matrix-product rate it reaches, and a model's FLOPs per step.

Every speed the benchmarks print is quoted with its CPU and, for the trainers, as a
model-FLOPs utilisation: FLOPs per step (from the model's shape and the tokens processed)
divided by step time, against the matrix-product throughput measured in the same process
on the model's own shapes. Three pieces, used by every benchmark under ``benchmarks/``:

- :func:`describe` / :func:`header`: CPU model, cores, the kernels torch dispatches to;
- :func:`roofline`: GFLOP/s of torch's BLAS (``torch.matmul``, MKL on x86) and of the oneDNN
  kernel the trainer's lean path uses with ``model.kernels = "fast"``, on given product shapes;
- :class:`Shape` and :func:`forward_flops`: what a forward pass over a batch of prompts and
  completions costs, counted from the model's configuration.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch

# --------------------------------------------------------------------------- the machine


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's ``model name`` (Linux), else ``platform.processor()`` or ``"unknown"``."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "unknown"


def describe() -> dict[str, object]:
    """The fields of :func:`header`: CPU model, cores, torch's threads, the CPU kernels it dispatches to, and
    the GPU (None without CUDA)."""
    return {"cpu": cpu_model(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "capability": torch.backends.cpu.get_cpu_capability(), "onednn": torch.backends.mkldnn.is_available(),
            "mkl": torch.backends.mkl.is_available(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def header() -> str:
    """One line naming the machine, printed first by every benchmark that reports a speed."""
    d = describe()
    return (f"machine: {d['cpu']}, {d['cpu_count']} cores (torch threads {d['torch_threads']}), "
            f"capability {d['capability']}, oneDNN {'yes' if d['onednn'] else 'no'}, "
            f"MKL {'yes' if d['mkl'] else 'no'}, torch {d['torch']}" + (f", GPU {d['gpu']}" if d["gpu"] else ""))


# --------------------------------------------------------------------------- the roofline


def product_shapes(hidden: int, intermediate: int, kv_width: int, rows: int) -> list[tuple[int, int, int]]:
    """``(m, k, n)`` of a decoder layer's products over ``rows`` tokens, forward and backward, one entry a product.

    Forward: ``(rows, hidden) x (hidden, n)`` for q and o (n = hidden), k and v (n = ``kv_width``), gate and
    up (n = ``intermediate``), and ``(rows, intermediate) x (intermediate, hidden)`` for down. Backward: the
    input gradient of each (m = rows, k and n swapped) and the weight gradient ``(k, rows) x (rows, n)``.
    """
    forward = [(rows, hidden, hidden), (rows, hidden, kv_width), (rows, hidden, kv_width), (rows, hidden, hidden),
               (rows, hidden, intermediate), (rows, hidden, intermediate), (rows, intermediate, hidden)]
    return forward + [(m, n, k) for m, k, n in forward] + [(k, m, n) for m, k, n in forward]


def _onednn_linear():
    """The trainer's oneDNN float32 product (``lean._onednn``: ``x @ weight.T``), or None without oneDNN."""
    from sspo_analysis.training import lean

    return lean._onednn if lean._ONEDNN is not None else None


def _timed(fn, n: int, sync) -> float:
    """Seconds for ``n`` calls of ``fn``, queued work included (``sync`` waits for a GPU's)."""
    start = time.perf_counter()
    for _ in range(n):
        fn()
    sync()
    return time.perf_counter() - start


def _seconds_per_call(fn, seconds: float, sync) -> float:
    """Seconds per call of ``fn``: after a warm-up, the call count doubles until a loop lasts ``seconds``; then
    the best of three loops of that count."""
    n = 2
    while _timed(fn, n, sync) < seconds:
        n *= 2
    return min(_timed(fn, n, sync) for _ in range(3)) / n


def gflops(kernel: str, shapes: list[tuple[int, int, int]], seconds: float = 0.05, device: str = "cpu",
           dtype: torch.dtype = torch.float32) -> float | None:
    """GFLOP/s of ``kernel`` ("matmul": ``torch.matmul``; "onednn": the lean path's kernel, float32 CPU only)
    over ``shapes``: their total FLOPs (``2 m k n`` each) over their total time (so the mix of a layer's products
    weighs each shape by how often it runs); None when the kernel is absent."""
    if kernel == "onednn" and (device != "cpu" or dtype != torch.float32):
        return None
    linear = _onednn_linear() if kernel == "onednn" else lambda a, w: torch.matmul(a, w.t())
    if linear is None:
        return None
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    g = torch.Generator().manual_seed(0)
    flops = total = 0.0
    with torch.no_grad():
        for (m, k, n), count in Counter(shapes).items():  # a repeated shape is timed once
            a, w = (torch.randn(r, k, generator=g).to(device, dtype) for r in (m, n))
            total += count * _seconds_per_call(partial(linear, a, w), seconds, sync)
            flops += count * 2.0 * m * k * n
    return flops / total / 1e9


@dataclass(frozen=True)
class Roofline:
    """Measured GFLOP/s of each kernel on the model's shapes; :attr:`peak` is the larger."""

    matmul: float
    onednn: float | None
    precision: str = "float32"

    @property
    def peak(self) -> float:
        return max(self.matmul, self.onednn or 0.0)

    def line(self) -> str:
        onednn = "n/a" if self.onednn is None else f"{self.onednn:.1f}"
        return (f"roofline: {self.precision} products on the model's shapes, torch.matmul {self.matmul:.1f} GFLOP/s "
                f"(MKL on x86 CPUs), oneDNN {onednn} GFLOP/s; utilisation is against {self.peak:.1f} GFLOP/s")


def roofline(shapes: list[tuple[int, int, int]], seconds: float = 0.05, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> Roofline:
    """:class:`Roofline` of ``shapes`` in this process (torch's current thread count), on ``device``."""
    return Roofline(gflops("matmul", shapes, seconds, device, dtype), gflops("onednn", shapes, seconds, device, dtype),
                    str(dtype).removeprefix("torch."))


def time_calls(obj, method: str) -> list[float]:
    """Wrap ``obj.method`` so that each call appends its seconds to the returned list (e.g. TRL's generation
    stage, ``_generate_and_score_completions``)."""
    seconds: list[float] = []
    inner = getattr(obj, method)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = inner(*args, **kwargs)
        seconds.append(time.perf_counter() - start)
        return out

    setattr(obj, method, timed)
    return seconds


# --------------------------------------------------------------------------- FLOPs of the model


@dataclass(frozen=True)
class Shape:
    """What a Llama-family decoder's products cost: its widths, depth and vocabulary."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @staticmethod
    def of(config) -> Shape:
        """The shape of a transformers config (``Qwen2Config`` and the like)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return Shape(config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                     config.num_attention_heads, config.num_key_value_heads, head_dim, config.vocab_size)

    @property
    def layer_params(self) -> int:
        """Weights in one layer's products: q and o, k and v, gate, up and down (norms and biases left out)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return 2 * self.hidden * q + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate

    @property
    def head_params(self) -> int:
        """Weights of the output projection to the vocabulary (the tied embedding: a lookup costs no products)."""
        return self.hidden * self.vocab

    def product_shapes(self, rows: int) -> list[tuple[int, int, int]]:
        """A layer's products over ``rows`` tokens, forward and backward (see :func:`product_shapes`)."""
        return product_shapes(self.hidden, self.intermediate, self.kv_heads * self.head_dim, rows)


@dataclass(frozen=True)
class Batch:
    """A rollout batch: ``prompts`` distinct prompts of ``prompt_len`` tokens, ``group_size`` completions each
    of ``completion_len`` tokens (means; only tokens up to and including ``<eos>``, never padding)."""

    prompts: int
    group_size: int
    prompt_len: float
    completion_len: float


def forward_flops(shape: Shape, batch: Batch, prompt_runs: float) -> float:
    """FLOPs of one forward pass over ``batch`` (a multiply-add is 2 FLOPs), each prompt run ``prompt_runs``
    times (1: once per group, a shared prefill; ``batch.group_size``: once per completion).

    Counted: each layer's products, ``2 * layer_params`` per token processed; attention's two products
    (scores and the weighted values), ``4 * heads * head_dim`` per (query, visible key) pair, causal; the
    output projection ``2 * head_params`` per completion token (the logits read). Not counted: norms,
    rotary, activations, softmax, the loss (element-wise work, a few percent here). The same count serves a
    sampling pass (the key/value cache makes it one forward over each sequence) and a log-prob pass.
    """
    p, c, L = batch.prompt_len, batch.completion_len, shape.layers
    attn = 4 * shape.heads * shape.head_dim * L  # per (query, key) pair, all layers
    prompt = 2 * shape.layer_params * L * p + attn * p * (p + 1) / 2
    completion = 2 * shape.layer_params * L * c + attn * (c * p + c * (c + 1) / 2) + 2 * shape.head_params * c
    return batch.prompts * prompt_runs * prompt + batch.prompts * batch.group_size * completion


@dataclass(frozen=True)
class Passes:
    """The forward passes a trainer runs per RL step, and how often each runs a group's prompt.

    ``sampling_prompt_runs``: 1 for one prefill per group, the group size for one per completion;
    ``training_prompt_runs``: the same over the training forwards of all the step's updates (a prompt shared
    within each minibatch that holds its rows runs once per such minibatch); ``logprob``: forwards without
    gradient over the batch (e.g. TRL's old log-probs), each prompt once per completion.
    """

    sampling_prompt_runs: float
    training_prompt_runs: float
    logprob: int


def step_flops(shape: Shape, batch: Batch, passes: Passes) -> dict[str, float]:
    """A trainer's FLOPs per RL step by phase: ``sampling`` (one forward over the batch), ``logprob``
    (``passes.logprob`` forwards) and ``training`` (one forward and backward over the batch, each sequence
    in one update, the backward counted as twice the forward: the input and the weight gradient of each
    product). Recomputation (gradient checkpointing) is not counted: these are model FLOPs."""
    return {"sampling": forward_flops(shape, batch, passes.sampling_prompt_runs),
            "logprob": passes.logprob * forward_flops(shape, batch, batch.group_size),
            "training": 3 * forward_flops(shape, batch, passes.training_prompt_runs)}


def utilisation(flops: float, seconds: float, peak_gflops: float) -> float:
    """Achieved ``flops / seconds`` as a fraction of ``peak_gflops``."""
    return flops / seconds / (peak_gflops * 1e9)


def utilisation_line(flops: dict[str, float], step_s: float, generation_s: float, peak_gflops: float) -> str:
    """``utilisation NN% (sampling NN%, training NN%)``: :func:`step_flops` over the step, its sampling and
    log-prob FLOPs over the generation stage (where TRL runs its old log-prob forward), its training FLOPs
    over the rest of the step."""
    whole = utilisation(sum(flops.values()), step_s, peak_gflops)
    sampling = utilisation(flops["sampling"] + flops["logprob"], generation_s, peak_gflops)
    training = utilisation(flops["training"], step_s - generation_s, peak_gflops)
    return f"utilisation {whole:.0%} (sampling {sampling:.0%}, training {training:.0%})"


def mean_prompt_tokens(tokenizer, n: int = 256) -> float:
    """Mean tokens of the benchmarks' prompts (2-digit addition, BOS first) under ``tokenizer``."""
    import numpy as np

    from sspo_analysis.training.tasks import Addition

    prompts, _ = Addition(digits=2).sample(np.random.default_rng(0), n)
    return float(np.mean([len(tokenizer(tokenizer.bos_token + p, add_special_tokens=False).input_ids)
                          for p in prompts]))
