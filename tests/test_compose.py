"""Compositions: lazy+<method> greedy output equals `lazy` without revival (the pruned set each layer sees is the
same), lazy+pld and lazy+hd equal `lazy` with revival too, the combination falls back like `lazy` on short prompts,
and batched HD equals single-sequence `ar`."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from hdjax import compose, lazy, model
from hdjax.adadecode import decode
from hdjax.api import GenerateRequest
from hdjax.attention import causal_mask
from hdjax.lazy import pruned_prefill
from hdjax.decoding.sampling import SamplingConfig
from tests.conftest import make_tiny_lm

SCHEDULE = lazy.LazyConfig(prune_layers=(2, 4, 6), keep_ratios=(0.6, 0.4, 0.25), min_prompt=0, bucket=64, chunk=48,
                           revive=False)


@pytest.fixture(scope="module")
def lm8():
  return make_tiny_lm(seed=1, n_layers=8)


def _prompts(seed, lengths):
  rng = np.random.default_rng(seed)
  motif = [int(x) for x in rng.integers(3, 128, 9)]
  # random text with a repeated motif, so that prompt-lookup drafts are sometimes accepted
  return [[int(x) for x in rng.integers(3, 128, n - 3 * len(motif))] + motif * 3 for n in lengths]


def test_visibility_makes_a_step_see_what_lazy_decoding_sees(lm8):
  """One token after a pruned prefill: the per-layer-visibility forward (what the speculative and AdaDecode loops
  run) equals LazyLLM's own masked decode layer by layer, and differs from attending to every slot."""
  cfg = lm8.cfg
  prompts = _prompts(3, (150,))
  request = GenerateRequest((tuple(prompts[0]),), 8, SamplingConfig(0.0), 0, (("lazy_config", SCHEDULE),))
  logits_bv, cache, visible_lbs, *_ = pruned_prefill(lm8, request, 256)
  state = lazy.prefill_request(lm8, request, SCHEDULE.validate(cfg), 256)[1]
  token_b1 = jnp.argmax(logits_bv, -1).astype(jnp.int32)[:, None]
  pos_b1 = cache.lengths[:, None]
  mask_b1s = causal_mask(pos_b1, cache.num_slots)

  def step(visible):
    h, _ = model.forward(lm8.params, cfg, token_b1, pos_b1, mask_b1s, cache, pos_b1, visible)
    return np.asarray(model.unembed(lm8.params, cfg, h))

  h_b1d, *_ = lazy.run_layers_masked(lm8.params, cfg, model.embed(lm8.params, cfg, token_b1), pos_b1, pos_b1,
                                     jnp.ones((cfg.n_layers, 1, 1), bool), state.computed_lbs, state.cache, 0,
                                     cfg.n_layers)
  want = np.asarray(model.unembed(lm8.params, cfg, h_b1d))
  np.testing.assert_allclose(step(visible_lbs), want, atol=1e-5, rtol=1e-5)
  assert np.abs(step(None) - want).max() > 1e-3


OPTIONS = {"lazy+adadecode": dict(heads="identity", head_layers=(3, 5), gamma=0.0),
           "lazy+hd+adadecode": dict(heads="identity", head_layers=(7,))}


# lazy+hd's device loop over a frozen set: also tests/test_driver.py (lazy+pld_frozen) and lazy+hd+adadecode here
@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow)
                                    for m in ("lazy+pld", "lazy+hd", "lazy+hd+adadecode")] + ["lazy+adadecode"])
def test_lazy_compositions_equal_lazy_without_revival(lm8, method):
  prompts = _prompts(0, (150, 97))
  want = lm8.generate(prompts, method="lazy", max_new_tokens=24, lazy_config=SCHEDULE)
  got = lm8.generate(prompts, method=method, max_new_tokens=24, lazy_config=SCHEDULE, **OPTIONS.get(method, {}))
  for w, g in zip(want, got):
    assert g.token_ids == w.token_ids
    assert not g.stats["lazy_fallback"] and 0 < g.stats["computed_fraction_prefill"] < 1
  if method == "lazy+adadecode":
    assert min(g.stats["early_tokens"] for g in got) > 0  # every sequence exited early and verified it
  else:
    assert max(g.stats["tau"] for g in got) > 1  # drafts were accepted over the pruned cache
  if method == "lazy+hd+adadecode":
    assert min(g.stats["head_hit_rate"] for g in got) > 0


REVIVING = dataclasses.replace(SCHEDULE, prune_layers=(2, 5), keep_ratios=(0.5, 0.25), revive=True, reselect_every=3,
                               revive_budget=4)


@pytest.mark.parametrize("method", [pytest.param(m, marks=pytest.mark.slow)
                                    for m in ("lazy+pld", "lazy+hd", "lazy+adadecode")] + ["lazy+hd+adadecode"])
