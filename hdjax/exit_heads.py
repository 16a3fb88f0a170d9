"""Exit heads beside the model: head_i(h) = E* . T_i . RMSNorm(h), with E* the frozen final LM head.

The final RMSNorm (with the model's own scale) is applied first, exactly as before the real LM head, then the
learned d x d matrix T_i, then E* (the tied embedding for SmolLM2). This is the paper's order (norm -> T_i -> E*):
with T_i = I a head is exactly the original LM head applied at an intermediate layer, which is the ablation.

A head set is `ExitHeads(layers, t_idd, vocab_ids)`: `layers` are the (static) depths after which a head reads the
hidden state (a head at layer l sees the output of decoder layer l-1, i.e. after l layers), `t_idd` is [I, D, D],
`vocab_ids` the token ids ranked by how often they were a training target (most frequent first; empty if unknown).

A reduced-vocabulary head scores only a candidate set of N ids: since head_i(h)[n] = E*_n . T_i . RMSNorm(h), the
[N, D] matrix W_i = E*[ids] . T_i^T is built once (`reduced_heads`), and a check is the final norm and one [N, D]
contraction instead of a [D, D] and a [V, D] one.

The decoding engine (a head's draft in `hd+adadecode`) and AdaDecode both use them; their training and files live
in `hdjax/adadecode/`.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from hdjax import model
from hdjax.config import LlamaConfig, is_int
from hdjax.errors import HdjaxError


@dataclasses.dataclass(frozen=True)
class ExitHeads:
  layers: tuple[int, ...]  # depths (number of layers run) at which each head reads the hidden state
  t_idd: jax.Array  # [I, D, D]
  vocab_ids: tuple[int, ...] = ()  # candidate ids for a reduced-vocabulary head, most frequent first

  def __post_init__(self):
    if len(self.layers) != self.t_idd.shape[0]:
      raise HdjaxError(f"{len(self.layers)} head layers but {self.t_idd.shape[0]} head matrices")


def check_layers(cfg: LlamaConfig, layers) -> tuple[int, ...]:
  if not isinstance(layers, (list, tuple)) or not all(is_int(l) for l in layers):
    raise HdjaxError(f"head layers must be a list of integers, got {layers!r}")
  layers = tuple(sorted({int(l) for l in layers}))
  if not layers or layers[0] < 1 or layers[-1] >= cfg.n_layers:
    raise HdjaxError(f"head layers must lie in [1, {cfg.n_layers - 1}], got {list(layers)}")
  return layers


def identity_heads(cfg: LlamaConfig, layers) -> ExitHeads:
  """T_i = I: the original LM head at each intermediate layer (the paper's ablation, and the training init)."""
  layers = check_layers(cfg, layers)
  eye_dd = jnp.eye(cfg.d_model, dtype=jnp.float32)
  return ExitHeads(layers, jnp.broadcast_to(eye_dd, (len(layers), cfg.d_model, cfg.d_model)))


def head_logits(params, cfg: LlamaConfig, t_dd: jax.Array, h_btd: jax.Array) -> jax.Array:
  """Logits [B, T, V] fp32 of one exit head on raw hidden states [B, T, D]."""
  x_btd = model.final_norm(params, cfg, h_btd).astype(jnp.float32)
  y_btd = jnp.einsum("BTD,DE->BTE", x_btd, t_dd)
  return model.lm_head(params, cfg, y_btd)


def head_rows(params, cfg: LlamaConfig, ids_n: jax.Array) -> jax.Array:
  """Rows [N, D] of the LM head E* for token ids `ids_n`, in the weights' dtype."""
  w, axes = model.head_weight(cfg, params["embedder"])
  rows_nd = jnp.take(w, ids_n, axis=axes.index("V"))
  return rows_nd if axes == "VD" else rows_nd.T


@jax.jit
def _fold(e_nd, t_idd):
  # [I, N, D]: W_i[n, d] = sum_e E*[n, e] T_i[d, e]
  return jnp.einsum("NE,IDE->IND", e_nd.astype(jnp.float32), t_idd)


def reduced_heads(params, cfg: LlamaConfig, t_idd: jax.Array, ids_n) -> jax.Array:
  """[I, N, D] fp32: each head T_i folded into the LM head rows of the candidate ids (see `reduced_logits`)."""
  return _fold(head_rows(params, cfg, jnp.asarray(ids_n, jnp.int32)), jnp.asarray(t_idd, jnp.float32))


def reduced_logits(params, cfg: LlamaConfig, w_nd: jax.Array, h_btd: jax.Array) -> jax.Array:
  """Logits [B, T, N] fp32 of one reduced head (a row of `reduced_heads`): `head_logits` at the candidate ids."""
  x_btd = model.final_norm(params, cfg, h_btd).astype(jnp.float32)
  return jnp.einsum("BTD,ND->BTN", x_btd, w_nd)
