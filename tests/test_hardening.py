"""Issue 18, library side: every bad input to `load` / `generate` / the artifact loaders is one `HdjaxError`
(naming the file or tensor), never another exception, a hang, or a silent wrong answer."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import hdjax
from hdjax import api
from hdjax import exit_heads
from hdjax.adadecode import heads as heads_lib
from hdjax.adadecode import train
from hdjax.decoding.registry import METHODS, register_method
from hdjax.drafting import model_db, stats_db, store
from hdjax.streaming import stream_generate
from hdjax.weights import checkpoint, convert, gguf, safetensors_dir
from tests.conftest import make_tiny_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = dict(vocab_size=32, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8, ffn_dim=32, max_seq_len=64)


def small_state(lm) -> dict[str, np.ndarray]:
  return {k: np.array(v) for k, v in convert.hf_state_from_params(lm.cfg, lm.params).items()}  # writable copies


@pytest.fixture(scope="module")
def small():
  return make_tiny_lm(seed=1, **SMALL)


# ------------------------------------------------------------------------------------------------ generate
@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=float("nan")), "bad sampling"),
    (dict(temperature=float("inf")), "bad sampling"),
    (dict(temperature=-1.0), "bad sampling"),
    (dict(top_p=float("nan")), "bad sampling"),
    (dict(top_p=0.0), "bad sampling"),
    (dict(top_k=10_000), "bad sampling"),  # larger than the vocabulary
    (dict(top_k=2.5), "bad sampling"),
    (dict(seed=1.5), "seed must be an integer"),
    (dict(seed=2 ** 64), "seed must be an integer"),
    (dict(max_new_tokens=2.0), "max_new_tokens"),
    (dict(chunk_tokens=0), "chunk_tokens must be >= 1"),
    (dict(chunk_tokens=-3), "chunk_tokens must be >= 1"),
    (dict(method="hd", max_deph=3), "has no option max_deph; its options: buckets"),
    (dict(method="ar", max_depth=3), "has no option max_depth"),
    (dict(method="hd", max_pending=2), "has no option max_pending"),  # an AdaDecode option
    (dict(method="lazy", buckets=(1, 4)), "has no option buckets"),
    (dict(method="hd", max_depth="3"), "option max_depth='3'"),
    (dict(method="hd", max_depth=float("nan")), "option max_depth=nan"),
    (dict(method="adadecode", gamma=float("nan")), "option gamma=nan"),
    (dict(method="lazy", keep_ratios=[0.5, "a"]), "option keep_ratios"),
    (dict(method=["ar"]), "unknown method"),
])
def test_generate_rejects_bad_settings(small, kwargs, message):
  with pytest.raises(hdjax.HdjaxError, match=re.escape(message)):
    small.generate([[1, 2, 3]], **{"max_new_tokens": 4, **kwargs})


@pytest.mark.parametrize("prompts, message", [
    ([[1.7, 2]], "token ids must be integers, got 1.7"),
    ([["5"]], "token ids must be integers, got '5'"),
    ([[1, None]], "token ids must be integers, got None"),
    ([[True, 2]], "token ids must be integers, got True"),
    ([1, 2, 3], "a prompt must be a list of token ids"),
    ("abc", "prompts must be a non-empty list"),
    ([], "prompts must be a non-empty list"),
])
def test_generate_rejects_non_integer_token_ids(small, prompts, message):
  with pytest.raises(hdjax.HdjaxError, match=re.escape(message)):
    small.generate(prompts, max_new_tokens=2)
  if isinstance(prompts, list) and prompts and isinstance(prompts[0], list):
    with pytest.raises(hdjax.HdjaxError, match=re.escape(message)):
      small.logits(prompts[0])


def test_numpy_integer_prompts_still_work(small):
  ids = small.generate(np.asarray([[1, 2, 3]], np.int64), max_new_tokens=2)[0].token_ids
  assert ids == small.generate([[1, 2, 3]], max_new_tokens=2)[0].token_ids
  assert small.logits(np.asarray([1, 2], np.int32)).shape == (2, SMALL["vocab_size"])


def test_streaming_with_a_non_positive_chunk_fails_instead_of_hanging(small):
  with pytest.raises(hdjax.HdjaxError, match="chunk_tokens must be >= 1"):
    list(stream_generate(small, [1, 2, 3], max_new_tokens=4, chunk_tokens=0))


def test_every_option_a_method_reads_is_accepted_by_a_method():
  """The accepted-option table comes from the methods' config dataclasses plus the names below; every
  `request.option("name"` in the sources must be in it, so a new option cannot be rejected as a typo."""
  read = set()
  for folder, _, files in os.walk(os.path.join(ROOT, "hdjax")):
    for name in files:
      if name.endswith(".py"):
        with open(os.path.join(folder, name), encoding="utf-8") as f:
          read |= set(re.findall(r"request\.option\(\s*[\"'](\w+)[\"']", f.read()))
  accepted = set().union(*api.METHOD_OPTIONS.values())
  assert read and read <= accepted, read - accepted
  assert {"ar", "pld", "hd", "hd_context", "lazy", "full", "adadecode", "hd+adadecode", "lazy+hd"} <= set(
      api.METHOD_OPTIONS)


# ------------------------------------------------------------------------------------------------ load
def test_gguf_with_a_nan_weight_names_the_tensor(small, tmp_path):
  state = small_state(small)
  state["model.layers.0.mlp.up_proj.weight"][3, 4] = np.nan
  path = str(tmp_path / "nan.gguf")
  gguf.write_gguf(path, small.cfg, state)
  with pytest.raises(hdjax.HdjaxError, match=r"model\.layers\.0\.mlp\.up_proj\.weight holds 1 non-finite"):
    hdjax.load(path)


def write_hf(path, small, config_changes=None, state=None, raw_config=None):
  safetensors_dir.save_hf_dir(str(path), small.cfg, state or small_state(small))
  if raw_config is not None or config_changes:
    text = raw_config if raw_config is not None else json.dumps({**small.cfg.to_hf(), **config_changes})
    (path / "config.json").write_text(text)
  return str(path)


@pytest.mark.parametrize("changes, raw, message", [
    (dict(intermediate_size=48), None, "tensor model.layers.0.mlp.gate_proj.weight has shape (32, 16), the config "
                                       "needs (48, 16)"),
    (dict(num_key_value_heads=0), None, "n_kv_heads=0 must be an integer >= 1"),
    (dict(num_attention_heads=-2), None, "n_heads=-2"),
    (dict(hidden_size="16"), None, "hidden_size='16' must be an integer"),
    (dict(intermediate_size=31.5), None, "intermediate_size=31.5 must be an integer"),
    (dict(vocab_size=None), None, "lacks required key 'vocab_size'"),
    (dict(eos_token_id=[2, "x"]), None, "wrong type"),
    (dict(rope_theta=float("nan")), None, "rope_theta=nan"),
    ({}, "{not json", "config.json is not readable JSON"),
    ({}, "[1, 2]", "must hold a JSON object"),
    ({}, json.dumps({"model_type": "llama", "hidden_size": 16}), "lacks required key"),
])
def test_hf_config_errors_name_the_file(small, tmp_path, changes, raw, message):
  path = write_hf(tmp_path / "hf", small, changes, raw_config=raw)
  with pytest.raises(hdjax.HdjaxError, match=re.escape(message)):
    hdjax.load(path)


def test_hf_weights_with_inf_and_bad_index(small, tmp_path):
  state = small_state(small)
  state["model.norm.weight"][0] = np.inf
  with pytest.raises(hdjax.HdjaxError, match=r"model\.norm\.weight holds 1 non-finite"):
    hdjax.load(write_hf(tmp_path / "inf", small, state=state))
  path = write_hf(tmp_path / "idx", small)
  (tmp_path / "idx" / safetensors_dir.INDEX).write_text('{"weight_map": [1]}')
  with pytest.raises(hdjax.HdjaxError, match="has no weight_map"):
    hdjax.load(path)
  (tmp_path / "idx" / "tokenizer.json").write_text("{broken")
  (tmp_path / "idx" / safetensors_dir.INDEX).unlink()
  with pytest.raises(hdjax.HdjaxError, match="tokenizer.json is not a valid tokenizer file"):
    hdjax.load(path)


def test_orbax_model_dir_with_only_its_config_or_a_bad_config(small, tmp_path):
  path = tmp_path / "ckpt"
  checkpoint.save_params(str(path), small.cfg, small.params)
  assert hdjax.load(str(path)).cfg.d_model == SMALL["d_model"]
  only_config = tmp_path / "only_config"
  only_config.mkdir()
  (only_config / checkpoint.CONFIG_FILE).write_text((path / checkpoint.CONFIG_FILE).read_text())
  with pytest.raises(hdjax.HdjaxError, match="no params/ directory"):
    hdjax.load(str(only_config))
  (only_config / "params").mkdir()
  with pytest.raises(hdjax.HdjaxError, match="cannot restore the params"):
    hdjax.load(str(only_config))
  cfg = json.loads((path / checkpoint.CONFIG_FILE).read_text())
  for change in (dict(ffn_dim=48), dict(vocab_size=30), dict(n_layers=2)):  # shapes disagree with the params
    (path / checkpoint.CONFIG_FILE).write_text(json.dumps({**cfg, **change}))
    with pytest.raises(hdjax.HdjaxError, match="cannot restore the params|has shape"):
      hdjax.load(str(path))
  (path / checkpoint.CONFIG_FILE).write_text(json.dumps({k: v for k, v in cfg.items() if k != "eos_ids"}))
  with pytest.raises(hdjax.HdjaxError, match="is not a valid hdjax config"):
    hdjax.load(str(path))
  (path / checkpoint.CONFIG_FILE).write_text("{")
  with pytest.raises(hdjax.HdjaxError, match="is not readable JSON"):
    hdjax.load(str(path))


def test_gguf_with_invalid_utf8_metadata_or_zero_kv_heads(small, tmp_path):
  path = tmp_path / "utf8.gguf"
  gguf.write_gguf(str(path), small.cfg, small_state(small), tokenizer_fields={"general.name": "hdjax-tiny-xyz"})
  data = path.read_bytes()
  path.write_bytes(data.replace(b"hdjax-tiny-xyz", b"hdjax-tiny-\xff\xfe\xfd"))
  with pytest.raises(hdjax.HdjaxError, match="corrupt GGUF metadata 'general.name'"):
    hdjax.load(str(path))
  zero_kv = tmp_path / "kv0.gguf"
  gguf.write_gguf(str(zero_kv), small.cfg.replace(n_kv_heads=2), small_state(small))
  data = zero_kv.read_bytes()
  key = b"llama.attention.head_count_kv"
  at = data.index(key) + len(key) + 4  # the uint32 value follows its 4-byte type tag
  zero_kv.write_bytes(data[:at] + (0).to_bytes(4, "little") + data[at + 4:])
  with pytest.raises(hdjax.HdjaxError, match="n_kv_heads=0"):
    hdjax.load(str(zero_kv))


def test_gguf_whose_kv_heads_disagree_with_the_tensors(small, tmp_path):
  path = str(tmp_path / "kv.gguf")
  gguf.write_gguf(path, small.cfg.replace(n_kv_heads=2), small_state(small))  # k_proj holds 1 KV head
  with pytest.raises(hdjax.HdjaxError, match=r"GGUF tensor blk\.0\.attn_k\.weight has shape"):
    hdjax.load(path)


def test_load_rejects_bad_arguments_and_foreign_meshes(tmp_path, small):
  import jax  # pylint: disable=import-outside-toplevel
  path = str(tmp_path / "m.gguf")
  gguf.write_gguf(path, small.cfg, small_state(small))
  for kwargs, message in [(dict(dtype="int8"), "dtype must be"), (dict(max_seq_len=0), "max_seq_len"),
                          (dict(mesh="data"), "mesh must be a jax.sharding.Mesh"),
                          (dict(mesh=jax.make_mesh((1, 1), ("x", "y"))), "mesh axes must be")]:
    with pytest.raises(hdjax.HdjaxError, match=message):
      hdjax.load(path, **kwargs)
  with pytest.raises(hdjax.HdjaxError, match="model must be a name or a path"):
    hdjax.load(3)


MESH_WORKER = """
import json, sys
import jax, numpy as np
import hdjax
path, ids = sys.argv[1], list(range(1, 20))
ref = hdjax.load(path, dtype="float32").logits(ids)
out = {}
for names in (("data", "model"), ("model", "data")):  # jax's own meshes: Explicit axes, either order
  lm = hdjax.load(path, dtype="float32", mesh=jax.make_mesh((4, 2), names))
  out["/".join(names)] = float(np.abs(lm.logits(ids) - ref).max())
