"""The on-device speculative loop (`device_loop.py`): its drafter and tree builder against the host references,
greedy identity with `ar`, identity with the host loop (same trees, same samples), host syncs and recompiles."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hdjax import compilation
from hdjax.decoding import autoregressive as ar
from hdjax.decoding.tree import build_tree, device_tree
from hdjax.drafting import device_ngram
from hdjax.drafting.context_db import NgramConfig, NgramDrafter, context_drafter
from hdjax.drafting.pld import PLD_MAX_TOKENS, pld_drafter
from hdjax.errors import HdjaxError
from tests.conftest import make_tiny_lm
from tests.test_speculative import REPETITIVE

# (host drafter config, max_chains, depth): PLD and HD's context tier as the loops use them, and variations
DRAFTERS = [(pld_drafter().config, 1, PLD_MAX_TOKENS), (context_drafter().config, 7, 4),
            (context_drafter().config, 3, 6),
            (NgramConfig(key_sizes=(3, 1), max_candidates=5, max_occurrences=4), 7, 3)]


def host_chains(config: NgramConfig, tokens, max_chains: int, depth: int) -> list[list[int]]:
  drafter = NgramDrafter(config)
  drafter.start(tokens)
  return drafter.draft(tokens, max_chains, depth)


def device_chains(config: NgramConfig, streams, max_chains: int, depth: int, size: int) -> list[list[list[int]]]:
  """The device drafter on a batch of streams (one row each, the batch padded to `size` rows so that one compile
  serves every call), as lists of chains without padding."""
  buf = np.full((size, size), 3, np.int32)  # stale tokens past each length must be ignored
  lengths = np.ones(size, np.int32)
  for b, s in enumerate(streams):
    buf[b, :len(s)], lengths[b] = s, len(s)
  out = np.asarray(device_ngram.draft(jnp.asarray(buf), jnp.asarray(lengths),
                                      device_ngram.DeviceNgramConfig.like(config, max_chains, depth)))
  assert out.shape == (size, min(max_chains, config.max_candidates), depth)
  return [[[int(t) for t in row if t >= 0] for row in chains if row[0] >= 0] for chains in out[:len(streams)]]


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10**6), vocab=st.integers(1, 6), length=st.integers(1, 90),
       drafter=st.sampled_from(range(len(DRAFTERS))))
def test_device_drafter_equals_host_on_random_streams(seed, vocab, length, drafter):
  """Every prefix of a random stream over a small vocabulary (many repeats, >32 occurrences of a key)."""
  config, max_chains, depth = DRAFTERS[drafter]
  stream = np.random.default_rng(seed).integers(0, vocab, length).tolist()
  prefixes = [stream[:n] for n in range(1, length + 1)]
  got = device_chains(config, prefixes, max_chains, depth, size=96)
  assert got == [host_chains(config, p, max_chains, depth) for p in prefixes]


def test_device_drafter_equals_host_on_real_text(smollm):
  text = ("The cat sat on the mat. The cat sat on the hat. Then the cat sat down, and the dog sat on the mat "
          "next to the cat. def square(x):\n    return x * x\n\ndef cube(x):\n    return x * x * x\n")
  stream = smollm.tokenizer.encode(text * 2)
  prefixes = [stream[:n] for n in range(1, len(stream) + 1)]
  for config, max_chains, depth in DRAFTERS[:2]:
    got = device_chains(config, prefixes, max_chains, depth, size=256)
    assert got == [host_chains(config, p, max_chains, depth) for p in prefixes]
    assert sum(map(len, got)) > len(prefixes) / 2  # the text repeats: most prefixes draft something


@settings(max_examples=60, deadline=None)
@given(chains=st.lists(st.lists(st.integers(0, 3), max_size=8), max_size=7),
       num_nodes=st.sampled_from([1, 4, 8, 16]), max_depth=st.sampled_from([1, 4, 10]))
def test_device_tree_equals_build_tree(chains, num_nodes, max_depth):
  padded = np.full((7, 8), -1, np.int32)  # one shape: at most 12 compiles
  for c, chain in enumerate(chains):
    padded[c, :len(chain)] = chain
  got = jax.jit(device_tree, static_argnames=("num_nodes", "max_depth"))(
      jnp.int32(9), jnp.asarray(padded), num_nodes=num_nodes, max_depth=max_depth)
  ref = build_tree(9, [c for c in chains if c], num_nodes, max_depth)
  for field in ("tokens", "parents", "depths", "valid", "ancestors"):
    np.testing.assert_array_equal(np.asarray(getattr(got, field)), getattr(ref, field), err_msg=field)


@pytest.fixture(scope="module")
def lm():
  return make_tiny_lm()


# With up to 26 new tokens and an 8-node budget every request below fits one 64-slot cache: one compile per batch.
PROMPTS = [REPETITIVE[:30], REPETITIVE[:17], [3, 1, 4, 1, 5, 9, 2, 6]]


@pytest.mark.parametrize("method", ["pld", "hd_context"])
@pytest.mark.parametrize("max_new", [1, 26])
def test_tiny_model_equals_ar_and_the_host_loop(lm, method, max_new):
  """Batch of 3 prompts of different lengths: ids of `ar`; the host loop's steps, accept lengths and buckets."""
  ref = lm.generate(PROMPTS, method="ar", max_new_tokens=max_new)
  out = lm.generate(PROMPTS, method=method, max_new_tokens=max_new)
  host = lm.generate(PROMPTS, method=f"{method}_host", max_new_tokens=max_new)
  for r, o, h in zip(ref, out, host):
    assert o.token_ids == r.token_ids
    assert o.stats["engine"] == "device" and sum(o.stats["accept_lengths"]) == len(o.token_ids)
    for key in ("accept_lengths", "steps", "bucket_counts"):
      assert o.stats[key] == h.stats[key], key
  if max_new == 26:
    assert out[0].stats["tau"] > 1.5


