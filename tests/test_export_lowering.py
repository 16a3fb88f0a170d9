"""The accelerator layout's programs lower for TPU and GPU, checked on a CPU: `jax.export` of the prefill and of the
`ar` and `hd` decode loops for platforms ("tpu", "cuda"). Exporting lowers every primitive with those platforms'
rules and accepts only custom calls that are stable on them, so a CPU-only op (a LAPACK call, a host callback)
fails here; the modules also hold no host callback and no side effect."""

from __future__ import annotations

import re

import pytest
from jax import export

from hdjax.config import engine_settings
from hdjax.decoding import autoregressive as ar, device_loop
from tests.test_accelerator_layout import request_calls
from tests.test_device_hd import tiny_hd_model

PLATFORMS = ("tpu", "cuda")


@pytest.fixture(scope="module")
def accelerator_calls() -> dict[str, tuple]:
  """The jitted programs (with their arguments) of an `ar` and an `hd` request on the bf16 GPU layout of the tiny
  model: the prefill, and each method's decode loop."""
  for lm, _ in tiny_hd_model(dtype="bfloat16", engine=engine_settings("bfloat16", "gpu")):
    ar_calls = request_calls(lm, "ar", ar)
    return {"prefill": ar_calls["prefill"], "ar loop": ar_calls["loop"],
            "hd loop": request_calls(lm, "hd", device_loop)["loop"]}


@pytest.mark.parametrize("program", ["prefill", "ar loop", "hd loop"])
def test_the_accelerator_programs_export_for_tpu_and_gpu(accelerator_calls, program):
  fn, args, kwargs = accelerator_calls[program]
  exported = export.export(fn, platforms=PLATFORMS)(*args, **kwargs)
  assert exported.platforms == PLATFORMS
  assert not exported.ordered_effects and not exported.unordered_effects
  text = exported.mlir_module()
  assert "stablehlo.dot_general" in text
  assert not re.search(r"callback|has_side_effect = true", text, re.IGNORECASE)
