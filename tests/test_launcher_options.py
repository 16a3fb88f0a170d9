"""Every launcher's method options land in `hdjax.LM.generate`'s keyword arguments: `--method_options` (the
launchers that take it) takes exactly the options a method reads, less those a launcher passes itself, and
`longctx`'s LazyLLM flags are options of its lazy methods."""

from __future__ import annotations

import glob
import inspect
import json
import os
import re
import subprocess
import sys

import pytest

import hdjax
from experiments import common
from hdjax.api import METHOD_OPTIONS
from hdjax.errors import HdjaxError
from hdjax.methods import COMMON

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what a launcher passes to `generate` besides the options (streaming and warm-up included)
LAUNCHER_ARGS = dict(method="ar", max_new_tokens=1, temperature=0.0, top_k=0, top_p=1.0, seed=0, **COMMON)


def launcher_sources(flag: str) -> dict[str, str]:
  """The source of every launcher that defines `--flag`, by name."""
  found = {}
  for path in sorted(glob.glob(os.path.join(ROOT, "experiments", "*.py"))):
    with open(path, encoding="utf-8") as f:
      text = f.read()
    if re.search(rf'DEFINE_\w+\("{flag}"', text):
      found[os.path.basename(path)[:-3]] = text
  return found


def json_value(default):
  try:
    return json.loads(json.dumps(default))
  except TypeError:
    return None


def test_every_method_option_maps_onto_generate_keyword_arguments():
  sources = launcher_sources("method_options")
  assert {"generate", "specbench"} <= set(sources)
  assert all("parse_method_options(" in text for text in sources.values())
  generate = inspect.signature(hdjax.LM.generate)
  for method, accepted in METHOD_OPTIONS.items():
    for option, default in accepted.items():
      text = json.dumps({method: {option: json_value(default)}})
      if option in COMMON or option in generate.parameters:
        with pytest.raises(HdjaxError, match="the launcher sets"):
          common.parse_method_options(text, [method])
        continue
      options = common.parse_method_options(text, [method])[method]
      generate.bind(None, [[1]], **dict(LAUNCHER_ARGS, method=method), **options)


def test_longctx_lazy_flags_are_options_of_its_lazy_methods(tmp_path):
  """Every LazyLLM flag set: the run gets past the options check (`check_options` of each method) and stops at
  the next check, its output directory being a file."""
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  flags = ["--prune_layers=4", "--keep_ratios=0.5", "--min_prompt=8", "--reselect_every=2", "--revive_budget=4",
           "--score_window=1", "--score_pool=1", "--score_skip=0", "--keep_sinks=1"]
  assert {f.split("=")[0][2:] for f in flags} <= set(METHOD_OPTIONS["lazy"])
  proc = subprocess.run([sys.executable, "-m", "experiments.longctx", "--build=passkey", *flags,
                         "--methods=full,lazy,lazy+hd", f"--out_dir={a_file}"], cwd=ROOT, capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 2 and "is a file" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
