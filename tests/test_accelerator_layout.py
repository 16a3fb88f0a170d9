"""The GPU/TPU engine layout, lowered and run on CPU: no control flow inside a decode or verify step (XLA:GPU reads
a `while`/`cond` predicate on the host), its GEMMs per layer counted in the compiled HLO, one step shape, and the
speculative methods still return `ar`'s tokens."""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import pytest

import hdjax
from hdjax import compilation, config, model, profiling
from hdjax.exit_heads import ExitHeads
from hdjax.config import engine_settings
from hdjax.decoding import autoregressive as ar, device_loop, speculative
from hdjax.kvcache import init_cache
from tests.test_device_hd import PROMPTS, tiny_hd_model

CONTROL_FLOW = ("while", "cond")


def sub_jaxprs(eqn) -> list:
  """The jaxprs an equation holds (a loop's body, a branch, a jitted call's body)."""
  found = []
  for value in eqn.params.values():
    for item in value if isinstance(value, (tuple, list)) else (value,):
      if hasattr(item, "eqns"):
        found.append(item)
      elif hasattr(item, "jaxpr") and hasattr(item.jaxpr, "eqns"):
        found.append(item.jaxpr)
  return found


def control_flow(jaxpr) -> collections.Counter:
  """`while` and `cond` equations anywhere inside `jaxpr`, counted by primitive."""
  counts = collections.Counter()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in CONTROL_FLOW:
      counts[eqn.primitive.name] += 1
    for sub in sub_jaxprs(eqn):
      counts += control_flow(sub)
  return counts


def token_loops(jaxpr) -> list:
  """The `while` equations of `jaxpr` outside any other loop (through jitted calls)."""
  loops = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "while":
      loops.append(eqn)
    elif eqn.primitive.name not in CONTROL_FLOW:
      for sub in sub_jaxprs(eqn):
        loops += token_loops(sub)
  return loops


@pytest.fixture(params=["float32", "bfloat16"])
def tiny_gpu(request):
  yield from tiny_hd_model(dtype=request.param, engine=engine_settings(request.param, "gpu"))


class LoopCalled(Exception):
  """Raised in place of running a decode loop that `request_calls` recorded."""


def request_calls(lm, method: str, module) -> dict[str, tuple]:
  """The jitted prefill (`autoregressive.prefill`) and decode loop (`module.decode_chunk`) that one `method` request
  on `lm` calls, each as (jitted function, args, kwargs): the prefill runs, the loop is recorded and not run."""
  calls = {}

  def record(name: str, jitted):
    def run_or_stop(*args, **kwargs):
      calls[name] = (jitted, args, kwargs)
      if name == "loop":
        raise LoopCalled
      return jitted(*args, **kwargs)
    return run_or_stop

  with pytest.MonkeyPatch.context() as patch, speculative.database_scope("device"), pytest.raises(LoopCalled):
    patch.setattr(ar, "prefill", record("prefill", ar.prefill))
    patch.setattr(module, "decode_chunk", record("loop", module.decode_chunk))
    lm.generate([list(PROMPTS[0]) * 12], method=method, max_new_tokens=6)  # 360 tokens: two prefill blocks
  return calls


def traced_request(lm, method: str, module) -> tuple:
  """The jaxprs of the prefill and the decode loop that one `method` request on `lm` runs (`request_calls`)."""
  calls = request_calls(lm, method, module)
  return tuple(fn.trace(*args, **kwargs).jaxpr.jaxpr for fn, args, kwargs in (calls["prefill"], calls["loop"]))


@pytest.mark.parametrize("backend", ["gpu", "cpu"])
@pytest.mark.parametrize("method, module", [("ar", ar), ("hd", device_loop), ("pld", device_loop)])
def test_a_decoding_request_on_an_accelerator_has_one_loop_and_no_control_flow_inside_its_step(
    backend, method, module):
  """A request of `ar`, `hd` and `pld` traced with the GPU layout: the decode loop has one `while` (the token loop,
  one predicate per step) and no `while`/`cond` inside its body, and the prefill none at all (a `scan` has a known
  trip count). The CPU layout's step has per-layer `while`s inside (`control.run_if`) and its prefill skips the
  key blocks above the diagonal (a `while` per query block): what the accelerator layout removes."""
  for lm, _ in tiny_hd_model(dtype="bfloat16", engine=engine_settings("bfloat16", backend)):
    prefill, loop_jaxpr = traced_request(lm, method, module)
    (loop,) = token_loops(loop_jaxpr)
    inside = control_flow(loop.params["body_jaxpr"].jaxpr)
    if backend == "gpu":
      assert inside == collections.Counter() and control_flow(loop_jaxpr) == collections.Counter({"while": 1})
      assert control_flow(prefill) == collections.Counter()
    else:
      assert inside["while"] >= lm.cfg.n_layers and control_flow(prefill)["while"] >= lm.cfg.n_layers


