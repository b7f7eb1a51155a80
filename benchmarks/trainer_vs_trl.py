"""Throughput of this trainer versus TRL's GRPOTrainer on identical work (CPU).

Identical work: the ``tiny`` preset (random init, same seed), the character
tokenizer, 2-digit addition, 8 prompts x 8 samples per rollout batch, at most N
new tokens, 2 minibatch updates per rollout batch (32 sequences each), objective
``sapo`` (TRL ``loss_type="sapo"``), no KL, AdamW, temperature 1, top-p 1, CPU.
TRL runs with gradient checkpointing off (its default turns it on, which only adds
recomputation for a model this small). This trainer runs with its defaults (the lean
forward of ``sspo_analysis.training.lean`` with ``model.kernels = "fast"``: oneDNN float32
products and fused AdamW, the same sums in another order; ``--kernels exact`` runs torch's
default kernels, bitwise the transformers forward, to show what the fast kernels add) and its
optional measurements off (reference KL, the entropy after the updates, the entropy Taylor
prediction: TRL computes none of them); ``--price`` prices each of them separately.

The two trainers are interleaved in this one process (their order alternates from
run to run), so load drift on the machine hits both. Each measures the rollout
steps after its first (warm-up) one: sequences/s and completion tokens/s (tokens
up to and including ``<eos>``). Peak memory is measured apart, since one process's
high-water mark cannot be split between two trainers: each trainer runs alone in
a fresh child process, which reports its peak resident set size (``VmHWM`` in
``/proc/self/status``: the interpreter, torch, the trainer's imports, model,
optimiser and activations together; not ``ru_maxrss``, which on Linux keeps the
forking parent's peak across ``exec``).

The random-init model rarely emits ``<eos>``, so the 64- and 128-token rows are
decode-dominated, long-response work.

The output starts with the machine (:func:`machine.header`: CPU model, cores, the kernels torch
dispatches to) and the float32 matrix-product rate measured in this process on the tiny model's
own shapes (:func:`machine.roofline`, the larger of MKL's and oneDNN's). Each row then gives each
trainer's model-FLOPs utilisation against that rate: FLOPs per step (:func:`machine.step_flops`:
one sampling forward, the log-prob forwards it runs, one forward and backward over the batch; this
trainer prefills each prompt once per group, trains it once per update (:data:`PASSES`) and reads
the old log-probs from sampling,
TRL processes each prompt once per completion and runs one old log-prob forward, since its
generation and optimiser steps are misaligned) divided by step time, over the whole step
(``utilisation``), the generation stage (``sampling``: this trainer's ``generation_time``; TRL's
generate-grade-score stage, its old log-prob forward included) and the rest (``training``).

    python benchmarks/trainer_vs_trl.py [--steps 8] [--threads 1] [--runs 3] [--long 64,128] [--price]
                                        [--no-memory] [--kernels fast|exact]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import machine
import torch

P, G, UPDATES = 8, 8, 2
MEASUREMENTS = ("algo.track_kl_ref", "log.entropy_taylor", "log.entropy_change")


ROOFLINE_ROWS = 640
"""Rows of the products the roofline is measured on: about the tokens of one update's minibatch."""


PASSES = {"sspo": machine.Passes(sampling_prompt_runs=1, training_prompt_runs=UPDATES, logprob=0),
          "TRL": machine.Passes(sampling_prompt_runs=G, training_prompt_runs=G, logprob=1)}
"""Per step: this trainer prefills each prompt once per group, runs it once in each update's minibatch (rows
are shuffled, so each of the two minibatches of 32 holds nearly all 8 prompts) and keeps the sampling
log-probs; TRL runs every row in full and one old log-prob forward (its generation and optimiser steps are
misaligned)."""


@dataclass
class Result:
    sequences_per_s: float
    tokens_per_s: float
    step_s: float  # wall-clock seconds per step after the first, the time sequences/s is measured over
    generation_s: float  # the generation stage's share of it
    completion_len: float  # mean completion tokens per sequence, up to and including <eos>


