"""Latency of one decode step and of one tree-verify step of T nodes, and the speedups they PROJECT.

  python -m experiments.bench_steps --model=smollm2-135m
  python -m experiments.bench_steps --model=llama-2-7b --layers=2      # random weights; fewer layers on CPU
  python -m experiments.bench_steps --model=smollm2-135m --summary=results/specbench/summary.json --method=hd
  python -m experiments.bench_steps --model=smollm2-135m --random_weights --nodes=16 --ab=layout,unfused,no_triton

A tree-verify step runs T tree nodes written at slots lengths + i (RoPE positions lengths + depth) through
every layer with `attention.prefix_plus_block_mask`, and the LM head over all T nodes; the cache cursor does
not move. Both steps are jitted, donate the cache, and are timed as medians after warm-up.

`--ab` compares variants of the engine layout and of XLA's compile options instead (fused or unfused projections,
a tied or untied LM head, XLA:GPU's Triton GEMMs or cuBLAS): one decode and one verify step of the largest T per
variant, all timed in alternation in one process, with the GEMMs XLA left in each compiled decode step.

The projected speedup of a speculative method at tree size T is  tau(T) * t_decode / t_verify(T),  with tau
the mean tokens emitted per step measured by specbench. It leaves out drafting time and host overhead, so it
is an upper bound for this device, not a measurement.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):  # started as `python experiments/X.py`: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dataclasses
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import hdjax
from hdjax import api, compilation, model, profiling, sharding
from hdjax.attention import prefix_plus_block_mask
from hdjax.config import LlamaConfig
from hdjax.decoding import autoregressive as ar
from hdjax.decoding.sampling import SamplingConfig
from hdjax.errors import HdjaxError
from hdjax.kvcache import KVCache, init_cache
from experiments.common import compiled_text, device_name, print_start, run_main, write_json_atomic

flags.DEFINE_string("model", "smollm2-135m", "an embedded model or path (real weights), or a preset in "
                    "hdjax.PRESETS (random weights), e.g. llama-2-7b")
flags.DEFINE_bool("random_weights", False, "random weights of the preset --model even where real ones exist "
                  "(step latency does not depend on the values)")
flags.DEFINE_integer("layers", 0, "keep only this many layers (0: all); the output says so")
flags.DEFINE_list("nodes", ["1", "4", "8", "16", "32", "64"], "tree sizes T to time")
flags.DEFINE_integer("prefix", 256, "committed tokens in the cache before the timed step")
flags.DEFINE_integer("batch", 1, "sequences per step")
flags.DEFINE_integer("depth", 4, "draft chain length of the timed trees (T-1 nodes in chains of this depth)")
flags.DEFINE_integer("warmup", 3, "untimed calls per step after compiling")
flags.DEFINE_integer("repeats", 20, "timed calls per step (the median is reported)")
flags.DEFINE_string("dtype", None, "param/activation dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
flags.DEFINE_list("mesh", [], "data,model mesh sizes (default: no mesh, one device)")
flags.DEFINE_list("tau", ["16:1.57"], "T:tau pairs for the projection (default: PLD's tau=1.57 from "
                  "DESIGN.md 6, with its up to 10-token drafts read as a T=16 bucket)")
flags.DEFINE_string("summary", None, "a specbench summary.json: take tau from it instead of --tau")
flags.DEFINE_string("method", "hd", "the method of --summary whose tau is used")
flags.DEFINE_integer("summary_nodes", 16, "the tree size T that --method verified per step")
flags.DEFINE_integer("profile", 0, "trace this many decode calls and verify calls at the largest T with "
                     "jax.profiler and print kernels per call and device busy time against wall time (0: off)")
flags.DEFINE_string("trace_dir", None, "where --profile writes its traces (default: a temporary directory)")
flags.DEFINE_list("ab", [], "variants to compare instead of the T sweep, each names joined by '+' (e.g. "
                  "--ab=layout,unfused,untied,no_triton): layout (the backend's engine layout), fused / unfused "
                  "(q/k/v and gate/up as one GEMM each, or apart), tied / untied (the LM head as the embedding, or "
                  "its own [D, V] copy), no_triton (XLA:GPU: cuBLAS for every GEMM, "
                  "--xla_gpu_enable_triton_gemm=false); decode and verify at the largest --nodes")
flags.DEFINE_string("out", None, "also write the results to this JSON file")

FLAGS = flags.FLAGS

# --ab's variant names: (changes to the engine layout, XLA compile options)
AB_VARIANTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "layout": ({}, {}),
    "fused": (dict(fused_qkv=True, fused_gate_up=True), {}),
    "unfused": (dict(fused_qkv=False, fused_gate_up=False), {}),
    "tied": (dict(untie_head=False), {}),
    "untied": (dict(untie_head=True), {}),
    "no_triton": ({}, dict(xla_gpu_enable_triton_gemm=False)),
}


def chain_tree_mask(num_nodes: int, depth: int) -> np.ndarray:
  """[T, T] ancestor-or-self mask of a root followed by chains of `depth` nodes, and the nodes' depths."""
  parents = [-1] + [0 if (i - 1) % depth == 0 else i - 1 for i in range(1, num_nodes)]
  mask = np.eye(num_nodes, dtype=bool)
  depths = np.zeros(num_nodes, np.int32)
  for i in range(1, num_nodes):
    mask[i] |= mask[parents[i]]
    depths[i] = depths[parents[i]] + 1
  return mask, depths


