"""Control flow that updates a large carry (the KV cache) in place.

XLA keeps the buffers of a `lax.while_loop`'s carry in place, but gives every branch of a `lax.cond` or
`lax.switch` its own copy of a large operand: in the device decoding loop a switch over three tree sizes copied
the whole cache eight times per step (fp32, 1024 slots: ~190 MB of copies against ~540 MB of weights read). So a
conditional step is written as a loop that runs once or not at all.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import jax
import jax.numpy as jnp

Carry = TypeVar("Carry")


def run_if(pred: jax.Array, fn: Callable[[Carry], Carry], carry: Carry) -> Carry:
  """`fn(carry)` when the scalar `pred` holds, else `carry`: the body of a `lax.while_loop` that runs at most once
  (the step is also a computation of its own, which XLA fuses alike wherever it is traced)."""
  def body(state):
    return jnp.bool_(False), fn(state[1])

  return jax.lax.while_loop(lambda state: state[0], body, (jnp.asarray(pred, bool), carry))[1]


def switch_in_place(index: jax.Array, branches: Sequence[Callable[[Carry], Carry]], carry: Carry) -> Carry:
  """`branches[index](carry)`, each branch a `run_if` in turn (one of them runs); one branch is called directly."""
  if len(branches) == 1:
    return branches[0](carry)
  for i, branch in enumerate(branches):
    carry = run_if(index == i, branch, carry)
  return carry
