"""What every absl launcher shares: one-line errors with a non-zero exit, checks of flags, input records and
output paths before any model work, JSONL writing, timing.

Every launcher runs both as `python -m experiments.X` (from the repository root) and as `python experiments/X.py`
(from anywhere): the second form starts with only `experiments/` on `sys.path`, so each launcher begins with

  if __package__ in (None, ""):  # started as `python experiments/X.py`: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
"""

from __future__ import annotations

import inspect
import json
import math
import os
import sys
import tempfile
import time
from typing import Any, Callable, Iterable, Mapping, Sequence, TextIO, TypeVar

import numpy as np
from absl import app, flags, logging

from hdjax import compilation
from hdjax.errors import HdjaxError
from hdjax.files import atomic_write

flags.DEFINE_bool("compile_cache", True,
                  "Keep compiled programs in jax's persistent compilation cache, so that a second run loads them "
                  f"instead of compiling them; ${compilation.CACHE_ENV} names its directory (default "
                  "~/.cache/hdjax/jax) or turns it off (0).")


def data_path(*parts: str) -> str:
  """A file of the repository's `data/` folder (data/README.md: sources and licenses), found from this file, so
  that a clone anywhere finds its own copy."""
  return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", *parts)


SPEC_BENCH_QUESTIONS = data_path("spec_bench", "question.jsonl")  # Spec-Bench's 480 questions
XSUM_ARTICLES = data_path("xsum", "test.jsonl")  # 1,000 XSum articles {document, summary, id}


