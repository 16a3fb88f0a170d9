"""Speculative decoding that never leaves the device: draft -> tree -> verify -> accept -> stop in one jitted loop.

After the prefill, one jitted `lax.while_loop` (state donated) runs every step of a request: the device n-gram
drafter (`drafting/device_ngram.py`) reads each sequence's token buffer, `tree.device_tree` merges its chains
into one static prefix tree, `verify.verify_tree` runs and accepts it (the same function as the host loop's
`verify_step`), and the emitted tokens are appended to the buffer, with per-sequence cursors and stop flags
(EOS, max_new_tokens, cache room). The tree's node count is chosen per step from the same buckets and by the same
rule as the host loop (`speculative.py`), one verify per bucket (`control.switch_in_place`), so both loops build
the same trees, take the same samples and emit the same tokens.

`DeviceLoop` is this loop as the driver (`driver.py`) runs it: the host waits on the device twice per request,
once for the first token (time to first token) and once for the results; with `on_tokens` (streaming) the loop
runs per chunk of `chunk_tokens` new tokens, one more wait each. `stats["host_syncs"]` counts them.

Each step drafts from the request's sources in order and merges their chains by the host `HierarchyDrafter`'s rule
(`hierarchy.device_hierarchy_one`): the n-gram sources ("context", "pld") from the token buffer, the model and
statistics databases from device tables (`drafting/device_tables.py`: sorted keys and the host's ranked chains,
a snapshot taken when the request starts; the model database learns the request's outputs, one sequence per row,
when it ends, through `DeviceLoop.learn`). `stats["source_chains"]` counts the chains each source gave a row.

`speculative.py` registers every drafting method on this loop: `pld` (prompt lookup, window 3 -> 1, one chain of
up to 10 tokens), `rest` (the statistics database), `hd` (context -> model -> statistics, or any other `order` of
the sources) and its single-source ablations `hd_context`, `hd_model`, `hd_stats`; `compose.py` adds `hd+adadecode`
and `lazy+hd+adadecode`, whose exit head drafts first (`DeviceSpec.head_layer`; the loop's `SpecState` carries the
roots' states at that layer and the head's drafts), and the `lazy+` revivals. The host loops stay registered as
`<name>_host`, the reference for identity tests and speed comparisons.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from hdjax import compilation
from hdjax.config import LlamaConfig
from hdjax.control import switch_in_place
from hdjax.decoding import driver
from hdjax.decoding.prefill import Prefill, Prefilled, full_prefill
from hdjax.decoding.request import GenerateRequest, GenerationResult, LoadedModel, pad_prompts
from hdjax.decoding.sampling import SamplingConfig
from hdjax.decoding.state import DecodeState, buffer_lengths, cache_room, is_eos, last_tokens, start_state
from hdjax.decoding.tree import device_tree, engine_buckets, truncate_tree
from hdjax.decoding.verify import head_draft, start_head, verify_tree
from hdjax.drafting.context_db import NgramDrafter, context_drafter
from hdjax.drafting import device_tables
from hdjax.drafting.device_ngram import DeviceNgramConfig, device_draft
from hdjax.drafting.hierarchy import device_hierarchy_one
from hdjax.drafting.pld import pld_drafter
from hdjax.errors import HdjaxError
from hdjax.exit_heads import ExitHeads
from hdjax.kvcache import KVCache


@dataclasses.dataclass(frozen=True)
class DeviceSpec:
  """Static settings of the loop (hashable: a jit static argument)."""

  drafters: tuple[DeviceNgramConfig, ...]  # those of the n-gram sources of `sources`, in their order
  buckets: tuple[int, ...]  # node counts per step, root included, sorted (`tree.engine_buckets`)
  max_depth: int
  sources: tuple[str, ...] = ("context",)  # asked in this order; the others than NGRAM_DRAFTERS read `tables`
  max_chains: int = 7  # chains per step (the hierarchy's max_chains)
  head_layer: int | None = None  # an exit head's layer: its draft is each tree's first chain (`hd+adadecode`)


# the n-gram sources, each the device twin of its host drafter (`DeviceNgramConfig.like`)
NGRAM_DRAFTERS: dict[str, Callable[[], NgramDrafter]] = {"context": context_drafter, "pld": pld_drafter}


class SpecState(NamedTuple):
  """The loop's method state in its `DecodeState`, whose `tokens_bs` [B, S] holds each row's prompt, then its
  emitted tokens from column `start_b` (the prompt's length); the last one (the root) is not yet in the cache."""

  accept_bs: jax.Array  # [B, S] tokens emitted by each step (column = step; 0 where a row was done)
  bucket_counts_k: jax.Array  # [len(buckets)] steps verified at each node count
  source_counts_bk: jax.Array  # [B, len(sources)] chains each source gave each row
  visible_lbs: jax.Array | None = None  # [L, B, S] the slots each layer sees after a pruned prefill (None: all)
  # with an exit head (`DeviceSpec.head_layer`): the root's state at that layer (its K/V below it is cached), the
  # head's draft of the token after the root, and the steps whose first emitted token was that draft
  head_h_bd: jax.Array | None = None
  head_draft_b: jax.Array | None = None
  head_hits_b: jax.Array | None = None


def exit_head_arrays(head: ExitHeads | None) -> tuple[int | None, jax.Array | None]:
  """One exit head's layer and its transform [D, D] on the device in fp32; (None, None) without a head."""
  return (None, None) if head is None else (head.layers[0], jnp.asarray(head.t_idd[0], jnp.float32))


def continues(st: DecodeState, stop_at: jax.Array) -> jax.Array:
  """Whether an active row has fewer than `stop_at` new tokens and the cache has room for a step."""
  return jnp.any(~st.done_b & (st.new_b < stop_at)) & (cache_room(st) >= 1)


def device_spec(cfg: LlamaConfig, spec, sources: tuple[str, ...], head_layer: int | None = None) -> DeviceSpec:
  """The loop's static settings from a request's `speculative.SpecConfig` (buckets rounded up to the engine's row
  multiple) and its sources in order."""
  drafters = tuple(DeviceNgramConfig.like(NGRAM_DRAFTERS[s]().config, spec.max_chains, spec.max_depth)
                   for s in sources if s in NGRAM_DRAFTERS)
  return DeviceSpec(drafters, engine_buckets(spec.buckets, cfg.engine), spec.max_depth, tuple(sources),
                    spec.max_chains, head_layer)


def speculative_step(params, cfg: LlamaConfig, st: DecodeState, max_new: jax.Array, spec: DeviceSpec,
                     sampling: SamplingConfig, visible_lbs: jax.Array | None = None, tables: tuple = (),
                     depth_cap_b: jax.Array | None = None, head_t_dd: jax.Array | None = None) -> DecodeState:
  """One step of every active row (`st.method` a `SpecState`): draft, merge into a tree, verify and accept,
  append the emitted tokens (cut after an EOS and at `max_new` new tokens) and update the stop flags. Layers see
  `visible_lbs` (None: every slot); `depth_cap_b` caps each row's draft depth.
  With `spec.head_layer`, the exit head `head_t_dd`'s draft is each tree's first chain, the roots resume at that
  layer, and the step ends with the next roots' layers below it and their head drafts (`verify.head_draft`)."""
  batch = st.tokens_bs.shape[0]
  buckets_k = jnp.asarray(spec.buckets, jnp.int32)
  active_b = ~st.done_b
  lengths_b, ms = buffer_lengths(st), st.method
  chains_bcd, counts_bk = draft(st.tokens_bs, lengths_b, spec, tables, cfg.engine.exhaustive_lookup)
  if spec.head_layer is not None:  # the head's one-token chain first, then the sources' (the host loop's order)
    head_bcd = jnp.full((batch, 1, chains_bcd.shape[2]), -1, jnp.int32).at[:, 0, 0].set(ms.head_draft_b)
    chains_bcd = jnp.concatenate([head_bcd, chains_bcd], axis=1)
  keep_bcd = jnp.broadcast_to(active_b[:, None, None], chains_bcd.shape)  # done rows draft nothing
  if depth_cap_b is not None:
    keep_bcd &= jnp.arange(chains_bcd.shape[2])[None, None, :] < depth_cap_b[:, None, None]
  chains_bcd = jnp.where(keep_bcd, chains_bcd, -1)
  counts_bk = jnp.where(active_b[:, None], counts_bk, 0)
  tree = jax.vmap(functools.partial(device_tree, num_nodes=spec.buckets[-1], max_depth=spec.max_depth))(
      last_tokens(st), chains_bcd)
  # the host loop's bucket: the smallest holding the largest tree, capped by the room left in the cache
  num_real = jnp.max(jnp.sum(tree.valid, axis=1))
  wanted = jnp.min(jnp.where(buckets_k >= num_real, buckets_k, buckets_k[-1]))
  fitting = jnp.max(jnp.where(buckets_k <= cache_room(st), buckets_k, buckets_k[0]))
  bucket = jnp.argmax(buckets_k == jnp.minimum(wanted, fitting))

  def verify(num_nodes: int, carry):
    out = verify_tree(params, cfg, carry[2], truncate_tree(tree, num_nodes), active_b, st.key, st.new_b, sampling,
                      spec.max_depth, visible_lbs, spec.head_layer, ms.head_h_bd)
    return out.tokens_bd, out.num_b, out.cache

  no_step = (jnp.zeros((batch, spec.max_depth + 1), jnp.int32), jnp.zeros((batch,), jnp.int32), st.cache)
  tokens_bd, num_b, cache = switch_in_place(bucket, [functools.partial(verify, n) for n in spec.buckets], no_step)
  depth_d = jnp.arange(tokens_bd.shape[1], dtype=jnp.int32)
  eos_bd = is_eos(tokens_bd, cfg.eos_ids) & (depth_d[None, :] <= num_b[:, None])
  first_eos_b = jnp.where(jnp.any(eos_bd, axis=1), jnp.argmax(eos_bd, axis=1), tokens_bd.shape[1])
  emit_b = jnp.minimum(jnp.minimum(num_b + 1, first_eos_b + 1), max_new - st.new_b)
  emit_b = jnp.where(active_b, emit_b, 0)
  cols_bd = jnp.where(depth_d[None, :] < emit_b[:, None], lengths_b[:, None] + depth_d[None, :],
                      st.tokens_bs.shape[1])
  tokens_bs = st.tokens_bs.at[jnp.arange(batch)[:, None], cols_bd].set(tokens_bd, mode="drop")
  new_b = st.new_b + emit_b
  done_b = st.done_b | (active_b & ((first_eos_b < emit_b) | (new_b >= max_new)))
  head = {}
  if spec.head_layer is not None:
    next_root_b = jnp.take_along_axis(tokens_bd, num_b[:, None], axis=1)[:, 0]
    cache, head_h_bd, head_draft_b = head_draft(params, cfg, cache, next_root_b, active_b, spec.head_layer, head_t_dd,
                                                visible_lbs, sampling, st.key, new_b)
    head = dict(head_h_bd=head_h_bd, head_draft_b=head_draft_b,
                head_hits_b=ms.head_hits_b + (active_b & (tokens_bd[:, 0] == ms.head_draft_b)))
  ms = ms._replace(accept_bs=ms.accept_bs.at[:, st.steps].set(emit_b, mode="drop"),
                   bucket_counts_k=ms.bucket_counts_k.at[bucket].add(1),
                   source_counts_bk=ms.source_counts_bk + counts_bk, **head)
  return st._replace(tokens_bs=tokens_bs, new_b=new_b, done_b=done_b, cache=cache, steps=st.steps + 1, method=ms)


@functools.partial(jax.jit, static_argnames=("cfg", "spec", "sampling"), donate_argnames=("state",))
def decode_chunk(params, cfg: LlamaConfig, state: DecodeState, max_new: jax.Array, stop_at: jax.Array,
                 spec: DeviceSpec, sampling: SamplingConfig, tables: tuple = (), head_t_dd: jax.Array | None = None
                 ) -> DecodeState:
  """Steps `initial_state`'s state until every row is done, the cache has no room, or every active row has
  `stop_at` new tokens. `tables` are the device tables of `spec.sources` other than the n-gram ones, in order;
  `head_t_dd` the exit head of `spec.head_layer`."""
  compilation.TRACE_COUNTS["device_loop"] += 1
  step = functools.partial(speculative_step, params, cfg, max_new=max_new, spec=spec, sampling=sampling,
                           visible_lbs=state.method.visible_lbs, tables=tables, head_t_dd=head_t_dd)
  return jax.lax.while_loop(lambda st: continues(st, stop_at), lambda st: step(st=st), state)


def draft(tokens_bs: jax.Array, lengths_b: jax.Array, spec: DeviceSpec, tables: tuple, exhaustive: bool = False
          ) -> tuple[jax.Array, jax.Array]:
  """Each row's chains [B, max_chains, depth] from `spec.sources` by the hierarchy's rule, and the chains each
  source gave [B, len(sources)]; `exhaustive`: the database tables' lookup compares every key at once
  (`device_tables.lookup`)."""
  if not spec.sources:  # an exit head alone drafts (`hd+adadecode` with an empty `order`)
    batch = tokens_bs.shape[0]
    return jnp.full((batch, spec.max_chains, spec.max_depth), -1, jnp.int32), jnp.zeros((batch, 0), jnp.int32)
  per_source, tables, drafters = [], list(tables), list(spec.drafters)
  for name in spec.sources:
    if name in NGRAM_DRAFTERS:
      per_source.append(device_draft(tokens_bs, lengths_b, drafters.pop(0)))
    else:
      per_source.append(device_tables.lookup(tables.pop(0), tokens_bs, lengths_b, exhaustive))
  max_nodes = spec.buckets[-1] - 1
  return jax.vmap(lambda *s: device_hierarchy_one(s, spec.max_chains, max_nodes))(*per_source)


@dataclasses.dataclass(frozen=True)
class DeviceLoop(driver.DecodeLoop):
  """The speculative methods' `driver.DecodeLoop`: an `initial_state` (a `DecodeState` around a `SpecState`)
  stepped by `decode_chunk`. `tables` are the device tables of `spec.sources` that are databases (in order);
  `learn(rows)` gets every row's emitted tokens at the end of a request, as the host drafters' `finish` does (the
  model database learns them); `head_t_dd` is the exit head of `spec.head_layer`, which drafts first in every tree
  (`hd+adadecode`)."""

  spec: DeviceSpec
  tables: tuple = ()
  learn: Callable[[list[list[int]]], None] | None = None
  head_t_dd: jax.Array | None = None

  @property
  def extra_slots(self) -> int:
    return max(self.spec.buckets)

  def start(self, lm: LoadedModel, request: GenerateRequest, prefilled: Prefilled, first_b: jax.Array,
            key: jax.Array) -> DecodeState:
    state = initial_state(lm.cfg, request, first_b, prefilled.cache, key, self.spec, prefilled.visible_lbs)
    return start_exit_head(lm, self.spec, self.head_t_dd, state, prefilled.visible_lbs, request.sampling)

  def run(self, lm: LoadedModel, request: GenerateRequest, state: DecodeState, stop_at: jax.Array) -> DecodeState:
    return decode_chunk(lm.params, lm.cfg, state, jnp.int32(request.max_new_tokens), stop_at, self.spec,
                        request.sampling, self.tables, self.head_t_dd)

  def report(self, state: DecodeState) -> DecodeState:
    return loop_report(state)

  def row_stats(self, report: DecodeState, b: int, new_tokens: int) -> dict:
    return loop_row_stats(self.spec, report, b)

  def finish(self, state, rows: list[list[int]]) -> None:
    if self.learn is not None:
      self.learn(rows)


def loop_report(st: DecodeState) -> DecodeState:
  """The parts of the state that `loop_row_stats` reads (the cache and the buffers left out)."""
  return st._replace(tokens_bs=None, cache=None, key=None,
                     method=st.method._replace(visible_lbs=None, head_h_bd=None))


def loop_row_stats(spec: DeviceSpec, st: DecodeState, b: int) -> dict:
  """Row b's stats from the host copy of `loop_report`: steps, tokens per step, tree sizes, source chains."""
  steps, ms = int(st.steps), st.method
  acc = [int(a) for a in ms.accept_bs[b, :steps] if a > 0]
  return dict(engine="device", steps=steps, accept_lengths=acc, node_budget=max(spec.buckets),
              max_depth=spec.max_depth,
              bucket_counts={str(k): int(v) for k, v in zip(spec.buckets, ms.bucket_counts_k) if v},
              source_chains={s: int(n) for s, n in zip(spec.sources, ms.source_counts_bk[b])},
              **({} if spec.head_layer is None else
                 dict(head_layer=spec.head_layer, head_hit_rate=int(ms.head_hits_b[b]) / max(len(acc) - 1, 1))))


def device_generate(lm: LoadedModel, request: GenerateRequest, method: str, spec, prefill: Prefill = full_prefill,
                    sources: tuple[str, ...] = ("context",), tables: tuple = (),
                    learn: Callable[[list[list[int]]], None] | None = None, head: ExitHeads | None = None
                    ) -> list[GenerationResult]:
  """`prefill`, then `decode_chunk` once (or once per streamed chunk), through the driver. `spec` is the
  request's `speculative.SpecConfig` (buckets, max_chains, max_depth); `sources` the hierarchy's sources in order,
  `tables` the device tables of those that are databases (in order); `learn` and `head` as in `DeviceLoop`."""
  if sum(s not in NGRAM_DRAFTERS for s in sources) != len(tables):
    raise HdjaxError(f"sources {sources} need one device table per database, got {len(tables)}")
  head_layer, t_dd = exit_head_arrays(head)
  loop = DeviceLoop(device_spec(lm.cfg, spec, sources, head_layer), tuple(tables), learn, t_dd)
  return driver.generate(lm, request, method, loop, prefill)


def initial_state(cfg: LlamaConfig, request: GenerateRequest, first_b: jax.Array, cache: KVCache, key: jax.Array,
                  spec: DeviceSpec, visible_lbs: jax.Array | None = None) -> DecodeState:
  """The loop's state after the prefill: prompts and first tokens in the buffer, rows done at EOS or 1 token."""
  batch = len(request.prompts)
  tokens_bs, prompt_b = (jnp.asarray(x) for x in pad_prompts(request.prompts, cfg.pad_id, cache.num_slots))
  method = SpecState(jnp.zeros((batch, cache.num_slots), jnp.int32).at[:, 0].set(1),
                     jnp.zeros((len(spec.buckets),), jnp.int32), jnp.zeros((batch, len(spec.sources)), jnp.int32),
                     visible_lbs)
  return start_state(cfg.eos_ids, tokens_bs, prompt_b, first_b, request.max_new_tokens, cache, key, method, steps=1)


def start_exit_head(lm: LoadedModel, spec: DeviceSpec, head_t_dd: jax.Array | None, st: DecodeState,
                    visible_lbs: jax.Array | None, sampling: SamplingConfig) -> DecodeState:
  """With an exit head (`spec.head_layer`), the first roots' layers below it, seeing `visible_lbs`, and its
  drafts; the state unchanged without one."""
  if spec.head_layer is None:
    return st
  active_b = jnp.ones(st.new_b.shape, bool)
  cache, head_h_bd, head_draft_b = start_head(lm.params, lm.cfg, st.cache, last_tokens(st), active_b,
                                              spec.head_layer, head_t_dd, visible_lbs, sampling, st.key, st.new_b)
  return st._replace(cache=cache, method=st.method._replace(head_h_bd=head_h_bd, head_draft_b=head_draft_b,
                                                            head_hits_b=jnp.zeros(st.new_b.shape, jnp.int32)))
