"""This trainer versus TRL's GRPOTrainer at Qwen2.5-0.5B's size, on one GPU (or tiny, on CPU).

The model has Qwen2.5-0.5B's configuration (:data:`QWEN25_05B`) with random weights,
built from the config alone: nothing is downloaded, and for speed the weights do not
matter (a random model rarely emits ``<eos>``, so every completion runs to the token
limit). The tokenizer is the character tokenizer widened to the model's vocabulary
(one token per Unicode character). Same work for both trainers: 2-digit addition
prompts, ``--prompts`` x ``--group`` samples per rollout batch, ``--new-tokens``
new tokens, 2 minibatch updates per batch in micro-batches of ``--micro`` sequences,
gradient checkpointing, bf16 autocast, objective ``sapo``, no KL, AdamW.

Per trainer, over the rollout steps after the first (warm-up): completion
tokens/s, step time split into generation (TRL: generating, grading and scoring
the batch) and training, and peak GPU memory (``torch.cuda.max_memory_allocated``).
The output starts with the machine (:func:`machine.header`) and the matrix-product rate
measured in this process at the run's precision on the model's own shapes
(:func:`machine.roofline`); each trainer's line gives its model-FLOPs utilisation against it
(:func:`machine.step_flops`; gradient checkpointing's recomputation is not counted, and under it
this trainer's training forward runs each prompt once per completion, like TRL's).

    python benchmarks/gpu_throughput.py                 # GPU: 32 x 8, 512 new tokens, bf16
    python benchmarks/gpu_throughput.py --tiny          # CPU, tiny model, seconds (CI runs this)
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import machine
import torch

# Qwen2.5-0.5B's config.json, the fields that shape compute and memory.
QWEN25_05B = dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  intermediate_size=4864, vocab_size=151936, tie_word_embeddings=True, rope_theta=1_000_000.0,
                  max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu")
TINY = dict(QWEN25_05B, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=64, vocab_size=512, max_position_embeddings=512)
UPDATES = 2


def build_checkpoint(arch: dict, out: Path) -> Path:
    """Save a random-init Qwen2 model with ``arch`` and a tokenizer covering its vocabulary to ``out``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sspo_analysis.training.models import char_tokenizer

    tok = char_tokenizer()
    tok.add_tokens([f"<x{i}>" for i in range(arch["vocab_size"] - len(tok))])  # ids the model may sample
    config = AutoConfig.for_model("qwen2", bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                  pad_token_id=tok.pad_token_id, **arch)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def _reset_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def _peak_memory_gib(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None


def run_sspo(model_dir: Path, args, out: Path) -> dict:
    """This trainer on the work; per-step means over the steps after the first."""
    from sspo_analysis.training import load_config, read_metrics, train

    n = args.prompts * args.group
    cfg = load_config(None, [
        f'model.path="{model_dir}"', f'device="{args.device}"', f'model.precision="{args.precision}"',
        "model.gradient_checkpointing=true", f"optim.token_budget={args.micro * (args.new_tokens + 16)}",
        f"steps={args.steps}", 'task.name="addition"', "task.digits=2", f"rollout.prompts={args.prompts}",
        f"rollout.group_size={args.group}", f"rollout.max_new_tokens={args.new_tokens}",
        f"algo.updates_per_batch={UPDATES}", 'objective.name="sapo"', "algo.kl_coef=0.0", "optim.lr=1e-6",
        "algo.track_kl_ref=false", "log.entropy_taylor=false", "log.entropy_change=false",
        "log.log_ratios_every=0", f"log.checkpoint_every={10 ** 6}", "log.progress=false",
    ])
    _reset_memory(args.device)
    df = read_metrics(train(cfg, out)).iloc[1:]
    step, gen = float(df.step_time.mean()), float(df.generation_time.mean())
    return {"step_s": step, "generation_s": gen, "training_s": step - gen,
            "completion_tokens_per_s": float(df.response_length.mean()) * n / step,
            "peak_gpu_gib": _peak_memory_gib(args.device)}


def _trl_args(args, tmp: Path):
    from trl import GRPOConfig

    n = args.prompts * args.group
    bf16 = args.precision == "bf16"
    return GRPOConfig(
        output_dir=str(tmp / "trl"), use_cpu=args.device == "cpu", bf16=bf16, fp16=False, report_to="none",
        save_strategy="no", logging_steps=10_000, disable_tqdm=True, seed=0, learning_rate=1e-6,
        max_steps=args.steps * UPDATES, per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=n // UPDATES // args.micro, steps_per_generation=n // args.micro,
        num_generations=args.group, num_iterations=1, max_completion_length=args.new_tokens, temperature=1.0,
        top_p=1.0, top_k=0, beta=0.0, loss_type="sapo", dataloader_num_workers=0, shuffle_dataset=False,
        gradient_checkpointing=True,
    )


def run_trl(model_dir: Path, args, tmp: Path) -> dict:
    """TRL's GRPOTrainer on the same work; generation = its generate-grade-score stage."""
    import numpy as np
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from sspo_analysis.training.models import load_tokenizer
    from sspo_analysis.training.tasks import Addition

    tok = load_tokenizer(model_dir)  # as this trainer loads it
    task = Addition(digits=2)
    prompts, answers = task.sample(np.random.default_rng(0), args.prompts * (args.steps + 1))
    data = Dataset.from_dict({"prompt": [tok.bos_token + p for p in prompts], "answer": answers})
    tokens: list[int] = []
    ends: list[float] = []

    def reward(prompts, completions, answer, completion_ids=(), **kwargs):
        tokens.append(sum(len(c) for c in completion_ids))
        return [task.reward(c, a) for c, a in zip(completions, answer)]

    class Clock(TrainerCallback):
        def on_step_end(self, a, state, control, **kwargs):
            ends.append(time.perf_counter())

    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=_trl_args(args, tmp), train_dataset=data,
                          processing_class=tok, callbacks=[Clock()])
    generation = machine.time_calls(trainer, "_generate_and_score_completions")
    _reset_memory(args.device)
    trainer.train()
    step = (ends[-1] - ends[UPDATES - 1]) / (args.steps - 1)  # rollout batches after the first
    gen = float(np.mean(generation[1:]))
    return {"step_s": step, "generation_s": gen, "training_s": step - gen,
            "completion_tokens_per_s": float(np.mean(tokens[1:])) / step, "peak_gpu_gib": _peak_memory_gib(args.device)}


