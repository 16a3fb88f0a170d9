"""Compositions: LazyLLM's pruned prefill feeding the speculative (PLD, REST, HD) and AdaDecode decoding loops,
and HD with an AdaDecode exit head as one more draft source (`hd+adadecode`, `lazy+hd+adadecode`).

`hd+adadecode` drafts from the exit head (AdaDecode's trained head, default layer 26) and the three databases into
one static tree that one verify pass checks; the head's draft costs its layers [0, l) of the next root, which
that root then never runs again (`speculative.py`). It is lossless against `ar` like `hd`.

`lazy+<method>` prunes the prompt as `lazy` does (same schedule and options), then decodes with <method> over the
pruned cache: at every layer attention sees only the slots whose K/V exists there (the prompt tokens kept up to
that layer, the revived ones, and every decoded token). Prompts shorter than `min_prompt` fall back to full
prefill exactly like `lazy`.

`lazy+pld`, `lazy+hd`, `lazy+rest` and `lazy+hd+adadecode` revive from the Aux Cache as `lazy` does (`revive=True`,
the default), in their own on-device loop (`reviving_loop`: the device loop's draft -> tree -> verify step, plus
revival; with the exit head, a revival also reruns the next root's layers below the head over the revived set), and
`lazy+adadecode` in AdaDecode's layer loop (`LazyRevival`: a re-selection token proposes no early token, so it ends
its window, and revives once verified). `lazy`
re-selects after computing the tokens at positions prompt, prompt + reselect_every, ..., each with its own query, and
every later token sees the revived set. So a step's drafts are cut where the next such position is reached
(`lazy.steps_to_revival`): the step's last committed token is then the re-selection token, whose states entering
the pruning layers are recomputed (`lazy.revive_at`) and re-score the pruned tokens, and the next step sees what
`lazy` would. Steps carry at most `reselect_every` tokens. The output is lossless against `lazy` with the same
settings (greedy: identical tokens), which the tests check. With `revive=False` they run the device loop with the
pruned set frozen after prefill, lossless against `lazy` with `revive=False`; `lazy+hd+adadecode_host` (the host
loop) always freezes it (stats `lazy_revive` says which). Every one of them runs through the one driver
(`decoding/driver.py`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from hdjax import compilation, lazy
from hdjax.adadecode.decode import adadecode_generate, resolve_heads
from hdjax.config import LlamaConfig
from hdjax.control import run_if
from hdjax.decoding import device_loop, driver, speculative
from hdjax.decoding.prefill import Prefilled, full_prefill
from hdjax.decoding.registry import Method, register_method
from hdjax.decoding.request import GenerateRequest, GenerationResult, LoadedModel
from hdjax.decoding.sampling import SamplingConfig
from hdjax.decoding.speculative import HD_DEFAULTS, SpecConfig, device_method, spec_method
from hdjax.decoding.state import DecodeState, buffer_lengths, last_tokens
from hdjax.decoding.verify import head_draft
from hdjax.drafting.hierarchy import HD_SOURCES
from hdjax.errors import HdjaxError
from hdjax.exit_heads import ExitHeads

# The head's draft is one node: a 2-node tree (root + head draft) is the common step when no database matches.
HEAD_DRAFT_DEFAULTS = dataclasses.replace(HD_DEFAULTS, buckets=(1, 2, 4, 8))


def one_exit_head(lm: LoadedModel, request: GenerateRequest) -> ExitHeads:
  """The request's exit heads (options heads, head_layers; see `resolve_heads`), which must be exactly one."""
  heads = resolve_heads(lm, request)
  if len(heads.layers) != 1:
    raise HdjaxError(f"hd+adadecode drafts from one exit head; got head_layers={list(heads.layers)}")
  return heads


class LazyRevivalState(NamedTuple):
  lazy_state: lazy.LazyState  # `cache` None (the loop's cache); `computed_lbs` counts decoded slots
  revived_b: jax.Array  # [B] tokens revived during decoding


@dataclasses.dataclass(frozen=True)
class LazyRevival:
  """Revival as `lazy` does it (`lazy.revive_at`) at `lazy`'s re-selection positions (`lazy.steps_to_revival`):
  AdaDecode's `Revival` for `lazy+adadecode`, and the reviving device loop's (`reviving_loop`)."""

  lazy_cfg: lazy.LazyConfig

  def start(self, prefilled: Prefilled) -> LazyRevivalState:
    st = prefilled.state
    decoded_bs = jnp.arange(st.cache.num_slots)[None, :] >= st.cache.lengths[:, None]
    return LazyRevivalState(st._replace(cache=None, computed_lbs=st.computed_lbs + decoded_bs[None]),
                            jnp.zeros(st.cache.lengths.shape, jnp.int32))

  def visible_lbs(self, state: LazyRevivalState) -> jax.Array:
    return state.lazy_state.computed_lbs > 0

  def reselects(self, pos_b: jax.Array, prompt_b: jax.Array) -> jax.Array:
    return lazy.steps_to_revival(pos_b, prompt_b, self.lazy_cfg.reselect_every) == 0

  def revive(self, params, cfg: LlamaConfig, cache, state: LazyRevivalState, token_b, pos_b, due_b):
    full, got_b = lazy.revive_if(jnp.any(due_b), lambda s: lazy.revive_at(params, cfg, self.lazy_cfg, s, token_b,
                                                                           pos_b, due_b),
                                 state.lazy_state._replace(cache=cache))
    return full.cache, LazyRevivalState(full._replace(cache=None), state.revived_b + got_b)

  def report(self, state: LazyRevivalState) -> jax.Array:
    return state.revived_b

  def row_stats(self, revived_b, b: int) -> dict:
    return dict(lazy_revive=True, revived=int(revived_b[b]))


