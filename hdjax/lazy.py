"""LazyLLM (arXiv 2407.14057): dynamic token pruning in prefill and decoding, with an Aux Cache.

Prefill runs the layers in groups separated by the pruning layers. At pruning layer p every still-active prompt
token is scored by the attention it receives from the last prompt token at layer p (one query row, q_last . K^T,
averaged over heads; `score_window` > 1 averages the rows of the last w prompt tokens instead, an observation
window as in SnapKV, and always keeps those w tokens; `score_skip` = s ends that window s tokens before the last
one, so a chat prompt is scored by the end of the user's turn rather than by the template's assistant header, and
keeps the skipped tail too; `score_pool` > 1 max-pools the scores over neighbouring positions, so a run of tokens
next to a high-scoring one, e.g. the digits of a number, survives whole); the top `keep_ratios[g]` fraction of the
bucket length stays active, a subset of the previous set, and the last token always stays, as do the first
`keep_sinks` tokens (attention sinks). The gathered path runs each group only on the kept tokens (static keep counts per
prompt-length bucket, original positions for RoPE and the causal mask, attention over a compact per-group KV
buffer) and scatters their K/V into the full-length cache. A token pruned at layer p leaves its hidden state
entering layer p (and its key at p, for re-scoring) in the Aux Cache. The masked path has the same semantics
without any gather: it exists as the reference for tests.

Per-layer validity is a counter `computed_lbs` [L, B, S]: how many times the K/V of slot s at layer l was
computed. Attention at layer l only sees slots with a non-zero count, and the tests check it never exceeds 1.

Decoding: every `reselect_every` steps the pruned prompt tokens are re-scored at their Aux Cache layer by the
current token's query; up to `revive_budget` tokens per pruning layer whose attention is above uniform are
revived, i.e. computed from their Aux Cache layer to the last layer (never from layer 0, never a layer twice).
They become visible from the next step on. A loop that commits several tokens per step (`compose.reviving_loop`)
reproduces this by ending each step at a re-selection position (`steps_to_revival`) and recomputing that token's
queries (`revive_at`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from hdjax import compilation, model
from hdjax.attention import apply_rope, causal_mask, rope_sin_cos
from hdjax.config import LlamaConfig
from hdjax.control import run_if
from hdjax.decoding import autoregressive as ar
from hdjax.decoding import driver
from hdjax.decoding.ar_method import ArLoop, token_row_stats
from hdjax.decoding.prefill import Prefilled, full_prefill
from hdjax.decoding.registry import register_method
from hdjax.decoding.request import GenerateRequest, GenerationResult, LoadedModel, pad_prompts
from hdjax.decoding.sampling import SamplingConfig
from hdjax.decoding.state import DecodeState
from hdjax.errors import HdjaxError
from hdjax.kvcache import KVCache, init_cache

SELECTIONS = ("attention", "static", "random")


@dataclasses.dataclass(frozen=True)
class LazyConfig:
  """Static LazyLLM schedule (hashable: a static jit argument).

  prune_layers: layers at which tokens are re-selected, increasing; keep_ratios: the fraction of the prompt
  bucket kept from that layer on, non-increasing. selection: "attention" (LazyLLM), "static" (scores of the
  first pruning layer reused at every later one) or "random" (same budget, uniform random scores).

  The default was chosen on 16 passkey + 8 multi-document QA prompts per length (docs/results/lazyllm.md): one pruning
  layer at 14 keeping 10%, scored by a 16-token window over the end of the user's turn (`score_skip=6` skips
  SmolLM2's chat-template assistant header) and pooled over 15 positions (a number or a name survives whole). On
  SmolLM2-135M the scores do not point at the answer before layer ~14, so earlier pruning loses it (the former
  default, 3/6/10/16 keeping 0.7/0.5/0.35/0.2, found 1/16 passkeys at 4k against full prefill's 13/16).
  """

  prune_layers: tuple[int, ...] = (14,)
  keep_ratios: tuple[float, ...] = (0.1,)
  selection: str = "attention"
  revive: bool = True
  reselect_every: int = 4
  revive_budget: int = 4
  min_prompt: int = 1024
  bucket: int = 512
  chunk: int = 256  # query and key rows per block of the gathered prefill's blocked attention
  seed: int = 0
  score_window: int = 16  # query rows that score the prompt: the last w prompt tokens (1: LazyLLM's last token)
  score_pool: int = 15  # odd; a token's score is the max over live tokens within pool // 2 positions (1: none)
  score_skip: int = 6  # the observation window ends this many tokens before the last prompt token (a chat prompt
  # ends with the template's assistant header; skipping it scores by the end of the user's turn); always kept
  keep_sinks: int = 0  # the first n prompt tokens (attention sinks; a chat template's system turn) are always kept

  def validate(self, cfg: LlamaConfig) -> "LazyConfig":
    layers, ratios = self.prune_layers, self.keep_ratios
    if len(layers) != len(ratios):
      raise HdjaxError(f"lazy: {len(layers)} prune_layers but {len(ratios)} keep_ratios")
    if list(layers) != sorted(set(layers)) or (layers and not 0 < layers[0] <= layers[-1] < cfg.n_layers):
      raise HdjaxError(f"lazy: prune_layers must be increasing within (0, {cfg.n_layers}), got {layers}")
    if any(not 0 < r <= 1 for r in ratios) or list(ratios) != sorted(ratios, reverse=True):
      raise HdjaxError(f"lazy: keep_ratios must be non-increasing in (0, 1], got {ratios}")
    if self.selection not in SELECTIONS:
      raise HdjaxError(f"lazy: selection must be one of {SELECTIONS}, got {self.selection!r}")
    if min(self.reselect_every, self.revive_budget, self.bucket, self.chunk, self.score_window, self.score_pool) < 1:
      raise HdjaxError("lazy: reselect_every, revive_budget, bucket, chunk, score_window and score_pool must be >= 1")
    if min(self.score_skip, self.keep_sinks) < 0:
      raise HdjaxError("lazy: score_skip and keep_sinks must be >= 0")
    if self.score_pool % 2 == 0:
      raise HdjaxError(f"lazy: score_pool must be odd (a window centred on the token), got {self.score_pool}")
    return self

  def keep_counts(self, t: int) -> tuple[int, ...]:
    """Static number of tokens each group runs on, for a bucket of t prompt tokens."""
    return (t,) + tuple(max(1, min(t, math.ceil(r * t))) for r in self.keep_ratios)

  def computed_fraction(self, n_layers: int) -> float:
    """The fraction of prompt token-layers this schedule computes (ignoring bucket rounding)."""
    bounds = (0,) + self.prune_layers + (n_layers,)
    ratios = (1.0,) + self.keep_ratios
    return sum((b - a) * r for a, b, r in zip(bounds[:-1], bounds[1:], ratios)) / n_layers


def single_layer_config(base: LazyConfig, n_layers: int, layer: int) -> LazyConfig:
  """A FastKV-like schedule: one selection at `layer`, at the same computed fraction as `base`, no revival."""
  ratio = (base.computed_fraction(n_layers) * n_layers - layer) / (n_layers - layer)
  if not 0 < ratio <= 1:
    raise HdjaxError(f"lazy_single: layer {layer} cannot match the budget of {base.prune_layers}")
  return dataclasses.replace(base, prune_layers=(layer,), keep_ratios=(ratio,), revive=False,
                             selection="attention")


class LazyState(NamedTuple):
  """Everything prefill hands to decoding, per sequence b and cache slot s."""

  cache: KVCache
  computed_lbs: jax.Array  # int32 [L, B, S]: times the K/V of (layer, slot) was computed
  aux_h_bsd: jax.Array  # hidden state entering layer aux_layer_bs of each pruned token
  aux_k_bskh: jax.Array  # its post-RoPE key at that layer (to re-score it without recomputing)
  aux_layer_bs: jax.Array  # int32: first layer not computed for the slot (L once complete)


def prefill_bucket(n: int, lazy_cfg: LazyConfig) -> int:
  return -(-n // lazy_cfg.bucket) * lazy_cfg.bucket


def _norm_qk(cfg: LlamaConfig, p_layer, h_btd: jax.Array, positions_bt: jax.Array, weight: str) -> jax.Array:
  """Post-RoPE queries (weight='q') or keys ('k') of one layer: [B, T, heads, H]."""
  x_btd = model.RMSNorm(cfg.rms_eps).apply({"params": p_layer["attn_norm"]}, h_btd)
  sin_bth, cos_bth = rope_sin_cos(cfg, positions_bt)
  heads_axes = cfg.weight_axes(weight).replace("D", "")  # NH or KH
  q_or_k = model.project(cfg, weight, model.layer_weight(cfg, p_layer, weight), x_btd, "BTD", "BT" + heads_axes)
  return apply_rope(q_or_k, sin_bth, cos_bth)


def _row_probs(cfg: LlamaConfig, q_bwnh: jax.Array, k_bskh: jax.Array, visible_bws: jax.Array) -> jax.Array:
  """Attention W query rows per sequence pay each key, softmax over the keys each row sees, averaged over heads
  and over the rows that see any key: [B, S]."""
  b, w, _, hd = q_bwnh.shape
  q_bwkgh = q_bwnh.reshape(b, w, cfg.n_kv_heads, cfg.q_per_kv, hd)
  # [B, K, G, W, S]
  logits = jnp.einsum("BWKGH,BSKH->BKGWS", q_bwkgh, k_bskh, preferred_element_type=jnp.float32) * hd ** -0.5
  logits = jnp.where(visible_bws[:, None, None], logits, jnp.finfo(jnp.float32).min)
  probs_bws = jnp.mean(jax.nn.softmax(logits, axis=-1), axis=(1, 2))
  rows_bw = jnp.any(visible_bws, axis=-1)
  return jnp.einsum("BWS,BW->BS", probs_bws, rows_bw / jnp.maximum(jnp.sum(rows_bw, -1, keepdims=True), 1))


def score_tokens(params, cfg: LlamaConfig, layer: int, h_bnd: jax.Array, positions_bn: jax.Array,
                 valid_bn: jax.Array, last_pos_b: jax.Array, window: int = 1, skip: int = 0
                 ) -> tuple[jax.Array, jax.Array]:
  """LazyLLM scores at `layer` of the N given tokens: attention from the `window` prompt tokens ending `skip`
  tokens before the last one (their rows, never the full matrix), averaged over heads and rows. Returns scores
  [B, N] and keys [B, N, K, H]."""
  p = model.layer_params(params, layer)
  k_bnkh = _norm_qk(cfg, p, h_bnd, positions_bn, "k")
  query_pos_bw = last_pos_b[:, None] - skip - jnp.arange(window)[None, :]
  match_bwn = (positions_bn[:, None, :] == query_pos_bw[:, :, None]) & valid_bn[:, None, :]
  h_query_bwd = jnp.take_along_axis(h_bnd, jnp.argmax(match_bwn, axis=2)[:, :, None], axis=1)
  q_bwnh = _norm_qk(cfg, p, h_query_bwd, query_pos_bw, "q")
  visible_bwn = (valid_bn[:, None, :] & (positions_bn[:, None, :] <= query_pos_bw[:, :, None])
                 & jnp.any(match_bwn, axis=2, keepdims=True))
  return _row_probs(cfg, q_bwnh, k_bnkh, visible_bwn), k_bnkh


def pool_scores(scores_bn: jax.Array, positions_bn: jax.Array, valid_bn: jax.Array, num_positions: int,
                pool: int) -> jax.Array:
  """Each token's score raised to the max over valid tokens within pool // 2 original positions (SnapKV's
  clustering: the neighbours of an important token, e.g. the other digits of a number, are kept with it).
  Pooling runs over positions, not over the N axis, so a gathered subset and the masked full set agree."""
  if pool == 1:
    return scores_bn
  b_idx = jnp.arange(scores_bn.shape[0])[:, None]
  by_position_bt = jnp.full((scores_bn.shape[0], num_positions), -jnp.inf, scores_bn.dtype).at[
      b_idx, positions_bn].max(jnp.where(valid_bn, scores_bn, -jnp.inf), mode="drop")
  pooled_bt = jax.lax.reduce_window(by_position_bt, -jnp.inf, jax.lax.max, (1, pool), (1, 1), "SAME")
  return jnp.take_along_axis(pooled_bt, positions_bn, axis=1)


def _select(scores_bn: jax.Array, positions_bn: jax.Array, valid_bn: jax.Array, last_pos_b: jax.Array,
            count: int, window: int = 1, sinks: int = 0) -> jax.Array:
  """Indices [B, count] (ascending) of the kept tokens: the top scores among valid ones; the last `window`
  tokens and the first `sinks` always (while the count allows)."""
  ranked = jnp.where(valid_bn, scores_bn, -1.0)
  forced_bn = (positions_bn > last_pos_b[:, None] - window) | (positions_bn < sinks)
  ranked = jnp.where(valid_bn & forced_bn, 2.0, ranked)
  return jnp.sort(jax.lax.top_k(ranked, count)[1], axis=1)


def _count(computed_lbs: jax.Array, start: int, slots_bt: jax.Array, live_lbt: jax.Array) -> jax.Array:
  """Adds one to computed[start + l, b, slots[b, t]] wherever live[l, b, t]."""
  b_idx = jnp.arange(slots_bt.shape[0])[None, :, None]
  l_idx = start + jnp.arange(live_lbt.shape[0])[:, None, None]
  return computed_lbs.at[l_idx, b_idx, slots_bt[None]].add(live_lbt.astype(jnp.int32), mode="drop")


def run_layers_masked(params, cfg: LlamaConfig, h_btd: jax.Array, positions_bt: jax.Array, slots_bt: jax.Array,
                      live_lbt: jax.Array, computed_lbs: jax.Array, cache: KVCache, start: int, end: int
                      ) -> tuple[jax.Array, KVCache, jax.Array, jax.Array]:
  """Layers [start, end) where token t is computed at layer l only if live[l - start, t]; a token that is not
  keeps its hidden state and writes nothing. At layer l a query sees the slots whose K/V exists at l (counted
  in computed_lbs, or written by a live token in this call) at positions <= its own.

  Returns the hidden states, the cache, the updated counter and the hidden states entering each layer.
  """
  computed = _count(computed_lbs, start, slots_bt, live_lbt)
  out = model.run_layers(params, cfg, h_btd, positions_bt, causal_mask(positions_bt, cache.num_slots), cache,
                         slots_bt, start, end, collect_hidden=True, visible_lbs=computed > 0, live_lbt=live_lbt)
  return out.h_btd, out.cache, computed, out.hidden_lbtd[:-1]


def _empty_state(cfg: LlamaConfig, batch: int, num_slots: int) -> LazyState:
  return LazyState(
      cache=init_cache(cfg, batch, num_slots),
      computed_lbs=jnp.zeros((cfg.n_layers, batch, num_slots), jnp.int32),
      aux_h_bsd=jnp.zeros((batch, num_slots, cfg.d_model), jnp.float32),
      aux_k_bskh=jnp.zeros((batch, num_slots, cfg.n_kv_heads, cfg.head_dim), jnp.float32),
      aux_layer_bs=jnp.full((batch, num_slots), cfg.n_layers, jnp.int32))


def _prune_scores(params, cfg, lazy_cfg: LazyConfig, group: int, h_bnd, positions_bn, valid_bn, last_pos_b,
                  static_scores_bt):
  """Scores [B, N] at the group's pruning layer, keys [B, N, K, H] (or None) and the static score table."""
  layer = lazy_cfg.prune_layers[group - 1]
  if lazy_cfg.selection == "random":
    key = jax.random.fold_in(jax.random.key(lazy_cfg.seed), layer)
    table_bt = jax.random.uniform(key, static_scores_bt.shape)
    return jnp.take_along_axis(table_bt, positions_bn, axis=1), None, static_scores_bt
  if lazy_cfg.selection == "static" and group > 1:
    return jnp.take_along_axis(static_scores_bt, positions_bn, axis=1), None, static_scores_bt
  scores_bn, k_bnkh = score_tokens(params, cfg, layer, h_bnd, positions_bn, valid_bn, last_pos_b,
                                   lazy_cfg.score_window, lazy_cfg.score_skip)
  scores_bn = pool_scores(scores_bn, positions_bn, valid_bn, static_scores_bt.shape[1], lazy_cfg.score_pool)
  b_idx = jnp.arange(h_bnd.shape[0])[:, None]
  return scores_bn, k_bnkh, static_scores_bt.at[b_idx, positions_bn].set(scores_bn)