def passes(trainer: str, group: int) -> machine.Passes:
    """A step's forward passes (see :class:`machine.Passes`): this trainer prefills each prompt once per group,
    trains every row in full (gradient checkpointing turns prompt sharing off) and keeps the sampling
    log-probs; TRL runs every row in full and one old log-prob forward (generation and optimiser steps are
    misaligned)."""
    if trainer == "sspo":
        return machine.Passes(sampling_prompt_runs=1, training_prompt_runs=group, logprob=0)
    return machine.Passes(sampling_prompt_runs=group, training_prompt_runs=group, logprob=1)


def utilisation_lines(model_dir: Path, arch: dict, args, results: dict) -> list[str]:
    """The roofline at the run's precision on the model's shapes, then each trainer's utilisation against it."""
    from types import SimpleNamespace

    from sspo_analysis.training.models import load_tokenizer

    shape = machine.Shape.of(SimpleNamespace(**arch))
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    roof = machine.roofline(shape.product_shapes(args.micro * (args.new_tokens + 16)), device=args.device, dtype=dtype)
    prompt_len, n = machine.mean_prompt_tokens(load_tokenizer(model_dir)), args.prompts * args.group
    lines = [roof.line()]
    for name, r in results.items():
        batch = machine.Batch(args.prompts, args.group, prompt_len, r["completion_tokens_per_s"] * r["step_s"] / n)
        flops = machine.step_flops(shape, batch, passes(name, args.group))
        lines.append(f"{name:5s} {machine.utilisation_line(flops, r['step_s'], r['generation_s'], roof.peak)}")
    return lines


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny model, 4 x 4 samples, 16 tokens, CPU, fp32")
    parser.add_argument("--steps", type=int, default=3, help="rollout steps per trainer (the first is warm-up)")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--micro", type=int, default=32, help="sequences per micro-batch (gradient accumulation)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    args.device, args.precision = ("cuda", "bf16") if torch.cuda.is_available() else ("cpu", "fp32")
    if args.tiny:
        args.prompts, args.group, args.new_tokens, args.micro, args.device, args.precision = 4, 4, 16, 4, "cpu", "fp32"
    if (args.prompts * args.group) % (UPDATES * args.micro):
        parser.error(f"--micro: prompts x group must split into {UPDATES} minibatches of whole micro-batches")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(1 if args.tiny else torch.get_num_threads())
    print(machine.header(), flush=True)
    arch = TINY if args.tiny else QWEN25_05B
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model_dir = build_checkpoint(arch, tmp / "model")
        results = {"sspo": run_sspo(model_dir, args, tmp / "sspo"), "trl": run_trl(model_dir, args, tmp)}
        limit = utilisation_lines(model_dir, arch, args, results)
    print(f"{args.prompts} x {args.group} samples, {args.new_tokens} new tokens, {args.precision} on {args.device}")
    for name, r in results.items():
        mem = "n/a" if r["peak_gpu_gib"] is None else f"{r['peak_gpu_gib']:.1f} GiB"
        print(f"{name:5s} {r['completion_tokens_per_s']:9.0f} tok/s  step {r['step_s']:7.2f} s "
              f"(generation {r['generation_s']:6.2f} s, training {r['training_s']:6.2f} s)  peak GPU {mem}")
    s, t = results["sspo"], results["trl"]
    print(f"ratio sspo/TRL: {s['completion_tokens_per_s'] / t['completion_tokens_per_s']:.2f}x tokens/s")
    print("\n".join(limit))
    if args.json:
        args.json.write_text(json.dumps({**results, "device": args.device, "precision": args.precision}, indent=1))


if __name__ == "__main__":
    main()
