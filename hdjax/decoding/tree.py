"""Static-shape draft trees: candidate chains merged into one prefix tree with a fixed node count.

Node 0 is the root: the last accepted token, which is not yet in the cache. Nodes are stored in insertion
order, so a parent always comes before its children. Padding nodes have `valid == False`, are their own
only ancestor, and can never be accepted.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np


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


def stack_trees(trees: Sequence[DraftTree]) -> DraftTree:
  """Batches trees of equal node count into [B, T] arrays."""
  return DraftTree(*(np.stack([getattr(t, f.name) for t in trees]) for f in dataclasses.fields(DraftTree)))
