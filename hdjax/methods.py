"""Imports every decoding method so that it registers itself in `hdjax.decoding.registry.METHODS`, and records the
options each one reads in `METHOD_OPTIONS` (so `LM.generate` rejects a misspelled option instead of ignoring it)."""

import dataclasses

from hdjax.decoding import ar_method as _ar  # ar
from hdjax.decoding import speculative  # pld, rest, hd, hd_context, hd_model, hd_stats
from hdjax.adadecode import decode as _adadecode  # adadecode
from hdjax import lazy as _lazy  # lazy, lazy_static, lazy_random, lazy_single, full
# lazy+pld, lazy+rest, lazy+hd, lazy+adadecode, hd+adadecode, lazy+hd+adadecode (and the last two's _host loops)
from hdjax import compose as _compose  # noqa: F401
from hdjax.decoding.registry import METHOD_OPTIONS, METHODS


def _fields(config) -> dict:
  return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}


# Streaming (`stream_generate`) and the launchers' warm-up pass these to every method.
COMMON = dict(on_tokens=None, chunk_tokens=16, warmup=False)
SPEC = {**_fields(speculative.SpecConfig()), "order": ""}  # `SpecConfig.with_options`, `spec_method`
LAZY = {**_fields(_lazy.LazyConfig()), "lazy_config": None}  # `lazy.config_from_request`
HEADS = dict(heads=None, head_layers=None)  # `adadecode.decode.resolve_heads`
ADADECODE = _fields(_adadecode.AdaDecodeConfig())  # `adadecode.decode.AdaDecodeConfig.from_request`


def method_options(name: str) -> dict:
  """The options that method `name` (or a "+" composition, or its host loop `<name>_host`) reads, with their
  defaults."""
  parts = name.removesuffix("_host").split("+")
  spec = any(p in speculative.SPEC_METHODS for p in parts)
  options = dict(COMMON)
  if spec:
    options.update(SPEC)
  if any(p in _lazy.SCHEDULES for p in parts):
    options.update(LAZY)
  if name == "lazy_single":
    options["single_layer"] = 0
  if "adadecode" in parts:
    options.update(HEADS if spec else {**HEADS, **ADADECODE})
  return options


METHOD_OPTIONS.update({name: method_options(name) for name in METHODS if name not in METHOD_OPTIONS})