def _to_aux(state: LazyState, layer: int, h_bnd, k_bnkh, slots_bn) -> LazyState:
  """Records the hidden state entering `layer` (and its key) for tokens that may be pruned there."""
  b_idx = jnp.arange(h_bnd.shape[0])[:, None]
  aux_k = state.aux_k_bskh if k_bnkh is None else state.aux_k_bskh.at[b_idx, slots_bn].set(k_bnkh, mode="drop")
  return state._replace(aux_h_bsd=state.aux_h_bsd.at[b_idx, slots_bn].set(h_bnd, mode="drop"), aux_k_bskh=aux_k,
                        aux_layer_bs=state.aux_layer_bs.at[b_idx, slots_bn].set(layer, mode="drop"))


def _run_group_gathered(params, cfg: LlamaConfig, lazy_cfg: LazyConfig, h_bnd, positions_bn, valid_bn,
                        state: LazyState, start: int, end: int) -> tuple[jax.Array, LazyState]:
  """Layers [start, end) on the N gathered tokens only (in position order, with their original positions),
  attending blockwise among themselves (`model.run_layers`' prefill) into a compact N-slot buffer, then scatter K/V
  to the cache."""
  batch, n, _ = h_bnd.shape
  sub_params = {"layers": params["layers"][start:end]}
  dtype = jnp.dtype(cfg.engine.cache_dtype)
  local = KVCache(k=jnp.zeros((end - start, batch, cfg.n_kv_heads, n, cfg.head_dim), dtype),
                  v=jnp.zeros((end - start, batch, cfg.n_kv_heads, n, cfg.head_dim), dtype),
                  lengths=jnp.zeros((batch,), jnp.int32))
  local_slots_bn = jnp.where(valid_bn, jnp.arange(n)[None, :], n)
  out = model.run_layers(sub_params, cfg, h_bnd, positions_bn, None, local, local_slots_bn, 0, end - start,
                         prefill_block=lazy_cfg.chunk)
  h_bnd, local = out.h_btd, out.cache
  b_idx = jnp.arange(batch)[:, None]
  slots_bn = jnp.where(valid_bn, positions_bn, state.cache.num_slots)
  # the indexed view of the [L, B, K, S, H] cache at (start:end, b, :, slot) is [B, N, L', K, H]
  cache = state.cache.replace(
      k=state.cache.k.at[start:end, b_idx, :, slots_bn].set(local.k.transpose(1, 3, 0, 2, 4), mode="drop"),
      v=state.cache.v.at[start:end, b_idx, :, slots_bn].set(local.v.transpose(1, 3, 0, 2, 4), mode="drop"))
  live_lbn = jnp.broadcast_to(valid_bn, (end - start,) + valid_bn.shape)
  computed = _count(state.computed_lbs, start, slots_bn, live_lbn)
  return h_bnd, state._replace(cache=cache, computed_lbs=computed)


