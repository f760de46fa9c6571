#!/usr/bin/env bash
# GPU check (not part of CI): on one fresh CUDA machine with the package index reachable,
#   0. builds the project's own environments, CUDA variants (make ... TORCH=torch VLLM=vllm
#      VERL_VLLM=1), and uses no Python it did not make;
#   1. serves the teacher with vLLM's OpenAI server (the vLLM environment);
#   2. runs the TRL engine with vLLM colocate rollouts, scored by that teacher, STEPS steps;
#   3. runs verl's own trainer through crossopd's smoke command on the GPU (verl's vLLM rollout,
#      bfloat16), mode http against the same teacher, STEPS steps;
#   4. runs the smoke command in mode pool (verl's teacher pool) when the machine has a second
#      GPU for the pool, else says why not;
# printing one JSON line per step of each run: {"check", "step", "step_s", "tok_per_s",
# "peak_gpu_mem_mib"} (the peak of nvidia-smi's memory.used while that step ran), then one
# summary line per run. Models default to the bundled pair (SmolLM2-135M student, Gemma 3 270M
# teacher, de-quantised from their GGUF files into crossopd's cache), so no model hub is needed;
# set STUDENT / TEACHER to HF directories or hub ids to check another pair. Written to finish in
# about 10 minutes of an H100/H200 once the environments are built (the build downloads torch,
# vLLM and verl: about 10 GB).
#
#   bash scripts/gpu_check.sh 2>&1 | tee gpu_check.log
#   STEPS=5 MAX_NEW=512 bash scripts/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
STUDENT=${STUDENT:-smollm2}
TEACHER=${TEACHER:-gemma3-270m}
STEPS=${STEPS:-3}
MAX_NEW=${MAX_NEW:-256}
PORT=${PORT:-8011}
OUT=${OUT_DIR:-runs/gpu_check}
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false
rm -rf "$OUT" && mkdir -p "$OUT"

# 0. the environments: the Makefile's own steps, CUDA variants
make install vllm-env verl-env TORCH=torch VLLM=vllm VERL_VLLM=1 > "$OUT/build.log" 2>&1 \
  || { tail -40 "$OUT/build.log"; exit 1; }
PY=.venv/bin/python
VLLM_PY=.venv-vllm/bin/python
VERL_PY=.venv-verl/bin/python
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
GPUS=$(nvidia-smi --query-gpu=name --format=csv,noheader | wc -l)
for py in $PY $VLLM_PY $VERL_PY; do
  $py -c "import sys, torch; print(sys.executable, 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
done