print(json.dumps(out))
"""


def test_any_jax_mesh_with_the_two_axis_names_works(tmp_path):
  """`jax.make_mesh` gives Explicit axes in current jax; the embedding gather used to raise ShardingTypeError."""
  cfg = dict(SMALL, vocab_size=64, n_heads=4, n_kv_heads=2, d_model=32)
  lm = make_tiny_lm(seed=2, **cfg)  # heads, KV heads, MLP and vocab all divide both mesh axes
  path = str(tmp_path / "mesh.gguf")
  gguf.write_gguf(path, lm.cfg, small_state(lm))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", MESH_WORKER, path], env=env, cwd=ROOT, capture_output=True, text=True,
                        timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  diffs = json.loads(proc.stdout.strip().splitlines()[-1])
  assert max(diffs.values()) < 1e-4, diffs


# ------------------------------------------------------------------------------------------------ exit heads
def test_exit_heads_partial_bad_meta_or_nan(tmp_path):
  cfg = hdjax.PRESETS["tiny"]
  good = exit_heads.identity_heads(cfg, (1, 2))
  path = tmp_path / "heads"
  heads_lib.save_heads(str(path), good, "tok")
  assert heads_lib.load_heads(str(path), cfg).layers == (1, 2)
  meta = json.loads((path / heads_lib.META_FILE).read_text())
  for text, message in [("{", "is not readable JSON"), ("[]", "must hold a JSON object"),
                        (json.dumps({**meta, "layers": "1,2"}), "needs 'layers'"),
                        (json.dumps({k: v for k, v in meta.items() if k != "d_model"}), "needs 'layers'"),
                        (json.dumps({**meta, "layers": [2, 1]}), "must be increasing"),
                        (json.dumps({**meta, "layers": [1, 2, 3]}), "have shape (2, 64, 64) (need (3, 64, 64))")]:
    (path / heads_lib.META_FILE).write_text(text)
    with pytest.raises(hdjax.HdjaxError, match=re.escape(message)):
      heads_lib.load_heads(str(path), cfg)
  partial = tmp_path / "partial"
  partial.mkdir()
  (partial / heads_lib.META_FILE).write_text(json.dumps(meta))
  with pytest.raises(hdjax.HdjaxError, match="no t_idd/ directory"):
    heads_lib.load_heads(str(partial), cfg)
  (partial / heads_lib.PARAMS_DIR).mkdir()
  with pytest.raises(hdjax.HdjaxError, match="cannot restore the exit heads"):
    heads_lib.load_heads(str(partial), cfg)
  nan = exit_heads.ExitHeads((1, 2), np.full((2, cfg.d_model, cfg.d_model), np.nan, np.float32))
  heads_lib.save_heads(str(tmp_path / "nan"), nan, "tok")
  with pytest.raises(hdjax.HdjaxError, match="non-finite"):
    heads_lib.load_heads(str(tmp_path / "nan"), cfg)


def test_resuming_exit_head_training_with_other_heads_fails_cleanly(tmp_path):
  lm = make_tiny_lm(seed=1, **SMALL)
  cfg = lm.cfg
  rng = np.random.default_rng(0)
  data = lambda n: train.HiddenSet(rng.normal(size=(n, 8, cfg.d_model)).astype(np.float32),  # noqa: E731
                                   rng.normal(size=(8, cfg.d_model)).astype(np.float32))
  kw = dict(steps=2, batch=4, lr=1e-3, warmup_frac=0.0, weight_decay=0.0, seed=0, ckpt_dir=str(tmp_path / "ckpt"),
            ckpt_every=1)
  assert train.latest_step(str(tmp_path / "ckpt")) == 0
  train.fit(lm.params, cfg, data(1), stop_after=1, **kw)
  assert train.latest_step(str(tmp_path / "ckpt")) == 1
  with pytest.raises(hdjax.HdjaxError, match="cannot resume from .* with 2 heads"):
    train.fit(lm.params, cfg, data(2), **kw)


# ------------------------------------------------------------------------------------------------ databases
class FakeTokenizer:
  identity = "tok"


def test_inconsistent_model_database_is_rejected(tmp_path):
  db = model_db.ModelDB(model_db.NgramConfig(), "tok")
  db.add_sequence([5, 6, 7, 8, 9, 5, 6, 7])
  arrays = db.to_arrays()
  for name, bad in [("counts", arrays["counts"][:-1]), ("conts", arrays["conts"][:, :0]),
                    ("keys", arrays["keys"].astype(np.float32)), ("key_orders", np.asarray([3], np.int32)),
                    ("keys", np.full_like(arrays["keys"], -5))]:
    path = tmp_path / f"{name}.npz"
    store.save_arrays(path, model_db.KIND, "tok", {**arrays, name: bad})
    with pytest.raises(hdjax.HdjaxError, match=f"corrupt database file {re.escape(str(path))}"):
      model_db.ModelDB.load(FakeTokenizer(), path)


def test_inconsistent_stats_database_is_rejected(tmp_path):
  tokens = np.asarray([1, 2, 3, 1, 2, 4, -1, 1, 2, 3], np.int64)
  arrays = stats_db.from_stream(tokens, stats_db.StatsConfig(), "tok").to_arrays()
  for name, bad in [("o2_offsets", arrays["o2_offsets"][:-1]), ("o1_counts", arrays["o1_counts"][1:]),
                    ("o2_offsets", arrays["o2_offsets"][::-1].copy()), ("params", arrays["params"][:2])]:
    path = tmp_path / f"{name}.npz"
    store.save_arrays(path, stats_db.KIND, "tok", {**arrays, name: bad})
    with pytest.raises(hdjax.HdjaxError, match="corrupt database file"):
      stats_db.StatsDB.load(FakeTokenizer(), path)


def test_a_database_that_cannot_load_warns_once_on_stderr(tmp_path, capsys):
  path = tmp_path / "model_db.npz"
  path.write_bytes(b"not a zip")
  for _ in range(3):
    with pytest.raises(hdjax.HdjaxError):
      model_db.ModelDB.load(FakeTokenizer(), path)
  warnings = [l for l in capsys.readouterr().err.splitlines() if l.startswith("warning: ")]
  assert len(warnings) == 1 and "model_db unavailable" in warnings[0] and str(path) in warnings[0]


def test_a_method_name_is_registered_once():
  before = METHODS["ar"]
  with pytest.raises(hdjax.HdjaxError, match="already registered"):
    register_method("ar")
  assert METHODS["ar"] is before
