"""Where prefill time goes, full and LazyLLM: a profile by prompt length.

  python -m experiments.bench_prefill --lengths=1024,2048,4096 --out=results/bench_prefill.json

For each bucket length T it times, as medians of jitted calls after warm-up (batch 1, fp32):
  full         the `full` method's prefill (LazyLLM's prefill with no pruning: attention in 1024-query chunks
               over the keys up to the chunk's end), also at every keep count of the schedule;
  ar           `ar`'s prefill (the same query-chunked attention since f13ef82, without LazyLLM's bookkeeping);
  lazy         LazyLLM's gathered prefill with the default schedule, or --prune_layers/--keep_ratios;
  lazy_ideal   sum over the schedule's layer groups of (layers in group / L) x full(kept tokens): what lazy would
               cost if its scoring, selection, gathers and Aux-Cache/cache scatters were free;
  score        one LazyLLM scoring call (the last token's attention row over T keys, K projection included).
It fits full(n) = a n + b n^2 over every timed n and reports the quadratic (attention) share of full at each T.
"""

from __future__ import annotations

import functools
import os
import sys

if __package__ in (None, ""):  # started as `python experiments/X.py`: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import hdjax
from hdjax import lazy, model
from hdjax.decoding import autoregressive as ar
from hdjax.errors import HdjaxError
from experiments.common import each_shape, median_ms, print_start, run_main, write_json_atomic

flags.DEFINE_list("lengths", ["1024", "2048", "4096"], "prompt bucket lengths T")
flags.DEFINE_list("prune_layers", None, "LazyLLM pruning layers (default: LazyConfig's)")
flags.DEFINE_list("keep_ratios", None, "LazyLLM keep ratios (default: LazyConfig's)")
flags.DEFINE_integer("repeats", 5, "timed calls per measurement (the median is reported)")
flags.DEFINE_string("model", "smollm2-135m", "model name or path")
flags.DEFINE_string("out", None, "also write the results to this JSON file")
F = flags.FLAGS


def parse_args() -> tuple[list[int], lazy.LazyConfig]:
  """Prompt lengths and the schedule from the flags; bad values end as one HdjaxError line."""
  try:
    lengths = [int(t) for t in F.lengths]
    schedule = (lazy.LazyConfig() if F.prune_layers is None else lazy.LazyConfig(
        prune_layers=tuple(int(l) for l in F.prune_layers), keep_ratios=tuple(float(r) for r in F.keep_ratios or ())))
  except ValueError as e:
    raise HdjaxError(f"--lengths, --prune_layers and --keep_ratios take numbers: {e}") from e
  if not lengths or min(lengths) < 2:
    raise HdjaxError(f"--lengths must be prompt lengths >= 2, got {F.lengths}")
  if not schedule.prune_layers:
    raise HdjaxError("--prune_layers: the profiled schedule needs at least one pruning layer")
  return lengths, schedule


def profile(lm, lazy_cfg: lazy.LazyConfig, lengths: list[int], repeats: int) -> tuple[list[dict], dict[int, float]]:
  cfg, params = lm.cfg, lm.params
  no_pruning = lazy.LazyConfig(prune_layers=(), keep_ratios=())
  rng = np.random.default_rng(0)
  tokens_bt = jnp.asarray(rng.integers(100, cfg.vocab_size, (1, max(lengths))), jnp.int32)

  def prefill_ms(fn, n: int) -> float:
    return median_ms(fn, params, tokens_bt[:, :n], jnp.asarray([n], jnp.int32), repeats=repeats)

  def full(p, tokens, lengths_b):
    return lazy.lazy_prefill(p, cfg, no_pruning, tokens, lengths_b, tokens.shape[1])[0]

  full_lengths = sorted({n for t in lengths for n in lazy_cfg.keep_counts(t)})
  full_by_n = dict(zip(full_lengths, each_shape("full prefill", full_lengths, functools.partial(prefill_ms, full))[0]))
  bounds = (0,) + lazy_cfg.prune_layers + (cfg.n_layers,)

  def row(t: int) -> dict:
    positions_bt = jnp.arange(t, dtype=jnp.int32)[None]
    h_btd = model.embed(params, cfg, tokens_bt[:, :t])
    score = jax.jit(lambda p, h, pos=positions_bt: lazy.score_tokens(
        p, cfg, lazy_cfg.prune_layers[0], h, pos, jnp.ones(pos.shape, bool), pos[:, -1])[0])
    groups = zip(np.diff(bounds), lazy_cfg.keep_counts(t))
    return dict(
        t=t, full_ms=full_by_n[t],
        ar_ms=prefill_ms(lambda p, tokens, lengths_b: ar.prefill(p, cfg, tokens, lengths_b, tokens.shape[1])[0], t),
        lazy_ms=prefill_ms(lambda p, tokens, lengths_b: lazy.lazy_prefill(
            p, cfg, lazy_cfg, tokens, lengths_b, tokens.shape[1])[0], t),
        lazy_ideal_ms=float(sum(layers / cfg.n_layers * full_by_n[n] for layers, n in groups)),
        score_ms=median_ms(score, params, h_btd, repeats=repeats),
        lazy_computed_fraction=lazy_cfg.computed_fraction(cfg.n_layers))

  rows, _ = each_shape("ar, lazy and score prefills", lengths, row)
  return rows, full_by_n


def quadratic_share(full_by_n: dict[int, float]) -> dict[int, float]:
  """Fits ms(n) = a n + b n^2 (least squares) over the timed lengths and returns b n^2 / ms(n) per length."""
  ns = np.array(sorted(full_by_n), float)
  (_, b), *_ = np.linalg.lstsq(np.stack([ns, ns ** 2], 1), np.array([full_by_n[n] for n in sorted(full_by_n)]),
                               rcond=None)
  return {n: float(b * n * n / full_by_n[n]) for n in sorted(full_by_n)}


def main(argv):
  del argv
  lengths, schedule = parse_args()
  print_start("bench_prefill", model=F.model, dtype="float32", lengths=",".join(map(str, lengths)), repeats=F.repeats)
  lm = hdjax.load(F.model, dtype="float32")
  lazy_cfg = schedule.validate(lm.cfg)
  rows, full_by_n = profile(lm, lazy_cfg, lengths, F.repeats)
  shares = quadratic_share(full_by_n) if len(full_by_n) >= 3 else {}
  for row in rows:
    row["attention_quadratic_share"] = shares.get(row["t"], float("nan"))
  print(f"schedule {lazy_cfg.prune_layers} keep {lazy_cfg.keep_ratios}")
  print("T      full ms  ar ms  lazy ms  lazy ideal  full/lazy  score ms  quadratic share of full")
  for r in rows:
    print(f"{r['t']:<6} {r['full_ms']:7.0f}  {r['ar_ms']:5.0f}  {r['lazy_ms']:7.0f}  {r['lazy_ideal_ms']:10.0f}"
          f"  {r['full_ms'] / r['lazy_ms']:8.2f}x  {r['score_ms']:8.1f}  {r['attention_quadratic_share']:.2f}")
  if F.out:
    write_json_atomic(F.out, dict(schedule=dict(prune_layers=lazy_cfg.prune_layers, keep_ratios=lazy_cfg.keep_ratios),
                                  rows=rows, full_ms_by_tokens=full_by_n))


if __name__ == "__main__":
  run_main(main)
