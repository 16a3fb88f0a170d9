"""`hd+adadecode`: an exit head drafts into the HD tree, and the roots resume from its layer.

The step-level test compares one head-drafting verify step with the plain verify step on the same tree: same
accepted tokens, and the same K/V at every committed slot of every layer (so no layer of any token is skipped or
approximated). Generation tests check greedy equality with `ar` for accurate, random and confident-but-wrong
heads, and the sampling test checks the output distribution against exact enumeration.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdjax import compilation, model
from hdjax.exit_heads import ExitHeads, head_logits, identity_heads
from hdjax.attention import causal_mask
from hdjax.decoding import autoregressive as ar
from hdjax.decoding.sampling import SamplingConfig
from hdjax.decoding.speculative import SpecConfig, speculative_generate, start_head, verify_step
from hdjax.decoding.tree import build_tree, stack_trees
from hdjax.errors import HdjaxError
from tests.conftest import make_tiny_lm
from tests.test_speculative import ScriptedDrafter, exact_joint, request_for, total_variation_bound

HEAD_LAYER = 5


@pytest.fixture(scope="module")
def lm8():
  return make_tiny_lm(seed=1, n_layers=8)


def _prompts(seeds_and_lengths):
  """Random prompts, each ending in its own motif repeated (so that prompt drafts are sometimes accepted)."""
  out = []
  for seed, n in seeds_and_lengths:
    rng = np.random.default_rng(seed)
    motif = [int(x) for x in rng.integers(3, 128, 7)]
    out.append([int(x) for x in rng.integers(3, 128, n - 21)] + motif * 3)
  return out


def test_head_step_equals_plain_step(lm8):
  cfg, params = lm8.cfg, lm8.params
  prompts = _prompts([(0, 40), (1, 33)])
  ref = [lm8.generate([p], max_new_tokens=6)[0].token_ids for p in prompts]
  num_slots = 64
  head = identity_heads(cfg, (HEAD_LAYER,))
  t_dd = head.t_idd[0]

  def prefilled():
    logits_bv, cache = ar.prefill(params, cfg, *map(jnp.asarray, pad(prompts)), num_slots)
    return jnp.argmax(logits_bv, -1).astype(jnp.int32), cache

  def pad(ps):
    tokens = np.zeros((len(ps), 64), np.int32)
    for b, p in enumerate(ps):
      tokens[b, :len(p)] = p
    return tokens, np.asarray([len(p) for p in ps], np.int32)

  # row 0 drafts the truth then a wrong token; row 1 a wrong first token (only the root's token is emitted)
  chains = [[[ref[0][1], ref[0][2], 1]], [[(ref[1][1] + 1) % cfg.vocab_size]]]
  first_b, cache = prefilled()
  tree = jax.device_put(stack_trees([build_tree(int(first_b[b]), chains[b], 8, 4) for b in range(2)]))
  active_b = jnp.ones((2,), bool)
  step_args = (tree, active_b, jax.random.key(0), jnp.ones((2,), jnp.int32), SamplingConfig(0.0), 4)
  plain = verify_step(params, cfg, cache, *step_args)

  first_b, cache = prefilled()
  cache, root_h_bd, draft_b = start_head(params, cfg, cache, first_b, active_b, HEAD_LAYER, t_dd)
  headed = verify_step(params, cfg, cache, *step_args, None, HEAD_LAYER, t_dd, root_h_bd)

  np.testing.assert_array_equal(plain.num_b, [2, 0])
  np.testing.assert_array_equal(headed.num_b, plain.num_b)
  for b in range(2):
    n = int(plain.num_b[b]) + 1
    np.testing.assert_array_equal(headed.tokens_bd[b, :n], plain.tokens_bd[b, :n])
    assert list(np.asarray(plain.tokens_bd[b, :n])) == ref[b][1:n + 1]
  np.testing.assert_array_equal(headed.cache.lengths, plain.cache.lengths)
  for b in range(2):
    committed = int(plain.cache.lengths[b])
    for name in ("k", "v"):
      np.testing.assert_allclose(getattr(headed.cache, name)[:, b, :, :committed],  # [L, B, K, S, H]
                                 getattr(plain.cache, name)[:, b, :, :committed], atol=1e-5, rtol=1e-5)

  # the draft is the head's argmax on the next root's state after HEAD_LAYER layers, from an independent forward
  next_root_b = jnp.take_along_axis(plain.tokens_bd, plain.num_b[:, None], axis=1)
  pos_b1 = plain.cache.lengths[:, None]
  below = model.run_layers(params, cfg, model.embed(params, cfg, next_root_b), pos_b1,
                           causal_mask(pos_b1, num_slots), plain.cache, pos_b1, 0, HEAD_LAYER)
  np.testing.assert_allclose(headed.root_h_bd, below.h_btd[:, 0], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(headed.head_draft_b, jnp.argmax(head_logits(params, cfg, t_dd, below.h_btd)[:, 0], -1))


def _random_head(cfg, layer, seed):
  return ExitHeads((layer,), jax.random.normal(jax.random.key(seed), (1, cfg.d_model, cfg.d_model)))


@pytest.mark.parametrize("head_kind,order", [("identity", ""), ("identity", None), ("random", None)])
def test_head_drafts_equal_ar(lm8, head_kind, order):
  """Accurate (identity head one layer from the top), and random heads; with and without the databases."""
  prompts = _prompts([(2, 30), (3, 45), (4, 61), (5, 38)])
  want = lm8.generate(prompts, method="ar", max_new_tokens=24)
  heads = "identity" if head_kind == "identity" else _random_head(lm8.cfg, HEAD_LAYER, 0)
  options = dict(heads=heads, head_layers=(7,) if head_kind == "identity" else None)
  if order is not None:
    options["order"] = order
  got = lm8.generate(prompts, method="hd+adadecode", max_new_tokens=24, **options)
  for w, g in zip(want, got):
    assert g.token_ids == w.token_ids
  hit_rate = np.mean([g.stats["head_hit_rate"] for g in got])
  if head_kind == "identity":
    assert hit_rate > 0.5 and min(g.stats["tau"] for g in got) > 1.3
  else:
    assert hit_rate < 0.5


def test_confident_wrong_head_never_changes_output(lm8):
  """A head that always drafts token 0 (never the model's choice here) is rejected every step."""
  cfg = lm8.cfg
  t_dd = jnp.zeros((1, cfg.d_model, cfg.d_model))  # zero logits: argmax 0
  prompts = _prompts([(6, 40)])
  want = lm8.generate(prompts, method="ar", max_new_tokens=16)[0]
  assert 0 not in want.token_ids
  got = lm8.generate(prompts, method="hd+adadecode", max_new_tokens=16, heads=ExitHeads((7,), t_dd), order="")[0]
  assert got.token_ids == want.token_ids and got.stats["head_hit_rate"] == 0 and got.stats["tau"] == 1


@pytest.mark.parametrize("method,counter,bound", [("hd+adadecode", "device_loop", 0),
                                                   ("hd+adadecode_host", "verify_step", 4)])
def test_recompiles_are_bounded_and_one_head_is_required(lm8, method, counter, bound):
  """Within one cache size the device loop is traced once; the host loop once per bucket (1, 2, 4, 8)."""
  prompts = _prompts([(7, 30)])
  lm8.generate(prompts, method=method, max_new_tokens=4, heads="identity", head_layers=(7,))
  before = compilation.TRACE_COUNTS[counter]
  for n, (seed, length) in enumerate([(8, 25), (9, 30), (10, 28)]):  # 64 cache slots each, like the warm-up
    lm8.generate(_prompts([(seed, length)]), method=method, max_new_tokens=20 + n, heads="identity",
                 head_layers=(7,))
  assert compilation.TRACE_COUNTS[counter] - before <= bound
  with pytest.raises(HdjaxError, match="one exit head"):
    lm8.generate(prompts, method=method, max_new_tokens=4, heads="identity", head_layers=(3, 5))


@pytest.mark.slow  # the device loop's identity with ar: test_head_drafts_equal_ar
@pytest.mark.parametrize("head_kind", ["identity", "random"])
def test_device_loop_takes_the_host_loops_steps(lm8, head_kind):
  """`hd+adadecode` on the device loop builds the host loop's trees (head draft first, then the databases): the
  same tokens, accept lengths and head hits for every row of a batch."""
  prompts = _prompts([(2, 30), (3, 45), (4, 61)])
  heads = "identity" if head_kind == "identity" else _random_head(lm8.cfg, HEAD_LAYER, 1)
  options = dict(heads=heads, head_layers=(7,) if head_kind == "identity" else None, max_new_tokens=24)
  got = lm8.generate(prompts, method="hd+adadecode", **options)
  ref = lm8.generate(prompts, method="hd+adadecode_host", **options)
  for g, r in zip(got, ref):
    assert (g.stats["engine"], r.stats["engine"]) == ("device", "host")
    assert g.token_ids == r.token_ids
    assert g.stats["accept_lengths"] == r.stats["accept_lengths"]
    assert g.stats["head_hit_rate"] == r.stats["head_hit_rate"]
    assert g.stats["host_syncs"] <= 4 < r.stats["host_syncs"]


@pytest.mark.slow
def test_sampling_with_head_drafts_matches_target():
  """Tokens 1-3 sampled with head and database drafts vs exact enumeration (total variation)."""
  lm = make_tiny_lm(seed=3, vocab_size=6, eos_ids=(99,))
  prompt, length, num, temperature = (1, 2, 3, 1, 2, 3), 3, 6000, 0.5
  exact = exact_joint(lm, prompt, temperature, length)
  out = speculative_generate(lm, request_for([prompt] * num, length, temperature, seed=5), "sampled",
                             lambda spec: ScriptedDrafter(lambda gen, c, d: [[2, 2], [5]]),
                             SpecConfig(buckets=(1, 8), max_depth=3), head=identity_heads(lm.cfg, (1,)))
  assert np.mean([o.stats["head_hit_rate"] for o in out]) > 0.1
  tv, bound = total_variation_bound(exact, [tuple(o.token_ids[:length]) for o in out])
  assert tv < bound, (tv, bound)
