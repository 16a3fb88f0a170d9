"""Every bad input to a launcher ends in one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

import hdjax
from hdjax.api import resolve_path
from hdjax.weights import convert, gguf
from tests.conftest import make_tiny_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER_KEYS = ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens", "tokenizer.ggml.token_type",
                  "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
                  "tokenizer.chat_template")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny random model with SmolLM2's real tokenizer (64-token context), plus broken files."""
  tmp = tmp_path_factory.mktemp("models")
  fields = gguf.read_fields(gguf.open_reader(resolve_path("smollm2-135m")))
  lm = make_tiny_lm(seed=0, vocab_size=49152, d_model=32, max_seq_len=64)
  good = str(tmp / "tiny.gguf")
  gguf.write_gguf(good, lm.cfg, convert.hf_state_from_params(lm.cfg, lm.params), "F16",
                  {k: fields[k] for k in TOKENIZER_KEYS})
  (tmp / "text.gguf").write_text("not a model")
  with open(good, "rb") as f:
    (tmp / "trunc.gguf").write_bytes(f.read(200_000))
  return {"good": good, "text": str(tmp / "text.gguf"), "trunc": str(tmp / "trunc.gguf"),
          "missing": str(tmp / "missing.gguf")}


def _run(*args):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", "experiments.generate", *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)


CASES = {
    "missing file": (["--model={missing}", "--prompt=hi"], "model not found"),
    "not gguf": (["--model={text}", "--prompt=hi"], "not a GGUF file"),
    "truncated gguf": (["--model={trunc}", "--prompt=hi"], "corrupt or truncated"),
    "prompt too long": (["--model={good}", "--prompt=" + "word " * 80], "exceeds the model's context"),
    "empty prompt": (["--model={good}", "--prompt=   "], "empty prompt"),
    "max_new_tokens < 1": (["--model={good}", "--prompt=hi", "--max_new_tokens=0"], "max_new_tokens must be >= 1"),
    "unknown method": (["--model={good}", "--prompt=hi", "--method=warp"], "unknown method 'warp'"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_generate_launcher_bad_input(files, case):
  args, message = CASES[case]
  proc = _run(*[a.format(**files) for a in args])
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  error_lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(error_lines) == 1 and message in error_lines[0], proc.stderr[-2000:]


def test_generate_launcher_runs(files):
  """With a method's options; start-up (load and the compiling warm-up), ttft and decoding reported apart."""
  proc = _run(f"--model={files['good']}", "--prompt=hi", "--max_new_tokens=5", "--method=pld",
              '--method_options={"pld": {"max_depth": 3}}')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "max_depth=3" in proc.stderr and "[pld] 5 tokens: start-up " in proc.stderr
  assert re.search(r"warm-up [\d.]+ s; compile [\d.]+ s: \d+ programs compiled.*\), ttft \d+ ms, decode [\d.]+ "
                   r"tok/s \(4 tokens after the first in [\d.]+ s\)", proc.stderr), proc.stderr[-2000:]


def test_unsupported_quant_type_message(files, tmp_path):
  import gguf as gguf_pkg
  import numpy as np
  path = str(tmp_path / "iq.gguf")
  writer = gguf_pkg.GGUFWriter(path, "llama")
  writer.add_block_count(0)
  writer.add_embedding_length(256)
  writer.add_feed_forward_length(256)
  writer.add_head_count(1)
  writer.add_vocab_size(4)
  qtype = gguf_pkg.GGMLQuantizationType.IQ2_XXS
  byte_shape = gguf_pkg.quants.quant_shape_to_byte_shape((4, 256), qtype)
  writer.add_tensor("token_embd.weight", np.zeros(byte_shape, np.uint8), raw_dtype=qtype)
  writer.add_tensor("output_norm.weight", np.ones(256, np.float32))
  writer.write_header_to_file()
  writer.write_kv_data_to_file()
  writer.write_tensors_to_file()
  writer.close()
  with pytest.raises(hdjax.HdjaxError, match="unsupported GGUF quant type IQ2_XXS"):
    hdjax.load(path)
  proc = _run(f"--model={path}", "--prompt=hi")
  assert proc.returncode == 2 and "unsupported GGUF quant type IQ2_XXS" in proc.stderr
