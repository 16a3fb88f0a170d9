"""Speculative decoding that never leaves the device: draft -> tree -> verify -> accept -> stop in one jitted loop.

After the prefill, one jitted `lax.while_loop` (cache donated) runs every step of a request: the device n-gram
drafter (`drafting/device_ngram.py`) reads each sequence's token buffer, `tree.device_tree` merges its chains
into one static prefix tree, `verify.verify_tree` runs and accepts it (the same function as the host loop's
`verify_step`), and the emitted tokens are appended to the buffer, with per-sequence cursors and stop flags
(EOS, max_new_tokens, cache room). The tree's node count is chosen per step from the same buckets and by the same
rule as the host loop (`speculative.py`), one verify per bucket (`control.switch_in_place`), so both loops build
the same trees, take the same samples and emit the same tokens.

The host waits on the device twice per request: once for the first token (time to first token) and once for
the results; with `on_tokens` (streaming) the loop runs per chunk of `chunk_tokens` new tokens, one more wait
each. `stats["host_syncs"]` counts them.

Each step drafts from the request's sources in order and merges their chains by the host `HierarchyDrafter`'s rule
(`hierarchy.device_hierarchy_one`): the n-gram sources ("context", "pld") from the token buffer, the model and
statistics databases from device tables (`drafting/device_tables.py`: sorted keys and the host's ranked chains,
a snapshot taken when the request starts; the model database learns the request's outputs, one sequence per row,
when it ends, through `finish`). `stats["source_chains"]` counts the chains each source gave a row.

`speculative.py` registers `pld` (prompt lookup, window 3 -> 1, one chain of up to 10 tokens), `hd_context`
(HD's context database alone: keys of 2 then 1 tokens, up to 7 chains of 4) and `hd` (context -> model ->
statistics) on this loop, and `compose.py` `hd+adadecode` and `lazy+hd+adadecode`, whose exit head drafts first
(`DeviceSpec.head_layer`; the loop state carries the roots' states at that layer and the head's drafts). The host
loops stay registered as `pld_host`, `hd_context_host`, `hd_host`, `hd+adadecode_host`, ..., the reference for
identity tests and speed comparisons; a request with an option that only the host loop has (`adaptive`, another
`order`) runs there.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hdjax.adadecode.heads import ExitHeads
from hdjax.config import LlamaConfig
from hdjax.control import switch_in_place
from hdjax.decoding import autoregressive as ar
from hdjax.decoding.prefill import Prefill, full_prefill
from hdjax.decoding.request import (GenerateRequest, GenerationResult, LoadedModel, cache_slots_for, make_results,
                                    pad_prompts, padded_rows)
from hdjax.decoding.sampling import SamplingConfig, select_token
from hdjax.decoding.tree import device_tree, engine_buckets, truncate_tree
from hdjax.decoding.verify import head_draft, start_head, verify_tree
from hdjax.drafting.context_db import NgramConfig
from hdjax.drafting import device_tables
from hdjax.drafting.device_ngram import DeviceNgramConfig, device_draft
from hdjax.drafting.hierarchy import device_hierarchy_one
from hdjax.errors import HdjaxError
from hdjax.kvcache import KVCache


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  """Static settings of the loop (hashable: a jit static argument)."""

  drafter: DeviceNgramConfig  # the n-gram sources' drafter ("context" or "pld")
  buckets: tuple[int, ...]  # node counts per step, root included, sorted (`tree.engine_buckets`)
  max_depth: int
  sources: tuple[str, ...] = ("context",)  # asked in this order; the others than NGRAM_SOURCES read `tables`
  max_chains: int = 7  # chains per step (the hierarchy's max_chains)
  head_layer: int | None = None  # an exit head's layer: its draft is each tree's first chain (`hd+adadecode`)


NGRAM_SOURCES = ("context", "pld")


class LoopState(NamedTuple):
  """Everything the loop carries; it stays on the device between chunks."""

  tokens_bs: jax.Array  # [B, S] prompt then emitted tokens; the last one (the root) is not yet in the cache
  lengths_b: jax.Array  # [B] tokens in the buffer
  prompt_b: jax.Array  # [B] prompt lengths
  done_b: jax.Array  # [B] EOS emitted or max_new_tokens reached
  cache: KVCache
  accept_bs: jax.Array  # [B, S] tokens emitted by each step (column = step; 0 where a row was done)
  steps: jax.Array  # int32: steps so far, the prefill's first token included
  bucket_counts_k: jax.Array  # [len(buckets)] steps verified at each node count
  source_counts_bk: jax.Array  # [B, len(sources)] chains each source gave each row
  # with an exit head (`DeviceSpec.head_layer`): the root's state at that layer (its K/V below it is cached), the
  # head's draft of the token after the root, and the steps whose first emitted token was that draft
  head_h_bd: jax.Array | None = None
  head_draft_b: jax.Array | None = None
  head_hits_b: jax.Array | None = None


def cache_room(state: LoopState) -> jax.Array:
  """Free cache slots of the fullest active row (the host loop's rule)."""
  active_b = ~state.done_b
  return state.cache.num_slots - jnp.max(jnp.where(active_b, state.cache.lengths, 0))


def device_spec(cfg: LlamaConfig, host_drafter: NgramConfig, spec, sources: tuple[str, ...],
                head_layer: int | None = None) -> DeviceSpec:
  """The loop's static settings from a request's `speculative.SpecConfig` (buckets rounded up to the engine's row
  multiple); `host_drafter` is the config of the host n-gram drafter that the device drafter reproduces."""
  return DeviceSpec(DeviceNgramConfig.like(host_drafter, spec.max_chains, spec.max_depth),
                    engine_buckets(spec.buckets, cfg.row_multiple), spec.max_depth, tuple(sources), spec.max_chains,
                    head_layer)


def speculative_step(params, cfg: LlamaConfig, st: LoopState, key: jax.Array, max_new: jax.Array, spec: DeviceSpec,
                     sampling: SamplingConfig, visible_lbs: jax.Array | None = None, tables: tuple = (),
                     depth_cap_b: jax.Array | None = None, head_t_dd: jax.Array | None = None) -> LoopState:
  """One step of every active row: draft, merge into a tree, verify and accept, append the emitted tokens (cut
  after an EOS and at `max_new` new tokens) and update the stop flags. `depth_cap_b` caps each row's draft depth.
  With `spec.head_layer`, the exit head `head_t_dd`'s draft is each tree's first chain, the roots resume at that
  layer, and the step ends with the next roots' layers below it and their head drafts (`verify.head_draft`)."""
  batch = st.tokens_bs.shape[0]
  buckets_k = jnp.asarray(spec.buckets, jnp.int32)
  active_b = ~st.done_b
  chains_bcd, counts_bk = draft(st.tokens_bs, st.lengths_b, spec, tables)
  if spec.head_layer is not None:  # the head's one-token chain first, then the sources' (the host loop's order)
    head_bcd = jnp.full((batch, 1, chains_bcd.shape[2]), -1, jnp.int32).at[:, 0, 0].set(st.head_draft_b)
    chains_bcd = jnp.concatenate([head_bcd, chains_bcd], axis=1)
  keep_bcd = jnp.broadcast_to(active_b[:, None, None], chains_bcd.shape)  # done rows draft nothing
  if depth_cap_b is not None:
    keep_bcd &= jnp.arange(chains_bcd.shape[2])[None, None, :] < depth_cap_b[:, None, None]
  chains_bcd = jnp.where(keep_bcd, chains_bcd, -1)
  counts_bk = jnp.where(active_b[:, None], counts_bk, 0)
  root_b = jnp.take_along_axis(st.tokens_bs, (st.lengths_b - 1)[:, None], axis=1)[:, 0]
  tree = jax.vmap(functools.partial(device_tree, num_nodes=spec.buckets[-1], max_depth=spec.max_depth))(
      root_b, chains_bcd)
  # the host loop's bucket: the smallest holding the largest tree, capped by the room left in the cache
  num_real = jnp.max(jnp.sum(tree.valid, axis=1))
  wanted = jnp.min(jnp.where(buckets_k >= num_real, buckets_k, buckets_k[-1]))
  fitting = jnp.max(jnp.where(buckets_k <= cache_room(st), buckets_k, buckets_k[0]))
  bucket = jnp.argmax(buckets_k == jnp.minimum(wanted, fitting))

  def verify(num_nodes: int, carry):
    out = verify_tree(params, cfg, carry[2], truncate_tree(tree, num_nodes), active_b, key, st.steps, sampling,
                      spec.max_depth, visible_lbs, spec.head_layer, st.head_h_bd)
    return out.tokens_bd, out.num_b, out.cache

  no_step = (jnp.zeros((batch, spec.max_depth + 1), jnp.int32), jnp.zeros((batch,), jnp.int32), st.cache)
  tokens_bd, num_b, cache = switch_in_place(bucket, [functools.partial(verify, n) for n in spec.buckets], no_step)
  depth_d = jnp.arange(tokens_bd.shape[1], dtype=jnp.int32)
  eos_bd = ar.is_eos(tokens_bd, cfg.eos_ids) & (depth_d[None, :] <= num_b[:, None])
  first_eos_b = jnp.where(jnp.any(eos_bd, axis=1), jnp.argmax(eos_bd, axis=1), tokens_bd.shape[1])
  new_b = st.lengths_b - st.prompt_b
  emit_b = jnp.minimum(jnp.minimum(num_b + 1, first_eos_b + 1), max_new - new_b)
  emit_b = jnp.where(active_b, emit_b, 0)
  cols_bd = jnp.where(depth_d[None, :] < emit_b[:, None], st.lengths_b[:, None] + depth_d[None, :],
                      st.tokens_bs.shape[1])
  tokens_bs = st.tokens_bs.at[jnp.arange(batch)[:, None], cols_bd].set(tokens_bd, mode="drop")
  lengths_b = st.lengths_b + emit_b
  done_b = st.done_b | (active_b & ((first_eos_b < emit_b) | (lengths_b - st.prompt_b >= max_new)))
  head = {}
  if spec.head_layer is not None:
    next_root_b = jnp.take_along_axis(tokens_bd, num_b[:, None], axis=1)[:, 0]
    cache, head_h_bd, head_draft_b = head_draft(params, cfg, cache, next_root_b, active_b, spec.head_layer, head_t_dd,
                                                visible_lbs)
    head = dict(head_h_bd=head_h_bd, head_draft_b=head_draft_b,
                head_hits_b=st.head_hits_b + (active_b & (tokens_bd[:, 0] == st.head_draft_b)))
  return LoopState(tokens_bs, lengths_b, st.prompt_b, done_b, cache,
                   st.accept_bs.at[:, st.steps].set(emit_b, mode="drop"), st.steps + 1,
                   st.bucket_counts_k.at[bucket].add(1), st.source_counts_bk + counts_bk, **head)


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "sampling"), donate_argnames=("state",))
def decode_chunk(params, cfg: LlamaConfig, state: LoopState, key: jax.Array, max_new: jax.Array,
                 stop_at: jax.Array, spec: DeviceSpec, sampling: SamplingConfig,
                 visible_lbs: jax.Array | None = None, tables: tuple = (), head_t_dd: jax.Array | None = None
                 ) -> LoopState:
  """Steps until every row is done, the cache has no room, or every active row has `stop_at` new tokens.
  `tables` are the device tables of `spec.sources` other than the n-gram ones, in order; `head_t_dd` the exit
  head of `spec.head_layer`."""
  ar.TRACE_COUNTS["device_loop"] += 1

  def cond(st: LoopState) -> jax.Array:
    active_b = ~st.done_b
    return jnp.any(active_b & (st.lengths_b - st.prompt_b < stop_at)) & (cache_room(st) >= 1)

  return jax.lax.while_loop(cond, lambda st: speculative_step(params, cfg, st, key, max_new, spec, sampling,
                                                              visible_lbs, tables, head_t_dd=head_t_dd), state)


