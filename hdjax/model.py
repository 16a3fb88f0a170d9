"""LLaMA as Flax Linen modules used purely: params and KV cache are explicit pytrees.

Shape letters: B batch, T new tokens, S cache slots, D d_model, N query heads, K kv heads, G query heads
per kv head, H head_dim, F ffn_dim, V vocab, L layers.

Each decoder layer has its own weight buffers (`params["layers"]` is a tuple of L dicts) and the layers of any
static range [start, end) run one after the other, so no step slices weights out of a stack (a `lax.scan` over
stacked bf16 weights ran ~6x slower per step on XLA:CPU). The residual stream, norms, RoPE and softmax are fp32;
every weight contraction takes its inputs in the weights' dtype (`cfg.dtype`) and accumulates in fp32.
Every step writes its new K/V rows into the cache at explicit `slots` (out-of-range slots are dropped) and
attends through an explicit boolean mask [B, T, S], so prefill, decoding, draft trees and pruned prefill
differ only in their positions, slots and mask; a prefill instead attends blockwise among its own tokens.
`run_layers` is the one layer runner all of them (and LazyLLM's per-layer live tokens) go through.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, TypeVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from hdjax import sharding
from hdjax.attention import apply_rope, attend, blocked_causal_attention, rope_sin_cos
from hdjax.config import FUSED_WEIGHTS, WEIGHT_AXES, LlamaConfig
from hdjax.control import run_if
from hdjax.kvcache import KVCache

Params = dict[str, Any]
Carry = TypeVar("Carry")


class RMSNorm(nn.Module):
  """RMS norm in fp32 (its output feeds a contraction that casts it to the weights' dtype)."""

  eps: float

  @nn.compact
  def __call__(self, x_btd):
    scale_d = self.param("scale", nn.initializers.ones, (x_btd.shape[-1],), jnp.float32)
    x = x_btd.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps) * scale_d


def contract(spec: str, x: jax.Array, w: jax.Array, feature_major_rows: int = 0) -> jax.Array:
  """A weight contraction "x_axes,w_axes->out_axes": the activation is cast to the weight's dtype and the sum
  accumulates in fp32 (bf16 dots without an fp32 result are slow on XLA:CPU, and fail on its unfused path).

  Over at most `feature_major_rows` rows (the product of x's kept axes) the weight's own output axes come first:
  W @ X^T into a feature-major result, transposed after an optimization barrier (without it XLA folds the
  transpose back into the dot). With W stored [out, in], XLA:CPU's fp32 30-layer step ran ~1.1x faster at 1 row and
  1.4-1.7x at 4-8 rows that way on an AVX2 host (docs/results/engine-steps.md)."""
  x_axes, w_axes = spec.split("->")[0].split(",")
  out_axes = spec.split("->")[1]
  x = x.astype(w.dtype)
  rows = math.prod(n for axis, n in zip(x_axes, x.shape) if axis in out_axes)
  if rows > feature_major_rows:
    return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
  feature_major = "".join(a for a in w_axes if a in out_axes) + "".join(a for a in x_axes if a in out_axes)
  y = jnp.einsum(f"{w_axes},{x_axes}->{feature_major}", w, x, preferred_element_type=jnp.float32)
  return jnp.einsum(f"{feature_major}->{out_axes}", jax.lax.optimization_barrier(y))


def write_kv(k_lbksh: jax.Array, v_lbksh: jax.Array, layer_idx, slots_bt: jax.Array, k_btkh: jax.Array,
             v_btkh: jax.Array) -> tuple[jax.Array, jax.Array]:
  """K/V rows of layer `layer_idx` written at `slots_bt` (slots >= S are dropped)."""
  b_idx = jnp.arange(slots_bt.shape[0])[:, None]
  # the indexed view of a [L, B, K, S, H] cache at (layer, b, :, slot) is [B, T, K, H]
  return (k_lbksh.at[layer_idx, b_idx, :, slots_bt].set(k_btkh.astype(k_lbksh.dtype), mode="drop"),
          v_lbksh.at[layer_idx, b_idx, :, slots_bt].set(v_btkh.astype(v_lbksh.dtype), mode="drop"))