def child_peak_rss_mib(trainer: str, args, new_tokens: int) -> float:
    """Peak RSS (MiB) of a fresh process that runs only ``trainer`` ("ours" or "trl") on the work."""
    out = subprocess.run([sys.executable, __file__, "--child", trainer, "--steps", str(args.steps), "--threads",
                          str(args.threads), "--child-tokens", str(new_tokens), "--kernels", args.kernels],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _child(args) -> None:
    """Run one trainer, then print this process's peak RSS in MiB (Linux: VmHWM, in kB)."""
    with tempfile.TemporaryDirectory() as d:
        if args.child == "ours":
            run_ours(args.steps, args.threads, args.child_tokens, Path(d) / "run", kernels=args.kernels)
        else:
            run_trl(args.steps, args.threads, args.child_tokens, Path(d) / "run")
    status = Path("/proc/self/status").read_text()
    print(int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) / 1024)


def run_ours(steps: int, threads: int, new_tokens: int, out: Path, measures: tuple[str, ...] = (),
             kernels: str = "fast") -> Result:
    from sspo_analysis.training import load_config, read_metrics, train

    flags = [f"{m}={str(m in measures).lower()}" for m in MEASUREMENTS]
    cfg = load_config(None, [f'model.kernels="{kernels}"',
        f"steps={steps}", f"threads={threads}", "model.warm_start=false", 'task.name="addition"', "task.digits=2",
        f"rollout.prompts={P}", f"rollout.group_size={G}", f"rollout.max_new_tokens={new_tokens}",
        f"algo.updates_per_batch={UPDATES}", 'objective.name="sapo"', "algo.kl_coef=0.0", "optim.lr=1e-5",
        *flags, "log.log_ratios_every=0", f"log.checkpoint_every={steps}", "log.progress=false",
    ])
    run = train(cfg, out)
    df = read_metrics(run)
    later = df.iloc[1:]  # the first step is warm-up
    seconds = float(later.wall_time.iloc[-1] - df.wall_time.iloc[0])
    tokens = float(later.response_length.sum()) * P * G
    return Result(len(later) * P * G / seconds, tokens / seconds, seconds / len(later),  # as sequences/s is
                  float(later.generation_time.mean()), float(later.response_length.mean()))


def _trl_setup(steps: int, new_tokens: int, tmp: Path):
    """``(model_dir, dataset, reward function, per-rollout completion token counts)`` for TRL."""
    import numpy as np
    from datasets import Dataset

    from sspo_analysis.training.models import load_model
    from sspo_analysis.training.tasks import Addition

    model, tok = load_model("tiny", seed=0)
    model_dir = tmp / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    task = Addition(digits=2)
    prompts, answers = task.sample(np.random.default_rng(0), P * (steps + 1))
    data = Dataset.from_dict({"prompt": [tok.bos_token + p for p in prompts], "answer": answers})
    counts: list[int] = []

    def reward(prompts, completions, answer, completion_ids=(), **kwargs):
        counts.append(sum(len(c) for c in completion_ids))  # one call per rollout batch of P x G
        return [task.reward(c, a) for c, a in zip(completions, answer)]

    return model_dir, tok, data, reward, counts


def run_trl(steps: int, threads: int, new_tokens: int, tmp: Path) -> Result:
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    torch.set_num_threads(threads)
    model_dir, tok, data, reward, counts = _trl_setup(steps, new_tokens, tmp)
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            times.append(time.perf_counter())

    args = GRPOConfig(
        output_dir=str(tmp / "trl"), use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
        logging_steps=10_000, disable_tqdm=True, seed=0, learning_rate=1e-5, max_steps=steps * UPDATES,
        per_device_train_batch_size=P * G // UPDATES, steps_per_generation=UPDATES, num_generations=G,
        num_iterations=1, max_completion_length=new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
        loss_type="sapo", dataloader_num_workers=0, shuffle_dataset=False, gradient_checkpointing=False,
    )
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    generation = machine.time_calls(trainer, "_generate_and_score_completions")  # old log-probs included
    trainer.train()
    # one entry per optimiser step; a rollout batch every UPDATES steps, the first one is warm-up
    seconds = times[-1] - times[UPDATES - 1]
    tokens = sum(counts[1:steps])
    return Result((steps - 1) * P * G / seconds, tokens / seconds, seconds / (steps - 1),
                  sum(generation[1:steps]) / (steps - 1), tokens / ((steps - 1) * P * G))


@dataclass(frozen=True)
class Limit:
    """What utilisation is measured against: the tiny model's shape, its mean prompt length, the roofline, the CPU."""

    shape: machine.Shape
    prompt_len: float
    roofline: machine.Roofline
    cpu: str


