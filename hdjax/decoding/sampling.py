"""Token selection: greedy, or temperature / top-k / top-p sampling with an explicit PRNG key."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
  """Static (hashable) sampling settings; temperature 0 means greedy."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  @property
  def greedy(self) -> bool:
    return self.temperature <= 0.0


def filtered_logits(logits_bv: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """Logits after temperature, top-k and top-p; removed entries are -inf. Softmax of this is the target
  distribution that sampling and speculative rejection sampling both use."""
  logits = logits_bv.astype(jnp.float32) / max(sampling.temperature, 1e-6)
  neg_inf = jnp.finfo(jnp.float32).min
  if sampling.top_k > 0:
    kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, neg_inf, logits)
  if sampling.top_p < 1.0:
    sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
    cum = jnp.cumsum(jax.nn.softmax(sorted_desc, axis=-1), axis=-1)
    # keep the smallest prefix whose mass reaches top_p (the first token is always kept)
    cutoff_idx = jnp.sum(cum - jax.nn.softmax(sorted_desc, axis=-1) < sampling.top_p, axis=-1, keepdims=True)
    cutoff = jnp.take_along_axis(sorted_desc, cutoff_idx - 1, axis=-1)
    logits = jnp.where(logits < cutoff, neg_inf, logits)
  return logits


def greedy_tokens(logits_xv: jax.Array) -> jax.Array:
  """int32 argmax over the last axis (the first index of the maximum, as `jnp.argmax`; the last id if a row is all
  NaN), as a max and then the smallest index holding it: two plain reductions, which XLA:CPU vectorizes, where
  `jnp.argmax`'s (value, index) reduce took 0.86 ms for 8 x 49,152 logits against 0.15 ms."""
  vocab = logits_xv.shape[-1]
  max_x1 = jnp.max(logits_xv, axis=-1, keepdims=True)
  first_x = jnp.min(jnp.where(logits_xv == max_x1, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
  return jnp.minimum(first_x, vocab - 1)


def target_probs(logits_bv: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """The distribution a step samples from; one-hot at the argmax when greedy."""
  if sampling.greedy:
    return jax.nn.one_hot(greedy_tokens(logits_bv), logits_bv.shape[-1], dtype=jnp.float32)
  return jax.nn.softmax(filtered_logits(logits_bv, sampling), axis=-1)


def select_token(logits_bv: jax.Array, key: jax.Array, sampling: SamplingConfig) -> jax.Array:
  if sampling.greedy:
    return greedy_tokens(logits_bv)
  return jax.random.categorical(key, filtered_logits(logits_bv, sampling), axis=-1).astype(jnp.int32)
