"""The library's imports point one way: config -> sharding -> kvcache -> model -> decoding -> methods -> api.

The graph is built from the source with `ast`, not by importing: every `import` and `from ... import` at any
depth of a module (function-local ones included) is an edge, `from hdjax import x` / `from . import x` is an
edge to the submodule `hdjax.x` when there is one (else to the package), and relative imports are resolved
against the module's package. Nothing is exempt: the library names what it needs from a caller's `LM` through
`hdjax.decoding.request.LoadedModel`, so it has no `if TYPE_CHECKING:` imports of `hdjax.api` to excuse.
"""

from __future__ import annotations

import ast
import os

import pytest

PACKAGE = "hdjax"
ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), PACKAGE)

# Which modules may import `hdjax.api`: the package itself (re-exports for users) and api. Launchers and users
# live outside the package.
MAY_IMPORT_API = {"hdjax", "hdjax.api"}

# Tiers, lowest first; an import may only point to the same tier or a lower one. A module's tier is the one of
# its longest listed prefix; a new top-level module must be placed here.
TIERS = (
    ("hdjax.errors", "hdjax.control", "hdjax.compilation", "hdjax.profiling", "hdjax.assets", "hdjax.files"),
    ("hdjax.config",),
    ("hdjax.sharding",),
    ("hdjax.kvcache",),
    ("hdjax.attention", "hdjax.model", "hdjax.exit_heads", "hdjax.weights"),
    ("hdjax.drafting",),
    ("hdjax.decoding",),
    ("hdjax.adadecode", "hdjax.lazy"),
    ("hdjax.compose", "hdjax.methods", "hdjax.streaming"),
    ("hdjax.api",),
)
TOP = len(TIERS) - 1  # the package's __init__, which re-exports the public API


def module_files() -> dict[str, str]:
  """Module name -> source path, for every module of the package (a package is named by its __init__)."""
  out = {}
  for dirpath, dirnames, filenames in os.walk(ROOT):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
    for fname in sorted(filenames):
      if not fname.endswith(".py"):
        continue
      parts = os.path.relpath(os.path.join(dirpath, fname), os.path.dirname(ROOT))[:-3].split(os.sep)
      if parts[-1] == "__init__":
        parts = parts[:-1]
      out[".".join(parts)] = os.path.join(dirpath, fname)
  return out


def imports_of(name: str, path: str, modules: set[str]) -> set[str]:
  """The package's modules that module `name` (at `path`) imports, anywhere in its source."""
  with open(path, encoding="utf-8") as f:
    tree = ast.parse(f.read(), path)
  package = name if path.endswith("__init__.py") else name.rpartition(".")[0]

  def owner(dotted: str) -> str | None:
    """The longest prefix of `dotted` that is one of the package's modules."""
    while dotted and dotted not in modules:
      dotted = dotted.rpartition(".")[0]
    return dotted or None

  found = set()
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      found.update(owner(alias.name) for alias in node.names)
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")
        base = base[:len(base) - (node.level - 1)]
        source = ".".join(base + ([node.module] if node.module else []))
      else:
        source = node.module or ""
      if owner(source) is None:
        continue
      for alias in node.names:  # `from hdjax import api` imports the submodule hdjax.api
        sub = f"{source}.{alias.name}"
        found.add(sub if sub in modules else owner(source))
  found.discard(None)
  found.discard(name)
  return found


def import_graph() -> dict[str, set[str]]:
  files = module_files()
  return {name: imports_of(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  """One import cycle as [a, b, ..., a], or None."""
  state: dict[str, int] = {}  # 1: on the current path, 2: done
  path: list[str] = []

  def visit(node: str) -> list[str] | None:
    state[node] = 1
    path.append(node)
    for nxt in sorted(graph.get(node, ())):
      if state.get(nxt) == 1:
        return path[path.index(nxt):] + [nxt]
      if nxt not in state and (cycle := visit(nxt)):
        return cycle
    path.pop()
    state[node] = 2
    return None

  for node in sorted(graph):
    if node not in state and (cycle := visit(node)):
      return cycle
  return None


def tier_of(name: str) -> int | None:
  if name == PACKAGE:
    return TOP
  best = None
  for rank, prefixes in enumerate(TIERS):
    for p in prefixes:
      if (name == p or name.startswith(p + ".")) and (best is None or len(p) > len(best[1])):
        best = (rank, p)
  return None if best is None else best[0]


@pytest.fixture(scope="module")
def graph():
  return import_graph()


def test_graph_sees_every_kind_of_import(tmp_path):
  """The parser itself: absolute, from-package, relative and function-local imports all become edges."""
  src = ("import hdjax.config\nfrom hdjax import sharding\nfrom .. import model as m\nfrom ..decoding import tree\n"
         "from ..errors import HdjaxError\nfrom . import helper\n"
         "def f():\n  from hdjax.api import LM\n  import numpy\n")
  path = tmp_path / "mod.py"
  path.write_text(src)
  modules = {"hdjax", "hdjax.config", "hdjax.sharding", "hdjax.model", "hdjax.decoding", "hdjax.decoding.tree",
             "hdjax.errors", "hdjax.api", "hdjax.x", "hdjax.x.mod"}
  assert imports_of("hdjax.x.mod", str(path), modules) == {
      "hdjax.config", "hdjax.sharding", "hdjax.model", "hdjax.decoding.tree", "hdjax.errors", "hdjax.x", "hdjax.api"}
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_nothing_in_the_library_imports_api(graph):
  offenders = sorted(name for name, deps in graph.items() if "hdjax.api" in deps and name not in MAY_IMPORT_API)
  assert not offenders, (f"only launchers, users and hdjax/__init__ may import hdjax.api; these modules do: "
                         f"{', '.join(offenders)} (take the names from hdjax.decoding.request / .registry)")


def test_no_import_cycles(graph):
  cycle = find_cycle(graph)
  assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_imports_point_down_the_tiers(graph):
  unplaced = sorted(name for name in graph if tier_of(name) is None)
  assert not unplaced, f"modules with no tier (add them to TIERS in {__file__}): {unplaced}"
  upward = sorted(f"{name} (tier {tier_of(name)}) -> {dep} (tier {tier_of(dep)})"
                  for name, deps in graph.items() for dep in deps if tier_of(dep) > tier_of(name))
  assert not upward, "imports that point up the layering:\n" + "\n".join(upward)