class RevivingState(NamedTuple):
  """`reviving_loop`'s method state: the device loop's and `LazyRevival`'s beside it."""

  spec: device_loop.SpecState
  revival: LazyRevivalState
  prefill_computed_b: jax.Array  # [B] (layer, prompt token) pairs whose K/V the prefill computed


@functools.partial(jax.jit, static_argnames=("cfg", "lazy_cfg", "spec", "sampling"), donate_argnames=("state",))
def reviving_loop(params, cfg: LlamaConfig, lazy_cfg: lazy.LazyConfig, state: DecodeState, max_new: jax.Array,
                  stop_at: jax.Array, spec: device_loop.DeviceSpec, sampling: SamplingConfig, tables: tuple = (),
                  head_t_dd: jax.Array | None = None) -> DecodeState:
  """The device loop's steps (`device_loop.speculative_step`) over the pruned cache, stopping as
  `device_loop.decode_chunk` does, each step cut at the next re-selection point and followed by revival where
  one was reached. With an exit head (`spec.head_layer`, `head_t_dd`), a revival also reruns the next root's
  layers below the head over the revived set, which `lazy` computes that token with."""
  compilation.TRACE_COUNTS["lazy_reviving_loop"] += 1
  every = lazy_cfg.reselect_every

  def body(carry: DecodeState) -> DecodeState:
    st, revival = carry._replace(method=carry.method.spec), LazyRevival(lazy_cfg)
    # the root is at position lengths - 1; its step may commit drafts up to the next re-selection point only
    cap_b = lazy.steps_to_revival(buffer_lengths(st) - 1, st.start_b, every)
    new = device_loop.speculative_step(params, cfg, st, max_new, spec, sampling,
                                       revival.visible_lbs(carry.method.revival), tables, cap_b, head_t_dd)
    # revival where this step committed a re-selection token (the last committed one, by the cut above) whose
    # prediction was emitted (`lazy` never computes a token past EOS or max_new_tokens)
    last_b = new.cache.lengths - 1
    due_b = ~st.done_b & (lazy.steps_to_revival(last_b, st.start_b, every) == 0) & (last_b < buffer_lengths(new) - 1)
    token_b = jnp.take_along_axis(new.tokens_bs, last_b[:, None], axis=1)[:, 0]
    cache, revived = revival.revive(params, cfg, new.cache, carry.method.revival, token_b, last_b, due_b)
    new = new._replace(cache=cache)
    if spec.head_layer is not None:
      new = run_if(jnp.any(due_b), functools.partial(_redraft_roots, params, cfg, spec.head_layer, head_t_dd, due_b,
                                                     revival.visible_lbs(revived), sampling), new)
    return new._replace(method=carry.method._replace(spec=new.method, revival=revived))

  return jax.lax.while_loop(lambda st: device_loop.continues(st, stop_at), body, state)


def _redraft_roots(params, cfg: LlamaConfig, head_layer: int, head_t_dd: jax.Array, due_b: jax.Array,
                   visible_lbs: jax.Array, sampling: SamplingConfig, st: DecodeState) -> DecodeState:
  """The roots of the rows `due_b` through the layers below the head again, seeing `visible_lbs`, and the head's
  new drafts (the other rows keep theirs)."""
  ms = st.method
  cache, h_bd, draft_b = head_draft(params, cfg, st.cache, last_tokens(st), due_b, head_layer, head_t_dd, visible_lbs,
                                    sampling, st.key, st.new_b)
  return st._replace(cache=cache, method=ms._replace(head_h_bd=jnp.where(due_b[:, None], h_bd, ms.head_h_bd),
                                                     head_draft_b=jnp.where(due_b, draft_b, ms.head_draft_b)))


