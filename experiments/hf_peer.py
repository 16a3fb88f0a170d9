"""HF transformers on the same GGUF as hdjax: the peer every speed figure is compared with (torch keeps its threads
and its default attention)."""

from __future__ import annotations

import os
import time
from typing import Sequence


class HFRunner:
  """`AutoModelForCausalLM` from the GGUF file (dequantized), in fp32 or bf16, on the GPU where torch sees one."""

  def __init__(self, path: str, dtype: str = "float32"):
    import torch  # pylint: disable=import-outside-toplevel  (torch is the optional `hf` extra)
    import transformers  # pylint: disable=import-outside-toplevel
    folder, fname = os.path.split(path)
    self.torch = torch
    self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=fname,
                                                                   dtype=getattr(torch, dtype)).to(self.device)
    self.model.eval()
    self.model.generation_config.pad_token_id = self.model.config.eos_token_id

  def seconds_since(self, start: float) -> float:
    """Wall seconds since `start`, once the GPU (if any) has finished the work queued on it."""
    if self.device.type == "cuda":
      self.torch.cuda.synchronize()
    return time.perf_counter() - start

  def prefill_s(self, n: int) -> float:
    """One forward over n random tokens, the LM head on the last one only."""
    ids = self.torch.randint(10, 1000, (1, n), device=self.device)
    with self.torch.no_grad():
      start = time.perf_counter()
      self.model(ids, logits_to_keep=1)
      return self.seconds_since(start)

  def generate(self, prompts: Sequence[Sequence[int]], new: int, exact: bool = False,
               prompt_lookup: int = 0) -> tuple[list[list[int]], float]:
    """Greedy new token ids per prompt and the wall time. EOS ends a sequence; with `exact`, every sequence makes
    exactly `new` tokens (EOS may only be the last). With `prompt_lookup`, HF's prompt lookup decoding with that
    many draft tokens."""
    ids = self.torch.tensor([list(p) for p in prompts], device=self.device)
    kwargs = dict(attention_mask=self.torch.ones_like(ids), do_sample=False, max_new_tokens=new)
    if exact:
      kwargs["min_new_tokens"] = new - 1  # HF lets EOS through once that many tokens exist
    if prompt_lookup:
      kwargs["prompt_lookup_num_tokens"] = prompt_lookup
    with self.torch.no_grad():
      start = time.perf_counter()
      out = self.model.generate(ids, **kwargs)
      elapsed = self.seconds_since(start)
    eos = self.model.config.eos_token_id
    rows = []
    for row in out[:, ids.shape[1]:].tolist():
      rows.append(row[:row.index(eos) + 1] if eos in row and not exact else row)
    return rows, elapsed
