"""The cost-aware tree size policy: tries unmeasured buckets, then picks the best tokens per second per regime."""

from __future__ import annotations

import pytest

from hdjax.decoding.tree_policy import TreeSizePolicy
from hdjax.drafting.hierarchy import HierarchyDrafter
from tests.conftest import make_tiny_lm

COST_S = {1: 1.0, 4: 1.6, 8: 2.0}
TOKENS = {(True, 4): 2.5, (True, 8): 3.4, (False, 4): 1.1, (False, 8): 1.2}


def _trained(explore_every=0):
  policy = TreeSizePolicy((1, 4, 8), explore_every)
  for _ in range(30):
    for streak in (False, True):
      bucket = policy.choose(8, streak)
      policy.update(bucket, streak, TOKENS.get((streak, bucket), 1.0), COST_S[bucket])
  return policy


def test_unmeasured_buckets_are_tried_largest_first():
  policy = TreeSizePolicy((1, 4, 8), explore_every=0)
  tried = []
  for _ in range(3):
    tried.append(policy.choose(8, False))
    policy.update(tried[-1], False, 1.0, COST_S[tried[-1]])
  assert tried == [8, 4, 1]


def test_picks_the_best_tokens_per_second_in_each_regime():
  policy = _trained()
  assert policy.choose(8, True) == 8  # 3.4 tokens / 2.0 s beats 2.5 / 1.6 and 1 / 1
  assert policy.choose(8, False) == 1  # misses follow misses: a plain decode step is cheapest per token
  assert policy.choose(4, True) == 4  # never larger than the drafted tree
  assert policy.choose(1, True) == 1


def test_exploration_takes_the_largest_bucket_periodically():
  policy = _trained(explore_every=5)
  picks = [policy.choose(8, False) for _ in range(10)]
  assert picks.count(8) == 2 and picks.count(1) == 8


class _Fixed:
  name = "fixed"

  def __init__(self, chains):
    self.chains = chains

  def draft(self, context, max_chains, depth):
    return self.chains[:max_chains]


def test_hierarchy_asks_sources_in_order_and_reports_the_first_tier():
  hd = HierarchyDrafter([_Fixed([]), _Fixed([[1, 2], [1, 2]]), _Fixed([[3], [4], [5]])], max_nodes=4)
  assert hd.draft([0], max_chains=7, depth=4) == [[1, 2], [3], [4]]  # duplicate dropped; stops at 4 nodes
  assert hd.first_tier == 1
  assert HierarchyDrafter([_Fixed([])], max_nodes=4).draft([0], 7, 4) == []


@pytest.mark.slow  # a host-loop option; the policy's choices are unit-tested above
def test_adaptive_generation_stays_lossless():
  lm = make_tiny_lm()
  prompts = [[5, 6, 7, 8, 9, 10] * 6, [3, 1, 4, 1, 5, 9, 2, 6]]
  want = lm.generate(prompts, method="ar", max_new_tokens=30)
  got = lm.generate(prompts, method="pld", max_new_tokens=30, adaptive=True, explore_every=4)
  for w, g in zip(want, got):
    assert g.token_ids == w.token_ids
    assert sum(g.stats["bucket_counts"].values()) == g.stats["steps"] - 1
  assert len(got[0].stats["bucket_counts"]) > 1  # the policy tried more than one tree size
