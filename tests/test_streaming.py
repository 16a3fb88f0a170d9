"""Streaming: every method's streamed token ids add up to its final output, first token included."""

from __future__ import annotations

import pytest

from hdjax.streaming import stream_generate
from tests.conftest import make_tiny_lm


@pytest.mark.parametrize("method", ["ar", pytest.param("pld", marks=pytest.mark.slow)])
def test_streamed_ids_are_the_whole_output(method):
  lm = make_tiny_lm()
  prompt = [5, 6, 7, 8, 9, 10] * 4
  events = list(stream_generate(lm, prompt, method=method, max_new_tokens=20, chunk_tokens=6))
  final = events[-1]
  assert final.stats is not None and len(events) > 2  # streamed in several pieces before the final event
  assert events[-2].token_ids == final.token_ids == lm.generate([prompt], method=method, max_new_tokens=20)[0].token_ids
