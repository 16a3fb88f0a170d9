"""KV cache pytree with a static slot count and per-sequence lengths (the cursor)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hdjax import sharding
from hdjax.config import LlamaConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """k, v: [L, B, K, S, H] (each kv head's slots contiguous: the attention dots read a layer's [B, K, S, H] as it
  lies, with no per-step transpose); lengths: [B] int32, the number of committed slots of each sequence.

  Slots at or past `lengths` hold stale or speculative rows; masks never let a query see them unless the
  caller wrote them in the same step. Rolling back is therefore only moving `lengths`.
  """

  k: jax.Array
  v: jax.Array
  lengths: jax.Array

  @property
  def num_slots(self) -> int:
    return self.k.shape[3]

  @property
  def batch(self) -> int:
    return self.k.shape[1]

  def replace(self, **changes) -> "KVCache":
    return dataclasses.replace(self, **changes)


def init_cache(cfg: LlamaConfig, batch: int, num_slots: int, dtype=None) -> KVCache:
  shape = (cfg.n_layers, batch, cfg.n_kv_heads, num_slots, cfg.head_dim)
  dtype = dtype or jnp.dtype(cfg.engine.cache_dtype)
  cache = KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), lengths=jnp.zeros((batch,), jnp.int32))
  return sharding.constrain_cache(cache)


def cache_shardings(mesh: jax.sharding.Mesh, cfg: LlamaConfig, batch: int, num_slots: int) -> KVCache:
  """A `KVCache` of NamedShardings for a cache of `batch` rows and `num_slots` slots (an in/out_shardings)."""
  kv = (cfg.n_layers, batch, cfg.n_kv_heads, num_slots, cfg.head_dim)
  specs = sharding.cache_specs({"k": kv, "v": kv, "lengths": (batch,)}, dict(mesh.shape))
  return KVCache(**{f: jax.sharding.NamedSharding(mesh, s) for f, s in specs.items()})


def rollback(cache: KVCache, lengths_b: jax.Array) -> KVCache:
  """Forgets every slot at or past `lengths_b` (only the cursor moves)."""
  return cache.replace(lengths=jnp.minimum(cache.lengths, lengths_b).astype(jnp.int32))


def commit_rows(cache: KVCache, src_slots_bn: jax.Array, num_accepted_b: jax.Array) -> KVCache:
  """Moves accepted speculative rows into place and advances the cursor.

  Row `src_slots_bn[b, i]` is copied to slot `lengths[b] + i` for i < num_accepted_b[b]; the other
  entries are ignored. Copies happen in increasing i and a source is never below its destination, so
  a chain that is already in place is a no-op copy.
  """
  batch, n = src_slots_bn.shape
  dst_bn = cache.lengths[:, None] + jnp.arange(n)[None, :]
  dst_bn = jnp.where(jnp.arange(n)[None, :] < num_accepted_b[:, None], dst_bn, cache.num_slots)  # drop
  b_idx = jnp.arange(batch)[:, None]
  src_bn = jnp.clip(src_slots_bn, 0, cache.num_slots - 1)

  def move(x_lbksh):
    rows_bnlkh = x_lbksh[:, b_idx, :, src_bn]
    return x_lbksh.at[:, b_idx, :, dst_bn].set(rows_bnlkh, mode="drop")

  return KVCache(k=move(cache.k), v=move(cache.v), lengths=(cache.lengths + num_accepted_b).astype(jnp.int32))
