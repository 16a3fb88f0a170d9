"""The speculative methods (PLD, REST, HD and its single-database ablations) and their host loop.

The host loop (`HostLoop`, run by the driver like every other loop), per step: host drafters propose chains -> one
static-shape prefix tree per sequence (`tree.py`) -> ONE jitted, cache-donating verify step that runs the root
(last accepted token, not yet cached) and every tree node, accepts inside the same jit (the longest path of the
nodes' argmax, or of their draws under each position's sampling noise) and compacts the accepted path's K/V into
place. The tree's node count is picked per
step from a small set of buckets, so compiles stay bounded.

With an exit head at layer l (`hd+adadecode`, AdaDecode's heads), the same step also drafts: after accepting, it
runs the next root (the token the full model chose) through layers [0, l) at its own slot, and the head's argmax
(or draw) on that state joins the next step's tree as a depth-1 chain, ahead of the database chains. The root's layers
[0, l) are then never run again: the next step runs the draft nodes through [0, l), appends the root's stored
state, and runs all of them through [l, L) together (AdaDecode's deferred layers, batched with the later tokens).
Every K/V row is the exact one, so the output is still lossless.

Every drafting method (`pld`, `rest`, `hd`, `hd_context`, `hd_model`, `hd_stats`) runs in the on-device loop
(`device_loop.py`, registered at the end of this file); this host loop runs each of them as `<name>_host` (and
`hd+adadecode_host`, `lazy+hd+adadecode_host`), their reference for identity tests and timing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from typing import Callable, Iterator, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hdjax import compilation
from hdjax.config import LlamaConfig
from hdjax.decoding import device_loop
from hdjax.decoding import driver
from hdjax.decoding.prefill import Prefill, Prefilled, full_prefill
from hdjax.decoding.registry import Method, register_method
from hdjax.decoding.request import GenerateRequest, GenerationResult, LoadedModel, padded_rows
from hdjax.decoding.sampling import SamplingConfig
from hdjax.decoding.tree import DraftTree, bucket_for, build_tree, stack_trees, truncate_tree
from hdjax.decoding.verify import head_draft, start_head, verify_tree
from hdjax.drafting.base import Drafter
from hdjax.drafting import device_tables
from hdjax.drafting.hierarchy import HD_SOURCES, HierarchyDrafter
from hdjax.drafting.model_db import ModelDB
from hdjax.drafting.pld import PLD_MAX_TOKENS
from hdjax.errors import HdjaxError
from hdjax.exit_heads import ExitHeads
from hdjax.kvcache import KVCache


@dataclasses.dataclass(frozen=True)
class SpecConfig:
  """Tree shape and drafting defaults; each field can be overridden by a request option of the same name."""

  # Allowed node counts per step, root included. On a 2-core CPU a 16-node verify costs ~2.1 single-token steps,
  # more than the ~1.6 tokens it accepts on Spec-Bench, so the default budget stops at 8 (see the replay tuning).
  buckets: tuple[int, ...] = (1, 4, 8)
  max_depth: int = 4  # draft tokens per chain
  max_chains: int = 7  # candidate chains per step

  def with_options(self, request: GenerateRequest) -> "SpecConfig":
    cfg = dataclasses.replace(self, **{f.name: request.option(f.name, getattr(self, f.name))
                                       for f in dataclasses.fields(self)})
    buckets = tuple(sorted({int(b) for b in cfg.buckets}))
    if not buckets or buckets[0] != 1 or cfg.max_depth < 1 or cfg.max_chains < 1:
      raise HdjaxError(f"bad speculative settings: buckets={cfg.buckets} (must include 1), "
                       f"max_depth={cfg.max_depth}, max_chains={cfg.max_chains} (both >= 1)")
    return dataclasses.replace(cfg, buckets=buckets, max_depth=int(cfg.max_depth), max_chains=int(cfg.max_chains))


class StepOut(NamedTuple):
  tokens_bd: jax.Array  # [B, max_depth + 1] emitted tokens; the first num_b + 1 are real
  num_b: jax.Array  # [B] accepted draft tokens (0 for inactive rows)
  cache: KVCache  # root and accepted path committed
  root_h_bd: jax.Array | None  # with an exit head: the next root's state after layers [0, l)
  head_draft_b: jax.Array | None  # with an exit head: its prediction of the token after the next root


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "max_depth", "head_layer"),
                   donate_argnames=("cache",))
def verify_step(params, cfg: LlamaConfig, cache: KVCache, tree: DraftTree, active_b: jax.Array, key: jax.Array,
                emitted_b: jax.Array, sampling: SamplingConfig, max_depth: int, visible_lbs: jax.Array | None = None,
                head_layer: int | None = None, t_dd: jax.Array | None = None,
                root_h_bd: jax.Array | None = None) -> StepOut:
  """Runs the [B, T] trees at slots lengths + i, RoPE positions lengths + depth, and accepts (a sampled target
  draws with the noise of its emitted token's index, after `emitted_b` tokens, under `key`). `visible_lbs` restricts each layer to the slots that hold K/V there (after a
  pruned prefill). With `head_layer`, the roots resume from `root_h_bd` at that layer (their K/V below it is in
  the cache) and the step ends by drafting from the exit head `t_dd` (see the module docstring).
  """
  compilation.TRACE_COUNTS["verify_step"] += 1
  tokens_bd, num_b, cache = verify_tree(params, cfg, cache, tree, active_b, key, emitted_b, sampling, max_depth,
                                        visible_lbs, head_layer, root_h_bd)
  if head_layer is None:
    return StepOut(tokens_bd, num_b, cache, None, None)
  next_root_b = jnp.take_along_axis(tokens_bd, num_b[:, None], axis=1)[:, 0]
  return StepOut(tokens_bd, num_b, *head_draft(params, cfg, cache, next_root_b, active_b, head_layer, t_dd,
                                                   visible_lbs, sampling, key, emitted_b + num_b + 1))



@dataclasses.dataclass
class HostState:
  """The host loop's state: the device cache and the per-sequence drafting state on the host."""

  cache: KVCache
  visible_lbs: jax.Array | None
  key: jax.Array
  prompt_b: list[int]  # prompt lengths
  rows: list[list[int]]  # emitted tokens, the first one included
  done: list[bool]
  drafters: list[Drafter]
  accept_lengths: list[list[int]]
  root_h_bd: jax.Array | None = None  # with an exit head: the roots' states at its layer
  head_draft_b: np.ndarray | None = None  # with an exit head: its drafts of the tokens after the roots
  head_hits_b: np.ndarray | None = None
  steps: int = 1
  waits: int = 0  # host waits on the device inside the loop (one per step)
  draft_s: float = 0.0
  verify_s: float = 0.0
  bucket_counts: dict[int, int] = dataclasses.field(default_factory=dict)

  def room(self) -> int:
    """Free cache slots of the fullest active row (its cache holds its prompt and every token but the root)."""
    return self.cache.num_slots - max((n + len(row) - 1 for n, row, d in zip(self.prompt_b, self.rows, self.done)
                                       if not d), default=0)


