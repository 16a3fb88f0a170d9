"""Trains AdaDecode exit heads (T_i, identity-initialised) on teacher-forced ShareGPT text and the model's own replies.

  .venv/bin/python -m experiments.train_exit_heads --config=experiments/configs/exit_heads.py --config.steps=400
  .venv/bin/python experiments/train_exit_heads.py --config.steps=400     (the same, from any directory)

  .venv/bin/python experiments/train_exit_heads.py --config.vocab_only     (only the vocabulary ranking)

Training rows are the assistant-reply positions of two sets, teacher-forced: ShareGPT first exchanges
[0, num_train_seqs) with their human-written replies, and the model's own greedy replies (in `greedy_dtype`, up
to `greedy_tokens` tokens) to the user turns of `greedy_seqs` more exchanges, taken after the held-out ones; the
replies are checkpointed in `workdir/greedy_*.partial.npz` as they are made, so a killed run keeps them. The
held-out table reports top-1 agreement with the final layer on both kinds of held-out text: the human replies of
exchanges [num_train_seqs, num_train_seqs + num_eval_seqs) and the model's greedy replies to their user turns
(`greedy_*` columns), for the identity head (the original LM head) at every table layer and for the trained
heads.

Writes `workdir/metrics.jsonl` (one line per step, plus the evaluation tables), resumable orbax checkpoints in
`workdir/ckpt`, `workdir/summary.json`, and exports the final heads to `export_dir`. A rerun resumes from the last
checkpoint, drops the log lines of steps after it (a killed run logged them, the resumed run logs them again), and
refuses a `workdir` whose run (`workdir/run.json`: model, layers and every setting that shapes the batches)
differs. The exported heads carry `vocab.json`: the token ids ranked by their count in the training replies
(human and greedy) and in the human replies of `vocab_seqs` more exchanges after the held-out ones (EOS first),
the candidate set of a reduced-vocabulary head (`head_vocab`); `--config.vocab_only` writes just that file into
`export_dir`.
"""

from __future__ import annotations

import json
import os
import re
import sys
from typing import NamedTuple

if __package__ in (None, ""):  # started as `python experiments/X.py`: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import time

import numpy as np
from absl import logging
from ml_collections import config_flags
from tqdm import tqdm

import hdjax
from experiments.common import at_least, check_output_dir, print_start, require, run_main, write_json_atomic
from hdjax import exit_heads
from hdjax.adadecode import heads as heads_lib
from hdjax.adadecode import train
from hdjax.drafting import model_db
from hdjax.files import atomic_write
from hdjax.errors import HdjaxError

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "exit_heads.py"), "training config")
MAX_USER_CHARS = 600
# The settings a resumed run must share with the run that wrote its checkpoints.
RUN_KEYS = ("model", "layers", "num_train_seqs", "seq_len", "steps", "batch", "lr", "warmup_frac", "weight_decay",
            "seed", "greedy_seqs", "greedy_tokens", "greedy_dtype")


def check_run(workdir: str, run: dict) -> None:
  """Records `run` in `workdir/run.json`, or checks that a resumed workdir holds the same run."""
  path = os.path.join(workdir, "run.json")
  if os.path.isfile(path):
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    changed = sorted(k for k in run if saved.get(k) != run[k])
    if changed:
      was = ", ".join(f"{k}={saved.get(k)!r}" for k in changed)
      now = ", ".join(f"{k}={run[k]!r}" for k in changed)
      raise HdjaxError(f"{workdir} holds checkpoints of another run ({was}; now {now}): use a new workdir or "
                       f"delete it")
  elif os.path.isdir(os.path.join(workdir, "ckpt")) and os.listdir(os.path.join(workdir, "ckpt")):
    raise HdjaxError(f"{workdir}/ckpt holds checkpoints of an unknown run (no run.json): use a new workdir or "
                     f"delete it")
  else:
    write_json_atomic(path, run)


