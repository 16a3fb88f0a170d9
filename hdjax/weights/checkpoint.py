"""orbax save/restore of converted params (with the config beside them), restored onto an abstract target."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp

from hdjax.config import LlamaConfig, RopeScaling
from hdjax.errors import HdjaxError
from hdjax.model import Params, param_shapes

CONFIG_FILE = "hdjax_config.json"


def save_params(path: str, cfg: LlamaConfig, params: Params) -> None:
  """Writes params with orbax (atomic: orbax commits through a temporary directory) plus the config JSON."""
  path = os.path.abspath(path)
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), params, force=True)
  tmp = os.path.join(path, CONFIG_FILE + ".tmp")
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=1)
  os.replace(tmp, os.path.join(path, CONFIG_FILE))


def is_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE))


def load_config(path: str) -> LlamaConfig:
  with open(os.path.join(path, CONFIG_FILE), encoding="utf-8") as f:
    d = json.load(f)
  d["eos_ids"] = tuple(d["eos_ids"])
  if d.get("rope_scaling"):
    d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
  return LlamaConfig(**d)


def restore_params(path: str, shardings=None) -> tuple[LlamaConfig, Params]:
  """Restores params onto the abstract target of the saved config (optionally with target shardings)."""
  path = os.path.abspath(path)
  if not is_checkpoint(path):
    raise HdjaxError(f"not an hdjax orbax checkpoint (no {CONFIG_FILE}): {path}")
  cfg = load_config(path)
  target = param_shapes(cfg)
  if shardings is not None:
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target, shardings)
  with ocp.StandardCheckpointer() as ckptr:
    params = ckptr.restore(os.path.join(path, "params"), target)
  return cfg, params
