"""What the device did during a few calls, read from a `jax.profiler` trace: kernels per call, the device's busy
time per call against the host's wall time, and the kernels that took the most time.

On a GPU the trace's device plane holds one line per CUDA stream with one event per kernel or copy, so

  kernels per call = events on the stream lines / calls
  busy per call    = the union of those events' intervals / calls

and wall minus busy is time the device sat idle: launches, host round trips (a `while` predicate read back),
Python. On a CPU the trace has no device plane: the figures are None and only the wall time is read.

`hlo_counts` reads a compiled program's HLO text instead, on any backend: GEMMs, and the loops and branches whose
predicate XLA:GPU reads on the host.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
import tempfile
import time
from typing import Any, Callable

import jax
from jax.profiler import ProfileData

_DERIVED_LINES = ("XLA Modules", "XLA Ops", "Steps", "Launch Stats", "Source", "Framework")


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
  calls: int
  wall_ms: float  # host wall time per call, synchronised
  kernels: float | None  # device events per call (None: no device plane, e.g. on a CPU)
  busy_ms: float | None  # device busy time per call
  top: tuple[tuple[str, float], ...]  # (kernel name, share of busy time), largest first
  trace: str  # the .xplane.pb file (TensorBoard / xprof)

  def as_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def text(self) -> str:
    if self.kernels is None:
      return f"{self.wall_ms:.3f} ms wall per call (no device plane in the trace)"
    top = ", ".join(f"{name[:40]} {share:.0%}" for name, share in self.top)
    return (f"{self.kernels:.0f} kernels per call, device busy {self.busy_ms:.3f} of {self.wall_ms:.3f} ms wall "
            f"({self.busy_ms / self.wall_ms:.0%}); top: {top}")


def busy_ns(intervals: list[tuple[int, int]]) -> int:
  """Length of the union of [start, end) intervals."""
  total, reach = 0, None
  for start, end in sorted(intervals):
    if reach is None or start > reach:
      total, reach = total + end - start, end
    elif end > reach:
      total, reach = total + end - reach, end
  return total


def device_events(data: ProfileData) -> list[tuple[str, int, int]]:
  """(name, start ns, duration ns) of every kernel and copy on the device planes' stream lines."""
  events = []
  for plane in data.planes:
    if not plane.name.startswith("/device:"):
      continue
    for line in plane.lines:
      if any(line.name.startswith(d) for d in _DERIVED_LINES):
        continue
      events += [(e.name, int(e.start_ns), int(e.duration_ns)) for e in line.events]
  return events


def profile_calls(call: Callable[[], Any], calls: int, trace_dir: str | None = None, top: int = 5) -> DeviceProfile:
  """Trace `calls` synchronised calls of `call()` (already compiled and warm) into `trace_dir` (default: a new
  temporary directory) and summarise what the device did."""
  trace_dir = trace_dir or tempfile.mkdtemp(prefix="hdjax_trace_")
  jax.profiler.start_trace(trace_dir)
  start = time.perf_counter()
  for _ in range(calls):
    jax.block_until_ready(call())
  wall = time.perf_counter() - start
  jax.profiler.stop_trace()
  traces = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  return summarise(device_events(ProfileData.from_file(traces[-1])), calls, 1e3 * wall / calls, traces[-1], top)


def summarise(events: list[tuple[str, int, int]], calls: int, wall_ms: float, trace: str, top: int = 5
              ) -> DeviceProfile:
  """A `DeviceProfile` of `device_events` recorded over `calls` calls of `wall_ms` each."""
  if not events:
    return DeviceProfile(calls, wall_ms, None, None, (), trace)
  busy = busy_ns([(s, s + d) for _, s, d in events])
  by_name = collections.Counter()
  for name, _, d in events:
    by_name[name] += d
  shares = tuple((name, d / max(busy, 1)) for name, d in by_name.most_common(top))
  return DeviceProfile(calls, wall_ms, len(events) / calls, busy / 1e6 / calls, shares, trace)


@dataclasses.dataclass(frozen=True)
class HloCounts:
  """What one compiled program holds, counted in its HLO text (`jax.stages.Compiled.as_text()`)."""

  gemms: int  # `dot` ops (projections, the LM head, attention's contractions; inside fusions too) and library
  #             GEMM calls (cuBLAS, oneDNN)
  unknown_trip_loops: int  # `while` ops without a trip count known to XLA: XLA:GPU reads their predicate on the host
  #                          every iteration (a `scan` or a static `fori_loop` has one)
  conditionals: int  # `conditional` ops: XLA:GPU reads their branch index on the host


def hlo_counts(hlo_text: str) -> HloCounts:
  """The `HloCounts` of a compiled program's HLO text."""
  ops = [line for line in hlo_text.splitlines() if " = " in line]
  return HloCounts(
      gemms=sum(bool(re.search(r"\sdot\(|custom_call_target=\"[^\"]*(gemm|matmul)", op)) for op in ops),
      unknown_trip_loops=sum(bool(re.search(r"\swhile\(", op)) and "known_trip_count" not in op for op in ops),
      conditionals=sum(bool(re.search(r"\sconditional\(", op)) for op in ops))
