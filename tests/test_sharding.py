"""Sharded execution on 8 simulated CPU devices, in subprocesses, so the rest of the suite keeps one device.

Run as a script (`python tests/test_sharding.py JOB_JSON`) this file is the worker: it builds the models, runs
them unsharded and on each requested mesh, and prints one JSON object that the tests below check.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MESHES = ((8, 1), (4, 2), (2, 4), (1, 8))
# Heads, KV heads, MLP and vocab all divide 8: every rule applies on every mesh. SmolLM2's vocabulary and
# tokenizer, so that methods whose drafters need a tokenizer run too. The layer count is set per job: 2 for the
# fast tests, 20 where every method runs (LazyLLM prunes at layers up to 16 by default).
DIVISIBLE = dict(vocab_size=49152, d_model=512, n_heads=16, n_kv_heads=8, head_dim=32, ffn_dim=1024,
                 max_seq_len=256)


def run_worker(job: dict) -> dict:
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, os.path.abspath(__file__), json.dumps(job)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=900, check=False)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@functools.lru_cache(maxsize=None)
def cached_worker(job_json: str) -> dict:
  return run_worker(json.loads(job_json))


def worker(**job) -> dict:
  return cached_worker(json.dumps(job, sort_keys=True))


def registered_methods() -> list[str]:
  import hdjax  # pylint: disable=import-outside-toplevel
  return sorted(hdjax.METHODS)


# ---------------------------------------------------------------------------------------------- the rules
def spec(*axes):
  from jax.sharding import PartitionSpec  # pylint: disable=import-outside-toplevel
  return PartitionSpec(*axes)


@pytest.mark.parametrize("backend", ["cpu", "gpu"])
def test_rules_cover_every_param_of_the_model(backend):
  """Every param of each layout has its specs; a fused q/k/v weight is split over its kv heads (each device holds
  whole groups: their queries, key and value) and a fused gate/up weight over F."""
  import jax  # pylint: disable=import-outside-toplevel
  import hdjax  # pylint: disable=import-outside-toplevel
  from hdjax import model, sharding  # pylint: disable=import-outside-toplevel
  for name in ("tiny", "smollm2-135m", "llama-2-7b"):
    cfg = hdjax.PRESETS[name].replace(n_layers=1, engine=hdjax.engine_settings("float32", backend))
    shapes = model.param_shapes(cfg)
    specs = sharding.param_specs(shapes, jax.sharding.AbstractMesh((2, 4), sharding.MESH_AXES))
    leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(leaves) == len(jax.tree.leaves(shapes))
    assert all(isinstance(s, jax.sharding.PartitionSpec) for s in leaves)
    if backend == "gpu" and name == "llama-2-7b":
      assert specs["layers"][0]["qkv_dkch"] == spec(None, "model", None, None)
      assert specs["layers"][0]["gate_up_dcf"] == spec(None, None, "model")


def test_collision_fails_loudly():
  from hdjax import sharding  # pylint: disable=import-outside-toplevel
  from hdjax.errors import HdjaxError  # pylint: disable=import-outside-toplevel
  rules = tuple((name, "model" if name == "embed" else axis) for name, axis in sharding.RULES)
  with pytest.raises(HdjaxError, match="both map to mesh axis 'model'"):
    sharding.logical_to_spec(("embed", "heads", "head_dim"), (512, 16, 32), {"data": 2, "model": 4}, rules)
  with pytest.raises(HdjaxError, match="both map to mesh axis 'model'"):  # even where the mesh axis has size 1
    sharding.logical_to_spec(("embed", "mlp"), (512, 1024), {"data": 8, "model": 1}, rules)
  with pytest.raises(HdjaxError, match="no sharding rule"):
    sharding.logical_to_spec(("experts",), (8,), {"data": 2, "model": 4})
  with pytest.raises(HdjaxError, match="no logical axes"):
    sharding.param_logical_axes(("embedder", "unknown_w"))


def test_indivisible_dims_are_replicated_with_a_logged_reason(caplog):
  from hdjax import sharding  # pylint: disable=import-outside-toplevel
  caplog.set_level(logging.INFO, logger="hdjax.sharding")
  got = sharding.logical_to_spec(("layers", "embed", "heads", "head_dim"), (30, 576, 9, 64),
                                 {"data": 1, "model": 2}, what="param layers/q_dnh (smollm test)")
  assert got == spec(None, None, None, None)
  assert "heads=9 is not divisible by mesh axis model=2" in caplog.text
  assert sharding.logical_to_spec(("embed", "mlp"), (576, 1536), {"data": 1, "model": 2}) == spec(None, "model")


def test_mesh_sizes_are_checked():
  from hdjax import sharding  # pylint: disable=import-outside-toplevel
  from hdjax.errors import HdjaxError  # pylint: disable=import-outside-toplevel
  with pytest.raises(HdjaxError, match="does not cover"):
    sharding.make_mesh(3, 1)
  assert sharding.make_mesh().shape == {"data": 1, "model": 1}


def test_accelerator_dtype_survives_sharding():
  """bf16 params (fp32 norm scales) stay bf16 when placed on a mesh, and caches follow the config's dtype."""
  import jax  # pylint: disable=import-outside-toplevel
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  import hdjax  # pylint: disable=import-outside-toplevel
  from hdjax import kvcache, model, sharding  # pylint: disable=import-outside-toplevel
  from hdjax.api import params_to_device  # pylint: disable=import-outside-toplevel
  cfg = hdjax.PRESETS["tiny"].replace(dtype="bfloat16", engine=hdjax.engine_settings("bfloat16", "gpu"))
  mesh = sharding.make_mesh()
  params_np = jax.device_get(jax.jit(model.init_params, static_argnums=0)(cfg.replace(dtype="float32"),
                                                                          jax.random.key(0)))
  params = params_to_device(params_np, cfg, mesh)
  assert params["layers"][0]["qkv_dkch"].dtype == jnp.bfloat16
  assert params["layers"][0]["attn_norm"]["scale"].dtype == jnp.float32
  assert isinstance(params["layers"][0]["qkv_dkch"].sharding, jax.sharding.NamedSharding)
  with sharding.use_mesh(mesh):
    cache = kvcache.init_cache(cfg, 2, 16)
  assert cache.k.dtype == jnp.bfloat16 and cache.k.sharding.mesh.shape == mesh.shape


