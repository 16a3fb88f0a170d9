"""`DecodeState`: the one state of every decoding loop on the device, and what the driver reads of it.

Every method's loop (`ar`, `lazy`, the speculative device loop, AdaDecode, the reviving loop of the `lazy+`
compositions) steps one `DecodeState` pytree, donated to each jitted run: each row's emitted tokens, counts and
stop flags, the KV cache, the random key and a step counter, then the method's own state in `method` (a pytree).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from hdjax.kvcache import KVCache


class DecodeState(NamedTuple):
  """A decoding loop's state (see the module docstring)."""

  tokens_bs: jax.Array  # [B, S] each row's tokens: the emitted ones from column start_b (the first token included)
  start_b: jax.Array  # [B] the column of each row's first emitted token (0, or the prompt's length)
  new_b: jax.Array  # [B] tokens emitted so far
  done_b: jax.Array  # [B] EOS emitted or max_new_tokens reached
  cache: KVCache  # the model's K/V; cache.lengths [B] are the tokens in it
  key: jax.Array  # the sampling key ([B] keys where a method samples each row with its own)
  steps: jax.Array  # int32: the method's step counter
  method: Any  # the method's own state (None for `ar`)


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
  return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


def start_state(eos_ids: tuple[int, ...], buffer_bs: jax.Array, start_b: jax.Array, first_b: jax.Array,
                max_new_tokens, cache: KVCache, key: jax.Array, method: Any = None, steps: int = 0) -> DecodeState:
  """The state after the prefill: each row's first token at column `start_b` of `buffer_bs`, the row done at an EOS
  or when one token is all it may emit."""
  batch = first_b.shape[0]
  done_b = is_eos(first_b, eos_ids) | (max_new_tokens <= 1)
  return DecodeState(buffer_bs.at[jnp.arange(batch), start_b].set(first_b), start_b, jnp.ones_like(first_b), done_b,
                     cache, key, jnp.int32(steps), method)


def buffer_lengths(state: DecodeState) -> jax.Array:
  """[B] the columns in use of each row's `tokens_bs` (its prompt, if held, and its emitted tokens)."""
  return state.start_b + state.new_b


def last_tokens(state: DecodeState) -> jax.Array:
  """[B] each row's last emitted token."""
  return jnp.take_along_axis(state.tokens_bs, (buffer_lengths(state) - 1)[:, None], axis=1)[:, 0]


def cache_room(state: DecodeState) -> jax.Array:
  """Free cache slots of the fullest active row."""
  return state.cache.num_slots - jnp.max(jnp.where(state.done_b, 0, state.cache.lengths))
