#!/usr/bin/env bash
# GPU check (not part of CI): on one CUDA machine with `vllm`, `trl` and crossopd installed,
#   1. serves the teacher with vLLM's OpenAI server (token-id prompts, prompt_logprobs),
#   2. runs the TRL engine with vLLM colocate rollouts for a few steps on a small pair,
#   3. prints, per step, step time, student tokens/s, the phase breakdown, and the peak GPU
#      memory seen by nvidia-smi,
#   4. runs `crossopd bench step --quick --device cuda` (both engines, cross pair and
#      same-tokenizer control, TRL's GOLD / DistillationTrainer beside them),
#   5. with VERL_PY set (a Python with `verl[vllm]==0.9.1` and `crossopd[verl]`), runs a few
#      steps of examples/verl/one_gpu_vllm_teacher.sh on the same pair against a vLLM teacher
#      and prints its wall time and peak GPU memory, and verl's step time and throughput lines.
# Runs in under 10 minutes on one H100. Models default to the bundled pair (SmolLM2-135M student,
# Gemma 3 270M teacher, de-quantised from their GGUF files into crossopd's cache), so no model hub
# is needed; set STUDENT / TEACHER to HF directories or hub ids to check another pair.
#
#   bash scripts/gpu_check.sh            # prints one JSON summary line at the end
#   STEPS=5 MAX_NEW=512 bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
STUDENT=${STUDENT:-smollm2}
TEACHER=${TEACHER:-gemma3-270m}
STEPS=${STEPS:-4}
MAX_NEW=${MAX_NEW:-256}
PORT=${PORT:-8011}
OUT=${OUT_DIR:-runs/gpu_check}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
rm -rf "$OUT" && mkdir -p "$OUT"

nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
$PY -c "import torch, vllm, trl; print('torch', torch.__version__, 'vllm', vllm.__version__, 'trl', trl.__version__)"

# HF directories for both models (bundled GGUF -> cached safetensors; others pass through)
dirs=$($PY - "$STUDENT" "$TEACHER" <<'EOF'
import sys
from pathlib import Path
from crossopd.hub import load_hf_model
for src in sys.argv[1:]:
    m = load_hf_model(src)
    print(m.name_or_path if Path(m.name_or_path).exists() else src)
EOF
)
S_DIR=$(echo "$dirs" | sed -n 1p); T_DIR=$(echo "$dirs" | sed -n 2p)
echo "student $S_DIR"; echo "teacher $T_DIR"

# 1. the teacher behind vLLM (a third of the GPU; the student's colocated vLLM takes another)
$PY -m vllm.entrypoints.openai.api_server --model "$T_DIR" --served-model-name teacher \
    --port "$PORT" --gpu-memory-utilization 0.25 --max-model-len 4096 > "$OUT/vllm_teacher.log" 2>&1 &
VLLM_PID=$!
trap 'kill $VLLM_PID 2>/dev/null || true; kill $SMI_PID 2>/dev/null || true' EXIT
for _ in $(seq 1 180); do
  curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null && break
  kill -0 $VLLM_PID 2>/dev/null || { tail -40 "$OUT/vllm_teacher.log"; exit 1; }
  sleep 2
done
echo "vLLM teacher ready on :$PORT"

nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/gpu_mem.csv" &
SMI_PID=$!

# 2. the TRL engine, vLLM colocate rollouts, bf16
plain=()
if [ "$TEACHER" = "gemma3-270m" ]; then  # a base model: plain prompt format
  plain=("teacher.plain_template=Question: {prompt}\nAnswer:" "teacher.stop=\n\nQuestion:")
