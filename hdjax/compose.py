"""Compositions: LazyLLM's pruned prefill feeding the speculative (PLD, REST, HD) and AdaDecode decoding loops,
and HD with an AdaDecode exit head as one more draft source (`hd+adadecode`, `lazy+hd+adadecode`).

`hd+adadecode` drafts from the exit head (AdaDecode's trained head, default layer 26) and the three databases into
one static tree that one verify pass checks; the head's draft costs its layers [0, l) of the next root, which
that root then never runs again (`speculative.py`). It is lossless against `ar` like `hd`.

`lazy+<method>` prunes the prompt as `lazy` does (same schedule and options), then decodes with <method> over the
pruned cache: at every layer attention sees only the slots whose K/V exists there (the prompt tokens kept up to
that layer, the revived ones, and every decoded token). Prompts shorter than `min_prompt` fall back to full
prefill exactly like `lazy`.

`lazy+pld` and `lazy+hd` revive from the Aux Cache as `lazy` does (`revive=True`, the default), in their own
on-device loop (`reviving_loop`: the device loop's draft -> tree -> verify step, plus revival). `lazy` re-selects
after computing the tokens at positions prompt, prompt + reselect_every, ..., each with its own query, and every
later token sees the revived set. So a step's drafts are cut where the next such position is reached
(`lazy.steps_to_revival`): the step's last committed token is then the re-selection token, whose states entering
the pruning layers are recomputed (`lazy.revive_at`) and re-score the pruned tokens, and the next step sees what
`lazy` would. Steps carry at most `reselect_every` tokens. The output is lossless against `lazy` with the same
settings (greedy: identical tokens), which the tests check. With `revive=False`, or options only the host loop has
(`adaptive`, another `order`), they run the host loop with the pruned set frozen after prefill, lossless against
`lazy` with `revive=False`, as do `lazy+rest`, `lazy+adadecode` and `lazy+hd+adadecode` always (stats
`lazy_revive` says which).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from hdjax import lazy
from hdjax.adadecode.decode import adadecode_method, resolve_heads
from hdjax.adadecode.heads import ExitHeads
from hdjax.config import LlamaConfig
from hdjax.decoding import autoregressive as ar
from hdjax.decoding import device_loop, speculative
from hdjax.decoding.prefill import Prefilled, full_prefill
from hdjax.decoding.registry import Method, register_method
from hdjax.decoding.request import (GenerateRequest, GenerationResult, LoadedModel, cache_slots_for, make_results,
                                    pad_prompts, padded_rows)
from hdjax.decoding.sampling import SamplingConfig, select_token
from hdjax.decoding.speculative import HD_DEFAULTS, spec_method
from hdjax.decoding.tree import device_tree, truncate_tree
from hdjax.decoding.verify import verify_tree
from hdjax.drafting import device_tables
from hdjax.drafting.context_db import NgramConfig, context_drafter
from hdjax.drafting.device_ngram import DeviceNgramConfig
from hdjax.drafting.pld import pld_drafter
from hdjax.errors import HdjaxError

# The head's draft is one node: a 2-node tree (root + head draft) is the common step when no database matches.
HEAD_DRAFT_DEFAULTS = dataclasses.replace(HD_DEFAULTS, buckets=(1, 2, 4, 8))


def pruned_prefill(lm: LoadedModel, request: GenerateRequest, num_slots: int) -> Prefilled:
  """The `lazy` method's pruned prefill (its schedule from the request's options), with per-layer visibility."""
  lazy_cfg = lazy.config_from_request(request, lazy.LazyConfig()).validate(lm.cfg)
  prompt_tokens = sum(len(p) for p in request.prompts)
  if max(len(p) for p in request.prompts) < lazy_cfg.min_prompt:
    return full_prefill(lm, request, num_slots)._replace(stats=dict(lazy_fallback=True, computed_fraction_prefill=1.0))
  logits_bv, state, bucket = lazy.prefill_request(lm, request, lazy_cfg, num_slots)
  computed_lbs = state.computed_lbs > 0
  decoded_bs = jnp.arange(num_slots)[None, :] >= state.cache.lengths[:, None]  # written later, at every layer
  computed = int(np.asarray(jnp.sum(computed_lbs)))
  return Prefilled(logits_bv, state.cache, computed_lbs | decoded_bs[None],
                   dict(lazy_fallback=False, prefill_bucket=bucket, lazy_revive=False,
                        computed_fraction_prefill=computed / (lm.cfg.n_layers * prompt_tokens)))


def one_exit_head(lm: LoadedModel, request: GenerateRequest) -> ExitHeads:
  """The request's exit heads (options heads, head_layers; see `resolve_heads`), which must be exactly one."""
  heads = resolve_heads(lm, request)
  if len(heads.layers) != 1:
    raise HdjaxError(f"hd+adadecode drafts from one exit head; got head_layers={list(heads.layers)}")
  return heads


