"""AdaDecode: adaptive layer-parallel decoding with exit heads and exact verification (arXiv 2506.03700).

One jitted `lax.while_loop` whose every iteration runs ONE segment of decoder layers for a group of tokens: the
layers from one exit head's layer to the next (`segments_of`; with the head at 26 of 30 layers, [0, 26) and
[26, 30)), since a token can only stop where a head may exit. The tokens in flight sit in a static window of
W = P + 1 slots at consecutive positions `cache.lengths + i`. Slot i has a depth (how many layers it has run) and
a hidden state; depths never increase along the window, so the tokens at the newest token's depth form a suffix —
the group. Each iteration runs the group (padded to a static bucket of 1, 2, 4, ... rows, one branch per bucket,
so a single token costs single-row layers) through the segment that starts at that depth, writing each token's
exact K/V at its layers. When the group catches up with an older token that waits at that depth, they merge: the
deferred layers of an early token run batched with the later tokens.

After a layer that has a head, the newest token's head decides: if its max probability >= gamma (and fewer than P
tokens are pending) its prediction becomes the next token, which enters the window at depth 0. With
`head_vocab=N` the head scores only N candidate ids (the heads' most frequent training targets, `heads.py`), so a
check costs one [N, D] contraction; the probabilities are those of the softmax over the candidates. When the group
reaches the last layer the whole window is final: each early prediction is verified against the full model in
order (greedy: exact argmax; sampling: accept with min(1, p*/q), else sample from norm(max(0, p* - q))), the
accepted tokens are committed (the cache cursor moves past them), everything after the first rejection is dropped
(its K/V rows lie past the cursor and are overwritten later), and the token the full model chose starts a new
window.

A batch decodes in the same loop: each iteration runs the lowest layer that an active sequence's group waits at,
for every sequence whose group waits there (the others sit the layer out and finished sequences never take part),
so the layer's weights are read once for the batch. The sequences taking part are packed into a static bucket of
1, 2, 4, ... B of them (their hidden states and that layer's K/V gathered, the written rows scattered back): an
iteration's layer, exit-head and verification contractions grow with the sequences taking part, not with B. With
`in_step` (the default) a head's exit is taken only when every sequence taking part exits there, so the batch runs
each segment once for all its sequences, never a segment again for the few that exited while the rest wait; with
`in_step=False` each sequence's tokens, exits and verifications are exactly those of decoding it alone. The tokens
are the same either way.

After LazyLLM's pruned prefill (`lazy+adadecode`) every layer sees the slots whose K/V exists there; a `Revival`
revives pruned prompt tokens as `lazy` does: a token at a re-selection position proposes no early token, so it
ends its window, and once a verification commits it, its query revives tokens that every later token sees.
`verify=False` is the paper's ablation that keeps every early token unchecked (not lossless).
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from hdjax import assets, compilation, model
from hdjax.adadecode.heads import candidate_ids, load_heads, load_vocab, read_once
from hdjax.attention import causal_mask
from hdjax.config import LlamaConfig, is_int
from hdjax.control import switch_in_place
from hdjax.decoding import autoregressive as ar
from hdjax.decoding import driver
from hdjax.decoding.prefill import Prefill, Prefilled, full_prefill
from hdjax.decoding.registry import register_method
from hdjax.decoding.request import GenerateRequest, GenerationResult, LoadedModel
from hdjax.decoding.sampling import SamplingConfig, greedy_tokens, position_keys, row_keys, sample_tokens
from hdjax.decoding.state import DecodeState, start_state
from hdjax.errors import HdjaxError
from hdjax.exit_heads import ExitHeads, check_layers, head_logits, identity_heads, reduced_heads, reduced_logits
from hdjax.kvcache import KVCache

DEFAULT_HEADS_DIR = str(assets.checkpoints_dir() / "adadecode" / "smollm2-135m")
DEFAULT_LAYERS = (26,)  # of the committed heads, chosen by measurement (checkpoints/adadecode/README.md)
DEFAULT_HEAD_VOCAB = 2048  # candidates of the committed heads' checks (checkpoints/adadecode/README.md)


@dataclasses.dataclass(frozen=True)
class AdaDecodeConfig:
  """The method's options besides the heads (`resolve_heads`)."""
  # an exit needs the head's top probability >= gamma; 0.9 measured on 13 ShareGPT validation prompts (bf16, 96
  # tokens, docs/results/adadecode.md): gamma 0.5 / 0.75 / 0.9 / 0.95 / 0.98 gave 0.76x / 0.87x / 0.91x / 0.915x /
  # 0.924x `ar`, the last three within the noise of two runs of one setting (0.907x and 0.910x at 0.9)
  gamma: float = 0.9
  max_pending: int = 5  # early tokens awaiting verification, at most
  # > 0: heads score only the heads' `head_vocab` most frequent ids; 0: the full vocabulary; None:
  # DEFAULT_HEAD_VOCAB for the committed heads, 0 for others
  head_vocab: int | None = None
  verify: bool = True  # False: the paper's ablation that keeps every early token unchecked (not lossless)
  # a batch's sequences exit together or not at all, so each segment runs once per token for the whole batch; False:
  # each exits on its own head, as when decoded alone (its work counters are then those of its own run). Lossless
  # either way. fp32, AMD host, 64 tokens, over batched `ar` at B = 2 / 4 / 8: True 1.07x / 0.97x / 1.08x, False
  # 0.99x / 0.78x / 0.75x (docs/results/adadecode.md)
  in_step: bool = True

  @classmethod
  def from_request(cls, request: GenerateRequest) -> "AdaDecodeConfig":
    c = cls(**{f.name: request.option(f.name, getattr(cls(), f.name)) for f in dataclasses.fields(cls)})
    if c.max_pending < 1:
      raise HdjaxError(f"max_pending must be >= 1, got {c.max_pending}")
    head_vocab = c.head_vocab
    if head_vocab is None:
      head_vocab = DEFAULT_HEAD_VOCAB if request.option("heads", DEFAULT_HEADS_DIR) == DEFAULT_HEADS_DIR else 0
    if not is_int(head_vocab) or head_vocab < 0:
      raise HdjaxError(f"head_vocab must be an integer >= 0 (0: the full vocabulary), got {head_vocab!r}")
    return dataclasses.replace(c, gamma=float(c.gamma), max_pending=int(c.max_pending), head_vocab=int(head_vocab),
                               verify=bool(c.verify), in_step=bool(c.in_step))


