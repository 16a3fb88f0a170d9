#!/usr/bin/env bash
# The accelerator figures of README "On an H100 GPU", in one go, each part under its own time limit:
#
#   bash experiments/device_suite.sh MODEL QUESTIONS OUT_DIR PART...
#
# MODEL is smollm2-135m or a path to its GGUF, QUESTIONS Spec-Bench's question.jsonl. Parts:
#   steps_random  decode vs tree-verify step latency with random weights: SmolLM2-135M shape in bf16 and fp32,
#                 LLaMA-2-7B shape in bf16, and SmolLM2 over a one-device jax.sharding.Mesh (the sharded path)
#   specbench     the 60 stratified Spec-Bench questions of the CPU table, every method, fp32
#   specbench_bf16  the same questions for ar, pld and hd in bf16
#   steps_real    step latency of the real model, with the projection from specbench's hd tau
#   batch         batched hd vs batched ar at B = 1, 4, 8, 16
# PART_TIMEOUT (seconds, default 240) bounds each part; a part that fails or times out is reported and the next runs.
set -u
if [ $# -lt 4 ]; then
  echo "usage: $0 MODEL QUESTIONS OUT_DIR PART..." >&2
  exit 2
fi
model=$1 questions=$2 out=$3
shift 3
py=${PYTHON:-python3}
mkdir -p "$out"

part() {  # part NAME MODULE FLAGS...: runs one launcher, logs to OUT_DIR/NAME.log, never stops the suite
  local name=$1
  shift
  echo "== $name: $*"
  local start=$SECONDS
  PYTHONUNBUFFERED=1 timeout "${PART_TIMEOUT:-240}" "$py" -m "$@" >"$out/$name.log" 2>&1
  local rc=$?
  grep -v -E "^(W|I)[0-9]{4}|tok/s$" "$out/$name.log" | tail -n 25
  echo "== $name: exit $rc after $((SECONDS - start)) s"
}

spec=(--questions="$questions" --limit=10 --subset=stratified --max_turns=1 --max_new_tokens=64)
for name in "$@"; do
  case $name in
    steps_random)
      part steps_smollm2_bf16 experiments.bench_steps --model=smollm2-135m --random_weights --dtype=bfloat16 \
        --nodes=1,2,4,8,16,32,64 --out="$out/steps_smollm2_bf16.json"
      part steps_smollm2_fp32 experiments.bench_steps --model=smollm2-135m --random_weights --dtype=float32 \
        --nodes=1,2,4,8,16,32,64 --out="$out/steps_smollm2_fp32.json"
      part steps_llama2_7b_bf16 experiments.bench_steps --model=llama-2-7b --dtype=bfloat16 \
        --nodes=1,2,4,8,16,32,64 --prefix=1024 --out="$out/steps_llama2_7b_bf16.json"
      part steps_mesh experiments.bench_steps --model=smollm2-135m --random_weights --mesh=1,1 --nodes=1,8 \
        --out="$out/steps_mesh.json" ;;
    specbench)
      part specbench experiments.specbench --model="$model" "${spec[@]}" \
        --methods=ar,pld,rest,hd,adadecode,hd+adadecode --out_dir="$out/specbench_60q" ;;
    specbench_bf16)
      part specbench_bf16 experiments.specbench --model="$model" "${spec[@]}" --dtype=bfloat16 \
        --methods=ar,pld,hd --out_dir="$out/specbench_60q_bf16" ;;
    steps_real)
      part steps_real experiments.bench_steps --model="$model" --nodes=1,2,4,8,16,32 --summary_nodes=8 \
        --summary="$out/specbench_60q/summary.json" --out="$out/steps_real.json" ;;
    batch)
      part batch experiments.bench_batch --model="$model" --questions="$questions" --batches=1,4,8,16 \
        --methods=hd --max_new_tokens=32 --categories=mt_bench,qa,math_reasoning --out="$out/bench_batch.json" ;;
    *)
      echo "unknown part: $name" >&2
      exit 2 ;;
  esac
done
