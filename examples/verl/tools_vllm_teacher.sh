#!/usr/bin/env bash
# Tool calling on one GPU: the student calls tools in verl's own tool agent loop (crossopd's
# `crossopd_tool_agent`: verl's ToolAgentLoop handing crossopd the conversation it kept), an
# external `vllm serve` teacher of another family scores each assistant turn in its own format.
# Qwen2.5-0.5B-Instruct (Qwen tokenizer, Hermes <tool_call> syntax) learns from
# Llama-3.2-1B-Instruct (Llama 3 tokenizer, JSON tool calls): the teacher sees the tool results
# in its own template's format, the student's calls rendered in its own syntax; the syntax
# between equal stretches has no signal (format_tokens), tool results are never trained
# (env_tokens). docs/agentic.md has what is aligned and counted.
#
#   vllm serve meta-llama/Llama-3.2-1B-Instruct --port 8000 --gpu-memory-utilization 0.25 \
#     --max-model-len 4096 &
#   bash examples/verl/tools_vllm_teacher.sh data.train_files=... data.val_files=...
#
# The tools are verl's function tools (examples/verl/calc_tools.py); verl's tool config
# (multi_turn.tool_config_path) works the same way. Everything else is
# examples/verl/one_gpu_vllm_teacher.sh.
#
# The same launch on a laptop, scaled down, CPU only (a student that calls the tool: see
# tests_verl/test_verl_smoke.py):
#   .venv-verl/bin/python -m crossopd.integrations.verl.smoke --teacher-mode http \
#     --launch examples/verl/tools_vllm_teacher.sh --student DIR --teacher DIR --data FILE
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
  actor_rollout_ref.model.path=Qwen/Qwen2.5-0.5B-Instruct \
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
  actor_rollout_ref.rollout.multi_turn.enable=True \
  actor_rollout_ref.rollout.multi_turn.format=hermes \
  actor_rollout_ref.rollout.multi_turn.function_tool_path=examples/verl/calc_tools.py \
  actor_rollout_ref.rollout.multi_turn.max_assistant_turns=4 \
  actor_rollout_ref.rollout.agent.default_agent_loop=crossopd_tool_agent \
  +actor_rollout_ref.rollout.agent.agent_loop_manager_class=crossopd.integrations.verl.worker.CrossOPDAgentLoopManager \
  trainer.v1.sampler.custom_sampler.path=pkg://crossopd.integrations.verl.sampler \
  trainer.v1.sampler.custom_sampler.name=CrossOPDReplayBuffer \
  +crossopd.teacher.urls=[http://127.0.0.1:8000/v1] \
  +crossopd.teacher.served_name=meta-llama/Llama-3.2-1B-Instruct \
  +crossopd.teacher.tokenizer=meta-llama/Llama-3.2-1B-Instruct \
  +crossopd.teacher.patience_s=900 \
  trainer.nnodes=1 \
  trainer.n_gpus_per_node=1 \
  trainer.total_training_steps=20 \
  trainer.logger=[console] \
  "$@"
