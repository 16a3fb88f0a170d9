"""Prompt lookup decoding (PLD): match the last 3, then 2, then 1 tokens in the prompt and generated text and
propose the (up to 10) tokens that followed the most recent match, as one chain."""

from __future__ import annotations

from hdjax.drafting.context_db import NgramConfig, NgramDrafter

PLD_MAX_TOKENS = 10


def pld_drafter() -> NgramDrafter:
  return NgramDrafter(NgramConfig(key_sizes=(3, 2, 1), max_candidates=1), name="pld")
