"""Compositions: LazyLLM's pruned prefill feeding the speculative (PLD, REST, HD) and AdaDecode decoding loops,
and HD with an AdaDecode exit head as one more draft source (`hd+adadecode`, `lazy+hd+adadecode`).

`hd+adadecode` drafts from the exit head (AdaDecode's trained head, default layer 26) and the three databases into
one static tree that one verify pass checks; the head's draft costs its layers [0, l) of the next root, which
that root then never runs again (`speculative.py`). It is lossless against `ar` like `hd`.

`lazy+<method>` prunes the prompt as `lazy` does (same schedule and options), then decodes with <method> over the
pruned cache: at every layer attention sees only the slots whose K/V exists there (the prompt tokens kept up to
that layer, the revived ones, and every decoded token). Prompts shorter than `min_prompt` fall back to full
prefill exactly like `lazy`.

`lazy+pld`, `lazy+hd` and `lazy+rest` revive from the Aux Cache as `lazy` does (`revive=True`, the default), in
their own on-device loop (`reviving_loop`: the device loop's draft -> tree -> verify step, plus revival). `lazy`
re-selects after computing the tokens at positions prompt, prompt + reselect_every, ..., each with its own query, and
every later token sees the revived set. So a step's drafts are cut where the next such position is reached
(`lazy.steps_to_revival`): the step's last committed token is then the re-selection token, whose states entering
the pruning layers are recomputed (`lazy.revive_at`) and re-score the pruned tokens, and the next step sees what
`lazy` would. Steps carry at most `reselect_every` tokens. The output is lossless against `lazy` with the same
settings (greedy: identical tokens), which the tests check. With `revive=False`, or options only the host loop has
(`adaptive`, another `order`), they run the host loop with the pruned set frozen after prefill, lossless against
`lazy` with `revive=False`. `lazy+adadecode` (AdaDecode's loop) and `lazy+hd+adadecode` (the device loop, with the
exit head as its first source; `lazy+hd+adadecode_host` is its host loop) always freeze the set (stats
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
                                    padded_rows)
from hdjax.decoding.sampling import SamplingConfig, select_token
from hdjax.decoding.speculative import HD_DEFAULTS, device_method, spec_method
from hdjax.drafting.context_db import NgramConfig, context_drafter
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
  every = lazy_cfg.reselect_every

  def cond(carry) -> jax.Array:
    st = carry[0]
    return jnp.any(~st.done_b) & (device_loop.cache_room(st) >= 1)

  def body(carry):
    st, lz, revived_b = carry
    # the root is at position lengths - 1; its step may commit drafts up to the next re-selection point only
    cap_b = lazy.steps_to_revival(st.lengths_b - 1, st.prompt_b, every)
    new = device_loop.speculative_step(params, cfg, st, key, max_new, spec, sampling, lz.computed_lbs > 0, tables,
                                       cap_b)
    # revival where this step committed a re-selection token (the last committed one, by the cut above) whose
    # prediction was emitted (`lazy` never computes a token past EOS or max_new_tokens)
    last_b = new.cache.lengths - 1
    due_b = ~st.done_b & (lazy.steps_to_revival(last_b, st.prompt_b, every) == 0) & (last_b < new.lengths_b - 1)
    token_b = jnp.take_along_axis(new.tokens_bs, last_b[:, None], axis=1)[:, 0]
    full, got_b = lazy.revive_if(jnp.any(due_b), lambda s: lazy.revive_at(params, cfg, lazy_cfg, s, token_b, last_b,
                                                                           due_b), lz._replace(cache=new.cache))
    return new._replace(cache=full.cache), full._replace(cache=None), revived_b + got_b

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
    names, tables, model_db = speculative.device_sources(lm, spec, source)
    dspec = device_loop.device_spec(cfg, host_drafter(), spec, tuple(names))
    num_slots = cache_slots_for(cfg, request, extra=max(dspec.buckets))
    key, first_key = jax.random.split(jax.random.key(request.seed))
    start = time.perf_counter()
    logits_bv, state, bucket = lazy.prefill_request(lm, request, lazy_cfg, num_slots)
    first_b = select_token(logits_bv, first_key, request.sampling).block_until_ready()
    ttft = time.perf_counter() - start
    warmup = request.option("warmup", False)  # compile the loop for this cache shape (no step runs)
    loop = device_loop.initial_state(cfg, request, first_b, state.cache, dspec)
    loop = loop._replace(done_b=loop.done_b | warmup)
    decoded_bs = (jnp.arange(num_slots)[None, :] >= loop.prompt_b[:, None]).astype(jnp.int32)
    prefill_computed_b = jnp.sum(state.computed_lbs > 0, axis=(0, 2))
    lazy_state = state._replace(cache=None, computed_lbs=state.computed_lbs + decoded_bs[None])
    loop, lazy_state, revived_b = reviving_loop(lm.params, cfg, lazy_cfg, loop, lazy_state, key,
                                                jnp.int32(request.max_new_tokens), dspec, request.sampling, tables)
    rows, stats = device_loop.finished_rows(loop, request, method, dspec, start, ttft, host_syncs=2)
    revived_b, prefill_computed_b = jax.device_get((revived_b, prefill_computed_b))
    if not warmup:
      speculative.learn_outputs(model_db, request.prompts, rows)
    if request.option("on_tokens"):  # no chunks: the whole first row at the end
      request.option("on_tokens")(rows[0])
    for b, (st, prompt) in enumerate(zip(stats, request.prompts)):
      st.update(sources=",".join(names), lazy_fallback=False, lazy_revive=True, prefill_bucket=bucket,
                revived=int(revived_b[b]),
                computed_fraction_prefill=float(prefill_computed_b[b]) / (cfg.n_layers * len(prompt)))
    return make_results(lm, *padded_rows(rows), stats)

  return generate


register_method("lazy+pld")(reviving_method("lazy+pld", lambda: pld_drafter().config, "pld"))
register_method("lazy+hd")(reviving_method("lazy+hd", lambda: context_drafter().config, "context,model,stats"))
register_method("lazy+rest")(reviving_method("lazy+rest", lambda: context_drafter().config, "stats"))
register_method("lazy+adadecode")(adadecode_method("lazy+adadecode", pruned_prefill))
for _prefill, _name in ((full_prefill, "hd+adadecode"), (pruned_prefill, "lazy+hd+adadecode")):
  register_method(_name)(device_method(_name, lambda: context_drafter().config, "context,model,stats", _prefill,
                                       one_exit_head, HEAD_DRAFT_DEFAULTS))
  register_method(f"{_name}_host")(spec_method(_name, _prefill, one_exit_head, HEAD_DRAFT_DEFAULTS))
