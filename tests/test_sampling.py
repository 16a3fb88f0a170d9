"""Seeded sampling: the sampler against a NumPy reference, its noise keyed by position alone, and every lossless
method returning `ar`'s sampled tokens for the same seed (fp32 and bf16, batched and alone)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdjax.exit_heads import ExitHeads
from hdjax.decoding.sampling import SamplingConfig, position_keys, row_keys, sample_tokens, top_p_cutoff
from tests.conftest import make_tiny_lm
from tests.test_speculative import REPETITIVE, total_variation_bound

SETTINGS = [SamplingConfig(0.8, 40, 0.9), SamplingConfig(1.0), SamplingConfig(0.7, 0, 0.9),
            SamplingConfig(1.3, 5, 0.8)]


def reference_probs(logits_v: np.ndarray, s: SamplingConfig) -> np.ndarray:
  """The filtered distribution by sorting, in NumPy: top-k, then the smallest prefix reaching top-p."""
  order = np.argsort(-logits_v, kind="stable")
  scores = logits_v[order].astype(np.float64) / s.temperature
  keep = np.ones_like(scores, bool)
  if s.top_k:
    keep[s.top_k:] = False
  probs = np.where(keep, np.exp(scores - scores.max()), 0.0)
  probs /= probs.sum()
  keep &= np.cumsum(probs) - probs < s.top_p
  probs = np.where(keep, probs, 0.0)
  out = np.zeros_like(probs)
  out[order] = probs / probs.sum()
  return out


def test_top_p_cutoff_is_the_sorted_prefix_rule():
  rng = np.random.default_rng(0)
  for trial in range(200):
    vocab = int(rng.integers(2, 300))
    scores = (rng.normal(size=(3, vocab)) * rng.uniform(0.1, 8)).astype(np.float32)
    if trial % 4 == 0:
      scores[:, :vocab // 2] = scores[:, :1]  # ties at the cutoff
    top_p = float(rng.uniform(0.05, 0.999))
    cutoff = np.asarray(top_p_cutoff(jnp.asarray(scores), top_p))[:, 0]
    for row, got in zip(scores, cutoff):
      desc = np.sort(row)[::-1]
      probs = np.exp(desc.astype(np.float64) - desc[0])
      probs /= probs.sum()
      assert got == desc[np.cumsum(probs) - probs < top_p].min()


@pytest.mark.parametrize("sampling", SETTINGS, ids=str)
def test_samples_follow_the_filtered_distribution(sampling):
  vocab, num = 12, 20000
  logits_v = np.random.default_rng(1).normal(size=vocab).astype(np.float32) * 2
  expected = reference_probs(logits_v, sampling)
  keys_n = position_keys(row_keys(jax.random.key(4), 1), jnp.arange(num)[None])[0]
  tokens = np.asarray(jax.jit(sample_tokens, static_argnames="sampling")(
      jnp.broadcast_to(jnp.asarray(logits_v), (num, vocab)), keys_n, sampling))
  assert set(np.flatnonzero(np.bincount(tokens, minlength=vocab))) <= set(np.flatnonzero(expected))
  tv, bound = total_variation_bound(dict(enumerate(expected)), [int(t) for t in tokens])
  assert tv < bound, (tv, bound)


@pytest.mark.parametrize("sampling", SETTINGS[:3], ids=str)
def test_a_sample_depends_on_its_logits_and_position_only(sampling):
  """The same logits and noise key give the same token in a [2, 16]-row call as alone: what lets a verify step's
  node draw `ar`'s token."""
  vocab = 49152
  logits_btv = jax.random.normal(jax.random.key(0), (2, 16, vocab)) * 4
  keys_bt = position_keys(row_keys(jax.random.key(7), 2), jnp.arange(16)[None] + jnp.asarray([[3], [9]]))
  sample = jax.jit(sample_tokens, static_argnames="sampling")
  together = np.asarray(sample(logits_btv, keys_bt, sampling))
  alone = [[int(sample(logits_btv[b, t][None], keys_bt[b, t][None], sampling)[0]) for t in range(16)]
           for b in range(2)]
  np.testing.assert_array_equal(together, alone)
  other_seed = position_keys(row_keys(jax.random.key(8), 2), jnp.arange(16)[None] + jnp.asarray([[3], [9]]))
  assert (np.asarray(sample(logits_btv, other_seed, sampling)) != together).any()


