"""bf16 on the real model: every lossless method returns `ar`'s tokens in the same dtype.

On XLA:CPU a bf16 step rounds its activations to bf16 before every weight contraction, so an fp32-level difference
between two compiled programs (another fusion, another row count) can flip a rounding and then a token. The
engine keeps decode and verify the same program (`model.step_logits`, rows padded to `cfg.engine.row_multiple` by the
callers). Before that, the travel-blog question below diverged from `ar` at its 7th token under `pld` and `hd`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hdjax
from hdjax import model
from hdjax.attention import causal_mask, prefix_plus_block_mask
from hdjax.decoding import autoregressive as ar
from hdjax.decoding.tree import build_tree, stack_trees

QUESTIONS = [
    "Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural experiences and "
    "must-see attractions.",
    "Hallie had dance practice for 1 hour on Tuesdays and 2 hours on Thursdays.  On Saturdays, she had dance "
    "practice that lasted twice as long as Tuesday's night class.  How many hours a week did she have dance "
    "practice?",
]
MORE_QUESTIONS = [
    "Write a Python function that returns the n-th Fibonacci number, then explain how it works.",
    "Translate German to English: Die Katze sitzt auf der Matte, und der Hund schläft neben dem Ofen.",
    "Summarize: The city council met on Tuesday to discuss the new bus routes. After three hours of debate, the "
    "council voted to extend route 12 to the airport and to add two night buses on weekends, starting in May.",
    "What are the main differences between a virus and a bacterium? Answer in a short list.",
]


@pytest.fixture(scope="module")
def smollm_bf16() -> hdjax.LM:
  return hdjax.load("smollm2-135m", dtype="bfloat16")


def _prompts(lm: hdjax.LM, questions: list[str]) -> list[list[int]]:
  return [lm.tokenizer.apply_chat_template([{"role": "user", "content": q}]) for q in questions]


def _check_identical(lm: hdjax.LM, questions: list[str], methods: list[str], max_new_tokens: int, **sampling) -> None:
  for n, ids in enumerate(_prompts(lm, questions)):
    ref = lm.generate([ids], method="ar", max_new_tokens=max_new_tokens, seed=n, **sampling)[0].token_ids
    for method in methods:
      out = lm.generate([ids], method=method, max_new_tokens=max_new_tokens, seed=n, **sampling)[0].token_ids
      assert out == ref, f"{method} differs from ar in bf16 at token {_first_difference(out, ref)} ({sampling})"


def _first_difference(a: list[int], b: list[int]) -> int:
  return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def test_bf16_engine_pads_steps(smollm_bf16):
  assert smollm_bf16.cfg.dtype == "bfloat16" and smollm_bf16.cfg.engine.row_multiple == 8


def test_speculative_methods_identical_to_ar_in_bf16(smollm_bf16):
  _check_identical(smollm_bf16, QUESTIONS, ["pld", "hd"], 64)


def test_sampled_methods_identical_to_ar_in_bf16(smollm_bf16):
  _check_identical(smollm_bf16, QUESTIONS, ["pld", "hd"], 48, temperature=0.8, top_k=40, top_p=0.9)


@pytest.mark.slow
@pytest.mark.parametrize("sampling", [dict(temperature=0.8, top_k=40, top_p=0.9), dict(temperature=1.0)], ids=str)
def test_sampled_methods_identical_to_ar_in_bf16_more(smollm_bf16, sampling):
  _check_identical(smollm_bf16, QUESTIONS + MORE_QUESTIONS, ["pld", "hd", "rest", "adadecode", "hd+adadecode"], 64,
                   **sampling)


def test_a_layer_run_on_its_own_computes_what_the_decode_step_does(smollm_bf16):
  """AdaDecode runs a token's layers one at a time (each a one-layer model over its layer's cache, as
  `adadecode._layer_rows` does) and `hd+adadecode` runs the layers below the head apart from those above; their
  logits are bitwise the decode step's because each layer is a computation of its own (`model.run_layers`).
  Before that, 4 of these 6 tokens' logits differed (by up to 0.16)."""
  lm, num_slots = smollm_bf16, 256
  params, cfg = lm.params, lm.cfg
  ids = _prompts(lm, QUESTIONS[:1])[0]
  length = jnp.asarray([len(ids)], jnp.int32)
  logits_bv, cache = jax.jit(ar.prefill, static_argnames=("cfg", "num_slots"))(
      params, cfg, jnp.asarray([ids]), length, num_slots=num_slots)
  decode = jax.jit(ar.decode_one, static_argnames="cfg")

  @jax.jit
  def one_layer(p_layer, h_btd, k_1bksh, v_1bksh, pos_bt):
    local = cache.replace(k=k_1bksh, v=v_1bksh)
    return model.run_layers({"layers": (p_layer,)}, cfg, h_btd, pos_bt, causal_mask(pos_bt, num_slots), local,
                            pos_bt, 0, 1).h_btd

  unembed = jax.jit(model.unembed, static_argnames="cfg")
  token_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
  for _ in range(6):
    pos_bt = cache.lengths[:, None]
    h_btd = model.embed(params, cfg, token_b[:, None])
    for l in range(cfg.n_layers):
      h_btd = one_layer(model.layer_params(params, l), h_btd, cache.k[l:l + 1], cache.v[l:l + 1], pos_bt)
    layered_v = unembed(params, cfg, h_btd)[0, 0]
    logits_bv, cache = decode(params, cfg, cache, token_b, jnp.ones((1,), bool))
    np.testing.assert_array_equal(np.asarray(layered_v), np.asarray(logits_bv[0]))
    token_b = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)


