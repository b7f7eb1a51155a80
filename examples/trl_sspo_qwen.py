"""Train Qwen2.5-0.5B-Instruct on GSM8K with SSPO in TRL (multi-GPU, vLLM rollouts).

Every ``SSPOConfig`` field is a command-line flag (TRL's parser), so the loss,
its gate and temperatures, the vLLM rollout and the usual GRPO settings are all
chosen on the command line. On one node with 8 GPUs, vLLM colocated with training::

    accelerate launch --config_file examples/accelerate_multi_gpu.yaml examples/trl_sspo_qwen.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B-Instruct --dataset_name openai/gsm8k --dataset_config main \\
        --output_dir runs/qwen05b-sspo --loss_type sspo --gate arctan \\
        --sapo_temperature_pos 1.0 --sapo_temperature_neg 1.05 \\
        --num_generations 8 --per_device_train_batch_size 8 --gradient_accumulation_steps 2 --num_iterations 2 \\
        --max_completion_length 512 --learning_rate 1e-6 --beta 0.0 --bf16 true \\
        --use_vllm --vllm_mode colocate --vllm_gpu_memory_utilization 0.3 \\
        --vllm_importance_sampling_correction true --logging_steps 1 --report_to none

With a separate vLLM server instead (GPU 7 serves, GPUs 0-6 train)::

    CUDA_VISIBLE_DEVICES=7 trl vllm-serve --model Qwen/Qwen2.5-0.5B-Instruct
    CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6 accelerate launch --config_file examples/accelerate_multi_gpu.yaml \\
        --num_processes 7 examples/trl_sspo_qwen.py ... --use_vllm --vllm_mode server

Other losses: ``--loss_type gmpo``, ``sspo_sigmoid``, ``soft_erf``, ``soft_softsign_one_sided``,
``package:sapo``, or any of TRL's (``grpo``, ``dapo``, ``sapo``, ...). The gate metrics
appear in the logs as ``objective/gate_weight_mean``, ``objective/dead_frac``,
``objective/seq_weight_var``, ``objective/ess_frac``.
"""

from __future__ import annotations

import re

from trl import ModelConfig, ScriptArguments, TrlParser

from sspo_analysis.integrations.trl import SSPOConfig, SSPOTrainer

SYSTEM = "Solve the problem. Put the final number after '####'."
NUMBER = re.compile(r"-?\d[\d,]*\.?\d*")


def final_number(text: str) -> str | None:
    """The number after the last ``####`` (GSM8K's answer format), else the last number in the text."""
    tail = text.rsplit("####", 1)[-1] if "####" in text else text
    found = NUMBER.findall(tail)
    return found[-1].replace(",", "").rstrip(".") if found else None


def correctness(completions, answer, **kwargs) -> list[float]:
    """1 when the completion's final number equals the reference answer's."""
    out = []
    for completion, ref in zip(completions, answer):
        text = completion[-1]["content"] if isinstance(completion, list) else completion
        out.append(float(final_number(text) is not None and final_number(text) == final_number(ref)))
    return out


def to_prompt(example: dict) -> dict:
    return {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": example["question"]}]}


def build_parser() -> TrlParser:
    return TrlParser((ScriptArguments, SSPOConfig, ModelConfig))


def main() -> None:
    from datasets import load_dataset

    script_args, training_args, model_args = build_parser().parse_args_and_config()
    dataset = load_dataset(script_args.dataset_name, script_args.dataset_config)
    train = dataset[script_args.dataset_train_split].map(to_prompt)
    trainer = SSPOTrainer(
        model=model_args.model_name_or_path,
        reward_funcs=correctness,
        args=training_args,
        train_dataset=train,
    )
    trainer.train()
    trainer.save_model(training_args.output_dir)


if __name__ == "__main__":
    main()
