#!/usr/bin/env bash
# One GPU: an external `vllm serve` teacher of another family scores through crossopd's HTTP
# teacher (URL pool, patience, API key), verl trains the student on the same GPU.
# Qwen2.5-1.5B-Instruct (Qwen tokenizer, 151,936 ids) teaches SmolLM2-360M-Instruct (49,152 ids).
#
# Memory (one 80 GB GPU): the teacher's vLLM takes 25% (3 GB of bf16 weights + KV cache); the
# student's own vLLM rollout 30%; training the 360M student in fp32 master weights with AdamW
# is about 6 GB. Checked on CPU (tests_verl, the smoke command below); docs/scale.md says what
# has run on a GPU.
#
#   vllm serve Qwen/Qwen2.5-1.5B-Instruct --port 8000 --gpu-memory-utilization 0.25 \
#     --max-model-len 4096 &
#   bash examples/verl/one_gpu_vllm_teacher.sh data.train_files=... data.val_files=...
#
# crossopd's own teacher scores, so verl's distillation switch stays off (verl builds no teacher
# pool): the worker hands crossopd's per-token advantage A = clamp(q - log p, +-10) to verl as
# the token-level reward, the `crossopd` advantage estimator passes it through, and the
# `crossopd` policy loss (clip 0.2/0.28, dual clip 10, token mean) trains. The trainer waits for
# a teacher that is still loading (crossopd.teacher.patience_s).
#
# The same launch on a laptop, scaled down, CPU only:
#   .venv-verl/bin/python -m crossopd.integrations.verl.smoke --teacher-mode http
set -euo pipefail
python3 -m verl.trainer.main_ppo \
  algorithm.adv_estimator=crossopd \
  algorithm.use_kl_in_reward=False \
  data.train_files=data/train.parquet \
  data.val_files=data/val.parquet \
  data.train_batch_size=16 \
  data.max_prompt_length=512 \
  data.max_response_length=1024 \
  data.return_raw_chat=True \
  actor_rollout_ref.model.path=HuggingFaceTB/SmolLM2-360M-Instruct \
  actor_rollout_ref.actor.optim.lr=1e-6 \
  actor_rollout_ref.actor.ppo_mini_batch_size=16 \
  actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4 \
  actor_rollout_ref.actor.policy_loss.loss_mode=crossopd \
  actor_rollout_ref.actor.clip_ratio_low=0.2 \
  actor_rollout_ref.actor.clip_ratio_high=0.28 \
  actor_rollout_ref.actor.clip_ratio_c=10.0 \
  actor_rollout_ref.actor.loss_agg_mode=token-mean \
  actor_rollout_ref.actor.use_kl_loss=False \
  actor_rollout_ref.rollout.name=vllm \
  actor_rollout_ref.rollout.n=1 \
  actor_rollout_ref.rollout.tensor_model_parallel_size=1 \
  actor_rollout_ref.rollout.gpu_memory_utilization=0.3 \
  actor_rollout_ref.rollout.calculate_log_probs=True \
  actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4 \
  +actor_rollout_ref.rollout.agent.agent_loop_manager_class=crossopd.integrations.verl.worker.CrossOPDAgentLoopManager \
  trainer.v1.sampler.custom_sampler.path=pkg://crossopd.integrations.verl.sampler \
  trainer.v1.sampler.custom_sampler.name=CrossOPDReplayBuffer \
  +crossopd.teacher.urls=[http://127.0.0.1:8000/v1] \
  +crossopd.teacher.served_name=Qwen/Qwen2.5-1.5B-Instruct \
  +crossopd.teacher.tokenizer=Qwen/Qwen2.5-1.5B-Instruct \
  +crossopd.teacher.patience_s=900 \
  trainer.nnodes=1 \
  trainer.n_gpus_per_node=1 \
  trainer.total_training_steps=20 \
  trainer.logger=[console] \
  "$@"
