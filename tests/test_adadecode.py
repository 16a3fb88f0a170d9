"""AdaDecode: greedy parity with `ar` under any heads (full or reduced vocabulary), the reduced head's logits, exact
acceptance with perfect heads, packed batches, bounded traces, sampling distribution, and real-SmolLM2 parity with
the committed trained heads."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hdjax import compilation
from hdjax.adadecode import decode
from hdjax.adadecode.heads import load_heads
from hdjax.exit_heads import ExitHeads, head_logits, identity_heads, reduced_heads, reduced_logits
from hdjax.api import LM
from hdjax.errors import HdjaxError
from tests.conftest import make_tiny_lm

HEAD_LAYERS = (2, 4, 6)


@pytest.fixture(scope="module")
def deep_tiny() -> LM:
  return make_tiny_lm(0, n_layers=8)


def _prompts(seed: int, vocab: int):
  rng = np.random.default_rng(seed)
  return [rng.integers(3, vocab, size=n).tolist() for n in (4, 9)]


def _random_heads(seed: int, d: int, scale: float, vocab: int = 128) -> ExitHeads:
  rng = np.random.default_rng(seed)
  t_idd = rng.normal(size=(len(HEAD_LAYERS), d, d)) * scale
  return ExitHeads(HEAD_LAYERS, jnp.asarray(t_idd, jnp.float32), tuple(rng.permutation(vocab).tolist()))


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 10_000), scale=st.sampled_from([0.0, 0.3, 30.0]), gamma=st.sampled_from([0.0, 0.2, 0.9]),
       head_vocab=st.sampled_from([0, 16]))
def test_greedy_parity_with_any_heads(deep_tiny, seed, scale, gamma, head_vocab):
  """Random heads, all-wrong heads (T=0: uniform, argmax token 0) and sharp confident heads with gamma=0 (exit at
  every head), over the full vocabulary or 16 random candidate ids, never change greedy output."""
  prompts = _prompts(seed, deep_tiny.cfg.vocab_size)
  ref = deep_tiny.generate(prompts, method="ar", max_new_tokens=24)
  out = deep_tiny.generate(prompts, method="adadecode", max_new_tokens=24, heads=_random_heads(seed, 64, scale),
                           gamma=gamma, max_pending=3, head_vocab=head_vocab)
  assert [r.token_ids for r in out] == [r.token_ids for r in ref]
  for r in out:
    assert sum(r.stats["accept_lengths"]) == r.stats["new_tokens"] == len(r.token_ids)
    if gamma == 0.0:
      assert r.stats["early_tokens"] > 0


@pytest.mark.parametrize("tie", [False, True])
def test_reduced_head_logits_are_the_full_heads_at_the_candidates(tie):
  """W_i = E*[ids] . T_i^T gives the full head's logits at the candidate ids (a separate [D, V] head, or tied to the
  embedding)."""
  lm = make_tiny_lm(0, tie_embeddings=tie)
  heads = _random_heads(4, lm.cfg.d_model, 0.5)
  ids_n = np.asarray(heads.vocab_ids[:40], np.int32)
  h_btd = jax.random.normal(jax.random.key(1), (2, 3, lm.cfg.d_model)) * 3.0
  w_ind = reduced_heads(lm.params, lm.cfg, heads.t_idd, ids_n)
  assert w_ind.shape == (len(HEAD_LAYERS), 40, lm.cfg.d_model)
  for i in range(len(HEAD_LAYERS)):
    full_btv = head_logits(lm.params, lm.cfg, heads.t_idd[i], h_btd)
    np.testing.assert_allclose(reduced_logits(lm.params, lm.cfg, w_ind[i], h_btd), full_btv[..., ids_n], rtol=1e-5,
                               atol=1e-4)
  assert not np.allclose(reduced_logits(lm.params, lm.cfg, w_ind[0], h_btd), full_btv[..., ids_n], atol=1e-2)


@pytest.mark.parametrize("max_pending", [1, pytest.param(5, marks=pytest.mark.slow)])
def test_always_exit_parity_and_pending_bound(deep_tiny, max_pending):
  prompts = _prompts(7, deep_tiny.cfg.vocab_size)
  ref = deep_tiny.generate(prompts, method="ar", max_new_tokens=30)
  out = deep_tiny.generate(prompts, method="adadecode", max_new_tokens=30, heads=_random_heads(1, 64, 10.0),
                           gamma=0.0, max_pending=max_pending)
  assert [r.token_ids for r in out] == [r.token_ids for r in ref]
  assert all(r.stats["mean_pending_depth"] == pytest.approx(max_pending) for r in out)


def test_without_verification_keeps_the_early_tokens(deep_tiny):
  """The paper's ablation: with random heads that always exit, verification rejects and the output is `ar`'s;
  without it every early token is kept, nothing is rejected, and the output is not `ar`'s."""
  prompts = _prompts(7, deep_tiny.cfg.vocab_size)
  ref = deep_tiny.generate(prompts, method="ar", max_new_tokens=30)
  options = dict(heads=_random_heads(1, 64, 10.0), gamma=0.0, max_pending=3)
  checked = deep_tiny.generate(prompts, method="adadecode", max_new_tokens=30, **options)
  unchecked = deep_tiny.generate(prompts, method="adadecode", max_new_tokens=30, verify=False, **options)
  assert [r.token_ids for r in checked] == [r.token_ids for r in ref]
  assert all(r.stats["rejections"] > 0 for r in checked)
  assert [r.token_ids for r in unchecked] != [r.token_ids for r in ref]
  for r in unchecked:
    assert r.stats["verify"] is False and r.stats["rejections"] == 0
    assert r.stats["early_accepted"] == r.stats["early_tokens"] > 0


