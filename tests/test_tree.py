"""Draft trees and acceptance rules against independent NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from hdjax.config import EngineLayout
from hdjax.decoding.tree import (build_tree, bucket_for, engine_buckets, engine_tree, merge_chains, pad_tree,
                                 stack_trees)
from hdjax.decoding.verify import greedy_accept, trusted_nodes


def test_merge_shares_prefixes_and_respects_budget_and_depth():
  chains = [[1, 2, 3], [1, 2, 4], [1, 5], [6, 7, 8, 9]]
  nodes = merge_chains(chains, max_nodes=6, max_depth=3)
  # (token, parent): 1<-root, 2<-1, 3<-2, 4<-2, 5<-1, 6<-root (budget 6 cuts 7, 8)
  assert nodes == [(1, 0), (2, 1), (3, 2), (4, 2), (5, 1), (6, 0)]
  assert merge_chains([[1, 2, 3, 4]], max_nodes=10, max_depth=2) == [(1, 0), (2, 1)]
  assert merge_chains([[1, 2], [1, 2], [1]], max_nodes=10, max_depth=4) == [(1, 0), (2, 1)]


def test_tree_arrays_and_padding():
  tree = build_tree(9, [[1, 2], [1, 3], [4]], num_nodes=8, max_depth=4)
  np.testing.assert_array_equal(tree.tokens, [9, 1, 2, 3, 4, 0, 0, 0])
  np.testing.assert_array_equal(tree.parents, [0, 0, 1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(tree.depths, [0, 1, 2, 2, 1, 0, 0, 0])
  np.testing.assert_array_equal(tree.valid, [1, 1, 1, 1, 1, 0, 0, 0])
  expected = np.eye(8, dtype=bool)
  for child, ancestors in {1: [0], 2: [0, 1], 3: [0, 1], 4: [0]}.items():
    expected[child, ancestors] = True
  np.testing.assert_array_equal(tree.ancestors, expected)
  assert tree.num_real == 5
  assert bucket_for(5, (1, 4, 8, 16)) == 8 and bucket_for(1, (1, 4, 8)) == 1 and bucket_for(30, (1, 4, 8)) == 8
  rows = lambda n, one_shape=False: EngineLayout(row_multiple=n, one_step_shape=one_shape)
  assert engine_buckets((1, 4, 8), rows(8)) == (8,) and engine_buckets((1, 4, 8, 16), rows(8)) == (8, 16)
  assert engine_buckets((1, 4, 8), rows(1)) == (1, 4, 8) and engine_buckets((1, 9), rows(4)) == (4, 12)
  # an accelerator runs one step shape: one bucket, the row count, whatever the method asked for
  assert engine_buckets((1, 4, 8), rows(16, True)) == (16,) and engine_buckets((1, 32), rows(16, True)) == (16,)


def reference_greedy(tokens, parents, valid, target, trusted=None):
  """Walk from the root, following the (unique) child that matches the argmax at each node; at an untrusted node
  stop without a bonus token (its own token, already emitted, is the last)."""
  trusted = valid if trusted is None else trusted
  cur, out = 0, []
  while True:
    if not trusted[cur]:
      return out
    nxt = [j for j in range(1, len(tokens)) if valid[j] and parents[j] == cur and tokens[j] == target[cur]]
    if not nxt:
      return out + [int(target[cur])]
    cur = nxt[0]
    out.append(int(tokens[cur]))


chains_strategy = st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=5), max_size=8)


@settings(max_examples=60, deadline=None)
@given(chains=chains_strategy, target=st.lists(st.integers(0, 5), min_size=16, max_size=16),
       num_nodes=st.sampled_from([1, 4, 8, 16]), untrusted=st.sets(st.integers(1, 15)))
def test_greedy_accept_matches_reference(chains, target, num_nodes, untrusted):
  tree = build_tree(3, chains, num_nodes, max_depth=4)
  target = np.asarray(target[:num_nodes], np.int32)
  trusted = tree.valid & ~np.isin(np.arange(num_nodes), list(untrusted))
  acc = jax.jit(greedy_accept, static_argnames="max_depth")(
      tree.tokens, tree.parents, tree.depths, tree.valid, tree.ancestors, target, max_depth=4, trusted_t=trusted)
  expected = reference_greedy(tree.tokens, tree.parents, tree.valid, target, trusted)
  n = int(acc.num_accepted)
  assert n == len(expected) - 1
  assert [int(t) for t in acc.tokens_d1[:n + 1]] == expected
  path = [int(p) for p in acc.path_d1[:n + 1]]
  assert path[0] == 0 and all(tree.parents[path[d + 1]] == path[d] for d in range(n))
  assert all(trusted[p] for p in path), "a committed node must be trusted"


def test_trusted_nodes_are_those_read_in_the_same_attention_block():
  """Node 3 (depth 2, under node 1) and node 4 (depth 1) sit 1 and 3 slots past where they will be committed: with
  the cache at 252 of 512 slots (blocks of 128), node 4's tree slot 256 is in the next block, so it and nothing
  else is untrusted; at 100 every node is trusted, and in a one-block cache too (260 slots: not a multiple of the
  block). With a span of one slot (GPU, TPU) only the first chain (nodes 0-2, each at its committed slot) is."""
  tree = stack_trees([build_tree(9, [[1, 2], [1, 3], [4, 5]], num_nodes=8, max_depth=4)])
  tree = jax.tree.map(jnp.asarray, tree)
  at = lambda length, slots, span=128: np.asarray(trusted_nodes(tree, jnp.asarray([length]), slots, span))[0]
  np.testing.assert_array_equal(at(100, 512), [1, 1, 1, 1, 1, 1, 0, 0])
  np.testing.assert_array_equal(at(252, 512), [1, 1, 1, 1, 0, 0, 0, 0])  # node 5 is under node 4
  np.testing.assert_array_equal(at(252, 260), [1, 1, 1, 1, 1, 1, 0, 0])
  for length in (100, 252):
    np.testing.assert_array_equal(at(length, 512, 1), [1, 1, 1, 0, 0, 0, 0, 0])


def test_pad_tree_appends_padding_nodes():
  chains = [[5, 6, 7], [5, 8], [9]]
  small = stack_trees([build_tree(3, chains, 6, 4), build_tree(4, chains[:1], 6, 4)])
  padded = pad_tree(jax.tree.map(jnp.asarray, small), 8)
  # the same chains built into 8 nodes fill only 6 of them: the same arrays
  built = stack_trees([build_tree(3, chains, 8, 4), build_tree(4, chains[:1], 8, 4)])
  for name in ("tokens", "parents", "depths", "valid", "ancestors"):
    np.testing.assert_array_equal(np.asarray(getattr(padded, name)), getattr(built, name), err_msg=name)
  assert pad_tree(padded, 8) is padded and pad_tree(padded, 3).num_nodes == 9


def test_engine_tree_is_one_shape_on_an_accelerator():
  """With one step shape a tree is cut or padded to exactly the row count (parents precede children, so the cut
  keeps a tree); otherwise padded to a multiple of it."""
  chains = [[5, 6, 7], [5, 8], [9]]
  tree = jax.tree.map(jnp.asarray, stack_trees([build_tree(3, chains, 8, 4)]))
  one_shape = engine_tree(tree, EngineLayout(row_multiple=4, one_step_shape=True))
  np.testing.assert_array_equal(one_shape.tokens, [[3, 5, 6, 7]])
  np.testing.assert_array_equal(one_shape.ancestors[0], np.tril(np.ones((4, 4), bool)))
  assert engine_tree(tree, EngineLayout(row_multiple=16, one_step_shape=True)).num_nodes == 16
  assert engine_tree(tree, EngineLayout(row_multiple=3)).num_nodes == 9
