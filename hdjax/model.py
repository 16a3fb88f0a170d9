"""LLaMA as Flax Linen modules used purely: params and KV cache are explicit pytrees.

Shape letters: B batch, T new tokens, S cache slots, D d_model, N query heads, K kv heads, G query heads
per kv head, H head_dim, F ffn_dim, V vocab, L layers.

Decoder layers are stacked on a leading L axis and run with `lax.scan` over any static range [start, end): the
scan runs over layer indices and reads one layer's weights per iteration (`layer_params`), so a sub-range never
copies a slice of the whole stack.
Every step writes its new K/V rows into the cache at explicit `slots` (out-of-range slots are dropped) and
attends through an explicit boolean mask [B, T, S], so prefill, decoding, draft trees and pruned prefill
differ only in their positions, slots and mask.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from hdjax import sharding
from hdjax.attention import apply_rope, rope_sin_cos
from hdjax.config import LlamaConfig
from hdjax.kvcache import KVCache

Params = dict[str, Any]


class RMSNorm(nn.Module):
  eps: float
  dtype: Any

  @nn.compact
  def __call__(self, x_btd):
    scale_d = self.param("scale", nn.initializers.ones, (x_btd.shape[-1],), jnp.float32)
    x = x_btd.astype(jnp.float32)
    x = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
    return (x * scale_d).astype(self.dtype)


class DecoderLayer(nn.Module):
  """One pre-norm decoder layer. Reads and writes the full stacked cache at layer `layer_idx`."""

  cfg: LlamaConfig

  @nn.compact
  def __call__(self, h_btd, sin_bth, cos_bth, mask_bts, k_lbskh, v_lbskh, slots_bt, layer_idx):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    init = nn.initializers.normal(0.02)
    d, n, k, hd, f = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    q_dnh = self.param("q_dnh", init, (d, n, hd), dtype)
    k_dkh = self.param("k_dkh", init, (d, k, hd), dtype)
    v_dkh = self.param("v_dkh", init, (d, k, hd), dtype)
    o_nhd = self.param("o_nhd", init, (n, hd, d), dtype)
    gate_df = self.param("gate_df", init, (d, f), dtype)
    up_df = self.param("up_df", init, (d, f), dtype)
    down_fd = self.param("down_fd", init, (f, d), dtype)

    x_btd = RMSNorm(cfg.rms_eps, dtype, name="attn_norm")(h_btd)
    q_btnh = apply_rope(jnp.einsum("BTD,DNH->BTNH", x_btd, q_dnh), sin_bth, cos_bth)
    k_btkh = apply_rope(jnp.einsum("BTD,DKH->BTKH", x_btd, k_dkh), sin_bth, cos_bth)
    v_btkh = jnp.einsum("BTD,DKH->BTKH", x_btd, v_dkh)

    b_idx = jnp.arange(h_btd.shape[0])[:, None]
    k_lbskh = k_lbskh.at[layer_idx, b_idx, slots_bt].set(k_btkh.astype(k_lbskh.dtype), mode="drop")
    v_lbskh = v_lbskh.at[layer_idx, b_idx, slots_bt].set(v_btkh.astype(v_lbskh.dtype), mode="drop")
    keys_bskh = k_lbskh[layer_idx]
    values_bskh = v_lbskh[layer_idx]

    b, t = q_btnh.shape[:2]
    q_btkgh = q_btnh.reshape(b, t, k, cfg.q_per_kv, hd)
    # [B, K, G, T, S]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q_btkgh, keys_bskh, preferred_element_type=jnp.float32)
    logits = logits * (hd ** -0.5)
    logits = jnp.where(mask_bts[:, None, None, :, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    # [B, T, K, G, H]
    attn_btkgh = jnp.einsum("BKGTS,BSKH->BTKGH", probs, values_bskh)
    h_btd = h_btd + jnp.einsum("BTNH,NHD->BTD", attn_btkgh.reshape(b, t, n, hd), o_nhd)

    x_btd = RMSNorm(cfg.rms_eps, dtype, name="mlp_norm")(h_btd)
    gate_btf = jnp.einsum("BTD,DF->BTF", x_btd, gate_df)
    up_btf = jnp.einsum("BTD,DF->BTF", x_btd, up_df)
    h_btd = h_btd + jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate_btf) * up_btf, down_fd)
    return h_btd, k_lbskh, v_lbskh


class Embedder(nn.Module):
  """Token embedding, final norm and LM head (tied to the embedding when the config says so)."""

  cfg: LlamaConfig

  def setup(self):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    self.embedding_vd = self.param("embedding_vd", nn.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model),
                                   dtype)
    self.final_norm = RMSNorm(cfg.rms_eps, dtype)
    if not cfg.tie_embeddings:
      self.lm_head_dv = self.param("lm_head_dv", nn.initializers.normal(0.02), (cfg.d_model, cfg.vocab_size),
                                   dtype)

  def encode(self, tokens_bt):
    return jnp.take(self.embedding_vd, tokens_bt, axis=0)

  def normalize(self, h_btd):
    return self.final_norm(h_btd)

  def decode(self, x_btd):
    """Logits [B, T, V] in fp32 from already-normalized hidden states."""
    if self.cfg.tie_embeddings:
      return jnp.einsum("BTD,VD->BTV", x_btd, self.embedding_vd, preferred_element_type=jnp.float32)
    return jnp.einsum("BTD,DV->BTV", x_btd, self.lm_head_dv, preferred_element_type=jnp.float32)

  def __call__(self, tokens_bt):
    h = self.encode(tokens_bt)
    return self.decode(self.normalize(h))


def init_params(cfg: LlamaConfig, key: jax.Array) -> Params:
  """Random params: {'embedder': ..., 'layers': stacked with leading L}."""
  k_emb, k_layers = jax.random.split(key)
  embedder = Embedder(cfg).init(k_emb, jnp.zeros((1, 1), jnp.int32))["params"]
  layer = DecoderLayer(cfg)
  dummy = _dummy_layer_inputs(cfg)
  layers = jax.vmap(lambda k: layer.init(k, *dummy)["params"])(jax.random.split(k_layers, cfg.n_layers))
  return {"embedder": embedder, "layers": layers}


def _dummy_layer_inputs(cfg: LlamaConfig):
  dtype = jnp.dtype(cfg.dtype)
  kv = jnp.zeros((1, 1, 1, cfg.n_kv_heads, cfg.head_dim), dtype)
  hd = jnp.zeros((1, 1, cfg.head_dim), jnp.float32)
  return (jnp.zeros((1, 1, cfg.d_model), dtype), hd, hd, jnp.ones((1, 1, 1), bool), kv, kv,
          jnp.zeros((1, 1), jnp.int32), 0)


def param_shapes(cfg: LlamaConfig) -> Params:
  """Abstract params (ShapeDtypeStructs), e.g. an orbax restore target."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def embed(params: Params, cfg: LlamaConfig, tokens_bt: jax.Array) -> jax.Array:
  return Embedder(cfg).apply({"params": params["embedder"]}, tokens_bt, method=Embedder.encode)


