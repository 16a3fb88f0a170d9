"""Multi-process runs for the launchers: `jax.distributed.initialize` from flags, and work split by process.

A launcher imports this module (which defines `--coordinator_address`, `--num_processes`, `--process_id`),
calls `initialize_from_flags()` first thing in `main`, and then either

- runs SPMD over all processes' devices with a global mesh (`hdjax.sharding.make_mesh()`), or
- runs data parallel over questions: `run_split(items, fn)` hands each process every `num_processes`-th item
  (each process decoding on its own local devices: `local_mesh()`), gathers the results over the
  distributed runtime and returns them to every process in item order, so process 0 writes the files.

With the defaults (no coordinator, one process) nothing is initialized and `run_split` is a plain map.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Callable, Iterable, Sequence, TypeVar

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

from hdjax import sharding
from hdjax.errors import HdjaxError

flags.DEFINE_string("coordinator_address", None,
                    "host:port of process 0 for jax.distributed.initialize (unset: a single process)")
flags.DEFINE_integer("num_processes", 1, "number of processes taking part (jax.distributed.initialize)")
flags.DEFINE_integer("process_id", 0, "this process's index in [0, num_processes)")

FLAGS = flags.FLAGS
T = TypeVar("T")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
  index: int
  count: int

  @property
  def is_main(self) -> bool:
    return self.index == 0


def initialize(coordinator_address: str | None, num_processes: int, process_id: int) -> ProcessInfo:
  """Joins the distributed runtime when more than one process takes part; validates the settings."""
  if num_processes < 1 or not 0 <= process_id < num_processes:
    raise HdjaxError(f"bad multi-process settings: num_processes={num_processes}, process_id={process_id}")
  if num_processes > 1 and not coordinator_address:
    raise HdjaxError("--num_processes > 1 needs --coordinator_address=HOST:PORT (process 0's address)")
  if num_processes > 1 or coordinator_address:
    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)
  return ProcessInfo(jax.process_index(), jax.process_count())


def initialize_from_flags() -> ProcessInfo:
  return initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)


def local_mesh(data: int | None = None, model: int | None = None) -> jax.sharding.Mesh:
  """A mesh over this process's own devices, for data parallelism across processes."""
  return sharding.make_mesh(data, model, devices=jax.local_devices())


def split(items: Sequence[T], info: ProcessInfo) -> list[tuple[int, T]]:
  """This process's share of `items`, with their indices: every `count`-th item from `index` (so each
  process gets a similar mix of categories and lengths)."""
  return [(i, items[i]) for i in range(info.index, len(items), info.count)]


def merge(parts: Iterable[Sequence[tuple[int, R]]], num_items: int) -> list[R]:
  """Results of every process's `split` share back in item order; each index must appear exactly once."""
  by_index: dict[int, R] = {}
  for part in parts:
    for i, row in part:
      if i in by_index:
        raise HdjaxError(f"item {i} was produced by two processes")
      by_index[int(i)] = row
  missing = sorted(set(range(num_items)) - set(by_index))
  if missing:
    raise HdjaxError(f"no process produced items {missing[:10]}{'...' if len(missing) > 10 else ''}")
  return [by_index[i] for i in range(num_items)]


def allgather_json(obj: Any, info: ProcessInfo) -> list[Any]:
  """Every process's JSON-serialisable `obj`, in process order, on every process."""
  if info.count == 1:
    return [obj]
  data = np.frombuffer(json.dumps(obj).encode("utf-8"), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:data.size] = data
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(info.count, -1)
  return [json.loads(gathered[p, :sizes[p]].tobytes().decode("utf-8")) for p in range(info.count)]


def run_split(items: Sequence[T], fn: Callable[[int, T], R], info: ProcessInfo) -> list[R]:
  """`[fn(i, x) for i, x in enumerate(items)]` with the items split across processes; every process gets all
  results, in item order. Results must be JSON-serialisable."""
  mine = [(i, fn(i, item)) for i, item in split(items, info)]
  return merge(allgather_json(mine, info), len(items))