def truncate_log(path: str, last_step: int) -> None:
  """Drops the lines of steps after `last_step` (and evaluation lines) from a metrics log, atomically."""
  if not os.path.isfile(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  keep = []
  for line in lines:
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      continue  # a line cut short by the kill
    if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= last_step:
      keep.append(line)
  with atomic_write(path) as f:
    f.writelines(keep)


def user_turn(exchange) -> dict:
  return dict(exchange[0], content=exchange[0]["content"][:MAX_USER_CHARS])


def exchange_tokens(tok, exchanges):
  """Chat-templated (user, assistant) token ids, and where the assistant's reply starts in each."""
  seqs, starts = [], []
  for exchange in exchanges:
    starts.append(len(tok.apply_chat_template([user_turn(exchange)])))
    seqs.append(tok.apply_chat_template([user_turn(exchange), exchange[1]], add_generation_prompt=False))
  return seqs, starts


def greedy_texts(c, gen_lm, exchanges, skip: int, bar):
  """The chat-templated user turns of `exchanges` (exchanges counted from `skip`) followed by the model's greedy
  replies, and where each reply starts. The replies are generated a batch at a time and checkpointed after each
  (`model_db.save_partial`, atomic), so a rerun after a kill keeps them."""
  prompts = [(str(i), gen_lm.tokenizer.apply_chat_template([user_turn(e)])) for i, e in enumerate(exchanges)]
  name = re.sub(r"[^\w.-]", "_", f"greedy_{c.model}_from{skip}.partial.npz")
  partial, identity = os.path.join(c.workdir, name), gen_lm.tokenizer.identity
  settings = dict(max_new_tokens=c.greedy_tokens, dtype=c.greedy_dtype)
  done = model_db.load_partial(partial, identity, settings)
  bar.update(sum(cid in done for cid, _ in prompts))

  def generate(batch):
    return [r.token_ids for r in gen_lm.generate(batch, method="ar", max_new_tokens=c.greedy_tokens)]

  replies = model_db.generate_outputs(generate, prompts, c.greedy_batch, done,
                                      lambda outputs: model_db.save_partial(partial, identity, settings, outputs), bar)
  return [ids + replies[cid] for cid, ids in prompts], [len(ids) for _, ids in prompts]


class TextSets(NamedTuple):
  """Token ids and reply starts of the training text and of the two held-out sets."""
  train: tuple[list, list]
  eval_human: tuple[list, list]
  eval_greedy: tuple[list, list]


def text_sets(c, tok) -> TextSets:
  n_train, n_eval = c.num_train_seqs, c.num_eval_seqs
  exchanges = train.first_exchanges(n_train + n_eval)
  greedy_from = n_train + n_eval
  human_train, human_eval = exchange_tokens(tok, exchanges[:n_train]), exchange_tokens(tok, exchanges[n_train:])
  gen_lm = hdjax.load(c.model, dtype=c.greedy_dtype)
  with tqdm(total=c.greedy_seqs + n_eval, desc="greedy replies", unit="seq") as bar:
    greedy_train = greedy_texts(c, gen_lm, train.first_exchanges(c.greedy_seqs, skip=greedy_from), greedy_from, bar)
    greedy_eval = greedy_texts(c, gen_lm, exchanges[n_train:], n_train, bar)
  train_set = (human_train[0] + greedy_train[0], human_train[1] + greedy_train[1])
  return TextSets(train_set, human_eval, greedy_eval)


def vocab_ranking(c, lm, texts: TextSets) -> tuple[tuple[int, ...], dict]:
  """The reduced-vocabulary head's candidate ranking (see the module doc) and how it was made."""
  n_train, n_eval = c.num_train_seqs, c.num_eval_seqs
  more_seqs, more_starts = exchange_tokens(lm.tokenizer, train.first_exchanges(c.vocab_seqs, skip=n_train + n_eval))
  seqs, starts = texts.train[0] + more_seqs, texts.train[1] + more_starts
  ranking = heads_lib.rank_vocab(seqs, starts, lm.cfg.vocab_size, first_ids=lm.cfg.eos_ids)
  info = dict(source=f"the training replies (human replies of ShareGPT first exchanges [0, {n_train}), the model's "
                     f"greedy replies to {c.greedy_seqs} more) and the human replies of exchanges "
                     f"[{n_train + n_eval}, {n_train + n_eval + c.vocab_seqs}) (chat-templated)",
              target_tokens=int(sum(len(q) - s for q, s in zip(seqs, starts))))
  return ranking, info


def agreement_table(params, cfg, t_idd, kind: str, sets: dict[str, train.HiddenSet], layers,
                    set_layers) -> dict[str, dict[str, float]]:
  """{layer: {f"{prefix}{kind}_agree": held-out top-1 agreement, f"{prefix}{kind}_kl": KL}} of the heads `t_idd`
  at `layers`, on each held-out set (named by its prefix) whose hidden states are at `set_layers`."""
  table = {str(l): {} for l in layers}
  for prefix, data in sets.items():
    picked = train.HiddenSet(data.inputs_inrd[[set_layers.index(l) for l in layers]], data.final_rd)
    result = train.evaluate(params, cfg, t_idd, picked)
    for n, l in enumerate(layers):
      table[str(l)].update({f"{prefix}{kind}_agree": float(result["agree"][n]),
                            f"{prefix}{kind}_kl": float(result["kl"][n])})
  return table


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  c = _CONFIG.value
  counts = ("num_train_seqs", "num_eval_seqs", "seq_len", "steps", "batch", "ckpt_every", "greedy_tokens",
            "greedy_batch")
  require(**{f"config.{k}": (c[k], at_least(1)) for k in counts},
          **{f"config.{k}": (c[k], at_least(0)) for k in ("vocab_seqs", "greedy_seqs", "lr", "warmup_frac",
                                                          "weight_decay")})
  check_output_dir(c.workdir, ["metrics.jsonl", "summary.json", "run.json"])
  if c.export_dir:
    check_output_dir(c.export_dir)
  t0 = time.perf_counter()
  print_start("train_exit_heads", model=c.model, dtype="float32", layers=c.layers, steps=c.steps, workdir=c.workdir)
  lm = hdjax.load(c.model, dtype="float32")
  layers = exit_heads.check_layers(lm.cfg, c.layers)
  table_layers = tuple(sorted(set(exit_heads.check_layers(lm.cfg, c.table_layers)) | set(layers)))
  if not c.vocab_only:
    check_run(c.workdir, dict({k: c[k] for k in RUN_KEYS}, layers=list(layers)))
  texts = text_sets(c, lm.tokenizer)
  vocab, vocab_info = vocab_ranking(c, lm, texts)
  if c.vocab_only:
    if not c.export_dir:
      raise HdjaxError("--config.vocab_only writes into export_dir, which is empty")
    heads_lib.save_vocab(c.export_dir, vocab, vocab_info)
    print(f"{len(vocab)} ranked ids ({vocab_info['target_tokens']} reply tokens) -> {c.export_dir}")
    return
  ckpt_dir = os.path.join(c.workdir, "ckpt")
  truncate_log(os.path.join(c.workdir, "metrics.jsonl"), train.latest_step(ckpt_dir))
  log = open(os.path.join(c.workdir, "metrics.jsonl"), "a", encoding="utf-8")

  def hidden(seqs_starts, head_layers, seq_len, bar):
    seqs, starts = seqs_starts
    return train.collect_hidden(lm.params, lm.cfg, seqs, starts, head_layers, seq_len, progress=bar.update)

  n_human = c.num_train_seqs
  greedy_len = -(-max(len(q) for q in texts.train[0][n_human:] + texts.eval_greedy[0]) // 32) * 32
  with tqdm(total=len(texts.train[0]) + 2 * c.num_eval_seqs, desc="hidden states", unit="seq") as bar:
    human_train = hidden((texts.train[0][:n_human], texts.train[1][:n_human]), layers, c.seq_len, bar)
    greedy_train = hidden((texts.train[0][n_human:], texts.train[1][n_human:]), layers, greedy_len, bar)
    held_out = {"": hidden(texts.eval_human, table_layers, c.seq_len, bar),
                "greedy_": hidden(texts.eval_greedy, table_layers, greedy_len, bar)}
  train_set = train.HiddenSet(np.concatenate([human_train.inputs_inrd, greedy_train.inputs_inrd], axis=1),
                              np.concatenate([human_train.final_rd, greedy_train.final_rd], axis=0))
  t_hidden = time.perf_counter() - t0
  table = agreement_table(lm.params, lm.cfg, exit_heads.identity_heads(lm.cfg, table_layers).t_idd, "identity",
                          held_out, table_layers, table_layers)

  with tqdm(total=c.steps, desc="train", unit="step") as bar:
    def on_step(step, metrics):
      log.write(json.dumps(dict(step=step, **metrics)) + "\n")
      log.flush()
      bar.n = step
      bar.set_postfix(loss=f"{metrics['loss']:.3f}", agree=f"{np.mean(metrics['agree']):.3f}")
      bar.refresh()

    state = train.fit(lm.params, lm.cfg, train_set, steps=c.steps, batch=c.batch, lr=c.lr, warmup_frac=c.warmup_frac,
                      weight_decay=c.weight_decay, seed=c.seed, ckpt_dir=ckpt_dir,
                      ckpt_every=c.ckpt_every, stop_after=c.stop_after if c.stop_after > 0 else None,
                      on_step=on_step)
  if int(state.step) < c.steps:
    print(f"stopped at step {int(state.step)} of {c.steps}; rerun to resume")
    return
  for l, row in agreement_table(lm.params, lm.cfg, state.t_idd, "trained", held_out, layers, table_layers).items():
    table[l].update(row)
  summary = dict(config=c.to_dict(), train_rows=int(train_set.final_rd.shape[0]),
                 greedy_train_rows=int(greedy_train.final_rd.shape[0]),
                 eval_rows={k or "human_": int(v.final_rd.shape[0]) for k, v in held_out.items()},
                 hidden_s=t_hidden, total_s=time.perf_counter() - t0, table=table)
  log.write(json.dumps(dict(eval=table)) + "\n")
  log.close()
  write_json_atomic(os.path.join(c.workdir, "summary.json"), summary)
  print(json.dumps(table, indent=1))
  if c.export_dir:
    heads_lib.save_heads(c.export_dir, exit_heads.ExitHeads(layers, state.t_idd, vocab), lm.tokenizer.identity,
                         info=dict(table=table, train_rows=summary["train_rows"],
                                   greedy_train_rows=summary["greedy_train_rows"], steps=c.steps, vocab=vocab_info))


if __name__ == "__main__":
  run_main(main)