def run_main(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)` with the persistent compilation cache on (unless --compile_cache=false), turning user-facing
  errors into one line on stderr and exit status 2."""

  def guarded(argv):
    logging.set_verbosity(logging.WARNING)  # keep library INFO chatter (orbax, jax backends) out of the output
    compilation.enable_persistent_cache(flags.FLAGS.compile_cache)
    try:
      return main(argv)
    except HdjaxError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt:
      print("error: interrupted", file=sys.stderr)
      sys.exit(130)

  app.run(guarded)


def print_start(launcher: str, file: TextIO | None = None, **settings: Any) -> None:
  """A launcher's first line, printed (to stdout, or `file`) before any model work: where it runs and with what
  settings."""
  print(f"{launcher} on {device_name()}: " + ", ".join(f"{k}={v}" for k, v in settings.items()), file=file,
        flush=True)


def compiled_text(count: compilation.CompileCount) -> str:
  """`compile 52.3 s: 14 programs compiled, 3 loaded from the cache` (the seconds: tracing, compiling, loading)."""
  return (f"compile {count.seconds:.1f} s: {count.programs} programs compiled, {count.cache_hits} loaded from the "
          "cache")


Shape = TypeVar("Shape")
Out = TypeVar("Out")


def each_shape(label: str, shapes: Sequence[Shape], run: Callable[[Shape], Out]
               ) -> tuple[list[Out], compilation.CompileCount]:
  """`run(shape)` for each of `shapes` (each compiles what it needs), printing `compiling {label}: 5/12 shapes, 38 s`
  as each finishes and then `{label}: compiled_text(...)`; the outputs and what they compiled."""
  start = time.perf_counter()
  outs = []
  with compilation.track() as compiled:
    for k, shape in enumerate(shapes, 1):
      outs.append(run(shape))
      print(f"compiling {label}: {k}/{len(shapes)} shapes, {time.perf_counter() - start:.0f} s", flush=True)
  print(f"{label}: {compiled_text(compiled.count())}", flush=True)
  return outs, compiled.count()


def pyplot(path: str) -> Any:
  """matplotlib's pyplot on the Agg backend, or None, with a one-line note that `path` is not drawn, where matplotlib
  is not installed (an accelerator image may lack it)."""
  try:
    import matplotlib  # pylint: disable=import-outside-toplevel  (optional: only the plots need it)
  except ImportError:
    print(f"note: matplotlib is not installed: {path} not drawn", file=sys.stderr)
    return None
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  return plt


def check_memory_maps(fraction: float = 0.85) -> None:
  """Stops the run with a clear error when this process's memory maps near the kernel's limit (Linux
  `vm.max_map_count`, 65,530 by default). XLA:CPU maps every compiled kernel's code and data pages separately:
  1,400-4,200 maps per compiled decoding program for SmolLM2 (`hd+adadecode`'s device loop in fp32 is the largest),
  and a compile past the limit fails inside LLVM ("Cannot allocate memory") and crashes the process."""
  try:
    with open("/proc/self/maps", encoding="ascii", errors="replace") as f:
      used = sum(1 for _ in f)
    with open("/proc/sys/vm/max_map_count", encoding="ascii") as f:
      limit = int(f.read())
  except (OSError, ValueError):  # not Linux: no such limit to watch
    return
  if used > fraction * limit:
    raise HdjaxError(f"the compiled programs of this run hold {used:,} of the {limit:,} memory maps the kernel "
                     "allows a process (vm.max_map_count); one more compile could crash it: run fewer methods or "
                     "questions per process, or raise vm.max_map_count")


def device_name() -> str:
  """What the numbers were measured on, e.g. 'NVIDIA H100 80GB HBM3 x1 (gpu)', or on a CPU its model and whether
  it has bf16 units (without them a bf16 step ran ~2.5x an fp32 one), e.g. 'cpu x1 (cpu: AMD EPYC, 2 cores, no
  bf16 units)'."""
  import jax  # pylint: disable=import-outside-toplevel  (see median_ms)
  name = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}"
  if jax.default_backend() != "cpu":
    return name + ")"
  return f"{name}: {cpu_model()})"


def cpu_info() -> tuple[str, frozenset[str]]:
  """The host CPU's model name and feature flags, from /proc/cpuinfo (Linux; ('unknown CPU', {}) elsewhere)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      lines = f.read().splitlines()
  except OSError:
    return "unknown CPU", frozenset()
  fields = {}
  for line in lines:
    key, sep, value = line.partition(":")
    if sep:
      fields.setdefault(key.strip(), value.strip())
  return fields.get("model name", "unknown CPU"), frozenset(fields.get("flags", "").split())


BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})


def cpu_model() -> str:
  """The host CPU's model name, core count and bf16 units, e.g. 'AMD EPYC, 2 cores, no bf16 units'."""
  name, cpu_flags = cpu_info()
  bf16 = sorted(cpu_flags & BF16_FLAGS)
  return f"{name}, {os.cpu_count()} cores, {'bf16 units: ' + ' '.join(bf16) if bf16 else 'no bf16 units'}"


def speed_dtype(dtype: str = "auto") -> str:
  """`dtype`, or for "auto" the faster weight dtype of this host: bf16 on an accelerator or on a CPU with bf16 units
  (where a bf16 step is flat in its rows: docs/results/engine-steps.md), fp32 on a CPU without them (a bf16 decode
  step took 87 ms against fp32's 30-38 ms on an AVX2-only AMD EPYC, 2026-11-29)."""
  if dtype != "auto":
    return dtype
  import jax  # pylint: disable=import-outside-toplevel  (see median_ms)
  if jax.default_backend() != "cpu":
    return "bfloat16"
  return "bfloat16" if cpu_info()[1] & BF16_FLAGS else "float32"


def median_ms(fn: Callable[..., Any], *args, repeats: int) -> float:
  """Median wall time in ms of `fn(*args)` over `repeats` calls, after one untimed (compiling) call."""
  import jax  # pylint: disable=import-outside-toplevel  (launchers report bad flags before jax loads)
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return 1e3 * float(np.median(times))


def read_records(path: str) -> list[tuple[int, dict[str, Any]]]:
  """(line number, JSON object) for every non-blank line of a JSONL file; an `HdjaxError` with `file:line` for a
  line that is not a JSON object, and for a file with no records."""
  if not os.path.isfile(path):
    raise HdjaxError(f"file not found: {path}")
  rows = []
  try:
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if line.strip():
          try:
            row = json.loads(line)
          except json.JSONDecodeError as e:
            raise HdjaxError(f"{path}:{n}: not valid JSON ({e.msg})") from None
          if not isinstance(row, dict):
            raise HdjaxError(f"{path}:{n}: a record must be a JSON object, got {type(row).__name__}")
          rows.append((n, row))
  except UnicodeDecodeError as e:
    raise HdjaxError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
  if not rows:
    raise HdjaxError(f"{path}: no records (the file is empty)")
  return rows


def read_jsonl(path: str) -> list[dict[str, Any]]:
  return [row for _, row in read_records(path)]


def read_questions(path: str) -> list[dict[str, Any]]:
  """A Spec-Bench question file, every record checked (question_id, category, non-empty turns; unique ids)."""
  records = read_records(path)
  check_records(path, records, dict(question_id=is_id, category=is_text, turns=is_turns), unique="question_id")
  return [q for _, q in records]


def check_records(path: str, records: Sequence[tuple[int, dict[str, Any]]], fields: Mapping[str, Callable[[Any], bool]],
                  optional: Mapping[str, Callable[[Any], bool]] | None = None, unique: str | None = None) -> None:
  """Every record has each of `fields` passing its check (and each present `optional` field passing its own), and
  the `unique` field differs between records; else an `HdjaxError` with `file:line`."""
  seen: dict[Any, int] = {}
  for n, row in records:
    for name, ok in fields.items():
      if name not in row:
        raise HdjaxError(f"{path}:{n}: record lacks {name!r} (needs {', '.join(fields)})")
      if not ok(row[name]):
        raise HdjaxError(f"{path}:{n}: bad {name!r}: {json.dumps(row[name])[:80]} ({describe(ok)})")
    for name, ok in (optional or {}).items():
      if name in row and not ok(row[name]):
        raise HdjaxError(f"{path}:{n}: bad {name!r}: {json.dumps(row[name])[:80]} ({describe(ok)})")
    if unique is not None:
      key = json.dumps(row[unique])
      if key in seen:
        raise HdjaxError(f"{path}:{n}: {unique} {row[unique]!r} repeats line {seen[key]}")
      seen[key] = n


def describe(check: Callable[[Any], bool]) -> str:
  return (check.__doc__ or check.__name__).strip()


def is_id(x: Any) -> bool:
  """a non-empty string or an integer"""
  return (isinstance(x, str) and bool(x.strip())) or (isinstance(x, int) and not isinstance(x, bool))


def is_text(x: Any) -> bool:
  """a non-empty string"""
  return isinstance(x, str) and bool(x.strip())


def is_turns(x: Any) -> bool:
  """a non-empty list of non-empty strings"""
  return isinstance(x, list) and bool(x) and all(is_text(t) for t in x)


def is_string(x: Any) -> bool:
  """a string"""
  return isinstance(x, str)


def require(**checks: tuple[Any, Callable[[Any], bool]]) -> None:
  """`require(limit=(FLAGS.limit, at_least(1)))`: an `HdjaxError` naming the first flag whose value fails."""
  for name, (value, ok) in checks.items():
    if not ok(value):
      raise HdjaxError(f"--{name} must be {describe(ok)}, got {value!r}")


def at_least(low: float) -> Callable[[Any], bool]:
  def ok(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x >= low
  ok.__doc__ = f">= {low}"
  return ok


def int_list(name: str, values: Sequence[str], low: int = 1) -> list[int]:
  """The integers of a comma-separated list flag, each >= `low`; else an `HdjaxError` naming the flag."""
  try:
    out = [int(v) for v in values]
  except ValueError:
    raise HdjaxError(f"--{name} must be a comma-separated list of integers >= {low}, got {','.join(values)!r}"
                     ) from None
  if not out or min(out) < low:
    raise HdjaxError(f"--{name} must be a non-empty list of integers >= {low}, got {','.join(values)!r}")
  return out


def parse_method_options(text: str, methods: Sequence[str]) -> dict[str, dict[str, Any]]:
  """`--method_options`: a JSON object {method: {option: value}} over the run's methods, each option one that its
  method reads, with a value of the right kind (`hdjax.api.check_options`), and none that the launcher passes to
  `LM.generate` itself (its arguments, and the streaming and warm-up options of `hdjax.methods.COMMON`), so that
  every option given lands in `generate`'s keyword arguments; checked before any model work."""
  # pylint: disable=import-outside-toplevel  (launchers' --help stays fast)
  from hdjax.api import LM, check_options
  from hdjax.methods import COMMON
  try:
    options = json.loads(text)
  except json.JSONDecodeError as e:
    raise HdjaxError(f"--method_options is not valid JSON ({e.msg})") from None
  if not isinstance(options, dict) or not all(isinstance(v, dict) for v in options.values()):
    raise HdjaxError(f"--method_options must be a JSON object {{method: {{option: value}}}}, got {text!r}")
  extra = sorted(set(options) - set(methods))
  if extra:
    raise HdjaxError(f"--method_options names method(s) {', '.join(extra)} not in --methods={','.join(methods)}")
  reserved = (set(inspect.signature(LM.generate).parameters) - {"self", "options"}) | set(COMMON)
  for method, opts in options.items():
    taken = sorted(reserved & set(opts))
    if taken:
      raise HdjaxError(f"--method_options: the launcher sets {', '.join(taken)} itself (method {method!r}); use its "
                       "flags")
    check_options(method, opts)
  return options


def check_output_dir(path: str, files: Iterable[str] = ()) -> None:
  """Creates `path` and proves it writable (a probe file), and that none of the `files` it will hold is a directory,
  before any model work; an `HdjaxError` otherwise."""
  if not path:
    raise HdjaxError("the output directory is empty")
  try:
    os.makedirs(path, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except (FileExistsError, NotADirectoryError):
    raise HdjaxError(f"output directory {path} is a file (or lies under one)") from None
  except OSError as e:
    raise HdjaxError(f"output directory {path} is not writable ({e.strerror})") from None
  taken = [f for f in files if os.path.isdir(os.path.join(path, f))]
  if taken:
    raise HdjaxError(f"output file {os.path.join(path, taken[0])} is a directory")


def check_output_file(path: str) -> None:
  """`path` is not a directory and its directory is writable (see `check_output_dir`)."""
  if os.path.isdir(path):
    raise HdjaxError(f"output file {path} is a directory")
  check_output_dir(os.path.dirname(os.path.abspath(path)))


def write_jsonl_atomic(path: str, rows: Iterable[dict[str, Any]]) -> None:
  with atomic_write(path) as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")


def write_json_atomic(path: str, obj: Any) -> None:
  with atomic_write(path) as f:
    json.dump(obj, f, indent=1)