def test_lazy_compositions_revive_as_lazy_does(lm8, monkeypatch, method):
  """With revival, every composition emits lazy's tokens and ends with exactly the (layer, slot) pairs lazy
  computed: the same tokens revived at the same re-selection points, none computed twice. (On this random model
  revival does not change the tokens; the SmolLM2 test below checks prompts where it does.)"""
  computed = {}

  def capture(name, loop_fn, state_of):
    def run(*args, **kwargs):
      out = loop_fn(*args, **kwargs)
      computed[name] = np.asarray(state_of(out).computed_lbs)
      return out
    return run

  monkeypatch.setattr(lazy, "lazy_decode_chunk", capture("lazy", lazy.lazy_decode_chunk, lambda out: out.method.state))
  if method == "lazy+adadecode":
    monkeypatch.setattr(decode, "adadecode_loop",
                        capture(method, decode.adadecode_loop, lambda out: out.method.revival.lazy_state))
  else:
    monkeypatch.setattr(compose, "reviving_loop", capture(method, compose.reviving_loop,
                                                          lambda out: out.method.revival.lazy_state))
  prompts = _prompts(0, (150, 97))
  want = lm8.generate(prompts, method="lazy", max_new_tokens=16, lazy_config=REVIVING)
  tree = {} if method == "lazy+adadecode" else dict(buckets=(1, 4))
  got = lm8.generate(prompts, method=method, max_new_tokens=16, lazy_config=REVIVING, **tree, **OPTIONS.get(method, {}))
  for b, (w, g) in enumerate(zip(want, got)):
    assert g.token_ids == w.token_ids
    assert g.stats["lazy_revive"] and g.stats["revived"] == w.stats["revived"] > 0
    n = len(prompts[b])
    np.testing.assert_array_equal(computed[method][:, b, :n], computed["lazy"][:, b, :n])
  assert computed[method].max() == 1
  assert max(g.stats["tau"] for g in got) > 1  # drafts were accepted between re-selection points
  assert max(max(g.stats["accept_lengths"]) for g in got) <= REVIVING.reselect_every
  if method == "lazy+adadecode":
    assert min(g.stats["early_accepted"] for g in got) > 0


@pytest.mark.slow  # the fallback itself: tests/test_lazy.py::test_fallback_below_threshold
def test_short_prompts_fall_back_to_full_prefill(lm8):
  prompts = _prompts(1, (40,))
  cfg = dataclasses.replace(SCHEDULE, min_prompt=64)
  got = lm8.generate(prompts, method="lazy+hd", max_new_tokens=16, lazy_config=cfg)[0]
  assert got.stats["lazy_fallback"] is True
  assert got.token_ids == lm8.generate(prompts, method="ar", max_new_tokens=16)[0].token_ids


@pytest.mark.parametrize("method,options", [pytest.param("hd_context", {}, marks=pytest.mark.slow), ("pld", {}),
                                            ("adadecode", dict(heads="identity", head_layers=(2,), gamma=0.0))])
def test_batched_speculative_equals_single_sequence_ar(method, options):
  lm = make_tiny_lm()
  prompts = _prompts(2, (30, 45, 61, 38, 50, 33, 70, 41))
  got = lm.generate(prompts, method=method, max_new_tokens=20, **options)
  for p, g in zip(prompts, got):
    assert g.token_ids == lm.generate([p], method="ar", max_new_tokens=20)[0].token_ids
  assert max(g.stats["tau"] for g in got) > 1


@pytest.mark.slow
def test_real_model_lazy_hd_equals_lazy_without_revival(smollm):
  """SmolLM2 on a ~1.2k-token prompt (XSum-like text repeated, so drafts are accepted) with the default schedule."""
  text = " ".join(f"Report {i}: the council voted to keep the library open on Sundays." for i in range(90))
  ids = smollm.tokenizer.apply_chat_template([{"role": "user", "content": text + "\nSummarize the reports."}])
  cfg = dataclasses.replace(lazy.LazyConfig(), revive=False, min_prompt=1024)
  want = smollm.generate([ids], method="lazy", max_new_tokens=48, lazy_config=cfg)[0]
  got = smollm.generate([ids], method="lazy+hd", max_new_tokens=48, lazy_config=cfg)[0]
  assert not got.stats["lazy_fallback"] and got.stats["tau"] > 1
  assert got.token_ids == want.token_ids


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lazy+hd", "lazy+pld", "lazy+rest", "lazy+hd+adadecode", "lazy+adadecode"])
def test_real_model_lazy_compositions_equal_lazy_with_revival(smollm, method):
  """SmolLM2 on two ~2k-token passkey prompts (the launcher's seed-0 set), a schedule that prunes hard (5% from
  layer 4) and revives often (16 tokens every 2 steps): revival changes lazy's answer on the first prompt, and the
  compositions follow lazy with revival, not the frozen set."""
  from experiments.common import XSUM_ARTICLES  # pylint: disable=import-outside-toplevel
  from experiments.longctx_lib import build_sets  # pylint: disable=import-outside-toplevel
  rows = build_sets(smollm, ["passkey"], [2048], 2, XSUM_ARTICLES, 0)
  ids = [smollm.tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}]) for r in rows]
  cfg = dataclasses.replace(lazy.LazyConfig(), prune_layers=(4,), keep_ratios=(0.05,), reselect_every=2,
                            revive_budget=16)
  want = smollm.generate(ids, method="lazy", max_new_tokens=32, lazy_config=cfg)
  frozen = smollm.generate(ids, method="lazy", max_new_tokens=32, lazy_config=dataclasses.replace(cfg, revive=False))
  assert want[0].token_ids != frozen[0].token_ids
  got = smollm.generate(ids, method=method, max_new_tokens=32, lazy_config=cfg)
  for w, g in zip(want, got):
    assert g.token_ids == w.token_ids
    assert g.stats["lazy_revive"] and g.stats["revived"] == w.stats["revived"] > 0
  assert max(g.stats["tau"] for g in got) > 1
