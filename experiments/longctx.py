"""Long-context evaluation of LazyLLM and its baselines: TTFT, total time, token-layers computed, task scores.

  python -m experiments.longctx --prompts=FILE --methods=full,lazy --out_dir=DIR
  python -m experiments.longctx --build=passkey,multidoc --lengths=2048,4096,7500 --num=8 --out_dir=DIR
  python experiments/longctx.py ...     (the same, from any directory)

`--build` writes DIR/prompts.jsonl from the XSum articles (passkey retrieval, multi-document summarization, and
multi-document question answering with exact-match answers: `multidoc_qa`) and runs it. Each prompt is one user
turn in the chat template. Every method is warmed up (compiled) on each prompt-length group first; then prompts run
one by one, each through every method in turn, so the methods see the same machine load. Writes DIR/<method>.jsonl,
DIR/summary.json, DIR/table.md (answers found, first-token agreement and token-layers computed per method) and
DIR/ttft.png.

`--pareto` also writes DIR/pareto.{json,md,png}: per prompt length, each method's median TTFT speedup against the
first method (full prefill) against the passkey and QA answers found and the first tokens equal to the first
method's, whether it is within one prompt of it (and >= 95% first tokens), the frontier, and the fastest schedule
within that rule. `--pareto_from=RUN_DIR` redraws them from a finished run's RUN_DIR/<method>.jsonl (same
--prompts and --methods) without loading the model:

  python -m experiments.longctx --prompts=FILE --methods=full,lazy@14:0.1:w16:p15:s6,... --pareto --out_dir=DIR
  python -m experiments.longctx --prompts=FILE --methods=... --pareto_from=DIR --out_dir=DIR2
"""

from __future__ import annotations

import functools
import os
import sys

if __package__ in (None, ""):  # started as `python experiments/X.py`: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags
from experiments import common
from hdjax.errors import HdjaxError
from experiments.longctx_lib import (accuracy_table, build_sets, check_build, pareto_points, pareto_table,
                                     parse_method, plot, plot_pareto, summarize)

FLAGS = flags.FLAGS
flags.DEFINE_string("prompts", None, "JSONL of {id, prompt, reference?, task?, answer?}")
flags.DEFINE_list("build", [], "build sets from --xsum instead: passkey, multidoc, multidoc_qa")
flags.DEFINE_list("lengths", ["2048", "4096", "7500"], "integers >= 1: prompt lengths in tokens (upper bounds) for "
                  "--build")
flags.DEFINE_integer("num", 8, "prompts per set and length for --build (>= 1)")
flags.DEFINE_string("xsum", common.XSUM_ARTICLES, "XSum JSONL {document, summary}")
flags.DEFINE_list("methods", ["full", "lazy"], "methods; agreement is measured against the first one. A lazy* "
                  "method may carry its own schedule, e.g. lazy@3-6-10-16:0.7-0.5-0.35-0.2 (layers:keep ratios), with "
                  "optional :wW:pP:sS:kK (score_window, score_pool, score_skip, keep_sinks)")
flags.DEFINE_string("out_dir", None, "output directory")
flags.DEFINE_integer("max_new_tokens", 64, "new tokens per prompt (>= 1)")
flags.DEFINE_integer("seed", 0, "seed for building sets")
flags.DEFINE_string("model", "smollm2-135m", "model name or path")
flags.DEFINE_bool("hf", False, "also time HF transformers' full prefill (generate with max_new_tokens=1, same GGUF "
                  "and dtype) on every prompt: the summary's ttft_speedup_vs_hf")
flags.DEFINE_list("prune_layers", None, "integers: LazyLLM pruning layers (lazy* methods)")
flags.DEFINE_list("keep_ratios", None, "numbers in (0, 1]: LazyLLM keep ratios, one per pruning layer")
flags.DEFINE_integer("min_prompt", None, "prompts shorter than this fall back to full prefill")
flags.DEFINE_integer("reselect_every", None, "decode steps between re-selections")
flags.DEFINE_integer("revive_budget", None, "tokens revived per pruning layer per re-selection")
flags.DEFINE_integer("score_window", None, "prompt tokens whose attention rows score the prompt (1: the last only)")
flags.DEFINE_integer("score_pool", None, "odd; max-pool scores over this many neighbouring positions (1: none)")
flags.DEFINE_integer("score_skip", None, "the observation window ends this many tokens before the last prompt token "
                     "(6 skips SmolLM2's chat-template assistant header)")
