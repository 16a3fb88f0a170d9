"""The registry where decoding methods plug in: `register_method` puts a method in `METHODS` under its name,
with the options it reads in `METHOD_OPTIONS`, which `check_options` enforces before a method runs."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import numpy as np

from hdjax.config import is_int
from hdjax.decoding.request import GenerateRequest, GenerationResult, LoadedModel
from hdjax.errors import HdjaxError

Method = Callable[[LoadedModel, GenerateRequest], list[GenerationResult]]
METHODS: dict[str, Method] = {}
# Per method: the options it reads, each with its default (the example its values must match in kind, or None for
# any value). `hdjax.methods` fills it for the built-in methods; a method registered without options takes any.
METHOD_OPTIONS: dict[str, dict[str, Any]] = {}


def register_method(name: str, options: dict[str, Any] | None = None) -> Callable[[Method], Method]:
  """Registers a method under `name`, which no other method may hold."""
  if name in METHODS:
    raise HdjaxError(f"a method named {name!r} is already registered")

  def wrap(fn: Method) -> Method:
    METHODS[name] = fn
    if options is not None:
      METHOD_OPTIONS[name] = dict(options)
    return fn
  return wrap


def _matches(value: Any, example: Any) -> bool:
  """Whether an option value is of the kind of its default `example` (None: anything)."""
  if example is None:
    return True
  if isinstance(example, bool):
    return isinstance(value, (bool, np.bool_))
  if isinstance(example, numbers.Integral):
    return is_int(value)
  if isinstance(example, numbers.Real):
    return (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
            and math.isfinite(float(value)))
  if isinstance(example, tuple):
    return isinstance(value, (tuple, list)) and all(_matches(v, example[0] if example else None) for v in value)
  return isinstance(value, type(example))


def check_options(method: str, options: dict[str, Any]) -> None:
  """Every option is one that `method` reads, with a value of the kind of its default."""
  accepted = METHOD_OPTIONS.get(method)
  if accepted is None:
    return
  unknown = sorted(set(options) - set(accepted))
  if unknown:
    raise HdjaxError(f"method {method!r} has no option {', '.join(unknown)}; its options: "
                     f"{', '.join(sorted(accepted))}")
  for name, value in options.items():
    example = accepted[name]
    if not _matches(value, example):
      raise HdjaxError(f"option {name}={value!r} of method {method!r} must be of the kind of its default "
                       f"{example!r} ({type(example).__name__}{', finite' if isinstance(example, float) else ''})")
  if "chunk_tokens" in options and options["chunk_tokens"] < 1:
    raise HdjaxError(f"chunk_tokens must be >= 1, got {options['chunk_tokens']}")
