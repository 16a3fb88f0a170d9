"""GGUF reading: metadata, dequantized LLaMA params (llama.cpp's Q/K RoPE permutation undone), writing."""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from hdjax.config import LlamaConfig
from hdjax.errors import HdjaxError
from hdjax.weights.convert import hf_shapes

SUPPORTED_QUANTS = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                    "Q6_K")


def open_reader(path: str):
  import gguf  # pylint: disable=import-outside-toplevel
  if not os.path.isfile(path):
    raise HdjaxError(f"model file not found: {path}")
  with open(path, "rb") as f:
    magic = f.read(4)
  if magic != b"GGUF":
    raise HdjaxError(f"not a GGUF file (bad magic {magic!r}): {path}")
  try:
    return gguf.GGUFReader(path)
  except (ValueError, IndexError, OSError, KeyError, TypeError, OverflowError, MemoryError) as e:
    raise HdjaxError(f"corrupt or truncated GGUF file {path}: {type(e).__name__}: {e}") from None


def read_fields(reader) -> dict[str, Any]:
  """All key/values as Python values (strings, numbers, lists)."""
  out = {}
  for name, field in reader.fields.items():
    if name.startswith("GGUF."):
      continue
    try:
      out[name] = field.contents()
    except (UnicodeDecodeError, ValueError, IndexError, TypeError) as e:
      raise HdjaxError(f"corrupt GGUF metadata {name!r} in {getattr(reader.data, 'filename', 'the GGUF file')}: "
                       f"{type(e).__name__}: {e}") from None
  return out


