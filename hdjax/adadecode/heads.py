"""AdaDecode's exit heads on disk and their candidate ranking (the heads themselves: `hdjax/exit_heads.py`).

Heads are saved with orbax next to a small JSON with their layers and the model they were trained for, and the
ranking of their training targets in `vocab.json`.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from hdjax.config import LlamaConfig, is_int
from hdjax.errors import HdjaxError
from hdjax.exit_heads import ExitHeads, check_layers
from hdjax.files import atomic_write

META_FILE = "heads.json"
PARAMS_DIR = "t_idd"
VOCAB_FILE = "vocab.json"


def candidate_ids(heads: ExitHeads, n: int, vocab_size: int) -> np.ndarray:
  """The `n` most frequent ids of the heads' ranking, as [n] int32."""
  if n > len(heads.vocab_ids):
    raise HdjaxError(f"head_vocab={n} but the exit heads rank {len(heads.vocab_ids)} token ids (their {VOCAB_FILE})")
  ids = np.asarray(heads.vocab_ids[:n], np.int32)
  if len(set(ids.tolist())) != n or ids.min() < 0 or ids.max() >= vocab_size:
    raise HdjaxError(f"the exit heads' vocabulary ranking must hold distinct ids in [0, {vocab_size}); its first "
                     f"{n} do not")
  return ids


def rank_vocab(token_seqs, starts, vocab_size: int, first_ids=()) -> tuple[int, ...]:
  """Token ids by how often they occur after `starts` in `token_seqs` (the assistant replies), most frequent first
  (ties: smaller id first), after `first_ids` (e.g. the EOS ids, which end every reply); ids never seen are left
  out."""
  counts_v = np.zeros(vocab_size, np.int64)
  for seq, start in zip(token_seqs, starts):
    np.add.at(counts_v, np.asarray(seq[start:], np.int64), 1)
  counts_v[list(first_ids)] = 0
  order = np.argsort(-counts_v, kind="stable")
  return tuple(int(i) for i in first_ids) + tuple(int(i) for i in order[:int(np.sum(counts_v > 0))])


def save_vocab(path: str, vocab_ids, info: dict | None = None) -> None:
  """Writes `path/vocab.json` atomically (`files.atomic_write`)."""
  with atomic_write(os.path.join(path, VOCAB_FILE)) as f:
    json.dump(dict(info or {}, ids=[int(i) for i in vocab_ids]), f)


def save_heads(path: str, heads: ExitHeads, model_identity: str, info: dict | None = None) -> None:
  """Writes the heads into a new directory beside `path`, then swaps it in: a reader sees the old heads, the new
  ones or, for an instant, none, never one's matrices with the other's layers; a save killed before the swap leaves
  the old heads in place (and a `.tmp-*` directory beside them)."""
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=os.path.dirname(path))
  try:
    with ocp.StandardCheckpointer() as ckpt:
      ckpt.save(os.path.join(tmp, PARAMS_DIR), {"t_idd": np.asarray(heads.t_idd, np.float32)}, force=True)
    meta = dict(layers=list(heads.layers), d_model=int(heads.t_idd.shape[-1]), model=model_identity, **(info or {}))
    with open(os.path.join(tmp, META_FILE), "w", encoding="utf-8") as f:
      json.dump(meta, f, indent=1)
    if heads.vocab_ids:
      save_vocab(tmp, heads.vocab_ids)
    old = None
    if os.path.exists(path):
      old = tempfile.mkdtemp(prefix=os.path.basename(path) + ".old-", dir=os.path.dirname(path))
      os.rename(path, os.path.join(old, "heads"))
    os.rename(tmp, path)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)


