"""Lossless acceptance of one draft tree (jittable, one sequence; vmap over the batch), and `verify_tree`: the
whole verify step (model call, acceptance, commit) as one traceable function.

Greedy and sampled steps accept by one rule, `greedy_accept`, against each node's target token: its logits' argmax,
or when sampling its sample under the noise of the token's position (`sampling.sample_tokens`), the token `ar`
draws there. It returns `Accepted(path_d1, num_accepted, tokens_d1)`: path_d1[d] is the accepted node at depth d
(path_d1[0] = root), `num_accepted` the number of accepted draft nodes n, and tokens_d1[:n + 1] the tokens the
step emits: the n accepted draft tokens then the bonus token drawn at the deepest accepted node.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from hdjax import model
from hdjax.exit_heads import head_logits
from hdjax.attention import causal_mask, key_block_of, prefix_plus_block_mask
from hdjax.config import LlamaConfig
from hdjax.decoding.sampling import SamplingConfig, position_keys, row_keys, sample_tokens
from hdjax.decoding.tree import DraftTree, engine_tree
from hdjax.kvcache import KVCache, commit_rows


class Accepted(NamedTuple):
  path_d1: jax.Array  # [D + 1] int32 node indices; entries past num_accepted are meaningless
  num_accepted: jax.Array  # int32 scalar
  tokens_d1: jax.Array  # [D + 1] int32


def _path_of(deepest: jax.Array, depths_t: jax.Array, ancestors_tt: jax.Array, max_depth: int) -> jax.Array:
  """Node index at each depth 0..max_depth on the root-to-`deepest` path."""
  on_path_t = ancestors_tt[deepest]
  at_depth_dt = on_path_t[None, :] & (depths_t[None, :] == jnp.arange(max_depth + 1)[:, None])
  return jnp.argmax(at_depth_dt, axis=1).astype(jnp.int32)


def _emitted(tokens_t: jax.Array, path_d1: jax.Array, num: jax.Array, bonus: jax.Array) -> jax.Array:
  drafted_d1 = jnp.concatenate([tokens_t[path_d1[1:]], jnp.zeros((1,), jnp.int32)])
  return drafted_d1.at[num].set(bonus)


def greedy_accept(tokens_t: jax.Array, parents_t: jax.Array, depths_t: jax.Array, valid_t: jax.Array,
                  ancestors_tt: jax.Array, target_t: jax.Array, max_depth: int, trusted_t: jax.Array | None = None
                  ) -> Accepted:
  """Longest path whose every draft token equals the target argmax `target_t` at its parent.

  In a trie each parent has at most one matching child, so the accepted nodes form a single path. Only the
  `trusted_t` nodes' targets are used (default: all): a match below an untrusted node is not looked at, and when
  the deepest accepted node is untrusted its token (chosen by its trusted parent) is the step's last token, in
  place of a bonus token, so the node itself is not committed.
  """
  trusted_t = valid_t if trusted_t is None else trusted_t
  match_t = valid_t & (tokens_t == target_t[parents_t]) & trusted_t[parents_t]
  accepted_t = jnp.zeros_like(valid_t).at[0].set(True)
  for _ in range(max_depth):
    accepted_t = accepted_t.at[1:].set((match_t & accepted_t[parents_t])[1:])
  deepest = jnp.argmax(jnp.where(accepted_t, depths_t, -1))
  num = depths_t[deepest] - (~trusted_t[deepest]).astype(jnp.int32)
  path_d1 = _path_of(deepest, depths_t, ancestors_tt, max_depth)
  last = jnp.where(trusted_t[deepest], target_t[deepest], tokens_t[deepest])
  return Accepted(path_d1, num, _emitted(tokens_t, path_d1, num, last))


def trusted_nodes(tree: DraftTree, lengths_b: jax.Array, num_slots: int, exact_span: int) -> jax.Array:
  """[B, T] tree nodes whose logits are bitwise a decode step's for the same tokens (when decode and verify are
  one program, `cfg.bitwise_steps`). A node attends to its ancestors at their tree slots (lengths + index), not
  at the slots they get once committed (lengths + depth); attention gives the same result for the same keys in
  the same order with masked slots between them as long as each key stays within its span of `exact_span` slots
  (`EngineLayout.exact_span`). So a node is trusted when every ancestor-or-self has its tree slot and its committed
  slot in one span: on CPU (a span is an attention block) always, unless the tree straddles a block boundary; on
  GPU and TPU (a span is one slot) when the node and its ancestors are the tree's first chain."""
  index_bt = lengths_b[:, None] + jnp.arange(tree.num_nodes)
  same_block_bt = (key_block_of(index_bt, num_slots, exact_span)
                   == key_block_of(lengths_b[:, None] + tree.depths, num_slots, exact_span))
  return tree.valid & ~jnp.any(tree.ancestors & ~same_block_bt[:, None, :], axis=-1)


class Verified(NamedTuple):
  tokens_bd: jax.Array  # [B, max_depth + 1] emitted tokens; the first num_b + 1 are real
  num_b: jax.Array  # [B] accepted draft tokens (0 for inactive rows)
  cache: KVCache  # root and accepted path committed