@functools.partial(jax.jit, static_argnames=("cfg", "lazy_cfg", "num_slots", "gathered"))
def lazy_prefill(params, cfg: LlamaConfig, lazy_cfg: LazyConfig, tokens_bt: jax.Array, lengths_b: jax.Array,
                 num_slots: int, gathered: bool = True) -> tuple[jax.Array, LazyState]:
  """Pruned prefill of right-padded prompts [B, T]. Returns the last-token logits [B, V] and the LazyState
  (cache lengths = prompt lengths). `gathered=False` runs the masked reference with the same semantics."""
  compilation.TRACE_COUNTS["lazy_prefill"] += 1
  batch, t = tokens_bt.shape
  state = _empty_state(cfg, batch, num_slots)
  last_pos_b = lengths_b - 1
  positions_bn = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  valid_bn = positions_bn < lengths_b[:, None]
  h_bnd = model.embed(params, cfg, tokens_bt)
  static_scores_bt = jnp.zeros((batch, t), jnp.float32)
  bounds = (0,) + lazy_cfg.prune_layers + (cfg.n_layers,)
  counts = lazy_cfg.keep_counts(t)
  b_idx = jnp.arange(batch)[:, None]
  for g, (start, end) in enumerate(zip(bounds[:-1], bounds[1:])):
    if g > 0:
      scores_bn, k_bnkh, static_scores_bt = _prune_scores(params, cfg, lazy_cfg, g, h_bnd, positions_bn, valid_bn,
                                                          last_pos_b, static_scores_bt)
      state = _to_aux(state, start, h_bnd, k_bnkh, jnp.where(valid_bn, positions_bn, num_slots))
      keep_bk = _select(scores_bn, positions_bn, valid_bn, last_pos_b, counts[g],
                        lazy_cfg.score_window + lazy_cfg.score_skip, lazy_cfg.keep_sinks)
      if gathered:
        h_bnd, positions_bn, valid_bn = (jnp.take_along_axis(h_bnd, keep_bk[:, :, None], axis=1),
                                         jnp.take_along_axis(positions_bn, keep_bk, axis=1),
                                         jnp.take_along_axis(valid_bn, keep_bk, axis=1))
      else:
        valid_bn = valid_bn & jnp.zeros_like(valid_bn).at[b_idx, keep_bk].set(True)
    if gathered:
      h_bnd, state = _run_group_gathered(params, cfg, lazy_cfg, h_bnd, positions_bn, valid_bn, state, start, end)
    else:
      live_lbn = jnp.broadcast_to(valid_bn, (end - start,) + valid_bn.shape)
      h_bnd, cache, computed, _ = run_layers_masked(params, cfg, h_bnd, positions_bn, positions_bn, live_lbn,
                                                    state.computed_lbs, state.cache, start, end)
      state = state._replace(cache=cache, computed_lbs=computed)
  state = state._replace(aux_layer_bs=state.aux_layer_bs.at[b_idx, jnp.where(valid_bn, positions_bn, num_slots)].set(
      cfg.n_layers, mode="drop"), cache=state.cache.replace(lengths=lengths_b.astype(jnp.int32)))
  last_n = jnp.argmax(positions_bn == last_pos_b[:, None], axis=1)
  logits_bv = model.unembed(params, cfg, jnp.take_along_axis(h_bnd, last_n[:, None, None], axis=1))[:, 0]
  return logits_bv, state


