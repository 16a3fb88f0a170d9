"""hdjax.compilation: the count of compiled programs, and the persistent cache across processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from hdjax import compilation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# one small program, compiled (or loaded) in a fresh process: prints the cache directory in use and the count
CHILD = """
import json, jax, jax.numpy as jnp
from hdjax import compilation
cache_dir = compilation.enable_persistent_cache()
x = jnp.arange(8.0)
with compilation.track() as compiled:
  jax.jit(lambda v: jnp.cumsum(jnp.sin(v) * 3.0))(x).block_until_ready()
print(json.dumps(dict(cache_dir=cache_dir, **compiled.count().as_dict())))
"""


def run_child(cache_setting: str) -> tuple[dict, str]:
  env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env.update({compilation.CACHE_ENV: cache_setting, "JAX_PLATFORMS": "cpu"})
  out = subprocess.run([sys.executable, "-c", CHILD], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1]), out.stderr


def test_a_new_program_counts_once_and_a_second_call_none():
  x = jnp.arange(5.0)
  fn = jax.jit(lambda v: jnp.tanh(v) * 7.0 + 1.0)
  with compilation.track() as first:
    fn(x).block_until_ready()
  with compilation.track() as second:
    fn(x).block_until_ready()
  assert first.programs + first.cache_hits == 1
  assert first.seconds > 0
  assert (second.programs, second.cache_hits, second.seconds) == (0, 0, 0.0)


def test_a_tracker_reads_up_to_now_inside_its_block_and_freezes_at_its_end():
  x = jnp.arange(6.0)
  with compilation.track() as compiled:
    assert compiled.count() == compilation.CompileCount()
    jax.jit(lambda v: v * 5.0 - 2.0)(x).block_until_ready()
    inside = compiled.count()
  jax.jit(lambda v: v * 9.0 - 4.0)(x).block_until_ready()
  assert inside.programs + inside.cache_hits == 1
  assert compiled.count() == inside


def test_a_second_process_loads_the_program_from_the_cache(tmp_path):
  cache_dir = str(tmp_path / "jax")
  first, _ = run_child(cache_dir)
  second, _ = run_child(cache_dir)
  assert first["cache_dir"] == second["cache_dir"] == cache_dir
  assert (first["programs"], first["cache_hits"]) == (1, 0)
  assert (second["programs"], second["cache_hits"]) == (0, 1)
  assert os.listdir(cache_dir)


def test_an_unwritable_cache_dir_warns_and_runs_without_it(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  counted, stderr = run_child(str(blocker / "jax"))
  assert counted["cache_dir"] is None and counted["programs"] == 1
  assert stderr.count("running without the persistent compilation cache") == 1


def test_the_environment_turns_the_cache_off():
  counted, _ = run_child("0")
  assert counted["cache_dir"] is None and counted["programs"] == 1


@pytest.mark.parametrize("setting, expected", [
    (None, "/xdg/hdjax/jax"), ("1", "/xdg/hdjax/jax"), ("true", "/xdg/hdjax/jax"), ("0", None), ("false", None),
    ("OFF", None), ("/some/dir", "/some/dir")])
def test_the_cache_dir_the_environment_asks_for(setting, expected):
  environ = {"XDG_CACHE_HOME": "/xdg", **({} if setting is None else {compilation.CACHE_ENV: setting})}
  assert compilation.requested_cache_dir(environ) == expected


def test_the_default_cache_dir_is_under_the_home_cache_without_xdg():
  assert compilation.default_cache_dir({}) == os.path.join(os.path.expanduser("~"), ".cache", "hdjax", "jax")
