"""Baseline speed: hdjax vs HF transformers on the same fp32 weights, alternating runs, medians.

  python -m experiments.bench_decode --repeats=3

Prints prefill tokens/s (512 and 2048 tokens), decode tokens/s (256 new tokens, batch 1 and 8), the hdjax/HF ratio,
and the share of the memory-bandwidth limit reached (weight bytes per token / time per token, against a measured
copy bandwidth). Also runs as `python experiments/bench_decode.py ...` from any directory.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # started as `python experiments/X.py`: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import statistics
import time

import jax
import numpy as np
from absl import flags

import hdjax
from experiments.common import check_output_file, each_shape, int_list, print_start, run_main, write_json_atomic
from experiments.hf_peer import HFRunner
from hdjax.decoding import autoregressive as ar
from hdjax.errors import HdjaxError

_MODEL = flags.DEFINE_string("model", "smollm2-135m", "Model name or path.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repetitions per measurement (median reported).")
_PREFILL = flags.DEFINE_list("prefill_lengths", ["512", "2048"], "Integers >= 1: prompt lengths for prefill speed.")
_NEW = flags.DEFINE_integer("new_tokens", 256, "Decoded tokens per sequence.")
_BATCHES = flags.DEFINE_list("batches", ["1", "8"], "Integers >= 1: batch sizes for decode throughput.")
_HF = flags.DEFINE_bool("hf", True, "Also time HF transformers (needs torch, transformers, accelerate).")
_OUT = flags.DEFINE_string("out", "", "Optional JSON output path.")


def copy_bandwidth_gbs(nbytes: int = 256 << 20) -> float:
  """Read+write bytes per second of a large numpy copy: the practical memory-bandwidth ceiling."""
  src = np.ones(nbytes // 4, np.float32)
  dst = np.empty_like(src)
  times = []
  for _ in range(5):
    start = time.perf_counter()
    np.copyto(dst, src)
    times.append(time.perf_counter() - start)
  return 2 * nbytes / min(times) / 1e9


def weight_bytes(lm) -> int:
  """Bytes of weights read per decoded token: every matrix once; the embedding table is read whole only when it
  doubles as the (tied) LM head, otherwise the lookup reads one row."""
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(lm.params))
  if lm.cfg.tie_embeddings:
    return total
  emb = lm.params["embedder"]["embedding_vd"]
  return total - emb.size * emb.dtype.itemsize + emb.shape[1] * emb.dtype.itemsize


def hdjax_prefill_s(lm, n: int) -> float:
  tokens = np.random.default_rng(0).integers(10, 1000, size=(1, n)).astype(np.int32)
  lengths = np.array([n], np.int32)
  start = time.perf_counter()
  logits, cache = ar.prefill(lm.params, lm.cfg, tokens, lengths, n)
  jax.block_until_ready((logits, cache))
  return time.perf_counter() - start


def hdjax_decode_tps(lm, batch: int, new: int) -> float:
  prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a long story about a dragon."}])
  res = lm.generate([prompt] * batch, max_new_tokens=new)
  return sum(r.stats["new_tokens"] for r in res) / res[0].stats["decode_s"]


def hf_decode_tps(hf: HFRunner, prompt, batch: int, new: int) -> float:
  """Decode tokens/s of HF generate: the time of `new` tokens less the time of the first (its prefill)."""
  _, first = hf.generate([prompt] * batch, 1)
  _, total = hf.generate([prompt] * batch, new, exact=True)
  return batch * (new - 1) / max(total - first, 1e-9)


def main(argv):
  del argv
  if _REPEATS.value < 1 or _NEW.value < 2:
    raise HdjaxError("--repeats must be >= 1 and --new_tokens >= 2")
  cases = ([("prefill", n) for n in int_list("prefill_lengths", _PREFILL.value)]
           + [("decode", b) for b in int_list("batches", _BATCHES.value)])
  if _OUT.value:
    check_output_file(_OUT.value)
  print_start("bench_decode", model=_MODEL.value, dtype="float32", repeats=_REPEATS.value, new_tokens=_NEW.value,
              hf=_HF.value)
  lm = hdjax.load(_MODEL.value, dtype="float32")
  # decode exactly --new_tokens: an end-of-sequence id that no argmax can take (the vocabulary's size)
  lm_no_eos = hdjax.LM(lm.cfg.replace(eos_ids=(lm.cfg.vocab_size,)), lm.params, lm.tokenizer, lm.name)
  hf = HFRunner(hdjax.api.resolve_path(_MODEL.value)) if _HF.value else None
  prompt = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Tell me a long story about a dragon."}])

  def measure(case: tuple[str, int]) -> dict:
    kind, size = case
    ours, theirs = [], []
    for rep in range(_REPEATS.value + 1):  # repetition 0 is warm-up
      if kind == "prefill":
        o = size / hdjax_prefill_s(lm, size)
        t = size / hf.prefill_s(size) if hf else float("nan")
      else:
        o = hdjax_decode_tps(lm_no_eos, size, _NEW.value)
        t = hf_decode_tps(hf, prompt, size, _NEW.value) if hf else float("nan")
      if rep:
        ours.append(o)
        theirs.append(t)
    return dict(kind=kind, size=size, hdjax_tps=statistics.median(ours), hf_tps=statistics.median(theirs))

  rows, _ = each_shape("bench_decode", cases, measure)
  bandwidth = copy_bandwidth_gbs()
  wbytes = weight_bytes(lm)
  print(f"copy bandwidth {bandwidth:.1f} GB/s; weights read per token {wbytes / 1e6:.0f} MB")
  print(f"{'measure':<22}{'hdjax tok/s':>12}{'HF tok/s':>10}{'ratio':>8}{'of BW limit':>13}")
  for r in rows:
    label = f"prefill {r['size']} tokens" if r["kind"] == "prefill" else f"decode batch {r['size']}"
    r["ratio"] = r["hdjax_tps"] / r["hf_tps"] if r["hf_tps"] == r["hf_tps"] else float("nan")
    share = ""
    if r["kind"] == "decode":
      steps_per_s = r["hdjax_tps"] / r["size"]
      r["bandwidth_share"] = wbytes * steps_per_s / (bandwidth * 1e9)
      share = f"{r['bandwidth_share']:.0%}"
    print(f"{label:<22}{r['hdjax_tps']:>12.1f}{r['hf_tps']:>10.1f}{r['ratio']:>8.2f}{share:>13}")
  if _OUT.value:
    write_json_atomic(_OUT.value, dict(rows=rows, copy_bandwidth_gbs=bandwidth, weight_bytes=wbytes))


if __name__ == "__main__":
  run_main(main)
