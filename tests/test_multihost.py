"""Two processes on localhost (CPU backend, `jax.distributed.initialize`) split prompts and merge the results.

Run as a script (`python tests/test_multihost.py COORDINATOR NUM_PROCESSES PROCESS_ID`) this file is one
process: it decodes its share of the prompts with a tiny random model and prints the merged token ids.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROMPTS = 5


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def launch(coordinator: str, num_processes: int, process_id: int) -> subprocess.Popen:
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  return subprocess.Popen([sys.executable, os.path.abspath(__file__), coordinator, str(num_processes),
                           str(process_id)], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)


def collect(proc: subprocess.Popen) -> dict:
  out, err = proc.communicate(timeout=600)
  assert proc.returncode == 0, err[-3000:]
  return json.loads(out.strip().splitlines()[-1])


def test_split_and_merge_are_inverse():
  from experiments import multihost  # pylint: disable=import-outside-toplevel
  from hdjax.errors import HdjaxError  # pylint: disable=import-outside-toplevel
  items = [f"q{i}" for i in range(7)]
  parts = [multihost.split(items, multihost.ProcessInfo(p, 3)) for p in range(3)]
  assert [i for i, _ in parts[1]] == [1, 4]
  assert multihost.merge(reversed(parts), len(items)) == items
  with pytest.raises(HdjaxError, match="no process produced items \\[1, 4\\]"):
    multihost.merge([parts[0], parts[2]], len(items))
  with pytest.raises(HdjaxError, match="two processes"):
    multihost.merge([parts[0], parts[0]], len(items))
  with pytest.raises(HdjaxError, match="coordinator_address"):
    multihost.initialize(None, 2, 0)
  with pytest.raises(HdjaxError, match="bad multi-process"):
    multihost.initialize("localhost:1", 2, 2)


@pytest.mark.slow
def test_two_processes_merge_to_the_single_process_output():
  coordinator = f"localhost:{free_port()}"
  procs = [launch(coordinator, 2, i) for i in range(2)]
  single_out = _process_main("", 1, 0)  # this process: one device, no distributed runtime
  outs = [collect(p) for p in procs]
  assert [o["process"] for o in outs] == [[0, 2], [1, 2]]
  assert outs[0]["mine"] == [0, 2, 4] and outs[1]["mine"] == [1, 3]
  assert len(single_out["token_ids"]) == NUM_PROMPTS
  assert outs[0]["token_ids"] == single_out["token_ids"]
  assert outs[1]["token_ids"] == single_out["token_ids"]


def _process_main(coordinator: str, num_processes: int, process_id: int) -> dict:
  # pylint: disable=import-outside-toplevel
  import jax
  import numpy as np
  from experiments import multihost
  from tests.conftest import make_tiny_lm

  info = multihost.initialize(coordinator or None, num_processes, process_id)
  lm = make_tiny_lm(seed=3)
  rng = np.random.default_rng(0)
  prompts = [[int(x) for x in rng.integers(3, lm.cfg.vocab_size, n)] for n in (4, 9, 6, 12, 3)]
  assert len(prompts) == NUM_PROMPTS
  mine = [i for i, _ in multihost.split(prompts, info)]
  assert all(d.process_index == info.index for d in jax.tree.leaves(
      jax.tree.map(lambda x: list(x.devices())[0], lm.params)))
  ids = multihost.run_split(prompts, lambda _, p: lm.generate([p], method="ar", max_new_tokens=8)[0].token_ids,
                            info)
  return {"process": [info.index, info.count], "mine": mine, "token_ids": ids}


if __name__ == "__main__":
  print(json.dumps(_process_main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