def verify_tree(params, cfg: LlamaConfig, cache: KVCache, tree: DraftTree, active_b: jax.Array, key: jax.Array,
                emitted_b: jax.Array, sampling: SamplingConfig, max_depth: int, visible_lbs: jax.Array | None = None,
                head_layer: int | None = None, root_h_bd: jax.Array | None = None) -> Verified:
  """One verify step, traceable (the host loop's jitted `verify_step` and the device loop both call it).

  Runs the [B, T] trees at slots lengths + i, RoPE positions lengths + depth, accepts the longest path whose tokens
  are their parents' targets (a node at depth d draws with the noise of emitted token `emitted_b + d` under the
  request's `key`) and commits the root and the accepted path.
  Inactive rows write and commit nothing. `visible_lbs` restricts each layer to the slots that hold K/V there
  (after a pruned prefill). With `head_layer`, the roots resume from `root_h_bd` at that layer (their K/V below
  it is already in the cache) and the draft nodes run layers [0, head_layer) first.
  The tree is padded to a multiple of `cfg.engine.row_multiple` nodes (cut or padded to exactly that many with
  `one_step_shape`), so every verify step and every decode step (`autoregressive.decode_one`) is the same program
  over the same rows: on XLA:CPU bf16 that is what keeps a node's logits bitwise equal to the decode step's for
  the same token (a step padded inside the model fuses differently and rounds differently), and on a GPU, whose
  libraries pick a kernel per shape, one shape is what makes it hold. Nodes that would fall past the cache's last
  slot count as padding.
  """
  tree = engine_tree(tree, cfg.engine)
  batch, num_nodes = tree.tokens.shape
  lengths_b = cache.lengths
  offsets_bt = jnp.broadcast_to(jnp.arange(num_nodes, dtype=jnp.int32), (batch, num_nodes))
  tree = dataclasses.replace(tree, valid=tree.valid & (lengths_b[:, None] + offsets_bt < cache.num_slots))
  slots_bt = jnp.where(active_b[:, None] & tree.valid, lengths_b[:, None] + offsets_bt, cache.num_slots)
  positions_bt = lengths_b[:, None] + tree.depths
  mask_bts = prefix_plus_block_mask(lengths_b, tree.ancestors, cache.num_slots)
  if head_layer is None:
    logits_btv, cache = model.step_logits(params, cfg, tree.tokens, positions_bt, mask_bts, cache, slots_bt,
                                          visible_lbs)
  else:
    h_btd = root_h_bd[:, None]
    if num_nodes > 1:  # draft nodes catch up with the root: layers [0, l)
      below = model.run_layers(params, cfg, model.embed(params, cfg, tree.tokens[:, 1:]), positions_bt[:, 1:],
                               mask_bts[:, 1:], cache, slots_bt[:, 1:], 0, head_layer, visible_lbs=visible_lbs)
      h_btd, cache = jnp.concatenate([h_btd, below.h_btd], axis=1), below.cache
    above = model.run_layers(params, cfg, h_btd, positions_bt, mask_bts, cache, slots_bt, head_layer,
                             visible_lbs=visible_lbs)
    logits_btv, cache = model.unembed(params, cfg, above.h_btd), above.cache
  keys_bt = position_keys(row_keys(key, batch), emitted_b[:, None] + tree.depths)
  target_bt = sample_tokens(logits_btv, keys_bt, sampling)
  trusted_bt = (trusted_nodes(tree, lengths_b, cache.num_slots, cfg.engine.exact_span) if cfg.bitwise_steps
                else tree.valid)
  acc = jax.vmap(functools.partial(greedy_accept, max_depth=max_depth))(
      tree.tokens, tree.parents, tree.depths, tree.valid, tree.ancestors, target_bt, trusted_t=trusted_bt)
  num_b = jnp.where(active_b, acc.num_accepted, 0)
  cache = commit_rows(cache, lengths_b[:, None] + acc.path_d1, jnp.where(active_b, num_b + 1, 0))
  return Verified(acc.tokens_d1, num_b, cache)


def head_draft(params, cfg: LlamaConfig, cache: KVCache, root_b: jax.Array, active_b: jax.Array, head_layer: int,
               t_dd: jax.Array, visible_lbs: jax.Array | None = None, sampling: SamplingConfig = SamplingConfig(),
               key: jax.Array | None = None, index_b: jax.Array | None = None
               ) -> tuple[KVCache, jax.Array, jax.Array]:
  """Runs each active row's root (the next token, not yet cached) through layers [0, head_layer) at slot
  `lengths`. Returns the cache with those K/V rows, the root's state [B, D] and the head's draft [B] of the token
  after the root: its argmax, or when sampling its sample under the noise that token (emitted token `index_b`
  under `key`) gets at verification, so the draft is the verify step's target whenever head and model agree."""
  positions_b1 = cache.lengths[:, None]
  slots_b1 = jnp.where(active_b[:, None], positions_b1, cache.num_slots)
  below = model.run_layers(params, cfg, model.embed(params, cfg, root_b[:, None]), positions_b1,
                           causal_mask(positions_b1, cache.num_slots), cache, slots_b1, 0, head_layer,
                           visible_lbs=visible_lbs)
  keys_b = None if sampling.greedy else position_keys(row_keys(key, root_b.shape[0]), index_b)
  draft_b = sample_tokens(head_logits(params, cfg, t_dd, below.h_btd)[:, 0], keys_b, sampling)
  return below.cache, below.h_btd[:, 0], draft_b


# the first head draft of a request, after its prefill
start_head = functools.partial(jax.jit, static_argnames=("cfg", "head_layer", "sampling"),
                               donate_argnames=("cache",))(head_draft)