@dataclasses.dataclass(frozen=True)
class HostLoop(driver.DecodeLoop):
  """The host loop as the driver runs it: per step, the host drafters propose chains, the host builds the trees,
  one jitted `verify_step` verifies them and the host reads the accepted tokens back. An exit head at
  `head_layer` (transform `head_t_dd`, `device_loop.exit_head_arrays`) adds its draft to every tree (see the
  module docstring)."""

  spec: SpecConfig
  make_drafter: Callable[[SpecConfig], Drafter]
  head_layer: int | None = None
  head_t_dd: jax.Array | None = None

  @property
  def extra_slots(self) -> int:
    return max(self.spec.buckets)

  def start(self, lm: LoadedModel, request: GenerateRequest, prefilled: Prefilled, first_b: jax.Array,
            key: jax.Array) -> HostState:
    batch = len(request.prompts)
    first = np.asarray(first_b)
    state = HostState(prefilled.cache, prefilled.visible_lbs, key, [len(p) for p in request.prompts],
                      [[int(t)] for t in first],
                      [int(t) in lm.cfg.eos_ids or request.max_new_tokens <= 1 for t in first],
                      [self.make_drafter(self.spec) for _ in range(batch)], [[1] for _ in range(batch)])
    for prompt, row, drafter in zip(request.prompts, state.rows, state.drafters):
      drafter.start(prompt)
      drafter.extend(row)
    if self.head_layer is not None:
      state.cache, state.root_h_bd, head_draft_b = start_head(lm.params, lm.cfg, state.cache, first_b,
                                                              jnp.ones((batch,), bool), self.head_layer,
                                                              self.head_t_dd, state.visible_lbs, request.sampling,
                                                              key, jnp.ones((batch,), jnp.int32))
      state.head_draft_b, state.head_hits_b = np.asarray(head_draft_b), np.zeros(batch, np.int64)
      state.waits += 1
    return state

  def warm(self, lm: LoadedModel, request: GenerateRequest, state: HostState) -> HostState:
    """Traces the verify step of every bucket for this cache shape (all rows inactive: nothing is written)."""
    batch = state.cache.batch
    for num_nodes in self.spec.buckets:
      tree = stack_trees([build_tree(0, [], num_nodes, self.spec.max_depth)] * batch)
      state.cache = verify_step(lm.params, lm.cfg, state.cache, jax.device_put(tree), jnp.zeros((batch,), bool),
                                state.key, jnp.zeros((batch,), jnp.int32), request.sampling, self.spec.max_depth,
                                state.visible_lbs, self.head_layer, self.head_t_dd, state.root_h_bd).cache
    return state

  def run(self, lm: LoadedModel, request: GenerateRequest, state: HostState, stop_at: jax.Array) -> HostState:
    cfg, spec, stop_at = lm.cfg, self.spec, int(stop_at)
    while any(not d and len(row) < stop_at for row, d in zip(state.rows, state.done)):
      t0 = time.perf_counter()
      room = state.room()
      if room < 1:
        break
      head_chains = ([[]] * len(state.rows) if self.head_layer is None else
                     [[[int(x)]] for x in state.head_draft_b])  # best first
      full_trees = [build_tree(row[-1], [] if d else head_chains[b] + drafter.draft(
          request.prompts[b] + tuple(row), spec.max_chains, spec.max_depth), max(spec.buckets), spec.max_depth)
                    for b, (row, d, drafter) in enumerate(zip(state.rows, state.done, state.drafters))]
      num_nodes = min(bucket_for(max(tr.num_real for tr in full_trees), spec.buckets),
                      max(x for x in spec.buckets if x <= room))
      active_b = np.asarray([not d for d in state.done])
      tree_dev, active_dev, emitted_dev = jax.device_put(
          (stack_trees([truncate_tree(tr, num_nodes) for tr in full_trees]), active_b,
           np.asarray([len(row) for row in state.rows], np.int32)))
      t1 = time.perf_counter()
      out = verify_step(lm.params, cfg, state.cache, tree_dev, active_dev, state.key, emitted_dev, request.sampling,
                        spec.max_depth, state.visible_lbs, self.head_layer, self.head_t_dd, state.root_h_bd)
      state.cache, state.root_h_bd = out.cache, out.root_h_bd
      out_bd, num_b, next_draft_b = jax.device_get((out.tokens_bd, out.num_b, out.head_draft_b))  # one host wait
      state.waits += 1
      if self.head_layer is not None:
        state.head_hits_b += active_b & (out_bd[:, 0] == state.head_draft_b)
        state.head_draft_b = next_draft_b
      t2 = time.perf_counter()
      state.draft_s += t1 - t0
      state.verify_s += t2 - t1
      state.steps += 1
      state.bucket_counts[num_nodes] = state.bucket_counts.get(num_nodes, 0) + 1
      for b, row in enumerate(state.rows):
        if not state.done[b]:
          emitted = emitted_tokens(out_bd[b, :int(num_b[b]) + 1], cfg.eos_ids, request.max_new_tokens - len(row))
          state.done[b] = emitted[-1] in cfg.eos_ids or len(row) + len(emitted) >= request.max_new_tokens
          row.extend(emitted)
          state.accept_lengths[b].append(len(emitted))
          state.drafters[b].extend(emitted)
    return state

  def progress(self, state: HostState) -> driver.Progress:
    tokens_bn, new_b = padded_rows(state.rows)
    return driver.Progress(tokens_bn, np.zeros_like(new_b), new_b, np.asarray(state.done), np.bool_(state.room() >= 1))

  def report(self, state: HostState) -> HostState:
    return state

  def row_stats(self, state: HostState, b: int, new_tokens: int) -> dict:
    acc = state.accept_lengths[b]
    return dict(engine="host", steps=state.steps, accept_lengths=acc, draft_s=state.draft_s,
                verify_s=state.verify_s, draft_share=state.draft_s / max(state.draft_s + state.verify_s, 1e-12),
                node_budget=max(self.spec.buckets), max_depth=self.spec.max_depth,
                bucket_counts={str(k): v for k, v in sorted(state.bucket_counts.items())},
                **({} if self.head_layer is None else
                   dict(head_layer=self.head_layer, head_hit_rate=int(state.head_hits_b[b]) / max(len(acc) - 1, 1))))

  def loop_waits(self, state: HostState) -> int:
    return state.waits

  def finish(self, state: HostState, rows: list[list[int]]) -> None:
    del rows  # each drafter has seen its row grow
    for drafter in state.drafters:
      drafter.finish()