def _skip_late_layers(lm: LM, first_skipped: int) -> LM:
  """Layers >= first_skipped add nothing to the residual stream (their K/V still exist): an identity head at
  first_skipped predicts exactly what the full model does."""
  o, down = lm.cfg.weight_name("o"), lm.cfg.weight_name("down")
  layers = tuple(dict(p, **{o: p[o] * 0.0, down: p[down] * 0.0}) if i >= first_skipped else p
                 for i, p in enumerate(lm.params["layers"]))
  return LM(lm.cfg, dict(lm.params, layers=layers), None, name="tiny-skip")


def test_perfect_heads_are_always_accepted_and_save_layers(deep_tiny):
  lm = _skip_late_layers(deep_tiny, 4)
  prompts = _prompts(3, lm.cfg.vocab_size)
  ref = lm.generate(prompts, method="ar", max_new_tokens=32)
  out = lm.generate(prompts, method="adadecode", max_new_tokens=32, heads=identity_heads(lm.cfg, (4, 6)),
                    gamma=0.0, max_pending=4)
  assert [r.token_ids for r in out] == [r.token_ids for r in ref]
  for r in out:
    st_ = r.stats
    assert st_["rejections"] == 0 and st_["early_accepted"] == st_["early_tokens"] > 0
    assert st_["exit_rate_per_layer"]["4"] == 1.0
    # every token still runs every layer exactly once (its K/V is exact), but in fewer, batched layer steps
    assert st_["layer_tokens"] == [st_["layer_tokens"][0]] * lm.cfg.n_layers
    assert st_["layer_steps"] < lm.cfg.n_layers * st_["new_tokens"]


def test_each_iteration_runs_a_whole_segment(deep_tiny):
  """With one head at layer 4 of 8 (always confident, up to 3 pending), a window with e exits takes e + 2 loop
  iterations ([0, 4) for each of its e + 1 tokens, then [4, 8) for all of them), not one per layer."""
  prompts = _prompts(5, deep_tiny.cfg.vocab_size)[:1]
  ref = deep_tiny.generate(prompts, method="ar", max_new_tokens=24)
  out = deep_tiny.generate(prompts, method="adadecode", max_new_tokens=24, heads=identity_heads(deep_tiny.cfg, (4,)),
                           gamma=0.0, max_pending=3)[0]
  assert out.token_ids == ref[0].token_ids
  st_ = out.stats
  exits, windows = sum(st_["exits"]), st_["verifications"]
  assert exits > 0 and decode.segments_of(8, (4,)) == ((0, 4), (4, 8))
  assert st_["loop_iterations"] == exits + 2 * windows
  assert st_["layer_steps"] == 4 * (exits + windows) + 4 * windows