def _revive(params, cfg: LlamaConfig, lazy_cfg: LazyConfig, state: LazyState, entering_lbd: jax.Array,
            pos_b: jax.Array, active_b: jax.Array) -> tuple[LazyState, jax.Array]:
  """Re-scores the pruned tokens at their Aux Cache layer with the current token's query and computes the top
  `revive_budget` above-uniform ones per pruning layer from that layer to the last. Returns the state and how
  many tokens were revived per sequence."""
  batch, s = state.aux_layer_bs.shape
  b_idx = jnp.arange(batch)[:, None]
  revived_b = jnp.zeros((batch,), jnp.int32)
  budget = min(lazy_cfg.revive_budget, s)
  for layer in lazy_cfg.prune_layers:
    p = model.layer_params(params, layer)
    q_b1nh = _norm_qk(cfg, p, entering_lbd[layer][:, None], pos_b[:, None], "q")
    candidate_bs = (state.aux_layer_bs == layer) & active_b[:, None]
    computed_bs = state.computed_lbs[layer] > 0
    k_bskh = jnp.where(candidate_bs[:, :, None, None], state.aux_k_bskh, state.cache.k[layer].swapaxes(1, 2))
    visible_bs = (computed_bs | candidate_bs) & (jnp.arange(s)[None, :] <= pos_b[:, None])
    probs_bs = _row_probs(cfg, q_b1nh, k_bskh, visible_bs[:, None])
    uniform_b = 1.0 / jnp.maximum(jnp.sum(visible_bs, axis=1), 1)
    wanted_bs = candidate_bs & (probs_bs > uniform_b[:, None])
    top_br, slots_br = jax.lax.top_k(jnp.where(wanted_bs, probs_bs, -1.0), budget)
    live_br = top_br >= 0
    slots_br = jnp.sort(jnp.where(live_br, slots_br, s), axis=1)
    live_br = slots_br < s
    h_brd = state.aux_h_bsd[b_idx, jnp.minimum(slots_br, s - 1)]
    live_lbr = jnp.broadcast_to(live_br, (cfg.n_layers - layer,) + live_br.shape)
    _, cache, computed, _ = run_layers_masked(params, cfg, h_brd, slots_br, slots_br, live_lbr, state.computed_lbs,
                                              state.cache, layer, cfg.n_layers)
    state = state._replace(cache=cache, computed_lbs=computed,
                           aux_layer_bs=state.aux_layer_bs.at[b_idx, slots_br].set(cfg.n_layers, mode="drop"))
    revived_b = revived_b + jnp.sum(live_br, axis=1)
  return state, revived_b