S_DIR=$($PY -c "from crossopd.models.hub import model_source; print(model_source('$STUDENT'))")
T_DIR=$($PY -c "from crossopd.models.hub import model_source; print(model_source('$TEACHER'))")
echo "student $S_DIR"; echo "teacher $T_DIR"
plain=()
if [ -z "$($PY -c "from crossopd.models.hub import load_hf_tokenizer as t; print(t('$T_DIR').chat_template or '')")" ]; then
  plain=("teacher.plain_template=Question: {prompt}
Answer:" "teacher.stop=

Question:")  # a base model: the demo's plain format
fi

# GPU memory, sampled for the whole check; each run's rows are timed as they arrive
nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 250 \
  > "$OUT/gpu_mem.csv" &
SMI_PID=$!
VLLM_PID=
trap 'kill $SMI_PID $VLLM_PID 2>/dev/null || true' EXIT

watch_rows() {  # FILE LOG: the time each new line of FILE arrives, until killed
  local n=0
  while true; do
    m=$(wc -l < "$1" 2>/dev/null || echo 0)
    if [ "$m" -gt "$n" ]; then echo "$(date +%s.%N) $m" >> "$2"; n=$m; fi
    sleep 0.5
  done
}

per_step() {  # CHECK METRICS ARRIVALS KIND: one JSON line per step
  $PY - "$@" "$OUT/gpu_mem.csv" <<'EOF'
import datetime, json, sys
check, metrics, arrivals, kind, mem = sys.argv[1:6]
rows = [json.loads(x) for x in open(metrics) if x.strip()]
if kind == "verl":  # verl's file logger: {"step", "data"}; validation rows have no step time
    rows = [dict(r["data"], step=r["step"]) for r in rows if "timing_s/step" in r["data"]]
times = [float(x.split()[0]) for x in open(arrivals)]
samples = []
for line in open(mem):
    stamp, used = [v.strip() for v in line.split(",")]
    t = datetime.datetime.strptime(stamp, "%Y/%m/%d %H:%M:%S.%f").timestamp()
    samples.append((t, int(used)))
steps = []
for i, r in enumerate(rows):
    step_s = r["time/step_s"] if kind == "trl" else r["timing_s/step"]
    tokens = r["response_tokens"] if kind == "trl" else r["response_length/mean"] * r.get("opd/sequences", 1)
    end = times[min(i, len(times) - 1)] if times else None
    peak = max((u for t, u in samples if end and end - step_s - 1 <= t <= end + 0.5), default=None)
    line = {"check": check, "step": r["step"], "step_s": round(step_s, 3),
            "tok_per_s": round(tokens / step_s, 1) if step_s else None, "peak_gpu_mem_mib": peak}
    print(json.dumps(line)); steps.append(line)
steady = steps[1:] or steps
print(json.dumps({"check": check, "steps": len(steps),
                  "step_s": round(sum(s["step_s"] for s in steady) / max(len(steady), 1), 3),
                  "peak_gpu_mem_mib": max((s["peak_gpu_mem_mib"] or 0 for s in steps), default=None)}))
EOF
}

# 1. the teacher behind vLLM (a quarter of the GPU; the student's colocated vLLM takes another)
LD_PRELOAD= $VLLM_PY -m vllm.entrypoints.openai.api_server --model "$T_DIR" \
  --served-model-name teacher --port "$PORT" --gpu-memory-utilization 0.2 --max-model-len 4096 \
  > "$OUT/vllm_teacher.log" 2>&1 &
VLLM_PID=$!
for _ in $(seq 1 240); do
  curl -sf "http://127.0.0.1:$PORT/v1/models" > /dev/null && break
  kill -0 $VLLM_PID 2>/dev/null || { tail -40 "$OUT/vllm_teacher.log"; exit 1; }
  sleep 2
done
echo "vLLM teacher ready on :$PORT"

# 2. the TRL engine, vLLM colocate rollouts, bf16 (in the vLLM environment, as vLLM needs)
watch_rows "$OUT/trl/metrics.jsonl" "$OUT/trl_arrivals.txt" & W=$!
$VLLM_PY -m crossopd train --no-progress \
    engine=trl "student.model=$S_DIR" student.dtype=bfloat16 \
    "teacher.urls=http://127.0.0.1:$PORT/v1" teacher.served_name=teacher "teacher.tokenizer=$T_DIR" \
    "${plain[@]}" data.path=bundled:arith rollout.backend=vllm rollout.vllm_mode=colocate \
    rollout.samples_per_prompt=4 "rollout.max_new_tokens=$MAX_NEW" batch_size=16 \
    "steps=$STEPS" eval_prompts=0 "output_dir=$OUT/trl" \
    "trl={vllm_gpu_memory_utilization: 0.3, vllm_max_model_length: 2048}" > "$OUT/trl.log" 2>&1 \
  || { kill $W; tail -40 "$OUT/trl.log"; exit 1; }
kill $W
per_step trl "$OUT/trl/metrics.jsonl" "$OUT/trl_arrivals.txt" trl

# 3. verl's own trainer on the GPU, crossopd's HTTP teacher: the one-GPU launch, scaled down
smoke=($VERL_PY -m crossopd.integrations.verl.smoke --device cuda --student "$S_DIR"
       --teacher "$T_DIR" --steps "$STEPS" --max-new-tokens "$MAX_NEW" --batch 16
       --out "$OUT/verl" --json)
watch_rows "$OUT/verl/http/metrics.jsonl" "$OUT/verl_http_arrivals.txt" & W=$!
"${smoke[@]}" --teacher-mode http --teacher-url "http://127.0.0.1:$PORT/v1" \
    --served-name teacher > "$OUT/verl_http.json" 2> "$OUT/verl_http.err" \
  || { kill $W; tail -20 "$OUT/verl_http.err"; tail -60 "$OUT/verl/http/verl.log"; exit 1; }
kill $W
per_step verl_http "$OUT/verl/http/metrics.jsonl" "$OUT/verl_http_arrivals.txt" verl
tail -1 "$OUT/verl_http.json"

# 4. verl's teacher pool: a GPU of its own beside the trainer's
kill $VLLM_PID 2>/dev/null || true
if [ "$GPUS" -ge 2 ]; then
  watch_rows "$OUT/verl/pool/metrics.jsonl" "$OUT/verl_pool_arrivals.txt" & W=$!
  "${smoke[@]}" --teacher-mode pool > "$OUT/verl_pool.json" 2> "$OUT/verl_pool.err" \
    || { kill $W; tail -20 "$OUT/verl_pool.err"; tail -60 "$OUT/verl/pool/verl.log"; exit 1; }
  kill $W
  per_step verl_pool "$OUT/verl/pool/metrics.jsonl" "$OUT/verl_pool_arrivals.txt" verl
  tail -1 "$OUT/verl_pool.json"
else
  echo '{"check": "verl_pool", "skipped": "verl'"'"'s teacher pool takes a GPU of its own (distillation.n_gpus_per_node >= 1) beside the trainer'"'"'s; this machine has one"}'
fi
