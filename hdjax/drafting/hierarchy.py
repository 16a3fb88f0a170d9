"""Hierarchy Drafting: ask the databases in order of temporal locality until the draft budget is filled."""

from __future__ import annotations

from typing import Sequence

from hdjax.drafting.base import Drafter

HD_SOURCES = "context,model,stats"  # HD's databases in the order it asks them: by temporal locality


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
  `max_nodes` distinct prefixes are collected.

  One source's chains are decided together, not one after another (a chain of dependent tiny ops is a chain of
  kernels on a GPU): a chain's longest common prefix with the kept chains equals its longest with every earlier
  chain that was asked for (one not kept is itself a prefix of a kept chain), so whether each chain is kept, and
  what it adds, follows from pairwise prefix lengths; running sums then find where drafting stops."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel

  depth = sources[0].shape[1]
  out_cd = jnp.full((max_chains, depth), -1, jnp.int32)
  num = jnp.int32(0)
  prefixes = jnp.int32(0)
  stopped = jnp.bool_(False)
  counts = []
  for chains_cd in sources:
    real_cd = jnp.cumprod(chains_cd >= 0, axis=1).astype(bool)
    clean_cd = jnp.where(real_cd, chains_cd, -1).astype(jnp.int32)
    length_c = jnp.sum(real_cd, axis=1)
    c = clean_cd.shape[0]
    # [C, R] longest common prefix of each chain (within its own tokens) with the kept rows and with its source's
    # chains (padding -1 never equals a token)
    with_kept_cr = jnp.sum(jnp.cumprod((clean_cd[:, None, :] == out_cd[None, :, :]) & real_cd[:, None, :], axis=2),
                           axis=2)
    with_own_cr = jnp.sum(jnp.cumprod((clean_cd[:, None, :] == clean_cd[None, :, :]) & real_cd[:, None, :], axis=2),
                          axis=2)
    asked_c = (jnp.arange(c) < max_chains - num) & (length_c > 0) & ~stopped
    earlier_cr = jnp.tril(jnp.ones((c, c), bool), -1) & asked_c[None, :]
    common_c = jnp.maximum(jnp.max(with_kept_cr, axis=1), jnp.max(jnp.where(earlier_cr, with_own_cr, 0), axis=1))
    adds_c = jnp.where(asked_c & (length_c > common_c), length_c - common_c, 0)
    stops_c = asked_c & ((num + jnp.cumsum(adds_c > 0) >= max_chains) | (prefixes + jnp.cumsum(adds_c) >= max_nodes))
    alive_c = jnp.cumsum(stops_c) - stops_c == 0  # no stop before this chain
    keep_c = (adds_c > 0) & alive_c
    slot_c = jnp.where(keep_c, num + jnp.cumsum(keep_c) - 1, max_chains)
    out_cd = out_cd.at[slot_c].set(clean_cd, mode="drop")
    given = jnp.sum(keep_c, dtype=jnp.int32)
    num += given
    prefixes += jnp.sum(jnp.where(keep_c, adds_c, 0), dtype=jnp.int32)
    stopped |= jnp.any(stops_c)
    counts.append(given)
  return out_cd, jnp.stack(counts)