def final_norm(params: Params, cfg: LlamaConfig, h_btd: jax.Array) -> jax.Array:
  return Embedder(cfg).apply({"params": params["embedder"]}, h_btd, method=Embedder.normalize)


def lm_head(params: Params, cfg: LlamaConfig, x_btd: jax.Array) -> jax.Array:
  """Logits [B, T, V] fp32 from hidden states that already went through `final_norm`."""
  return Embedder(cfg).apply({"params": params["embedder"]}, x_btd, method=Embedder.decode)


def unembed(params: Params, cfg: LlamaConfig, h_btd: jax.Array) -> jax.Array:
  """Final norm then LM head: logits [B, T, V] fp32."""
  return lm_head(params, cfg, final_norm(params, cfg, h_btd))


class LayerOut(NamedTuple):
  h_btd: jax.Array
  cache: KVCache
  hidden_lbtd: jax.Array | None  # state after each layer of the range, when requested


def layer_params(params: Params, idx: jax.Array) -> Params:
  """The weights of layer `idx` (traced) of the stacked decoder layers."""
  return jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, idx, keepdims=False), params["layers"])


def run_layers(params: Params, cfg: LlamaConfig, h_btd: jax.Array, positions_bt: jax.Array, mask_bts: jax.Array,
               cache: KVCache, slots_bt: jax.Array, start: int = 0, end: int | None = None,
               collect_hidden: bool = False, visible_lbs: jax.Array | None = None) -> LayerOut:
  """Runs decoder layers [start, end) with `lax.scan`. `start`/`end` must be static.

  positions_bt: RoPE positions of the T tokens. slots_bt: cache slots their K/V rows go to (>= S drops the
  row). mask_bts: which cache slots each token attends to, including the slots written in this call.
  Does not move `cache.lengths`: committing is the caller's decision.
  """
  end = cfg.n_layers if end is None else end
  sin_bth, cos_bth = rope_sin_cos(cfg, positions_bt)
  h_btd = sharding.constrain(h_btd, sharding.ACTIVATION_AXES["h_btd"])
  layer = DecoderLayer(cfg)

  def body(carry, xs):
    h, k_cache, v_cache = carry
    idx, visible_bs = xs
    mask = mask_bts if visible_bs is None else mask_bts & visible_bs[:, None, :]
    h, k_cache, v_cache = layer.apply({"params": layer_params(params, idx)}, h, sin_bth, cos_bth, mask, k_cache,
                                      v_cache, slots_bt, idx)
    return (h, k_cache, v_cache), (h if collect_hidden else None)

  visible = None if visible_lbs is None else visible_lbs[start:end]
  (h_btd, k, v), hidden = jax.lax.scan(body, (h_btd, cache.k, cache.v), (jnp.arange(start, end), visible))
  return LayerOut(h_btd, sharding.constrain_cache(cache.replace(k=k, v=v)), hidden)


