# SSPO in TRL, offline on CPU: a tiny Qwen2 built from a config, the package's character tokenizer.
from datasets import Dataset
from transformers import AutoModelForCausalLM, Qwen2Config

from sspo_analysis.integrations.trl import SSPOConfig, SSPOTrainer
from sspo_analysis.training.models import char_tokenizer

tokenizer = char_tokenizer()  # one token per character (a PreTrainedTokenizerFast): nothing to download
model = AutoModelForCausalLM.from_config(Qwen2Config(
    vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    pad_token_id=tokenizer.pad_token_id))
dataset = Dataset.from_dict({"prompt": [f"{a}+{b}=" for a in range(4) for b in range(4)]})


def digits(completions, **kwargs):  # reward: the fraction of digits, something a random model can climb
    return [sum(ch.isdigit() for ch in c) / max(len(c), 1) for c in completions]


args = SSPOConfig(output_dir="runs/trl-quickstart", loss_type="sspo", max_steps=3, per_device_train_batch_size=4,
                  num_generations=4, max_completion_length=8, num_iterations=2, learning_rate=3e-3,
                  logging_steps=1, report_to="none", save_strategy="no", use_cpu=True)
trainer = SSPOTrainer(model=model, reward_funcs=digits, args=args, train_dataset=dataset, processing_class=tokenizer)
trainer.train()
print({k: v for k, v in trainer.state.log_history[0].items() if k in ("reward", "clip_ratio/region_mean",
                                                                       "objective/gate_weight_mean")})