@pytest.mark.parametrize("method", [pytest.param("pld", marks=pytest.mark.slow), "hd_context"])
def test_sampling_takes_the_host_loops_samples(lm, method):
  """Same trees and the same position-keyed noise: sampled ids equal the host loop's."""
  out = lm.generate(PROMPTS, method=method, max_new_tokens=24, temperature=1.0, seed=1)
  host = lm.generate(PROMPTS, method=f"{method}_host", max_new_tokens=24, temperature=1.0, seed=1)
  assert [o.token_ids for o in out] == [h.token_ids for h in host]


def test_eos_inside_an_accepted_draft_stops_like_ar(lm):
  """EOS is set to a token that the loop emits in the middle of a multi-token step (the model's weights, so its
  outputs, do not depend on eos_ids): the loop must cut that step after it, as `ar` stops there. The prompt ends
  with the start of its own greedy continuation, so PLD drafts the rest of it from the prompt."""
  ids = lm.generate([REPETITIVE[:30]], max_new_tokens=13)[0].token_ids
  prompt = REPETITIVE[:30] + tuple(ids)
  free = lm.generate([prompt], method="pld", max_new_tokens=12)[0]
  out_ids, steps = free.token_ids, free.stats["accept_lengths"]
  ends = np.cumsum(steps)  # step k emitted out_ids[ends[k] - steps[k]:ends[k]]
  cut = next(j for e, a in zip(ends, steps) for j in range(e - a + 1, e) if out_ids[j] not in out_ids[:j])
  eos_lm = make_tiny_lm(eos_ids=(out_ids[cut],))
  ref = eos_lm.generate([prompt], max_new_tokens=12)[0]
  out = eos_lm.generate([prompt], method="pld", max_new_tokens=12)[0]
  assert ref.token_ids == out_ids[:cut + 1] == out.token_ids
  assert out.stats["accept_lengths"][-1] > 1  # the step that emitted EOS also emitted the token before it


