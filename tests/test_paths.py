"""A clone is all a user has: no tracked file names a folder of the machine the project was built on (a flag
default, a test's input, a command in the docs) or the project's shared folder beside the checkout. Data and
assets are found relative to the code (`experiments.common.data_path`, `hdjax.assets`)."""

from __future__ import annotations

import os
import re
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# an absolute path into a build machine's folders: /work/..., /root/..., /home/..., /tmp/... (not a URL's path, not
# part of a relative path such as results/tmp/)
MACHINE_PATH = re.compile(r"(?<![\w.~/-])/(?:work|root|home|tmp|mnt|Users)(?:/|\b)")
# the shared folder beside the checkout, as a path or as os.path.join's parts
SHARED = re.compile(r"\.\./shared|[\"']\.\.[\"'],\s*[\"']shared[\"']")
ALLOWED = {"tests/test_paths.py": "its examples of what the patterns catch"}  # path -> why it may name them


def tracked_text_files() -> list[str]:
  listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=False)
  if listed.returncode:
    pytest.skip("not a git checkout")
  paths = [p for p in listed.stdout.decode().split("\0") if p and p not in ALLOWED]
  return [p for p in paths if os.path.isfile(os.path.join(ROOT, p)) and is_text(os.path.join(ROOT, p))]


def is_text(path: str) -> bool:
  with open(path, "rb") as f:
    return b"\0" not in f.read(8192)


def offending_lines(path: str) -> list[str]:
  with open(os.path.join(ROOT, path), encoding="utf-8", errors="replace") as f:
    return [f"{path}:{n}: {line.strip()[:160]}" for n, line in enumerate(f, 1)
            if MACHINE_PATH.search(line) or SHARED.search(line)]


def test_no_tracked_file_names_a_build_machine_path_or_the_shared_folder():
  found = [line for path in tracked_text_files() for line in offending_lines(path)]
  assert not found, "paths a clone does not have:\n" + "\n".join(found)


@pytest.mark.parametrize("line, bad", [
    ('flags.DEFINE_string("questions", "/work/shared/data/q.jsonl", "")', True),
    ("python -m experiments.x --out_dir=/tmp/x", True),
    ('os.path.join(_ROOT, "..", "shared", "data")', True),
    ("see ../shared/probes", True),
    ("HOME=/root make run", True),
    ("--out_dir=results/tmp/x and/or https://example.com/home/page ~/.cache/hdjax", False),
])
def test_the_patterns_catch_what_they_should(line, bad):
  assert bool(MACHINE_PATH.search(line) or SHARED.search(line)) == bad
