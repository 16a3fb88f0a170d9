"""Token selection: greedy, or temperature / top-k / top-p sampling by Gumbel-max with position-keyed noise.

A sampled token is `argmax(filtered logits / temperature + noise)`, where the Gumbel noise of each vocabulary entry
is drawn from (the request's seed, the batch row, the token's index among the row's emitted tokens) alone. So the
n-th token of a row is a function of the logits before it and that noise, whichever loop produced it: a
speculative step that checks a draft token against its node's perturbed argmax emits exactly what `ar` would, and
accepts a deterministic draft with the probability the target gives it (docs/design.md, "Lossless when sampling").
"""

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


NEG_INF = float(jnp.finfo(jnp.float32).min)


def greedy_tokens(logits_xv: jax.Array) -> jax.Array:
  """int32 argmax over the last axis (the first index of the maximum, as `jnp.argmax`; the last id if a row is all
  NaN), as a max and then the smallest index holding it: two plain reductions, which XLA:CPU vectorizes, where
  `jnp.argmax`'s (value, index) reduce took 0.86 ms for 8 x 49,152 logits against 0.15 ms."""
  vocab = logits_xv.shape[-1]
  max_x1 = jnp.max(logits_xv, axis=-1, keepdims=True)
  first_x = jnp.min(jnp.where(logits_xv == max_x1, jnp.arange(vocab, dtype=jnp.int32), vocab), axis=-1)
  return jnp.minimum(first_x, vocab - 1)


def row_keys(key: jax.Array, batch: int) -> jax.Array:
  """[B] one key per batch row, from the request's key."""
  return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(batch))


def position_keys(keys_b: jax.Array, index_bx: jax.Array) -> jax.Array:
  """[B, ...] the noise key of each row's emitted token `index_bx` (0: the token after the prompt)."""
  index_bx = jnp.asarray(index_bx)
  keys_bx = jnp.broadcast_to(keys_b.reshape(keys_b.shape + (1,) * (index_bx.ndim - 1)), index_bx.shape)
  return jax.vmap(jax.random.fold_in)(keys_bx.ravel(), index_bx.ravel()).reshape(index_bx.shape)


def top_p_within(scores_xk: jax.Array, top_p: float) -> jax.Array:
  """Scores sorted in descending order with -inf past the smallest prefix whose mass reaches `top_p` (the first
  entry is always kept)."""
  probs_xk = jax.nn.softmax(scores_xk, axis=-1)
  keep_xk = jnp.cumsum(probs_xk, axis=-1) - probs_xk < top_p
  return jnp.where(keep_xk, scores_xk, NEG_INF)


def candidates(logits_xv: jax.Array, sampling: SamplingConfig) -> tuple[jax.Array, jax.Array | None]:
  """The tokens a sample may take and their scores (temperature-scaled logits, -inf where filtered out):
  `(scores [..., k], ids [..., k])` for the top-k candidates when top-k is set (top-p then filters within them),
  else `(scores [..., V], None)` over the whole vocabulary (top-p by `top_p_cutoff`, no sort)."""
  logits_xv = logits_xv.astype(jnp.float32)
  inv_t = 1.0 / max(sampling.temperature, 1e-6)
  if 0 < sampling.top_k < logits_xv.shape[-1]:
    values_xk, ids_xk = jax.lax.top_k(logits_xv, sampling.top_k)
    scores_xk = values_xk * inv_t
    return (top_p_within(scores_xk, sampling.top_p) if sampling.top_p < 1.0 else scores_xk), ids_xk
  scores_xv = logits_xv * inv_t
  if sampling.top_p < 1.0:
    scores_xv = jnp.where(scores_xv < top_p_cutoff(scores_xv, sampling.top_p), NEG_INF, scores_xv)
  return scores_xv, None


def ordered_bits(x: jax.Array) -> jax.Array:
  """int32 keys of float32 values in the same order (-0.0 just below +0.0)."""
  bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
  return jnp.where(bits < 0, jnp.int32(-2**31) - bits - 1, bits)


def top_p_cutoff(scores_xv: jax.Array, top_p: float) -> jax.Array:
  """[..., 1] the smallest score kept by top-p: of the scores whose higher-scored mass is below `top_p`. Found by
  bisecting the scores' 32-bit order (32 masked sums over the vocabulary), not by sorting it: a sort of 49,152
  entries took ~12 ms a row on XLA:CPU."""
  max_x1 = jnp.max(scores_xv, axis=-1, keepdims=True)
  weights_xv = jnp.exp(scores_xv - max_x1)
  budget_x1 = top_p * jnp.sum(weights_xv, axis=-1, keepdims=True)
  keys_xv = ordered_bits(scores_xv)

  def halve(_, bounds):  # keeps mass(keys > lo) >= budget > mass(keys > hi), hi - lo >= 1
    lo, hi = bounds
    mid = (lo & hi) + ((lo ^ hi) >> 1)  # floor((lo + hi) / 2) without overflow
    below = jnp.sum(jnp.where(keys_xv > mid, weights_xv, 0.0), axis=-1, keepdims=True) < budget_x1
    return jnp.where(below, lo, mid), jnp.where(below, mid, hi)

  lo = jnp.full(max_x1.shape, -2**31, jnp.int32)
  _, hi = jax.lax.fori_loop(0, 32, halve, (lo, ordered_bits(max_x1)))
  # hi: the smallest key whose higher mass is below the budget; the cutoff is the smallest score at or above it
  return jnp.min(jnp.where(keys_xv >= hi, scores_xv, jnp.inf), axis=-1, keepdims=True)


def gumbel_at(keys_x: jax.Array, ids_xk: jax.Array | None, vocab: int) -> jax.Array:
  """Gumbel noise of each position's vocabulary entries: at the candidate ids `ids_xk` (one draw per (key, id)), or
  over the whole vocabulary [..., V] when `ids_xk` is None."""
  if ids_xk is None:
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (vocab,)))(keys_x.ravel())
    return noise.reshape(keys_x.shape + (vocab,))
  draw = lambda k, i: jax.random.gumbel(jax.random.fold_in(k, i))
  return jax.vmap(jax.vmap(draw, in_axes=(None, 0)))(keys_x.ravel(), ids_xk.reshape(-1, ids_xk.shape[-1])
                                                     ).reshape(ids_xk.shape)


def sample_tokens(logits_xv: jax.Array, keys_x: jax.Array, sampling: SamplingConfig) -> jax.Array:
  """int32 tokens [...]: the greedy argmax, or the sample of each position's filtered distribution drawn with its
  noise key (`position_keys`)."""
  if sampling.greedy:
    return greedy_tokens(logits_xv)
  scores_xk, ids_xk = candidates(logits_xv, sampling)
  best_x = greedy_tokens(scores_xk + gumbel_at(keys_x, ids_xk, logits_xv.shape[-1]))
  return best_x if ids_xk is None else jnp.take_along_axis(ids_xk, best_x[..., None], axis=-1)[..., 0]

