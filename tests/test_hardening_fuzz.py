"""Fuzzing the GGUF loader: truncations and byte flips of a small GGUF (with a tokenizer) end in a clean
`HdjaxError` or a correct load, never another exception or a hang."""

from __future__ import annotations

import functools

import numpy as np
from hypothesis import HealthCheck, example, given, settings, strategies as st

import hdjax
from hdjax.weights import convert, gguf
from tests.conftest import make_tiny_lm

SMALL = dict(vocab_size=32, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, ffn_dim=64, max_seq_len=64)
TOKENIZER = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "default",
             "tokenizer.ggml.tokens": [chr(ord("a") + i) for i in range(26)] + ["ab", "ba", "<s>", "</s>", "<pad>",
                                                                                  " "],
             "tokenizer.ggml.token_type": [1] * 28 + [3, 3, 3, 1], "tokenizer.ggml.merges": ["a b", "b a"],
             "tokenizer.chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


@functools.lru_cache(maxsize=None)
def small_gguf(tmp_dir: str) -> bytes:
  lm = make_tiny_lm(seed=3, **SMALL)
  path = f"{tmp_dir}/small.gguf"
  gguf.write_gguf(path, lm.cfg.replace(bos_id=28, eos_ids=(29,), pad_id=30),
                  convert.hf_state_from_params(lm.cfg, lm.params), "Q8_0", TOKENIZER)
  with open(path, "rb") as f:
    return f.read()


def check_outcome(path: str) -> None:
  try:
    lm = hdjax.load(path, dtype="float32")
  except hdjax.HdjaxError as e:
    assert "\n" not in str(e)
    return
  assert lm.cfg.d_model > 0
  for leaf in __import__("jax").tree.leaves(lm.params):
    assert np.isfinite(np.asarray(leaf)).all()
  if lm.tokenizer is not None:
    lm.tokenizer.decode(lm.tokenizer.encode("ab ba"))


def test_the_unfuzzed_file_loads(tmp_path_factory):
  data = small_gguf(str(tmp_path_factory.getbasetemp()))
  path = tmp_path_factory.mktemp("good") / "good.gguf"
  path.write_bytes(data)
  lm = hdjax.load(str(path), dtype="float32")
  assert lm.cfg.vocab_size == SMALL["vocab_size"] and lm.tokenizer.encode("ab") == [26]


@settings(max_examples=30, deadline=2000, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(cut=st.integers(0, 1 << 16), truncate=st.booleans(),
       # half the flips land in the first 2 KiB (header, metadata, tensor infos), the rest anywhere
       flips=st.lists(st.tuples(st.one_of(st.integers(0, 2047), st.integers(0, 1 << 16)), st.integers(1, 255)),
                      max_size=4))
# Inputs a longer run found (each used to end in a raw exception): a tensor shape that disagrees with the config
# (ValueError in the RoPE unpermute), tokenizer keys renamed (KeyError), invalid UTF-8 in metadata strings.
@example(cut=0, truncate=False, flips=[(288, 22), (7421, 4)])
@example(cut=0, truncate=False, flips=[(709, 46), (2318, 211)])
@example(cut=0, truncate=False, flips=[(1224, 54), (358, 75)])
@example(cut=0, truncate=False, flips=[(1371, 246), (12710, 158)])
def test_truncated_or_flipped_gguf_is_an_error_or_a_load(tmp_path_factory, cut, flips, truncate):
  data = bytearray(small_gguf(str(tmp_path_factory.getbasetemp())))
  for where, xor in flips:
    data[where % len(data)] ^= xor
  if truncate:
    data = data[:cut % len(data)]
  path = tmp_path_factory.getbasetemp() / "fuzzed.gguf"
  path.write_bytes(bytes(data))
  check_outcome(str(path))
