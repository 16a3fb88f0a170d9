"""Model parity: an independent NumPy forward, cached decode == full forward, KV cache operations."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import hdjax

from hdjax import api, attention, kvcache, lazy, model
from hdjax.api import resolve_path
from hdjax.config import EngineLayout, RopeScaling, engine_settings
from hdjax.errors import HdjaxError
from hdjax.weights import convert, gguf
from tests.conftest import make_tiny_lm
from tests.numpy_reference import numpy_logits


@pytest.mark.parametrize("tie", [False, True])
def test_tiny_matches_numpy(tie):
  lm = make_tiny_lm(seed=3, tie_embeddings=tie)
  state = convert.hf_state_from_params(lm.cfg, lm.params)
  ids = [5, 9, 1, 77, 3, 3, 100, 42, 7, 0, 11]
  np.testing.assert_allclose(lm.logits(ids), numpy_logits(state, lm.cfg, ids), atol=1e-4, rtol=0)


def test_llama3_rope_scaling_matches_numpy():
  lm = make_tiny_lm(seed=4, rope_scaling=RopeScaling(factor=8.0, original_max_position=64))
  inv = attention.rope_inv_freq(lm.cfg).astype(np.float64)
  assert not np.allclose(inv, 1.0 / 10000.0 ** (np.arange(0, 16, 2) / 16))  # scaling changed something
  state = convert.hf_state_from_params(lm.cfg, lm.params)
  ids = list(range(3, 40))
  np.testing.assert_allclose(lm.logits(ids), numpy_logits(state, lm.cfg, ids, inv_freq=inv), atol=1e-4, rtol=0)


def test_smollm_matches_numpy(smollm):
  _, state, _ = gguf.load_gguf(resolve_path("smollm2-135m"))
  ids = smollm.tokenizer.apply_chat_template([{"role": "user", "content": "Name three rivers in Europe."}])
  ref = numpy_logits(state, smollm.cfg, ids)
  assert np.abs(smollm.logits(ids) - ref).max() <= 1e-4 * max(1.0, np.abs(ref).max() / 10)


def _step_by_step_logits(lm, ids, num_slots=64):
  cfg = lm.cfg

  @jax.jit
  def step(cache, tok, pos):
    h, cache = model.forward(lm.params, cfg, tok, pos, attention.causal_mask(pos, num_slots), cache, pos)
    return model.unembed(lm.params, cfg, h)[0, 0], cache

  cache = kvcache.init_cache(cfg, 1, num_slots)
  out = []
  for i, tok in enumerate(ids):
    logits, cache = step(cache, jnp.array([[tok]]), jnp.array([[i]], jnp.int32))
    out.append(np.asarray(logits))
  return np.stack(out)


def test_full_forward_equals_cached_decode(tiny_lm):
  ids = [4, 8, 15, 16, 23, 42, 99, 1]
  np.testing.assert_allclose(_step_by_step_logits(tiny_lm, ids), tiny_lm.logits(ids), atol=1e-5)


@pytest.mark.slow  # ~74 s with an empty compilation cache; the tiny model's case above stays in the default suite
def test_smollm_full_forward_equals_cached_decode(smollm):
  ids = smollm.tokenizer.encode("The quick brown fox jumps over")
  np.testing.assert_allclose(_step_by_step_logits(smollm, ids), smollm.logits(ids), atol=2e-4)


def test_layer_ranges_compose_and_collect_hidden(tiny_lm):
  cfg, params = tiny_lm.cfg, tiny_lm.params
  tokens = jnp.array([[3, 1, 4, 1, 5]])
  pos = jnp.arange(5)[None]
  mask = attention.causal_mask(pos, 8)
  h0 = model.embed(params, cfg, tokens)
  full = model.run_layers(params, cfg, h0, pos, mask, kvcache.init_cache(cfg, 1, 8), pos, collect_hidden=True)
  first = model.run_layers(params, cfg, h0, pos, mask, kvcache.init_cache(cfg, 1, 8), pos, 0, 2)
  second = model.run_layers(params, cfg, first.h_btd, pos, mask, first.cache, pos, 2, cfg.n_layers)
  np.testing.assert_allclose(second.h_btd, full.h_btd, atol=1e-5)
  np.testing.assert_allclose(second.cache.k, full.cache.k, atol=1e-5)
  assert full.hidden_lbtd.shape == (cfg.n_layers + 1, 1, 5, cfg.d_model)
  np.testing.assert_allclose(full.hidden_lbtd[2], first.h_btd, atol=1e-5)


def test_out_of_range_slots_are_not_written(tiny_lm):
  cfg = tiny_lm.cfg
  cache = kvcache.init_cache(cfg, 1, 8)
  pos = jnp.array([[0, 1]])
  slots = jnp.array([[0, 8]])  # second row dropped
  _, cache = model.forward(tiny_lm.params, cfg, jnp.array([[5, 6]]), pos, attention.causal_mask(pos, 8), cache,
                           slots)
  assert np.abs(np.asarray(cache.k[:, 0, :, 0])).sum() > 0
  assert np.abs(np.asarray(cache.k[:, 0, :, 1:])).sum() == 0


def test_commit_rows_and_rollback():
  cfg = make_tiny_lm().cfg
  cache = kvcache.init_cache(cfg, 2, 10)
  rows = jnp.arange(10, dtype=jnp.float32)[None, None, None, :, None]
  cache = cache.replace(k=jnp.broadcast_to(rows, cache.k.shape), v=jnp.broadcast_to(rows, cache.v.shape) * 2,
                        lengths=jnp.array([3, 5], jnp.int32))
  # sequence 0 accepts speculative rows 6 then 8 (into slots 3, 4); sequence 1 accepts row 5 only (in place)
  out = kvcache.commit_rows(cache, jnp.array([[6, 8, 9], [5, 7, 9]]), jnp.array([2, 1]))
  np.testing.assert_array_equal(out.lengths, [5, 6])
  np.testing.assert_array_equal(out.k[0, 0, 0, :, 0], [0, 1, 2, 6, 8, 5, 6, 7, 8, 9])
  np.testing.assert_array_equal(out.v[0, 1, 0, :, 0], 2 * np.arange(10))
  np.testing.assert_array_equal(kvcache.rollback(out, jnp.array([4, 9])).lengths, [4, 6])


def test_tree_mask_sees_prefix_and_ancestors():
  # tree: 0 -> 1 -> 2, 0 -> 3
  block = jnp.array([[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 1]], bool)[None]
  mask = np.asarray(attention.prefix_plus_block_mask(jnp.array([3]), block, 10))[0]
  np.testing.assert_array_equal(mask[2], [1, 1, 1, 1, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(mask[3], [1, 1, 1, 1, 0, 0, 1, 0, 0, 0])


def test_each_layer_has_its_own_buffers(tiny_lm):
  shapes = jax.tree.map(lambda x: x.shape, tiny_lm.params)
  cfg = tiny_lm.cfg
  assert len(shapes["layers"]) == cfg.n_layers
  want_q = dict(q_dnh=(cfg.d_model, cfg.n_heads, cfg.head_dim), q_nhd=(cfg.n_heads, cfg.head_dim, cfg.d_model))
  assert shapes["layers"][1][cfg.weight_name("q")] == want_q[cfg.weight_name("q")]
  assert shapes["layers"][1]["attn_norm"]["scale"] == (cfg.d_model,)


def _dense_reference_attention(q_btnh, k_btkh, v_btkh, positions_bt, valid_bt):
  """NumPy: softmax over the visible keys (position <= the query's, valid), zeros for a query that sees none."""
  q, k, v = (np.asarray(x, np.float64) for x in (q_btnh, k_btkh, v_btkh))
  b, t, n, h = q.shape
  g = n // k.shape[2]
  out = np.zeros((b, t, n, h))
  for bi in range(b):
    for i in range(t):
      seen = (np.asarray(positions_bt)[bi] <= np.asarray(positions_bt)[bi, i]) & np.asarray(valid_bt)[bi]
      if not seen.any():
        continue
      for head in range(n):
        s = k[bi, seen, head // g] @ q[bi, i, head] / np.sqrt(h)
        p = np.exp(s - s.max())
        out[bi, i, head] = (p / p.sum()) @ v[bi, seen, head // g]
  return out


@pytest.mark.parametrize("t,block", [(16, 4), (13, 4), (8, 16)])
def test_blocked_attention_matches_dense_and_numpy(t, block):
  """Flash-style blocks == one dense masked softmax == NumPy, with gaps in the positions (a pruned prompt), invalid
  tokens at the end and T not a multiple of the block."""
  rng = np.random.default_rng(t)
  b, n, k, h = 2, 6, 2, 8
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
  keys = jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.float32)
  values = jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.float32)
  positions = jnp.asarray(np.cumsum(rng.integers(1, 4, (b, t)), axis=1), jnp.int32)
  valid = jnp.asarray(np.arange(t)[None, :] < np.array([[t], [t - 3]]))
  blocked = attention.blocked_causal_attention(q, keys, values, positions, valid, block)
  mask = (positions[:, None, :] <= positions[:, :, None]) & valid[:, None, :]
  dense = attention.attend(q, keys.swapaxes(1, 2)[None], values.swapaxes(1, 2)[None], 0, mask, 0)  # [L, B, K, S, H]
  rows = np.asarray(valid)
  np.testing.assert_allclose(np.asarray(blocked)[rows], np.asarray(dense)[rows], atol=1e-5)
  np.testing.assert_allclose(np.asarray(blocked), _dense_reference_attention(q, keys, values, positions, valid),
                             atol=1e-5)


def _step_attention_case(seed: int, s: int = 64, t: int = 3):
  """A [L=2, B=2, K=2, S, H] cache, T queries per row, each row seeing a prefix of its own length."""
  rng = np.random.default_rng(seed)
  b, n, k, h = 2, 4, 2, 8
  q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
  cache = rng.standard_normal((2, 2, b, k, s, h)).astype(np.float32)
  seen_b = np.array([21, 37])
  mask = np.arange(s)[None, None, :] < (seen_b[:, None, None] - np.arange(t)[None, :, None])
  return q, cache, mask


@pytest.mark.parametrize("block", [8, 16, 64])
def test_step_attention_reads_blocks_up_to_the_last_visible_slot(block):
  """Key blocks == NumPy, and the slots past the last visible block are never read (NaN there changes nothing)."""
  q, cache, mask = _step_attention_case(0)
  cache[:, 1, :, :, 48:] = np.nan  # layer 1, past every row's extent (37) and its block of 8 or 16
  k_lbksh, v_lbksh = jnp.asarray(cache[0]), jnp.asarray(cache[1])
  out = np.asarray(attention.attend(q, k_lbksh, v_lbksh, 1, jnp.asarray(mask), block))
  assert np.isfinite(out).all() or block == 64  # one block of 64 reads the NaN slots (masked, but NaN * 0)
  if block < 64:
    for bi in range(2):
      for i in range(q.shape[1]):
        seen = mask[bi, i]
        for head in range(q.shape[2]):
          kk, vv = cache[0, 1, bi, head // 2][seen], cache[1, 1, bi, head // 2][seen]
          sc = kk @ np.asarray(q[bi, i, head]) / np.sqrt(q.shape[-1])
          p = np.exp(sc - sc.max())
          np.testing.assert_allclose(out[bi, i, head], (p / p.sum()) @ vv, atol=1e-5)


def test_step_attention_of_a_query_ignores_the_other_queries():
  """A query's result is bitwise the same whether the step's other queries see more slots (more blocks) or not:
  what keeps a tree node's logits equal to a decode step's."""
  q, cache, mask = _step_attention_case(1, t=4)
  k_lbksh, v_lbksh = jnp.asarray(cache[0]), jnp.asarray(cache[1])
  alone = np.asarray(attention.attend(q[:, :1], k_lbksh, v_lbksh, 0, jnp.asarray(mask[:, :1]), 8))
  wider = mask.copy()
  wider[:, 1:] = True  # the other queries see all 64 slots: 8 blocks instead of 5
  together = np.asarray(attention.attend(q, k_lbksh, v_lbksh, 0, jnp.asarray(wider), 8))
  np.testing.assert_array_equal(together[:, :1], alone)


@pytest.mark.parametrize("seed", range(4))
def test_step_attention_is_the_same_with_masked_slots_between_the_keys(seed):
  """The same keys in the same order, contiguous or with masked slots between them (a tree node's ancestors at their
  tree slots vs at their committed slots), in the same block: bitwise the same output. With the softmax's
  denominator summed by a reduce instead of the values' dot, every seed here differed."""
  rng = np.random.default_rng(seed)
  b, t, n, k, h, s, prefix = 1, 8, 9, 3, 64, 512, 300
  q = jnp.asarray(2 * rng.standard_normal((b, t, n, h)), jnp.float32)
  keys, values = (np.repeat(rng.standard_normal((1, b, k, s, h)).astype(np.float32), 2, axis=0) for _ in range(2))
  spread = [prefix, prefix + 2, prefix + 5, prefix + 6]  # in the same block of 128 as prefix .. prefix + 3
  for cache in (keys, values):
    cache[1, :, :, prefix:prefix + 8] = rng.standard_normal((b, k, 8, h))  # other nodes, masked
    cache[1][:, :, spread] = cache[0][:, :, prefix:prefix + 4]
  mask = np.zeros((2, b, t, s), bool)
  mask[:, :, :, :prefix] = True
  mask[0, :, :, prefix:prefix + 4] = True
  mask[1, :, :, spread] = True
  out = [np.asarray(attention.attend(q, jnp.asarray(keys[i][None]), jnp.asarray(values[i][None]), 0,
                                     jnp.asarray(mask[i]), 128)) for i in range(2)]
  np.testing.assert_array_equal(out[1], out[0])


def test_blocked_attention_skips_blocks_above_the_diagonal():
  """Keys after a query's block never reach it: NaN keys/values there leave every earlier output finite."""
  rng = np.random.default_rng(0)
  t, block = 16, 4
  q = jnp.asarray(rng.standard_normal((1, t, 2, 4)), jnp.float32)
  keys = np.asarray(rng.standard_normal((1, t, 1, 4)), np.float32)
  keys[:, 12:] = np.nan
  positions = jnp.arange(t)[None]
  out = attention.blocked_causal_attention(q, jnp.asarray(keys), jnp.asarray(keys), positions,
                                           jnp.ones((1, t), bool), block)
  assert np.isfinite(np.asarray(out)[:, :12]).all()


@pytest.mark.parametrize("t,block", [(16, 4), (13, 4)])
def test_blocked_attention_reading_every_key_block_is_bitwise_the_same(t, block):
  """The accelerator's prefill (every key block read, those above the diagonal masked: a loop of fixed trip count)
  gives bitwise what skipping them gives."""
  rng = np.random.default_rng(t)
  q, keys, values = (jnp.asarray(rng.standard_normal((2, t, n, 8)), jnp.float32) for n in (4, 2, 2))
  positions = jnp.asarray(np.cumsum(rng.integers(1, 4, (2, t)), axis=1), jnp.int32)
  valid = jnp.asarray(np.arange(t)[None, :] < np.array([[t], [t - 3]]))
  skipping, reading_all = (np.asarray(attention.blocked_causal_attention(q, keys, values, positions, valid, block,
                                                                         skip)) for skip in (True, False))
  np.testing.assert_array_equal(reading_all, skipping)


@pytest.mark.parametrize("tie", [False, True])
def test_both_weight_layouts_compute_the_same_logits(tie):
  """fp32 weights stored [out, in] and contracted feature-major over few rows (the CPU engine's layout) give the
  input-major layout's logits at 1 and 3 rows (feature-major) and 10 rows (over the limit of 4: the plain product
  on [out, in] weights); `with_layout` converts either way and back without changing a value."""
  from hdjax.api import params_to_device  # pylint: disable=import-outside-toplevel
  lm = make_tiny_lm(seed=3, tie_embeddings=tie, engine=EngineLayout())
  params_np = jax.device_get(lm.params)
  out_major = lm.cfg.replace(engine=EngineLayout(weights_out_major=True, feature_major_rows=4))
  params_om = params_to_device(params_np, out_major)
  assert set(params_om["layers"][0]) == {"attn_norm", "mlp_norm", "q_nhd", "k_khd", "v_khd", "o_dnh", "gate_fd",
                                         "up_fd", "down_df"}
  assert ("lm_head_vd" in params_om["embedder"]) == (not tie) and "lm_head_dv" not in params_om["embedder"]
  np.testing.assert_array_equal(params_om["layers"][1]["o_dnh"], np.transpose(params_np["layers"][1]["o_nhd"],
                                                                               (2, 0, 1)))
  back = jax.device_get(model.with_layout(lm.cfg, params_om))
  drawn = jax.device_get(model.init_params(out_major, jax.random.key(3)))  # one key, one model, either layout
  for x, y, z in zip(jax.tree.leaves(back), jax.tree.leaves(params_np),
                     jax.tree.leaves(model.with_layout(lm.cfg, drawn))):
    np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(z, y)
  ids = [5, 9, 1, 77, 3, 3, 100, 42, 8, 17]
  for n in (1, 3, 10):  # 1 and 3 rows feature-major (<= 4), 10 rows the plain contraction
    np.testing.assert_allclose(hdjax.LM(out_major, params_om, None).logits(ids[:n]), lm.logits(ids[:n]), atol=2e-5)


@pytest.mark.parametrize("backend", ["gpu", "cpu"])
def test_fused_projections_compute_the_unfused_logits(backend):
  """q/k/v and gate/up fused once at load (`EngineLayout.fused_qkv`, `fused_gate_up`), on the accelerator layout
  and on the CPU's fp32 [out, in] one: `with_layout` fuses and splits back without changing a value, a reader of
  one part (`model.layer_weight`) gets that part, and LazyLLM's scores, the fp32 logits of a full forward and the
  greedy tokens of `ar` are the unfused layout's."""
  unfused = dataclasses.replace(engine_settings("float32", backend), fused_qkv=False, fused_gate_up=False)
  lm = make_tiny_lm(seed=3, engine=unfused)
  cfg = lm.cfg.replace(engine=dataclasses.replace(unfused, fused_qkv=True, fused_gate_up=True))
  params = api.params_to_device(jax.device_get(lm.params), cfg)
  layer = params["layers"][1]
  assert set(layer) == {"attn_norm", "mlp_norm", cfg.weight_name("qkv"), cfg.weight_name("o"),
                        cfg.weight_name("gate_up"), cfg.weight_name("down")}
  d, k, c, h = cfg.d_model, cfg.n_kv_heads, cfg.q_per_kv + 2, cfg.head_dim  # C: a group's G queries, key, value
  assert layer[cfg.weight_name("qkv")].shape == cfg.weight_shape("qkv") == ((k, c, h, d) if backend == "cpu"
                                                                             else (d, k, c, h))
  for weight in ("q", "k", "v", "gate", "up"):
    np.testing.assert_array_equal(model.layer_weight(cfg, layer, weight),
                                  lm.params["layers"][1][lm.cfg.weight_name(weight)])
  for x, y in zip(jax.tree.leaves(model.with_layout(lm.cfg, params)), jax.tree.leaves(lm.params)):
    np.testing.assert_array_equal(x, y)
  h_bnd = jax.random.normal(jax.random.key(0), (1, 12, cfg.d_model))
  positions_bn, valid_bn = jnp.arange(12)[None], jnp.ones((1, 12), bool)
  scores = [np.asarray(lazy.score_tokens(p, config, 1, h_bnd, positions_bn, valid_bn, jnp.asarray([11]))[0])
            for config, p in ((lm.cfg, lm.params), (cfg, params))]
  np.testing.assert_allclose(scores[1], scores[0], atol=1e-6, rtol=0)
  fused_lm = hdjax.LM(cfg, params, None)
  ids = [5, 9, 1, 77, 3, 3, 100, 42, 8, 17]
  np.testing.assert_allclose(fused_lm.logits(ids), lm.logits(ids), atol=1e-5, rtol=0)
  prompts = [ids, ids[:4]]
  assert ([r.token_ids for r in fused_lm.generate(prompts, max_new_tokens=8)]
          == [r.token_ids for r in lm.generate(prompts, max_new_tokens=8)])


def test_engine_layout_per_backend():
  """The CPU keeps per-layer programs and blocked attention (out-major fp32, padded bf16 rows); GPU and TPU run one
  step shape of straight-line layers and one-pass attention, the cache in the weights' dtype, q/k/v and gate/up
  fused."""
  for dtype, backend, out_major in [("float32", "cpu", True), ("bfloat16", "cpu", False), ("float32", "gpu", False),
                                    ("bfloat16", "tpu", False)]:
    layout = engine_settings(dtype, backend)
    assert layout.weights_out_major == out_major and layout.feature_major_rows == (64 if out_major else 0)
    accelerator = backend != "cpu"
    assert layout.layer_programs != accelerator and layout.one_step_shape == accelerator
    assert (layout.key_block == 0) == accelerator and layout.exact_span == (1 if accelerator else 128)
    assert layout.cache_dtype == (dtype if accelerator else "float32")
    assert layout.exhaustive_lookup == accelerator and layout.min_rows == (512 if accelerator else 16)
    assert layout.fused_qkv == layout.fused_gate_up == accelerator
    hdjax.PRESETS["tiny"].replace(dtype=dtype, engine=layout)  # a valid config


@pytest.mark.parametrize("dtype, backend", [("bfloat16", "gpu"), ("float32", "cpu"), ("bfloat16", "cpu")])
def test_timing_params_have_the_loaded_params_tree(dtype, backend):
  """`model.timing_params` gives the tree, shapes and dtypes that a model's params have in the config's layout
  (norm scales fp32), weights of the asked spread, and a forward over them is finite."""
  cfg = hdjax.PRESETS["tiny"].replace(dtype=dtype, engine=engine_settings(dtype, backend))
  want = jax.eval_shape(lambda: api.params_to_device(model.init_params(cfg.replace(dtype="float32"),
                                                                       jax.random.key(0)), cfg))
  got = model.timing_params(cfg, seed=1)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert [(x.shape, x.dtype) for x in jax.tree.leaves(got)] == [(x.shape, x.dtype) for x in jax.tree.leaves(want)]
  weights = np.concatenate([np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(got["layers"]) if x.ndim > 1])
  assert 0.018 < weights.std() < 0.022 and abs(weights.mean()) < 0.001
  logits = api._full_logits(got, cfg, jnp.asarray([[1, 2, 3]]))  # pylint: disable=protected-access
  assert np.isfinite(np.asarray(logits, np.float32)).all()


@pytest.mark.parametrize("changes, error", [(dict(feature_major_rows=8), "needs weights_out_major"),
                                            (dict(row_multiple=0), "row_multiple=0"),
                                            (dict(key_block=-1), "key_block=-1"),
                                            (dict(min_rows=-1), "min_rows=-1")])
def test_bad_engine_layout_is_a_one_line_error(changes, error):
  with pytest.raises(HdjaxError, match=error):
    EngineLayout(**changes)


def test_bf16_engine_tracks_fp32():
  """bf16 weights with fp32 accumulation, padded rows and a [D, V] copy of the tied head: logits close to fp32,
  and padding rows changes nothing in the real ones (a 1-row step padded to 8 == the first row of 8)."""
  from hdjax.api import params_to_device  # pylint: disable=import-outside-toplevel
  lm = make_tiny_lm(seed=5, tie_embeddings=True)
  params_np = jax.device_get(lm.params)
  cfg16 = lm.cfg.replace(dtype="bfloat16", engine=engine_settings("bfloat16", "cpu"))
  assert cfg16.engine.row_multiple == 8 and cfg16.engine.untie_head and cfg16.engine.cache_dtype == "float32"
  params16 = params_to_device(params_np, cfg16)
  np.testing.assert_array_equal(np.asarray(params16["embedder"]["lm_head_dv"], np.float32),
                                np.asarray(params16["embedder"]["embedding_vd"], np.float32).T)
  assert params16["layers"][0]["q_dnh"].dtype == jnp.bfloat16  # bf16 keeps the input-major layout
  assert params16["layers"][0]["attn_norm"]["scale"].dtype == jnp.float32
  ids = [5, 9, 1, 77, 3, 3, 100, 42]
  ref = lm.logits(ids)
  got = hdjax.LM(cfg16, params16, None).logits(ids)
  assert np.abs(got - ref).max() <= 0.05 * np.abs(ref).max()
  num_slots = 16
  positions = jnp.arange(8)[None]
  h8, _ = model.forward(params16, cfg16, jnp.asarray([ids]), positions, attention.causal_mask(positions, num_slots),
                        kvcache.init_cache(cfg16, 1, num_slots), positions)
  h1, _ = model.forward(params16, cfg16, jnp.asarray([ids[:1]]), positions[:, :1],
                        attention.causal_mask(positions[:, :1], num_slots), kvcache.init_cache(cfg16, 1, num_slots),
                        positions[:, :1])
  np.testing.assert_array_equal(np.asarray(model.unembed(params16, cfg16, h1))[0, 0],
                                np.asarray(model.unembed(params16, cfg16, h8))[0, 0])


def test_prefill_never_holds_a_heads_by_tokens_squared_tensor():
  """Peak scratch memory of a 4096-token prefill (compiled, tiny model) stays far below one [heads, T, T] fp32
  score tensor: the blocked attention keeps [heads, 256, 256] blocks only."""
  from hdjax.decoding import autoregressive as ar  # pylint: disable=import-outside-toplevel
  cfg = make_tiny_lm().cfg.replace(max_seq_len=4096)
  params = model.init_params(cfg, jax.random.key(0))
  t = 4096
  compiled = ar.prefill.lower(params, cfg, jnp.zeros((1, t), jnp.int32), jnp.array([t], jnp.int32), t).compile()
  scores_bytes = cfg.n_heads * t * t * 4
  assert compiled.memory_analysis().temp_size_in_bytes < scores_bytes / 8