class Counters(NamedTuple):
  """Per sequence; the loop holds them with a leading batch axis [B]."""
  layer_steps: jax.Array  # decoder layers run in the loop iterations the sequence took part in
  layer_tokens_l: jax.Array  # [L] token-rows run at each layer
  block_seqs: jax.Array  # sum over its layer steps of the sequences in the packed block (padding included)
  iterations: jax.Array  # loop iterations (one segment each) the sequence took part in
  head_evals_i: jax.Array  # [I] head evaluations
  exits_i: jax.Array  # [I] early exits
  verifications: jax.Array  # windows that reached the last layer
  pending: jax.Array  # sum over verifications of the pending early tokens
  accepted: jax.Array  # early tokens accepted
  rejections: jax.Array  # verifications that rejected an early token


class Window(NamedTuple):
  """One sequence's tokens in flight and its output; the loop holds them with a leading batch axis [B]."""
  tok_w: jax.Array  # [W] window tokens at positions length + i
  depth_w: jax.Array  # [W] layers each has run
  h_wd: jax.Array  # [W, D] hidden state after depth_w layers
  n: jax.Array  # tokens in the window (>= 1)
  accept_n: jax.Array  # [out_len] tokens emitted by each verification
  counters: Counters
  prompt: jax.Array  # prompt length (the emitted token i is at position prompt + i)
  revive_due: jax.Array  # the last verification committed a re-selection token (with a `Revival`)


class AdaState(NamedTuple):
  """The loop's method state in its `DecodeState`, whose `tokens_bs` [B, out_len] are the emitted tokens, `key`
  [B] one key per sequence and cache lengths [B] the fully computed, verified tokens."""

  win: Window  # [B, ...]
  revival: Any = None  # the `Revival`'s state
  visible_lbs: jax.Array | None = None  # [L, B, S] the slots each layer sees after a pruned prefill (None: all)


class Revival(Protocol):
  """How a composition revives pruned prompt tokens during decoding (`lazy+adadecode`: `compose.LazyRevival`).
  Static and hashable (a jit static argument); its state is a pytree in `AdaState.revival`. A token at a re-selection
  position proposes no early token, so it is the last of its window; once a verification commits it (and emits
  its prediction), `revive` runs with it and every later token sees the revived slots."""

  def start(self, prefilled: Prefilled) -> Any:
    """The state after `prefilled` (a pruned prefill)."""

  def visible_lbs(self, state) -> jax.Array:
    """[L, B, S]: which slots hold K/V at each layer."""

  def reselects(self, pos_b: jax.Array, prompt_b: jax.Array) -> jax.Array:
    """[B]: whether the token at position pos_b is a re-selection token."""

  def revive(self, params, cfg: LlamaConfig, cache: KVCache, state, token_b: jax.Array, pos_b: jax.Array,
             due_b: jax.Array) -> tuple[KVCache, Any]:
    """Revival for the rows `due_b`, whose re-selection token `token_b` at `pos_b` is in the cache."""

  def report(self, state) -> Any:
    """The parts of the state that `row_stats` reads."""

  def row_stats(self, report, b: int) -> dict:
    """Row b's stats from the host copy of `report`."""