flags.DEFINE_integer("keep_sinks", None, "the first n prompt tokens are always kept")
flags.DEFINE_bool("pareto", False, "also write pareto.json, pareto.md and pareto.png (speedup vs accuracy)")
flags.DEFINE_string("pareto_from", None, "a finished run's directory: write the pareto files from its "
                    "<method>.jsonl (with --prompts and --methods) and run nothing")
flags.DEFINE_float("pareto_target", 2.3, "TTFT speedup the pareto note reports the most accurate schedule above")


def write_pareto(rows_by_method: dict, prompts: list, out_dir: str) -> None:
  points = pareto_points(rows_by_method, prompts)
  common.write_json_atomic(os.path.join(out_dir, "pareto.json"), dict(target=FLAGS.pareto_target, points=points))
  with open(os.path.join(out_dir, "pareto.md"), "w", encoding="utf-8") as f:
    f.write(pareto_table(points, FLAGS.pareto_target))
  plot_pareto(points, os.path.join(out_dir, "pareto.png"), FLAGS.pareto_target)


def _lazy_options() -> dict:
  opts = {}
  if FLAGS.prune_layers is not None:
    opts["prune_layers"] = tuple(common.int_list("prune_layers", FLAGS.prune_layers))
  if FLAGS.keep_ratios is not None:
    try:
      opts["keep_ratios"] = tuple(float(x) for x in FLAGS.keep_ratios)
    except ValueError:
      raise HdjaxError(f"--keep_ratios must be numbers in (0, 1], got {','.join(FLAGS.keep_ratios)!r}") from None
  for name in ("min_prompt", "reselect_every", "revive_budget", "score_window", "score_pool", "score_skip",
               "keep_sinks"):
    if getattr(FLAGS, name) is not None:
      opts[name] = getattr(FLAGS, name)
  return opts


def method_options(spec: str, opts: dict) -> dict:
  """The LazyLLM flags, then the method's own schedule, for lazy* and full methods; nothing for the others."""
  method, schedule = parse_method(spec)
  return {**opts, **schedule} if method.startswith("lazy") or method == "full" else {}