def step_jit(step, compiler_options: dict[str, Any] | None = None):
  """`step(params, cfg, cache, ...)` jitted with `cfg` static and the cache donated, under XLA `compiler_options`."""
  return jax.jit(step, static_argnames=("cfg",), donate_argnames=("cache",), compiler_options=compiler_options)


def decode(params, cfg: LlamaConfig, cache: KVCache, tokens_b: jax.Array) -> tuple[jax.Array, KVCache]:
  return ar.decode_one(params, cfg, cache, tokens_b, jnp.ones(tokens_b.shape, bool))


def tree_verify(params, cfg: LlamaConfig, cache: KVCache, tokens_bt: jax.Array, depths_t: jax.Array,
                tree_mask_tt: jax.Array) -> tuple[jax.Array, KVCache]:
  """T tree nodes at slots lengths + i, positions lengths + depth; logits [B, T, V] for every node."""
  batch, t = tokens_bt.shape
  slots_bt = cache.lengths[:, None] + jnp.arange(t)[None, :]
  positions_bt = cache.lengths[:, None] + depths_t[None, :]
  mask_bts = prefix_plus_block_mask(cache.lengths, jnp.broadcast_to(tree_mask_tt, (batch, t, t)), cache.num_slots)
  return model.step_logits(params, cfg, tokens_bt, positions_bt, mask_bts, cache, slots_bt)


decode_step, tree_verify_step = step_jit(decode), step_jit(tree_verify)


def interleaved_ms(steps, caches: list[KVCache], warmup: int, repeats: int) -> tuple[np.ndarray, list[KVCache]]:
  """Wall times [repeats, len(steps)] in ms of `step(cache) -> (out, cache)` calls made in alternation, so that
  a shared machine's load changes hit every step alike. Caches are threaded through, as they are donated."""
  times = np.zeros((repeats, len(steps)))
  for r in range(warmup + 1 + repeats):
    for i, step in enumerate(steps):
      start = time.perf_counter()
      out, caches[i] = step(caches[i])
      jax.block_until_ready(out)
      if r > warmup:
        times[r - warmup - 1, i] = 1e3 * (time.perf_counter() - start)
  return times, caches


def profile_step(step, cache: KVCache, calls: int) -> profiling.DeviceProfile:
  """`profiling.profile_calls` of `step(cache) -> (out, cache)`, threading the donated cache through."""
  holder = [cache]

  def call():
    out, holder[0] = step(holder[0])
    return out

  return profiling.profile_calls(call, calls, FLAGS.trace_dir)


def profile_token_loop(params, cfg: LlamaConfig, num_slots: int, tokens_b: jax.Array, new_tokens: int
                       ) -> profiling.DeviceProfile:
  """The profile of `ar`'s whole on-device token loop (`decode_chunk`) emitting `new_tokens` tokens after the
  prefix, from a fresh cache each call, after one untimed call that compiles it."""
  batch = tokens_b.shape[0]
  limit = jnp.int32(new_tokens)

  def call():
    cache = init_cache(cfg, batch, num_slots)
    cache = cache.replace(lengths=jnp.full((batch,), FLAGS.prefix, jnp.int32))
    state = ar.token_state(cfg, tokens_b, new_tokens, jax.random.key(0), cache)
    return ar.decode_chunk(params, cfg, state, limit, limit, SamplingConfig()).tokens_bs

  jax.block_until_ready(call())
  return profiling.profile_calls(call, 1, FLAGS.trace_dir)