def layer_weights(cfg: LlamaConfig) -> tuple[str, ...]:
  """The weights each decoder layer stores in the config's layout (`config.WEIGHT_AXES` keys): q/k/v and gate/up
  apart, or each set as one fused weight (`EngineLayout.fused_qkv`, `fused_gate_up`)."""
  qkv = ("qkv",) if cfg.engine.fuses("qkv") else FUSED_WEIGHTS["qkv"]
  gate_up = ("gate_up",) if cfg.engine.fuses("gate_up") else FUSED_WEIGHTS["gate_up"]
  return qkv + ("o",) + gate_up + ("down",)


def fuse(cfg: LlamaConfig, fused: str, parts: list[jax.Array]) -> jax.Array:
  """The fused weight `fused` (a key of `config.FUSED_WEIGHTS`) from its parts, all in the config's axes: the query
  heads N split into (K, G), each other part one entry of C. numpy parts give a numpy result."""
  axes = cfg.weight_axes(fused)
  c = axes.index("C")
  xp = np if all(isinstance(w, np.ndarray) for w in parts) else jnp
  pieces = []
  for weight, w in zip(FUSED_WEIGHTS[fused], parts):
    if "N" in cfg.weight_axes(weight):  # N sits where K, C sit in the fused axes
      pieces.append(w.reshape(w.shape[:c - 1] + (cfg.n_kv_heads, cfg.q_per_kv) + w.shape[c:]))
    else:
      pieces.append(w[(slice(None),) * c + (None,)])
  return xp.concatenate(pieces, axis=c)


def unfuse(cfg: LlamaConfig, fused: str, w: jax.Array) -> dict[str, jax.Array]:
  """The parts of the fused weight `w` (config's axes), each in the config's axes: `fuse`'s inverse."""
  c = cfg.weight_axes(fused).index("C")
  parts, start = {}, 0
  for weight in FUSED_WEIGHTS[fused]:
    if "N" in cfg.weight_axes(weight):
      part = w[(slice(None),) * c + (slice(start, start + cfg.q_per_kv),)]
      parts[weight] = part.reshape(part.shape[:c - 1] + (cfg.n_heads,) + part.shape[c + 1:])
      start += cfg.q_per_kv
    else:
      parts[weight] = w[(slice(None),) * c + (start,)]
      start += 1
  return parts


def fused_holder(cfg: LlamaConfig, weight: str) -> str | None:
  """The fused weight that holds `weight` in the config's layout, or None when it is stored on its own."""
  return next((f for f, parts in FUSED_WEIGHTS.items() if weight in parts and cfg.engine.fuses(f)), None)


def layer_weight(cfg: LlamaConfig, layer: Params, weight: str) -> jax.Array:
  """`weight` of one layer's params in the config's axes, cut out of the fused weight that holds it if any (a
  reader of one part, e.g. LazyLLM's scoring of keys)."""
  fused = fused_holder(cfg, weight)
  if fused is None:
    return layer[cfg.weight_name(weight)]
  return unfuse(cfg, fused, layer[cfg.weight_name(fused)])[weight]


def project(cfg: LlamaConfig, weight: str, w: jax.Array, x: jax.Array, x_axes: str, out_axes: str) -> jax.Array:
  """The contraction of activations `x` (axes `x_axes`) with `weight` (a key of `config.WEIGHT_AXES`) stored in the
  config's layout."""
  return contract(f"{x_axes},{cfg.weight_axes(weight)}->{out_axes}", x, w, cfg.engine.feature_major_rows)


