"""hdjax: Hierarchy Drafting, LazyLLM and AdaDecode on pure-functional Flax/JAX LLaMA models."""

from hdjax.api import LM, GenerationResult, load, METHODS, register_method
from hdjax.config import EngineLayout, LlamaConfig, PRESETS, engine_settings
from hdjax.errors import HdjaxError
from hdjax import methods as _methods  # registers the decoding methods

__all__ = ["LM", "GenerationResult", "load", "METHODS", "register_method", "LlamaConfig", "EngineLayout",
           "engine_settings", "PRESETS", "HdjaxError"]