# ---------------------------------------------------------------- 8 simulated devices, divisible config
def expected_param_specs(model: int) -> dict[str, tuple]:
  """Hand-written from the rules (independent of the code): model-parallel vocab / heads / mlp."""
  m = "model" if model > 1 else None
  return {
      "embedder/embedding_vd": (m, None),
      "embedder/lm_head_dv": (None, m),
      "embedder/final_norm/scale": (None,),
      "layers/q_dnh": (None, m, None),
      "layers/k_dkh": (None, m, None),
      "layers/v_dkh": (None, m, None),
      "layers/o_nhd": (m, None, None),
      "layers/gate_df": (None, m),
      "layers/up_df": (None, m),
      "layers/down_fd": (m, None),
      "layers/attn_norm/scale": (None,),
      "layers/mlp_norm/scale": (None,),
  }


def divisible_job(methods, gen_meshes, layers, max_new_tokens=10):
  return dict(model="divisible", layers=layers, meshes=[list(m) for m in MESHES], methods=list(methods),
              gen_meshes=[f"{m[0]}x{m[1]}" for m in gen_meshes], max_new_tokens=max_new_tokens, batch=4)


@pytest.fixture(scope="module")
def divisible_logits():
  return worker(**divisible_job(["ar"], [(2, 4)], layers=2))


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_sharded_logits_match_single_device(divisible_logits, mesh):
  got = divisible_logits["meshes"][f"{mesh[0]}x{mesh[1]}"]
  assert got["logits_max_abs_err"] < 1e-5
  assert got["logits_argmax_equal"]


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
def test_param_and_cache_shardings_follow_the_rules(divisible_logits, mesh):
  got = divisible_logits["meshes"][f"{mesh[0]}x{mesh[1]}"]
  data, model = mesh
  want = {k: list(v) for k, v in expected_param_specs(model).items()}
  assert got["param_specs"] == want
  d = "data" if data > 1 and 4 % data == 0 else None  # the cache's batch of 4 does not divide data=8
  m = "model" if model > 1 else None
  assert got["prefill_cache_specs"] == {"k": [None, d, m, None, None], "v": [None, d, m, None, None],
                                        "lengths": [d]}
  assert got["cache_shardings_equal"]
  assert got["params_bytes_per_device"] * model == pytest.approx(got["params_bytes_total"], rel=0.02)


def test_ar_same_greedy_ids_sharded(divisible_logits):
  check_method_result(divisible_logits, "ar")