def emitted_tokens(tokens, eos_ids: tuple[int, ...], room: int) -> list[int]:
  """A step's accepted tokens up to and including the first EOS, at most `room` of them."""
  out = []
  for tok in tokens[:room]:
    out.append(int(tok))
    if int(tok) in eos_ids:
      break
  return out


def speculative_generate(lm: LoadedModel, request: GenerateRequest, method: str,
                         make_drafter: Callable[[SpecConfig], Drafter], defaults: SpecConfig = SpecConfig(),
                         prefill: Prefill = full_prefill, head: ExitHeads | None = None
                         ) -> list[GenerationResult]:
  """`prefill`, then the host loop's draft -> verify steps (`HostLoop`) through the driver, until every sequence
  hits EOS, max_new_tokens or a full cache."""
  loop = HostLoop(defaults.with_options(request), make_drafter, *device_loop.exit_head_arrays(head))
  return driver.generate(lm, request, method, loop, prefill)


_LOADED: dict[tuple[str, str, str], Drafter] = {}
_SCOPES: list[str] = ["shared"]


@contextlib.contextmanager
def database_scope(name: str) -> Iterator[None]:
  """Requests inside use, and teach online, their own copy of the model database, named `name`. A benchmark that
  interleaves methods question by question keeps one per method, so no method learns from another's outputs.
  The statistics database is read-only and stays shared."""
  _SCOPES.append(name)
  try:
    yield
  finally:
    _SCOPES.pop()