def main(argv):
  del argv
  if not FLAGS.out_dir:
    raise HdjaxError("--out_dir is required")
  if bool(FLAGS.prompts) == bool(FLAGS.build):
    raise HdjaxError("give exactly one of --prompts=FILE or --build=passkey,multidoc,multidoc_qa")
  common.require(max_new_tokens=(FLAGS.max_new_tokens, common.at_least(1)), num=(FLAGS.num, common.at_least(1)))
  lengths = common.int_list("lengths", FLAGS.lengths)
  if FLAGS.prompts:
    records = common.read_records(FLAGS.prompts)
    common.check_records(FLAGS.prompts, records, dict(id=common.is_id, prompt=common.is_text),
                         optional=dict(reference=common.is_string, task=common.is_string,
                                       answer=common.is_string), unique="id")
    prompts = [p for _, p in records]
  else:
    check_build(FLAGS.build, FLAGS.xsum)
  if len(set(FLAGS.methods)) != len(FLAGS.methods):
    raise HdjaxError(f"--methods must name distinct methods, got {','.join(FLAGS.methods)}")
  if FLAGS.pareto_from:
    if not FLAGS.prompts:
      raise HdjaxError("--pareto_from needs the run's --prompts")
    common.check_output_dir(FLAGS.out_dir, ["pareto.json", "pareto.md", "pareto.png"])
    rows_by_method = {}
    for m in FLAGS.methods:
      path = os.path.join(FLAGS.pareto_from, f"{m}.jsonl")
      if not os.path.isfile(path):
        raise HdjaxError(f"file not found: {path} (--pareto_from, method {m})")
      rows_by_method[m] = common.read_jsonl(path)
    write_pareto(rows_by_method, prompts, FLAGS.out_dir)
    return
  opts = _lazy_options()
  import hdjax  # pylint: disable=import-outside-toplevel
  from hdjax.decoding import speculative  # pylint: disable=import-outside-toplevel
  unknown = [m for m in FLAGS.methods if parse_method(m)[0] not in hdjax.METHODS]
  if unknown or not FLAGS.methods:
    raise HdjaxError(f"unknown method(s) {unknown}; available: {', '.join(sorted(hdjax.METHODS))}")
  for spec in FLAGS.methods:
    hdjax.api.check_options(parse_method(spec)[0], method_options(spec, opts))
  common.check_output_dir(FLAGS.out_dir, [f"{m}.jsonl" for m in FLAGS.methods] + [
      "summary.json", "table.md", "ttft.png", "prompts.jsonl"] + (["pareto.json", "pareto.md", "pareto.png"]
                                                                  if FLAGS.pareto else []))
  common.print_start("longctx", model=FLAGS.model, methods=",".join(FLAGS.methods),
                     prompts=FLAGS.prompts or ",".join(FLAGS.build), max_new_tokens=FLAGS.max_new_tokens)
  lm = hdjax.load(FLAGS.model)
  if lm.tokenizer is None:
    raise HdjaxError(f"model {FLAGS.model!r} has no tokenizer; prompts are text")
  if FLAGS.build:
    prompts = build_sets(lm, FLAGS.build, lengths, FLAGS.num, FLAGS.xsum, FLAGS.seed)
    common.write_jsonl_atomic(os.path.join(FLAGS.out_dir, "prompts.jsonl"), prompts)
  ids = {p["id"]: lm.tokenizer.apply_chat_template([{"role": "user", "content": p["prompt"]}]) for p in prompts}

  def run(spec, pid, **options):
    return lm.generate([ids[pid]], method=parse_method(spec)[0], max_new_tokens=FLAGS.max_new_tokens,
                       **method_options(spec, opts), **options)[0]

  groups = {}
  for p in prompts:  # one warm-up prompt per compiled shape (prompt bucket of 512 and cache size)
    n = len(ids[p["id"]])
    groups.setdefault((-(-n // 512), (n + FLAGS.max_new_tokens - 1).bit_length()), p["id"])
  for method in FLAGS.methods:  # speculative methods trace every tree bucket; the others generate once
    common.each_shape(method, list(groups.values()), functools.partial(run, method, warmup=True))
  speculative.reset_databases(read_only_too=False)  # warm-up answers must not seed the online model database
  hf = None
  if FLAGS.hf:
    from experiments.hf_peer import HFRunner  # pylint: disable=import-outside-toplevel  (torch: the `hf` extra)
    hf = HFRunner(hdjax.api.resolve_path(FLAGS.model), lm.cfg.dtype)
    hf.generate([ids[prompts[0]["id"]]], 1)  # warm-up
  hf_ttft = {}
  rows_by_method = {m: [] for m in FLAGS.methods}
  for p in prompts:
    if hf is not None:
      hf_ttft[p["id"]] = hf.generate([ids[p["id"]]], 1)[1]
    for method in FLAGS.methods:
      res = run(method, p["id"])
      row = dict(id=p["id"], method=method, token_ids=res.token_ids, text=res.text)
      row.update({k: v for k, v in res.stats.items() if k not in ("method", "accept_lengths")})
      rows_by_method[method].append(row)
      common.write_jsonl_atomic(os.path.join(FLAGS.out_dir, f"{method}.jsonl"), rows_by_method[method])
    print(p["id"], " ".join(f"{m}={rows_by_method[m][-1]['ttft_s']:.2f}s" for m in FLAGS.methods), flush=True)
  summary = summarize(rows_by_method, prompts, hf_ttft)
  summary["lazy_options"] = {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}
  summary["max_new_tokens"] = FLAGS.max_new_tokens
  common.write_json_atomic(os.path.join(FLAGS.out_dir, "summary.json"), summary)
  with open(os.path.join(FLAGS.out_dir, "table.md"), "w", encoding="utf-8") as f:
    f.write(accuracy_table(summary))
  plot(rows_by_method, os.path.join(FLAGS.out_dir, "ttft.png"))
  if FLAGS.pareto:
    write_pareto(rows_by_method, prompts, FLAGS.out_dir)
  for method, per in summary["methods"].items():
    for name, g in per.items():
      print(method, name, {k: round(v, 3) if isinstance(v, float) else v for k, v in g.items()})


if __name__ == "__main__":
  common.run_main(main)