def unpermute_rope(w_od: np.ndarray, n_heads: int) -> np.ndarray:
  """Undoes llama.cpp's interleaved-RoPE row permutation of a Q or K weight [heads*head_dim, d_model]."""
  out_dim = w_od.shape[0]
  return w_od.reshape(n_heads, out_dim // n_heads // 2, 2, -1).swapaxes(1, 2).reshape(w_od.shape)


def permute_rope(w_od: np.ndarray, n_heads: int) -> np.ndarray:
  """The inverse of `unpermute_rope`: HF layout to llama.cpp layout (used to write GGUF files)."""
  out_dim = w_od.shape[0]
  return w_od.reshape(n_heads, 2, out_dim // n_heads // 2, -1).swapaxes(1, 2).reshape(w_od.shape)


def _dequantized(tensor) -> np.ndarray:
  import gguf  # pylint: disable=import-outside-toplevel
  qtype = tensor.tensor_type.name
  if qtype not in SUPPORTED_QUANTS:
    raise HdjaxError(f"unsupported GGUF quant type {qtype} in tensor {tensor.name}; supported: "
                     f"{', '.join(SUPPORTED_QUANTS)}")
  try:
    w = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    return np.asarray(w, np.float32).reshape(tuple(int(x) for x in reversed(tensor.shape)))
  except (ValueError, NotImplementedError, TypeError, IndexError) as e:
    raise HdjaxError(f"cannot dequantize tensor {tensor.name} ({qtype}): {e}") from None


def hf_state_from_gguf(reader, cfg: LlamaConfig) -> dict[str, np.ndarray]:
  """GGUF tensors as an HF-named fp32 state dict ([out, in] matrices, RoPE permutation undone)."""
  tensors = {t.name: t for t in reader.tensors}
  shapes = hf_shapes(cfg)
  state = {}

  def take(gguf_name: str, hf_name: str, n_heads: int | None = None):
    if gguf_name not in tensors:
      raise HdjaxError(f"GGUF file lacks tensor {gguf_name}")
    w = _dequantized(tensors[gguf_name])
    if w.shape != shapes[hf_name]:
      raise HdjaxError(f"GGUF tensor {gguf_name} has shape {w.shape[::-1]} (GGUF order), the config needs "
                       f"{shapes[hf_name][::-1]}")
    state[hf_name] = unpermute_rope(w, n_heads) if n_heads else w

  take("token_embd.weight", "model.embed_tokens.weight")
  take("output_norm.weight", "model.norm.weight")
  if not cfg.tie_embeddings:
    take("output.weight", "lm_head.weight")
  for i in range(cfg.n_layers):
    pre, hf = f"blk.{i}.", f"model.layers.{i}."
    take(pre + "attn_norm.weight", hf + "input_layernorm.weight")
    take(pre + "ffn_norm.weight", hf + "post_attention_layernorm.weight")
    take(pre + "attn_q.weight", hf + "self_attn.q_proj.weight", cfg.n_heads)
    take(pre + "attn_k.weight", hf + "self_attn.k_proj.weight", cfg.n_kv_heads)
    take(pre + "attn_v.weight", hf + "self_attn.v_proj.weight")
    take(pre + "attn_output.weight", hf + "self_attn.o_proj.weight")
    take(pre + "ffn_gate.weight", hf + "mlp.gate_proj.weight")
    take(pre + "ffn_up.weight", hf + "mlp.up_proj.weight")
    take(pre + "ffn_down.weight", hf + "mlp.down_proj.weight")
  return state


def load_gguf(path: str) -> tuple[LlamaConfig, dict[str, np.ndarray], dict[str, Any]]:
  """(config, HF-named fp32 state dict, metadata fields) of a LLaMA GGUF file."""
  reader = open_reader(path)
  fields = read_fields(reader)
  has_output = any(t.name == "output.weight" for t in reader.tensors)
  cfg = LlamaConfig.from_gguf_fields(fields, has_output)
  return cfg, hf_state_from_gguf(reader, cfg), fields


def write_gguf(path: str, cfg: LlamaConfig, hf_state: dict[str, np.ndarray], qtype: str = "F32",
               tokenizer_fields: dict[str, Any] | None = None) -> None:
  """Writes an HF-named state dict as a llama GGUF (matrices quantized to `qtype`, norms F32)."""
  import gguf  # pylint: disable=import-outside-toplevel
  writer = gguf.GGUFWriter(path, "llama")
  writer.add_block_count(cfg.n_layers)
  writer.add_context_length(cfg.max_seq_len)
  writer.add_embedding_length(cfg.d_model)
  writer.add_feed_forward_length(cfg.ffn_dim)
  writer.add_head_count(cfg.n_heads)
  writer.add_head_count_kv(cfg.n_kv_heads)
  writer.add_rope_dimension_count(cfg.head_dim)
  writer.add_rope_freq_base(cfg.rope_theta)
  writer.add_layer_norm_rms_eps(cfg.rms_eps)
  writer.add_vocab_size(cfg.vocab_size)
  writer.add_bos_token_id(cfg.bos_id)
  writer.add_eos_token_id(cfg.eos_ids[0])
  writer.add_pad_token_id(cfg.pad_id)
  for key, value in (tokenizer_fields or {}).items():
    _add_field(writer, key, value)
  quant = gguf.GGMLQuantizationType[qtype]
  names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
  hf_to_gguf = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
                "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                "mlp.down_proj": "ffn_down"}
  for name, w in hf_state.items():
    w = np.asarray(w, np.float32)
    if name.startswith("model.layers."):
      _, _, idx, *rest = name.split(".")
      module = ".".join(rest[:-1])
      if module == "self_attn.q_proj":
        w = permute_rope(w, cfg.n_heads)
      elif module == "self_attn.k_proj":
        w = permute_rope(w, cfg.n_kv_heads)
      gname = f"blk.{idx}.{hf_to_gguf[module]}.weight"
    else:
      gname = names[name]
    if w.ndim == 1 or quant == gguf.GGMLQuantizationType.F32:
      writer.add_tensor(gname, w)
    else:
      writer.add_tensor(gname, gguf.quants.quantize(w, quant), raw_dtype=quant)
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()


def _add_field(writer, key: str, value: Any) -> None:
  if isinstance(value, str):
    writer.add_string(key, value)
  elif isinstance(value, bool):
    writer.add_bool(key, value)
  elif isinstance(value, int):
    writer.add_uint32(key, value)
  elif isinstance(value, float):
    writer.add_float32(key, value)
  else:
    writer.add_array(key, list(value))
