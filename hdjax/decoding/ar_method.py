"""The `ar` method: plain decoding, the driver's full prefill then one jitted `lax.while_loop` of one token per step
(`autoregressive.decode_chunk`). Other methods fall back to it (`lazy` on short prompts)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from hdjax.decoding import autoregressive as ar
from hdjax.decoding import driver
from hdjax.decoding.prefill import Prefilled
from hdjax.decoding.registry import register_method
from hdjax.decoding.request import GenerateRequest, GenerationResult, LoadedModel
from hdjax.decoding.state import DecodeState


def token_row_stats(steps, new_tokens: int) -> dict[str, Any]:
  """`steps` and `accept_lengths` of a row of a one-token-per-step loop that took `steps` steps."""
  return dict(steps=int(steps) + 1, accept_lengths=[1] * new_tokens)


@dataclasses.dataclass(frozen=True)
class ArLoop(driver.DecodeLoop):
  """`ar`'s `driver.DecodeLoop`: the state is an `ar.token_state` with no method state."""

  extra_slots: int = 0

  def start(self, lm: LoadedModel, request: GenerateRequest, prefilled: Prefilled, first_b: jax.Array,
            key: jax.Array) -> DecodeState:
    return ar.token_state(lm.cfg, first_b, request.max_new_tokens, key, prefilled.cache)

  def run(self, lm: LoadedModel, request: GenerateRequest, state: DecodeState, stop_at: jax.Array) -> DecodeState:
    return ar.decode_chunk(lm.params, lm.cfg, state, jnp.int32(request.max_new_tokens), stop_at, request.sampling)

  def report(self, state: DecodeState) -> jax.Array:
    return state.steps

  def row_stats(self, steps, b: int, new_tokens: int) -> dict[str, Any]:
    del b
    return token_row_stats(steps, new_tokens)


@register_method("ar")
def generate_ar(lm: LoadedModel, request: GenerateRequest) -> list[GenerationResult]:
  """Plain decoding: the full prefill, then one jitted `lax.while_loop` (run in chunks when streaming)."""
  return driver.generate(lm, request, "ar", ArLoop())