def _database(kind: str) -> Callable[[LoadedModel, SpecConfig], Drafter]:
  """A source backed by a persisted database (`ModelDB` / `StatsDB` under checkpoints/hd), loaded once per
  tokenizer and shared across requests (the model database learns online from each finished sequence, through
  one `ModelDBSession` per sequence)."""

  def make(lm: LoadedModel, spec: SpecConfig) -> Drafter:
    del spec
    if lm.tokenizer is None:
      raise HdjaxError(f"the {kind} database is keyed by tokenizer, and this model has none")
    cache_key = (kind, lm.tokenizer.identity, _SCOPES[-1] if kind == "model" else "")
    if cache_key not in _LOADED:
      if kind == "model":
        from hdjax.drafting.model_db import ModelDB as db_class  # pylint: disable=import-outside-toplevel
      else:
        from hdjax.drafting.stats_db import StatsDB as db_class  # pylint: disable=import-outside-toplevel
      _LOADED[cache_key] = db_class.load(lm.tokenizer)
    # the model database learns online: every sequence gets its own view, which folds in only its own tokens
    return _LOADED[cache_key].session() if kind == "model" else _LOADED[cache_key]

  return make


def _available(lm: LoadedModel, name: str, spec: SpecConfig) -> bool:
  try:
    SOURCES[name](lm, spec)
  except HdjaxError:
    return False
  return True


