"""Spec-Bench: every method over the same questions in one process, interleaved question by question (the methods'
order rotates per question), so that the machine's drift over a long run does not bias one method's ratio.

  python -m experiments.specbench --methods=ar,pld,hd --limit=5 --subset=stratified --max_new_tokens=256 \
      --out_dir=results/specbench
  python experiments/specbench.py ...     (the same, from any directory)

Writes DIR/<method>.jsonl (Spec-Bench answer format plus token ids and the method's stats per turn),
DIR/summary.json (per-category and overall speedup by Spec-Bench's rule: per-question tokens/s averaged, as a
ratio to `ar`; τ; drafting share; identical-output rate against `ar`), DIR/speedup.png and
DIR/accept_lengths.png (histogram of tokens emitted per step).
Multi-turn questions go through the chat template, turn 2 including the model's own turn-1 answer. Before the
timed runs each method generates once per distinct prompt shape (warm-up), so compilation is excluded; the warm-up
prints its progress per method and shape, and summary.json's "compile" holds each method's programs compiled,
programs loaded from the persistent compilation cache and seconds.
"""

from __future__ import annotations

import functools
import os
import sys

if __package__ in (None, ""):  # started as `python experiments/X.py`: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from typing import Any, Sequence
from absl import flags
import hdjax
from experiments import multihost
from experiments.common import (SPEC_BENCH_QUESTIONS, at_least, check_memory_maps, check_output_dir, device_name,
                                each_shape, parse_method_options, print_start, read_questions, require, run_main,
                                speed_dtype, write_json_atomic, write_jsonl_atomic)
from hdjax import compilation
from hdjax.decoding import speculative
from hdjax.errors import HdjaxError
from experiments.specbench_lib import select_questions, answer, warmup_prompts, answer_row, summarize, plot_speedups, \
    plot_accept_lengths

FLAGS = flags.FLAGS
flags.DEFINE_string("questions", SPEC_BENCH_QUESTIONS, "Spec-Bench question file.")
flags.DEFINE_string("methods", "ar,pld,hd", "Comma-separated decoding methods; `ar` is the reference.")
flags.DEFINE_integer("limit", None, "Questions to run, >= 1 (default: all); with --subset=stratified, per category.")
flags.DEFINE_enum("subset", "first", ["first", "stratified"], "first: the first N; stratified: N per category.")
flags.DEFINE_integer("max_new_tokens", 256, "New tokens per turn (>= 1).")
flags.DEFINE_integer("max_turns", None, "Turns per question, >= 1 (default: all; 1 = first turn only).")
flags.DEFINE_float("temperature", 0.0, "Finite, >= 0; 0 is greedy.")
flags.DEFINE_integer("top_k", 0, "Sample among the top k tokens, in [0, vocabulary size]; 0 = off.")
flags.DEFINE_float("top_p", 1.0, "Sample among the smallest set of tokens holding this mass, in (0, 1]; 1 = off.")
flags.DEFINE_integer("seed", 0, "Sampling seed (per question: seed + question index).")
flags.DEFINE_string("model", "smollm2-135m", "Model name or path.")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                  "Weight dtype (bf16: fp32 accumulation and residual stream); auto: bf16 on an accelerator or a CPU "
                  "with bf16 units, else fp32 (`common.speed_dtype`). Every method returns `ar`'s tokens in either.")
flags.DEFINE_string("method_options", "{}", 'JSON {method: {option: value}}, e.g. {"hd": {"max_depth": 3}}.')
flags.DEFINE_string("out_dir", "results/specbench", "Output directory.")