class DecoderLayer(nn.Module):
  """One pre-norm decoder layer over an fp32 residual stream. `__call__` attends through the full stacked cache at
  layer `layer_idx`; `prefill` attends blockwise among a prompt's own tokens."""

  cfg: LlamaConfig

  def setup(self):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    init = nn.initializers.normal(0.02)
    self.weights = {w: self.param(cfg.weight_name(w), init, cfg.weight_shape(w), dtype) for w in layer_weights(cfg)}
    self.attn_norm = RMSNorm(cfg.rms_eps)
    self.mlp_norm = RMSNorm(cfg.rms_eps)

  def project(self, weight: str, x, x_axes: str, out_axes: str):
    return project(self.cfg, weight, self.weights[weight], x, x_axes, out_axes)

  def project_qkv(self, h_btd, sin_bth, cos_bth):
    """Queries [B, T, N, H] and keys [B, T, K, H] after RoPE, values [B, T, K, H]; all fp32."""
    x_btd, g = self.attn_norm(h_btd), self.cfg.q_per_kv
    if self.cfg.engine.fused_qkv:
      # [B, T, K, G + 2, H]: each kv head's G queries, its key, its value
      qkv_btkch = self.project("qkv", x_btd, "BTD", "BTKCH")
      b, t, k, _, h = qkv_btkch.shape
      q_btnh = qkv_btkch[:, :, :, :g].reshape(b, t, k * g, h)
      k_btkh, v_btkh = qkv_btkch[:, :, :, g], qkv_btkch[:, :, :, g + 1]
    else:
      q_btnh = self.project("q", x_btd, "BTD", "BTNH")
      k_btkh = self.project("k", x_btd, "BTD", "BTKH")
      v_btkh = self.project("v", x_btd, "BTD", "BTKH")
    return apply_rope(q_btnh, sin_bth, cos_bth), apply_rope(k_btkh, sin_bth, cos_bth), v_btkh

  def finish(self, h_btd, attn_btnh):
    """The output projection's residual, then the MLP's."""
    b, t, n, hd = attn_btnh.shape
    # one contraction over the heads' outputs flattened in (head, dim) order, E = N * H: as "BTNH,NHD->BTD",
    # XLA:CPU chose to copy the whole [N, H, D] weight into (dim, head) order every step (~0.08 ms per layer,
    # profiled) instead of the activation
    o_axes = self.cfg.weight_axes("o").replace("NH", "E")
    o_e = self.weights["o"].reshape([n * hd if a == "E" else -1 for a in o_axes])
    h_btd = h_btd + contract(f"BTE,{o_axes}->BTD", attn_btnh.reshape(b, t, n * hd), o_e,
                             self.cfg.engine.feature_major_rows)
    x_btd = self.mlp_norm(h_btd)
    if self.cfg.engine.fused_gate_up:
      # [B, T, 2, F]: gate, up
      gate_up_btcf = self.project("gate_up", x_btd, "BTD", "BTCF")
      gate_btf, up_btf = gate_up_btcf[:, :, 0], gate_up_btcf[:, :, 1]
    else:
      gate_btf = self.project("gate", x_btd, "BTD", "BTF")
      up_btf = self.project("up", x_btd, "BTD", "BTF")
    return h_btd + self.project("down", jax.nn.silu(gate_btf) * up_btf, "BTF", "BTD")

  def prefill(self, h_btd, sin_bth, cos_bth, positions_bt, k_lbksh, v_lbksh, slots_bt, layer_idx, block):
    """A prompt's layer: K/V written at `slots_bt` (0..T-1; >= S for padding, which is never attended), queries
    attending blockwise and causally among the T tokens themselves (`blocked_causal_attention`)."""
    q_btnh, k_btkh, v_btkh = self.project_qkv(h_btd, sin_bth, cos_bth)
    k_lbksh, v_lbksh = write_kv(k_lbksh, v_lbksh, layer_idx, slots_bt, k_btkh, v_btkh)
    # the dots take the narrower of the cache's and the weights' dtypes (bf16 weights over an fp32 cache on CPU:
    # the prefill's large blocks are where bf16 pays)
    dtype = min(k_lbksh.dtype, jnp.dtype(self.cfg.dtype), key=lambda d: d.itemsize)
    attn_btnh = blocked_causal_attention(q_btnh, k_btkh.astype(dtype), v_btkh.astype(dtype), positions_bt,
                                         slots_bt < k_lbksh.shape[3], block,
                                         skip_future=self.cfg.engine.key_block > 0)
    return self.finish(h_btd, attn_btnh), k_lbksh, v_lbksh

  def __call__(self, h_btd, sin_bth, cos_bth, mask_bts, k_lbksh, v_lbksh, slots_bt, layer_idx):
    """Rows run padded to a multiple of `cfg.engine.row_multiple` with copies of the last row (which write its K/V
    again)."""
    t, rows = h_btd.shape[1], self.cfg.engine.row_multiple
    h_btd, sin_bth, cos_bth, mask_bts, slots_bt = (
        pad_rows(x, rows) for x in (h_btd.astype(jnp.float32), sin_bth, cos_bth, mask_bts, slots_bt))
    q_btnh, k_btkh, v_btkh = self.project_qkv(h_btd, sin_bth, cos_bth)
    k_lbksh, v_lbksh = write_kv(k_lbksh, v_lbksh, layer_idx, slots_bt, k_btkh, v_btkh)
    attn_btnh = attend(q_btnh, k_lbksh, v_lbksh, layer_idx, mask_bts, self.cfg.engine.key_block)
    return self.finish(h_btd, attn_btnh)[:, :t], k_lbksh, v_lbksh