@functools.partial(jax.jit, static_argnames=("cfg", "lazy_cfg", "spec", "sampling"),
                   donate_argnames=("loop", "lazy_state"))
def reviving_loop(params, cfg: LlamaConfig, lazy_cfg: lazy.LazyConfig, loop: device_loop.LoopState,
                  lazy_state: lazy.LazyState, key: jax.Array, max_new: jax.Array, spec: device_loop.DeviceSpec,
                  sampling: SamplingConfig, tables: tuple = ()
                  ) -> tuple[device_loop.LoopState, lazy.LazyState, jax.Array]:
  """The device loop's steps (`device_loop.decode_chunk`) over the pruned cache until every row is done or the
  cache is full, each step cut at the next re-selection point and followed by revival where one was reached.
  `lazy_state.cache` is None (the loop's cache is `loop.cache`); its `computed_lbs` counts every decoded slot.
  Returns both states and the tokens revived per row."""
  ar.TRACE_COUNTS["lazy_reviving_loop"] += 1
  batch = loop.tokens_bs.shape[0]
  buckets_k = jnp.asarray(spec.buckets, jnp.int32)
  every = lazy_cfg.reselect_every

  def cond(carry) -> jax.Array:
    st = carry[0]
    return jnp.any(~st.done_b) & (device_loop._room(st) >= 1)  # pylint: disable=protected-access

  def body(carry):
    st, lz, revived_b = carry
    active_b = ~st.done_b
    chains_bcd, counts_bk = device_loop.draft(st.tokens_bs, st.lengths_b, spec, tables)
    # the root is at position lengths - 1; its step may commit drafts up to the next re-selection point only
    room_b = lazy.steps_to_revival(st.lengths_b - 1, st.prompt_b, every)
    depth_ok_bcd = jnp.arange(chains_bcd.shape[2])[None, None, :] < room_b[:, None, None]
    chains_bcd = jnp.where(active_b[:, None, None] & depth_ok_bcd, chains_bcd, -1)
    counts_bk = jnp.where(active_b[:, None], counts_bk, 0)
    root_b = jnp.take_along_axis(st.tokens_bs, (st.lengths_b - 1)[:, None], axis=1)[:, 0]
    tree = jax.vmap(functools.partial(device_tree, num_nodes=spec.buckets[-1], max_depth=spec.max_depth))(
        root_b, chains_bcd)
    num_real = jnp.max(jnp.sum(tree.valid, axis=1))
    wanted = jnp.min(jnp.where(buckets_k >= num_real, buckets_k, buckets_k[-1]))
    fitting = jnp.max(jnp.where(buckets_k <= device_loop._room(st), buckets_k, 1))  # pylint: disable=protected-access
    bucket = jnp.argmax(buckets_k == jnp.minimum(wanted, fitting))
    visible_lbs = lz.computed_lbs > 0

    def verify(num_nodes: int, cache):
      out = verify_tree(params, cfg, cache, truncate_tree(tree, num_nodes), active_b, key, st.steps, sampling,
                        spec.max_depth, visible_lbs)
      return out.tokens_bd, out.num_b, out.cache

    tokens_bd, num_b, cache = jax.lax.switch(bucket, [functools.partial(verify, n) for n in spec.buckets],
                                             st.cache)
    depth_d = jnp.arange(tokens_bd.shape[1], dtype=jnp.int32)
    eos_bd = ar.is_eos(tokens_bd, cfg.eos_ids) & (depth_d[None, :] <= num_b[:, None])
    first_eos_b = jnp.where(jnp.any(eos_bd, axis=1), jnp.argmax(eos_bd, axis=1), tokens_bd.shape[1])
    emit_b = jnp.minimum(jnp.minimum(num_b + 1, first_eos_b + 1), max_new - (st.lengths_b - st.prompt_b))
    emit_b = jnp.where(active_b, emit_b, 0)
    cols_bd = jnp.where(depth_d[None, :] < emit_b[:, None], st.lengths_b[:, None] + depth_d[None, :],
                        st.tokens_bs.shape[1])
    tokens_bs = st.tokens_bs.at[jnp.arange(batch)[:, None], cols_bd].set(tokens_bd, mode="drop")
    lengths_b = st.lengths_b + emit_b
    done_b = st.done_b | (active_b & ((first_eos_b < emit_b) | (lengths_b - st.prompt_b >= max_new)))
    # revival where this step committed a re-selection token (the last committed one, by the cut above) whose
    # prediction was emitted (`lazy` never computes a token past EOS or max_new_tokens)
    last_b = cache.lengths - 1
    due_b = active_b & (lazy.steps_to_revival(last_b, st.prompt_b, every) == 0) & (last_b < lengths_b - 1)
    token_b = jnp.take_along_axis(tokens_bs, last_b[:, None], axis=1)[:, 0]
    full, got_b = lazy.revive_if(jnp.any(due_b), lambda s: lazy.revive_at(params, cfg, lazy_cfg, s, token_b, last_b,
                                                                           due_b), lz._replace(cache=cache))
    st = device_loop.LoopState(tokens_bs, lengths_b, st.prompt_b, done_b, full.cache,
                               st.accept_bs.at[:, st.steps].set(emit_b, mode="drop"), st.steps + 1,
                               st.bucket_counts_k.at[bucket].add(1), st.source_counts_bk + counts_bk)
    return st, full._replace(cache=None), revived_b + got_b

  return jax.lax.while_loop(cond, body, (loop, lazy_state, jnp.zeros((batch,), jnp.int32)))


