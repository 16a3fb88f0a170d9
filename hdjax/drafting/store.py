"""Atomic, versioned `.npz` persistence for the drafting databases, tagged with the tokenizer they were built for.

A file holds named numpy arrays plus one `__meta__` array with a JSON header: `kind` (which database), `format`
(the layout version), `tokenizer` (`HdTokenizer.identity`) and free-form build information. Writes go to a temp
file in the same directory, are fsynced and then renamed over the old one (`files.atomic_write`), so a reader sees the
old file or the new one, never half of one. Every failure to read (missing, truncated, corrupt, wrong kind/version/tokenizer) is an `HdjaxError`.
"""

from __future__ import annotations

import json
import os
import sys
import zipfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from hdjax import assets
from hdjax.errors import HdjaxError
from hdjax.files import atomic_write

FORMAT_VERSION = 1
_META = "__meta__"
BUILD_HINT = "build it with `python -m experiments.build_datastores`"


def default_dir() -> Path:
  """`hd/` of the checkpoints directory (`hdjax.assets`: the checkout's `checkpoints/` or an install's copy)."""
  return assets.checkpoints_dir() / "hd"


def default_path(kind: str) -> Path:
  """Where the committed database of `kind` ("model_db" or "stats_db") lives."""
  return default_dir() / f"{kind}.npz"


def save_arrays(path: str | os.PathLike, kind: str, tokenizer_identity: str, arrays: Mapping[str, np.ndarray],
                info: Mapping[str, Any] | None = None, compress: bool = True) -> None:
  """Writes `arrays` and a header atomically (`files.atomic_write`)."""
  header = dict(kind=kind, format=FORMAT_VERSION, tokenizer=tokenizer_identity, info=dict(info or {}))
  payload = {_META: np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays}
  with atomic_write(path, "wb") as f:
    (np.savez_compressed if compress else np.savez)(f, **payload)


def load_arrays(path: str | os.PathLike, kind: str, tokenizer_identity: str | None
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
  """(arrays, info) of a `kind` database built for `tokenizer_identity` (None skips the tokenizer check)."""
  path = Path(path)
  header, arrays = _read(path, header_only=False)
  if header.get("kind") != kind:
    raise HdjaxError(f"{path} holds a {header.get('kind')!r} database, not {kind!r}")
  if header.get("format") != FORMAT_VERSION:
    raise HdjaxError(f"{path} has database format {header.get('format')}, this hdjax reads format "
                     f"{FORMAT_VERSION}; rebuild it ({BUILD_HINT})")
  if tokenizer_identity is not None and header.get("tokenizer") != tokenizer_identity:
    raise HdjaxError(f"{path} was built for tokenizer {header.get('tokenizer')}, but this model's tokenizer is "
                     f"{tokenizer_identity}; rebuild it for this model ({BUILD_HINT} --model=...)")
  return arrays, header.get("info", {})


def _read(path: Path, header_only: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  if not path.is_file():
    raise HdjaxError(f"database not found: {path} ({BUILD_HINT})")
  try:
    with np.load(path, allow_pickle=False) as npz:
      if _META not in npz.files:
        raise HdjaxError(f"{path} is not an hdjax database (no header)")
      header = json.loads(npz[_META].tobytes().decode())
      arrays = {} if header_only else {k: npz[k] for k in npz.files if k != _META}
  except HdjaxError:
    raise
  except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, UnicodeDecodeError) as e:
    raise HdjaxError(f"corrupt database file {path} ({type(e).__name__}); delete it and rebuild ({BUILD_HINT})"
                     ) from None
  if not isinstance(header, dict):
    raise HdjaxError(f"corrupt database file {path} (bad header); delete it and rebuild ({BUILD_HINT})")
  return header, arrays


def check_arrays(arrays: Mapping[str, np.ndarray], ndims: Mapping[str, int]) -> None:
  """Each named array is present, an integer array, and has its number of dimensions."""
  for name, ndim in ndims.items():
    if name not in arrays:
      raise HdjaxError(f"lacks array {name!r}")
    a = arrays[name]
    if a.ndim != ndim or not np.issubdtype(a.dtype, np.integer):
      raise HdjaxError(f"array {name!r} is {a.dtype} with shape {a.shape}, not a {ndim}-d integer array")


_WARNED: set[str] = set()


def warn_once(message: str) -> None:
  """One `warning: ...` line on stderr per distinct message (a hierarchy that drops a database says so once)."""
  if message not in _WARNED:
    _WARNED.add(message)
    print(f"warning: {message}", file=sys.stderr, flush=True)


class PersistedDB:
  """Save/load for a database class with `KIND`, `tokenizer_identity`, `info`, `to_arrays` and `from_arrays`."""

  KIND: str

  def save(self, path: str | os.PathLike | None = None) -> None:
    """Writes atomically (to `checkpoints/hd/<KIND>.npz` by default)."""
    save_arrays(path or default_path(self.KIND), self.KIND, self.tokenizer_identity, self.to_arrays(), self.info)

  @classmethod
  def load(cls, tokenizer, path: str | os.PathLike | None = None):
    """The database at `path` (default: the committed one); `HdjaxError` (and one warning line on stderr) if it is
    missing, corrupt, inconsistent or built for another tokenizer."""
    identity = tokenizer.identity
    path = path or default_path(cls.KIND)
    try:
      arrays, info = load_arrays(path, cls.KIND, identity)
      try:
        return cls.from_arrays(arrays, identity, info)
      except HdjaxError as e:
        raise HdjaxError(f"corrupt database file {path}: {e}; delete it and rebuild ({BUILD_HINT})") from None
    except HdjaxError as e:
      warn_once(f"{cls.KIND} unavailable, methods that combine databases run without it: {e}")
      raise
