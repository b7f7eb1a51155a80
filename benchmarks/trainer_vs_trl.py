"""Throughput of this trainer versus TRL's GRPOTrainer on identical work (CPU).

Identical work: the ``tiny`` preset (random init, same seed), the character
tokenizer, 2-digit addition, 8 prompts x 8 samples per rollout batch, at most 16
new tokens, 2 minibatch updates per rollout batch (32 sequences each), objective
``sapo`` (TRL ``loss_type="sapo"``), no KL, AdamW, temperature 1, top-p 1, CPU.
The two run back to back in this process; each measures the rollout steps after
the first (warm-up) one. TRL runs with gradient checkpointing off (its default
turns it on, which only adds recomputation for a model this small). This trainer
runs twice: with its extra per-step measurements off (reference KL, the entropy
after the updates, the entropy Taylor prediction: TRL computes none of them), and
with its default measurements on (one more forward and one more backward per step).

    python benchmarks/trainer_vs_trl.py [--steps 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

P, G, MAX_NEW, UPDATES = 8, 8, 16, 2


def run_ours(steps: int, threads: int, measurements: bool, out: Path) -> float:
    from sspo_analysis.training import load_config, read_metrics, train

    cfg = load_config(None, [
        f"steps={steps}", f"threads={threads}", "model.warm_start=false", 'task.name="addition"', "task.digits=2",
        f"rollout.prompts={P}", f"rollout.group_size={G}", f"rollout.max_new_tokens={MAX_NEW}",
        f"algo.updates_per_batch={UPDATES}", 'objective.name="sapo"', "algo.kl_coef=0.0", "optim.lr=1e-5",
        f"algo.track_kl_ref={str(measurements).lower()}", f"log.entropy_taylor={str(measurements).lower()}",
        f"log.entropy_change={str(measurements).lower()}",
        "log.log_ratios_every=0", f"log.checkpoint_every={steps}", "log.progress=false",
    ])
    run = train(cfg, out)
    df = read_metrics(run)
    later = df.iloc[1:]  # the first step is warm-up
    seconds = float(later.wall_time.iloc[-1] - df.wall_time.iloc[0])
    return len(later) * P * G / seconds


def run_trl(steps: int, threads: int, tmp: Path) -> float:
    import numpy as np
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from sspo_analysis.training.models import load_model
    from sspo_analysis.training.tasks import Addition

    torch.set_num_threads(threads)
    model, tok = load_model("tiny", seed=0)
    model_dir = tmp / "tiny"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    task = Addition(digits=2)
    prompts, answers = task.sample(np.random.default_rng(0), P * (steps + 1))
    data = Dataset.from_dict({"prompt": [tok.bos_token + p for p in prompts], "answer": answers})

    def reward(prompts, completions, answer, **kwargs):
        return [task.reward(c, a) for c, a in zip(completions, answer)]

    class Clock(TrainerCallback):
        times: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    clock = Clock()
    args = GRPOConfig(
        output_dir=str(tmp / "trl"), use_cpu=True, bf16=False, fp16=False, report_to="none", save_strategy="no",
        logging_steps=10_000, disable_tqdm=True, seed=0, learning_rate=1e-5, max_steps=steps * UPDATES,
        per_device_train_batch_size=P * G // UPDATES, steps_per_generation=UPDATES, num_generations=G,
        num_iterations=1, max_completion_length=MAX_NEW, temperature=1.0, top_p=1.0, top_k=0, beta=0.0,
        loss_type="sapo", dataloader_num_workers=0, shuffle_dataset=False, gradient_checkpointing=False,
    )
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward, args=args, train_dataset=data,
                          processing_class=tok, callbacks=[clock])
    trainer.train()
    t = clock.times  # one entry per optimiser step; a rollout batch every UPDATES steps
    rollouts_after_first = steps - 1
    seconds = t[-1] - t[UPDATES - 1]
    return rollouts_after_first * P * G / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="rollout steps per trainer (first one is warm-up)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        trl = run_trl(args.steps, args.threads, tmp)
        ours = run_ours(args.steps, args.threads, False, tmp / "ours")
        ours_full = run_ours(args.steps, args.threads, True, tmp / "ours_full")
    print(f"TRL GRPOTrainer            : {trl:8.1f} sequences/s")
    print(f"sspo trainer (same work)   : {ours:8.1f} sequences/s  ratio {ours / trl:.2f}x")
    print(f"sspo trainer (+ measures)  : {ours_full:8.1f} sequences/s  ratio {ours_full / trl:.2f}x")


if __name__ == "__main__":
    main()
