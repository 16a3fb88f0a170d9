"""What a decoding method receives and returns: the validated request, the results, and the helpers every
method's driver shares (prompt padding, cache size, results from token rows).

A method receives the caller's model as a `LoadedModel`: the part of `hdjax.api.LM` the library relies on,
named here so that nothing below `hdjax.api` imports it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, Sequence

import numpy as np

from hdjax.config import LlamaConfig
from hdjax.decoding import autoregressive as ar
from hdjax.decoding.sampling import SamplingConfig
from hdjax.model import Params


@dataclasses.dataclass
class GenerationResult:
  token_ids: list[int]
  text: str
  stats: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
  """What every decoding method receives, validated."""

  prompts: tuple[tuple[int, ...], ...]
  max_new_tokens: int
  sampling: SamplingConfig
  seed: int
  options: tuple[tuple[str, Any], ...] = ()

  def option(self, name: str, default: Any = None) -> Any:
    return dict(self.options).get(name, default)


class LoadedModel(Protocol):
  """A loaded model as methods see it (`hdjax.api.LM` is one): config, params, tokenizer (or None), detokenizer,
  and `generate` for drivers that call back into the registry (streaming)."""

  cfg: LlamaConfig
  params: Params
  tokenizer: Any  # hdjax.weights.tokenizer.HdTokenizer | None

  def decode_text(self, ids: Sequence[int]) -> str: ...

  def generate(self, prompts: Sequence[Sequence[int]], method: str = "ar", **kwargs) -> list[GenerationResult]: ...


def make_results(lm: LoadedModel, tokens_bn: np.ndarray, num_b: np.ndarray, stats: list[dict[str, Any]]
                 ) -> list[GenerationResult]:
  out = []
  for b, st in enumerate(stats):
    ids = [int(t) for t in tokens_bn[b, :num_b[b]]]
    out.append(GenerationResult(ids, lm.decode_text(ids), st))
  return out


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int, length: int) -> tuple[np.ndarray, np.ndarray]:
  """Right-padded tokens [B, length] and lengths [B]."""
  tokens = np.full((len(prompts), length), pad_id, np.int32)
  for b, p in enumerate(prompts):
    tokens[b, :len(p)] = p
  return tokens, np.asarray([len(p) for p in prompts], np.int32)


def cache_slots_for(cfg: LlamaConfig, request: GenerateRequest, extra: int = 0) -> int:
  """A power-of-two slot count covering the longest prompt, the new tokens and `extra` speculative rows."""
  return slots_for(max(len(p) for p in request.prompts), request.max_new_tokens, extra, cfg.engine.min_rows)


def slots_for(prompt_len: int, max_new_tokens: int, extra: int = 0, min_rows: int = 0) -> int:
  """`cache_slots_for` of one prompt length, with at least 64 and `min_rows` (`EngineLayout.min_rows`) slots."""
  return ar.next_pow2(prompt_len + max_new_tokens + extra, max(64, min_rows))


def padded_rows(rows: Sequence[Sequence[int]]) -> tuple[np.ndarray, np.ndarray]:
  """Ragged id lists as a [B, max_len] array padded with -1, and their lengths."""
  num_b = np.asarray([len(r) for r in rows], np.int32)
  out = np.full((len(rows), max(1, int(num_b.max()))), -1, np.int32)
  for b, r in enumerate(rows):
    out[b, :len(r)] = r
  return out, num_b
