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