def reset_databases(read_only_too: bool = True) -> None:
  """Forgets the loaded databases and their online updates (the next request reloads them from disk). With
  `read_only_too=False` only the model databases go (what a warm-up or an earlier run taught them); the
  statistics databases, which never change, stay loaded with their device tables."""
  for key in [k for k in _LOADED if read_only_too or k[0] == "model"]:
    del _LOADED[key]


SOURCES: dict[str, Callable[[LoadedModel, SpecConfig], Drafter]] = {
    **{name: lambda lm, spec, make=make: make() for name, make in device_loop.NGRAM_DRAFTERS.items()},
    "model": _database("model"),
    "stats": _database("stats"),
}

# Chains of up to 6 tokens: on a validation split of Spec-Bench (24 questions, none of the 60 evaluation ones; bf16,
# 128 tokens) hd gained 1.82x / 1.87x / 1.90x / 1.80x `ar` with max_depth 4 / 5 / 6 / 3 (7 chains; 4 chains of 7:
# 1.90x), and lost with a 12- or 16-node bucket (1.60x / 1.63x: tau 2.20 does not pay a 1.2x step).
HD_DEFAULTS = SpecConfig(max_depth=6)
PLD_DEFAULTS = SpecConfig(max_depth=PLD_MAX_TOKENS, max_chains=1)  # the 8-node budget keeps 7 of its 10 tokens


def spec_method(method: str, prefill: Prefill = full_prefill,
                exit_head: Callable[[LoadedModel, GenerateRequest], ExitHeads] | None = None,
                defaults: SpecConfig | None = None) -> Method:
  """The host loop's generate function of a drafting method (its first "+"-part that, less a `_host` suffix, is a
  key of SPEC_METHODS) after `prefill`: the sources named in the `order` option (comma-separated) are asked in
  that order, after the exit head that `exit_head` resolves for the request, if any (then `order` may be empty)."""
  order, base_defaults = SPEC_METHODS[next(p for p in method.removesuffix("_host").split("+") if p in SPEC_METHODS)]
  defaults = defaults or base_defaults

  def generate(lm: LoadedModel, request: GenerateRequest) -> list[GenerationResult]:
    head = exit_head(lm, request) if exit_head else None
    spec = defaults.with_options(request)
    names = source_order(lm, spec, request.option("order", order), head is not None)
    results = speculative_generate(lm, request, method, lambda spec: HierarchyDrafter(
        [SOURCES[n](lm, spec) for n in names], max(spec.buckets) - 1, name=method), defaults, prefill, head)
    for r in results:
      r.stats["sources"] = ",".join(names)
    return results

  return generate


# The drafting methods: their sources in order and defaults. Each runs in the on-device loop under its name, and
# in the host loop under `<name>_host` (the reference for tests and timing).
SPEC_METHODS: dict[str, tuple[str, SpecConfig]] = {
    "pld": ("pld", PLD_DEFAULTS), "rest": ("stats", HD_DEFAULTS), "hd": (HD_SOURCES, HD_DEFAULTS),
    "hd_context": ("context", HD_DEFAULTS), "hd_model": ("model", HD_DEFAULTS), "hd_stats": ("stats", HD_DEFAULTS)}