@pytest.mark.slow
@pytest.mark.parametrize("method", registered_methods())
def test_every_method_same_greedy_ids_on_every_mesh(method):
  out = worker(**divisible_job([method], MESHES, layers=20))
  for mesh in MESHES:
    check_method_result(out, method, f"{mesh[0]}x{mesh[1]}")


def check_method_result(out: dict, method: str, mesh: str = "2x4"):
  res = out["methods"][method]
  if "skipped" in res:
    pytest.skip(f"{method} cannot run on a random model: {res['skipped']}")
  assert res[mesh]["token_ids"] == res["reference"]["token_ids"], f"{method} on mesh {mesh}"
  assert res[mesh]["retraces_on_second_call"] == 0


@pytest.mark.slow  # ~60 s; test_rules_cover_every_param_of_the_model checks the fused weights' specs by default
def test_fused_accelerator_layout_sharded():
  """The accelerator layout (q/k/v and gate/up fused) on a 2x4 mesh: the fused weights split over kv heads and F,
  logits equal one device's, `ar` returns one device's tokens."""
  out = worker(model="divisible", backend="gpu", layers=2, meshes=[[2, 4]], methods=["ar"], gen_meshes=["2x4"],
               max_new_tokens=10, batch=4)
  got = out["meshes"]["2x4"]
  assert got["param_specs"]["layers/qkv_dkch"] == [None, "model", None, None]
  assert got["param_specs"]["layers/gate_up_dcf"] == [None, None, "model"]
  assert got["param_specs"]["layers/o_nhd"] == ["model", None, None]
  assert got["logits_max_abs_err"] < 1e-5 and got["logits_argmax_equal"]
  check_method_result(out, "ar")


# ------------------------------------------------------------------------------ SmolLM2: 9 / 3 heads
SMOL_MESH = (4, 2)


@pytest.fixture(scope="module")
def smollm_sharded():
  return worker(model="smollm2-135m", meshes=[list(SMOL_MESH)], methods=["ar"], gen_meshes=["4x2"],
                max_new_tokens=8, batch=1)


@pytest.mark.slow  # the tiny model's sharded tests above cover the sharding path in the default run
def test_smollm2_sharded_logits_and_ar(smollm_sharded):
  got = smollm_sharded["meshes"]["4x2"]
  # Heads (9) and KV heads (3) do not divide model=2: attention is replicated; vocab and MLP are sharded.
  assert got["param_specs"]["layers/q_dnh"] == [None, None, None]
  assert got["param_specs"]["layers/k_dkh"] == [None, None, None]
  assert got["param_specs"]["layers/gate_df"] == [None, "model"]
  assert got["param_specs"]["embedder/embedding_vd"] == ["model", None]
  assert "embedder/lm_head_dv" not in got["param_specs"]  # tied
  assert got["logits_max_abs_err"] < 1e-4 * max(1.0, got["logits_max_abs"])
  assert got["logits_argmax_equal"]
  res = smollm_sharded["methods"]["ar"]
  assert res["4x2"]["token_ids"] == res["reference"]["token_ids"]
  assert "heads=9 is not divisible by mesh axis model=2" in smollm_sharded["log"]


@pytest.mark.slow
@pytest.mark.parametrize("method", registered_methods())
def test_smollm2_every_method_every_mesh(method):
  out = worker(model="smollm2-135m", meshes=[list(m) for m in MESHES], methods=[method],
               gen_meshes=[f"{m[0]}x{m[1]}" for m in MESHES], max_new_tokens=16, batch=2)
  for mesh in MESHES:
    check_method_result(out, method, f"{mesh[0]}x{mesh[1]}")


