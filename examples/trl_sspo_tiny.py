"""A few GRPO steps with SSPO on a tiny Qwen2 built from a config: CPU, offline.

The integration's end-to-end check (tests/test_integrations_trl_e2e.py and
.ci/integrations.sh). Single process::

    python examples/trl_sspo_tiny.py --loss-type sspo --out /tmp/sspo_tiny.json

Two data-parallel processes on CPU (torchrun, gloo backend)::

    accelerate launch --multi_gpu --num_processes 2 examples/trl_sspo_tiny.py --loss-type gmpo --out /tmp/gmpo.json

(``--multi_gpu`` on a machine without GPUs starts the processes with torchrun and
accelerate picks gloo; ``accelerate launch --cpu --num_processes 2`` starts one
process only, since accelerate 1.x expects ``mpirun`` for multi-CPU runs.)

The model is the package's ``micro`` preset (Qwen2, hidden 64, 2 layers) with the
character tokenizer, saved to a temporary directory and loaded back from it by
``GRPOTrainer``; the reward is a Python function; the data set lives in memory.
Writes TRL's log history (one dict per step) as JSON to ``--out`` (main process).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch


def reward_digits(completions: list[str], **kwargs) -> list[float]:
    """Fraction of the characters that are digits: a signal a random tiny model can climb."""
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


def build_model(path: str, seed: int = 0) -> None:
    """Save the ``micro`` preset and its character tokenizer to ``path``."""
    from sspo_analysis.training.models import load_model

    model, tokenizer = load_model("micro", seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss-type", default="sspo")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None, help="write the log history here (JSON)")
    parser.add_argument("--model-dir", default=None, help="a saved model; default: build the micro preset")
    args = parser.parse_args(argv)

    from datasets import Dataset
    from transformers import AutoTokenizer

    from sspo_analysis.integrations.trl import SSPOConfig, SSPOTrainer

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or os.path.join(tmp, "model")
        if args.model_dir is None:
            build_model(model_dir)  # each process builds the same weights from the same seed
        prompts = [f"{a}+{b}=" for a in range(4) for b in range(4)]
        config = SSPOConfig(
            output_dir=os.path.join(tmp, "run"),
            loss_type=args.loss_type,
            max_steps=args.steps,
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=8,
            num_iterations=2,  # the second pass over a batch is off-policy: the gates act
            learning_rate=3e-3,
            logging_steps=1,
            report_to="none",
            save_strategy="no",
            use_cpu=True,
            seed=0,
            dataloader_num_workers=0,
        )
        trainer = SSPOTrainer(
            model=model_dir,
            reward_funcs=reward_digits,
            args=config,
            train_dataset=Dataset.from_dict({"prompt": prompts}),
            processing_class=AutoTokenizer.from_pretrained(model_dir, local_files_only=True),
        )
        trainer.train()
        history = trainer.state.log_history
        if args.out and trainer.accelerator.is_main_process:
            with open(args.out, "w") as f:
                state = trainer.accelerator.state
                json.dump({"num_processes": state.num_processes, "backend": state.backend,
                           "distributed_type": str(state.distributed_type), "log_history": history}, f)
    return history


if __name__ == "__main__":
    main()
