"""The launchers of the device suite import on an accelerator image that has jax, flax, optax, orbax, torch and
transformers but none of the packages below: they import them only where they are used."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from experiments import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ABSENT_ON_THE_IMAGE = ("gguf", "ml_collections", "tensorboardX", "rouge_score", "matplotlib")
# `import X` fails for a name that sys.modules maps to None, as for a package that is not installed
BLOCK = "import sys; sys.modules.update(dict.fromkeys({names!r}))"


# one process per launcher: each defines its own absl flags (`--model` in several)
@pytest.mark.parametrize("module", ["specbench", "bench_steps", "bench_batch", "bench_peers", "hf_peer"])
def test_a_device_suite_launcher_imports_without_the_packages_the_image_lacks(module):
  code = f"{BLOCK.format(names=ABSENT_ON_THE_IMAGE)}; import experiments.{module}"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                       check=False)
  assert out.returncode == 0, out.stderr[-2000:]


def test_a_plot_without_matplotlib_is_skipped_with_a_note(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  assert common.pyplot("out/speedup.png") is None
  assert capsys.readouterr().err == "note: matplotlib is not installed: out/speedup.png not drawn\n"
