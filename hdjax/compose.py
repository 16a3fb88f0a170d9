"""Compositions: LazyLLM's pruned prefill feeding the speculative (PLD, REST, HD) and AdaDecode decoding loops,
and HD with an AdaDecode exit head as one more draft source (`hd+adadecode`, `lazy+hd+adadecode`).

`hd+adadecode` drafts from the exit head (AdaDecode's trained head, default layer 26) and the three databases into
one static tree that one verify pass checks; the head's draft costs its layers [0, l) of the next root, which
that root then never runs again (`speculative.py`). It is lossless against `ar` like `hd`.

`lazy+<method>` prunes the prompt as `lazy` does (same schedule and options), then decodes with <method> over the
pruned cache: at every layer attention sees only the slots whose K/V exists there (the prompt tokens kept up to
that layer, and every decoded token). The Aux Cache is not revived while decoding: a multi-token step has no
single "current token" whose query re-scores the pruned tokens, so the pruned set is frozen after prefill. Each
composition is therefore lossless against `lazy` with `revive=False` (greedy: identical tokens), which the tests
check, and prompts shorter than `min_prompt` fall back to full prefill exactly like `lazy`.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from hdjax import lazy
from hdjax.adadecode.decode import adadecode_method, resolve_heads
from hdjax.adadecode.heads import ExitHeads
from hdjax.decoding.prefill import Prefilled, full_prefill
from hdjax.decoding.registry import register_method
from hdjax.decoding.request import GenerateRequest, LoadedModel
from hdjax.decoding.speculative import HD_DEFAULTS, spec_method
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


for _name in ("pld", "rest", "hd"):
  register_method(f"lazy+{_name}")(spec_method(f"lazy+{_name}", pruned_prefill))
register_method("lazy+adadecode")(adadecode_method("lazy+adadecode", pruned_prefill))
for _prefill, _name in ((full_prefill, "hd+adadecode"), (pruned_prefill, "lazy+hd+adadecode")):
  register_method(_name)(spec_method(_name, _prefill, one_exit_head, HEAD_DRAFT_DEFAULTS))