def main(argv: Sequence[str]) -> None:
  del argv
  info = multihost.initialize_from_flags()
  methods = [m.strip() for m in FLAGS.methods.split(",") if m.strip()]
  if not methods or len(set(methods)) != len(methods):
    raise HdjaxError(f"--methods must name distinct methods, got {FLAGS.methods!r}")
  unknown = [m for m in methods if m not in hdjax.METHODS]
  if unknown:
    raise HdjaxError(f"unknown method(s) {', '.join(unknown)}; available: {', '.join(sorted(hdjax.METHODS))}")
  require(limit=(1 if FLAGS.limit is None else FLAGS.limit, at_least(1)),
          max_turns=(1 if FLAGS.max_turns is None else FLAGS.max_turns, at_least(1)),
          max_new_tokens=(FLAGS.max_new_tokens, at_least(1)), temperature=(FLAGS.temperature, at_least(0)),
          top_k=(FLAGS.top_k, at_least(0)))
  if not 0 < FLAGS.top_p <= 1:
    raise HdjaxError(f"--top_p must be in (0, 1], got {FLAGS.top_p}")
  sampling = dict(temperature=FLAGS.temperature, top_k=FLAGS.top_k, top_p=FLAGS.top_p)
  method_options = parse_method_options(FLAGS.method_options, methods)
  questions = select_questions(read_questions(FLAGS.questions), FLAGS.limit, FLAGS.subset)
  check_output_dir(FLAGS.out_dir, [f"{m}.jsonl" for m in methods] + ["summary.json", "speedup.png",
                                                                     "accept_lengths.png"])
  dtype = speed_dtype(FLAGS.dtype)
  print_start("specbench", model=FLAGS.model, dtype=dtype, methods=",".join(methods), questions=len(questions),
              max_new_tokens=FLAGS.max_new_tokens)
  lm = hdjax.load(FLAGS.model, dtype=dtype)
  model_id = os.path.basename(FLAGS.model)
  prompts = warmup_prompts(lm, questions, FLAGS.max_new_tokens, FLAGS.max_turns)
  print(f"warm-up: {len(prompts)} prompt shapes for each of {len(methods)} methods", flush=True)

  def warm(method: str, prompt: list[int]) -> None:
    lm.generate([prompt], method=method, max_new_tokens=FLAGS.max_new_tokens, seed=FLAGS.seed, warmup=True,
                **sampling, **method_options.get(method, {}))
    check_memory_maps()

  compiled = {}
  for method in methods:
    with speculative.database_scope(method):
      _, compiled[method] = each_shape(method, prompts, functools.partial(warm, method))
  speculative.reset_databases(read_only_too=False)  # warm-up answers must not seed the online model databases

  def one_question(n: int, q: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every method on question n, in an order rotated per question, each with its own model database."""
    rows = {}
    for method in methods[n % len(methods):] + methods[:n % len(methods)]:
      traces = sum(compilation.TRACE_COUNTS.values())
      with speculative.database_scope(method):
        turns = answer(lm, method, q["turns"][:FLAGS.max_turns], FLAGS.max_new_tokens, sampling, FLAGS.seed + n,
                       method_options.get(method, {}))
      rows[method] = row = answer_row(q, method, model_id, turns)
      c = row["choices"][0]
      c["compiled_during_timing"] = sum(compilation.TRACE_COUNTS.values()) != traces
      print(f"{method} {q['category']} q{q['question_id']}: {sum(c['new_tokens'])} tokens "
            f"{sum(c['new_tokens']) / sum(c['wall_time']):.1f} tok/s", flush=True)
    return rows

  per_question = multihost.run_split(questions, one_question, info)
  rows_by_method = {method: [rows[method] for rows in per_question] for method in methods}
  if info.is_main:
    for method, rows in rows_by_method.items():
      write_jsonl_atomic(os.path.join(FLAGS.out_dir, f"{method}.jsonl"), rows)
  summary = summarize(rows_by_method)
  # the draft sources each method used: a database that failed to load (warned once on stderr) is missing here
  summary["sources"] = {m: sorted({st["sources"] for r in rows for st in r["choices"][0]["stats"] if "sources" in st})
                        for m, rows in rows_by_method.items()}
  summary["compile"] = {method: count.as_dict() for method, count in compiled.items()}  # the warm-up's, per method
  summary["settings"] = dict(questions=FLAGS.questions, methods=methods, limit=FLAGS.limit, subset=FLAGS.subset,
                             max_new_tokens=FLAGS.max_new_tokens, max_turns=FLAGS.max_turns,
                             **sampling, model=FLAGS.model, dtype=dtype,
                             device=device_name(),
                             method_options=method_options, num_questions=len(questions))
  if info.is_main:
    write_json_atomic(os.path.join(FLAGS.out_dir, "summary.json"), summary)
    plot_speedups(summary, os.path.join(FLAGS.out_dir, "speedup.png"))
    plot_accept_lengths(rows_by_method, os.path.join(FLAGS.out_dir, "accept_lengths.png"))
  for method, cats in summary["methods"].items():
    o = cats["overall"]
    share = "on device" if o["draft_share"] is None else f"{o['draft_share']:.3f}"
    syncs = "-" if o["host_syncs_per_turn"] is None else f"{o['host_syncs_per_turn']:.1f}"
    print(f"{method:12s} speedup {o.get('speedup', float('nan')):.2f}x  tau {o['tau']:.2f}  draft share {share:>9s}  "
          f"host syncs/turn {syncs:>5s}  identical {o.get('identical_rate', float('nan')):.2f}  warm-up "
          f"compile {compiled[method].seconds:.0f} s ({compiled[method].programs} programs)")


if __name__ == "__main__":
  run_main(main)
