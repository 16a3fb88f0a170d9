"""The jitted AR loop: batching, EOS/max_new stops, sampling, bounded recompiles, input validation."""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdjax import HdjaxError, compilation
from hdjax.decoding import autoregressive as ar
from hdjax.decoding.sampling import SamplingConfig, greedy_tokens
from tests.conftest import make_tiny_lm


def _reference_greedy(lm, ids, max_new):
  """Greedy decoding by repeated full forwards (no cache): the independent reference."""
  out = []
  ids = list(ids)
  for _ in range(max_new):
    nxt = int(np.argmax(lm.logits(ids)[-1]))
    out.append(nxt)
    ids.append(nxt)
    if nxt in lm.cfg.eos_ids:
      break
  return out


def test_greedy_equals_full_forward_reference(tiny_lm):
  prompt = [5, 6, 7, 8, 9, 10]
  assert tiny_lm.generate([prompt], max_new_tokens=20)[0].token_ids == _reference_greedy(tiny_lm, prompt, 20)


def test_batch_of_different_lengths_equals_single(tiny_lm):
  prompts = [[3, 4, 5], list(range(10, 40)), [7] * 17, [100, 1]]
  batched = tiny_lm.generate(prompts, max_new_tokens=12)
  for p, r in zip(prompts, batched):
    assert r.token_ids == tiny_lm.generate([p], max_new_tokens=12)[0].token_ids
    assert len(r.token_ids) <= 12


def test_stops_at_eos_and_includes_it():
  lm = make_tiny_lm(seed=1)
  prompt = [9, 8, 7]
  free = _reference_greedy(lm, prompt, 8)
  eos = free[3]
  lm_eos = make_tiny_lm(seed=1, eos_ids=(eos,))
  out = lm_eos.generate([prompt], max_new_tokens=8)[0].token_ids
  assert out == free[:free.index(eos) + 1]


@pytest.mark.parametrize("max_new", [1, 2, 5, 33])
def test_max_new_tokens_is_exact(tiny_lm, max_new):
  out = tiny_lm.generate([[1, 2, 3]], max_new_tokens=max_new)[0].token_ids
  assert out == _reference_greedy(tiny_lm, [1, 2, 3], max_new)


def test_streaming_chunks_equal_one_shot(tiny_lm):
  chunks = []
  r = tiny_lm.generate([[4, 5, 6]], max_new_tokens=21, on_tokens=chunks.append, chunk_tokens=4)[0]
  assert [t for c in chunks for t in c] == r.token_ids  # the prefill's token first, then every chunk
  assert r.token_ids == tiny_lm.generate([[4, 5, 6]], max_new_tokens=21)[0].token_ids


def test_sampling_is_seeded_and_matches_distribution():
  lm = make_tiny_lm(seed=2, vocab_size=8, eos_ids=(99,))
  prompt = [1, 2, 3]
  a = lm.generate([prompt], max_new_tokens=5, temperature=1.0, seed=11)[0].token_ids
  assert a == lm.generate([prompt], max_new_tokens=5, temperature=1.0, seed=11)[0].token_ids
  logits = lm.logits(prompt)[-1]
  p = np.exp(logits - logits.max())
  p /= p.sum()
  n = 400
  counts = collections.Counter(lm.generate([prompt], max_new_tokens=1, temperature=1.0, seed=s)[0].token_ids[0]
                               for s in range(n))
  freq = np.array([counts[i] for i in range(8)]) / n
  assert 0.5 * np.abs(freq - p).sum() < 0.1  # total variation


def test_top_k_and_top_p_restrict_support():
  lm = make_tiny_lm(seed=2, vocab_size=8, eos_ids=(99,))
  logits = lm.logits([1, 2, 3])[-1]
  order = np.argsort(-logits)
  seen_k = {lm.generate([[1, 2, 3]], max_new_tokens=1, temperature=2.0, top_k=2, seed=s)[0].token_ids[0]
            for s in range(60)}
  assert seen_k <= set(order[:2].tolist())
  seen_p = {lm.generate([[1, 2, 3]], max_new_tokens=1, temperature=1.0, top_p=1e-6, seed=s)[0].token_ids[0]
            for s in range(20)}
  assert seen_p == {int(order[0])}


def test_recompiles_are_bounded():
  lm = make_tiny_lm(seed=9)
  for n in (3, 5, 9, 14):  # same prompt bucket (16) and same new-token bucket
    lm.generate([list(range(1, n + 1))], max_new_tokens=10)
  before = compilation.TRACE_COUNTS.copy()
  for n in (2, 4, 11, 15):
    lm.generate([list(range(1, n + 1))], max_new_tokens=10)
  assert compilation.TRACE_COUNTS == before


def test_cache_full_guard_stops_cleanly(tiny_lm):
  logits, cache = ar.prefill(tiny_lm.params, tiny_lm.cfg, np.array([[1, 2, 3, 4]]), np.array([4]), 8)
  state = ar.token_state(tiny_lm.cfg, jnp.argmax(logits, -1).astype(jnp.int32), 100, jax.random.key(0), cache)
  out = ar.decode_chunk(tiny_lm.params, tiny_lm.cfg, state, jnp.int32(100), jnp.int32(100), SamplingConfig())
  assert int(out.new_b[0]) == 5  # slots 4..7 were free: 4 fed tokens plus the first one
  assert int(out.cache.lengths[0]) == 8


def test_bad_requests(tiny_lm):
  with pytest.raises(HdjaxError, match="empty prompt"):
    tiny_lm.generate([[]])
  with pytest.raises(HdjaxError, match="max_new_tokens must be >= 1"):
    tiny_lm.generate([[1]], max_new_tokens=0)
  with pytest.raises(HdjaxError, match="unknown method 'nope'"):
    tiny_lm.generate([[1]], method="nope")
  with pytest.raises(HdjaxError, match="exceeds the model's context"):
    tiny_lm.generate([[1] * 500], max_new_tokens=20)
  with pytest.raises(HdjaxError, match="outside the vocabulary"):
    tiny_lm.generate([[1, 100000]])


def test_greedy_tokens_is_argmax_with_its_tie_rule():
  rng = np.random.default_rng(0)
  logits = rng.integers(0, 4, size=(6, 3, 257)).astype(np.float32)  # many ties: the first index must win
  logits[0, 0] = -np.inf
  logits[1, 0, 7] = np.inf
  np.testing.assert_array_equal(greedy_tokens(jnp.asarray(logits)), np.argmax(logits, axis=-1))
  assert greedy_tokens(jnp.full((2, 5), jnp.nan)).tolist() == [4, 4]  # a valid id even for a broken row