@pytest.mark.slow  # ~22 s; batched AdaDecode identity stays in the default run (test_compose.py)
def test_batch_decodes_each_sequence_as_if_alone(deep_tiny):
  """One loop over four prompts of different lengths, one of which meets EOS early: every sequence's tokens AND
  work counters (layer rows, layer steps, exits, verifications) equal its single-sequence run, so no sequence does
  work for another and a finished one takes no further part."""
  prompts = [p for seed in (11, 12) for p in _prompts(seed, deep_tiny.cfg.vocab_size)]
  eos = deep_tiny.generate(prompts[:1], method="ar", max_new_tokens=24)[0].token_ids[4]
  lm = make_tiny_lm(0, n_layers=8, eos_ids=(eos,))
  # gamma 0.1: exits at some heads and not others, so the sequences fall out of step and blocks get packed
  options = dict(max_new_tokens=24, heads=_random_heads(2, 64, 1.0), gamma=0.1, max_pending=3, in_step=False)
  batch = lm.generate(prompts, method="adadecode", **options)
  alone = [lm.generate([p], method="adadecode", **options)[0] for p in prompts]
  assert [r.token_ids for r in batch] == [r.token_ids for r in alone] == [
      r.token_ids for r in lm.generate(prompts, method="ar", max_new_tokens=24)]
  assert batch[0].token_ids[-1] == eos and len(batch[0].token_ids) <= 5 < max(len(r.token_ids) for r in batch)
  work = ("layer_tokens", "layer_steps", "head_evals", "exits", "verifications", "accept_lengths")
  assert [{k: r.stats[k] for k in work} for r in batch] == [{k: r.stats[k] for k in work} for r in alone]
  # the sequences taking part were packed: some layer steps ran a block of 1 or 2 sequences, not all 4
  assert all(r.stats["mean_block_seqs"] == 1.0 for r in alone)
  assert min(r.stats["mean_block_seqs"] for r in batch) < 4.0


def test_in_step_batch_exits_together_and_keeps_the_tokens(deep_tiny):
  """`in_step` (the default): a batch's sequences exit at a head all together or not at all, so every layer step
  runs the whole batch (no packed blocks) and each sequence's window has the same exits; the tokens stay `ar`'s.
  Decoded on their own heads, the same sequences exit at different steps."""
  prompts = _prompts(5, deep_tiny.cfg.vocab_size)
  options = dict(max_new_tokens=24, heads=_random_heads(2, 64, 1.0), gamma=0.1, max_pending=3)
  own = deep_tiny.generate(prompts, method="adadecode", in_step=False, **options)
  in_step = deep_tiny.generate(prompts, method="adadecode", **options)  # the default
  ar_tokens = [r.token_ids for r in deep_tiny.generate(prompts, method="ar", max_new_tokens=24)]
  assert [r.token_ids for r in in_step] == [r.token_ids for r in own] == ar_tokens
  assert all(len(t) == 24 for t in ar_tokens)  # no sequence stops early
  assert own[0].stats["exits"] != own[1].stats["exits"]
  assert in_step[0].stats["exits"] == in_step[1].stats["exits"] and sum(in_step[0].stats["exits"]) > 0
  assert all(r.stats["mean_block_seqs"] == 2.0 for r in in_step)
  assert min(r.stats["mean_block_seqs"] for r in own) < 2.0