for _method in SPEC_METHODS:
  register_method(f"{_method}_host")(spec_method(f"{_method}_host"))


def device_method(method: str, source: str, prefill: Prefill = full_prefill,
                  exit_head: Callable[[LoadedModel, GenerateRequest], ExitHeads] | None = None,
                  defaults: SpecConfig | None = None) -> Method:
  """`method` in the on-device loop (`device_loop.py`) over the sources of the `order` option (default `source`;
  comma-separated, asked in that order): the n-gram sources ("context", "pld") are device twins of the host
  drafters, the model and statistics databases are read from device tables (`device_tables.py`), a snapshot of
  each database taken at the start of the request (rebuilt only when the model database changed); at the end
  every row's output is folded into the model database, one sequence per row, as the host loop's
  `ModelDBSession`s do. As in the host loop, a hierarchy of several sources uses the databases that exist.
  `exit_head` and `defaults` as in `spec_method`."""
  defaults = defaults or SPEC_METHODS[method][1]

  def generate(lm: LoadedModel, request: GenerateRequest) -> list[GenerationResult]:
    spec = defaults.with_options(request)
    head = exit_head(lm, request) if exit_head else None
    start = time.perf_counter()
    names, tables, model_db = device_sources(lm, spec, request.option("order", source), head is not None)
    tables_s = time.perf_counter() - start
    results = device_loop.device_generate(lm, request, method, spec, prefill, tuple(names), tables,
                                          lambda rows: learn_outputs(model_db, request.prompts, rows), head)
    for r in results:
      r.stats["sources"] = ",".join(names)
      r.stats["tables_s"] = tables_s  # host time to snapshot the databases' device tables (before the prefill)
    return results

  return generate


def source_order(lm: LoadedModel, spec: SpecConfig, order: str, head: bool) -> list[str]:
  """The sources named in `order` (comma-separated), in that order: a hierarchy of several keeps the databases
  that exist, a single source must exist, and an empty order needs an exit head (`head`) to draft."""
  names = [n.strip() for n in str(order).split(",") if n.strip()]
  unknown = [n for n in names if n not in SOURCES]
  if unknown:
    raise HdjaxError(f"unknown draft source(s) {unknown} in order={order!r}; known: {', '.join(SOURCES)}")
  if not (names or head):
    raise HdjaxError(f"order={order!r} names no draft source; known: {', '.join(SOURCES)}")
  return [n for n in names if _available(lm, n, spec)] if len(names) > 1 else names


def device_sources(lm: LoadedModel, spec: SpecConfig, order: str, head: bool
                   ) -> tuple[list[str], tuple, ModelDB | None]:
  """`source_order`'s sources, the device tables of those that are databases (in order) and the model database
  behind its table, if any."""
  names = source_order(lm, spec, order, head)
  tables, model_db = [], None
  for name in names:
    if name in device_loop.NGRAM_DRAFTERS:
      continue
    db = SOURCES[name](lm, spec)
    if name == "model":
      db = model_db = db.db  # the shared table behind this sequence's session
    tables.append(device_tables.table_for(db, name, spec.max_chains, spec.max_depth))
  return names, tuple(tables), model_db


def learn_outputs(model_db: ModelDB | None, prompts, rows: list[list[int]]) -> None:
  """Folds every row's output into the model database, one sequence per row in row order (as the host loop's
  `ModelDBSession`s do)."""
  if model_db is None:
    return
  for prompt, row in zip(prompts, rows):
    session = model_db.session()
    session.start(prompt)
    session.extend(row)
    session.finish()


# On the device: every step's draft, tree, verify and stop check inside one jitted loop.
for _method, (_source, _) in SPEC_METHODS.items():
  register_method(_method)(device_method(_method, _source))
