"""Shared fixtures: the real SmolLM2 (loaded once per session) and a tiny random model."""

from __future__ import annotations

import jax
import pytest

import hdjax
from hdjax import compilation, model
from hdjax.api import LM, params_to_device
from hdjax.config import EngineLayout, engine_settings

# before the first compile: a second run of the suite loads its programs instead of compiling them
compilation.enable_persistent_cache()


@pytest.fixture(scope="session")
def smollm() -> LM:
  return hdjax.load("smollm2-135m", dtype="float32")


def make_tiny_lm(seed: int = 0, engine: EngineLayout | None = None, **cfg_changes) -> LM:
  """The tiny preset with random weights, in `engine`'s layout, by default the engine's layout for its dtype on
  this backend (as `hdjax.load` gives)."""
  cfg = hdjax.PRESETS["tiny"].replace(**cfg_changes)
  cfg = cfg.replace(engine=engine or engine_settings(cfg.dtype))
  params = model.init_params(cfg, jax.random.key(seed))
  return LM(cfg, params_to_device(params, cfg), tokenizer=None, name="tiny")


@pytest.fixture(scope="session")
def tiny_lm() -> LM:
  return make_tiny_lm()


@pytest.fixture(autouse=True, scope="module")
def _free_compiled_programs():
  """Drops jax's compiled programs after each test module: the suite compiles hundreds of unrolled 30-layer
  programs, and keeping them all ran one process out of memory."""
  yield
  jax.clear_caches()
