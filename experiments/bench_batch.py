"""Batched speculative decoding: decode throughput (new tokens/s over the whole batch, prefill excluded) of each
method against batched `ar` at batch sizes B, on the same B Spec-Bench prompts, in one process.

  python -m experiments.bench_batch --batches=1,4,8,16 --methods=hd,pld --max_new_tokens=64 \
      --out=results/bench_batch.json

Each (method, B) runs once untimed (compiles every shape it will use) and then `--repeats` timed runs; the median
is reported. Every sequence's greedy output is compared with batched `ar`'s for the same prompt in the same run.
Writes the JSON and a PNG of throughput against B next to it. Also runs as `python experiments/bench_batch.py ...`.
"""

from __future__ import annotations

import collections
import itertools
import os
import sys

if __package__ in (None, ""):  # started as `python experiments/X.py`: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np
from absl import flags

import hdjax
from experiments.common import (SPEC_BENCH_QUESTIONS, at_least, check_output_file, compiled_text, device_name, int_list,
                                print_start, pyplot, read_questions, require, run_main, speed_dtype, write_json_atomic)
from experiments.specbench_lib import spec_bench_category
from hdjax import compilation
from hdjax.decoding import speculative
from hdjax.errors import HdjaxError

flags.DEFINE_string("questions", SPEC_BENCH_QUESTIONS, "Spec-Bench question file.")
flags.DEFINE_list("batches", ["1", "4", "8", "16"], "Batch sizes B.")
flags.DEFINE_list("methods", ["hd"], "Methods compared with batched `ar`.")
flags.DEFINE_list("categories", [], "Spec-Bench categories to draw prompts from (default: all six).")
flags.DEFINE_integer("max_new_tokens", 64, "New tokens per sequence.")
flags.DEFINE_integer("repeats", 1, "Timed runs per (method, B); the median is reported.")
flags.DEFINE_string("model", "smollm2-135m", "Model name or path.")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                  "Weight dtype (bf16: fp32 accumulation and residual stream); auto: bf16 on an accelerator or a CPU "
                  "with bf16 units, else fp32 (`common.speed_dtype`). Every method returns `ar`'s tokens in either.")
flags.DEFINE_string("out", "results/bench_batch.json", "Output JSON (the plot goes next to it as .png).")

FLAGS = flags.FLAGS


def batch_questions(questions: list[dict], batch: int, categories: list[str]) -> list[dict]:
  """`batch` questions taken round-robin over Spec-Bench's categories (or the given ones)."""
  by_category = collections.defaultdict(list)
  for q in questions:
    if not categories or spec_bench_category(q["category"]) in categories:
      by_category[spec_bench_category(q["category"])].append(q)
  if sum(map(len, by_category.values())) < batch:
    raise HdjaxError(f"only {sum(map(len, by_category.values()))} questions in categories {categories}, need {batch}")
  round_robin = [q for group in itertools.zip_longest(*by_category.values()) for q in group if q is not None]
  return round_robin[:batch]


def timed(lm: hdjax.LM, method: str, prompts: list[list[int]], max_new: int, repeats: int
          ) -> tuple[float, list[hdjax.GenerationResult], compilation.CompileCount]:
  """Median decode-phase seconds (wall time after the first token) over `repeats` runs after one untimed run, the
  last run's results, and what the untimed run compiled."""
  with compilation.track() as compiled:
    lm.generate(prompts, method=method, max_new_tokens=max_new)
  walls, results = [], []
  for _ in range(repeats):
    speculative.reset_databases(read_only_too=False)  # every repeat starts from the same persisted databases
    results = lm.generate(prompts, method=method, max_new_tokens=max_new)
    walls.append(results[0].stats["total_s"] - results[0].stats["ttft_s"])
  return float(np.median(walls)), results, compiled.count()


def plot(rows: list[dict], path: str) -> None:
  plt = pyplot(path)
  if plt is None:
    return
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for method in dict.fromkeys(r["method"] for r in rows):
    pts = [(r["batch"], r["tokens_per_s"]) for r in rows if r["method"] == method]
    ax.plot(*zip(*pts), "o-", label=method)
  ax.set_xlabel("batch size B")
  ax.set_ylabel("decode tokens / s (whole batch)")
  ax.set_xscale("log", base=2)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  del argv
  batches = sorted(set(int_list("batches", FLAGS.batches)))
  unknown = [m for m in FLAGS.methods if m not in hdjax.METHODS]
  if unknown:
    raise HdjaxError(f"unknown method(s) {unknown}; available: {', '.join(sorted(hdjax.METHODS))}")
  require(max_new_tokens=(FLAGS.max_new_tokens, at_least(1)), repeats=(FLAGS.repeats, at_least(1)))
  questions = read_questions(FLAGS.questions)
  chosen = {batch: batch_questions(questions, batch, FLAGS.categories) for batch in batches}
  check_output_file(FLAGS.out)
  dtype = speed_dtype(FLAGS.dtype)
  print_start("bench_batch", model=FLAGS.model, dtype=dtype, methods=",".join(["ar", *FLAGS.methods]),
              batches=",".join(map(str, batches)), max_new_tokens=FLAGS.max_new_tokens)
  lm = hdjax.load(FLAGS.model, dtype=dtype)
  rows = []
  for batch in batches:
    prompts = [lm.tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}]) for q in chosen[batch]]
    ar_wall, ar_res, compiled = timed(lm, "ar", prompts, FLAGS.max_new_tokens, FLAGS.repeats)
    ar_tokens = sum(len(r.token_ids) - 1 for r in ar_res)  # the first token comes from the prefill
    rows.append(dict(method="ar", batch=batch, decode_s=ar_wall, new_tokens=ar_tokens,
                     tokens_per_s=ar_tokens / ar_wall, compile=compiled.as_dict()))
    print(f"B={batch:<3d} {'ar':10s} {rows[-1]['tokens_per_s']:7.1f} tok/s  ({compiled_text(compiled)})", flush=True)
    for method in FLAGS.methods:
      wall, res, compiled = timed(lm, method, prompts, FLAGS.max_new_tokens, FLAGS.repeats)
      tokens = sum(len(r.token_ids) - 1 for r in res)
      row = dict(method=method, batch=batch, decode_s=wall, new_tokens=tokens, tokens_per_s=tokens / wall,
                 throughput_vs_ar=(tokens / wall) / (ar_tokens / ar_wall),
                 tau=float(np.mean([r.stats.get("tau", 1.0) for r in res])),
                 identical_to_ar=float(np.mean([r.token_ids == a.token_ids for r, a in zip(res, ar_res)])),
                 compile=compiled.as_dict())
      rows.append(row)
      print(f"B={batch:<3d} {method:10s} {row['tokens_per_s']:7.1f} tok/s  {row['throughput_vs_ar']:.2f}x ar  "
            f"tau {row['tau']:.2f}  identical {row['identical_to_ar']:.2f}  ({compiled_text(compiled)})", flush=True)
  write_json_atomic(FLAGS.out, dict(model=FLAGS.model, dtype=dtype, device=device_name(),
                                    max_new_tokens=FLAGS.max_new_tokens, repeats=FLAGS.repeats, rows=rows))
  plot(rows, os.path.splitext(FLAGS.out)[0] + ".png")


if __name__ == "__main__":
  run_main(main)