fi
$PY -m crossopd train --no-progress \
    engine=trl "student.model=$STUDENT" student.dtype=bfloat16 \
    "teacher.urls=http://127.0.0.1:$PORT/v1" teacher.served_name=teacher "teacher.tokenizer=$TEACHER" \
    "${plain[@]}" data.path=bundled:arith rollout.backend=vllm rollout.vllm_mode=colocate \
    rollout.samples_per_prompt=4 "rollout.max_new_tokens=$MAX_NEW" batch_size=16 \
    "steps=$STEPS" eval_prompts=16 "output_dir=$OUT/run" \
    "trl={vllm_gpu_memory_utilization: 0.3, vllm_max_model_length: 2048}" | tee "$OUT/train.log"

# 3. per-step numbers
$PY - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
rows = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()]
mem = [int(x) for x in (out / "gpu_mem.csv").read_text().split() if x.strip().isdigit()]
for r in rows:
    phases = {k[5:-2]: round(v, 3) for k, v in r.items() if k.startswith("time/") and k.endswith("_s")
              and not k.endswith("tok_per_s")}
    print(f"step {r['step']}: {r['time/step_s']:.2f} s, {r['response_tokens'] / r['time/step_s']:.0f} "
          f"student tok/s, coverage {r['coverage']:.4f}, phases {phases}")
steady = rows[1:] or rows
tok = sum(r["response_tokens"] for r in steady)
sec = sum(r["time/step_s"] for r in steady)
print(json.dumps({"steps": len(rows), "student_tok_per_s": tok / sec, "step_s": sec / len(steady),
                  "peak_gpu_mem_mib": max(mem) if mem else None}))
EOF

# 4. the step breakdown per engine and pair on this GPU, with TRL's peers (crossopd bench step)
kill $VLLM_PID 2>/dev/null || true
$PY -m crossopd bench step --quick --device cuda --out "$OUT/bench_step"

# 5. verl with crossopd's plugin: the one-GPU external-teacher launch, a few steps. A base-model
# teacher (the bundled Gemma) needs its plain prompt format: hydra cannot pass the template's
# newline on the command line, so the check uses an instruct teacher there (TEACHER=HF dir).
if [ -n "${VERL_PY:-}" ] && [ "$TEACHER" != "gemma3-270m" ]; then
  $PY -m vllm.entrypoints.openai.api_server --model "$T_DIR" --served-model-name teacher \
      --port "$PORT" --gpu-memory-utilization 0.25 --max-model-len 4096 > "$OUT/vllm_teacher2.log" 2>&1 &
  VLLM_PID=$!
  $VERL_PY -c '
import sys
import pandas as pd
from crossopd.prompts import load_examples
rows = [{"prompt": e.messages, "data_source": "bundled", "reward_model": {"ground_truth": e.answer or ""}}
        for e in load_examples("bundled:arith")]
pd.DataFrame(rows).to_parquet(sys.argv[1] + "/verl_train.parquet")
pd.DataFrame(rows[:16]).to_parquet(sys.argv[1] + "/verl_val.parquet")
' "$OUT"
  nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > "$OUT/gpu_mem_verl.csv" &
  SMI_PID=$!
  t0=$(date +%s)
  PATH="$(dirname "$VERL_PY"):$PATH" bash examples/verl/one_gpu_vllm_teacher.sh \
      "actor_rollout_ref.model.path=$S_DIR" "distillation.teacher_models.teacher_model.model_path=$T_DIR" \
      "+crossopd.teacher.urls=[http://127.0.0.1:$PORT/v1]" +crossopd.teacher.served_name=teacher \
      "+crossopd.teacher.tokenizer=$TEACHER" "data.train_files=$OUT/verl_train.parquet" \
      "data.val_files=$OUT/verl_val.parquet" "trainer.total_training_steps=$STEPS" \
      trainer.val_before_train=False 2>&1 | tee "$OUT/verl.log"
  peak=$(sort -n "$OUT/gpu_mem_verl.csv" | tail -1)
  echo "{\"verl_steps\": $STEPS, \"verl_wall_s\": $(( $(date +%s) - t0 )), \"peak_gpu_mem_mib\": ${peak:-null}}"
  grep -E "timing_s/step|timing_s/opd/coverage|perf/throughput" "$OUT/verl.log" | tail -8 || true
fi