def test_no_recompile_per_token_or_prompt(deep_tiny):
  heads = _random_heads(0, 64, 1.0)
  # the warm-up has the batch size of the calls below (the compile depends on it), so the test holds when run alone
  deep_tiny.generate(_prompts(99, 128), method="adadecode", max_new_tokens=20, heads=heads, gamma=0.3, max_pending=3)
  before = compilation.TRACE_COUNTS["adadecode_loop"]
  for seed in range(3):
    deep_tiny.generate(_prompts(seed, 128), method="adadecode", max_new_tokens=17 + seed, heads=heads,
                       gamma=0.1 * seed, max_pending=3)
  assert compilation.TRACE_COUNTS["adadecode_loop"] == before


def test_bad_options(deep_tiny):
  with pytest.raises(HdjaxError):
    deep_tiny.generate([[5, 6]], method="adadecode", heads="identity", head_layers=(0, 9))
  with pytest.raises(HdjaxError):
    deep_tiny.generate([[5, 6]], method="adadecode", heads="identity", max_pending=0)
  with pytest.raises(HdjaxError):
    deep_tiny.generate([[5, 6]], method="adadecode", heads="/nonexistent/heads")
  heads = _random_heads(0, 64, 1.0)
  for bad in (dict(head_vocab=-1), dict(head_vocab=129), dict(head_vocab="16"),
              dict(head_vocab=8, heads=ExitHeads(HEAD_LAYERS, heads.t_idd)),
              dict(head_vocab=4, heads=ExitHeads(HEAD_LAYERS, heads.t_idd, (3, 3, 4, 5))),
              dict(head_vocab="16", heads="identity", head_layers=(4,)),
              dict(head_vocab=16, heads="identity", head_layers=(4,))):
    with pytest.raises(HdjaxError, match="head_vocab|ranking|vocab.json"):
      deep_tiny.generate([[5, 6]], method="adadecode", **{"heads": heads, **bad})


def _exact_second_token_dist(lm: LM, prompt, temperature: float) -> np.ndarray:
  """P(second generated token = v) for v < V, and P(no second token: the first was EOS) at index V."""
  vocab = lm.cfg.vocab_size
  p1 = jax.nn.softmax(lm.logits(prompt)[-1] / temperature)
  out = np.zeros(vocab + 1)
  for t1 in range(vocab):
    if t1 in lm.cfg.eos_ids:
      out[vocab] += p1[t1]
    else:
      out[:vocab] += p1[t1] * np.asarray(jax.nn.softmax(lm.logits(prompt + [t1])[-1] / temperature))
  return out


@pytest.mark.slow  # ~60 s: kept out of `make test` (under 15 min on 2 cores); `make test-slow` runs it
def test_sampling_matches_target_distribution():
  """With gamma=0 every second token is an early head guess that verification accepts or resamples: its marginal
  must be the model's, not the head's (chi-square against the exact distribution)."""
  cfg_vocab = 12
  lm = make_tiny_lm(3, n_layers=6, vocab_size=cfg_vocab, eos_ids=(11,))
  prompt, n = [3, 5, 7], 1500
  heads = ExitHeads(HEAD_LAYERS[:2], jnp.asarray(np.random.default_rng(0).normal(size=(2, 64, 64)) * 2.0,
                                                  jnp.float32))
  res = lm.generate([prompt] * n, method="adadecode", max_new_tokens=2, temperature=1.0, heads=heads, gamma=0.0,
                    max_pending=2, seed=11)
  counts = np.zeros(cfg_vocab + 1)
  for r in res:
    counts[r.token_ids[1] if len(r.token_ids) > 1 else cfg_vocab] += 1
  assert sum(r.stats["rejections"] for r in res) > 50  # the residual path is exercised
  expected = _exact_second_token_dist(lm, prompt, 1.0) * n
  keep = expected > 5
  chi2 = float(np.sum((counts[keep] - expected[keep]) ** 2 / expected[keep]))
  assert chi2 < 40.0, (chi2, counts, expected.round(1))  # df <= 12; p < 1e-4 above 40
  tv = 0.5 * np.sum(np.abs(counts / n - expected / n))
  assert tv < 0.05


