"""RoPE and attention masks over cache slots. All masks are boolean, True meaning "may attend"."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from hdjax.config import LlamaConfig


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
  """Inverse frequencies [head_dim // 2], with Llama-3 scaling when configured."""
  inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float64) / cfg.head_dim))
  rs = cfg.rope_scaling
  if rs is None:
    return inv_freq.astype(np.float32)
  low_wavelen = rs.original_max_position / rs.low_freq_factor
  high_wavelen = rs.original_max_position / rs.high_freq_factor
  wavelen = 2 * np.pi / inv_freq
  scaled = np.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
  smooth = (rs.original_max_position / wavelen - rs.low_freq_factor) / (rs.high_freq_factor - rs.low_freq_factor)
  smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
  is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
  return np.where(is_medium, smoothed, scaled).astype(np.float32)


def rope_sin_cos(cfg: LlamaConfig, positions_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """sin, cos tables [B, T, head_dim] for HF's rotate-half convention."""
  # [B, T, H/2]
  angles = positions_bt[..., None].astype(jnp.float32) * jnp.asarray(rope_inv_freq(cfg))
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.sin(angles), jnp.cos(angles)


def apply_rope(x_btnh: jax.Array, sin_bth: jax.Array, cos_bth: jax.Array) -> jax.Array:
  half = x_btnh.shape[-1] // 2
  rotated = jnp.concatenate([-x_btnh[..., half:], x_btnh[..., :half]], axis=-1)
  out = x_btnh.astype(jnp.float32) * cos_bth[:, :, None, :] + rotated.astype(jnp.float32) * sin_bth[:, :, None, :]
  return out.astype(x_btnh.dtype)


def causal_mask(query_slots_bt: jax.Array, cache_len: int) -> jax.Array:
  """[B, T, S]: a query written at slot p sees every slot <= p (slot == position for plain decoding)."""
  return jnp.arange(cache_len)[None, None, :] <= query_slots_bt[:, :, None]


def prefix_plus_block_mask(prefix_len_b: jax.Array, block_mask_btt: jax.Array, cache_len: int) -> jax.Array:
  """[B, T, S]: each of T block tokens, written at slots prefix_len + [0, T), sees the committed prefix
  (slots < prefix_len) and the block slots its [T, T] block mask allows (a tree mask, or causal)."""
  s = jnp.arange(cache_len)[None, None, :]
  offset = s - prefix_len_b[:, None, None]  # [B, 1, S]
  in_block = (offset >= 0) & (offset < block_mask_btt.shape[-1])
  block = jnp.take_along_axis(
      block_mask_btt, jnp.broadcast_to(jnp.clip(offset, 0, block_mask_btt.shape[-1] - 1),
                                       block_mask_btt.shape[:2] + (cache_len,)), axis=-1)
  return (offset < 0) | (in_block & block)


def _block_step(carry, q_bkmh, keys_bkeh, values_bkeh, mask_bme):
  """One block of E keys into an online softmax, in the batch-major layouts the dots want (M = G * T query rows per
  kv head, g-major). carry: running max [B, K, M] and the weighted sums of [values, 1] [B, K, M, H + 1], fp32.

  The softmax's denominator is the last column of the same contraction as its numerator (the values with a column
  of ones): XLA:CPU's dot folds its terms in slot order, so a query whose visible slots are the same keys in the same
  order, with masked slots between them, gets bitwise the same result (a reduce over the slots does not), which
  `verify.trusted_nodes` relies on. A block whose keys are all masked leaves the carry bitwise unchanged."""
  max_bkm, acc_bkmx = carry
  # [B, K, M, E]
  logits = jnp.einsum("BKMH,BKEH->BKME", q_bkmh, keys_bkeh, preferred_element_type=jnp.float32)
  logits = jnp.where(mask_bme[:, None], logits * q_bkmh.shape[-1] ** -0.5, jnp.finfo(jnp.float32).min)
  new_max = jnp.maximum(max_bkm, jnp.max(logits, axis=-1))
  probs = jnp.where(mask_bme[:, None], jnp.exp(logits - new_max[..., None]), 0.0)
  scale = jnp.exp(max_bkm - new_max)
  values_bkex = jnp.concatenate([values_bkeh, jnp.ones(values_bkeh.shape[:-1] + (1,), values_bkeh.dtype)], axis=-1)
  return new_max, acc_bkmx * scale[..., None] + jnp.einsum(
      "BKME,BKEX->BKMX", probs.astype(values_bkeh.dtype), values_bkex, preferred_element_type=jnp.float32)


def _online_init(b: int, k: int, m: int, h: int):
  return jnp.full((b, k, m), jnp.finfo(jnp.float32).min), jnp.zeros((b, k, m, h + 1))


def _queries_bkmh(q_btnh: jax.Array, k: int, dtype) -> jax.Array:
  """[B, T, N, H] -> [B, K, G * T, H]: each kv head's G query heads stacked along M."""
  b, t, n, h = q_btnh.shape
  return q_btnh.astype(dtype).reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4).reshape(b, k, n // k * t, h)


def _online_result(carry, t: int) -> jax.Array:
  """[B, T, N, H]: the softmax-weighted values (zeros for a query that saw no key)."""
  _, acc_bkmx = carry
  b, k, m, x = acc_bkmx.shape
  out_bkmh = acc_bkmx[..., :-1] / jnp.maximum(acc_bkmx[..., -1:], jnp.finfo(jnp.float32).tiny)
  return out_bkmh.reshape(b, k, m // t, t, x - 1).transpose(0, 3, 1, 2, 4).reshape(b, t, m // t * k, x - 1)


def key_block_of(slots: jax.Array, num_slots: int, block: int) -> jax.Array:
  """The block of `attend`'s online softmax that reads each slot (0 everywhere when the cache is one block)."""
  return slots // block if block and num_slots > block and num_slots % block == 0 else jnp.zeros_like(slots)


def visible_extent(mask_bts: jax.Array) -> jax.Array:
  """int32 scalar: one past the last slot that any query may see."""
  return jnp.max(jnp.where(jnp.any(mask_bts, axis=(0, 1)), jnp.arange(mask_bts.shape[-1]) + 1, 0))


def attend(q_btnh: jax.Array, k_lbksh: jax.Array, v_lbksh: jax.Array, layer: int, mask_bts: jax.Array,
           block: int) -> jax.Array:
  """Attention of T queries over the S cache slots of `layer` under a boolean mask; returns [B, T, N, H] fp32.
  Both contractions take the cache's dtype and accumulate in fp32.

  The slots are read in blocks of `block` (an online softmax), up to the block holding the last slot any query
  may see: a step costs what the used part of the cache costs, not the whole allocation. Block boundaries sit at
  fixed slots and a block with no visible slot is never read (a fully masked one would leave the sums bitwise
  unchanged anyway), so a query's result depends on its visible slots only, not on the other queries of the step.
  A cache of at most one block, or of a size that is not a multiple of it, is one block; so is every cache with
  `block` 0 (`EngineLayout.key_block` on GPU and TPU: one masked pass, no loop whose trip count the host reads).
  """
  b, t, n, h = q_btnh.shape
  _, _, k, s, _ = k_lbksh.shape
  q_bkmh = _queries_bkmh(q_btnh, k, k_lbksh.dtype)
  mask_bms = jnp.tile(mask_bts, (1, n // k, 1))
  init = _online_init(b, k, n // k * t, h)
  if not block or s <= block or s % block:  # one block (key_block_of says the same)
    return _online_result(_block_step(init, q_bkmh, k_lbksh[layer], v_lbksh[layer], mask_bms), t)

  def key_block(j, carry):
    def cut(x):  # [L, B, K, S, H] -> [B, K, block, H]
      return jax.lax.dynamic_slice(x, (layer, 0, 0, j * block, 0), (1, b, k, block, h))[0]

    return _block_step(carry, q_bkmh, cut(k_lbksh), cut(v_lbksh),
                       jax.lax.dynamic_slice_in_dim(mask_bms, j * block, block, axis=2))

  num_blocks = (visible_extent(mask_bts) + block - 1) // block
  return _online_result(jax.lax.fori_loop(0, num_blocks, key_block, init), t)


def blocked_causal_attention(q_btnh: jax.Array, keys_btkh: jax.Array, values_btkh: jax.Array,
                             positions_bt: jax.Array, valid_bt: jax.Array, block: int, skip_future: bool = True
                             ) -> jax.Array:
  """Causal self-attention of T tokens in position order, flash-style: queries and keys in blocks of `block`,
  a running max and sum in fp32 (online softmax), so no [heads, T, T] score tensor exists. Query i sees key j iff
  position_j <= position_i and j is valid. With `skip_future` the key blocks above the diagonal are never
  computed (a loop whose trip count depends on the query block); without it every key block is read, those above
  the diagonal fully masked, which leaves the result bitwise the same (a loop of a fixed trip count: what a GPU
  runs without reading a predicate on the host).

  T is padded up to a multiple of `block` (invalid keys). Returns [B, T, N, H] fp32; a query with no visible
  key gets zeros.
  """
  b, t, n, h = q_btnh.shape
  k = keys_btkh.shape[2]
  g, c = n // k, min(block, t)
  blocks = -(-t // c)
  if blocks * c != t:
    def pad(x):
      return jnp.pad(x, [(0, 0), (0, blocks * c - t)] + [(0, 0)] * (x.ndim - 2))

    out = blocked_causal_attention(pad(q_btnh), pad(keys_btkh), pad(values_btkh), pad(positions_bt),
                                   pad(valid_bt), c, skip_future)
    return out[:, :t]
  dtype = keys_btkh.dtype
  # Block-major, batch-major views: [blocks, B, K, rows, H]
  q_ibkmh = jnp.stack([_queries_bkmh(q_btnh[:, i * c:(i + 1) * c], k, dtype) for i in range(blocks)])
  k_jbkeh = keys_btkh.reshape(b, blocks, c, k, h).transpose(1, 0, 3, 2, 4)
  v_jbkeh = values_btkh.reshape(b, blocks, c, k, h).transpose(1, 0, 3, 2, 4)
  pos_jbc = positions_bt.reshape(b, blocks, c).swapaxes(0, 1)
  valid_jbc = valid_bt.reshape(b, blocks, c).swapaxes(0, 1)

  def query_block(_, xs):
    i, q_bkmh, qpos_bc = xs

    def key_block(j, carry):
      mask_bce = (pos_jbc[j][:, None, :] <= qpos_bc[:, :, None]) & valid_jbc[j][:, None, :]
      return _block_step(carry, q_bkmh, k_jbkeh[j], v_jbkeh[j], jnp.tile(mask_bce, (1, g, 1)))

    key_blocks = i + 1 if skip_future else blocks
    return None, _online_result(jax.lax.fori_loop(0, key_blocks, key_block, _online_init(b, k, g * c, h)), c)

  _, out_ibcnh = jax.lax.scan(query_block, None, (jnp.arange(blocks), q_ibkmh, pos_jbc))
  return out_ibcnh.swapaxes(0, 1).reshape(b, t, n, h)
