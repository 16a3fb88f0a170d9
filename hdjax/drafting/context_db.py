"""The context-dependent database: n-grams of this request's own prompt and generated tokens.

An index from each n-gram (n in `key_sizes`) to the positions right after its occurrences, updated every step
as tokens arrive. A draft for the current context looks up the context's last n tokens (longest key first) and
proposes the tokens that followed earlier occurrences, most recent occurrence first, without duplicates.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Sequence


@dataclasses.dataclass(frozen=True)
class NgramConfig:
  key_sizes: tuple[int, ...] = (2, 1)  # tried in this order
  max_candidates: int = 7  # distinct continuations per key
  max_occurrences: int = 32  # most recent occurrences remembered per key


class NgramDrafter:
  """A `Drafter` over an incremental n-gram index of one sequence."""

  def __init__(self, config: NgramConfig = NgramConfig(), name: str = "context"):
    self.config = config
    self.name = name
    self._tokens: list[int] = []
    self._index: dict[tuple[int, ...], collections.deque] = {}

  def start(self, prompt: Sequence[int]) -> None:
    self._tokens = []
    self._index = {}
    self.extend(prompt)

  def extend(self, tokens: Sequence[int]) -> None:
    for tok in tokens:
      self._tokens.append(int(tok))
      end = len(self._tokens)
      for n in self.config.key_sizes:
        if end >= n:
          key = tuple(self._tokens[end - n:end])
          occurrences = self._index.get(key)
          if occurrences is None:
            occurrences = self._index[key] = collections.deque(maxlen=self.config.max_occurrences)
          occurrences.append(end)

  def draft(self, context: Sequence[int], max_chains: int, depth: int) -> list[list[int]]:
    """Continuations of the tokens seen so far (the index's own copy; `context` is the same sequence)."""
    del context
    tokens, end = self._tokens, len(self._tokens)
    chains: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    limit = min(max_chains, self.config.max_candidates)
    for n in self.config.key_sizes:
      if end < n:
        continue
      for start in reversed(self._index.get(tuple(tokens[end - n:end]), ())):
        chain = tuple(tokens[start:start + depth])
        if start >= end or chain in seen:
          continue
        seen.add(chain)
        chains.append(list(chain))
        if len(chains) >= limit:
          return chains
    return chains

  def finish(self) -> None:
    self._tokens = []
    self._index = {}


def context_drafter() -> NgramDrafter:
  """HD's context database: keys of the last 2 then 1 tokens, up to 7 candidates."""
  return NgramDrafter(NgramConfig(key_sizes=(2, 1), max_candidates=7), name="context")
