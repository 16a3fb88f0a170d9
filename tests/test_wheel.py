"""An installed hdjax finds its assets: the wheel (`pip wheel . --no-deps`) carries HD's databases and AdaDecode's
heads, and a fresh virtual environment outside the checkout, run from another directory, decodes with them.

The environment reuses this one's packages (a `.pth` line naming its site-packages, whose own `.pth` files, the
checkout's editable install among them, are not run), so no network is needed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

from hdjax import assets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUILD_INPUTS = ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "hdjax", "checkpoints")

SCRIPT = textwrap.dedent("""
    import json, os
    import hdjax
    from hdjax import assets, compilation
    from hdjax.adadecode import decode

    compilation.enable_persistent_cache()
    lm = hdjax.load("smollm2-135m")
    ids = lm.tokenizer.apply_chat_template([{"role": "user", "content": "Name three primary colors."}])
    out = {m: lm.generate([ids], method=m, max_new_tokens=16)[0] for m in ("ar", "hd", "adadecode")}
    print(json.dumps(dict(
        package=os.path.dirname(hdjax.__file__), checkpoints=str(assets.checkpoints_dir()),
        heads=decode.DEFAULT_HEADS_DIR, sources=out["hd"].stats["sources"],
        head_layers=out["adadecode"].stats["head_layers"],
        equal_ar={m: r.token_ids == out["ar"].token_ids for m, r in out.items()})))
""")


def build_wheel(src, out) -> str:
  """The wheel of a copy of the checkout's build inputs (building in the checkout would write its build/)."""
  os.makedirs(src)
  for name in BUILD_INPUTS:
    copy = shutil.copytree if os.path.isdir(os.path.join(ROOT, name)) else shutil.copy
    kwargs = dict(ignore=shutil.ignore_patterns("__pycache__")) if copy is shutil.copytree else {}
    copy(os.path.join(ROOT, name), os.path.join(src, name), **kwargs)
  subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "-q", "-w", out],
                 cwd=src, check=True, capture_output=True)
  (wheel,) = os.listdir(out)
  return os.path.join(out, wheel)


def fresh_env(path) -> str:
  """A virtual environment at `path` that sees this environment's packages after its own; its python."""
  subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, capture_output=True)
  python = os.path.join(path, "bin", "python")
  site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                        capture_output=True, text=True).stdout.strip()
  with open(os.path.join(site, "reuse_project_env.pth"), "w", encoding="utf-8") as f:
    f.write(sysconfig.get_paths()["purelib"] + "\n")
  return python


def test_an_installed_wheel_decodes_with_its_databases_and_heads(tmp_path):
  wheel = build_wheel(tmp_path / "src", tmp_path / "dist")
  python = fresh_env(tmp_path / "env")
  subprocess.run([python, "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", "-q", wheel],
                 check=True, capture_output=True)
  work = tmp_path / "work"
  work.mkdir()
  (work / "run.py").write_text(SCRIPT)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HDJAX_CHECKPOINTS")}
  proc = subprocess.run([python, "run.py"], cwd=work, env=env, capture_output=True, text=True, timeout=600,
                        check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got["package"].startswith(str(tmp_path / "env")) and got["checkpoints"] == os.path.join(got["package"], "_checkpoints")
  assert got["heads"].startswith(got["checkpoints"]) and got["head_layers"] == [26]
  assert got["sources"] == "context,model,stats"
  assert got["equal_ar"] == dict(ar=True, hd=True, adadecode=True)


def test_hdjax_checkpoints_names_the_assets_directory(monkeypatch, tmp_path):
  assert assets.checkpoints_dir() == Path(ROOT) / "checkpoints"  # a checkout reads its own
  monkeypatch.setenv(assets.ENV, str(tmp_path))
  assert assets.checkpoints_dir() == tmp_path
