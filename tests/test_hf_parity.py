"""HF transformers on the same GGUF as the independent reference: logits, greedy text, chat template ids."""

from __future__ import annotations

import os

import numpy as np
import pytest

from hdjax.api import resolve_path

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain recursion to a child in two sentences.",
    "List 3 prime numbers larger than 100 and add them up.",
    "Translate 'good morning, my friend' into German.",
]


@pytest.fixture(scope="module")
def hf():
  path = resolve_path("smollm2-135m")
  folder, fname = os.path.split(path)
  tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=fname)
  model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname, dtype=torch.float32)
  model.eval()
  return tok, model


def _hf_chat_ids(tok, text):
  ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
  return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_chat_template_ids_equal_hf(hf, smollm):
  tok, _ = hf
  for text in PROMPTS:
    assert smollm.tokenizer.apply_chat_template([{"role": "user", "content": text}]) == _hf_chat_ids(tok, text)


def test_tokenizer_equal_hf_on_assorted_text(hf, smollm):
  tok, _ = hf
  texts = ["Hello world!", "  leading spaces and\ttabs\n\nnewlines", "numbers 1234567 and 3.14159",
           "émigré naïve café", "code: def f(x):\n    return x**2  # square", "<|im_start|>user\nhi<|im_end|>",
           "日本語のテキスト 🤖"]
  for text in texts:
    ours = smollm.tokenizer.encode(text)
    assert ours == tok.encode(text, add_special_tokens=False), text
    assert smollm.tokenizer.decode(ours, skip_special_tokens=False) == text


def test_logits_match_hf(hf, smollm):
  _, model = hf
  for text in PROMPTS:
    ids = smollm.tokenizer.apply_chat_template([{"role": "user", "content": text}])
    with torch.no_grad():
      ref = model(torch.tensor([ids])).logits[0].numpy()
    assert np.abs(smollm.logits(ids) - ref).max() <= 1e-3, text


@pytest.mark.parametrize("text", [PROMPTS[0], pytest.param(PROMPTS[1], marks=pytest.mark.slow),
                                  pytest.param(PROMPTS[2], marks=pytest.mark.slow),
                                  PROMPTS[3], pytest.param(PROMPTS[4], marks=pytest.mark.slow)])
def test_greedy_64_tokens_equal_hf(hf, smollm, text):
  _, model = hf
  ids = smollm.tokenizer.apply_chat_template([{"role": "user", "content": text}])
  with torch.no_grad():
    out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                         max_new_tokens=64, do_sample=False)
  ref = out[0, len(ids):].tolist()
  assert smollm.generate([ids], max_new_tokens=64)[0].token_ids == ref
