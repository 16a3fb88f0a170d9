"""Static-shape draft trees: candidate chains merged into one prefix tree with a fixed node count.

Node 0 is the root: the last accepted token, which is not yet in the cache. Nodes are stored in insertion
order, so a parent always comes before its children. Padding nodes have `valid == False`, are their own
only ancestor, and can never be accepted.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hdjax.config import EngineLayout


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftTree:
  """Arrays of one tree (shape [T]) or a batch of trees (shape [B, T]); a pytree, so it can enter a jit."""

  tokens: np.ndarray  # int32 token of each node (padding: 0)
  parents: np.ndarray  # int32 parent node index (root and padding: 0)
  depths: np.ndarray  # int32 distance from the root (padding: 0)
  valid: np.ndarray  # bool, False for padding
  ancestors: np.ndarray  # bool [..., T, T]: ancestors[i, j] = j is i or an ancestor of i

  @property
  def num_nodes(self) -> int:
    return self.tokens.shape[-1]

  @property
  def num_real(self) -> int:
    return int(self.valid.sum())


def merge_chains(chains: Sequence[Sequence[int]], max_nodes: int, max_depth: int) -> list[tuple[int, int]]:
  """Merges chains (best first) into a trie; returns (token, parent) per draft node, root excluded.

  Shared prefixes are stored once; chains are cut at `max_depth` and the trie at `max_nodes` draft nodes.
  """
  nodes: list[tuple[int, int]] = []
  child_of: dict[tuple[int, int], int] = {}  # (parent index, token) -> node index (root = 0)
  for chain in chains:
    parent = 0
    for tok in list(chain)[:max_depth]:
      key = (parent, int(tok))
      if key not in child_of:
        if len(nodes) >= max_nodes:
          break
        nodes.append(key[::-1])
        child_of[key] = len(nodes)
      parent = child_of[key]
  return nodes


def build_tree(root: int, chains: Sequence[Sequence[int]], num_nodes: int, max_depth: int) -> DraftTree:
  """One tree of exactly `num_nodes` nodes (root + up to num_nodes - 1 draft nodes + padding)."""
  drafts = merge_chains(chains, num_nodes - 1, max_depth)
  tokens = np.zeros(num_nodes, np.int32)
  parents = np.zeros(num_nodes, np.int32)
  depths = np.zeros(num_nodes, np.int32)
  valid = np.zeros(num_nodes, bool)
  ancestors = np.eye(num_nodes, dtype=bool)
  tokens[0], valid[0] = root, True
  for i, (tok, parent) in enumerate(drafts, start=1):
    tokens[i], parents[i], depths[i], valid[i] = tok, parent, depths[parent] + 1, True
    ancestors[i] |= ancestors[parent]
  return DraftTree(tokens, parents, depths, valid, ancestors)


def bucket_for(num_real: int, buckets: Sequence[int]) -> int:
  """The smallest bucket holding `num_real` nodes (root included), else the largest bucket."""
  fitting = [b for b in sorted(buckets) if b >= num_real]
  return fitting[0] if fitting else max(buckets)


def engine_buckets(buckets: Sequence[int], engine: EngineLayout) -> tuple[int, ...]:
  """Node counts rounded up to the engine's row multiple (a step runs that many rows whatever its tree holds), equal
  ones merged: on a bf16 CPU engine (8 rows) buckets 1, 4 and 8 are one compiled verify, not three alike. With
  `engine.one_step_shape` (GPU, TPU) one count, the row multiple: every step verifies one tree size, and a
  speculative step has no branch to choose."""
  rows = engine.row_multiple
  if engine.one_step_shape:
    return (rows,)
  return tuple(sorted({-(-int(b) // rows) * rows for b in buckets}))


def stack_trees(trees: Sequence[DraftTree]) -> DraftTree:
  """Batches trees of equal node count into [B, T] arrays."""
  return DraftTree(*(np.stack([getattr(t, f.name) for t in trees]) for f in dataclasses.fields(DraftTree)))


def device_tree(root: jax.Array, chains_cd: jax.Array, num_nodes: int, max_depth: int) -> DraftTree:
  """`build_tree` inside a jit, for one sequence: chains [C, depth] (best first, padded with -1; a chain ends at
  its first -1) merged into a prefix tree of exactly `num_nodes` nodes. The same arrays as `build_tree`.

  A draft node is a distinct chain prefix. Prefix (c, d) (chain c's first d + 1 tokens) is new when no earlier
  chain has it; new prefixes take node indices in (chain, depth) order until the budget of num_nodes - 1 is
  full, which is the order `merge_chains` inserts them in.
  """
  num_chains = chains_cd.shape[0]
  depth = min(chains_cd.shape[1], max_depth)
  chains_cd = chains_cd[:, :depth].astype(jnp.int32)
  if num_chains == 0 or depth == 0 or num_nodes == 1:
    return _padded_tree(root, num_nodes)
  has_cd = jnp.cumprod(chains_cd >= 0, axis=1).astype(bool)  # a chain ends at its first padding token
  # same_dcc[d, c, c']: chains c and c' share their first d + 1 tokens
  same_dcc = jnp.cumprod(chains_cd.T[:, :, None] == chains_cd.T[:, None, :], axis=0).astype(bool)
  first_cd = jnp.argmax(same_dcc, axis=2).T.astype(jnp.int32)  # earliest chain holding prefix (c, d)
  new_cd = has_cd & (first_cd == jnp.arange(num_chains)[:, None])
  rank_cd = (jnp.cumsum(new_cd.reshape(-1)) - 1).reshape(num_chains, depth)
  kept_cd = new_cd & (rank_cd < num_nodes - 1)
  node_cd = jnp.where(kept_cd, rank_cd + 1, 0)  # node index of each new, kept prefix
  # every prefix (new or not) maps to the node of its first holder; 0 where not in the tree
  node_of_cd = jnp.where(has_cd, node_cd[first_cd, jnp.arange(depth)[None, :]], 0)
  parent_cd = jnp.concatenate([jnp.zeros((num_chains, 1), jnp.int32), node_of_cd[:, :-1]], axis=1)
  dest = jnp.where(kept_cd, node_cd, num_nodes).reshape(-1)  # out of range: dropped
  depth_cd = jnp.broadcast_to(jnp.arange(1, depth + 1, dtype=jnp.int32), (num_chains, depth))
  tree = _padded_tree(root, num_nodes)
  tokens = tree.tokens.at[dest].set(chains_cd.reshape(-1), mode="drop")
  parents = tree.parents.at[dest].set(parent_cd.reshape(-1), mode="drop")
  depths = tree.depths.at[dest].set(depth_cd.reshape(-1), mode="drop")
  valid = tree.valid.at[dest].set(True, mode="drop")
  eye = jnp.eye(num_nodes, dtype=bool)
  ancestors = eye
  for _ in range(depth):  # parents precede children: depth rounds reach the root from every node
    ancestors = eye | (ancestors[parents] & (valid & (jnp.arange(num_nodes) > 0))[:, None])
  return DraftTree(tokens, parents, depths, valid, ancestors)


def _padded_tree(root: jax.Array, num_nodes: int) -> DraftTree:
  """A root and num_nodes - 1 padding nodes (jnp arrays)."""
  return DraftTree(jnp.zeros((num_nodes,), jnp.int32).at[0].set(jnp.asarray(root, jnp.int32)),
                   jnp.zeros((num_nodes,), jnp.int32), jnp.zeros((num_nodes,), jnp.int32),
                   jnp.zeros((num_nodes,), bool).at[0].set(True), jnp.eye(num_nodes, dtype=bool))


def pad_tree(tree: DraftTree, multiple: int) -> DraftTree:
  """A batch of trees [B, T] (jax arrays) with padding nodes appended up to a multiple of `multiple` nodes."""
  extra = -tree.num_nodes % multiple
  if not extra:
    return tree
  batch, t = tree.tokens.shape
  pad = lambda x, value: jnp.concatenate([x, jnp.full((batch, extra), value, x.dtype)], axis=1)
  eye_tt = jnp.eye(t + extra, dtype=bool)
  ancestors = eye_tt[None].repeat(batch, 0).at[:, :t, :t].set(tree.ancestors)
  return DraftTree(pad(tree.tokens, 0), pad(tree.parents, 0), pad(tree.depths, 0), pad(tree.valid, False),
                   ancestors)


def engine_tree(tree: DraftTree, engine: EngineLayout) -> DraftTree:
  """A batch of trees [B, T] as the engine's step runs it: padded to a multiple of its row multiple, or with
  `one_step_shape` cut or padded to exactly that many nodes."""
  if engine.one_step_shape:
    tree = truncate_tree(tree, engine.row_multiple)
  return pad_tree(tree, engine.row_multiple)


def truncate_tree(tree: DraftTree, num_nodes: int) -> DraftTree:
  """The first `num_nodes` nodes of one tree [T] or a batch [B, T] (parents precede children, so this is still a
  tree); works on numpy and jax arrays."""
  return DraftTree(tree.tokens[..., :num_nodes], tree.parents[..., :num_nodes], tree.depths[..., :num_nodes],
                   tree.valid[..., :num_nodes], tree.ancestors[..., :num_nodes, :num_nodes])
