"""The one driver of every decoding method: a prefill, the first token, then the method's decoding loop.

A method is a `Prefill` (`prefill.py`) and a `DecodeLoop`: the loop's state is one `DecodeState` on the device
(`state.py`: tokens, counts, stop flags, cache, key, steps, then the method's own state), and `run(state, stop_at)`
(jitted, the state donated) steps it until every active sequence has emitted `stop_at` tokens, is done, or the
cache is full. The driver owns what every method shares: the random keys, the cache size,
the prefill and its time to first token, warm-up (compile the loop for this cache shape, run no step), streaming
(one `run` per chunk of `chunk_tokens` new tokens, row 0's new tokens sent to `on_tokens` after each), the stop
rule, the common stats and the results.

The host waits on the device for the first token (the time to first token) and for the results; streaming adds
one wait per chunk. `stats["host_syncs"]` counts the waits.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from hdjax.decoding.prefill import Prefill, Prefilled, full_prefill
from hdjax.decoding.request import (GenerateRequest, GenerationResult, LoadedModel, cache_slots_for, make_results,
                                    padded_rows)
from hdjax.decoding.sampling import position_keys, row_keys, sample_tokens
from hdjax.decoding.state import DecodeState, cache_room


class Progress(NamedTuple):
  """What the driver reads of a loop's state: each row's emitted tokens and whether it can go on."""

  tokens_bn: jax.Array  # [B, N] each row's emitted tokens, from column start_b (the first token included)
  start_b: jax.Array  # [B] the column of each row's first emitted token
  new_b: jax.Array  # [B] tokens emitted so far
  done_b: jax.Array  # [B] EOS emitted or max_new_tokens reached
  room: jax.Array  # bool: the cache has room for another step


class DecodeLoop(Protocol):
  """A method's decoding after the prefill (see the module docstring). Its state is a `DecodeState` (the host
  loop, a test reference, keeps a host state and overrides `progress`)."""

  extra_slots: int  # cache slots a step may write past the request's new tokens (a verify's tree)

  def start(self, lm: LoadedModel, request: GenerateRequest, prefilled: Prefilled, first_b: jax.Array,
            key: jax.Array) -> DecodeState:
    """The loop's state after the prefill and its first token."""

  def run(self, lm: LoadedModel, request: GenerateRequest, state: DecodeState, stop_at: jax.Array) -> DecodeState:
    """Steps until every active row has `stop_at` new tokens, or is done, or the cache is full."""

  def warm(self, lm: LoadedModel, request: GenerateRequest, state: DecodeState) -> DecodeState:
    """Compiles what `run` runs for this cache shape, running no step; by default `run` to 0 new tokens."""
    return self.run(lm, request, state, jnp.int32(0))

  def room(self, state: DecodeState) -> jax.Array:
    """Whether the cache has room for another step; by default a slot for every active row."""
    return cache_room(state) >= 1

  def progress(self, state: DecodeState) -> Progress:
    """The state's tokens and stop flags (device arrays)."""
    return Progress(state.tokens_bs, state.start_b, state.new_b, state.done_b, self.room(state))

  def report(self, state: Any) -> Any:
    """The device arrays that `row_stats` reads (read in the same wait as the final `progress`)."""

  def row_stats(self, report: Any, b: int, new_tokens: int) -> dict[str, Any]:
    """Row b's method-specific stats (`steps` and `accept_lengths` among them) from the host copy of `report`."""

  def loop_waits(self, state: Any) -> int:
    """Host waits on the device inside `run` (counted in `host_syncs`); none in an on-device loop."""
    del state
    return 0

  def finish(self, state: Any, rows: list[list[int]]) -> None:
    """Ends a request (not a warm-up) with every row's emitted tokens; by default nothing."""
    del state, rows


def generate(lm: LoadedModel, request: GenerateRequest, method: str, loop: DecodeLoop,
             prefill: Prefill = full_prefill) -> list[GenerationResult]:
  """Runs `request` with `prefill` then `loop` (see the module docstring); each result's stats hold the method,
  token counts, times, host syncs, the prefill's stats and the loop's `row_stats`."""
  num_slots = cache_slots_for(lm.cfg, request, extra=loop.extra_slots)
  key = jax.random.key(request.seed)
  start = time.perf_counter()
  prefilled = prefill(lm, request, num_slots)
  batch = len(request.prompts)
  first_keys_b = position_keys(row_keys(key, batch), jnp.zeros((batch,), jnp.int32))
  first_b = sample_tokens(prefilled.logits_bv, first_keys_b, request.sampling).block_until_ready()
  ttft = time.perf_counter() - start
  host_syncs = 1
  state = loop.start(lm, request, prefilled, first_b, key)
  on_tokens = request.option("on_tokens")
  if request.option("warmup", False):  # compile the loop for this cache shape; no step runs
    state = loop.warm(lm, request, state)
  elif not on_tokens:
    state = loop.run(lm, request, state, jnp.int32(request.max_new_tokens))
  else:
    state, host_syncs = stream(lm, request, loop, state, int(request.option("chunk_tokens", 16)), host_syncs)
  # the prefill's stats may hold device scalars (a pruned prefill's counts): read with the results, not in TTFT
  progress, report, prefill_stats = jax.device_get((loop.progress(state), loop.report(state), prefilled.stats))
  prefill_stats = {k: v.item() if isinstance(v, (np.ndarray, np.generic)) else v for k, v in prefill_stats.items()}
  host_syncs += 1 + loop.loop_waits(state)
  total = time.perf_counter() - start
  rows = [progress.tokens_bn[b, s:s + n].tolist()
          for b, (s, n) in enumerate(zip(progress.start_b, progress.new_b))]
  if not request.option("warmup", False):
    loop.finish(state, rows)
  stats = [dict(method=method, new_tokens=len(row), ttft_s=ttft, total_s=total, decode_s=total - ttft,
                prompt_tokens=len(prompt), host_syncs=host_syncs,
                **{**prefill_stats, **loop.row_stats(report, b, len(row))})
           for b, (row, prompt) in enumerate(zip(rows, request.prompts))]
  for st in stats:
    st["tau"] = float(np.mean(st["accept_lengths"]))
  return make_results(lm, *padded_rows(rows), stats)


def stream(lm: LoadedModel, request: GenerateRequest, loop: DecodeLoop, state: Any, chunk: int, host_syncs: int
           ) -> tuple[Any, int]:
  """Runs the loop a chunk of new tokens at a time, sending row 0's new tokens to `on_tokens` after each."""
  on_tokens = request.option("on_tokens")
  sent, before, last = 0, None, False
  while True:
    p = jax.device_get(loop.progress(state))
    host_syncs += 1
    row0 = p.tokens_bn[0, p.start_b[0] + sent:p.start_b[0] + p.new_b[0]].tolist()
    if row0:
      on_tokens(row0)
    sent = int(p.new_b[0])
    if last or p.done_b.all() or not p.room:
      return state, host_syncs
    now = (p.new_b.tolist(), p.done_b.tolist())
    last = now == before  # the rows behind cannot step (their cache is full): the others run to the end
    before = now
    stop_at = request.max_new_tokens if last else min(int(p.new_b[~p.done_b].min()) + chunk, request.max_new_tokens)
    state = loop.run(lm, request, state, jnp.int32(stop_at))

