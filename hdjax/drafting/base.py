"""The interface every draft source implements (context, model and statistics databases, PLD, hierarchy)."""

from __future__ import annotations

from typing import Protocol, Sequence


class Drafter(Protocol):
  """A host-side source of draft continuations; one instance serves one sequence at a time.

  Lifecycle per request: `start(prompt)`, then after each verify step `extend(accepted tokens)`, then `finish()`.
  `draft` proposes up to `max_chains` continuations of the current context, best first, each at most `depth` tokens
  long; an empty list means "nothing to propose".
  """

  name: str

  def start(self, prompt: Sequence[int]) -> None:
    ...

  def extend(self, tokens: Sequence[int]) -> None:
    ...

  def draft(self, context: Sequence[int], max_chains: int, depth: int) -> list[list[int]]:
    ...

  def finish(self) -> None:
    ...
