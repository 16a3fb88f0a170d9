"""Generates a reply to one prompt with any method and streams the text as it is produced.

  python -m experiments.generate --prompt="Tell me about Paris." --method=ar --max_new_tokens=128
  python experiments/generate.py --prompt="Tell me about Paris."      (the same, from any directory)
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # started as `python experiments/X.py`: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags

import hdjax
from hdjax import compilation
from experiments.common import at_least, compiled_text, print_start, require, run_main
from hdjax.errors import HdjaxError
from hdjax.streaming import stream_generate

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Registry name, *.gguf file, HF dir or orbax dir.")
_PROMPT = flags.DEFINE_string("prompt", None, "User message (wrapped in the chat template unless --raw).")
_RAW = flags.DEFINE_bool("raw", False, "Feed the prompt as plain text, without the chat template.")
_METHOD = flags.DEFINE_string("method", "ar", "Decoding method.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Maximum number of new tokens (>= 1).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "Finite, >= 0; 0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "In [0, vocabulary size]; 0 = off.")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "In (0, 1]; 1 = off.")
_SEED = flags.DEFINE_integer("seed", 0, "PRNG seed.")
_CHUNK = flags.DEFINE_integer("chunk_tokens", 16, "Tokens decoded between two streamed prints (>= 1).")


def main(argv):
  del argv
  if _PROMPT.value is None or not _PROMPT.value.strip():
    raise HdjaxError("empty prompt: pass --prompt='...'")
  if _METHOD.value not in hdjax.METHODS:
    raise HdjaxError(f"unknown method {_METHOD.value!r}; available: {', '.join(sorted(hdjax.METHODS))}")
  require(max_new_tokens=(_MAX_NEW.value, at_least(1)), chunk_tokens=(_CHUNK.value, at_least(1)),
          temperature=(_TEMPERATURE.value, at_least(0)), top_k=(_TOP_K.value, at_least(0)))
  if not 0 < _TOP_P.value <= 1:
    raise HdjaxError(f"--top_p must be in (0, 1], got {_TOP_P.value}")
  print_start("generate", file=sys.stderr, model=_MODEL.value, method=_METHOD.value, max_new_tokens=_MAX_NEW.value)
  lm = hdjax.load(_MODEL.value)
  if lm.tokenizer is None:
    raise HdjaxError(f"model {_MODEL.value} has no tokenizer")
  if _RAW.value:
    ids = lm.tokenizer.encode(_PROMPT.value)
  else:
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": _PROMPT.value}])
  result = None
  with compilation.track() as compiled:
    for result in stream_generate(lm, ids, method=_METHOD.value, max_new_tokens=_MAX_NEW.value,
                                  temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                                  seed=_SEED.value, chunk_tokens=_CHUNK.value):
      sys.stdout.write(result.delta)
      sys.stdout.flush()
  st = result.stats
  print(f"\n[{_METHOD.value}] {st['new_tokens']} tokens in {st['total_s']:.2f}s "
        f"({st['new_tokens'] / max(st['total_s'], 1e-9):.1f} tok/s, ttft {st['ttft_s'] * 1e3:.0f} ms; "
        f"{compiled_text(compiled.count())})", file=sys.stderr)


if __name__ == "__main__":
  run_main(main)