def revive_if(pred: jax.Array, revive, state: LazyState) -> tuple[LazyState, jax.Array]:
  """`revive(state)` -> (state, revived_b) when `pred`, else (state, zeros), under `control.run_if` (a `lax.cond`
  would copy its operand, the whole cache, on every step)."""
  zeros_b = jnp.zeros(state.aux_layer_bs.shape[:1], jnp.int32)
  return run_if(pred, lambda carry: tuple(revive(carry[0])), (state, zeros_b))


def steps_to_revival(pos_b: jax.Array, prompt_b: jax.Array, every: int) -> jax.Array:
  """Tokens from position pos to the next re-selection point at or after it. `lazy_decode_loop` re-selects after
  computing the tokens at positions prompt, prompt + every, ... (its steps 0, every, ...), with their queries; a
  multi-token step that stops there (`lazy+pld`, `lazy+hd`) sees the same revived set as `lazy` at every later
  position."""
  return (prompt_b - pos_b) % every


def revive_at(params, cfg: LlamaConfig, lazy_cfg: LazyConfig, state: LazyState, token_b: jax.Array,
              pos_b: jax.Array, due_b: jax.Array) -> tuple[LazyState, jax.Array]:
  """`_revive` for the rows `due_b` whose token `token_b` at `pos_b` is already in the cache (a multi-token step
  computed it): its states entering the pruning layers are recomputed with the visibility it was computed with,
  and those queries re-score the pruned tokens."""
  pos_b1 = pos_b[:, None]
  live_lb1 = jnp.broadcast_to(due_b[:, None], (lazy_cfg.prune_layers[-1] + 1,) + pos_b1.shape)
  *_, entering_lb1d = run_layers_masked(params, cfg, model.embed(params, cfg, token_b[:, None]), pos_b1, pos_b1,
                                        live_lb1, state.computed_lbs, state.cache, 0, lazy_cfg.prune_layers[-1] + 1)
  return _revive(params, cfg, lazy_cfg, state, entering_lb1d[:, :, 0], pos_b, due_b)