def draft(tokens_bs: jax.Array, lengths_b: jax.Array, spec: DeviceSpec, tables: tuple
          ) -> tuple[jax.Array, jax.Array]:
  """Each row's chains [B, max_chains, depth] from `spec.sources` by the hierarchy's rule, and the chains each
  source gave [B, len(sources)]."""
  per_source, tables = [], list(tables)
  for name in spec.sources:
    if name in NGRAM_SOURCES:
      per_source.append(device_draft(tokens_bs, lengths_b, spec.drafter))
    else:
      per_source.append(device_tables.lookup(tables.pop(0), tokens_bs, lengths_b))
  max_nodes = spec.buckets[-1] - 1
  return jax.vmap(lambda *s: device_hierarchy_one(s, spec.max_chains, max_nodes))(*per_source)


def device_generate(lm: LoadedModel, request: GenerateRequest, method: str, host_drafter: NgramConfig, spec,
                    prefill: Prefill = full_prefill, sources: tuple[str, ...] = ("context",), tables: tuple = (),
                    finish: Callable[[list[list[int]]], None] | None = None, head: ExitHeads | None = None
                    ) -> list[GenerationResult]:
  """Prefill, then `decode_chunk` once (or once per streamed chunk). `host_drafter` is the config of the host
  n-gram drafter that this loop's device drafter reproduces; `spec` the request's `speculative.SpecConfig`
  (buckets, max_chains, max_depth; `adaptive` tree sizes are a host-loop feature); `sources` the hierarchy's
  sources in order, `tables` the device tables of those that are databases (in order); `finish(rows)` gets every
  row's emitted tokens at the end (not after a warm-up), as the host drafters' `finish` does. `head` (one exit
  head) drafts first in every tree, as in the host loop (`hd+adadecode`)."""
  cfg = lm.cfg
  if spec.adaptive:
    raise HdjaxError(f"method {method!r} runs on the device, where `adaptive` tree sizes are not available")
  head_layer, t_dd = (None, None) if head is None else (head.layers[0], jnp.asarray(head.t_idd[0], jnp.float32))
  dspec = device_spec(cfg, host_drafter, spec, sources, head_layer)
  if sum(s not in NGRAM_SOURCES for s in sources) != len(tables):
    raise HdjaxError(f"sources {sources} need one device table per database, got {len(tables)}")
  num_slots = cache_slots_for(cfg, request, extra=max(dspec.buckets))
  key, first_key = jax.random.split(jax.random.key(request.seed))
  on_tokens = request.option("on_tokens")
  chunk = int(request.option("chunk_tokens", 16)) if on_tokens else request.max_new_tokens
  batch = len(request.prompts)
  start = time.perf_counter()
  logits_bv, cache, visible_lbs, prefill_stats = prefill(lm, request, num_slots)
  first_b = select_token(logits_bv, first_key, request.sampling).block_until_ready()
  host_syncs = 1
  ttft = time.perf_counter() - start
  head_state = {}
  if head is not None:  # the first root's layers below the head, and the head's draft
    cache, head_h_bd, head_draft_b = start_head(lm.params, cfg, cache, first_b, jnp.ones((batch,), bool), head_layer,
                                                t_dd, visible_lbs)
    head_state = dict(head_h_bd=head_h_bd, head_draft_b=head_draft_b, head_hits_b=jnp.zeros((batch,), jnp.int32))
  state = initial_state(cfg, request, first_b, cache, dspec)._replace(**head_state)
  max_new = jnp.int32(request.max_new_tokens)
  run = functools.partial(decode_chunk, lm.params, cfg, key=key, max_new=max_new, spec=dspec,
                          sampling=request.sampling, visible_lbs=visible_lbs, tables=tuple(tables), head_t_dd=t_dd)
  if request.option("warmup", False):  # compile the loop for this cache shape (no step runs); first token only
    state = run(state, stop_at=jnp.int32(0))
    first = np.asarray(first_b)
    return make_results(lm, first[:, None], np.ones(batch, np.int32),
                        [dict(method=method, new_tokens=1, steps=1, ttft_s=ttft, total_s=ttft,
                              accept_lengths=[1], prompt_tokens=len(p), host_syncs=2, **prefill_stats)
                         for p in request.prompts])
  if not on_tokens:
    state = run(state, stop_at=max_new)
  else:
    first0, done_b = jax.device_get((first_b[0], state.done_b))
    host_syncs += 1
    on_tokens([int(first0)])
    sent, new_b = 1, np.ones(batch, np.int64)
    while not done_b.all():
      stop_at = min(int(new_b[~done_b].min()) + chunk, request.max_new_tokens)
      state = run(state, stop_at=jnp.int32(stop_at))
      row0, new_b, done_b, room = jax.device_get(
          (state.tokens_bs[0], state.lengths_b - state.prompt_b, state.done_b, cache_room(state)))
      host_syncs += 1
      on_tokens([int(t) for t in row0[len(request.prompts[0]) + sent:len(request.prompts[0]) + int(new_b[0])]])
      sent = int(new_b[0])
      if room < 1:
        break
  rows, stats = finished_rows(state, request, method, dspec, start, ttft, host_syncs + 1)
  if finish is not None:
    finish(rows)
  return make_results(lm, *padded_rows(rows), [dict(st, **prefill_stats) for st in stats])


