"""HF safetensors directories: `config.json` plus one `model.safetensors` or a sharded index."""

from __future__ import annotations

import json
import os

import numpy as np

from hdjax.config import LlamaConfig
from hdjax.errors import HdjaxError

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"


def load_hf_dir(path: str) -> tuple[LlamaConfig, dict[str, np.ndarray]]:
  from safetensors import SafetensorError  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise HdjaxError(f"no config.json in {path}")
  try:
    cfg = LlamaConfig.from_hf(read_json(config_path))
  except HdjaxError as e:
    raise HdjaxError(f"{config_path}: {e}") from None
  if os.path.isfile(os.path.join(path, INDEX)):
    weight_map = read_json(os.path.join(path, INDEX)).get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
      raise HdjaxError(f"{os.path.join(path, INDEX)} has no weight_map of tensor name -> shard file")
    files = sorted(set(weight_map.values()))
  elif os.path.isfile(os.path.join(path, SINGLE)):
    files = [SINGLE]
  else:
    raise HdjaxError(f"no {SINGLE} or {INDEX} in {path}")
  state = {}
  for name in files:
    try:
      shard = load_file(os.path.join(path, name))
    except (SafetensorError, OSError) as e:
      raise HdjaxError(f"cannot read safetensors shard {name} in {path}: {e}") from None
    state.update({k: v.astype(np.float32) if v.dtype != np.float32 else v for k, v in shard.items()})
  if "lm_head.weight" not in state and not cfg.tie_embeddings:
    cfg = cfg.replace(tie_embeddings=True)
  return cfg, state


def read_json(path: str) -> dict:
  """A JSON object from `path`; an `HdjaxError` naming the file if it is not one."""
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise HdjaxError(f"{path} is not readable JSON ({type(e).__name__}: {e})") from None
  if not isinstance(obj, dict):
    raise HdjaxError(f"{path} must hold a JSON object, got {type(obj).__name__}")
  return obj


def save_hf_dir(path: str, cfg: LlamaConfig, state: dict[str, np.ndarray], shard_size: int | None = None) -> None:
  """Writes config.json and weights, sharded with an index when `shard_size` (tensors per shard) is given."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(cfg.to_hf(), f, indent=1)
  names = sorted(state)
  if shard_size is None:
    save_file({k: np.ascontiguousarray(state[k]) for k in names}, os.path.join(path, SINGLE))
    return
  chunks = [names[i:i + shard_size] for i in range(0, len(names), shard_size)]
  weight_map = {}
  for j, chunk in enumerate(chunks):
    fname = f"model-{j + 1:05d}-of-{len(chunks):05d}.safetensors"
    save_file({k: np.ascontiguousarray(state[k]) for k in chunk}, os.path.join(path, fname))
    weight_map.update({k: fname for k in chunk})
  with open(os.path.join(path, INDEX), "w", encoding="utf-8") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