class Embedder(nn.Module):
  """Token embedding, final norm and LM head (tied to the embedding when the config says so; a tied head may also
  be kept as its own copy, `cfg.engine.untie_head`, which `with_layout` fills)."""

  cfg: LlamaConfig

  def setup(self):
    cfg = self.cfg
    dtype = jnp.dtype(cfg.dtype)
    self.embedding_vd = self.param("embedding_vd", nn.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model),
                                   dtype)
    self.final_norm = RMSNorm(cfg.rms_eps)
    if has_own_head(cfg):
      self.lm_head = self.param(cfg.weight_name("lm_head"), nn.initializers.normal(0.02),
                                cfg.weight_shape("lm_head"), dtype)

  def encode(self, tokens_bt):
    return jnp.take(self.embedding_vd, tokens_bt, axis=0).astype(jnp.float32)

  def normalize(self, h_btd):
    return self.final_norm(h_btd)

  def decode(self, x_btd):
    """Logits [B, T, V] in fp32 from already-normalized hidden states (rows padded to `cfg.engine.row_multiple`)."""
    t = x_btd.shape[1]
    x_btd = pad_rows(x_btd, self.cfg.engine.row_multiple)
    if has_own_head(self.cfg):
      return project(self.cfg, "lm_head", self.lm_head, x_btd, "BTD", "BTV")[:, :t]
    return contract("BTD,VD->BTV", x_btd, self.embedding_vd, self.cfg.engine.feature_major_rows)[:, :t]

  def __call__(self, tokens_bt):
    h = self.encode(tokens_bt)
    return self.decode(self.normalize(h))


def has_own_head(cfg: LlamaConfig) -> bool:
  """Whether the embedder holds an LM head weight apart from the embedding (`cfg.weight_name("lm_head")`)."""
  return not cfg.tie_embeddings or cfg.engine.untie_head


def head_weight(cfg: LlamaConfig, embedder: Params) -> tuple[jax.Array, str]:
  """The LM head's weight and its axes ("DV" or "VD")."""
  if has_own_head(cfg):
    return embedder[cfg.weight_name("lm_head")], cfg.weight_axes("lm_head")
  return embedder["embedding_vd"], "VD"


