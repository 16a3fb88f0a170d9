"""orbax save/restore of converted params (with the config beside them), restored onto an abstract target."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import orbax.checkpoint as ocp

from hdjax.config import EngineLayout, LlamaConfig, RopeScaling
from hdjax.errors import HdjaxError
from hdjax.files import atomic_write
from hdjax.model import Params, param_shapes, with_layout
from hdjax.weights.safetensors_dir import read_json

CONFIG_FILE = "hdjax_config.json"


def save_params(path: str, cfg: LlamaConfig, params: Params) -> None:
  """Writes params with orbax (atomic: orbax commits through a temporary directory) plus the config JSON, in the
  input-major unfused layout (`LlamaConfig.input_major`) whatever layout they run in: a checkpoint reads the same
  on every backend, and `hdjax.load` puts it in the engine's layout (`model.with_layout`)."""
  path = os.path.abspath(path)
  cfg = cfg.input_major()
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(os.path.join(path, "params"), with_layout(cfg, params), force=True)
  with atomic_write(os.path.join(path, CONFIG_FILE)) as f:
    json.dump(dataclasses.asdict(cfg), f, indent=1)


def is_checkpoint(path: str) -> bool:
  return os.path.isfile(os.path.join(path, CONFIG_FILE))


def load_config(path: str) -> LlamaConfig:
  config_path = os.path.join(path, CONFIG_FILE)
  d = read_json(config_path)
  try:
    d["eos_ids"] = tuple(d["eos_ids"])
    if d.get("rope_scaling"):
      d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    # a checkpoint written before the layout had its own object holds its fields at the top level
    loose = {f.name: d.pop(f.name) for f in dataclasses.fields(EngineLayout) if f.name in d}
    d["engine"] = EngineLayout(**(d.get("engine") or loose))
    return LlamaConfig(**d)
  except (KeyError, TypeError, ValueError) as e:
    raise HdjaxError(f"{config_path} is not a valid hdjax config ({type(e).__name__}: {e})") from None
  except HdjaxError as e:
    raise HdjaxError(f"{config_path}: {e}") from None


def restore_params(path: str, shardings=None) -> tuple[LlamaConfig, Params]:
  """Restores params onto the abstract target of the saved config (optionally with target shardings)."""
  path = os.path.abspath(path)
  if not is_checkpoint(path):
    raise HdjaxError(f"not an hdjax orbax checkpoint (no {CONFIG_FILE}): {path}")
  cfg = load_config(path)
  target = param_shapes(cfg)
  if shardings is not None:
    target = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), target, shardings)
  params_dir = os.path.join(path, "params")
  if not os.path.isdir(params_dir):
    raise HdjaxError(f"incomplete hdjax checkpoint {path}: {CONFIG_FILE} but no params/ directory")
  try:
    with ocp.StandardCheckpointer() as ckptr:
      params = ckptr.restore(params_dir, target)
  except Exception as e:  # pylint: disable=broad-except  (orbax and tensorstore raise many untyped errors)
    raise HdjaxError(f"cannot restore the params of {path} for its config (partial or corrupt checkpoint?): "
                     f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
  for (key_path, x), want in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(target)):
    name = jax.tree_util.keystr(key_path)
    if x.shape != want.shape:  # orbax may restore a saved array of another shape without complaint
      raise HdjaxError(f"tensor {name} of {path} has shape {x.shape}, its config needs {want.shape}")
    if not bool(jax.numpy.isfinite(x).all()):
      raise HdjaxError(f"tensor {name} of {path} holds non-finite values (NaN/inf)")
  return cfg, params