class LazyInner(NamedTuple):
  """The lazy decoding loop's method state (in a `DecodeState` whose cache is the pruned one)."""

  state: LazyState  # `cache` None (the `DecodeState`'s)
  revived_b: jax.Array  # [B] tokens revived during decoding
  prefill_computed_b: jax.Array  # [B] (layer, prompt token) pairs whose K/V the prefill computed
  prompt_b: jax.Array  # [B] prompt lengths


@functools.partial(jax.jit, static_argnames=("cfg", "lazy_cfg", "sampling"), donate_argnames=("state",))
def lazy_decode_chunk(params, cfg: LlamaConfig, lazy_cfg: LazyConfig, state: DecodeState, max_new: jax.Array,
                      stop_at: jax.Array, sampling: SamplingConfig) -> DecodeState:
  """Decoding where each layer's attention sees only that layer's computed K/V, with revival every
  `reselect_every` steps (`state.method` is a `LazyInner`); stops as `ar.token_loop`."""
  compilation.TRACE_COUNTS["lazy_decode_loop"] += 1
  batch = state.new_b.shape[0]

  def step(cache, inner: LazyInner, cur_b, active_b, steps):
    st = inner.state
    pos_b1 = cache.lengths[:, None]
    live_lb1 = jnp.broadcast_to(active_b[:, None], (cfg.n_layers, batch, 1))
    h_b1d, cache, computed, entering_lb1d = run_layers_masked(
        params, cfg, model.embed(params, cfg, cur_b[:, None]), pos_b1, pos_b1, live_lb1, st.computed_lbs, cache,
        0, cfg.n_layers)
    st = st._replace(cache=cache.replace(lengths=cache.lengths + active_b.astype(jnp.int32)), computed_lbs=computed)
    revived_b = inner.revived_b
    if lazy_cfg.revive:
      st, got_b = revive_if(steps % lazy_cfg.reselect_every == 0,
                            lambda s_: _revive(params, cfg, lazy_cfg, s_, entering_lb1d[:, :, 0], pos_b1[:, 0],
                                               active_b), st)
      revived_b = revived_b + got_b
    return (model.unembed(params, cfg, h_b1d)[:, 0], st.cache,
            inner._replace(state=st._replace(cache=None), revived_b=revived_b))

  return ar.token_loop(step, state, cfg.eos_ids, max_new, stop_at, sampling)