@pytest.mark.parametrize("fused", [True, False])
def test_an_accelerator_decode_step_runs_its_gemms_per_layer_and_no_loop(fused):
  """One decode step of the GPU layout, lowered and compiled by XLA:CPU: per layer q/k/v as one GEMM (three
  unfused), o, gate/up as one (two), down and attention's two contractions, then the LM head; no `while` and no
  `conditional`. The same GEMMs in the StableHLO that a GPU or TPU compiles."""
  layout = dataclasses.replace(engine_settings("bfloat16", "gpu"), fused_qkv=fused, fused_gate_up=fused)
  cfg = hdjax.PRESETS["tiny"].replace(dtype="bfloat16", engine=layout)
  params = model.param_shapes(cfg)
  step = jax.jit(lambda p, cache, t_b: ar.decode_one(p, cfg, cache, t_b, jnp.ones(t_b.shape, bool)))
  lowered = step.lower(params, init_cache(cfg, 1, cfg.engine.min_rows), jnp.zeros((1,), jnp.int32))
  per_layer = (4 if fused else 7) + 2
  gemms = cfg.n_layers * per_layer + 1
  assert lowered.as_text().count("stablehlo.dot_general") == gemms
  assert profiling.hlo_counts(lowered.compile().as_text()) == profiling.HloCounts(gemms, 0, 0)


@pytest.mark.parametrize("method, module", [("ar", ar), ("hd", device_loop)])
def test_an_accelerator_request_compiles_to_one_host_read_per_step(method, module):
  """A request's programs on the GPU layout, compiled by XLA:CPU: the decode loop holds one `while` whose trip count
  XLA does not know (the token loop: one predicate read on the host per step on a GPU), no `conditional`, and one
  model step's GEMMs (`hd` verifies one tree shape); the prefill has no loop of unknown trip count."""
  for lm, _ in tiny_hd_model(dtype="bfloat16", engine=engine_settings("bfloat16", "gpu")):
    counts = {name: profiling.hlo_counts(fn.lower(*args, **kwargs).compile().as_text())
              for name, (fn, args, kwargs) in request_calls(lm, method, module).items()}
    assert counts["loop"] == profiling.HloCounts(gemms=lm.cfg.n_layers * 6 + 1, unknown_trip_loops=1, conditionals=0)
    assert counts["prefill"].unknown_trip_loops == counts["prefill"].conditionals == 0


def test_the_accelerator_layout_is_lossless_and_runs_one_step_shape(tiny_gpu):
  """On the GPU layout (run here on CPU) `hd` and `pld` return `ar`'s tokens, every step verifies one tree of 16
  rows, and drafts are still accepted (a tree node on its first chain is trusted)."""
  lm, _ = tiny_gpu
  prompts = [list(p) for p in PROMPTS]
  ref = lm.generate(prompts, method="ar", max_new_tokens=24)
  for method in ("hd", "pld"):
    with speculative.database_scope("device"):
      out = lm.generate(prompts, method=method, max_new_tokens=24)
    for r, o in zip(ref, out):
      assert o.token_ids == r.token_ids, method
      assert set(o.stats["bucket_counts"]) == {"16"}, method
    assert max(max(o.stats["accept_lengths"]) for o in out) > 1, method


@pytest.mark.parametrize("dtype", [pytest.param("float32", marks=pytest.mark.slow), "bfloat16"])
def test_exit_head_methods_on_the_accelerator_layout_return_ar_tokens(dtype):
  """`adadecode` with heads that exit at every head (gamma 0) and `hd+adadecode` on the GPU layout (run here on
  CPU) return that layout's `ar` tokens."""
  from tests.test_adadecode import _random_heads  # pylint: disable=import-outside-toplevel
  for lm, _ in tiny_hd_model(dtype=dtype, n_layers=8, engine=engine_settings(dtype, "gpu")):
    prompts = [list(p) for p in PROMPTS[1:]]
    ref = [r.token_ids for r in lm.generate(prompts, method="ar", max_new_tokens=20)]
    heads = _random_heads(0, lm.cfg.d_model, 30.0)
    early = lm.generate(prompts, method="adadecode", max_new_tokens=20, heads=heads, gamma=0.0, max_pending=3)
    assert [r.token_ids for r in early] == ref and all(r.stats["early_tokens"] > 0 for r in early)
    one_head = ExitHeads(heads.layers[1:2], heads.t_idd[1:2], heads.vocab_ids)
    with speculative.database_scope("device"):
      both = lm.generate(prompts, method="hd+adadecode", max_new_tokens=20, heads=one_head)
    assert [r.token_ids for r in both] == ref


def test_prompts_up_to_the_accelerator_min_rows_share_one_prefill_and_one_loop():
  """On the GPU layout prompts of 8 to 400 tokens pad to one prefill of ACCELERATOR_MIN_ROWS rows and one cache
  size, so `ar` traces its prefill and its loop once; the CPU layout traces a prefill per prompt bucket."""
  for backend, prefills in (("gpu", 1), ("cpu", 4)):
    for lm, _ in tiny_hd_model(dtype="float32", n_layers=2, engine=engine_settings("float32", backend)):
      jax.clear_caches()
      before = dict(compilation.TRACE_COUNTS)
      for n in (8, 40, 150, 400):
        lm.generate([[5 + i % 7 for i in range(n)]], method="ar", max_new_tokens=4)
      traced = {k: compilation.TRACE_COUNTS[k] - before.get(k, 0) for k in ("prefill", "decode_loop")}
      assert traced["prefill"] == prefills, (backend, traced)
      if backend == "gpu":
        assert traced["decode_loop"] == 1 and lm.cfg.engine.min_rows == config.ACCELERATOR_MIN_ROWS
