"""hdjax against HF transformers on the same GGUF, same machine, one run, systems alternating per item.

  python -m experiments.bench_peers --stage=decode --limit=10 --max_new_tokens=128 --out=results/peers_decode.json
  python -m experiments.bench_peers --stage=prefill --lengths=512,2048,4096,8192 --plot=results/prefill_vs_hf.png

decode: for every dtype, Spec-Bench questions (first turn, chat template) decoded greedily by HF `generate`, HF prompt
  lookup (`prompt_lookup_num_tokens=10`) and each hdjax method (default ar, pld, hd), in an order rotated per
  question, after a warm-up that compiles every prompt shape (the first method on every question, the others once
  per shape). Every system makes the same number of tokens per question: HF exactly as many as hdjax's first
  method (`min_new_tokens`), so an output that ends early in one dtype does not tilt the ratio. Reports tok/s
  (all tokens over all seconds, prefill included), ratios to hdjax `ar` and to HF greedy, and how many outputs
  equal hdjax `ar`'s (HF's prompt lookup: HF greedy's).
prefill: time to first token (`max_new_tokens=1`) of hdjax `ar`, `full` and `lazy` and of HF `generate` on prompts
  of real text (XSum articles) cut to each length, medians of --repeats after one warm-up, systems alternating.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # started as `python experiments/X.py`: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import statistics
from typing import Any, Callable

from absl import flags

from experiments.common import (SPEC_BENCH_QUESTIONS, XSUM_ARTICLES, at_least, check_output_file, int_list, print_start,
                                pyplot, read_questions, read_records, require, run_main, write_json_atomic)
from hdjax.errors import HdjaxError

flags.DEFINE_enum("stage", "decode", ["decode", "prefill"], "what to compare")
flags.DEFINE_string("model", "smollm2-135m", "model name or GGUF path (HF loads the same file)")
flags.DEFINE_list("dtypes", ["float32", "bfloat16"], "dtypes, each run by both systems")
flags.DEFINE_list("methods", ["ar", "pld", "hd"], "decode: hdjax methods (ar first is the reference)")
flags.DEFINE_string("questions", SPEC_BENCH_QUESTIONS, "decode: Spec-Bench question file")
flags.DEFINE_integer("limit", 10, "decode: questions, spread over the file (int >= 2)")
flags.DEFINE_integer("max_new_tokens", 128, "decode: new tokens per question (int >= 1)")
flags.DEFINE_list("lengths", ["512", "2048", "4096", "8192"], "prefill: prompt lengths in tokens (ints >= 1; "
                  "capped at the context minus one)")
flags.DEFINE_string("articles", XSUM_ARTICLES, "prefill: JSONL with a 'document' field whose text makes the prompts")
flags.DEFINE_integer("repeats", 3, "prefill: timed repeats per system and length (int >= 1)")
flags.DEFINE_string("out", None, "also write the results to this JSON file")
flags.DEFINE_string("plot", None, "prefill: also draw TTFT against prompt length to this PNG")
F = flags.FLAGS


def rotated(items: list, k: int) -> list:
  return items[k % len(items):] + items[:k % len(items)]


def spread(items: list, n: int) -> list:
  return items[::max(1, len(items) // n)][:n]


def hdjax_run(lm, method: str, new: int) -> Callable:
  """(ids, _) -> ([new token ids], wall seconds) of one hdjax request (its own model database per method)."""
  from hdjax.decoding import speculative  # pylint: disable=import-outside-toplevel

  def run(ids, _):
    with speculative.database_scope(method):
      res = lm.generate([ids], method=method, max_new_tokens=new)[0]
    return [res.token_ids], res.stats["total_s"]
  return run


def decode_stage(dtype: str, questions: list[dict[str, Any]]) -> list[dict[str, Any]]:
  import hdjax  # pylint: disable=import-outside-toplevel  (flags are checked before jax and torch load)
  from experiments.hf_peer import HFRunner  # pylint: disable=import-outside-toplevel
  from experiments.specbench_lib import warmup_prompts  # pylint: disable=import-outside-toplevel
  from hdjax.decoding import speculative  # pylint: disable=import-outside-toplevel
  lm = hdjax.load(F.model, dtype=dtype)
  hf = HFRunner(hdjax.api.resolve_path(F.model), dtype)
  n = F.max_new_tokens
  prompts = [lm.tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}]) for q in questions]
  # Warm-up: the reference method on every question (its output lengths), every other method once per compiled
  # prompt shape, HF once; then the model databases forget what the warm-up taught them.
  lengths = [len(hdjax_run(lm, F.methods[0], n)(ids, 0)[0][0]) for ids in prompts]
  for method in F.methods[1:]:
    for ids in warmup_prompts(lm, questions, n, max_turns=1):
      hdjax_run(lm, method, n)(ids, 0)
  hf.generate([prompts[0]], 2)
  speculative.reset_databases(read_only_too=False)
  systems: dict[str, Callable] = {
      "hf": lambda ids, new: hf.generate([ids], new, exact=True),
      "hf_prompt_lookup": lambda ids, new: hf.generate([ids], new, exact=True, prompt_lookup=10)}
  systems.update({m: hdjax_run(lm, m, n) for m in F.methods})
  names = list(systems)
  runs: dict[str, list[tuple[list[int], float]]] = {name: [] for name in names}
  for i, (ids, new) in enumerate(zip(prompts, lengths)):
    for name in rotated(names, i):
      rows, seconds = systems[name](ids, new)
      runs[name].append((rows[0], seconds))
    print(f"  {dtype} question {i + 1}/{len(questions)}", flush=True)
  ref_of = {name: "hf" if name.startswith("hf") else F.methods[0] for name in names}
  ar_vs_hf = sum(a[0] == b[0] for a, b in zip(runs[F.methods[0]], runs["hf"]))
  return [dict(dtype=dtype, system=name, tok_s=sum(len(ids) for ids, _ in runs[name]) / sum(s for _, s in runs[name]),
               identical=sum(a[0] == b[0] for a, b in zip(runs[name], runs[ref_of[name]])), of=len(runs[name]),
               identical_to=ref_of[name], hdjax_ar_vs_hf_identical=ar_vs_hf) for name in names]


def prompt_tokens(lm, n: int, articles: list[str]) -> list[int]:
  text = "\n\n".join(articles)
  ids = lm.tokenizer.encode(text)
  while len(ids) < n:
    ids = ids + ids
  return ids[:n]


def prefill_stage(dtype: str, lengths: list[int]) -> list[dict[str, Any]]:
  import hdjax  # pylint: disable=import-outside-toplevel
  from experiments.hf_peer import HFRunner  # pylint: disable=import-outside-toplevel
  lm = hdjax.load(F.model, dtype=dtype)
  hf = HFRunner(hdjax.api.resolve_path(F.model), dtype)
  articles = [r["document"] for _, r in read_records(F.articles)[:40] if isinstance(r.get("document"), str)]
  if not articles:
    raise HdjaxError(f"{F.articles}: no record has a 'document' string")
  out = []
  for n in lengths:
    n = min(n, lm.cfg.max_seq_len - 1)
    ids = prompt_tokens(lm, n, articles)
    systems: dict[str, Callable[[], float]] = {
        m: lambda m=m: lm.generate([ids], method=m, max_new_tokens=1)[0].stats["ttft_s"]
        for m in ("ar", "full", "lazy")}
    systems["hf"] = lambda: hf.generate([ids], 1)[1]
    names = list(systems)
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(F.repeats + 1):
      for name in rotated(names, r):
        seconds = systems[name]()
        if r:
          times[name].append(seconds)
    med = {name: statistics.median(t) for name, t in times.items()}
    for name in names:
      out.append(dict(dtype=dtype, tokens=n, system=name, ttft_s=med[name], speed_vs_hf=med["hf"] / med[name]))
    print("  " + "  ".join(f"{dtype} {n} {name} {med[name]:.2f}s" for name in names), flush=True)
  return out


def draw(rows: list[dict[str, Any]], path: str) -> None:
  plt = pyplot(path)
  if plt is None:
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for key in sorted({(r["dtype"], r["system"]) for r in rows}):
    pts = sorted((r["tokens"], r["ttft_s"]) for r in rows if (r["dtype"], r["system"]) == key)
    ax.plot(*zip(*pts), marker="o", label=f"{key[1]} ({key[0]})")
  ax.set(xscale="log", yscale="log", xlabel="prompt tokens", ylabel="time to first token (s)",
         title="Prefill: hdjax vs HF transformers")
  ax.legend(fontsize=7)
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.savefig(path, dpi=120)


def main(argv):
  del argv
  require(limit=(F.limit, at_least(2)), max_new_tokens=(F.max_new_tokens, at_least(1)),
          repeats=(F.repeats, at_least(1)))
  bad = sorted(set(F.dtypes) - {"float32", "bfloat16"})
  if bad or not F.dtypes:
    raise HdjaxError(f"--dtypes must be float32 and/or bfloat16, got {','.join(F.dtypes)!r}")
  lengths = int_list("lengths", F.lengths)
  for path in (F.out, F.plot):
    if path:
      check_output_file(path)
  print_start("bench_peers", stage=F.stage, model=F.model, dtypes=",".join(F.dtypes), methods=",".join(F.methods))
  if F.stage == "decode":
    questions = spread(read_questions(F.questions), F.limit)
    rows = [row for dtype in F.dtypes for row in decode_stage(dtype, questions)]
    print(f"{'dtype':<9} {'system':<17} {'tok/s':>7} {'vs ar':>6} {'vs HF':>6}  identical")
    for row in rows:
      ar_tps = next(r["tok_s"] for r in rows if r["dtype"] == row["dtype"] and r["system"] == F.methods[0])
      hf_tps = next(r["tok_s"] for r in rows if r["dtype"] == row["dtype"] and r["system"] == "hf")
      row.update(vs_ar=row["tok_s"] / ar_tps, vs_hf=row["tok_s"] / hf_tps)
      print(f"{row['dtype']:<9} {row['system']:<17} {row['tok_s']:>7.1f} {row['vs_ar']:>5.2f}x {row['vs_hf']:>5.2f}x  "
            f"{row['identical']}/{row['of']} to {row['identical_to']}")
    print(f"hdjax {F.methods[0]} output == HF greedy output: " + ", ".join(
        f"{d} {next(r['hdjax_ar_vs_hf_identical'] for r in rows if r['dtype'] == d)}/{rows[0]['of']}"
        for d in F.dtypes))
  else:
    rows = [row for dtype in F.dtypes for row in prefill_stage(dtype, lengths)]
    print(f"{'dtype':<9} {'tokens':>6} {'system':<6} {'TTFT s':>8} {'speed vs HF':>12}")
    for row in rows:
      print(f"{row['dtype']:<9} {row['tokens']:>6} {row['system']:<6} {row['ttft_s']:>8.2f} "
            f"{row['speed_vs_hf']:>11.2f}x")
    if F.plot:
      draw(rows, F.plot)
  if F.out:
    write_json_atomic(F.out, dict(stage=F.stage, model=F.model, rows=rows))


if __name__ == "__main__":
  run_main(main)