_OPTION_FIELDS = tuple(f.name for f in dataclasses.fields(LazyConfig))


def config_from_request(request: GenerateRequest, base: LazyConfig) -> LazyConfig:
  """`lazy_config=LazyConfig(...)` replaces the base; single fields (keep_ratios=..., min_prompt=...) override."""
  cfg = request.option("lazy_config", base)
  changes = {k: (tuple(v) if isinstance(v, list) else v) for k, v in request.options if k in _OPTION_FIELDS}
  return dataclasses.replace(cfg, **changes)


def prefill_request(lm: LoadedModel, request: GenerateRequest, lazy_cfg: LazyConfig, num_slots: int
                    ) -> tuple[jax.Array, LazyState, int]:
  """Pruned prefill of the request's prompts padded to their bucket: last-token logits, state, bucket length."""
  t = min(prefill_bucket(max(len(p) for p in request.prompts), lazy_cfg), num_slots)
  tokens, lengths = pad_prompts(request.prompts, lm.cfg.pad_id, t)
  logits_bv, state = lazy_prefill(lm.params, lm.cfg, lazy_cfg, jnp.asarray(tokens), jnp.asarray(lengths), num_slots)
  return logits_bv, state, t


def pruned_prefill(lm: LoadedModel, request: GenerateRequest, num_slots: int, lazy_cfg: LazyConfig | None = None
                   ) -> Prefilled:
  """The pruned prefill of `lazy_cfg` (default: the request's schedule, as `lazy` runs it), with per-layer
  visibility (every slot past the prompt counts as visible: decoding writes it at every layer) and the
  `LazyState` as `state`; a full prefill (`state` None) for prompts shorter than `min_prompt`."""
  lazy_cfg = (lazy_cfg or config_from_request(request, LazyConfig())).validate(lm.cfg)
  if max(len(p) for p in request.prompts) < lazy_cfg.min_prompt:
    return full_prefill(lm, request, num_slots)._replace(
        stats=dict(lazy_fallback=True, computed_fraction_prefill=1.0, revived=0))
  logits_bv, state, bucket = prefill_request(lm, request, lazy_cfg, num_slots)
  computed_lbs = state.computed_lbs > 0
  decoded_bs = jnp.arange(num_slots)[None, :] >= state.cache.lengths[:, None]
  # a device scalar: the driver reads it with the results, so the time to first token waits on nothing more
  fraction = jnp.sum(computed_lbs) / (lm.cfg.n_layers * sum(len(p) for p in request.prompts))
  return Prefilled(logits_bv, state.cache, computed_lbs | decoded_bs[None],
                   dict(lazy_fallback=False, prefill_bucket=bucket, lazy_revive=False,
                        computed_fraction_prefill=fraction), state)


