"""HF-named state dicts <-> hdjax params (one dict per layer, einsum-ready shapes)."""

from __future__ import annotations

import numpy as np

from hdjax.config import LlamaConfig
from hdjax.errors import HdjaxError
from hdjax.model import Params, with_layout


def _layer_entries(cfg: LlamaConfig):
  """(hdjax layer key, HF module, to_hdjax, to_hf) for every per-layer weight; HF matrices are [out, in]."""
  d, n, k, h = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
  return [
      ("attn_norm", "input_layernorm", lambda w: w, lambda w: w),
      ("mlp_norm", "post_attention_layernorm", lambda w: w, lambda w: w),
      ("q_dnh", "self_attn.q_proj", lambda w: w.T.reshape(d, n, h), lambda w: w.reshape(d, n * h).T),
      ("k_dkh", "self_attn.k_proj", lambda w: w.T.reshape(d, k, h), lambda w: w.reshape(d, k * h).T),
      ("v_dkh", "self_attn.v_proj", lambda w: w.T.reshape(d, k, h), lambda w: w.reshape(d, k * h).T),
      ("o_nhd", "self_attn.o_proj", lambda w: w.T.reshape(n, h, d), lambda w: w.reshape(n * h, d).T),
      ("gate_df", "mlp.gate_proj", lambda w: w.T, lambda w: w.T),
      ("up_df", "mlp.up_proj", lambda w: w.T, lambda w: w.T),
      ("down_fd", "mlp.down_proj", lambda w: w.T, lambda w: w.T),
  ]


def _is_norm(key: str) -> bool:
  return key.endswith("norm")


def hf_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
  """The shape every HF-named tensor must have under `cfg` ([out, in] matrices)."""
  d, n, k, h, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
  per_layer = {"input_layernorm": (d,), "post_attention_layernorm": (d,), "self_attn.q_proj": (n * h, d),
               "self_attn.k_proj": (k * h, d), "self_attn.v_proj": (k * h, d), "self_attn.o_proj": (d, n * h),
               "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
  shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
  if not cfg.tie_embeddings:
    shapes["lm_head.weight"] = (cfg.vocab_size, d)
  for i in range(cfg.n_layers):
    shapes.update({f"model.layers.{i}.{module}.weight": shape for module, shape in per_layer.items()})
  return shapes


def check_tensor(name: str, w: np.ndarray, shape: tuple[int, ...]) -> None:
  """A tensor of the config's shape with only finite values (one pass over the weights, at load)."""
  if tuple(w.shape) != tuple(shape):
    raise HdjaxError(f"tensor {name} has shape {tuple(w.shape)}, the config needs {tuple(shape)}")
  if not np.isfinite(w).all():
    raise HdjaxError(f"tensor {name} holds {int(np.size(w) - np.isfinite(w).sum())} non-finite values (NaN/inf)")


def params_from_hf_state(cfg: LlamaConfig, state: dict[str, np.ndarray]) -> Params:
  """fp32 numpy params from an HF-named state dict, each tensor checked for its shape and finite values, in the
  input-major layout (`model.with_layout` gives the engine's)."""
  shapes = hf_shapes(cfg)

  def get(name):
    if name not in state:
      raise HdjaxError(f"weights lack tensor {name}")
    w = np.asarray(state[name], np.float32)
    check_tensor(name, w, shapes[name])
    return w

  def layer(i):
    out = {}
    for key, module, to_ours, _ in _layer_entries(cfg):
      w = to_ours(get(f"model.layers.{i}.{module}.weight"))
      out[key] = {"scale": w} if _is_norm(key) else w
    return out

  layers = tuple(layer(i) for i in range(cfg.n_layers))
  embedder = {"embedding_vd": get("model.embed_tokens.weight"), "final_norm": {"scale": get("model.norm.weight")}}
  if not cfg.tie_embeddings:
    embedder["lm_head_dv"] = get("lm_head.weight").T
  return {"embedder": embedder, "layers": layers}


def hf_state_from_params(cfg: LlamaConfig, params: Params) -> dict[str, np.ndarray]:
  """The inverse of `params_from_hf_state` (fp32 numpy), from params in either weight layout."""
  params = with_layout(cfg.input_major(), params)
  layers = params["layers"]
  state = {"model.embed_tokens.weight": np.asarray(params["embedder"]["embedding_vd"], np.float32),
           "model.norm.weight": np.asarray(params["embedder"]["final_norm"]["scale"], np.float32)}
  if not cfg.tie_embeddings:
    state["lm_head.weight"] = np.ascontiguousarray(np.asarray(params["embedder"]["lm_head_dv"], np.float32).T)
  for i, layer in enumerate(layers):
    for key, module, _, to_hf in _layer_entries(cfg):
      w = layer[key]["scale"] if _is_norm(key) else layer[key]
      state[f"model.layers.{i}.{module}.weight"] = np.ascontiguousarray(to_hf(np.asarray(w, np.float32)))
  return state