def build_model(name: str, layers: int, dtype: str, mesh, random_weights: bool = False
                ) -> tuple[LlamaConfig, model.Params, str]:
  """Real weights for embedded models and paths; random weights for presets. Optionally truncated."""
  if random_weights and name not in hdjax.PRESETS:
    raise HdjaxError(f"--random_weights needs a preset --model ({', '.join(hdjax.PRESETS)}), got {name!r}")
  if name in hdjax.PRESETS and (random_weights or name not in api.EMBEDDED):
    cfg = hdjax.PRESETS[name].replace(dtype=dtype, engine=api.engine_settings(dtype))
    cfg = cfg.replace(n_layers=layers) if layers else cfg
    params = model.timing_params(cfg)
    params = sharding.shard_params(params, mesh) if mesh is not None else params
    return cfg, params, "random weights"
  lm = api.load(name, dtype=dtype, mesh=mesh)
  cfg, params = lm.cfg, lm.params
  if layers:
    if layers > cfg.n_layers:
      raise HdjaxError(f"--layers={layers} exceeds the model's {cfg.n_layers} layers")
    cfg = cfg.replace(n_layers=layers)
    params = dict(params, layers=params["layers"][:layers])
  return cfg, params, "real weights"


def at_prefix(cache: KVCache) -> KVCache:
  """`cache` with --prefix committed tokens per sequence (a fresh lengths array: the old one is donated with it)."""
  return cache.replace(lengths=jnp.full((FLAGS.batch,), FLAGS.prefix, jnp.int32))


def ab_changes(name: str) -> tuple[dict[str, Any], dict[str, Any]]:
  """An --ab variant's changes to the engine layout and its XLA compile options."""
  layout, options = {}, {}
  for part in name.split("+"):
    if part not in AB_VARIANTS:
      raise HdjaxError(f"--ab variant {name!r}: {part!r} is not one of {', '.join(AB_VARIANTS)}")
    layout.update(AB_VARIANTS[part][0])
    options.update(AB_VARIANTS[part][1])
  return layout, options


def run_ab(cfg: LlamaConfig, params: model.Params, mesh, num_slots: int, t: int, rng,
           variants: dict[str, tuple[dict[str, Any], dict[str, Any]]]) -> list[dict]:
  """--ab: each variant's decode step and verify step of `t` nodes (its params the same values in its layout),
  compiled ahead of time (the GEMMs of the compiled decode step counted), then all of them timed in alternation;
  prints one row per variant."""
  mask_tt, depths_t = (jnp.asarray(x) for x in chain_tree_mask(t, FLAGS.depth))
  tokens_b = jnp.asarray(rng.integers(3, cfg.vocab_size, FLAGS.batch), jnp.int32)
  tokens_bt = jnp.asarray(rng.integers(3, cfg.vocab_size, (FLAGS.batch, t)), jnp.int32)
  fields = ("fused_qkv", "fused_gate_up", "untie_head")
  print(f"# --ab: the {jax.default_backend()} layout has " + ", ".join(f"{f}={getattr(cfg.engine, f)}" for f in fields)
        + f"; verify of T={t} nodes; GEMMs: dot ops and GEMM calls in the compiled decode step", flush=True)
  steps, caches, rows = [], [], []
  for name, (layout, options) in variants.items():
    variant_cfg = cfg.replace(engine=dataclasses.replace(cfg.engine, **layout))
    variant_params = model.with_layout(variant_cfg, params)
    variant_params = sharding.shard_params(variant_params, mesh) if mesh is not None else variant_params
    caches += [at_prefix(init_cache(variant_cfg, FLAGS.batch, num_slots)) for _ in range(2)]
    with compilation.track() as compiled:
      dec = step_jit(decode, options).lower(variant_params, variant_cfg, caches[-2], tokens_b).compile()
      ver = step_jit(tree_verify, options).lower(variant_params, variant_cfg, caches[-1], tokens_bt, depths_t,
                                                 mask_tt).compile()
    steps += [lambda c, dec=dec, p=variant_params: dec(p, c, tokens_b),
              lambda c, ver=ver, p=variant_params: ver(p, c, tokens_bt, depths_t, mask_tt)]
    rows.append(dict(variant=name, **{f: getattr(variant_cfg.engine, f) for f in fields}, xla_options=options,
                     gemms=profiling.hlo_counts(dec.as_text()).gemms, compile_s=compiled.seconds))
  times, _ = interleaved_ms(steps, caches, FLAGS.warmup, FLAGS.repeats)
  print(f"{'variant':<28} {'decode ms':>10} {'verify ms':>10} {'decode/first':>13} {'verify/first':>13} "
        f"{'GEMMs':>6} {'compile s':>10}  (medians; ratios: medians of paired ratios to the first variant)")
  for i, r in enumerate(rows):
    r.update(decode_ms=float(np.median(times[:, 2 * i])), verify_ms=float(np.median(times[:, 2 * i + 1])),
             decode_over_first=float(np.median(times[:, 2 * i] / times[:, 0])),
             verify_over_first=float(np.median(times[:, 2 * i + 1] / times[:, 1])))
    print(f"{r['variant']:<28} {r['decode_ms']:>10.2f} {r['verify_ms']:>10.2f} {r['decode_over_first']:>13.2f} "
          f"{r['verify_over_first']:>13.2f} {r['gemms']:>6} {r['compile_s']:>10.1f}", flush=True)
  return rows