def reviving_method(method: str, host_drafter: Callable[[], NgramConfig], source: str) -> Method:
  """`method` (lazy + a device-loop drafter over `source`, as `speculative.device_method`) with revival in
  `reviving_loop`; the frozen host loop where revival is off, the prompt is short, or an option needs it."""
  frozen = spec_method(method, pruned_prefill)
  defaults = speculative.SPEC_METHODS[method.split("+")[1]][1]

  def generate(lm: LoadedModel, request: GenerateRequest) -> list[GenerationResult]:
    cfg = lm.cfg
    lazy_cfg = lazy.config_from_request(request, lazy.LazyConfig()).validate(cfg)
    if (not lazy_cfg.revive or max(len(p) for p in request.prompts) < lazy_cfg.min_prompt
        or request.option("adaptive", False) or request.option("order", source) != source):
      return frozen(lm, request)
    spec = defaults.with_options(request)
    names = [n.strip() for n in source.split(",")]
    if len(names) > 1:  # a hierarchy uses the databases that exist
      names = [n for n in names if speculative._available(lm, n, spec)]  # pylint: disable=protected-access
    dbs = {n: speculative.SOURCES[n](lm, spec) for n in names if n not in device_loop.NGRAM_SOURCES}
    model_db = dbs["model"].db if "model" in dbs else None
    tables = tuple(device_tables.table_for(model_db if n == "model" else db, n, spec.max_chains, spec.max_depth)
                   for n, db in dbs.items())
    dspec = device_loop.DeviceSpec(DeviceNgramConfig.like(host_drafter(), spec.max_chains, spec.max_depth),
                                   spec.buckets, spec.max_depth, tuple(names), spec.max_chains)
    num_slots = cache_slots_for(cfg, request, extra=max(spec.buckets))
    key, first_key = jax.random.split(jax.random.key(request.seed))
    batch = len(request.prompts)
    start = time.perf_counter()
    logits_bv, state, bucket = lazy.prefill_request(lm, request, lazy_cfg, num_slots)
    first_b = select_token(logits_bv, first_key, request.sampling).block_until_ready()
    ttft = time.perf_counter() - start
    tokens_bs, prompt_b = (jnp.asarray(x) for x in pad_prompts(request.prompts, cfg.pad_id, num_slots))
    warmup = request.option("warmup", False)  # compile the loop for this cache shape (no step runs)
    done_b = ar.is_eos(first_b, cfg.eos_ids) | (request.max_new_tokens <= 1) | warmup
    loop = device_loop.LoopState(tokens_bs.at[jnp.arange(batch), prompt_b].set(first_b), prompt_b + 1, prompt_b,
                                 done_b, state.cache, jnp.zeros((batch, num_slots), jnp.int32).at[:, 0].set(1),
                                 jnp.int32(1), jnp.zeros((len(spec.buckets),), jnp.int32),
                                 jnp.zeros((batch, len(names)), jnp.int32))
    decoded_bs = (jnp.arange(num_slots)[None, :] >= prompt_b[:, None]).astype(jnp.int32)
    prefill_computed_b = jnp.sum(state.computed_lbs > 0, axis=(0, 2))
    lazy_state = state._replace(cache=None, computed_lbs=state.computed_lbs + decoded_bs[None])
    loop, lazy_state, revived_b = reviving_loop(lm.params, cfg, lazy_cfg, loop, lazy_state, key,
                                                jnp.int32(request.max_new_tokens), dspec, request.sampling, tables)
    tokens_bs, lengths_b, accept_bs, steps, bucket_counts, source_counts, revived_b, prefill_computed_b = (
        jax.device_get((loop.tokens_bs, loop.lengths_b, loop.accept_bs, loop.steps, loop.bucket_counts_k,
                        loop.source_counts_bk, revived_b, prefill_computed_b)))
    total = time.perf_counter() - start
    rows = [tokens_bs[b, len(p):lengths_b[b]].tolist() for b, p in enumerate(request.prompts)]
    if model_db is not None and not warmup:  # one sequence per row, as the device loop's `finish`
      for prompt, row in zip(request.prompts, rows):
        session = model_db.session()
        session.start(prompt)
        session.extend(row)
        session.finish()
    if request.option("on_tokens"):  # no chunks: the whole first row at the end
      request.option("on_tokens")(rows[0])
    stats = []
    for b, (row, prompt) in enumerate(zip(rows, request.prompts)):
      acc = [int(a) for a in accept_bs[b, :int(steps)] if a > 0]
      stats.append(dict(method=method, engine="device", new_tokens=len(row), steps=int(steps), ttft_s=ttft,
                        total_s=total, decode_s=total - ttft, accept_lengths=acc, prompt_tokens=len(prompt),
                        tau=float(np.mean(acc)), host_syncs=2, node_budget=max(spec.buckets),
                        max_depth=spec.max_depth, sources=",".join(names),
                        bucket_counts={str(k): int(v) for k, v in zip(spec.buckets, bucket_counts) if v},
                        source_chains={s: int(n) for s, n in zip(names, source_counts[b])},
                        lazy_fallback=False, lazy_revive=True, prefill_bucket=bucket, revived=int(revived_b[b]),
                        computed_fraction_prefill=float(prefill_computed_b[b]) / (cfg.n_layers * len(prompt))))
    return make_results(lm, *padded_rows(rows), stats)

  return generate


register_method("lazy+pld")(reviving_method("lazy+pld", lambda: pld_drafter().config, "pld"))
register_method("lazy+hd")(reviving_method("lazy+hd", lambda: context_drafter().config, "context,model,stats"))
register_method("lazy+rest")(spec_method("lazy+rest", pruned_prefill))
register_method("lazy+adadecode")(adadecode_method("lazy+adadecode", pruned_prefill))
for _prefill, _name in ((full_prefill, "hd+adadecode"), (pruned_prefill, "lazy+hd+adadecode")):
  register_method(_name)(spec_method(_name, _prefill, one_exit_head, HEAD_DRAFT_DEFAULTS))