# ----------------------------------------------------------------------------------------------- worker
def _worker_main(job: dict) -> dict:
  # pylint: disable=import-outside-toplevel
  import io
  import jax
  import numpy as np
  import hdjax
  from hdjax import kvcache, model, sharding
  from hdjax.api import LM, pad_prompts, params_to_device, resolve_path
  from hdjax.weights import gguf, tokenizer
  from hdjax import compilation
  from hdjax.decoding import autoregressive as ar
  from hdjax.errors import HdjaxError

  log_buf = io.StringIO()
  handler = logging.StreamHandler(log_buf)
  logging.getLogger("hdjax.sharding").addHandler(handler)
  logging.getLogger("hdjax.sharding").setLevel(logging.INFO)
  assert jax.device_count() == 8, jax.devices()

  if job["model"] == "divisible":
    cfg = hdjax.PRESETS["tiny"].replace(n_layers=job["layers"], **DIVISIBLE)
    if "backend" in job:
      cfg = cfg.replace(engine=hdjax.engine_settings(cfg.dtype, job["backend"]))
    params_np = jax.device_get(model.init_params(cfg, jax.random.key(0)))
    tok = tokenizer.from_gguf_fields(gguf.read_fields(gguf.open_reader(resolve_path("smollm2-135m"))))
    reference = LM(cfg, params_to_device(params_np, cfg), tok, name="divisible")

    def sharded(mesh):
      return LM(cfg, params_to_device(params_np, cfg, mesh), tok, name="divisible", mesh=mesh)
  else:
    first = sharding.make_mesh(*job["meshes"][0])
    loaded = hdjax.load(job["model"], dtype="float32", mesh=first, max_seq_len=1024)
    cfg = loaded.cfg
    reference = LM(cfg, jax.device_put(loaded.params, jax.devices()[0]), loaded.tokenizer)

    def sharded(mesh):
      if mesh.shape == first.shape:
        return loaded
      return LM(cfg, sharding.shard_params(loaded.params, mesh), loaded.tokenizer, mesh=mesh)

  prompts = [reference.tokenizer.apply_chat_template([{"role": "user", "content": text}]) for text in (
      "Write a haiku about the sea.", "List three prime numbers.", "What is JAX?", "Say hi.")[:job["batch"]]]
  out = {"meshes": {}, "methods": {}}
  ref_logits = reference.logits(prompts[0])

  def run(lm, method):
    res = lm.generate(prompts, method=method, max_new_tokens=job["max_new_tokens"], temperature=0.0)
    before = sum(compilation.TRACE_COUNTS.values())
    again = lm.generate(prompts, method=method, max_new_tokens=job["max_new_tokens"], temperature=0.0)
    assert [r.token_ids for r in again] == [r.token_ids for r in res]
    return {"token_ids": [r.token_ids for r in res], "retraces_on_second_call": sum(compilation.TRACE_COUNTS.values()) - before}

  for method in job["methods"]:
    try:
      out["methods"][method] = {"reference": run(reference, method)}
    except HdjaxError as e:
      out["methods"][method] = {"skipped": str(e)}

  for shape in job["meshes"]:
    mesh = sharding.make_mesh(*shape)
    lm = sharded(mesh)
    name = f"{shape[0]}x{shape[1]}"
    logits = lm.logits(prompts[0])
    tokens, lengths = pad_prompts([p[:8] for p in (prompts * 4)[:4]], cfg.pad_id, 8)  # a cache of batch 4
    with sharding.use_mesh(mesh):
      _, cache = ar.prefill(lm.params, cfg, tokens, lengths, 64)
    expected = kvcache.cache_shardings(mesh, cfg, 4, 64)  # what an in/out_shardings would be given
    flat = jax.tree_util.tree_flatten_with_path(sharding.describe(lm.params),
                                                is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))[0]
    out["meshes"][name] = {
        "logits_max_abs_err": float(np.abs(logits - ref_logits).max()),
        "logits_max_abs": float(np.abs(ref_logits).max()),
        "logits_argmax_equal": bool((logits.argmax(-1) == ref_logits.argmax(-1)).all()),
        # one name per param of every layer (each layer has its own buffers, all sharded alike)
        "param_specs": {"/".join(str(k.key) for k in path if hasattr(k, "key")): _padded_spec(s, len(x.shape))
                        for (path, s), x in
                        zip(flat, jax.tree.leaves(lm.params))},
        "prefill_cache_specs": {f: _padded_spec(getattr(cache, f).sharding.spec, getattr(cache, f).ndim)
                                for f in ("k", "v", "lengths")},
        "cache_shardings_equal": all(getattr(cache, f).sharding.is_equivalent_to(getattr(expected, f), getattr(
            cache, f).ndim) for f in ("k", "v", "lengths")),
        "params_bytes_per_device": sharding.bytes_per_device(lm.params),
        "params_bytes_total": sum(x.nbytes for x in jax.tree.leaves(lm.params)),
    }
    for method, res in out["methods"].items():
      if "skipped" not in res and name in job["gen_meshes"]:
        res[name] = run(lm, method)
  out["log"] = log_buf.getvalue()
  return out


def _padded_spec(spec_, ndim: int) -> list:
  return list(spec_) + [None] * (ndim - len(spec_))


if __name__ == "__main__":
  print(json.dumps(_worker_main(json.loads(sys.argv[1]))))