def run_layers_chunked(params: Params, cfg: LlamaConfig, h_bnd: jax.Array, positions_bn: jax.Array,
                       valid_bn: jax.Array, cache: KVCache, start: int, end: int, chunk: int
                       ) -> tuple[jax.Array, KVCache]:
  """Layers [start, end) for N tokens in position order whose K/V go to cache slots 0..N-1 (invalid tokens write
  nothing), in query chunks of `chunk` rows: chunk [c0, c1) attends over slots [0, c1) only, so the attention
  scores come in [chunk, <= N] pieces (about N^2 / 2 entries in all) instead of one [N, S] tensor."""
  n = h_bnd.shape[1]
  slots_bn = jnp.where(valid_bn, jnp.arange(n)[None, :], cache.num_slots)
  outs = []
  for c0 in range(0, n, chunk):
    c1 = min(n, c0 + chunk)
    # [B, C, c1]: causal over positions, valid tokens only
    mask_bcs = (positions_bn[:, None, :c1] <= positions_bn[:, c0:c1, None]) & valid_bn[:, None, :c1]
    part = cache.replace(k=cache.k[:, :, :c1], v=cache.v[:, :, :c1])
    out = run_layers(params, cfg, h_bnd[:, c0:c1], positions_bn[:, c0:c1], mask_bcs, part, slots_bn[:, c0:c1],
                     start, end)
    cache = cache.replace(k=cache.k.at[:, :, :c1].set(out.cache.k), v=cache.v.at[:, :, :c1].set(out.cache.v))
    outs.append(out.h_btd)
  return jnp.concatenate(outs, axis=1), cache


def forward(params: Params, cfg: LlamaConfig, tokens_bt: jax.Array, positions_bt: jax.Array, mask_bts: jax.Array,
            cache: KVCache, slots_bt: jax.Array, visible_lbs: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
  """All layers; returns final hidden states [B, T, D] (before the final norm) and the written cache."""
  out = run_layers(params, cfg, embed(params, cfg, tokens_bt), positions_bt, mask_bts, cache, slots_bt,
                   visible_lbs=visible_lbs)
  return out.h_btd, out.cache