@dataclasses.dataclass(frozen=True)
class LazyLoop(driver.DecodeLoop):
  """`lazy`'s `driver.DecodeLoop` after `pruned_prefill`: an `ar.token_state` whose method state is a `LazyInner`."""

  cfg: LlamaConfig
  lazy_cfg: LazyConfig
  extra_slots: int = 0

  def start(self, lm: LoadedModel, request: GenerateRequest, prefilled: Prefilled, first_b: jax.Array,
            key: jax.Array) -> DecodeState:
    st = prefilled.state
    # prompt lengths: a copy of the cache's cursors (the state is donated, and one buffer cannot be donated twice)
    inner = LazyInner(st._replace(cache=None), jnp.zeros_like(first_b), jnp.sum(st.computed_lbs > 0, axis=(0, 2)),
                      jnp.array(st.cache.lengths, copy=True))
    return ar.token_state(lm.cfg, first_b, request.max_new_tokens, key, st.cache, inner)

  def run(self, lm: LoadedModel, request: GenerateRequest, state: DecodeState, stop_at: jax.Array) -> DecodeState:
    return lazy_decode_chunk(lm.params, lm.cfg, self.lazy_cfg, state, jnp.int32(request.max_new_tokens), stop_at,
                             request.sampling)

  def report(self, state: DecodeState):
    return state.steps, state.method._replace(state=state.method.state.computed_lbs)

  def row_stats(self, report, b: int, new_tokens: int) -> dict:
    steps, inner = report
    return dict(token_row_stats(steps, new_tokens), lazy_revive=self.lazy_cfg.revive,
                revived=int(inner.revived_b[b]), **computed_stats(self.cfg, inner.state[:, b], inner.prompt_b[b],
                                                                  inner.prefill_computed_b[b]))


def computed_stats(cfg: LlamaConfig, computed_ls: np.ndarray, prompt: int, prefill_computed: int) -> dict:
  """A row's pruning stats from its final computed counts [L, S]: the share of (layer, prompt token) pairs whose
  K/V the prefill and the whole request computed, the most times one was computed, and the pairs computed."""
  return dict(computed_fraction_prefill=float(prefill_computed) / (cfg.n_layers * prompt),
              computed_fraction_final=float(np.sum(computed_ls[:, :prompt] > 0)) / (cfg.n_layers * prompt),
              max_layer_computes=int(computed_ls.max()), token_layers_computed=int(computed_ls.sum()))


def generate_lazy(lm: LoadedModel, request: GenerateRequest, lazy_cfg: LazyConfig, name: str
                  ) -> list[GenerationResult]:
  """Runs one request with a schedule; prompts shorter than `min_prompt` fall back to full prefill and `ar`."""
  lazy_cfg = lazy_cfg.validate(lm.cfg)
  prefill = functools.partial(pruned_prefill, lazy_cfg=lazy_cfg)
  if max(len(p) for p in request.prompts) < lazy_cfg.min_prompt:
    return driver.generate(lm, request, name, ArLoop(), prefill)
  return driver.generate(lm, request, name, LazyLoop(lm.cfg, lazy_cfg), prefill)


def _single(lazy_cfg: LazyConfig, n_layers: int, request: GenerateRequest) -> LazyConfig:
  return single_layer_config(lazy_cfg, n_layers, request.option("single_layer", lazy_cfg.prune_layers[0]))


# Each method turns the requested schedule (LazyConfig defaults, then options) into the one it runs.
SCHEDULES = {
    "lazy": lambda c, n_layers, request: c,
    "lazy_static": lambda c, n_layers, request: dataclasses.replace(c, selection="static", revive=False),
    "lazy_random": lambda c, n_layers, request: dataclasses.replace(c, selection="random", revive=False),
    "lazy_single": _single,
    "full": lambda c, n_layers, request: dataclasses.replace(c, prune_layers=(), keep_ratios=(), revive=False),
}


def _register(name: str):
  @register_method(name)
  def run(lm: LoadedModel, request: GenerateRequest) -> list[GenerationResult]:
    lazy_cfg = SCHEDULES[name](config_from_request(request, LazyConfig()), lm.cfg.n_layers, request)
    return generate_lazy(lm, request, lazy_cfg, name)
  return run


for _name in SCHEDULES:
  _register(_name)