def with_layout(cfg: LlamaConfig, params: Params) -> Params:
  """Params in the config's weight layout, from params in any (each weight transposed and renamed where its
  stored layout differs; `config.WEIGHT_AXES`), q/k/v and gate/up fused or split as the config stores them
  (`fuse`, `unfuse`; once, at load), with the LM head a tied model keeps as its own copy exactly when the config
  wants one (`cfg.engine.untie_head`: the embedding's transpose, added or dropped here). Loaders and checkpoints
  hold the input-major unfused layout, or any other; the engine's steps expect the config's."""
  def relayout(tree: Params) -> Params:
    out = {}
    for name, x in tree.items():
      weight, _, axes = name.rpartition("_")
      if weight in WEIGHT_AXES and axes.upper() in WEIGHT_AXES[weight]:
        want = cfg.weight_axes(weight)
        x = x.transpose([axes.upper().index(a) for a in want])
        name = cfg.weight_name(weight)
      out[name] = x
    return out

  def fuse_or_split(layer: Params) -> Params:
    for fused, parts in FUSED_WEIGHTS.items():
      name = cfg.weight_name(fused)
      if cfg.engine.fuses(fused) and name not in layer:
        layer[name] = fuse(cfg, fused, [layer.pop(cfg.weight_name(p)) for p in parts])
      elif not cfg.engine.fuses(fused) and name in layer:
        layer.update({cfg.weight_name(p): w for p, w in unfuse(cfg, fused, layer.pop(name)).items()})
    return layer

  embedder = relayout(params["embedder"])
  if cfg.tie_embeddings:
    embedder = {k: v for k, v in embedder.items() if not k.startswith("lm_head_")}
    if cfg.engine.untie_head:
      embedder[cfg.weight_name("lm_head")] = embedder["embedding_vd"].transpose(
          ["VD".index(a) for a in cfg.weight_axes("lm_head")])
  return dict(params, embedder=embedder, layers=tuple(fuse_or_split(relayout(layer)) for layer in params["layers"]))


def pad_rows(x_bt: jax.Array, multiple: int) -> jax.Array:
  """`x` with its axis 1 padded up to a multiple of `multiple` with copies of its last entry."""
  extra = -x_bt.shape[1] % multiple
  if not extra:
    return x_bt
  pad = [(0, 0)] * x_bt.ndim
  pad[1] = (0, extra)
  return jnp.pad(x_bt, pad, mode="edge")


def init_params(cfg: LlamaConfig, key: jax.Array) -> Params:
  """Random params: {'embedder': ..., 'layers': a tuple of L per-layer dicts}; drawn in the input-major layout
  and then put in the config's, so a key gives the same model in either layout."""
  k_emb, k_layers = jax.random.split(key)
  drawn = cfg.input_major()
  embedder = Embedder(drawn).init(k_emb, jnp.zeros((1, 1), jnp.int32))["params"]
  layer = DecoderLayer(drawn)
  dummy = _dummy_layer_inputs(cfg)
  stacked = jax.vmap(lambda k: layer.init(k, *dummy)["params"])(jax.random.split(k_layers, cfg.n_layers))
  layers = tuple(jax.tree.map(lambda x, i=i: x[i], stacked) for i in range(cfg.n_layers))
  return with_layout(cfg, {"embedder": embedder, "layers": layers})


def timing_params(cfg: LlamaConfig, seed: int = 0) -> Params:
  """Random params for timing steps: every weight N(0, 0.02^2) in `cfg.dtype`, every norm scale 1 (fp32), in the
  config's layout. Each leaf is drawn on its own by the `unsafe_rbg` generator, so the few programs this compiles
  are one RNG op per distinct shape: `jax.jit(init_params)` traces flax's init of a layer (its forward included)
  and took over 40 s to compile on an H200 for SmolLM2-135M, against 5.6 s on a CPU."""
  shapes = param_shapes(cfg)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  keys = jax.random.split(jax.random.key(seed, impl="unsafe_rbg"), len(leaves))

  def draw(path, leaf, key):
    if any(getattr(k, "key", None) == "scale" for k in path):
      return jnp.ones(leaf.shape, jnp.float32)
    return (0.02 * jax.random.normal(key, leaf.shape, jnp.float32)).astype(cfg.dtype)

  return jax.tree_util.tree_unflatten(treedef, [draw(path, leaf, k) for (path, leaf), k in zip(leaves, keys)])


