"""Loaders: GGUF (quant types, RoPE permutation), HF safetensors (single and sharded), orbax, tokenizers."""

from __future__ import annotations

import json
import os

import gguf as gguf_pkg
import jax
import numpy as np
import pytest

import hdjax
from hdjax import HdjaxError
from hdjax.weights import checkpoint, convert, gguf, safetensors_dir
from tests.conftest import make_tiny_lm
from tests.numpy_reference import numpy_logits

IDS = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38]


def _leaves_close(a, b, atol):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=atol)


@pytest.mark.parametrize("shard_size", [None, 7])
def test_safetensors_round_trip_matches_hf_transformers(tmp_path, shard_size):
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  lm = make_tiny_lm(seed=5)
  state = convert.hf_state_from_params(lm.cfg, lm.params)
  safetensors_dir.save_hf_dir(str(tmp_path), lm.cfg, state, shard_size=shard_size)
  loaded = hdjax.load(str(tmp_path), dtype="float32")
  assert loaded.cfg.replace(eos_ids=lm.cfg.eos_ids) == lm.cfg
  _leaves_close(loaded.params, lm.params, 0)
  ref = transformers.LlamaForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
  with torch.no_grad():
    hf_logits = ref(torch.tensor([IDS])).logits[0].numpy()
  np.testing.assert_allclose(loaded.logits(IDS), hf_logits, atol=1e-4)


@pytest.mark.parametrize("qtype,atol", [("F32", 1e-6), ("F16", 2e-3), ("Q8_0", 2e-2), ("Q4_0", 0.3), ("Q4_1", 0.3)])
def test_gguf_round_trip(tmp_path, qtype, atol):
  lm = make_tiny_lm(seed=6)
  state = convert.hf_state_from_params(lm.cfg, lm.params)
  path = str(tmp_path / "tiny.gguf")
  gguf.write_gguf(path, lm.cfg, state, qtype=qtype)
  cfg, loaded_state, _ = gguf.load_gguf(path)
  assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings) == (4, 4, 2, False)
  for name, w in state.items():
    err = np.abs(loaded_state[name] - w).max() / max(np.abs(w).max(), 1e-6)
    assert err <= atol, (name, err)
  loaded = hdjax.load(path, dtype="float32")
  np.testing.assert_allclose(loaded.logits(IDS), numpy_logits(loaded_state, cfg, IDS), atol=1e-4)


def test_rope_permutation_is_inverted():
  w = np.random.default_rng(0).normal(size=(4 * 16, 64)).astype(np.float32)
  assert not np.array_equal(gguf.permute_rope(w, 4), w)
  np.testing.assert_array_equal(gguf.unpermute_rope(gguf.permute_rope(w, 4), 4), w)


def test_orbax_round_trip(tmp_path):
  lm = make_tiny_lm(seed=7)
  checkpoint.save_params(str(tmp_path / "ckpt"), lm.cfg, lm.params)
  loaded = hdjax.load(str(tmp_path / "ckpt"), dtype="float32")
  assert loaded.cfg.replace(eos_ids=lm.cfg.eos_ids) == lm.cfg
  _leaves_close(loaded.params, lm.params, 0)
  np.testing.assert_allclose(loaded.logits(IDS), lm.logits(IDS), atol=1e-6)


def test_orbax_checkpoint_of_a_fused_layout_holds_the_weights_unfused(tmp_path):
  """Params in the accelerator layout (q/k/v and gate/up fused) are saved input-major and unfused, and load into the
  CPU layout with the same values."""
  lm = make_tiny_lm(seed=7)
  gpu = lm.cfg.replace(engine=hdjax.engine_settings("float32", "gpu"))
  checkpoint.save_params(str(tmp_path / "ckpt"), gpu, hdjax.api.params_to_device(jax.device_get(lm.params), gpu))
  cfg, params = checkpoint.restore_params(str(tmp_path / "ckpt"))
  assert not (cfg.engine.fused_qkv or cfg.engine.fused_gate_up or cfg.engine.weights_out_major)
  assert set(params["layers"][0]) == {"attn_norm", "mlp_norm", "q_dnh", "k_dkh", "v_dkh", "o_nhd", "gate_df", "up_df",
                                      "down_fd"}
  loaded = hdjax.load(str(tmp_path / "ckpt"), dtype="float32")
  assert loaded.cfg.replace(eos_ids=lm.cfg.eos_ids) == lm.cfg
  _leaves_close(loaded.params, lm.params, 0)


def test_hf_dir_tokenizer_and_templates(tmp_path, smollm):
  lm = make_tiny_lm(seed=8)
  safetensors_dir.save_hf_dir(str(tmp_path), lm.cfg, convert.hf_state_from_params(lm.cfg, lm.params))
  smollm.tokenizer.tok.save(str(tmp_path / "tokenizer.json"))
  with open(tmp_path / "tokenizer_config.json", "w") as f:
    json.dump({"chat_template": "vicuna"}, f)
  loaded = hdjax.load(str(tmp_path), dtype="float32")
  assert loaded.tokenizer.encode("hello world 42") == smollm.tokenizer.encode("hello world 42")
  text = loaded.tokenizer.render_chat([{"role": "user", "content": "hi"}])
  assert text.startswith("A chat between") and text.endswith("USER: hi ASSISTANT:")


def test_llama2_template_renders_system_and_turns(smollm):
  from hdjax.weights.tokenizer import CHAT_TEMPLATES, HdTokenizer
  tok = HdTokenizer(smollm.tokenizer.tok, 1, [2], CHAT_TEMPLATES["llama-2"])
  text = tok.render_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}])
  assert text == ("<|im_start|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello <|im_end|>"
                  "<|im_start|>[INST] Bye [/INST]")


def _write_minimal_gguf(path, arch):
  writer = gguf_pkg.GGUFWriter(path, arch)
  writer.add_block_count(1)
  writer.add_embedding_length(8)
  writer.add_feed_forward_length(16)
  writer.add_head_count(2)
  writer.add_context_length(32)
  writer.add_tensor("token_embd.weight", np.zeros((16, 8), np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def test_bad_model_files(tmp_path):
  with pytest.raises(HdjaxError, match="not found"):
    hdjax.load(str(tmp_path / "missing.gguf"))
  (tmp_path / "text.gguf").write_text("hello, I am not a GGUF file")
  with pytest.raises(HdjaxError, match="not a GGUF"):
    hdjax.load(str(tmp_path / "text.gguf"))
  real = hdjax.api.resolve_path("smollm2-135m")
  with open(real, "rb") as f:
    (tmp_path / "trunc.gguf").write_bytes(f.read(5_000_000))
  with pytest.raises(HdjaxError, match="corrupt or truncated"):
    hdjax.load(str(tmp_path / "trunc.gguf"))
  _write_minimal_gguf(str(tmp_path / "falcon.gguf"), "falcon")
  with pytest.raises(HdjaxError, match="unsupported GGUF architecture 'falcon'"):
    hdjax.load(str(tmp_path / "falcon.gguf"))
  os.makedirs(tmp_path / "hf")
  with pytest.raises(HdjaxError, match="no config.json"):
    hdjax.load(str(tmp_path / "hf"))
