"""What every absl launcher shares: one-line errors with a non-zero exit, multi-host flags, JSONL writing, timing."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Callable, Iterable

import numpy as np
from absl import app, logging

from hdjax.errors import HdjaxError


def run_main(main: Callable[[list[str]], Any]) -> None:
  """`app.run(main)`, turning user-facing errors into one line on stderr and exit status 2."""

  def guarded(argv):
    logging.set_verbosity(logging.WARNING)  # keep library INFO chatter (orbax, jax backends) out of the output
    try:
      return main(argv)
    except HdjaxError as e:
      print(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    except KeyboardInterrupt:
      print("error: interrupted", file=sys.stderr)
      sys.exit(130)

  app.run(guarded)


def device_name() -> str:
  """What the numbers were measured on, e.g. 'NVIDIA H100 80GB HBM3 x1 (gpu)'."""
  import jax  # pylint: disable=import-outside-toplevel  (see median_ms)
  return f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()})"


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


def read_jsonl(path: str) -> list[dict[str, Any]]:
  if not os.path.isfile(path):
    raise HdjaxError(f"file not found: {path}")
  rows = []
  with open(path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise HdjaxError(f"{path}:{n}: not valid JSON ({e.msg})") from None
  return rows


def write_jsonl_atomic(path: str, rows: Iterable[dict[str, Any]]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row) + "\n")
  os.replace(tmp, path)


def write_json_atomic(path: str, obj: Any) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=1)
  os.replace(tmp, path)