def load_heads(path: str, cfg: LlamaConfig) -> ExitHeads:
  """Heads saved by `save_heads` (with the vocabulary ranking of `vocab.json`, when there is one); an `HdjaxError`
  naming the file for a missing, partial or corrupt directory, heads for another model size, or non-finite
  values."""
  from hdjax.weights.safetensors_dir import read_json  # pylint: disable=import-outside-toplevel
  meta_path = os.path.join(path, META_FILE)
  if not os.path.isfile(meta_path):
    raise HdjaxError(f"no exit heads at {path!r} (missing {META_FILE})")
  meta = read_json(meta_path)
  layers, d_model = meta.get("layers"), meta.get("d_model")
  if not isinstance(layers, list) or not all(is_int(l) for l in layers) or not is_int(d_model):
    raise HdjaxError(f"{meta_path} needs 'layers' (a list of integers) and 'd_model' (an integer)")
  if d_model != cfg.d_model:
    raise HdjaxError(f"exit heads at {path!r} are for d_model={d_model}, the model has {cfg.d_model}")
  layers = check_layers(cfg, layers)
  if list(layers) != meta["layers"]:
    raise HdjaxError(f"{meta_path}: head layers must be increasing, got {meta['layers']}")
  target = {"t_idd": jax.ShapeDtypeStruct((len(layers), cfg.d_model, cfg.d_model), jnp.float32)}
  params_dir = os.path.join(os.path.abspath(path), PARAMS_DIR)
  if not os.path.isdir(params_dir):
    raise HdjaxError(f"incomplete exit heads at {path!r}: {META_FILE} but no {PARAMS_DIR}/ directory")
  try:
    with ocp.StandardCheckpointer() as ckpt:
      t_idd = np.asarray(ckpt.restore(params_dir, target)["t_idd"])
  except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore raise many untyped errors)
    raise HdjaxError(f"cannot restore the exit heads in {params_dir} for layers {list(layers)} (partial or "
                     f"corrupt?): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
  if t_idd.shape != target["t_idd"].shape or not np.isfinite(t_idd).all():
    raise HdjaxError(f"exit heads in {params_dir} have shape {t_idd.shape} (need {target['t_idd'].shape}) or "
                     f"non-finite values")
  return ExitHeads(layers, jnp.asarray(t_idd), load_vocab(path, cfg))


def files_signature(path: str) -> tuple:
  """(inode, mtime, size) of the directory `path` and of the files in it that `load_heads` reads (None for a
  missing one): it changes when `save_heads` swaps in a new directory or a file is rewritten in place."""
  signature = []
  for name in ("", META_FILE, PARAMS_DIR, VOCAB_FILE):
    try:
      st = os.stat(os.path.join(path, name))
    except OSError:
      signature.append(None)
      continue
    signature.append((st.st_ino, st.st_mtime_ns, st.st_size))
  return tuple(signature)


@functools.lru_cache(maxsize=16)
def _read_version(reader, path: str, signature: tuple, cfg: LlamaConfig, *args):
  del signature  # a key only: another version of the files is read again
  return reader(path, cfg, *args)


def read_once(reader, path: str, cfg: LlamaConfig, *args):
  """`reader(path, cfg, *args)` (a module-level function that reads heads saved by `save_heads`, `args`
  hashable), read from disk once per version of the directory's files (`files_signature`): orbax's restore and the
  ranking's checks took ~60-130 ms of every AdaDecode request. A read that fails is not kept."""
  path = os.path.abspath(path)
  return _read_version(reader, path, files_signature(path), cfg, *args)


def load_vocab(path: str, cfg: LlamaConfig) -> tuple[int, ...]:
  """The ranking in `path/vocab.json` (empty if there is none)."""
  from hdjax.weights.safetensors_dir import read_json  # pylint: disable=import-outside-toplevel
  vocab_path = os.path.join(path, VOCAB_FILE)
  if not os.path.isfile(vocab_path):
    return ()
  ids = read_json(vocab_path).get("ids")
  if not isinstance(ids, list) or not all(is_int(i) and 0 <= i < cfg.vocab_size for i in ids):
    raise HdjaxError(f"{vocab_path} needs 'ids': a list of token ids in [0, {cfg.vocab_size})")
  return tuple(ids)