def _heads(cfg) -> ExitHeads:
  rng = np.random.default_rng(0)
  return ExitHeads((2,), jnp.asarray(rng.normal(size=(1, cfg.d_model, cfg.d_model)) * 0.3, jnp.float32))


LOSSLESS = [("pld", {}), ("pld_host", {}), ("hd_context", {}), ("hd_context_host", {}), ("adadecode", "heads")]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lossless_methods_return_ars_sampled_tokens(dtype):
  lm = make_tiny_lm(5, dtype=dtype)
  heads = dict(heads=_heads(lm.cfg), gamma=0.0, max_pending=3)
  prompts = [list(REPETITIVE[:20]), list(REPETITIVE[5:12]), [7, 7, 7, 7]]
  for sampling, seed in zip(SETTINGS, (0, 1, 2, 3)):
    jax.clear_caches()  # each setting compiles every method's loops anew: drop the last ones (memory maps)
    kw = dict(max_new_tokens=24, temperature=sampling.temperature, top_k=sampling.top_k, top_p=sampling.top_p,
              seed=seed)
    batched_ref = [r.token_ids for r in lm.generate(prompts, method="ar", **kw)]
    alone_ref = lm.generate(prompts[:1], method="ar", **kw)[0].token_ids
    assert alone_ref == batched_ref[0]  # row 0 draws the same noise in a batch as alone
    for method, options in LOSSLESS:
      options = heads if options == "heads" else options
      batched = [r.token_ids for r in lm.generate(prompts, method=method, **kw, **options)]
      assert batched == batched_ref, (method, sampling, seed)
      assert lm.generate(prompts[:1], method=method, **kw, **options)[0].token_ids == alone_ref, (method, sampling)


def test_seed_changes_the_sample():
  lm = make_tiny_lm(5)
  kw = dict(max_new_tokens=16, temperature=1.0)
  outs = {tuple(lm.generate([list(REPETITIVE[:20])], method="pld", seed=s, **kw)[0].token_ids) for s in range(4)}
  assert len(outs) > 1


def test_every_sampling_method_repeats_its_sample():
  lm = make_tiny_lm(5)
  kw = dict(max_new_tokens=16, temperature=0.8, top_k=40, top_p=0.9, seed=7)
  prompt, other = list(REPETITIVE[:20]), [9, 8, 7, 9, 8, 7, 9]
  options_of = dict(adadecode=dict(heads=_heads(lm.cfg), gamma=0.0, max_pending=3),
                    lazy=dict(prune_layers=(2,), keep_ratios=(0.5,)))
  options_of["lazy+pld"] = options_of["lazy"]
  for method in ("ar", "pld", "hd_context", "lazy", "lazy+pld", "adadecode"):
    options = options_of.get(method, {})
    first = lm.generate([prompt], method=method, **kw, **options)[0].token_ids
    lm.generate([other], method=method, **kw, **options)
    assert lm.generate([prompt], method=method, **kw, **options)[0].token_ids == first, method


def test_hd_repeats_its_sample_as_its_model_database_grows(smollm):
  """HD's model database learns each request's output, which changes later drafts but never the tokens."""
  ids = smollm.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colours of the rainbow."}])
  other = smollm.tokenizer.apply_chat_template([{"role": "user", "content": "Count from one to ten."}])
  kw = dict(max_new_tokens=24, temperature=0.8, top_k=40, top_p=0.9, seed=7)
  ref = smollm.generate([ids], method="ar", **kw)[0].token_ids
  runs = [smollm.generate([ids], method="hd", **kw)[0]]
  smollm.generate([other], method="hd", **kw)
  runs.append(smollm.generate([ids], method="hd", **kw)[0])
  assert [r.token_ids for r in runs] == [ref, ref]
