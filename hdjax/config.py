"""Frozen model configuration, its constructors from GGUF/HF metadata, and presets."""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any, Mapping

import jax
import numpy as np

from hdjax.errors import HdjaxError


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama-3 style frequency-dependent RoPE scaling."""

  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position: int = 8192


# Every weight's axes in its two layouts, (input-major, output-major), in the letters of `hdjax.model` (D d_model,
# N heads, K kv heads, H head_dim, F ffn_dim, V vocab, and C the parts of a fused weight); its param is named
# f"{weight}_{axes.lower()}". The tied LM head is the embedding [V, D], already output-major.
WEIGHT_AXES: dict[str, tuple[str, str]] = {
    "q": ("DNH", "NHD"), "k": ("DKH", "KHD"), "v": ("DKH", "KHD"), "o": ("NHD", "DNH"),
    "gate": ("DF", "FD"), "up": ("DF", "FD"), "down": ("FD", "DF"), "lm_head": ("DV", "VD"),
    # fused weights (`EngineLayout.fused_qkv`, `fused_gate_up`), one contraction for their parts: "qkv" holds each
    # kv head's group, its G query heads then its key and its value (C = G + 2; query head n = k * G + g, the
    # order attention reads), so sharding K splits whole groups; "gate_up" holds gate then up (C = 2)
    "qkv": ("DKCH", "KCHD"), "gate_up": ("DCF", "CFD"),
}
# Each fused weight's parts, in their order along C.
FUSED_WEIGHTS: dict[str, tuple[str, ...]] = {"qkv": ("q", "k", "v"), "gate_up": ("gate", "up")}


def is_int(x: Any) -> bool:
  """An integer (Python or numpy), not a bool."""
  return isinstance(x, numbers.Integral) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class EngineLayout:
  """How the engine stores weights and runs a step on one backend; `engine_settings` picks one per backend and
  dtype, in one place. Hashable: part of the static `LlamaConfig`."""

  cache_dtype: str = "float32"  # the KV cache and the inputs of attention's two contractions
  row_multiple: int = 1  # a step's rows run padded to a multiple of this (copies of the last row)
  one_step_shape: bool = False  # every decode and verify step runs exactly `row_multiple` rows (trees cut to that
  #                               many nodes): one compiled step shape, whatever kernel a backend picks per shape
  untie_head: bool = False  # a tied LM head also kept as its own [D, V] copy (the layout a bf16 CPU dot wants)
  weights_out_major: bool = False  # weights stored output axes first, [out, in] as in torch (`WEIGHT_AXES`)
  feature_major_rows: int = 0  # a contraction over at most this many rows (B x T) of out-major weights computes
  #                              W @ X^T, its result feature-major (`model.contract`); 0: never
  layer_programs: bool = True  # each layer, and each whole step, a computation of its own that is skipped when no
  #                              row writes (`control.run_if`, a `while` that runs once); False: straight-line layers
  key_block: int = 128  # attention reads the cache in blocks of this many slots (128 ran faster than 64 and 256 on
  #                       CPU), up to the last one any query sees, and a prefill skips the key blocks above the
  #                       diagonal: loops of a data-dependent trip count; 0: a step's attention is one masked pass
  #                       over every slot, and a prefill reads every key block (those above the diagonal masked)
  min_rows: int = 16  # prompts are padded to at least this many rows and caches hold at least max(64, this)
  #                     slots: prompts up to it share one compiled prefill and one decoding loop per method
  exhaustive_lookup: bool = False  # HD's database lookups compare the query with every key in one pass instead of
  #                                  bisecting the sorted keys (`device_tables.lookup`)
  fused_qkv: bool = False  # q, k and v stored as one weight (`WEIGHT_AXES["qkv"]`, fused once at load by
  #                          `model.with_layout`; checkpoints stay unfused): one GEMM per layer for the three
  #                          (MaxText `fused_qkv`, gpt-fast `wqkv`), not a concatenation inside every step (XLA's
  #                          DotMerger). On in the accelerator layout by kernel count alone: it awaits a device A/B
  #                          (`bench_steps --ab=fused,unfused`); the CPU layouts keep it off, as measured there
  fused_gate_up: bool = False  # gate and up stored as one weight (`WEIGHT_AXES["gate_up"]`): one GEMM for both;
  #                              on in the accelerator layout, awaiting the same A/B as `fused_qkv`

  def fuses(self, weight: str) -> bool:
    """Whether this layout stores `weight` (a key of `FUSED_WEIGHTS`) as one fused weight."""
    return {"qkv": self.fused_qkv, "gate_up": self.fused_gate_up}[weight]

  def __post_init__(self):
    for name in ("row_multiple", "feature_major_rows", "key_block", "min_rows"):
      value = getattr(self, name)
      if not is_int(value) or value < (name == "row_multiple"):
        raise HdjaxError(f"engine {name}={value!r} must be an integer >= {int(name == 'row_multiple')}")
    if self.feature_major_rows and not self.weights_out_major:
      raise HdjaxError("engine feature_major_rows > 0 needs weights_out_major (W @ X^T wants W stored [out, in])")

  @property
  def exact_span(self) -> int:
    """Slots within which moving a key leaves a query's attention bitwise unchanged (masked slots between its keys
    included): a blocked step's block, whose dot XLA:CPU folds in slot order; one slot for a one-pass step, whose
    reduction order a GPU or TPU kernel chooses."""
    return self.key_block or 1


FEATURE_MAJOR_ROWS = 64
ACCELERATOR_ROWS = 16
ACCELERATOR_MIN_ROWS = 512


def engine_settings(dtype: str, backend: str | None = None) -> EngineLayout:
  """The engine layout for weights of `dtype` on `backend` (default: jax's), what each backend runs:

  - CPU (measured with `experiments/bench_steps.py` on 2-core hosts, docs/results/engine-steps.md): per-layer
    computations, attention over the visible cache blocks, an fp32 KV cache. bf16 weights get steps padded to a
    multiple of 8 rows (a 1-row bf16 dot takes a slow path on XLA:CPU, and 8 rows ran faster than 1 to 4) and a
    [D, V] LM head (a bf16 `x @ embedding.T` is ~8x slower there); decode and verify then compile to one program,
    which makes the speculative methods bitwise lossless in bf16. fp32 weights are stored [out, in] and a step of
    up to FEATURE_MAJOR_ROWS rows contracts them as W @ X^T (decode ~1.1x, 4-8-row verify 1.4-1.7x faster on an
    AVX2 host).
  - GPU and TPU: no control flow inside a step (XLA:GPU reads a `while`/`cond` predicate on the host, and
    per-layer computations block fusion across layers): straight-line layers, attention in one masked pass over
    every cache slot, the cache in the weights' dtype, and every decode and verify step exactly ACCELERATOR_ROWS
    rows, one compiled shape, so a tree node whose keys sit at its committed slots gets the decode step's logits.
    Prompts pad to at least ACCELERATOR_MIN_ROWS rows and caches to as many slots: one program per method for
    every prompt up to it (an XLA:GPU compile takes tens of seconds; 512 padded rows cost a GPU next to nothing).
    HD's database lookups read the whole table in one pass: bisection is a chain of dependent gathers, ~70 steps
    one after another per speculative step for SmolLM2's databases (docs/results/accelerators.md). q/k/v and
    gate/up are fused weights, four projection GEMMs per layer instead of seven: SmolLM2's step is launch-bound
    there (548 kernels per token on an H200). Chosen by GEMM count (counted on CPU), not yet by a device
    measurement: `bench_steps --ab=layout,unfused,untied,no_triton` is that A/B, with the untied LM head and
    XLA:GPU's cuBLAS GEMMs.
  """
  backend = backend or jax.default_backend()
  if backend != "cpu":
    return EngineLayout(cache_dtype=dtype, row_multiple=ACCELERATOR_ROWS, one_step_shape=True, layer_programs=False,
                        key_block=0, min_rows=ACCELERATOR_MIN_ROWS, exhaustive_lookup=True, fused_qkv=True,
                        fused_gate_up=True)
  if dtype == "bfloat16":
    return EngineLayout(row_multiple=8, untie_head=True)
  if dtype == "float32":
    return EngineLayout(weights_out_major=True, feature_major_rows=FEATURE_MAJOR_ROWS)
  return EngineLayout()


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Shape and numerics of a LLaMA-family decoder. Hashable, so it can be a static jit argument."""

  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  head_dim: int
  ffn_dim: int
  rope_theta: float = 10000.0
  rms_eps: float = 1e-5
  max_seq_len: int = 4096
  tie_embeddings: bool = False
  rope_scaling: RopeScaling | None = None
  bos_id: int = 1
  eos_ids: tuple[int, ...] = (2,)
  pad_id: int = 0
  dtype: str = "float32"  # weights and the inputs of weight contractions; every contraction accumulates in fp32,
  #                         and the residual stream, norms, RoPE and softmax stay fp32
  engine: EngineLayout = EngineLayout()  # how steps run on the backend (`engine_settings` picks it)

  @property
  def bitwise_steps(self) -> bool:
    """Decode and verify steps are one compiled program (rows padded alike), so a greedy speculative method can
    return `ar`'s tokens bitwise by trusting only the tree nodes whose step equals a decode step
    (`verify.trusted_nodes`)."""
    return self.engine.row_multiple > 1

  def __post_init__(self):
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "max_seq_len"):
      low = 0 if name == "n_layers" else 1
      if not is_int(getattr(self, name)) or getattr(self, name) < low:
        raise HdjaxError(f"config {name}={getattr(self, name)!r} must be an integer >= {low}")
    if not all(isinstance(x, numbers.Real) and math.isfinite(x) and x > 0 for x in (self.rope_theta, self.rms_eps)):
      raise HdjaxError(f"config rope_theta={self.rope_theta!r} and rms_eps={self.rms_eps!r} must be finite and > 0")
    ids = (self.bos_id, self.pad_id, *self.eos_ids)
    if not self.eos_ids or not all(is_int(i) and i >= 0 for i in ids):
      raise HdjaxError(f"config token ids must be integers >= 0: bos_id={self.bos_id!r}, eos_ids={self.eos_ids!r}, "
                       f"pad_id={self.pad_id!r}")
    if self.n_heads % self.n_kv_heads:
      raise HdjaxError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

  def weight_axes(self, weight: str) -> str:
    """The axes of `weight` (a key of `WEIGHT_AXES`) in this config's layout."""
    return WEIGHT_AXES[weight][self.engine.weights_out_major]

  def weight_name(self, weight: str) -> str:
    return f"{weight}_{self.weight_axes(weight).lower()}"

  def weight_shape(self, weight: str) -> tuple[int, ...]:
    """The shape of `weight` (a key of `WEIGHT_AXES`) in this config's layout."""
    dims = dict(D=self.d_model, N=self.n_heads, K=self.n_kv_heads, H=self.head_dim, F=self.ffn_dim,
                V=self.vocab_size, C=self.q_per_kv + 2 if weight == "qkv" else len(FUSED_WEIGHTS.get(weight, ())))
    return tuple(dims[a] for a in self.weight_axes(weight))

  def input_major(self) -> "LlamaConfig":
    """This config with its weights in the input-major layout, none fused and no extra LM-head copy: the layout of
    loaders', checkpoints' and HF exports' params, and the one random params are drawn in."""
    return self.replace(engine=dataclasses.replace(self.engine, weights_out_major=False, feature_major_rows=0,
                                                   untie_head=False, fused_qkv=False, fused_gate_up=False))

  @property
  def q_per_kv(self) -> int:
    return self.n_heads // self.n_kv_heads

  def replace(self, **changes) -> "LlamaConfig":
    return dataclasses.replace(self, **changes)

  @classmethod
  def from_gguf_fields(cls, fields: Mapping[str, Any], has_output_weight: bool) -> "LlamaConfig":
    """Builds a config from GGUF key/values (already decoded to Python values)."""
    arch = fields.get("general.architecture")
    if arch != "llama":
      raise HdjaxError(f"unsupported GGUF architecture {arch!r}: only 'llama' is supported")
    p = "llama."
    try:
      d_model = int(fields[p + "embedding_length"])
      n_heads = int(fields[p + "attention.head_count"])
      vocab = int(fields.get(p + "vocab_size") or len(fields["tokenizer.ggml.tokens"]))
      eos = fields.get("tokenizer.ggml.eos_token_id", 2)
      scaling = None
      if fields.get(p + "rope.scaling.type") == "llama3" or p + "rope.scaling.factor" in fields:
        scaling = RopeScaling(
            factor=float(fields.get(p + "rope.scaling.factor", 8.0)),
            low_freq_factor=float(fields.get(p + "rope.scaling.low_freq_factor", 1.0)),
            high_freq_factor=float(fields.get(p + "rope.scaling.high_freq_factor", 4.0)),
            original_max_position=int(fields.get(p + "rope.scaling.original_context_length", 8192)))
      return cls(
          vocab_size=vocab,
          d_model=d_model,
          n_layers=int(fields[p + "block_count"]),
          n_heads=n_heads,
          n_kv_heads=int(fields.get(p + "attention.head_count_kv", n_heads)),
          head_dim=int(fields.get(p + "rope.dimension_count", d_model // n_heads)),
          ffn_dim=int(fields[p + "feed_forward_length"]),
          rope_theta=float(fields.get(p + "rope.freq_base", 10000.0)),
          rms_eps=float(fields.get(p + "attention.layer_norm_rms_epsilon", 1e-5)),
          max_seq_len=int(fields.get(p + "context_length", 4096)),
          tie_embeddings=not has_output_weight,
          rope_scaling=scaling,
          bos_id=int(fields.get("tokenizer.ggml.bos_token_id", 1)),
          eos_ids=(int(eos),),
          pad_id=int(fields.get("tokenizer.ggml.padding_token_id", eos)),
      )
    except KeyError as e:
      raise HdjaxError(f"GGUF metadata lacks required key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
      raise HdjaxError(f"GGUF metadata has a value of the wrong type ({e})") from None

  @classmethod
  def from_hf(cls, hf: Mapping[str, Any]) -> "LlamaConfig":
    """Builds a config from a HF `config.json` dict."""
    if not isinstance(hf, Mapping):
      raise HdjaxError(f"HF config must be a JSON object, got {type(hf).__name__}")
    try:
      return cls._from_hf(hf)
    except KeyError as e:
      raise HdjaxError(f"HF config lacks required key {e.args[0]!r}") from None
    except (TypeError, ValueError, AttributeError) as e:
      raise HdjaxError(f"HF config has a value of the wrong type ({e})") from None

  @classmethod
  def _from_hf(cls, hf: Mapping[str, Any]) -> "LlamaConfig":
    if hf.get("model_type") not in ("llama", "mistral") and "LlamaForCausalLM" not in hf.get("architectures", []):
      raise HdjaxError(f"unsupported HF model_type {hf.get('model_type')!r}: only LLaMA-family is supported")
    scaling = None
    rs = hf.get("rope_scaling") or {}
    if rs.get("rope_type", rs.get("type")) == "llama3":
      scaling = RopeScaling(float(rs["factor"]), float(rs.get("low_freq_factor", 1.0)),
                            float(rs.get("high_freq_factor", 4.0)),
                            int(rs.get("original_max_position_embeddings", 8192)))
    elif rs:
      raise HdjaxError(f"unsupported rope_scaling {rs!r}")
    def whole(key: str, default: int | None = None) -> int:
      """hf[key] as an int (an integral float is fine; a fraction or a string is not); `default` if absent."""
      value = hf.get(key)
      if value is None and default is not None:
        return default
      if value is None:
        raise KeyError(key)
      if not (is_int(value) or isinstance(value, float) and value.is_integer()):
        raise HdjaxError(f"HF config {key}={value!r} must be an integer")
      return int(value)

    eos = hf.get("eos_token_id", 2)
    eos_ids = tuple(int(e) for e in eos) if isinstance(eos, (list, tuple)) else (whole("eos_token_id", 2),)
    n_heads = whole("num_attention_heads")
    pad = hf.get("pad_token_id")
    return cls(
        vocab_size=whole("vocab_size"),
        d_model=whole("hidden_size"),
        n_layers=whole("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=whole("num_key_value_heads", n_heads),
        head_dim=whole("head_dim", whole("hidden_size") // max(n_heads, 1)),
        ffn_dim=whole("intermediate_size"),
        rope_theta=float(hf.get("rope_theta", 10000.0)),
        rms_eps=float(hf.get("rms_norm_eps", 1e-5)),
        max_seq_len=whole("max_position_embeddings", 4096),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        rope_scaling=scaling,
        bos_id=whole("bos_token_id", 1),
        eos_ids=eos_ids,
        pad_id=int(pad if pad is not None and int(pad) >= 0 else eos_ids[0]),
    )

  def to_hf(self) -> dict[str, Any]:
    """The HF `config.json` dict of this config (used to write test fixtures)."""
    out = dict(
        model_type="llama", architectures=["LlamaForCausalLM"], vocab_size=self.vocab_size,
        hidden_size=self.d_model, num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
        num_key_value_heads=self.n_kv_heads, head_dim=self.head_dim, intermediate_size=self.ffn_dim,
        rope_theta=self.rope_theta, rms_norm_eps=self.rms_eps, max_position_embeddings=self.max_seq_len,
        tie_word_embeddings=self.tie_embeddings, bos_token_id=self.bos_id, eos_token_id=list(self.eos_ids),
        pad_token_id=self.pad_id, hidden_act="silu", torch_dtype="float32")
    if self.rope_scaling:
      rs = self.rope_scaling
      out["rope_scaling"] = dict(rope_type="llama3", factor=rs.factor, low_freq_factor=rs.low_freq_factor,
                                 high_freq_factor=rs.high_freq_factor,
                                 original_max_position_embeddings=rs.original_max_position)
    return out


PRESETS: dict[str, LlamaConfig] = {
    "smollm2-135m": LlamaConfig(
        vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3, head_dim=64, ffn_dim=1536,
        rope_theta=100000.0, rms_eps=1e-5, max_seq_len=8192, tie_embeddings=True, bos_id=1, eos_ids=(2,),
        pad_id=2),
    "llama-2-7b": LlamaConfig(
        vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32, head_dim=128, ffn_dim=11008,
        rope_theta=10000.0, rms_eps=1e-5, max_seq_len=4096, bos_id=1, eos_ids=(2,), pad_id=0),
    "llama-3-8b": LlamaConfig(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
        rope_theta=500000.0, rms_eps=1e-5, max_seq_len=8192, bos_id=128000, eos_ids=(128001, 128009),
        pad_id=128001, rope_scaling=None),
    "llama-3.1-8b": LlamaConfig(
        vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, head_dim=128, ffn_dim=14336,
        rope_theta=500000.0, rms_eps=1e-5, max_seq_len=131072, bos_id=128000, eos_ids=(128001, 128008, 128009),
        pad_id=128001, rope_scaling=RopeScaling()),
    "tiny": LlamaConfig(
        vocab_size=128, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128,
        rope_theta=10000.0, rms_eps=1e-5, max_seq_len=512, tie_embeddings=False, bos_id=1, eos_ids=(2,), pad_id=0),
}