def read_tau() -> tuple[dict[int, float], str]:
  if FLAGS.summary:
    if not os.path.isfile(FLAGS.summary):
      raise HdjaxError(f"summary file not found: {FLAGS.summary}")
    with open(FLAGS.summary, encoding="utf-8") as f:
      summary = json.load(f)
    entry = summary.get("methods", {}).get(FLAGS.method, {}).get("overall") if isinstance(summary, dict) else None
    if not isinstance(entry, dict) or "tau" not in entry:
      raise HdjaxError(f"{FLAGS.summary} has no methods.{FLAGS.method}.overall.tau (run specbench with "
                       f"--methods=ar,{FLAGS.method})")
    return {FLAGS.summary_nodes: float(entry["tau"])}, f"{FLAGS.summary} ({FLAGS.method})"
  try:
    pairs = dict(item.split(":") for item in FLAGS.tau)
    return {int(t): float(v) for t, v in pairs.items()}, "--tau"
  except ValueError:
    raise HdjaxError(f"--tau must be T:tau pairs, got {FLAGS.tau}") from None


def main(argv):
  del argv
  nodes = sorted({int(t) for t in FLAGS.nodes})
  if nodes[0] < 1 or FLAGS.prefix < 1 or FLAGS.batch < 1 or FLAGS.depth < 1:
    raise HdjaxError("--nodes, --prefix, --batch and --depth must be positive")
  if FLAGS.profile < 0:
    raise HdjaxError(f"--profile must be >= 0 (0: off), got {FLAGS.profile}")
  tau, tau_source = read_tau()
  variants = {name: ab_changes(name) for name in FLAGS.ab}
  dtype = FLAGS.dtype or api.default_dtype()
  print_start("bench_steps", model=FLAGS.model, dtype=dtype, nodes=",".join(map(str, nodes)), prefix=FLAGS.prefix,
              batch=FLAGS.batch)
  mesh = sharding.make_mesh(*(int(x) for x in FLAGS.mesh)) if FLAGS.mesh else None
  cfg, params, weights = build_model(FLAGS.model, FLAGS.layers, dtype, mesh, FLAGS.random_weights)
  num_slots = ar.next_pow2(FLAGS.prefix + max(max(nodes) + FLAGS.warmup + FLAGS.repeats + 2, FLAGS.profile + 1))
  device = device_name()
  note = f"{cfg.n_layers} layers" + (" (truncated from the full model by --layers)" if FLAGS.layers else "")
  print(f"# {FLAGS.model}, {weights}, {note}, {dtype}, batch {FLAGS.batch}, prefix {FLAGS.prefix}, "
        f"device {device}, mesh {dict(mesh.shape) if mesh else None}; medians of {FLAGS.repeats} after warm-up, "
        f"decode and verify timed in alternation")

  rng = np.random.default_rng(0)
  if FLAGS.ab:
    with sharding.use_mesh(mesh), compilation.track() as compiled:
      rows = run_ab(cfg, params, mesh, num_slots, nodes[-1], rng, variants)
    print(f"bench_steps: {compiled_text(compiled.count())}")
    if FLAGS.out:
      write_json_atomic(FLAGS.out, dict(model=FLAGS.model, weights=weights, layers=cfg.n_layers, dtype=dtype,
                                        device=device, batch=FLAGS.batch, prefix=FLAGS.prefix, nodes=nodes[-1],
                                        ab=rows, compile=compiled.count().as_dict()))
    return
  print(f"{'T':>4} {'decode ms':>10} {'verify ms':>10} {'verify/decode':>14}  (median of paired ratios; compile s "
        "and programs of the row)", flush=True)
  with sharding.use_mesh(mesh), compilation.track() as compiled:
    caches = [at_prefix(init_cache(cfg, FLAGS.batch, num_slots)) for _ in range(2)]
    tokens_b = jnp.asarray(rng.integers(3, cfg.vocab_size, FLAGS.batch), jnp.int32)
    rows = []
    for t in nodes:
      mask_tt, depths_t = (jnp.asarray(x) for x in chain_tree_mask(t, FLAGS.depth))
      tokens_bt = jnp.asarray(rng.integers(3, cfg.vocab_size, (FLAGS.batch, t)), jnp.int32)
      caches = [at_prefix(c) for c in caches]
      with compilation.track() as row_compiled:
        times, caches = interleaved_ms(
            [lambda c: decode_step(params, cfg, c, tokens_b),
             lambda c, tokens_bt=tokens_bt, depths_t=depths_t, mask_tt=mask_tt: tree_verify_step(
                 params, cfg, c, tokens_bt, depths_t, mask_tt)], caches, FLAGS.warmup, FLAGS.repeats)
      decode_ms, verify_ms = np.median(times, axis=0)
      r = dict(nodes=t, decode_ms=float(decode_ms), verify_ms=float(verify_ms),
               verify_over_decode=float(np.median(times[:, 1] / times[:, 0])), compile=row_compiled.count().as_dict())
      rows.append(r)
      print(f"{r['nodes']:>4} {r['decode_ms']:>10.2f} {r['verify_ms']:>10.2f} {r['verify_over_decode']:>14.2f}  "
            f"({row_compiled.seconds:.1f} s, {row_compiled.programs} programs)", flush=True)
    profiles = {}
    if FLAGS.profile:
      steps = {"decode": lambda c: decode_step(params, cfg, c, tokens_b),
               f"verify T={t}": lambda c: tree_verify_step(params, cfg, c, tokens_bt, depths_t, mask_tt)}
      for (label, step), cache in zip(steps.items(), caches):
        found = profile_step(step, at_prefix(cache), FLAGS.profile)
        profiles[label] = found.as_dict()
        print(f"profile {label}: {found.text()}", flush=True)
      loop = profile_token_loop(params, cfg, num_slots, tokens_b, FLAGS.profile)
      profiles[f"ar loop of {FLAGS.profile} tokens"] = loop.as_dict()
      print(f"profile ar loop of {FLAGS.profile} tokens (one jitted while loop, cache allocated per call): "
            f"{loop.text()}", flush=True)
  print(f"bench_steps: {compiled_text(compiled.count())}")
  projection = [dict(nodes=r["nodes"], tau=tau[r["nodes"]], projected_speedup=tau[r["nodes"]] / r["verify_over_decode"])
                for r in rows if r["nodes"] in tau]
  missing = sorted(set(tau) - set(nodes))
  print(f"PROJECTION (not a measurement): speedup = tau * t_decode / t_verify(T), tau from {tau_source}; "
        f"drafting time and host overhead excluded")
  for p in projection:
    print(f"  T={p['nodes']:>3}  tau={p['tau']:.2f}  projected speedup {p['projected_speedup']:.2f}x")
  if missing:
    print(f"  (no timing for T={missing}: add them to --nodes)")
  if FLAGS.out:
    write_json_atomic(FLAGS.out, dict(model=FLAGS.model, weights=weights, layers=cfg.n_layers, dtype=dtype,
                                      device=device, batch=FLAGS.batch, prefix=FLAGS.prefix, verify=rows,
                                      projection=projection, tau_source=tau_source, profile=profiles,
                                      compile=compiled.count().as_dict()))


if __name__ == "__main__":
  run_main(main)