def measure_limit() -> Limit:
    """The tiny preset's :class:`machine.Shape`, the task's mean prompt length and the roofline on its shapes."""
    from sspo_analysis.training.models import load_model

    model, tok = load_model("tiny", seed=0)
    shape = machine.Shape.of(model.config)
    return Limit(shape, machine.mean_prompt_tokens(tok), machine.roofline(shape.product_shapes(ROOFLINE_ROWS)),
                 machine.cpu_model())


def utilisation_text(r: Result, limit: Limit, trainer: str) -> str:
    """``utilisation NN% (sampling NN%, training NN%)`` of a trainer's step (see the module docstring)."""
    f = machine.step_flops(limit.shape, machine.Batch(P, G, limit.prompt_len, r.completion_len), PASSES[trainer])
    return machine.utilisation_line(f, r.step_s, r.generation_s, limit.roofline.peak)


def _line(name: str, r: Result, limit: Limit) -> str:
    return (f"{name:<5}{r.sequences_per_s:7.1f} seq/s {r.tokens_per_s:7.0f} tok/s "
            f"{utilisation_text(r, limit, name)}")


def compare(args, new_tokens: int, runs: int, tmp: Path, limit: Limit) -> None:
    """``runs`` interleaved TRL / sspo runs at ``new_tokens``, one line each with the ratio."""
    for i in range(runs):
        d = tmp / f"n{new_tokens}_r{i}"
        if i % 2 == 0:
            trl = run_trl(args.steps, args.threads, new_tokens, d)
            ours = run_ours(args.steps, args.threads, new_tokens, d / "ours", kernels=args.kernels)
        else:
            ours = run_ours(args.steps, args.threads, new_tokens, d / "ours", kernels=args.kernels)
            trl = run_trl(args.steps, args.threads, new_tokens, d)
        print(f"[{new_tokens:3d} new tokens, run {i + 1}] ratio {ours.sequences_per_s / trl.sequences_per_s:.2f}x "
              f"seq/s, {ours.tokens_per_s / trl.tokens_per_s:.2f}x tok/s | {_line('TRL', trl, limit)} | "
              f"{_line('sspo', ours, limit)} | {limit.cpu}", flush=True)
    if args.memory:
        trl_mib, ours_mib = child_peak_rss_mib("trl", args, new_tokens), child_peak_rss_mib("ours", args, new_tokens)
        print(f"[{new_tokens:3d} new tokens, memory] peak RSS of a process running only one trainer: "
              f"TRL {trl_mib:.0f} MiB, sspo {ours_mib:.0f} MiB", flush=True)


def price(args, tmp: Path) -> None:
    """Each optional measurement on its own, next to a run with none: seconds per step it adds."""
    base = run_ours(args.steps, args.threads, 16, tmp / "price_none", kernels=args.kernels)
    print(f"[price] none                : {base.sequences_per_s:8.1f} seq/s")
    for m in (*MEASUREMENTS, "all"):
        on = MEASUREMENTS if m == "all" else (m,)
        r = run_ours(args.steps, args.threads, 16, tmp / f"price_{m}", on, args.kernels)
        extra = P * G / r.sequences_per_s - P * G / base.sequences_per_s
        print(f"[price] {m:<20}: {r.sequences_per_s:8.1f} seq/s  {1e3 * extra:+7.1f} ms per step", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="rollout steps per trainer (first one is warm-up)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3, help="interleaved runs at 16 new tokens")
    parser.add_argument("--long", default="64,128", help="longer rows (one run each); '' for none")
    parser.add_argument("--price", action="store_true", help="price the optional measurements separately")
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-RSS child runs")
    parser.add_argument("--kernels", choices=("fast", "exact"), default="fast", help="this trainer's model.kernels")
    parser.add_argument("--child", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--child-tokens", type=int, default=16, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return _child(args)
    print(machine.header(), flush=True)
    limit = measure_limit()
    print(limit.roofline.line(), flush=True)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        compare(args, 16, args.runs, tmp, limit)
        for n in [int(x) for x in args.long.split(",") if x]:
            compare(args, n, 1, tmp, limit)
        if args.price:
            price(args, tmp)


if __name__ == "__main__":
    main()