def row_buckets(window: int) -> tuple[int, ...]:
  """1, 2, 4, ... up to `window` (which is always one): the static sizes of a block of rows or of sequences."""
  sizes = {min(1 << i, window) for i in range(window.bit_length() + 1)}
  return tuple(sorted(sizes))


def segments_of(n_layers: int, head_layers: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  """The loop's layer segments: [0, first head layer), ..., [last head layer, n_layers). A token's depth is always a
  segment's start (it stops only where a head may exit or waits at one), so an iteration runs a whole segment."""
  bounds = sorted({0, n_layers, *head_layers})
  return tuple(zip(bounds[:-1], bounds[1:]))


def _segment_rows(params, cfg: LlamaConfig, start: int, end: int, rows: int, h_bwd, cache: KVCache, g0_b, g_b,
                  visible_lbs):
  """Runs decoder layers [start, end) of `params` on window slots [g0, g0 + g) of every sequence as a static block
  of `rows` rows (g = 0: the sequence sits them out), writing their K/V into `cache`, whose lengths are each
  sequence's first window position; at layer l they see the slots of visible_lbs[l] (all when None) at positions
  <= their own. Returns the window's hidden states and the cache."""
  window = h_bwd.shape[1]
  j_r = jnp.arange(rows)
  idx_br = jnp.clip(g0_b[:, None] + j_r, 0, window - 1)
  valid_br = j_r[None, :] < g_b[:, None]
  pos_br = cache.lengths[:, None] + g0_b[:, None] + j_r
  slots_br = jnp.where(valid_br, pos_br, cache.num_slots)
  h_brd = jnp.take_along_axis(h_bwd, idx_br[:, :, None], axis=1)
  out = model.run_layers(params, cfg, h_brd, pos_br, causal_mask(pos_br, cache.num_slots), cache, slots_br, start,
                         end, visible_lbs=visible_lbs)
  b_idx = jnp.arange(h_bwd.shape[0])[:, None]
  return h_bwd.at[b_idx, jnp.where(valid_br, idx_br, window)].set(out.h_btd, mode="drop"), out.cache


def _packed_segment_rows(params, cfg: LlamaConfig, start: int, end: int, rows: int, size: int, g0_b, g_b,
                         visible_lbs, order_b, carry):
  """`_segment_rows` over the carry (h_bwd, cache) on the sequences `order_b[:size]`: all of them in place when
  `size` is the batch; else their hidden states and K/V at layers [start, end) gathered, run as a model of those
  layers alone, and scattered back (the others are unchanged)."""
  h_bwd, cache = carry
  if size == order_b.shape[0]:
    return _segment_rows(params, cfg, start, end, rows, h_bwd, cache, g0_b, g_b, visible_lbs)
  idx_p = order_b[:size]
  part = KVCache(k=cache.k[start:end, idx_p], v=cache.v[start:end, idx_p], lengths=cache.lengths[idx_p])
  h_pwd, part = _segment_rows({"layers": tuple(params["layers"][start:end])}, cfg, 0, end - start, rows,
                              h_bwd[idx_p], part, g0_b[idx_p], g_b[idx_p],
                              None if visible_lbs is None else visible_lbs[start:end, idx_p])
  return h_bwd.at[idx_p].set(h_pwd), cache.replace(k=cache.k.at[start:end, idx_p].set(part.k),
                                                   v=cache.v.at[start:end, idx_p].set(part.v))


def _packed(fn, size: int, order_b, x_b):
  """`fn` on the rows `order_b[:size]` of `x_b` (all rows when `size` is the batch), its output rows at their
  places in a zero [B, ...] result."""
  if size == order_b.shape[0]:
    return fn(x_b)
  idx_p = order_b[:size]
  y_p = fn(x_b[idx_p])
  return jnp.zeros(x_b.shape[:1] + y_p.shape[1:], y_p.dtype).at[idx_p].set(y_p)


def _final_rows(params, cfg: LlamaConfig, rows: int, size: int, h_bwd, order_b):
  """Full-model logits [B, W, V] of the first `rows` window slots of the sequences `order_b[:size]` (the others are
  zeros)."""
  logits_brv = _packed(lambda h_pwd: model.unembed(params, cfg, h_pwd[:, :rows]), size, order_b, h_bwd)
  return jnp.zeros(h_bwd.shape[:2] + logits_brv.shape[-1:], jnp.float32).at[:, :rows].set(logits_brv)


def _check_logits(params, cfg: LlamaConfig, head_w, head_ids, head, h_bd):
  """Exit-head logits of hidden states [B, D]: [B, V] for the full head (`head_w` [I, D, D], `head_ids` None), or
  [B, N] at the candidate ids `head_ids` [N] for the reduced one (`head_w` [I, N, D])."""
  if head_ids is None:
    return head_logits(params, cfg, head_w[head], h_bd[:, None])[:, 0]
  return reduced_logits(params, cfg, head_w[head], h_bd[:, None])[:, 0]


def accepted_early(tok_w: jax.Array, best_w: jax.Array, n: jax.Array, checked) -> jax.Array:
  """AdaDecode's acceptance rule: how many of the window's early tokens (slots 1 .. n - 1, each the early
  prediction of the slot before it) are accepted, in order up to the first that differs from the full model's
  token `best_w` at the slot before it (its argmax, or its sample under that position's noise). Without `checked`
  (the paper's ablation), all of them."""
  w_idx = jnp.arange(tok_w.shape[0])
  ok_w = (w_idx < n - 1) & ((jnp.roll(tok_w, -1) == best_w) | ~checked)
  return jnp.sum(jnp.cumprod(ok_w.astype(jnp.int32))).astype(jnp.int32)


def embed_one(params, cfg: LlamaConfig, tok: jax.Array) -> jax.Array:
  """One token's embedding [D]."""
  return model.embed(params, cfg, tok[None, None])[0, 0]


@functools.partial(jax.jit, static_argnames=("cfg", "n_heads", "window", "out_len"))
def initial_state(params, cfg: LlamaConfig, cache: KVCache, first_b: jax.Array, keys_b: jax.Array, max_new: jax.Array,
                  n_heads: int, window: int, out_len: int) -> DecodeState:
  """The loop's state after the prefill: each sequence's window holds its first token at depth 0."""

  def start(first, prompt) -> Window:
    zero = jnp.int32(0)
    counters = Counters(zero, jnp.zeros((cfg.n_layers,), jnp.int32), zero, zero, jnp.zeros((n_heads,), jnp.int32),
                        jnp.zeros((n_heads,), jnp.int32), zero, zero, zero, zero)
    h_wd = jnp.zeros((window, cfg.d_model), jnp.float32).at[0].set(embed_one(params, cfg, first))
    return Window(jnp.zeros((window,), jnp.int32).at[0].set(first), jnp.zeros((window,), jnp.int32), h_wd,
                  jnp.int32(1), jnp.zeros((out_len,), jnp.int32),
                  counters, prompt, jnp.bool_(False))

  win = jax.vmap(start)(first_b, cache.lengths)
  return start_state(cfg.eos_ids, jnp.full((first_b.shape[0], out_len), -1, jnp.int32), jnp.zeros_like(first_b),
                     first_b, max_new, cache, keys_b, AdaState(win))


@functools.partial(jax.jit, static_argnames=("cfg", "head_layers", "sampling", "in_step", "revival"),
                   donate_argnames=("state",))
def adadecode_loop(params, cfg: LlamaConfig, head_w, head_ids, head_layers: tuple[int, ...], gamma, checked,
                   state: DecodeState, max_new: jax.Array, stop_at: jax.Array, sampling: SamplingConfig,
                   in_step: bool = False, revival: Revival | None = None) -> DecodeState:
  """Decodes a batch from `initial_state` until each sequence hits EOS, `max_new` or a full cache, or every active
  one has emitted `stop_at` tokens. Every iteration runs one segment of layers (`segments_of`: up to the next exit
  head), the lowest that an active sequence's newest group waits at, for the sequences waiting there (the others
  sit it out), so one weight read serves the batch and every sequence's computation is its own single-sequence
  one. Exit heads: `head_w` [I, D, D] with `head_ids` None (full vocabulary), or `head_w` [I, N, D] from
  `reduced_heads` with its candidate ids `head_ids` [N]. `checked` (a bool scalar): False keeps every early token
  unchecked (the paper's ablation). Layers see the slots of `AdaState.visible_lbs` (None: all), or with a
  `revival` those its state says."""
  compilation.TRACE_COUNTS["adadecode_loop"] += 1
  n_layers = cfg.n_layers
  batch, window = state.method.win.tok_w.shape
  out_len = state.tokens_bs.shape[1]
  buckets = jnp.asarray(row_buckets(window))
  seq_buckets = row_buckets(batch)
  combos = [(p, r) for p in seq_buckets for r in row_buckets(window)]  # one branch each
  segments = segments_of(n_layers, head_layers)
  starts, ends = (jnp.asarray(x, jnp.int32) for x in zip(*segments))
  l_idx = jnp.arange(n_layers)
  head_of_depth = np.full(n_layers + 1, -1, np.int32)
  head_of_depth[list(head_layers)] = np.arange(len(head_layers))
  head_of_depth = jnp.asarray(head_of_depth)
  w_idx = jnp.arange(window)
  eos = jnp.asarray(cfg.eos_ids, jnp.int32)

  def front_depth_b(win: Window) -> jax.Array:
    return jnp.take_along_axis(win.depth_w, win.n[:, None] - 1, axis=1)[:, 0]

  def active_b(s: DecodeState) -> jax.Array:
    return ~s.done_b & (s.cache.lengths + window <= s.cache.num_slots)

  def seq_bucket(taking_b):
    return jnp.searchsorted(jnp.asarray(seq_buckets), jnp.sum(taking_b))

  def combo(taking_b, rows):
    """The switch branch of (the sequence bucket of `taking_b`, the row bucket of `rows`)."""
    return seq_bucket(taking_b) * len(buckets) + jnp.searchsorted(buckets, rows)

  def run_segment(s: DecodeState, seg, taking_b, order_b, visible_lbs) -> DecodeState:
    """The group of each sequence `taking_b` through segment `seg`'s layers (every layer on its own weight
    buffers, the cache updated in place: one `control.run_if` branch per (segment, sequence bucket, row bucket))."""
    win, start, end = s.method.win, starts[seg], ends[seg]
    in_group_bw = (w_idx[None] < win.n[:, None]) & (win.depth_w == start) & taking_b[:, None]
    g0_b = jnp.argmax(in_group_bw, axis=1).astype(jnp.int32)
    g_b = jnp.where(taking_b, win.n - g0_b, 0)
    branches = [functools.partial(_packed_segment_rows, params, cfg, a, e, r, p, g0_b, g_b, visible_lbs, order_b)
                for a, e in segments for p, r in combos]
    h_bwd, cache = switch_in_place(seg * len(combos) + combo(taking_b, jnp.max(g_b)), branches, (win.h_wd, s.cache))
    block = jnp.asarray(seq_buckets)[seq_bucket(taking_b)]
    layers_b = jnp.where(taking_b, end - start, 0)
    in_seg_l = (l_idx >= start) & (l_idx < end)
    c = win.counters._replace(layer_steps=win.counters.layer_steps + layers_b,
                              iterations=win.counters.iterations + taking_b,
                              block_seqs=win.counters.block_seqs + layers_b * block,
                              layer_tokens_l=win.counters.layer_tokens_l + g_b[:, None] * in_seg_l[None])
    win = win._replace(h_wd=h_bwd, depth_w=jnp.where(in_group_bw, end, win.depth_w), counters=c)
    return s._replace(cache=cache, method=s.method._replace(win=win))

  def exit_one(w: Window, y, head, eligible, go) -> Window:
    """The head at the newest token's layer proposed `y`; it enters the window if `go`."""
    c = w.counters._replace(head_evals_i=w.counters.head_evals_i.at[head].add(eligible.astype(jnp.int32)),
                            exits_i=w.counters.exits_i.at[head].add(go.astype(jnp.int32)))
    slot = jnp.where(go, w.n, window)  # dropped unless exiting
    return w._replace(tok_w=w.tok_w.at[slot].set(y, mode="drop"), depth_w=w.depth_w.at[slot].set(0, mode="drop"),
                      h_wd=w.h_wd.at[slot].set(embed_one(params, cfg, y), mode="drop"),
                      n=w.n + go.astype(jnp.int32), counters=c)

  def try_exit(s: DecodeState, layer, taking_b, order_b) -> DecodeState:
    head, win = head_of_depth[layer], s.method.win
    h_front_bd = jnp.take_along_axis(win.h_wd, (win.n - 1)[:, None, None], axis=1)[:, 0]
    check = functools.partial(_check_logits, params, cfg, head_w, head_ids, head)
    branches = [functools.partial(_packed, check, p) for p in seq_buckets]
    logits_bn = jax.lax.switch(seq_bucket(taking_b), branches, order_b, h_front_bd)  # N: the scored ids
    eligible_b = taking_b & (win.n < window)
    if revival is not None:  # a re-selection token is verified before any later token starts
      eligible_b &= ~revival.reselects(s.cache.lengths + win.n - 1, win.prompt)
    go_b = eligible_b & (jnp.max(jax.nn.softmax(logits_bn, axis=-1), axis=-1) >= gamma)
    if in_step:  # all or none: the batch stays in step
      go_b &= jnp.all(go_b | ~taking_b)
    if sampling.greedy:  # the top candidate; verification compares it with the full model's argmax
      y_b = greedy_tokens(logits_bn)
      y_b = y_b if head_ids is None else head_ids[y_b]
    else:  # the head's sample under the noise the full model's token there gets (the front's prediction)
      logits_bv = logits_bn if head_ids is None else jnp.full(
          (logits_bn.shape[0], cfg.vocab_size), -jnp.inf, jnp.float32).at[:, head_ids].set(logits_bn)
      y_b = sample_tokens(logits_bv, position_keys(s.key, s.new_b + win.n - 1), sampling)
    win = jax.vmap(exit_one, in_axes=(0, 0, None, 0, 0))(win, y_b, head, eligible_b, go_b)
    return s._replace(method=s.method._replace(win=win))

  def verify_one(w: Window, out_n, num, done, key, logits_wv, taking):
    """Checks the window's early tokens in order against the full model's tokens (`accepted_early`); returns it
    restarted at the full model's token (unchanged unless `taking`), the sequence's emitted tokens `out_n`, their
    count, its done flag, how far the cache cursor moves, and whether the full model's token (the last committed
    token's prediction) was emitted."""
    # slot i's prediction is emitted token num + i: its argmax, or its sample under that token's noise
    best_w = sample_tokens(logits_wv, position_keys(key[None], (num + w_idx)[None])[0], sampling)
    n_acc = accepted_early(w.tok_w, best_w, w.n, checked)
    rejected = n_acc < w.n - 1
    nxt = best_w[n_acc]
    proposed_w = jnp.roll(w.tok_w, -1)  # early prediction of slot i is the token in slot i + 1
    # emitted now: the accepted early tokens (slots 1..n_acc), then the full model's token
    emit_w = jnp.where(w_idx < n_acc, proposed_w, nxt)
    count = n_acc + 1
    is_eos_w = jnp.isin(emit_w, eos) & (w_idx < count)
    count = jnp.where(jnp.any(is_eos_w), jnp.argmax(is_eos_w) + 1, count)
    dst_w = jnp.where(taking & (w_idx < count) & (num + w_idx < max_new), num + w_idx, out_len)
    new_num = jnp.where(taking, jnp.minimum(num + count, max_new), num)
    c, t = w.counters, taking.astype(jnp.int32)
    c = c._replace(verifications=c.verifications + t, pending=c.pending + t * (w.n - 1),
                   accepted=c.accepted + t * n_acc, rejections=c.rejections + t * rejected.astype(jnp.int32))
    restart = functools.partial(jnp.where, taking)
    w = w._replace(tok_w=restart(jnp.zeros_like(w.tok_w).at[0].set(nxt), w.tok_w), depth_w=restart(0, w.depth_w),
                   h_wd=restart(jnp.zeros_like(w.h_wd).at[0].set(embed_one(params, cfg, nxt)), w.h_wd),
                   n=restart(1, w.n))
    next_emitted = (count == n_acc + 1) & (num + count <= max_new)
    w = w._replace(accept_n=w.accept_n.at[jnp.where(taking, c.verifications - 1, out_len)].set(new_num - num,
                                                                                               mode="drop"),
                   counters=c)
    done = done | (taking & (jnp.any(is_eos_w) | (new_num >= max_new)))
    return w, out_n.at[dst_w].set(emit_w, mode="drop"), new_num, done, t * (n_acc + 1), next_emitted

  def verify(s: DecodeState, layer, taking_b, order_b) -> DecodeState:
    del layer
    win = s.method.win
    branches = [functools.partial(_final_rows, params, cfg, r, p) for p, r in combos]
    logits_bwv = jax.lax.switch(combo(taking_b, jnp.max(jnp.where(taking_b, win.n, 1))), branches, win.h_wd, order_b)
    win, tokens_bs, new_b, done_b, advance_b, next_b = jax.vmap(verify_one)(
        win, s.tokens_bs, s.new_b, s.done_b, s.key, logits_bwv, taking_b)
    if revival is not None:
      win = win._replace(revive_due=taking_b & (advance_b > 0) & next_b
                         & revival.reselects(s.cache.lengths + advance_b - 1, win.prompt))
    return s._replace(tokens_bs=tokens_bs, new_b=new_b, done_b=done_b,
                      cache=s.cache.replace(lengths=s.cache.lengths + advance_b), method=s.method._replace(win=win))

  def body(s: DecodeState) -> DecodeState:
    running_b = active_b(s)
    depth_b = front_depth_b(s.method.win)
    layer = jnp.min(jnp.where(running_b, depth_b, n_layers))
    taking_b = running_b & (depth_b == layer)
    order_b = jnp.argsort(jnp.where(taking_b, 0, 1), stable=True).astype(jnp.int32)  # the sequences taking part first
    ms = s.method
    seg = jnp.searchsorted(starts, layer).astype(jnp.int32)
    s = run_segment(s, seg, taking_b, order_b, ms.visible_lbs if revival is None else revival.visible_lbs(ms.revival))
    layer = ends[seg]
    # kept out of the switch (its branches only move the cursors): a branch's operands are copied
    k, v = s.cache.k, s.cache.v
    no_kv = jnp.zeros((0,), k.dtype)
    can_exit = (head_of_depth[layer] >= 0) & jnp.any(taking_b & (s.method.win.n < window))
    branch = jnp.where(layer == n_layers, 2, can_exit.astype(jnp.int32))
    s = jax.lax.switch(branch, [lambda x, *_: x, try_exit, verify],
                       s._replace(cache=s.cache.replace(k=no_kv, v=no_kv), method=AdaState(s.method.win)), layer,
                       taking_b, order_b)
    s = s._replace(cache=s.cache.replace(k=k, v=v), steps=s.steps + 1, method=ms._replace(win=s.method.win))
    if revival is not None:  # the committed re-selection tokens revive pruned prompt tokens
      win, last_b = s.method.win, s.cache.lengths - 1
      token_b = jnp.take_along_axis(s.tokens_bs, jnp.maximum(last_b - win.prompt, 0)[:, None], axis=1)[:, 0]
      cache, revived = revival.revive(params, cfg, s.cache, ms.revival, token_b, last_b, win.revive_due)
      s = s._replace(cache=cache, method=s.method._replace(
          win=win._replace(revive_due=jnp.zeros_like(win.revive_due)), revival=revived))
    return s

  def cond(s: DecodeState) -> jax.Array:
    return jnp.any(active_b(s) & (s.new_b < stop_at))

  return jax.lax.while_loop(cond, body, state)


def select_heads(cfg: LlamaConfig, heads: ExitHeads, layers) -> ExitHeads:
  """The subset of `heads` at `layers` (each must have a trained head)."""
  layers = check_layers(cfg, layers)
  missing = sorted(set(layers) - set(heads.layers))
  if missing:
    raise HdjaxError(f"no exit head at layers {missing}; available: {list(heads.layers)}")
  return ExitHeads(layers, heads.t_idd[jnp.asarray([heads.layers.index(l) for l in layers])], heads.vocab_ids)


def _selected_heads(path: str, cfg: LlamaConfig, layers: tuple[int, ...] | None) -> ExitHeads:
  heads = load_heads(path, cfg)
  return select_heads(cfg, heads, layers or heads.layers)


def _ranked_identity(path: str, cfg: LlamaConfig, layers: tuple[int, ...]) -> ExitHeads:
  return dataclasses.replace(identity_heads(cfg, layers), vocab_ids=load_vocab(path, cfg))


def resolve_heads(lm: LoadedModel, request: GenerateRequest, ranked: bool = False) -> ExitHeads:
  """`heads`: an ExitHeads, a directory saved by `save_heads`, or "identity" (the original LM head; `ranked`: with
  the committed heads' vocabulary ranking); `head_layers`: which of them to use (default: DEFAULT_LAYERS for
  "identity" and the committed heads, else all). Heads read from a directory are read once per version of its
  files (`read_once`), so a request returns the same `ExitHeads` as the last one and `loop_heads` folds it once."""
  heads = request.option("heads", DEFAULT_HEADS_DIR)
  layers = request.option("head_layers")
  layers = None if layers is None else check_layers(lm.cfg, layers)
  if heads == "identity":
    if ranked:
      return read_once(_ranked_identity, DEFAULT_HEADS_DIR, lm.cfg, layers or DEFAULT_LAYERS)
    return identity_heads(lm.cfg, layers or DEFAULT_LAYERS)
  if isinstance(heads, str):
    return read_once(_selected_heads, heads, lm.cfg, layers or (DEFAULT_LAYERS if heads == DEFAULT_HEADS_DIR else None))
  if not isinstance(heads, ExitHeads):
    raise HdjaxError(f"option heads must be a directory, 'identity' or an ExitHeads, got {type(heads).__name__}")
  return select_heads(lm.cfg, heads, layers or heads.layers)


def window_stats(counters: Counters, head_layers: tuple[int, ...], new_tokens: int) -> dict:
  c = jax.device_get(counters)
  evals, exits = np.asarray(c.head_evals_i), np.asarray(c.exits_i)
  early = int(np.sum(exits))
  checked = int(c.accepted) + int(c.rejections)
  return dict(
      head_layers=list(head_layers), head_evals=evals.tolist(), exits=exits.tolist(),
      exit_rate_per_layer={str(l): float(x / max(e, 1)) for l, x, e in zip(head_layers, exits, evals)},
      early_tokens=early, early_accepted=int(c.accepted), rejections=int(c.rejections),
      rejection_rate=float(int(c.rejections) / max(checked, 1)),
      early_exit_rate=float(int(c.accepted) / max(new_tokens, 1)),
      verifications=int(c.verifications), mean_pending_depth=float(int(c.pending) / max(int(c.verifications), 1)),
      layer_steps=int(c.layer_steps), loop_iterations=int(c.iterations),
      layer_tokens=np.asarray(c.layer_tokens_l).tolist(),
      mean_block_seqs=float(int(c.block_seqs) / max(int(c.layer_steps), 1)))


class _Folded(NamedTuple):
  params: Any  # the model's params when the heads were folded (a later `lm.params` folds again)
  heads: ExitHeads  # kept alive, so that its id in the key is not reused
  loop_heads: tuple[jax.Array, jax.Array | None]


_FOLDED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> {(id(heads), head_vocab): _Folded}
_FOLDED_PER_MODEL = 8  # head sets kept per model


def loop_heads(lm: LoadedModel, heads: ExitHeads, head_vocab: int) -> tuple[jax.Array, jax.Array | None]:
  """`adadecode_loop`'s (head_w, head_ids): the heads' [I, D, D] and None, or with `head_vocab` > 0 the reduced
  heads [I, N, D] and their candidate ids [N], folded once per model, params and head set (`read_once` returns
  the same `ExitHeads` until its files change)."""
  per_model = _FOLDED.setdefault(lm, {})
  key = (id(heads), head_vocab)
  folded = per_model.get(key)
  if folded is not None and folded.params is lm.params:
    return folded.loop_heads
  if head_vocab == 0:
    out = jnp.asarray(heads.t_idd, jnp.float32), None
  else:
    ids_n = candidate_ids(heads, head_vocab, lm.cfg.vocab_size)
    out = reduced_heads(lm.params, lm.cfg, heads.t_idd, ids_n), jnp.asarray(ids_n)
  if len(per_model) >= _FOLDED_PER_MODEL:
    per_model.clear()
  per_model[key] = _Folded(lm.params, heads, out)
  return out


@dataclasses.dataclass(frozen=True)
class AdaLoop(driver.DecodeLoop):
  """`adadecode_loop` as the driver runs it, after a prefill whose per-layer visibility (if any) masks it, or
  whose pruned tokens `revival` revives."""

  heads: ExitHeads
  options: AdaDecodeConfig
  head_w: jax.Array  # `loop_heads`
  head_ids: jax.Array | None
  revival: Revival | None = None

  @property
  def extra_slots(self) -> int:
    return self.options.max_pending + 1  # the window

  def start(self, lm: LoadedModel, request: GenerateRequest, prefilled: Prefilled, first_b: jax.Array,
            key: jax.Array) -> DecodeState:
    state = initial_state(lm.params, lm.cfg, prefilled.cache, first_b, row_keys(key, first_b.shape[0]),
                        jnp.int32(request.max_new_tokens), len(self.heads.layers), self.extra_slots,
                        ar.next_pow2(request.max_new_tokens))
    if self.revival is not None:
      return state._replace(method=state.method._replace(revival=self.revival.start(prefilled)))
    return state._replace(method=state.method._replace(visible_lbs=prefilled.visible_lbs))

  def run(self, lm: LoadedModel, request: GenerateRequest, state: DecodeState, stop_at: jax.Array) -> DecodeState:
    return adadecode_loop(lm.params, lm.cfg, self.head_w, self.head_ids, self.heads.layers,
                          jnp.float32(self.options.gamma), jnp.bool_(self.options.verify), state,
                          jnp.int32(request.max_new_tokens), stop_at, request.sampling,
                          self.options.in_step and state.done_b.shape[0] > 1, self.revival)

  def room(self, state: DecodeState) -> jax.Array:
    return jnp.any(~state.done_b & (state.cache.lengths + self.extra_slots <= state.cache.num_slots))

  def report(self, state: DecodeState) -> tuple[Window, Any]:
    ms = state.method
    return (ms.win._replace(h_wd=None),
            None if self.revival is None else self.revival.report(ms.revival))

  def row_stats(self, report, b: int, new_tokens: int) -> dict:
    win, revival_report = report
    verifications = int(win.counters.verifications[b])
    return dict(steps=verifications + 1, accept_lengths=[1] + win.accept_n[b, :verifications].tolist(),
                gamma=self.options.gamma, max_pending=self.options.max_pending, head_vocab=self.options.head_vocab,
                verify=self.options.verify, in_step=self.options.in_step,
                **window_stats(jax.tree.map(lambda x: x[b], win.counters), self.heads.layers, new_tokens),
                **({} if self.revival is None else self.revival.row_stats(revival_report, b)))


def adadecode_generate(lm: LoadedModel, request: GenerateRequest, method: str, prefill: Prefill = full_prefill,
                       revival: Revival | None = None) -> list[GenerationResult]:
  """AdaDecode after `prefill` (reviving its pruned tokens with `revival`), through the driver. Options: heads
  (see `resolve_heads`), head_layers (with heads="identity") and `AdaDecodeConfig`'s."""
  options = AdaDecodeConfig.from_request(request)
  heads = resolve_heads(lm, request, ranked=options.head_vocab > 0)
  loop = AdaLoop(heads, options, *loop_heads(lm, heads, options.head_vocab), revival)
  return driver.generate(lm, request, method, loop, prefill)


register_method("adadecode")(functools.partial(adadecode_generate, method="adadecode"))
