#!/usr/bin/env bash
# The accelerator check in one go, on a fresh GPU machine with the image's own jax (no `make setup` there):
#
#   bash experiments/device_suite.sh [--dry_run] OUT_DIR [PART...]
#
# Parts (default: all, in this order), each launcher under its own time limit, its output shown as it comes and kept
# in OUT_DIR/<run>.log, then a summary of every run's exit status (124: timed out; 3: the model is missing):
#   steps      decode vs tree-verify step latency, random weights, bf16, SmolLM2-135M shape at T = 1, 4, 16, 64 (B = 1)
#              and T = 1, 16, 64 (B = 8), with a jax.profiler profile of decode, verify and `ar`'s token loop
#              (kernels per call, device busy time against wall time)
#   steps7b    the same for the LLaMA-2-7B shape at T = 1, 16, 64 over a 1,024-token prefix (B = 1, profiled)
#   specbench  18 Spec-Bench questions (3 per category, first turn, 128 tokens), ar, pld, hd, adadecode and
#              hd+adadecode, bf16: speedups over `ar` and how many outputs are identical to `ar`'s
#   hf         `ar` and `hd` against HF transformers `generate` on the same device and GGUF, bf16: greedy and prompt
#              lookup, tok/s and identical counts (4 questions, 128 tokens)
#   batch      batched `hd` against batched `ar` at B = 1, 8, 16, bf16
#   lazy       LazyLLM's TTFT against full prefill and HF transformers' prefill on the same device, passkey prompts
#              of ~4k and ~8k tokens built from XSum (SmolLM2's context is 8,192 tokens), 2 each
# In a 15-minute lease the model travels in three parts, one per call: `steps`, then `steps7b`, then
# `specbench hf batch` (or `lazy`), back to back (an H200 took ~35 s to start, 97 s for `steps`, 51 s for
# `steps7b`; each prompt shape compiles in ~11 s per method there, hence 18 questions: 3 prompt shapes).
# --dry_run: the same parts with tiny settings (the tiny preset for the step tables, 1-2 questions, 8 tokens,
# B = 1, 2; HF in fp32) that run on a CPU in a few minutes; the test suite runs it (tests/test_device_suite.py).
#
# Environment: MODEL (default smollm2-135m), QUESTIONS (default: the repository's data/spec_bench/question.jsonl),
# XSUM (default: its data/xsum/test.jsonl), PYTHON (default .venv/bin/python where it exists, else python3).
# specbench, hf and batch need the real model: on a machine without it, upload the parts that the project's upload
# helper (device/model_parts.sh, a development aid kept outside the repository) writes and
# `source .device-model/assemble.sh partN` for N = 1, 2, 3.
set -u
dry_run=0
if [ "${1:-}" = --dry_run ]; then
  dry_run=1
  shift
fi
if [ $# -lt 1 ] || [[ $1 == -* ]]; then
  echo "usage: bash $0 [--dry_run] OUT_DIR [PART...]   (parts: steps steps7b specbench hf batch lazy; default all)" >&2
  exit 2
fi
out=$1
shift
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(steps steps7b specbench hf batch lazy)
for name in "${parts[@]}"; do
  case $name in
    steps | steps7b | specbench | hf | batch | lazy) ;;
    *) echo "error: unknown part '$name' (parts: steps steps7b specbench hf batch lazy)" >&2; exit 2 ;;
  esac
done
if [ -x .venv/bin/python ]; then py=${PYTHON:-.venv/bin/python}; else py=${PYTHON:-python3}; fi
model=${MODEL:-smollm2-135m}
data=$(cd "$(dirname "$0")/.." && pwd)/data
questions=${QUESTIONS:-$data/spec_bench/question.jsonl}
xsum=${XSUM:-$data/xsum/test.jsonl}
mkdir -p "$out" || exit 2
export PYTHONUNBUFFERED=1 HF_HUB_DISABLE_PROGRESS_BARS=1
summary=()
failed=0

run() {  # run NAME SECONDS MODULE FLAGS...: one launcher under `timeout`, its output shown and kept in OUT_DIR/NAME.log
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit} s): $py -m $*"
  local start=$SECONDS
  timeout -k 10 "$limit" "$py" -m "$@" 2>&1 | tee "$out/$name.log"
  local rc=${PIPESTATUS[0]}
  summary+=("$(printf '%-16s exit %3d  %4d s' "$name" "$rc" $((SECONDS - start)))")
  [ "$rc" = 0 ] || failed=1
}