def initial_state(cfg: LlamaConfig, request: GenerateRequest, first_b: jax.Array, cache: KVCache, spec: DeviceSpec
                  ) -> LoopState:
  """The loop's state after the prefill: prompts and first tokens in the buffer, rows done at EOS or 1 token."""
  batch = len(request.prompts)
  tokens_bs, prompt_b = (jnp.asarray(x) for x in pad_prompts(request.prompts, cfg.pad_id, cache.num_slots))
  done_b = ar.is_eos(first_b, cfg.eos_ids) | (request.max_new_tokens <= 1)
  return LoopState(tokens_bs.at[jnp.arange(batch), prompt_b].set(first_b), prompt_b + 1, prompt_b, done_b, cache,
                   jnp.zeros((batch, cache.num_slots), jnp.int32).at[:, 0].set(1), jnp.int32(1),
                   jnp.zeros((len(spec.buckets),), jnp.int32), jnp.zeros((batch, len(spec.sources)), jnp.int32))


def finished_rows(state: LoopState, request: GenerateRequest, method: str, spec: DeviceSpec, start: float,
                  ttft: float, host_syncs: int) -> tuple[list[list[int]], list[dict]]:
  """Each row's emitted tokens and stats, read from the device (one wait, counted in `host_syncs`)."""
  tokens_bs, lengths_b, prompt_b, accept_bs, steps, bucket_counts, source_counts, head_hits_b = jax.device_get(
      (state.tokens_bs, state.lengths_b, state.prompt_b, state.accept_bs, state.steps, state.bucket_counts_k,
       state.source_counts_bk, state.head_hits_b))
  total = time.perf_counter() - start
  rows = [tokens_bs[b, prompt_b[b]:lengths_b[b]].tolist() for b in range(len(request.prompts))]
  stats = []
  for b, (row, prompt) in enumerate(zip(rows, request.prompts)):
    acc = [int(a) for a in accept_bs[b, :int(steps)] if a > 0]
    stats.append(dict(method=method, engine="device", new_tokens=len(row), steps=int(steps), ttft_s=ttft,
                      total_s=total, decode_s=total - ttft, accept_lengths=acc, prompt_tokens=len(prompt),
                      tau=float(np.mean(acc)), host_syncs=host_syncs, node_budget=max(spec.buckets),
                      max_depth=spec.max_depth,
                      bucket_counts={str(k): int(v) for k, v in zip(spec.buckets, bucket_counts) if v},
                      source_chains={s: int(n) for s, n in zip(spec.sources, source_counts[b])},
                      **({} if spec.head_layer is None else
                         dict(head_layer=spec.head_layer, head_hit_rate=int(head_hits_b[b]) / max(len(acc) - 1, 1)))))
  return rows, stats