def test_full_cache_edge(lm):
  """Prompt + new tokens + node budget lands exactly on the 64-slot cache: the last trees are capped by room."""
  prompt = REPETITIVE[:64 - 20 - 8]
  ref = lm.generate([prompt], max_new_tokens=20)[0]
  for method in ("pld", "hd_context"):
    out = lm.generate([prompt], method=method, max_new_tokens=20)[0]
    assert out.token_ids == ref.token_ids


def test_host_syncs_do_not_grow_with_steps(lm):
  short = lm.generate([[3, 1, 4, 1, 5, 9, 2, 6]], method="pld", max_new_tokens=5)[0]
  long = lm.generate([[3, 1, 4, 1, 5, 9, 2, 6]], method="pld", max_new_tokens=45)[0]
  host = lm.generate([[3, 1, 4, 1, 5, 9, 2, 6]], method="pld_host", max_new_tokens=45)[0]
  assert long.stats["steps"] > short.stats["steps"] + 10
  assert short.stats["host_syncs"] == long.stats["host_syncs"] <= 4
  assert host.stats["host_syncs"] >= host.stats["steps"]  # the host loop waits every step


def test_streaming_runs_the_loop_per_chunk(lm):
  got: list[int] = []
  out = lm.generate(PROMPTS, method="hd_context", max_new_tokens=26, on_tokens=got.extend, chunk_tokens=8)
  assert got == out[0].token_ids == lm.generate(PROMPTS, max_new_tokens=26)[0].token_ids
  # first token, its fetch for the stream, one per chunk (at most ceil(25 / 8)), the results
  assert 4 <= out[0].stats["host_syncs"] <= 3 + -(-25 // 8)


def test_recompiles_are_bounded(lm):
  """One trace per (method, batch, cache size, sampling): prompts, lengths and max_new_tokens do not retrace."""
  lm.generate([REPETITIVE[:20]], method="pld", max_new_tokens=20, warmup=True)
  before = compilation.TRACE_COUNTS["device_loop"]
  for n, prompt in enumerate([REPETITIVE[:20], REPETITIVE[:15], REPETITIVE[3:20], [7, 7, 7, 7]]):
    lm.generate([prompt], method="pld", max_new_tokens=21 + n)
  got: list[int] = []
  lm.generate([REPETITIVE[:20]], method="pld", max_new_tokens=24, on_tokens=got.extend, chunk_tokens=4)
  assert compilation.TRACE_COUNTS["device_loop"] == before  # the warm-up traced the one loop all of these use


def test_unknown_or_empty_orders_are_errors(lm):
  for order, message in (("context,cache", "unknown draft source(s) ['cache']"), (" , ", "names no draft source")):
    with pytest.raises(HdjaxError, match=re.escape(message)):
      lm.generate(PROMPTS[:1], method="pld", max_new_tokens=8, order=order)


def chat(lm, texts):
  return [lm.tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]


REAL_TEXTS = ("Repeat this sentence three times: the cat sat on the mat.",
              "List the numbers from 1 to 20 separated by commas.",
              "Write a Python function that returns the square of a number.",
              "Summarize in one sentence: The quick brown fox jumps over the lazy dog. The dog sleeps.")


@pytest.mark.slow  # ~35 s; SmolLM2 device-loop identity stays in the default run in bf16 (test_bf16_lossless.py)
def test_real_model_pld_equals_ar(smollm):
  """Batch 1 over three prompts, then four prompts of different lengths as one batch."""
  prompts = chat(smollm, REAL_TEXTS)
  refs = [smollm.generate([p], max_new_tokens=32)[0].token_ids for p in prompts[:3]]
  outs = [smollm.generate([p], method="pld", max_new_tokens=32)[0] for p in prompts[:3]]
  assert [o.token_ids for o in outs] == refs
  assert max(o.stats["tau"] for o in outs) > 1.5 and all(o.stats["host_syncs"] == 2 for o in outs)
  batched = smollm.generate(prompts, method="pld", max_new_tokens=32)
  assert [o.token_ids for o in batched] == [r.token_ids for r in smollm.generate(prompts, max_new_tokens=32)]


@pytest.mark.slow
def test_spec_bench_questions_greedy_equal_ar(smollm):
  """First turns of 20 Spec-Bench questions (stratified): device pld and hd_context against ar, at batch 1 and
  as batches of 4."""
  from experiments.common import SPEC_BENCH_QUESTIONS, read_jsonl  # pylint: disable=import-outside-toplevel
  from experiments.specbench import select_questions  # pylint: disable=import-outside-toplevel
  questions = select_questions(read_jsonl(SPEC_BENCH_QUESTIONS), 4, "stratified")[:20]
  prompts = chat(smollm, [q["turns"][0] for q in questions])
  refs = [smollm.generate([p], max_new_tokens=64)[0].token_ids for p in prompts]
  for method in ("pld", "hd_context"):
    assert [smollm.generate([p], method=method, max_new_tokens=64)[0].token_ids for p in prompts] == refs, method
    for i in range(0, len(prompts), 4):
      out = smollm.generate(prompts[i:i + 4], method=method, max_new_tokens=64)
      ref = smollm.generate(prompts[i:i + 4], max_new_tokens=64)
      assert [o.token_ids for o in out] == [r.token_ids for r in ref], (method, i)


@pytest.mark.slow
def test_bf16_device_loop_equals_the_host_loop():
  """In bf16 both loops run the same verify function on the same trees, so they emit the same tokens."""
  lm = make_tiny_lm(dtype="bfloat16")
  for method in ("pld", "hd_context"):
    out = lm.generate(PROMPTS, method=method, max_new_tokens=26)
    host = lm.generate(PROMPTS, method=f"{method}_host", max_new_tokens=26)
    assert [o.token_ids for o in out] == [h.token_ids for h in host]


def _cache_copies(hlo_text: str, cache_shape: str) -> int:
  return sum(1 for line in hlo_text.splitlines()
             if cache_shape in line and (" copy(" in line or " copy-start(" in line))


def test_compiled_loops_never_copy_the_cache(lm):
  """The compiled `ar` decode loop and the device loop over three tree buckets hold no copy of the whole KV cache (a
  `lax.switch` over the buckets made 8 per step, one per branch operand and result)."""
  from hdjax.decoding import device_loop, speculative  # pylint: disable=import-outside-toplevel
  from hdjax.decoding.request import GenerateRequest  # pylint: disable=import-outside-toplevel
  from hdjax.decoding.sampling import SamplingConfig  # pylint: disable=import-outside-toplevel
  from hdjax.kvcache import init_cache  # pylint: disable=import-outside-toplevel
  cfg, slots = lm.cfg, 128
  cache = init_cache(cfg, 1, slots)
  shape = f"[{cfg.n_layers},1,{cfg.n_kv_heads},{slots},{cfg.head_dim}]"
  state = ar.token_state(cfg, jnp.asarray([1], jnp.int32), 8, jax.random.key(0), cache)
  decode = ar.decode_chunk.lower(lm.params, cfg, state, jnp.int32(8), jnp.int32(8), SamplingConfig())
  decode = decode.compile().as_text()
  assert shape in decode and _cache_copies(decode, shape) == 0
  spec = speculative.PLD_DEFAULTS
  dspec = device_loop.device_spec(cfg, spec, ("pld",))
  assert dspec.buckets == (1, 4, 8)
  request = GenerateRequest(((1, 2),), 8, SamplingConfig(), 0)
  loop_state = device_loop.initial_state(cfg, request, jnp.asarray([1], jnp.int32), cache, jax.random.key(0), dspec)
  loop = device_loop.decode_chunk.lower(lm.params, cfg, loop_state, jnp.int32(4), jnp.int32(4), dspec,
                                        SamplingConfig()).compile().as_text()
  assert shape in loop and _cache_copies(loop, shape) == 0
