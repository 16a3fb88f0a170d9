"""Cost-aware tree size: each step verifies the bucket with the best measured tokens per second.

A verify step over T tree nodes costs more than a decode step on some devices (about 2x at T = 8 on a 2-core CPU,
about 1x on a GPU), so a full tree pays only when enough of it is accepted. The policy keeps, per request, an
exponential moving average of the verify wall time of each bucket and of the tokens each step emitted, the latter
split by regime: a hashable feature of the step that predicts acceptance. The speculative loop uses two features of
temporal locality: which tier of the hierarchy drafted first (the context database's matches are accepted far more
often than the statistics database's) and whether the previous step accepted a draft token (copying runs continue;
misses follow misses). It then picks the bucket, no larger than the drafted tree, with the best tokens / second.
A bucket never measured is tried first, and every `explore_every`-th step takes the largest bucket so that the
estimates follow the text. Bucket 1 (no drafts: a plain decode step) always emits 1 token.
The choice never changes the output: every bucket is verified losslessly.
"""

from __future__ import annotations

from typing import Hashable, Sequence


class TreeSizePolicy:
  """Host-side state of one request: `choose` before each verify step, `update` after it."""

  def __init__(self, buckets: Sequence[int], explore_every: int, decay: float = 0.8):
    self.buckets = tuple(sorted(buckets))
    self.explore_every = explore_every
    self.decay = decay
    self.cost_s: dict[int, float] = {}
    self.tokens: dict[tuple[Hashable, int], float] = {}
    self.steps = 0

  def choose(self, largest: int, regime: Hashable) -> int:
    """A bucket <= `largest` (the smallest bucket holding every drafted node) for a step in `regime`."""
    self.steps += 1
    candidates = [b for b in self.buckets if b <= largest]
    if self.explore_every and self.steps % self.explore_every == 0:
      return candidates[-1]
    unknown = [b for b in candidates if b not in self.cost_s or (b > 1 and (regime, b) not in self.tokens)]
    if unknown:
      return unknown[-1]
    return max(candidates, key=lambda b: self.tokens.get((regime, b), 1.0) / self.cost_s[b])

  def update(self, bucket: int, regime: Hashable, tokens_per_sequence: float, seconds: float) -> None:
    self._average(self.cost_s, bucket, seconds)
    if bucket > 1:
      self._average(self.tokens, (regime, bucket), tokens_per_sequence)

  def _average(self, table: dict, key, value: float) -> None:
    table[key] = value if key not in table else self.decay * table[key] + (1 - self.decay) * value
