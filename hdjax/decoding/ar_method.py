"""The `ar` method: plain decoding, one jitted prefill then one jitted `lax.while_loop` (in chunks when
streaming). Other methods fall back to it (`lazy` on short prompts)."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np

from hdjax.decoding import autoregressive as ar
from hdjax.decoding.prefill import full_prefill
from hdjax.decoding.registry import register_method
from hdjax.decoding.request import (GenerateRequest, GenerationResult, LoadedModel, cache_slots_for, make_results,
                                    padded_rows)
from hdjax.decoding.sampling import select_token


@register_method("ar")
def generate_ar(lm: LoadedModel, request: GenerateRequest) -> list[GenerationResult]:
  """Plain decoding: one jitted prefill, then one jitted `lax.while_loop` (run in chunks when streaming)."""
  cfg = lm.cfg
  num_slots = cache_slots_for(cfg, request)
  key, first_key = jax.random.split(jax.random.key(request.seed))
  on_tokens = request.option("on_tokens")
  chunk = request.option("chunk_tokens", 16) if on_tokens else request.max_new_tokens
  start = time.perf_counter()
  logits_bv, cache, _, _ = full_prefill(lm, request, num_slots)
  cur = select_token(logits_bv, first_key, request.sampling).block_until_ready()
  ttft = time.perf_counter() - start
  rows = [[int(x)] for x in np.asarray(cur)]
  if on_tokens:
    on_tokens(rows[0][:])
  steps = 1
  remaining = request.max_new_tokens - 1
  while remaining > 0 and not all(row[-1] in cfg.eos_ids for row in rows):
    key, sub = jax.random.split(key)
    n = min(chunk, remaining)
    # The loop re-emits the token it starts from: ask for n + 1 and drop column 0.
    out = ar.decode_loop(lm.params, cfg, cache, cur, jnp.int32(n + 1), sub, request.sampling, ar.next_pow2(n + 1))
    tokens_bn, num_b, n_steps = jax.device_get((out.tokens_bn, out.num_b, out.steps))
    for b, row in enumerate(rows):
      row.extend(int(x) for x in tokens_bn[b, 1:num_b[b]])
    if on_tokens:
      on_tokens(rows[0][-(int(num_b[0]) - 1):] if num_b[0] > 1 else [])
    cache, cur = out.cache, jnp.asarray([row[-1] for row in rows], jnp.int32)
    steps += int(n_steps)
    remaining -= n
  total = time.perf_counter() - start
  stats = [dict(method="ar", new_tokens=len(row), steps=steps, ttft_s=ttft, total_s=total, decode_s=total - ttft,
                accept_lengths=[1] * len(row), prompt_tokens=len(prompt))
           for row, prompt in zip(rows, request.prompts)]
  return make_results(lm, *padded_rows(rows), stats)
