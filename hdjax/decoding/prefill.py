"""How a decoding loop starts: a prefill turns a request's prompts into the first logits and a KV cache.

`full_prefill` runs every prompt token through every layer; a pruned prefill (`lazy.pruned_prefill`, LazyLLM) also
returns which slots hold K/V at each layer, and the decoding loops mask their attention with it.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from hdjax.decoding import autoregressive as ar
from hdjax.decoding.request import GenerateRequest, LoadedModel, pad_prompts
from hdjax.kvcache import KVCache


class Prefilled(NamedTuple):
  logits_bv: jax.Array  # last prompt token's logits
  cache: KVCache  # lengths = prompt lengths
  visible_lbs: jax.Array | None  # which slots hold K/V at each layer, when the prefill pruned tokens
  stats: dict[str, Any]  # per-request facts about the prefill (Python or device scalars), in every row's stats
  state: Any = None  # what a pruned prefill hands its own decoding loop (LazyLLM's `lazy.LazyState`)


Prefill = Callable[[LoadedModel, GenerateRequest, int], Prefilled]


def full_prefill(lm: LoadedModel, request: GenerateRequest, num_slots: int) -> Prefilled:
  """Every prompt token through every layer (prompts right-padded to `ar.prompt_bucket`)."""
  t = min(ar.prompt_bucket(max(len(p) for p in request.prompts), lm.cfg.engine.min_rows), num_slots)
  tokens, lengths = pad_prompts(request.prompts, lm.cfg.pad_id, t)
  logits_bv, cache = ar.prefill(lm.params, lm.cfg, jnp.asarray(tokens), jnp.asarray(lengths), num_slots)
  return Prefilled(logits_bv, cache, None, {})