def _dummy_layer_inputs(cfg: LlamaConfig):
  kv = jnp.zeros((1, 1, cfg.n_kv_heads, 1, cfg.head_dim), jnp.dtype(cfg.engine.cache_dtype))
  hd = jnp.zeros((1, 1, cfg.head_dim), jnp.float32)
  return (jnp.zeros((1, 1, cfg.d_model), jnp.float32), hd, hd, jnp.ones((1, 1, 1), bool), kv, kv,
          jnp.zeros((1, 1), jnp.int32), 0)


def param_shapes(cfg: LlamaConfig) -> Params:
  """Abstract params (ShapeDtypeStructs), e.g. an orbax restore target."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def embed(params: Params, cfg: LlamaConfig, tokens_bt: jax.Array) -> jax.Array:
  """Embeddings [B, T, D] in fp32 (the residual stream's dtype)."""
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
  hidden_lbtd: jax.Array | None  # [end - start + 1, B, T, D]: the state after start + i layers, when requested


def layer_params(params: Params, idx: int) -> Params:
  """The weights of decoder layer `idx` (a Python int: each layer has its own buffers)."""
  return params["layers"][idx]


def run_layers(params: Params, cfg: LlamaConfig, h_btd: jax.Array, positions_bt: jax.Array,
               mask_bts: jax.Array | None, cache: KVCache, slots_bt: jax.Array, start: int = 0, end: int | None = None,
               collect_hidden: bool = False, visible_lbs: jax.Array | None = None, live_lbt: jax.Array | None = None,
               prefill_block: int | None = None) -> LayerOut:
  """Runs decoder layers [start, end) (static), one after the other on their own weight buffers: the one layer
  runner behind every forward (full, ranged, per-layer visible, per-layer live, prefill).

  positions_bt: RoPE positions of the T tokens. slots_bt: cache slots their K/V rows go to (>= S drops the
  row). mask_bts: which cache slots each token attends to, including the slots written in this call; with
  `visible_lbs` [L, B, S], layer l also needs visible_lbs[l]. `live_lbt` [end - start, B, T]: token t is computed
  at layer start + i only if live[i, b, t]; one that is not keeps its state and writes nothing. `prefill_block`:
  the T tokens are prompts in position order at slots 0..T-1 (padding at >= S) and attend among themselves in
  blocks of that many rows (`DecoderLayer.prefill`; `mask_bts` unused, never a [T, S] mask). `collect_hidden`:
  also return the state after start + i layers, for i = 0..end - start.
  Does not move `cache.lengths`: committing is the caller's decision.

  Outside a prefill, with `cfg.engine.layer_programs` (the CPU layout), each layer is a computation of its own
  (`control.run_if`; a layer in which no token writes a slot is skipped and its tokens keep their states), so XLA
  fuses a layer alike wherever it runs: in a decode or verify step of all layers, a range of them, or one layer of
  AdaDecode's loop. On XLA:CPU bf16, fusing a layer with its neighbours rounds some activations differently, and
  the exit-head methods' deferred layers must compute `ar`'s logits bit for bit. Without it (GPU, TPU) the layers
  are straight-line code with no control flow, which XLA fuses across layers and a GPU runs without reading a
  predicate on the host.
  """
  end = cfg.n_layers if end is None else end
  h_btd = sharding.constrain(h_btd.astype(jnp.float32), sharding.ACTIVATION_AXES["h_btd"])
  sin_bth, cos_bth = rope_sin_cos(cfg, positions_bt)
  layer = DecoderLayer(cfg)
  k, v, hidden = cache.k, cache.v, [h_btd]
  for idx in range(start, end):
    live_bt = None if live_lbt is None else live_lbt[idx - start]
    slots = slots_bt if live_bt is None else jnp.where(live_bt, slots_bt, cache.num_slots)
    bound = layer.bind({"params": layer_params(params, idx)})
    if prefill_block is None:
      mask = mask_bts if visible_lbs is None else mask_bts & visible_lbs[idx][:, None, :]
      step = functools.partial(_layer_step, bound, sin_bth, cos_bth, mask, slots, idx)
      new_h, k, v = written_only(cfg, slots, cache.num_slots, step, (h_btd, k, v))
    else:
      new_h, k, v = bound.prefill(h_btd, sin_bth, cos_bth, positions_bt, k, v, slots, idx, prefill_block)
    h_btd = new_h if live_bt is None else jnp.where(live_bt[:, :, None], new_h, h_btd)
    hidden.append(h_btd)
  hidden_lbtd = jnp.stack(hidden) if collect_hidden else None
  return LayerOut(h_btd, sharding.constrain_cache(cache.replace(k=k, v=v)), hidden_lbtd)


def written_only(cfg: LlamaConfig, slots: jax.Array, num_slots: int, step: Callable[[Carry], Carry],
                 carry: Carry) -> Carry:
  """`step(carry)`: with `cfg.engine.layer_programs` a computation of its own, skipped (carry unchanged) when no
  row writes a slot (`control.run_if`); else inline."""
  if not cfg.engine.layer_programs:
    return step(carry)
  return run_if(jnp.any(slots < num_slots), step, carry)


def _layer_step(bound: DecoderLayer, sin_bth, cos_bth, mask_bts, slots_bt, idx: int, carry):
  """`run_layers`' step of one layer over the carry (h, k, v)."""
  h_btd, k, v = carry
  return bound(h_btd, sin_bth, cos_bth, mask_bts, k, v, slots_bt, idx)


def forward(params: Params, cfg: LlamaConfig, tokens_bt: jax.Array, positions_bt: jax.Array, mask_bts: jax.Array,
            cache: KVCache, slots_bt: jax.Array, visible_lbs: jax.Array | None = None) -> tuple[jax.Array, KVCache]:
  """All layers; returns final hidden states [B, T, D] (before the final norm) and the written cache."""
  out = run_layers(params, cfg, embed(params, cfg, tokens_bt), positions_bt, mask_bts, cache, slots_bt,
                   visible_lbs=visible_lbs)
  return out.h_btd, out.cache


def step_logits(params: Params, cfg: LlamaConfig, tokens_bt: jax.Array, positions_bt: jax.Array, mask_bts: jax.Array,
                cache: KVCache, slots_bt: jax.Array, visible_lbs: jax.Array | None = None
                ) -> tuple[jax.Array, KVCache]:
  """One decoding step through all layers and the LM head: logits [B, T, V] fp32 and the written cache.

  With `cfg.engine.layer_programs` the step runs under `control.run_if`, as a computation of its own that XLA fuses
  alike wherever it is traced (a decode loop, a verify step, a branch of a switch): on XLA:CPU bf16 another fusion
  of the same math rounds some activations differently, and a lossless method's logits must equal the decode
  step's bit for bit. A step in which no row writes a slot (every sequence done) is then skipped (zero logits,
  cache unchanged). On GPU and TPU it is straight-line code, one shape for decode and verify
  (`EngineLayout.one_step_shape`).
  """
  def run(carry):
    _, cache = carry
    h_btd, cache = forward(params, cfg, tokens_bt, positions_bt, mask_bts, cache, slots_bt, visible_lbs)
    return unembed(params, cfg, h_btd), cache

  logits = jnp.zeros(tokens_bt.shape + (cfg.vocab_size,), jnp.float32)
  return written_only(cfg, slots_bt, cache.num_slots, run, (logits, cache))
