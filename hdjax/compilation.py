"""JAX's persistent compilation cache, on by default, and a count of the programs XLA compiles.

  from hdjax import compilation
  compilation.enable_persistent_cache()   # before the first compile: ~/.cache/hdjax/jax
  with compilation.track() as compiled:
    lm.generate(...)
  compiled.programs, compiled.cache_hits, compiled.seconds

The cache keeps every compiled program on disk, so a second process with the same programs loads them instead of
compiling them (a 30-layer program on XLA:CPU: 0.89 s to compile, 0.05 s to load). `HDJAX_COMPILE_CACHE` chooses
where: unset, "1" or "true" for `default_cache_dir()`, "0", "false" or "off" for no cache, anything else a
directory. A directory that cannot be written is warned about once and the run goes on without the cache. An
explicit `JAX_COMPILATION_CACHE_DIR` (jax's own setting) wins over all of these. The cache is not bounded (a run of
the test suite adds ~330 MB of programs for each version of the code): delete the directory to empty it.

The count listens to `jax.monitoring`: XLA's backend compile reports one duration per program, and a program that
came from the persistent cache reports a cache hit first. Tracing (Python to jaxpr) and lowering (jaxpr to MLIR)
report their own durations, counted in `seconds` with the backend's.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import tempfile
import threading
import warnings
from typing import Iterator, Mapping

import jax
from jax import monitoring
from jax.experimental.compilation_cache import compilation_cache

CACHE_ENV = "HDJAX_COMPILE_CACHE"
OFF_VALUES = frozenset({"0", "false", "off", "no"})
DEFAULT_VALUES = frozenset({"", "1", "true", "on", "yes"})

# How many times each jitted step was traced (a trace is what precedes every compile): tests assert recompiles stay
# bounded, and launchers check that nothing compiled while they timed.
TRACE_COUNTS: collections.Counter = collections.Counter()

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # one per program, compiled or loaded
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"  # one per program loaded from the persistent cache
COMPILE_PHASE_EVENTS = frozenset({"/jax/core/compile/jaxpr_trace_duration",
                                  "/jax/core/compile/jaxpr_to_mlir_module_duration", BACKEND_COMPILE_EVENT})


def default_cache_dir(environ: Mapping[str, str] = os.environ) -> str:
  """`$XDG_CACHE_HOME/hdjax/jax`, by default `~/.cache/hdjax/jax`."""
  base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "hdjax", "jax")


def requested_cache_dir(environ: Mapping[str, str] = os.environ) -> str | None:
  """The cache directory that `HDJAX_COMPILE_CACHE` asks for (see the module docstring), or None for no cache."""
  value = environ.get(CACHE_ENV, "").strip()
  if value.lower() in OFF_VALUES:
    return None
  if value.lower() in DEFAULT_VALUES:
    return default_cache_dir(environ)
  return os.path.expanduser(value)


def writable_dir_error(path: str) -> str | None:
  """Why `path` cannot hold the cache (created if missing), or None when a file can be written there."""
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      return None
  except OSError as e:
    return e.strerror or type(e).__name__


def enable_persistent_cache(enabled: bool = True) -> str | None:
  """Turns on jax's persistent compilation cache in `requested_cache_dir()` (every program kept, however small or
  quick to compile) unless `enabled` is False or the environment turns it off; returns the directory in use, or
  None. Call it before the first compile: jax decides once per process whether the cache is used (this resets that
  decision)."""
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  path = requested_cache_dir() if enabled else None
  if path is None:
    return None
  error = writable_dir_error(path)
  if error is not None:
    warnings.warn(f"hdjax: running without the persistent compilation cache: cannot write {path} ({error}); set "
                  f"{CACHE_ENV} to a writable directory, or to 0", RuntimeWarning, stacklevel=2)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
  compilation_cache.reset_cache()
  return path


@dataclasses.dataclass(frozen=True)
class CompileCount:
  """Programs compiled by XLA (not found in the persistent cache), programs loaded from that cache, and the
  seconds spent tracing, lowering and compiling or loading them."""

  programs: int = 0
  cache_hits: int = 0
  seconds: float = 0.0

  def __sub__(self, other: CompileCount) -> CompileCount:
    return CompileCount(self.programs - other.programs, self.cache_hits - other.cache_hits,
                        self.seconds - other.seconds)

  def as_dict(self) -> dict[str, float]:
    return dict(programs=self.programs, cache_hits=self.cache_hits, seconds=round(self.seconds, 3))


class _Totals:
  """What the listeners have counted since this module was imported."""

  def __init__(self):
    self.lock = threading.Lock()
    self.backend_compiles = 0
    self.cache_hits = 0
    self.seconds = 0.0

  def on_duration(self, event: str, duration_secs: float, **unused) -> None:
    if event in COMPILE_PHASE_EVENTS:
      with self.lock:
        self.seconds += duration_secs
        self.backend_compiles += event == BACKEND_COMPILE_EVENT

  def on_event(self, event: str, **unused) -> None:
    if event == CACHE_HIT_EVENT:
      with self.lock:
        self.cache_hits += 1

  def count(self) -> CompileCount:
    with self.lock:
      return CompileCount(self.backend_compiles - self.cache_hits, self.cache_hits, self.seconds)


_TOTALS = _Totals()
monitoring.register_event_duration_secs_listener(_TOTALS.on_duration)
monitoring.register_event_listener(_TOTALS.on_event)


def compiled_so_far() -> CompileCount:
  """Everything compiled in this process since `hdjax.compilation` was imported: diff two of these."""
  return _TOTALS.count()


class Tracker:
  """The compiles since `start` (a `CompileCount`), up to now, or up to `stop()`."""

  def __init__(self):
    self.start = compiled_so_far()
    self.end: CompileCount | None = None

  def stop(self) -> None:
    self.end = compiled_so_far()

  def count(self) -> CompileCount:
    return (self.end or compiled_so_far()) - self.start

  @property
  def programs(self) -> int:
    return self.count().programs

  @property
  def cache_hits(self) -> int:
    return self.count().cache_hits

  @property
  def seconds(self) -> float:
    return self.count().seconds


@contextlib.contextmanager
def track() -> Iterator[Tracker]:
  """`with track() as compiled: ...`: `compiled.programs`, `.cache_hits` and `.seconds` of the block (read inside it,
  they count up to now)."""
  tracker = Tracker()
  try:
    yield tracker
  finally:
    tracker.stop()
