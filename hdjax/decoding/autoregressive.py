"""Jitted prefill and the autoregressive `lax.while_loop`, with static shapes and a donated cache."""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from hdjax import compilation, model
from hdjax.attention import causal_mask
from hdjax.config import LlamaConfig
from hdjax.decoding.sampling import SamplingConfig, position_keys, row_keys, sample_tokens
from hdjax.decoding.state import DecodeState, cache_room, is_eos, last_tokens, start_state
from hdjax.kvcache import KVCache, init_cache



PREFILL_BLOCK = 256  # query and key rows per block of a prefill's blocked attention


def next_pow2(n: int, minimum: int = 16) -> int:
  return max(minimum, 1 << max(0, int(n) - 1).bit_length())


def prompt_bucket(n: int, minimum: int = 16) -> int:
  """The padded length of an n-token prompt's prefill: the smallest 2^k or 3 * 2^(k-1) >= n. A prefill costs
  ~0.5 ms per padded token on CPU, so half-steps cut the padding from up to 2x to up to 1.5x (364 tokens: 384
  rows, not 512) for twice the compiled shapes."""
  pow2 = next_pow2(n, minimum)
  return pow2 * 3 // 4 if pow2 * 3 // 4 >= max(n, minimum) else pow2


def last_token_logits(params, cfg: LlamaConfig, h_btd: jax.Array, lengths_b: jax.Array) -> jax.Array:
  """Logits [B, V] at each sequence's last real token (the LM head runs on B rows, not B*T)."""
  last_bd = jnp.take_along_axis(h_btd, (lengths_b - 1)[:, None, None], axis=1)
  return model.unembed(params, cfg, last_bd)[:, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "num_slots"))
def prefill(params, cfg: LlamaConfig, tokens_bt: jax.Array, lengths_b: jax.Array, num_slots: int
            ) -> tuple[jax.Array, KVCache]:
  """Runs right-padded prompts [B, T] into a fresh cache of `num_slots` slots.

  Returns the logits [B, V] after each prompt's last token and the cache with lengths = prompt lengths.
  Padding rows go to an out-of-range slot, so they are never written. Attention is blocked and causal
  (`model.run_layers`' prefill blocks of PREFILL_BLOCK rows, or half that for a 3 * 2^k bucket; T <= num_slots).
  """
  compilation.TRACE_COUNTS["prefill"] += 1
  batch, t = tokens_bt.shape
  # half blocks tile a 3 * 2^k bucket (384 rows: 3 x 128, not 512 padded); any other T pads to whole blocks
  block = PREFILL_BLOCK // 2 if t > PREFILL_BLOCK and t % PREFILL_BLOCK else PREFILL_BLOCK
  positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  slots_bt = jnp.where(positions_bt < lengths_b[:, None], positions_bt, num_slots)
  out = model.run_layers(params, cfg, model.embed(params, cfg, tokens_bt), positions_bt, None,
                         init_cache(cfg, batch, num_slots), slots_bt, prefill_block=block)
  return last_token_logits(params, cfg, out.h_btd, lengths_b), out.cache.replace(lengths=lengths_b.astype(jnp.int32))


def decode_one(params, cfg: LlamaConfig, cache: KVCache, tokens_b: jax.Array, active_b: jax.Array
               ) -> tuple[jax.Array, KVCache]:
  """One token per sequence at slot = position = cache.lengths; inactive rows write nothing and stay put.
  Returns logits [B, V] and the cache advanced by one for active rows.

  The step runs `cfg.engine.row_multiple` rows: the token, then copies that write nothing. It is then the same program
  as a verify step of that many nodes (`verify.verify_tree` pads its tree alike), which on XLA:CPU bf16 is what
  keeps the speculative methods' logits bitwise equal to these."""
  batch, rows = tokens_b.shape[0], cfg.engine.row_multiple
  pos_br = jnp.broadcast_to(cache.lengths[:, None], (batch, rows))
  slots_br = jnp.where(active_b[:, None] & (jnp.arange(rows) == 0)[None, :], pos_br, cache.num_slots)
  logits_brv, cache = model.step_logits(params, cfg, jnp.broadcast_to(tokens_b[:, None], (batch, rows)), pos_br,
                                        causal_mask(pos_br, cache.num_slots), cache, slots_br)
  return logits_brv[:, 0], cache.replace(lengths=cache.lengths + active_b.astype(jnp.int32))


def token_state(cfg: LlamaConfig, first_b: jax.Array, max_new_tokens: int, key: jax.Array, cache: KVCache,
                method: Any = None) -> DecodeState:
  """A one-token-per-step loop's state after the prefill: its emitted tokens alone in `tokens_bs` (-1 past them)."""
  buffer_bs = jnp.full((first_b.shape[0], next_pow2(max_new_tokens)), -1, jnp.int32)
  return start_state(cfg.eos_ids, buffer_bs, jnp.zeros_like(first_b), first_b, max_new_tokens, cache, key, method)


# (cache, method state, last tokens [B], active rows [B], steps) -> (logits [B, V] after them, cache, method state)
Step = Callable[[KVCache, Any, jax.Array, jax.Array, jax.Array], tuple[jax.Array, KVCache, Any]]


def token_loop(step: Step, state: DecodeState, eos_ids: tuple[int, ...], max_new: jax.Array, stop_at: jax.Array,
               sampling: SamplingConfig) -> DecodeState:
  """Steps a `token_state` until every active row has `stop_at` tokens (or is done), or an active row's cache is
  full; `step` runs each row's last token (inactive rows write nothing)."""
  batch, out_len = state.tokens_bs.shape

  def cond(st: DecodeState) -> jax.Array:
    return jnp.any(~st.done_b & (st.new_b < stop_at)) & (cache_room(st) >= 1)

  def body(st: DecodeState) -> DecodeState:
    active_b = ~st.done_b
    logits_bv, cache, method = step(st.cache, st.method, last_tokens(st), active_b, st.steps)
    nxt_b = sample_tokens(logits_bv, position_keys(row_keys(st.key, batch), st.new_b), sampling)
    tokens_bs = st.tokens_bs.at[jnp.arange(batch), jnp.where(st.done_b, out_len, st.new_b)].set(nxt_b, mode="drop")
    new_b = st.new_b + active_b.astype(jnp.int32)
    done_b = st.done_b | is_eos(nxt_b, eos_ids) | (new_b >= max_new)
    return st._replace(tokens_bs=tokens_bs, new_b=new_b, done_b=done_b, cache=cache, steps=st.steps + 1,
                       method=method)

  return jax.lax.while_loop(cond, body, state)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling"), donate_argnames=("state",))
def decode_chunk(params, cfg: LlamaConfig, state: DecodeState, max_new: jax.Array, stop_at: jax.Array,
                 sampling: SamplingConfig) -> DecodeState:
  """Plain decoding of a `token_state` until EOS, `max_new` tokens, `stop_at` tokens or a full cache."""
  compilation.TRACE_COUNTS["decode_loop"] += 1

  def step(cache, method, cur_b, active_b, steps):
    del steps
    logits_bv, cache = decode_one(params, cfg, cache, cur_b, active_b)
    return logits_bv, cache, method

  return token_loop(step, state, cfg.eos_ids, max_new, stop_at, sampling)
