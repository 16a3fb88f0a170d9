"""experiments/device_suite.sh: its dry run (tiny settings on the CPU) runs every part to its table, each launcher
naming itself in its first line, so the GPU check cannot rot between the rare runs on a GPU; bad arguments stop it
before any work."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUITE = os.path.join(ROOT, "experiments", "device_suite.sh")
# each run of the suite: its launcher (whose first line names it) and a line of the table its log must hold
RUNS = {
    "steps_smollm2": ("bench_steps", r"^\s+2\s+[\d.]+\s+[\d.]+\s+[\d.]+"),
    "steps_smollm2_b8": ("bench_steps", r"^\s+2\s+[\d.]+\s+[\d.]+\s+[\d.]+"),
    "steps_llama2_7b": ("bench_steps", r"^\s+2\s+[\d.]+\s+[\d.]+\s+[\d.]+"),
    "specbench": ("specbench", r"^pld\s+speedup [\d.]+x .* identical 1\.00"),
    "hf": ("bench_peers", r"^float32\s+hf_prompt_lookup\s+[\d.]+ .* to hf$"),
    "batch": ("bench_batch", r"^B=2\s+hd\s+[\d.]+ tok/s .* identical 1\.00"),
    "lazy": ("longctx", r"^lazy passkey@256 \{.*'ttft_speedup_vs_base': [\d.]+.*'ttft_speedup_vs_hf': [\d.]+"),
}


def suite(*args: str, timeout: int) -> subprocess.CompletedProcess:
  return subprocess.run(["bash", SUITE, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                        check=False)


def test_the_dry_run_runs_every_part_to_its_table(tmp_path):
  out = suite("--dry_run", str(tmp_path), timeout=900)
  assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
  summary = out.stdout.rpartition("== summary")[2]
  for run, (launcher, table_line) in RUNS.items():
    assert re.search(rf"^{run}\s+exit\s+0\s", summary, re.M), summary
    log = (tmp_path / f"{run}.log").read_text()
    assert log.startswith(f"{launcher} on "), log[:500]
    assert re.search(table_line, log, re.M), f"{run}.log lacks its table:\n{log[-2000:]}"
  assert re.search(r"^profile ar loop of 2 tokens .* ms wall per call", (tmp_path / "steps_smollm2.log").read_text(),
                   re.M)


@pytest.mark.parametrize("args, message", [((), "usage:"), (("--dry_run",), "usage:"),
                                           (("out", "steps", "gpu"), "unknown part 'gpu'")])
def test_bad_arguments_stop_the_suite_with_a_one_line_error(tmp_path, args, message):
  out = suite(*(str(tmp_path / a) if a == "out" else a for a in args), timeout=30)
  assert out.returncode == 2
  assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
  assert not out.stdout
