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

  def start(self, prompt: Sequence[int]) -> None:
    for s in self.sources:
      s.start(prompt)

  def extend(self, tokens: Sequence[int]) -> None:
    for s in self.sources:
      s.extend(tokens)

  def draft(self, context: Sequence[int], max_chains: int, depth: int) -> list[list[int]]:
    chains: list[list[int]] = []
    prefixes: set[tuple[int, ...]] = set()
    for source in self.sources:
      for chain in source.draft(context, max_chains - len(chains), depth):
        new = {tuple(chain[:i]) for i in range(1, len(chain) + 1)} - prefixes
        if new:
          chains.append(list(chain))
          prefixes |= new
        if len(chains) >= max_chains or len(prefixes) >= self.max_nodes:
          return chains
    return chains

  def finish(self) -> None:
    for s in self.sources:
      s.finish()


def device_hierarchy_one(sources: Sequence, max_chains: int, max_nodes: int):
  """`HierarchyDrafter.draft` inside a jit, for one sequence, over its sources' chains already drafted: `sources`
  are [C_s, depth] arrays (best first, -1 padded; a chain ends at its first -1), each the source's answer for
  `max_chains` chains (a source asked for fewer returns a prefix of that list: `select_chains` and the n-gram
  drafters stop early). Returns the chains [max_chains, depth] in the order the host collects them, -1 padded,
  and how many each source gave [S].

  The host rule: source s is asked for `max_chains - collected` chains; each of them is kept when it adds a new
  prefix (a chain's prefixes are new exactly when the whole chain is not a prefix of a kept chain; it adds
  `length - longest common prefix with a kept chain` of them); drafting stops once `max_chains` chains or
  `max_nodes` distinct prefixes are collected."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  depth = sources[0].shape[1]
  out_cd = jnp.full((max_chains, depth), -1, jnp.int32)
  num = jnp.int32(0)
  prefixes = jnp.int32(0)
  stopped = jnp.bool_(False)
  counts = []
  for chains_cd in sources:
    asked = max_chains - num
    given = jnp.int32(0)
    for i in range(chains_cd.shape[0]):
      chain_d = chains_cd[i].astype(jnp.int32)
      real_d = jnp.cumprod(chain_d >= 0).astype(bool)
      length = jnp.sum(real_d)
      common = jnp.max(jnp.sum(jnp.cumprod((out_cd == chain_d[None, :]) & real_d[None, :], axis=1), axis=1))
      seen = (i < asked) & (length > 0) & ~stopped
      keep = seen & (length > common)
      out_cd = out_cd.at[jnp.where(keep, num, max_chains)].set(jnp.where(real_d, chain_d, -1), mode="drop")
      num += keep
      given += keep
      prefixes += jnp.where(keep, length - common, 0)
      stopped |= seen & ((num >= max_chains) | (prefixes >= max_nodes))
    counts.append(given)
  return out_cd, jnp.stack(counts)
