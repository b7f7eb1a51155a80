#!/usr/bin/env bash
# SSPO on Qwen2.5-7B-Instruct with verl 0.9's GSM8K GRPO example (8 GPUs, FSDP, vLLM rollouts).
# Install (a GPU node; from a clone of this repository):
#     pip install 'verl[vllm]==0.9.1' && pip install -e .      # verl with its dependencies (torch 2.11, vLLM)
# (`pip install -e '.[verl]'` brings verl without its GPU extra: enough for the loss, not for this run.)
# and the GSM8K parquet files from verl's examples/data_preprocess/gsm8k.py:
#     python examples/data_preprocess/gsm8k.py --local_save_dir $HOME/data/gsm8k      (in a verl checkout)
# Not run in CI (Ray, vLLM and GPUs): CI checks the loss itself in tests/test_integrations_verl.py, and that
# `bash examples/verl_sspo_gsm8k.sh --cfg job` (verl's own entry point printing the composed config) succeeds.
#
# The losses are registered by importing sspo_analysis.integrations.verl, here through
# actor_rollout_ref.model.external_lib (imported in every worker that builds the model config);
# exporting VERL_USE_EXTERNAL_MODULES=sspo_analysis.integrations.verl works as well on a single node.
# loss_mode: sspo | sspo_sigmoid | soft_<sigmoid|erf|arctan|softsign>[_one_sided] | gmpo | vespo | luspo | ...
# | package:<objective> (hyphenated names, soft-erf, are aliases; see sspo_analysis.integrations.verl).
# tau_pos / tau_neg are the gate temperatures (A > 0 / A <= 0); loss_agg_mode=seq-mean-token-mean is SSPO's.
set -euo pipefail
LOSS_MODE=${LOSS_MODE:-sspo}

python3 -m verl.trainer.main_ppo \
    algorithm.adv_estimator=grpo \
    data.train_files="$HOME/data/gsm8k/train.parquet" \
    data.val_files="$HOME/data/gsm8k/test.parquet" \
    data.train_batch_size=1024 \
    data.max_prompt_length=512 \
    data.max_response_length=1024 \
    data.filter_overlong_prompts=True \
    data.truncation='error' \
    actor_rollout_ref.model.path=Qwen/Qwen2.5-7B-Instruct \
    actor_rollout_ref.model.external_lib=sspo_analysis.integrations.verl \
    actor_rollout_ref.model.use_remove_padding=True \
    actor_rollout_ref.model.enable_gradient_checkpointing=True \
    actor_rollout_ref.actor.policy_loss.loss_mode="$LOSS_MODE" \
    actor_rollout_ref.actor.tau_pos=1.0 \
    actor_rollout_ref.actor.tau_neg=1.05 \
    actor_rollout_ref.actor.loss_agg_mode=seq-mean-token-mean \
    actor_rollout_ref.actor.ppo_epochs=2 \
    actor_rollout_ref.actor.optim.lr=1e-6 \
    actor_rollout_ref.actor.ppo_mini_batch_size=256 \
    actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=40 \
    actor_rollout_ref.actor.use_kl_loss=True \
    actor_rollout_ref.actor.kl_loss_coef=0.001 \
    actor_rollout_ref.actor.kl_loss_type=low_var_kl \
    actor_rollout_ref.actor.entropy_coeff=0 \
    actor_rollout_ref.actor.fsdp_config.param_offload=False \
    actor_rollout_ref.actor.fsdp_config.optimizer_offload=False \
    actor_rollout_ref.rollout.name=vllm \
    actor_rollout_ref.rollout.tensor_model_parallel_size=2 \
    actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
    actor_rollout_ref.rollout.n=5 \
    actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=40 \
    actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=40 \
    actor_rollout_ref.ref.fsdp_config.param_offload=True \
    algorithm.use_kl_in_reward=False \
    trainer.critic_warmup=0 \
    trainer.logger='["console"]' \
    trainer.project_name=sspo_gsm8k \
    trainer.experiment_name="qwen2_5_7b_${LOSS_MODE}" \
    trainer.n_gpus_per_node=8 \
    trainer.nnodes=1 \
    trainer.save_freq=20 \
    trainer.test_freq=5 \
    trainer.total_epochs=15 "$@"