@dataclasses.dataclass(frozen=True)
class RevivingLoop(driver.DecodeLoop):
  """`reviving_loop` as the driver runs it, after `lazy.pruned_prefill` of `lazy_cfg`; `tables`, `learn` and
  `head_t_dd` (the exit head of `spec.head_layer`) as in `device_loop.DeviceLoop`."""

  cfg: LlamaConfig
  spec: device_loop.DeviceSpec
  lazy_cfg: lazy.LazyConfig
  tables: tuple = ()
  learn: Callable[[list[list[int]]], None] | None = None
  head_t_dd: jax.Array | None = None

  @property
  def extra_slots(self) -> int:
    return max(self.spec.buckets)

  def start(self, lm: LoadedModel, request: GenerateRequest, prefilled: Prefilled, first_b: jax.Array,
            key: jax.Array) -> DecodeState:
    revival = LazyRevival(self.lazy_cfg).start(prefilled)  # before `start_head` donates the prefill's cache
    st = device_loop.initial_state(lm.cfg, request, first_b, prefilled.cache, key, self.spec)
    st = device_loop.start_exit_head(lm, self.spec, self.head_t_dd, st, prefilled.visible_lbs, request.sampling)
    return st._replace(method=RevivingState(st.method, revival,
                                            jnp.sum(prefilled.state.computed_lbs > 0, axis=(0, 2))))

  def run(self, lm: LoadedModel, request: GenerateRequest, state: DecodeState, stop_at: jax.Array) -> DecodeState:
    return reviving_loop(lm.params, lm.cfg, self.lazy_cfg, state, jnp.int32(request.max_new_tokens), stop_at,
                         self.spec, request.sampling, self.tables, self.head_t_dd)

  def report(self, state: DecodeState):
    ms = state.method
    return device_loop.loop_report(state._replace(method=ms.spec)), ms.revival.revived_b, ms.prefill_computed_b

  def row_stats(self, report, b: int, new_tokens: int) -> dict:
    loop, revived_b, prefill_computed_b = report
    return dict(device_loop.loop_row_stats(self.spec, loop, b), lazy_revive=True, revived=int(revived_b[b]),
                computed_fraction_prefill=float(prefill_computed_b[b]) / (self.cfg.n_layers * int(loop.start_b[b])))

  def finish(self, state, rows: list[list[int]]) -> None:
    if self.learn is not None:
      self.learn(rows)


def reviving_method(method: str, source: str,
                    exit_head: Callable[[LoadedModel, GenerateRequest], ExitHeads] | None = None,
                    defaults: SpecConfig | None = None) -> Method:
  """`method` (lazy + a device-loop drafter over `source` or the `order` option, after the exit head that
  `exit_head` resolves, if any, as `speculative.device_method`) with revival in `reviving_loop`; without revival
  (`revive=False`, or a prompt shorter than `min_prompt`) the device loop over the pruned prefill's frozen set."""
  defaults = defaults or speculative.SPEC_METHODS[method.split("+")[1]][1]
  frozen = device_method(method, source, lazy.pruned_prefill, exit_head, defaults)

  def generate(lm: LoadedModel, request: GenerateRequest) -> list[GenerationResult]:
    lazy_cfg = lazy.config_from_request(request, lazy.LazyConfig()).validate(lm.cfg)
    if not lazy_cfg.revive or max(len(p) for p in request.prompts) < lazy_cfg.min_prompt:
      return frozen(lm, request)
    spec = defaults.with_options(request)
    head = exit_head(lm, request) if exit_head else None
    names, tables, model_db = speculative.device_sources(lm, spec, request.option("order", source), head is not None)
    head_layer, head_t_dd = device_loop.exit_head_arrays(head)
    loop = RevivingLoop(lm.cfg, device_loop.device_spec(lm.cfg, spec, tuple(names), head_layer), lazy_cfg, tables,
                        functools.partial(speculative.learn_outputs, model_db, request.prompts), head_t_dd)
    results = driver.generate(lm, request, method, loop, functools.partial(lazy.pruned_prefill, lazy_cfg=lazy_cfg))
    for r in results:
      r.stats["sources"] = ",".join(names)
    return results

  return generate


register_method("lazy+pld")(reviving_method("lazy+pld", "pld"))
register_method("lazy+hd")(reviving_method("lazy+hd", HD_SOURCES))
register_method("lazy+rest")(reviving_method("lazy+rest", "stats"))


@register_method("lazy+adadecode")
def lazy_adadecode(lm: LoadedModel, request: GenerateRequest) -> list[GenerationResult]:
  """AdaDecode after `lazy`'s pruned prefill, reviving as `lazy` does (`LazyRevival`); without revival
  (`revive=False`, or a prompt shorter than `min_prompt`) over the pruned prefill's frozen set."""
  lazy_cfg = lazy.config_from_request(request, lazy.LazyConfig()).validate(lm.cfg)
  revives = lazy_cfg.revive and max(len(p) for p in request.prompts) >= lazy_cfg.min_prompt
  return adadecode_generate(lm, request, "lazy+adadecode", functools.partial(lazy.pruned_prefill, lazy_cfg=lazy_cfg),
                            LazyRevival(lazy_cfg) if revives else None)


register_method("hd+adadecode")(device_method("hd+adadecode", HD_SOURCES, full_prefill, one_exit_head,
                                              HEAD_DRAFT_DEFAULTS))
register_method("lazy+hd+adadecode")(reviving_method("lazy+hd+adadecode", HD_SOURCES, one_exit_head,
                                                     HEAD_DRAFT_DEFAULTS))
for _prefill, _name in ((full_prefill, "hd+adadecode"), (lazy.pruned_prefill, "lazy+hd+adadecode")):
  register_method(f"{_name}_host")(spec_method(f"{_name}_host", _prefill, one_exit_head, HEAD_DRAFT_DEFAULTS))
