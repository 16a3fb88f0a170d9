"""AdaDecode exit heads: head_i(h) = E* . T_i . RMSNorm(h), with E* the frozen final LM head.

The final RMSNorm (with the model's own scale) is applied first, exactly as before the real LM head, then the
learned d x d matrix T_i, then E* (the tied embedding for SmolLM2). This is the paper's order (norm -> T_i -> E*):
with T_i = I a head is exactly the original LM head applied at an intermediate layer, which is the ablation.

A head set is `ExitHeads(layers, t_idd)`: `layers` are the (static) depths after which a head reads the hidden
state (a head at layer l sees the output of decoder layer l-1, i.e. after l layers), `t_idd` is [I, D, D].
Heads are saved with orbax next to a small JSON with their layers and the model they were trained for.
"""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from hdjax import model
from hdjax.config import LlamaConfig, is_int
from hdjax.errors import HdjaxError

META_FILE = "heads.json"
PARAMS_DIR = "t_idd"


@dataclasses.dataclass(frozen=True)
class ExitHeads:
  layers: tuple[int, ...]  # depths (number of layers run) at which each head reads the hidden state
  t_idd: jax.Array  # [I, D, D]

  def __post_init__(self):
    if len(self.layers) != self.t_idd.shape[0]:
      raise HdjaxError(f"{len(self.layers)} head layers but {self.t_idd.shape[0]} head matrices")


def check_layers(cfg: LlamaConfig, layers) -> tuple[int, ...]:
  layers = tuple(sorted({int(l) for l in layers}))
  if not layers or layers[0] < 1 or layers[-1] >= cfg.n_layers:
    raise HdjaxError(f"head layers must lie in [1, {cfg.n_layers - 1}], got {list(layers)}")
  return layers


def identity_heads(cfg: LlamaConfig, layers) -> ExitHeads:
  """T_i = I: the original LM head at each intermediate layer (the paper's ablation, and the training init)."""
  layers = check_layers(cfg, layers)
  eye_dd = jnp.eye(cfg.d_model, dtype=jnp.float32)
  return ExitHeads(layers, jnp.broadcast_to(eye_dd, (len(layers), cfg.d_model, cfg.d_model)))


def head_logits(params, cfg: LlamaConfig, t_dd: jax.Array, h_btd: jax.Array) -> jax.Array:
  """Logits [B, T, V] fp32 of one exit head on raw hidden states [B, T, D]."""
  x_btd = model.final_norm(params, cfg, h_btd).astype(jnp.float32)
  y_btd = jnp.einsum("BTD,DE->BTE", x_btd, t_dd)
  return model.lm_head(params, cfg, y_btd)


def save_heads(path: str, heads: ExitHeads, model_identity: str, info: dict | None = None) -> None:
  path = os.path.abspath(path)
  os.makedirs(path, exist_ok=True)
  with ocp.StandardCheckpointer() as ckpt:
    ckpt.save(os.path.join(path, PARAMS_DIR), {"t_idd": np.asarray(heads.t_idd, np.float32)}, force=True)
  meta = dict(layers=list(heads.layers), d_model=int(heads.t_idd.shape[-1]), model=model_identity, **(info or {}))
  with open(os.path.join(path, META_FILE), "w", encoding="utf-8") as f:
    json.dump(meta, f, indent=1)


def load_heads(path: str, cfg: LlamaConfig) -> ExitHeads:
  """Heads saved by `save_heads`; an `HdjaxError` naming the file for a missing, partial or corrupt directory,
  heads for another model size, or non-finite values."""
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
  return ExitHeads(layers, jnp.asarray(t_idd))
