#!/usr/bin/env bash
# The paper's cross-family run on verl with crossopd's plugin: Qwen3-8B teaches Llama-3.1-8B.
# Hyperparameters as the paper's launch: clip 0.2 / 0.28, dual clip 10, advantage clamp 10,
# token mean, no KL terms; lr 1e-6, warm-up 10, weight decay 0.01, grad clip 1.0; 128 prompts,
# n = 1, one update per rollout; prompt 1k, response 16k, 500 steps; validation at
# temperature 0.6, top-p 0.95, n = 4; FSDP with offload, Ulysses SP 2, rollout TP 2.
#
# Hardware: the student trains on 2 nodes x 8 GPUs (trainer.*); verl's teacher pool is one more
# node of 8 GPUs (distillation.*: 4 replicas of Qwen3-8B at TP 2). verl's pool serves the
# cross-family teacher: crossopd's worker sends it the teacher-side ids (its prompt format, the
# response spelled in its vocabulary), writes the credit targets into `teacher_logprobs`, and the
# `crossopd` distillation loss trains. The same launch on a laptop, scaled down, CPU only:
#   .venv-verl/bin/python -m crossopd.integrations.verl.smoke --teacher-mode pool
# docs/scale.md says what has run where.
#
# Memory (80 GB GPUs, bf16):
# - student 8B: 16 GB weights + 16 GB grads + 64 GB AdamW fp32 states + 32 GB fp32 master
#   weights = 128 GB, sharded over 16 GPUs by FSDP = 8 GB per GPU, offloaded to CPU
#   (param_offload, optimizer_offload) between phases;
# - rollout at TP 2: 8 GB of weights per GPU + KV cache for 128 x 17k tokens
#   (Llama-3.1-8B: 128 KB per token in bf16 -> 278 GB over 16 GPUs; gpu_memory_utilization 0.6
#   leaves room; vLLM preempts beyond it);
# - teacher at TP 2: 8 GB weights per GPU + a prefill of up to 18k tokens per request
#   (max_model_len 18432 below: the student's 1k + 16k spelled in Qwen's vocabulary plus
#   Qwen's prompt format; a request longer than that gets no signal and is counted).
# Data: parquet files with a `prompt` column of chat messages (verl's format,
# data.return_raw_chat=True hands them to crossopd's bridge).
set -euo pipefail
python3 -m verl.trainer.main_ppo \
  algorithm.adv_estimator=grpo \
  algorithm.use_kl_in_reward=False \
  data.train_files=data/train.parquet \
  data.val_files=data/val.parquet \
  data.train_batch_size=128 \
  data.max_prompt_length=1024 \
  data.max_response_length=16384 \
  data.return_raw_chat=True \
  actor_rollout_ref.model.path=meta-llama/Llama-3.1-8B-Instruct \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  actor_rollout_ref.actor.optim.lr_warmup_steps=10 \
  actor_rollout_ref.actor.optim.weight_decay=0.01 \
  actor_rollout_ref.actor.grad_clip=1.0 \
  actor_rollout_ref.actor.ppo_mini_batch_size=128 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=1 \
  actor_rollout_ref.actor.ppo_epochs=1 \
  actor_rollout_ref.actor.clip_ratio_c=10.0 \
  actor_rollout_ref.actor.loss_agg_mode=token-mean \
  actor_rollout_ref.actor.use_kl_loss=False \
  actor_rollout_ref.actor.entropy_coeff=0 \
  actor_rollout_ref.actor.ulysses_sequence_parallel_size=2 \
  actor_rollout_ref.actor.fsdp_config.param_offload=True \
  actor_rollout_ref.actor.fsdp_config.optimizer_offload=True \
  actor_rollout_ref.rollout.name=vllm \
  actor_rollout_ref.rollout.n=1 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=2 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.6 \
  actor_rollout_ref.rollout.calculate_log_probs=True \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=1 \
  actor_rollout_ref.rollout.val_kwargs.do_sample=True \
  actor_rollout_ref.rollout.val_kwargs.temperature=0.6 \
  actor_rollout_ref.rollout.val_kwargs.top_p=0.95 \
  actor_rollout_ref.rollout.val_kwargs.n=4 \
  +actor_rollout_ref.rollout.agent.agent_loop_manager_class=crossopd.integrations.verl.worker.CrossOPDAgentLoopManager \
  distillation.enabled=True \
  distillation.nnodes=1 \
  distillation.n_gpus_per_node=8 \
  distillation.teacher_models.teacher_model.model_path=Qwen/Qwen3-8B \
  distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size=2 \
  distillation.teacher_models.teacher_model.inference.max_model_len=18432 \
  distillation.distillation_loss.loss_mode=crossopd \
  distillation.distillation_loss.use_policy_gradient=False \
  distillation.distillation_loss.use_task_rewards=False \
  distillation.distillation_loss.loss_max_clamp=null \
  distillation.distillation_loss.clip_ratio_low=0.2 \
  distillation.distillation_loss.clip_ratio_high=0.28 \
  trainer.v1.sampler.custom_sampler.path=pkg://crossopd.integrations.verl.sampler \
  trainer.v1.sampler.custom_sampler.name=CrossOPDReplayBuffer \
  +crossopd.credit_rule=proportional \
  trainer.nnodes=2 \
  trainer.n_gpus_per_node=8 \
  trainer.total_training_steps=500 \
  trainer.test_freq=25 \
  trainer.save_freq=50 \
  trainer.logger=[console] \
  "$@"
