"""AdaDecode: adaptive layer-parallel decoding with exit heads and exact verification (arXiv 2506.03700).

One jitted `lax.while_loop` whose every iteration runs ONE decoder layer for a group of tokens. The tokens in
flight sit in a static window of W = P + 1 slots at consecutive positions `cache.lengths + i`. Slot i has a
depth (how many layers it has run) and a hidden state; depths never increase along the window, so the tokens at
the newest token's depth form a suffix — the group. Each iteration runs the group (padded to a static bucket of
1, 2, 4, ... rows, one `lax.switch` branch per bucket, so a single token costs a single-row layer) through the
layer at that depth, writing each token's exact K/V at that layer. When the group catches up with an older token
that waits at that depth, they merge: the deferred layers of an early token run batched with the later tokens.

After a layer that has a head, the newest token's head decides: if its max probability >= gamma (and fewer than P
tokens are pending) its prediction becomes the next token, which enters the window at depth 0. When the group
reaches the last layer the whole window is final: each early prediction is verified against the full model in
order (greedy: exact argmax; sampling: accept with min(1, p*/q), else sample from norm(max(0, p* - q))), the
accepted tokens are committed (the cache cursor moves past them), everything after the first rejection is dropped
(its K/V rows lie past the cursor and are overwritten later), and the token the full model chose starts a new
window. Batch rows decode one after another (the window bookkeeping is per sequence).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hdjax import model
from hdjax.adadecode.heads import ExitHeads, check_layers, head_logits, identity_heads, load_heads
from hdjax.api import GenerateRequest, GenerationResult, LM, Method, cache_slots_for, make_results, register_method
from hdjax.attention import causal_mask, rope_sin_cos
from hdjax.config import LlamaConfig
from hdjax.decoding import autoregressive as ar
from hdjax.decoding.prefill import Prefill, full_prefill
from hdjax.decoding.sampling import SamplingConfig, select_token, target_probs
from hdjax.errors import HdjaxError
from hdjax.kvcache import KVCache

DEFAULT_HEADS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                 "checkpoints", "adadecode", "smollm2-135m")
DEFAULT_LAYERS = (26,)  # of the committed heads, chosen by measurement (checkpoints/adadecode/README.md)


class Counters(NamedTuple):
  layer_steps: jax.Array  # loop iterations (one decoder layer each)
  layer_tokens_l: jax.Array  # [L] token-rows run at each layer
  head_evals_i: jax.Array  # [I] head evaluations
  exits_i: jax.Array  # [I] early exits
  verifications: jax.Array  # windows that reached the last layer
  pending: jax.Array  # sum over verifications of the pending early tokens
  accepted: jax.Array  # early tokens accepted
  rejections: jax.Array  # verifications that rejected an early token


class State(NamedTuple):
  cache: KVCache  # lengths = fully computed, verified tokens
  tok_w: jax.Array  # [W] window tokens at positions lengths + i
  depth_w: jax.Array  # [W] layers each has run
  h_wd: jax.Array  # [W, D] hidden state after depth_w layers
  q_wv: jax.Array  # [W, V] head distribution that proposed tok_w[i + 1]
  n: jax.Array  # tokens in the window (>= 1)
  out_n: jax.Array  # [out_len] emitted tokens
  accept_n: jax.Array  # [out_len] tokens emitted by each verification
  num: jax.Array
  done: jax.Array
  key: jax.Array
  counters: Counters


def row_buckets(window: int) -> tuple[int, ...]:
  sizes = {min(1 << i, window) for i in range(window.bit_length() + 1)}
  return tuple(sorted(sizes))


def _layer_rows(params, cfg: LlamaConfig, rows: int, layer, h_wd, k_1bskh, v_1bskh, base, g0, g, visible_ls):
  """Runs decoder layer `layer` on window slots [g0, g0 + g) as a static block of `rows` rows, with that layer's
  K/V cache [1, B, S, K, H] (only it enters the `lax.switch`, so the whole cache is never copied); they see the
  slots of `visible_ls[layer]` (all slots when None) at positions <= their own."""
  window = h_wd.shape[0]
  num_slots = k_1bskh.shape[2]
  j_r = jnp.arange(rows)
  idx_r = jnp.clip(g0 + j_r, 0, window - 1)
  valid_r = j_r < g
  pos_1r = (base + g0 + j_r)[None]
  slots_1r = jnp.where(valid_r, pos_1r[0], num_slots)[None]
  sin, cos = rope_sin_cos(cfg, pos_1r)
  p_layer = model.layer_params(params, layer)
  mask_1rs = causal_mask(pos_1r, num_slots)
  if visible_ls is not None:
    mask_1rs = mask_1rs & visible_ls[layer][None, None, :]
  h_1rd, k_1bskh, v_1bskh = model.DecoderLayer(cfg).apply({"params": p_layer}, h_wd[idx_r][None], sin, cos,
                                                          mask_1rs, k_1bskh, v_1bskh, slots_1r, 0)
  h_wd = h_wd.at[jnp.where(valid_r, idx_r, window)].set(h_1rd[0], mode="drop")
  return h_wd, k_1bskh, v_1bskh


def _final_rows(params, cfg: LlamaConfig, rows: int, h_wd):
  """Full-model logits [W, V] of the first `rows` window slots (the others are zeros)."""
  logits_rv = model.unembed(params, cfg, h_wd[None, :rows])[0]
  return jnp.zeros((h_wd.shape[0], logits_rv.shape[-1]), jnp.float32).at[:rows].set(logits_rv)


def _sample(key, probs_v, sampling: SamplingConfig):
  if sampling.greedy:
    return jnp.argmax(probs_v).astype(jnp.int32)
  return jax.random.categorical(key, jnp.log(probs_v)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "head_layers", "window", "sampling", "out_len"),
                   donate_argnames=("cache",))
def adadecode_loop(params, cfg: LlamaConfig, t_idd, head_layers: tuple[int, ...], gamma, cache: KVCache, first,
                   max_new, key, window: int, sampling: SamplingConfig, out_len: int,
                   visible_ls: jax.Array | None = None) -> State:
  """Decodes one sequence (cache batch 1) from the prefill's first token until EOS, `max_new` or a full cache.
  `visible_ls` [L, S]: which slots hold K/V at each layer after a pruned prefill (None: all)."""
  ar.TRACE_COUNTS["adadecode_loop"] += 1
  n_layers = cfg.n_layers
  buckets = row_buckets(window)
  head_of_depth = np.full(n_layers + 1, -1, np.int32)
  head_of_depth[list(head_layers)] = np.arange(len(head_layers))
  head_of_depth = jnp.asarray(head_of_depth)
  w_idx = jnp.arange(window)
  eos = jnp.asarray(cfg.eos_ids, jnp.int32)

  def embed_one(tok):
    return model.embed(params, cfg, tok[None, None])[0, 0]

  def run_layer(s: State) -> State:
    front = s.n - 1
    depth = s.depth_w[front]
    in_group_w = (w_idx < s.n) & (s.depth_w == depth)
    g0 = jnp.argmax(in_group_w).astype(jnp.int32)
    g = s.n - g0
    branches = [functools.partial(_layer_rows, params, cfg, r) for r in buckets]
    layer_kv = [jax.lax.dynamic_slice_in_dim(x, depth, 1) for x in (s.cache.k, s.cache.v)]
    h_wd, *layer_kv = jax.lax.switch(jnp.searchsorted(jnp.asarray(buckets), g), branches, depth, s.h_wd, *layer_kv,
                                     s.cache.lengths[0], g0, g, visible_ls)
    k, v = (jax.lax.dynamic_update_slice_in_dim(x, y, depth, 0) for x, y in zip((s.cache.k, s.cache.v), layer_kv))
    c = s.counters._replace(layer_steps=s.counters.layer_steps + 1,
                            layer_tokens_l=s.counters.layer_tokens_l.at[depth].add(g))
    return s._replace(cache=s.cache.replace(k=k, v=v), h_wd=h_wd, depth_w=jnp.where(in_group_w, depth + 1, s.depth_w),
                      counters=c)

  def try_exit(s: State) -> State:
    front = s.n - 1
    head = head_of_depth[s.depth_w[front]]
    logits_v = head_logits(params, cfg, t_idd[head], s.h_wd[front][None, None])[0, 0]
    conf = jnp.max(jax.nn.softmax(logits_v))
    key, sub = jax.random.split(s.key)
    q_v = target_probs(logits_v[None], sampling)[0]
    y = _sample(sub, q_v, sampling)
    go = conf >= gamma
    c = s.counters._replace(head_evals_i=s.counters.head_evals_i.at[head].add(1),
                            exits_i=s.counters.exits_i.at[head].add(go.astype(jnp.int32)))
    slot = jnp.where(go, s.n, window)  # dropped unless exiting
    return s._replace(tok_w=s.tok_w.at[slot].set(y, mode="drop"), depth_w=s.depth_w.at[slot].set(0, mode="drop"),
                      h_wd=s.h_wd.at[slot].set(embed_one(y), mode="drop"),
                      q_wv=s.q_wv.at[jnp.where(go, front, window)].set(q_v, mode="drop"),
                      n=s.n + go.astype(jnp.int32), key=key, counters=c)

  def verify(s: State) -> State:
    branches = [functools.partial(_final_rows, params, cfg, r) for r in buckets]
    logits_wv = jax.lax.switch(jnp.searchsorted(jnp.asarray(buckets), s.n), branches, s.h_wd)
    p_wv = target_probs(logits_wv, sampling)
    key, k_acc, k_next = jax.random.split(s.key, 3)
    proposed_w = jnp.roll(s.tok_w, -1)  # early prediction of slot i is the token in slot i + 1
    p_prop_w = jnp.take_along_axis(p_wv, proposed_w[:, None], axis=1)[:, 0]
    q_prop_w = jnp.take_along_axis(s.q_wv, proposed_w[:, None], axis=1)[:, 0]
    u_w = jax.random.uniform(k_acc, (window,))
    ok_w = (w_idx < s.n - 1) & (u_w * q_prop_w < p_prop_w)
    n_acc = jnp.sum(jnp.cumprod(ok_w.astype(jnp.int32))).astype(jnp.int32)
    rejected = n_acc < s.n - 1
    if sampling.greedy:
      nxt = jnp.argmax(logits_wv[n_acc]).astype(jnp.int32)
    else:
      residual_v = jnp.maximum(p_wv[n_acc] - s.q_wv[n_acc], 0.0)
      residual_v = jnp.where(jnp.sum(residual_v) > 0, residual_v, p_wv[n_acc])
      probs_v = jnp.where(rejected, residual_v / jnp.sum(residual_v), p_wv[n_acc])
      nxt = jax.random.categorical(k_next, jnp.log(probs_v)).astype(jnp.int32)
    # emitted now: the accepted early tokens (slots 1..n_acc), then the full model's token
    emit_w = jnp.where(w_idx < n_acc, proposed_w, nxt)
    count = n_acc + 1
    is_eos_w = jnp.isin(emit_w, eos) & (w_idx < count)
    count = jnp.where(jnp.any(is_eos_w), jnp.argmax(is_eos_w) + 1, count)
    dst_w = jnp.where((w_idx < count) & (s.num + w_idx < max_new), s.num + w_idx, out_len)
    num = jnp.minimum(s.num + count, max_new)
    c = s.counters
    c = c._replace(verifications=c.verifications + 1, pending=c.pending + s.n - 1, accepted=c.accepted + n_acc,
                   rejections=c.rejections + rejected.astype(jnp.int32))
    return s._replace(cache=s.cache.replace(lengths=s.cache.lengths + n_acc + 1),
                      tok_w=jnp.zeros_like(s.tok_w).at[0].set(nxt), depth_w=jnp.zeros_like(s.depth_w),
                      h_wd=jnp.zeros_like(s.h_wd).at[0].set(embed_one(nxt)), n=jnp.int32(1),
                      out_n=s.out_n.at[dst_w].set(emit_w, mode="drop"),
                      accept_n=s.accept_n.at[c.verifications - 1].set(num - s.num), num=num,
                      done=jnp.any(is_eos_w) | (num >= max_new), key=key, counters=c)

  def body(s: State) -> State:
    s = run_layer(s)
    depth = s.depth_w[s.n - 1]
    can_exit = (head_of_depth[depth] >= 0) & (s.n < window)
    k, v = s.cache.k, s.cache.v  # kept out of the switch: its branches only move the cursor
    no_kv = jnp.zeros((0,), k.dtype)
    s = jax.lax.switch(jnp.where(depth == n_layers, 2, can_exit.astype(jnp.int32)), [lambda x: x, try_exit, verify],
                       s._replace(cache=s.cache.replace(k=no_kv, v=no_kv)))
    return s._replace(cache=s.cache.replace(k=k, v=v))

  def cond(s: State):
    return ~s.done & (s.cache.lengths[0] + window <= s.cache.num_slots)

  n_heads = len(head_layers)
  zero = jnp.int32(0)
  counters = Counters(zero, jnp.zeros((n_layers,), jnp.int32), jnp.zeros((n_heads,), jnp.int32),
                      jnp.zeros((n_heads,), jnp.int32), zero, zero, zero, zero)
  h_wd = jnp.zeros((window, cfg.d_model), jnp.dtype(cfg.dtype)).at[0].set(embed_one(first))
  state = State(cache, jnp.zeros((window,), jnp.int32).at[0].set(first), jnp.zeros((window,), jnp.int32), h_wd,
                jnp.zeros((window, cfg.vocab_size), jnp.float32), jnp.int32(1),
                jnp.full((out_len,), -1, jnp.int32).at[0].set(first), jnp.zeros((out_len,), jnp.int32), jnp.int32(1),
                jnp.isin(first, eos) | (max_new <= 1), key, counters)
  return jax.lax.while_loop(cond, body, state)


def select_heads(cfg: LlamaConfig, heads: ExitHeads, layers) -> ExitHeads:
  """The subset of `heads` at `layers` (each must have a trained head)."""
  layers = check_layers(cfg, layers)
  missing = sorted(set(layers) - set(heads.layers))
  if missing:
    raise HdjaxError(f"no exit head at layers {missing}; available: {list(heads.layers)}")
  return ExitHeads(layers, heads.t_idd[jnp.asarray([heads.layers.index(l) for l in layers])])


def resolve_heads(lm: LM, request: GenerateRequest) -> ExitHeads:
  """`heads`: an ExitHeads, a directory saved by `save_heads`, or "identity" (the original LM head);
  `head_layers`: which of them to use (default: DEFAULT_LAYERS for "identity" and the committed heads, else all)."""
  heads = request.option("heads", DEFAULT_HEADS_DIR)
  layers = request.option("head_layers")
  if heads == "identity":
    return identity_heads(lm.cfg, layers or DEFAULT_LAYERS)
  if isinstance(heads, str):
    layers = layers or (DEFAULT_LAYERS if heads == DEFAULT_HEADS_DIR else None)
    heads = load_heads(heads, lm.cfg)
  if not isinstance(heads, ExitHeads):
    raise HdjaxError(f"option heads must be a directory, 'identity' or an ExitHeads, got {type(heads).__name__}")
  return select_heads(lm.cfg, heads, layers or heads.layers)


def window_stats(counters: Counters, head_layers: tuple[int, ...], new_tokens: int) -> dict:
  c = jax.device_get(counters)
  evals, exits = np.asarray(c.head_evals_i), np.asarray(c.exits_i)
  early = int(np.sum(exits))
  checked = int(c.accepted) + int(c.rejections)
  return dict(
      head_layers=list(head_layers), head_evals=evals.tolist(), exits=exits.tolist(),
      exit_rate_per_layer={str(l): float(x / max(e, 1)) for l, x, e in zip(head_layers, exits, evals)},
      early_tokens=early, early_accepted=int(c.accepted), rejections=int(c.rejections),
      rejection_rate=float(int(c.rejections) / max(checked, 1)),
      early_exit_rate=float(int(c.accepted) / max(new_tokens, 1)),
      verifications=int(c.verifications), mean_pending_depth=float(int(c.pending) / max(int(c.verifications), 1)),
      layer_steps=int(c.layer_steps), layer_tokens=np.asarray(c.layer_tokens_l).tolist())


def adadecode_method(method: str, prefill: Prefill = full_prefill) -> Method:
  """AdaDecode after `prefill`, run per prompt. Options: heads (see `resolve_heads`), head_layers (with
  heads="identity"), gamma (0.75), max_pending (5)."""
  return functools.partial(generate_adadecode, method=method, prefill=prefill)


def generate_adadecode(lm: LM, request: GenerateRequest, method: str = "adadecode",
                       prefill: Prefill = full_prefill) -> list[GenerationResult]:
  """Each prompt: `prefill`, then `adadecode_loop` over its cache (masked by its per-layer visibility, if any)."""
  cfg = lm.cfg
  heads = resolve_heads(lm, request)
  gamma = float(request.option("gamma", 0.75))
  max_pending = int(request.option("max_pending", 5))
  if max_pending < 1:
    raise HdjaxError(f"max_pending must be >= 1, got {max_pending}")
  window = max_pending + 1
  num_slots = cache_slots_for(cfg, request, extra=window)
  out_len = ar.next_pow2(request.max_new_tokens)
  t_idd = jnp.asarray(heads.t_idd, jnp.float32)
  key = jax.random.key(request.seed)
  tokens_bn = np.full((len(request.prompts), out_len), -1, np.int32)
  num_b = np.zeros((len(request.prompts),), np.int32)
  stats = []
  for b, prompt in enumerate(request.prompts):
    key, first_key, loop_key = jax.random.split(key, 3)
    start = time.perf_counter()
    logits_bv, cache, visible_lbs, prefill_stats = prefill(lm, dataclasses.replace(request, prompts=(prompt,)),
                                                           num_slots)
    first = select_token(logits_bv, first_key, request.sampling).block_until_ready()
    ttft = time.perf_counter() - start
    out = adadecode_loop(lm.params, cfg, t_idd, heads.layers, jnp.float32(gamma), cache, first[0],
                         jnp.int32(request.max_new_tokens), loop_key, window, request.sampling, out_len,
                         None if visible_lbs is None else visible_lbs[:, 0])
    out_n, num, verifications, accept_n = jax.device_get((out.out_n, out.num, out.counters.verifications,
                                                          out.accept_n))
    total = time.perf_counter() - start
    tokens_bn[b], num_b[b] = out_n, num
    st = dict(method=method, new_tokens=int(num), steps=int(verifications) + 1, ttft_s=ttft, total_s=total,
              decode_s=total - ttft, prompt_tokens=len(prompt), gamma=gamma, max_pending=max_pending,
              **window_stats(out.counters, heads.layers, int(num)), **prefill_stats)
    st["accept_lengths"] = [1] + accept_n[:int(verifications)].tolist()
    stats.append(st)
  return make_results(lm, tokens_bn, num_b, stats)


register_method("adadecode")(adadecode_method("adadecode"))
