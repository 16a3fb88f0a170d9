"""Trains AdaDecode exit heads (T_i, identity-initialised) on teacher-forced ShareGPT hidden states.

  .venv/bin/python -m experiments.train_exit_heads --config=experiments/configs/exit_heads.py --config.steps=150
  .venv/bin/python experiments/train_exit_heads.py --config.steps=150     (the same, from any directory)

  .venv/bin/python experiments/train_exit_heads.py --config.vocab_only     (only the vocabulary ranking)

Writes `workdir/metrics.jsonl` (one line per step, plus the evaluation tables), resumable orbax checkpoints in
`workdir/ckpt`, `workdir/summary.json` (held-out top-1 agreement of the identity head at every table layer and of
the trained heads), and exports the final heads to `export_dir`. A rerun resumes from the last checkpoint, drops
the log lines of steps after it (a killed run logged them, the resumed run logs them again), and refuses a
`workdir` whose run (`workdir/run.json`: model, layers and every setting that shapes the batches) differs.
The exported heads carry `vocab.json`: the token ids ranked by their count in the assistant replies of the
training exchanges and of `vocab_seqs` more exchanges after the held-out ones (EOS first), the candidate set of a
reduced-vocabulary head (`head_vocab`); `--config.vocab_only` writes just that file into `export_dir`.
"""

from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):  # started as `python experiments/X.py`: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import time

import numpy as np
from absl import logging
from ml_collections import config_flags
from tqdm import tqdm

import hdjax
from experiments.common import at_least, check_output_dir, require, run_main, write_json_atomic
from hdjax.adadecode import heads as heads_lib
from hdjax.adadecode import train
from hdjax.errors import HdjaxError

_CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "exit_heads.py"), "training config")
MAX_USER_CHARS = 600
# The settings a resumed run must share with the run that wrote its checkpoints.
RUN_KEYS = ("model", "layers", "num_train_seqs", "seq_len", "steps", "batch", "lr", "warmup_frac", "weight_decay",
            "seed")


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
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    f.writelines(keep)
  os.replace(path + ".tmp", path)


def exchange_tokens(tok, exchanges):
  """Chat-templated (user, assistant) token ids, and where the assistant's reply starts in each."""
  seqs, starts = [], []
  for user, assistant in exchanges:
    user = dict(user, content=user["content"][:MAX_USER_CHARS])
    starts.append(len(tok.apply_chat_template([user])))
    seqs.append(tok.apply_chat_template([user, assistant], add_generation_prompt=False))
  return seqs, starts


def vocab_ranking(lm, c) -> tuple[tuple[int, ...], dict]:
  """The reduced-vocabulary head's candidate ranking (see the module doc) and how it was made."""
  n_train, n_eval = c.num_train_seqs, c.num_eval_seqs
  path = train.sharegpt_path()
  exchanges = (train.first_exchanges(path, n_train)
               + train.first_exchanges(path, c.vocab_seqs, skip=n_train + n_eval))
  seqs, starts = exchange_tokens(lm.tokenizer, exchanges)
  ranking = heads_lib.rank_vocab(seqs, starts, lm.cfg.vocab_size, first_ids=lm.cfg.eos_ids)
  info = dict(source=f"ShareGPT first exchanges [0, {n_train}) and [{n_train + n_eval}, "
                     f"{n_train + n_eval + c.vocab_seqs}) (assistant replies, chat-templated)",
              target_tokens=int(sum(len(q) - s for q, s in zip(seqs, starts))))
  return ranking, info


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
  c = _CONFIG.value
  counts = ("num_train_seqs", "num_eval_seqs", "seq_len", "steps", "batch", "ckpt_every")
  require(**{f"config.{k}": (c[k], at_least(1)) for k in counts}, **{"config.vocab_seqs": (c.vocab_seqs, at_least(0))},
          **{f"config.{k}": (c[k], at_least(0)) for k in ("lr", "warmup_frac", "weight_decay")})
  check_output_dir(c.workdir, ["metrics.jsonl", "summary.json", "run.json"])
  if c.export_dir:
    check_output_dir(c.export_dir)
  t0 = time.perf_counter()
  lm = hdjax.load(c.model, dtype="float32")
  vocab, vocab_info = vocab_ranking(lm, c)
  if c.vocab_only:
    if not c.export_dir:
      raise HdjaxError("--config.vocab_only writes into export_dir, which is empty")
    heads_lib.save_vocab(c.export_dir, vocab, vocab_info)
    print(f"{len(vocab)} ranked ids ({vocab_info['target_tokens']} reply tokens) -> {c.export_dir}")
    return
  layers = heads_lib.check_layers(lm.cfg, c.layers)
  table_layers = tuple(sorted(set(heads_lib.check_layers(lm.cfg, c.table_layers)) | set(layers)))
  check_run(c.workdir, dict({k: c[k] for k in RUN_KEYS}, layers=list(layers)))
  ckpt_dir = os.path.join(c.workdir, "ckpt")
  truncate_log(os.path.join(c.workdir, "metrics.jsonl"), train.latest_step(ckpt_dir))
  exchanges = train.first_exchanges(train.sharegpt_path(), c.num_train_seqs + c.num_eval_seqs)
  seqs, starts = exchange_tokens(lm.tokenizer, exchanges)
  n_train = c.num_train_seqs
  log = open(os.path.join(c.workdir, "metrics.jsonl"), "a", encoding="utf-8")

  with tqdm(total=len(seqs), desc="hidden states", unit="seq") as bar:
    train_set = train.collect_hidden(lm.params, lm.cfg, seqs[:n_train], starts[:n_train], layers, c.seq_len,
                                     progress=bar.update)
    eval_set = train.collect_hidden(lm.params, lm.cfg, seqs[n_train:], starts[n_train:], table_layers, c.seq_len,
                                    progress=bar.update)
  t_hidden = time.perf_counter() - t0
  identity = train.evaluate(lm.params, lm.cfg, heads_lib.identity_heads(lm.cfg, table_layers).t_idd, eval_set)
  table = {str(l): dict(identity_agree=float(a), identity_kl=float(k))
           for l, a, k in zip(table_layers, identity["agree"], identity["kl"])}

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
  eval_idx = [table_layers.index(l) for l in layers]
  trained = train.evaluate(lm.params, lm.cfg, state.t_idd,
                           train.HiddenSet(eval_set.inputs_inrd[eval_idx], eval_set.final_rd))
  for l, a, k in zip(layers, trained["agree"], trained["kl"]):
    table[str(l)].update(trained_agree=float(a), trained_kl=float(k))
  summary = dict(config=c.to_dict(), train_rows=int(train_set.final_rd.shape[0]),
                 eval_rows=int(eval_set.final_rd.shape[0]), hidden_s=t_hidden, total_s=time.perf_counter() - t0,
                 table=table)
  log.write(json.dumps(dict(eval=table)) + "\n")
  log.close()
  write_json_atomic(os.path.join(c.workdir, "summary.json"), summary)
  print(json.dumps(table, indent=1))
  if c.export_dir:
    heads_lib.save_heads(c.export_dir, heads_lib.ExitHeads(layers, state.t_idd, vocab), lm.tokenizer.identity,
                         info=dict(table=table, train_rows=summary["train_rows"], steps=c.steps, vocab=vocab_info))


if __name__ == "__main__":
  run_main(main)