@pytest.mark.slow
def test_exit_head_methods_identical_to_ar_in_bf16_more(smollm_bf16):
  _check_identical(smollm_bf16, QUESTIONS + MORE_QUESTIONS, ["adadecode", "hd+adadecode"], 96)


@pytest.mark.slow
def test_batched_adadecode_identical_to_single_ar_in_bf16(smollm_bf16):
  """Packed batches run a layer for 1, 2 or 4 sequences at a time; each sequence still gets its own `ar` tokens."""
  prompts = _prompts(smollm_bf16, QUESTIONS + MORE_QUESTIONS[:2])
  refs = [smollm_bf16.generate([p], method="ar", max_new_tokens=48)[0].token_ids for p in prompts]
  outs = [r.token_ids for r in smollm_bf16.generate(prompts, method="adadecode", max_new_tokens=48)]
  assert outs == refs


@pytest.mark.slow
def test_speculative_methods_identical_to_ar_in_bf16_more(smollm_bf16):
  _check_identical(smollm_bf16, QUESTIONS + MORE_QUESTIONS, ["pld", "hd", "hd_context", "pld_host"], 128)


@pytest.mark.slow
def test_batched_speculative_identical_to_batched_ar_in_bf16(smollm_bf16):
  prompts = _prompts(smollm_bf16, QUESTIONS + MORE_QUESTIONS)
  refs = [r.token_ids for r in smollm_bf16.generate(prompts, method="ar", max_new_tokens=48)]
  for method in ("pld", "hd"):
    outs = [r.token_ids for r in smollm_bf16.generate(prompts, method=method, max_new_tokens=48)]
    assert outs == refs, f"batched {method} differs from batched ar in bf16"


@pytest.mark.slow
def test_a_later_chain_of_the_tree_computes_what_decoding_does(smollm_bf16):
  """A verify step's logits at the nodes of the tree's second chain (ancestors at tree slots 0, 4, 5: not where
  they will be committed; rows 4-6 of the step) are bitwise those of the decode steps that feed the same tokens,
  which is what lets greedy acceptance trust them (`verify.trusted_nodes`). The attention-level property this
  needs is tested on random data in test_model.py (there every case fails with the softmax's denominator summed by
  a reduce); here the bf16 rounding before the output projection hides most such 1-ulp differences, so this checks
  the whole step on the real model rather than that property."""
  lm, num_slots = smollm_bf16, 512
  params, cfg = lm.params, lm.cfg
  ids = _prompts(lm, QUESTIONS[:1])[0]
  length = jnp.asarray([len(ids)], jnp.int32)
  prefill = jax.jit(ar.prefill, static_argnames=("cfg", "num_slots"))
  logits_bv, cache = prefill(params, cfg, jnp.asarray([ids]), length, num_slots=num_slots)
  decode = jax.jit(ar.decode_one, static_argnames="cfg")
  fed, decoded = [int(jnp.argmax(logits_bv[0]))], []
  step_cache = cache
  for _ in range(4):
    logits_bv, step_cache = decode(params, cfg, step_cache, jnp.asarray(fed[-1:]), jnp.ones((1,), bool))
    decoded.append(np.asarray(logits_bv[0]))
    fed.append(int(jnp.argmax(logits_bv[0])))
  wrong = [(t + 1) % cfg.vocab_size for t in fed[1:4]]
  tree = jax.tree.map(jnp.asarray, stack_trees([build_tree(fed[0], [wrong, fed[1:4]], 8, 4)]))
  assert [int(t) for t in tree.tokens[0, 4:7]] == fed[1:4]
  verify = jax.jit(model.step_logits, static_argnames="cfg")
  logits_btv, _ = verify(params, cfg, tree.tokens, length[:, None] + tree.depths,
                         prefix_plus_block_mask(length, tree.ancestors, num_slots), cache,
                         length[:, None] + jnp.arange(8)[None, :])
  for node, step in ((0, 0), (4, 1), (5, 2), (6, 3)):
    np.testing.assert_array_equal(np.asarray(logits_btv[0, node]), decoded[step], err_msg=f"node {node}")