skip() {  # skip NAME WHY: a run that cannot start here, reported in the summary with exit 3
  echo "== $1: skipped: $2"
  summary+=("$(printf '%-16s exit %3d  skipped: %s' "$1" 3 "$2")")
  failed=1
}

missing_inputs() {  # missing_inputs PART: why the real model or the part's data are not usable here, or nothing
  if [ "$1" != lazy ] && [ ! -f "$questions" ]; then
    echo "no Spec-Bench question file (set QUESTIONS=.../question.jsonl)"
  elif [ "$1" = lazy ] && [ ! -f "$xsum" ]; then
    echo "no XSum file (set XSUM=.../test.jsonl)"
  elif ! "$py" -c "import gguf; from hdjax.api import resolve_path; resolve_path('$model')" >/dev/null 2>&1; then
    echo "model $model or the gguf package is not here: run \`source .device-model/assemble.sh partN\` for N = 1, 2, 3 (parts written by the upload helper device/model_parts.sh)"
  fi
}

echo "device suite: parts ${parts[*]}$([ $dry_run = 1 ] && echo ' (dry run)'); python $py; model $model;" \
  "questions $questions; xsum $xsum; logs in $out"
if [ $dry_run = 1 ]; then
  steps_small=(--model=tiny --random_weights --dtype=bfloat16 --nodes=1,2 --prefix=16 --warmup=1 --repeats=2
               --profile=2)
  steps_batch=("${steps_small[@]}" --batch=2 --profile=0)
  steps_large=("${steps_small[@]}")
  spec=(--limit=1 --max_turns=1 --max_new_tokens=8 --methods=ar,pld)
  peers=(--dtypes=float32 --limit=2 --max_new_tokens=4)  # HF computes a bf16 GGUF model in fp32 on a CPU: slow
  batch=(--batches=1,2 --max_new_tokens=8)
  lazy=(--lengths=256 --num=1 --max_new_tokens=4)
  limit=300
else
  steps_small=(--model=smollm2-135m --random_weights --dtype=bfloat16 --nodes=1,4,16,64 --profile=32)
  steps_batch=(--model=smollm2-135m --random_weights --dtype=bfloat16 --nodes=1,16,64 --batch=8)
  steps_large=(--model=llama-2-7b --random_weights --dtype=bfloat16 --nodes=1,16,64 --prefix=1024 --profile=16)
  spec=(--limit=3 --subset=stratified --max_turns=1 --max_new_tokens=128 --methods=ar,pld,hd,adadecode,hd+adadecode)
  peers=(--dtypes=bfloat16 --limit=4 --max_new_tokens=128)
  batch=(--batches=1,8,16 --max_new_tokens=64)
  lazy=(--lengths=4096,8000 --num=2 --max_new_tokens=16)
  limit=0
fi
for name in "${parts[@]}"; do
  case $name in
    steps)
      run steps_smollm2 $((limit ? limit : 90)) experiments.bench_steps "${steps_small[@]}" \
        --out="$out/steps_smollm2.json"
      run steps_smollm2_b8 $((limit ? limit : 60)) experiments.bench_steps "${steps_batch[@]}" \
        --out="$out/steps_smollm2_b8.json" ;;
    steps7b)
      run steps_llama2_7b $((limit ? limit : 120)) experiments.bench_steps "${steps_large[@]}" \
        --out="$out/steps_llama2_7b.json" ;;
    specbench | hf | batch | lazy)
      why=$(missing_inputs "$name")
      if [ -n "$why" ]; then
        skip "$name" "$why"
        continue
      fi
      case $name in
        specbench)
          run specbench $((limit ? limit : 240)) experiments.specbench --model="$model" --questions="$questions" \
            --dtype=bfloat16 "${spec[@]}" --out_dir="$out/specbench" ;;
        hf)
          run hf $((limit ? limit : 120)) experiments.bench_peers --stage=decode --model="$model" --questions="$questions" \
            --methods=ar,hd "${peers[@]}" --out="$out/hf.json" ;;
        batch)
          run batch $((limit ? limit : 120)) experiments.bench_batch --model="$model" --questions="$questions" \
            --dtype=bfloat16 --methods=hd "${batch[@]}" --out="$out/batch.json" ;;
        lazy)
          run lazy $((limit ? limit : 150)) experiments.longctx --model="$model" --xsum="$xsum" --build=passkey \
            --methods=full,lazy --hf "${lazy[@]}" --out_dir="$out/lazy" ;;
      esac ;;
  esac
done
echo "== summary ($out)"
printf '%s\n' "${summary[@]}"
exit $failed
