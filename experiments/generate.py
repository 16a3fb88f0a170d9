"""Generates a reply to one prompt with any method and streams the text as it is produced.

  python -m experiments.generate --prompt="Tell me about Paris." --method=hd --max_new_tokens=128 \
      --method_options='{"hd": {"max_depth": 4}}'
  python experiments/generate.py --prompt="Tell me about Paris."      (the same, from any directory)

Before the timed run, a warm-up pass compiles (or loads from the compilation cache) what the method runs for this
prompt, so the last line reports start-up (loading and that warm-up) apart from the time to the first token and
the decoding speed after it.
"""

from __future__ import annotations

import os
import sys
import time

if __package__ in (None, ""):  # started as `python experiments/X.py`: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags

import hdjax
from hdjax import compilation
from experiments.common import at_least, compiled_text, parse_method_options, print_start, require, run_main
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
_OPTIONS = flags.DEFINE_string("method_options", "{}", 'JSON {method: {option: value}} for --method (as the other '
                               'launchers take it), e.g. {"hd": {"max_depth": 4}}.')


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
  options = parse_method_options(_OPTIONS.value, [_METHOD.value]).get(_METHOD.value, {})
  print_start("generate", file=sys.stderr, model=_MODEL.value, method=_METHOD.value, max_new_tokens=_MAX_NEW.value,
              **options)
  start = time.perf_counter()
  lm = hdjax.load(_MODEL.value)
  if lm.tokenizer is None:
    raise HdjaxError(f"model {_MODEL.value} has no tokenizer")
  if _RAW.value:
    ids = lm.tokenizer.encode(_PROMPT.value)
  else:
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": _PROMPT.value}])
  settings = dict(method=_METHOD.value, max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value,
                  top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value, **options)
  load_s = time.perf_counter() - start
  with compilation.track() as compiled:
    lm.generate([ids], warmup=True, **settings)
  startup_s = time.perf_counter() - start
  result = None
  for result in stream_generate(lm, ids, chunk_tokens=_CHUNK.value, **settings):
    sys.stdout.write(result.delta)
    sys.stdout.flush()
  print(f"\n[{_METHOD.value}] {timing_text(result.stats, load_s, startup_s, compiled.count())}", file=sys.stderr)


def timing_text(stats: dict, load_s: float, startup_s: float, count: compilation.CompileCount) -> str:
  """`12 tokens: start-up 9.1 s (load 3.0 s, warm-up 6.1 s; compile ...), ttft 45 ms, decode 52.3 tok/s (11 tokens
  after the first in 0.21 s)`: decoding speed leaves out the first token, which the prefill makes."""
  after = stats["new_tokens"] - 1
  decode = (f"decode {after / max(stats['decode_s'], 1e-9):.1f} tok/s ({after} tokens after the first in "
            f"{stats['decode_s']:.2f} s)" if after else "no token after the first")
  return (f"{stats['new_tokens']} tokens: start-up {startup_s:.1f} s (load {load_s:.1f} s, warm-up "
          f"{startup_s - load_s:.1f} s; {compiled_text(count)}), ttft {stats['ttft_s'] * 1e3:.0f} ms, {decode}")


if __name__ == "__main__":
  run_main(main)