DEFAULT_HEADS = decode.DEFAULT_HEADS_DIR
needs_heads = pytest.mark.skipif(not os.path.isdir(DEFAULT_HEADS), reason="trained heads not exported yet")

QUESTIONS = ["What is the capital of France? Answer in one sentence.",
             "Write a Python function that returns the factorial of n.",
             "Summarize in two sentences: The city council met on Tuesday to discuss the new park, which will open "
             "next spring after two years of construction."]


@needs_heads
def test_smollm_parity_with_trained_heads(smollm):
  prompts = [smollm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS[:1]]
  ref = smollm.generate(prompts, method="ar", max_new_tokens=40)
  out = smollm.generate(prompts, method="adadecode", max_new_tokens=40)  # the committed heads at DEFAULT_LAYERS
  assert [r.token_ids for r in out] == [r.token_ids for r in ref]
  assert sum(r.stats["early_accepted"] for r in out) > 0
  assert all(r.stats["head_vocab"] == decode.DEFAULT_HEAD_VOCAB for r in out)


def _reduced_vocab_batch_parity(smollm, questions, max_new_tokens):
  """The committed heads at layers 22 and 26 over their 2,048 most frequent reply tokens, prompts of different
  lengths in one packed batch (each sequence on its own head): each identical to its single-sequence `ar` output
  (fp32)."""
  prompts = [smollm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]
  ref = [smollm.generate([p], method="ar", max_new_tokens=max_new_tokens)[0].token_ids for p in prompts]
  out = smollm.generate(prompts, method="adadecode", max_new_tokens=max_new_tokens, head_vocab=2048,
                        head_layers=(22, 26), gamma=0.5, in_step=False)
  assert [r.token_ids for r in out] == ref
  assert sum(r.stats["early_accepted"] for r in out) > 0
  assert min(r.stats["mean_block_seqs"] for r in out) < len(prompts)  # some layer steps ran a packed block


@needs_heads
@pytest.mark.slow
def test_smollm_reduced_vocab_batch_parity(smollm):
  _reduced_vocab_batch_parity(smollm, QUESTIONS[1:], 32)


@needs_heads
@pytest.mark.slow
def test_smollm_reduced_vocab_batch4_parity(smollm):
  _reduced_vocab_batch_parity(smollm, QUESTIONS + ["Translate to German: the weather is nice today."], 96)


@needs_heads
@pytest.mark.slow
def test_smollm_parity_more_prompts_and_settings(smollm):
  # XLA:CPU segfaulted compiling the six-head loop below after this module's other programs (before and after the
  # segment loop, 2026-11-29); alone it compiles: start from an empty compilation cache
  jax.clear_caches()
  prompts = [smollm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
  ref = smollm.generate(prompts, method="ar", max_new_tokens=160)
  for gamma, pending in ((0.75, 5), (0.3, 5), (0.95, 2)):
    out = smollm.generate(prompts, method="adadecode", max_new_tokens=160, gamma=gamma, max_pending=pending)
    assert [r.token_ids for r in out] == [r.token_ids for r in ref]
  all_heads = load_heads(DEFAULT_HEADS, smollm.cfg)
  out = smollm.generate(prompts, method="adadecode", max_new_tokens=160, heads=all_heads, gamma=0.5, head_vocab=0)
  assert [r.token_ids for r in out] == [r.token_ids for r in ref]
  out = smollm.generate(prompts, method="adadecode", max_new_tokens=160, heads="identity", gamma=0.5)
  assert [r.token_ids for r in out] == [r.token_ids for r in ref]
  for head_vocab, layers in ((1024, (26,)), (4096, (18, 22, 26))):
    out = smollm.generate(prompts, method="adadecode", max_new_tokens=160, head_vocab=head_vocab, head_layers=layers,
                          gamma=0.5)
    assert [r.token_ids for r in out] == [r.token_ids for r in ref]
