"""Hierarchy Drafting: ask the databases in order of temporal locality until the draft budget is filled."""

from __future__ import annotations

from typing import Sequence

from hdjax.drafting.base import Drafter


class HierarchyDrafter:
  """A `Drafter` that concatenates its sources' chains, in order, until `max_chains` distinct chains or
  `max_nodes` prefix-tree nodes are collected (a later source is asked only when an earlier one fell short).
  With no sources it drafts nothing (`hd+adadecode` with an empty `order`: the exit head alone drafts)."""

  def __init__(self, sources: Sequence[Drafter], max_nodes: int, name: str = "hd"):
    self.sources = list(sources)
    self.max_nodes = max_nodes
    self.name = name
    self.first_tier: int | None = None  # index of the source that gave the last draft's first chain

  def start(self, prompt: Sequence[int]) -> None:
    for s in self.sources:
      s.start(prompt)

  def extend(self, tokens: Sequence[int]) -> None:
    for s in self.sources:
      s.extend(tokens)

  def draft(self, context: Sequence[int], max_chains: int, depth: int) -> list[list[int]]:
    chains: list[list[int]] = []
    prefixes: set[tuple[int, ...]] = set()
    self.first_tier = None
    for tier, source in enumerate(self.sources):
      for chain in source.draft(context, max_chains - len(chains), depth):
        new = {tuple(chain[:i]) for i in range(1, len(chain) + 1)} - prefixes
        if new:
          chains.append(list(chain))
          prefixes |= new
          self.first_tier = tier if self.first_tier is None else self.first_tier
        if len(chains) >= max_chains or len(prefixes) >= self.max_nodes:
          return chains
    return chains

  def finish(self) -> None:
    for s in self.sources:
      s.finish()
