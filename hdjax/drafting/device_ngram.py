"""The context database and PLD on the device: n-gram matches over each sequence's token buffer, in pure JAX.

The same rules as the host `NgramDrafter` (`context_db.py`, kept as the reference), with static shapes and no
host callback, so a jitted decoding loop can draft without leaving the device:

- the buffer `tokens_bs` [B, S] holds each sequence's prompt and generated tokens (the root, the last accepted
  token, included); `lengths_b` [B] counts them, and slots at or past it are ignored;
- for each key size n (longest first), the key is the last n tokens; an occurrence ends at e (the n-gram is
  [e - n, e)) with n <= e < length, and proposes the tokens [e, min(e + depth, length));
- only the `max_occurrences` most recent occurrences of a key count, the current suffix (e = length) among them,
  as the host index remembers them; they are tried newest first;
- a chain equal to an earlier one (from this key size or a longer one) is skipped; the first `max_candidates`
  (at most `max_chains`) distinct chains are returned, best first, padded with -1 to [B, chains, depth].
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from hdjax.drafting.context_db import NgramConfig

PAD = -1


@dataclasses.dataclass(frozen=True)
class DeviceNgramConfig:
  """Static (hashable) settings of one device n-gram drafter."""

  key_sizes: tuple[int, ...]  # tried in this order (longest first in PLD and HD's context tier)
  num_chains: int  # chains returned per sequence: min(max_chains, max_candidates) of the host drafter
  depth: int  # tokens per chain
  max_occurrences: int = 32  # most recent occurrences remembered per key, the current suffix included

  @classmethod
  def like(cls, host: NgramConfig, max_chains: int, depth: int) -> "DeviceNgramConfig":
    """The device twin of a host `NgramDrafter(host)` asked for `max_chains` chains of `depth` tokens."""
    return cls(tuple(host.key_sizes), min(max_chains, host.max_candidates), depth, host.max_occurrences)


def _candidates(tokens_s: jax.Array, length: jax.Array, n: int, num: int) -> jax.Array:
  """End positions e of the `num` most recent earlier occurrences of the last n tokens, newest first; -1 where
  there are fewer (or length < n)."""
  size = tokens_s.shape[0]
  ends_s = jnp.arange(size, dtype=jnp.int32)
  key_n = tokens_s[jnp.clip(length - n + jnp.arange(n), 0, size - 1)]
  match_s = (ends_s >= n) & (ends_s < length) & (length >= n)
  for i in range(n):  # the n-gram ending at e is tokens[e - n + i], i < n
    match_s &= tokens_s[jnp.clip(ends_s - n + i, 0, size - 1)] == key_n[i]
  top, _ = jax.lax.top_k(jnp.where(match_s, ends_s, -1), min(num, size))
  if num > size:
    top = jnp.concatenate([top, jnp.full((num - size,), -1, jnp.int32)])
  return top


def draft_one(tokens_s: jax.Array, length: jax.Array, config: DeviceNgramConfig) -> jax.Array:
  """[chains, depth] chains of one sequence (see the module docstring), padded with -1."""
  size = tokens_s.shape[0]
  per_key = config.max_occurrences - 1  # the current suffix takes one place of the host's deque and never drafts
  ends_c = jnp.concatenate([_candidates(tokens_s, length, n, per_key) for n in config.key_sizes])
  offsets_cd = ends_c[:, None] + jnp.arange(config.depth, dtype=jnp.int32)[None, :]
  real_cd = (ends_c[:, None] >= 0) & (offsets_cd < length)
  chains_cd = jnp.where(real_cd, tokens_s[jnp.clip(offsets_cd, 0, size - 1)], PAD)
  num_cand = chains_cd.shape[0]
  # a candidate is kept when it exists and no earlier candidate holds the same chain
  same_cc = jnp.all(chains_cd[:, None, :] == chains_cd[None, :, :], axis=-1)
  earlier_cc = jnp.arange(num_cand)[None, :] < jnp.arange(num_cand)[:, None]
  kept_c = (ends_c >= 0) & ~jnp.any(same_cc & earlier_cc & (ends_c >= 0)[None, :], axis=1)
  # the first num_chains kept candidates, in candidate order
  rank_c = jnp.cumsum(kept_c) - 1
  dest_c = jnp.where(kept_c & (rank_c < config.num_chains), rank_c, config.num_chains)
  out = jnp.full((config.num_chains, config.depth), PAD, jnp.int32)
  return out.at[dest_c].set(chains_cd.astype(jnp.int32), mode="drop")


@functools.partial(jax.jit, static_argnames=("config",))
def draft(tokens_bs: jax.Array, lengths_b: jax.Array, config: DeviceNgramConfig) -> jax.Array:
  """[B, chains, depth] chains per sequence, best first, padded with -1 (jitted; `draft_one` vmapped)."""
  return device_draft(tokens_bs, lengths_b, config)


def device_draft(tokens_bs: jax.Array, lengths_b: jax.Array, config: DeviceNgramConfig) -> jax.Array:
  """The traceable form of `draft`, for use inside a jitted loop."""
  return jax.vmap(functools.partial(draft_one, config=config))(tokens_bs, lengths_b.astype(jnp.int32))
