"""Compositions: LazyLLM's pruned prefill feeding the speculative (PLD, REST, HD) and AdaDecode decoding loops.

`lazy+<method>` prunes the prompt as `lazy` does (same schedule and options), then decodes with <method> over the
pruned cache: at every layer attention sees only the slots whose K/V exists there (the prompt tokens kept up to
that layer, and every decoded token). The Aux Cache is not revived while decoding: a multi-token step has no
single "current token" whose query re-scores the pruned tokens, so the pruned set is frozen after prefill. Each
composition is therefore lossless against `lazy` with `revive=False` (greedy: identical tokens), which the tests
check, and prompts shorter than `min_prompt` fall back to full prefill exactly like `lazy`.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from hdjax import api, lazy
from hdjax.adadecode.decode import adadecode_method
from hdjax.decoding.prefill import Prefilled, full_prefill
from hdjax.decoding.speculative import spec_method


def pruned_prefill(lm: api.LM, request: api.GenerateRequest, num_slots: int) -> Prefilled:
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


for _name in ("pld", "rest", "hd"):
  api.register_method(f"lazy+{_name}")(spec_method(f"lazy+{_name}", pruned_prefill))
api.register_method("lazy+adadecode")(adadecode_method("lazy+adadecode", pruned_prefill))
