"""Where the committed assets are: HD's databases (`hd/`) and AdaDecode's exit heads (`adadecode/`) of the embedded
model, i.e. the repository's top-level `checkpoints/` folder.

One lookup, in this order: the directory that `$HDJAX_CHECKPOINTS` names; the checkout's `checkpoints/` when this
package runs from a checkout (a clone, or `pip install -e`); the copy a wheel ships inside the package as
`hdjax/_checkpoints` (setup.py copies it there when the wheel is built).
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

ENV = "HDJAX_CHECKPOINTS"
PACKAGED = "_checkpoints"  # the wheel's copy of checkpoints/, inside the package


def checkpoints_dir() -> Path:
  """The checkpoints directory, found as the module docstring says (it may not exist: a reader of a missing asset
  raises its own `HdjaxError`, naming the path)."""
  if os.environ.get(ENV):
    return Path(os.environ[ENV])
  checkout = Path(__file__).resolve().parents[1]
  if (checkout / "pyproject.toml").is_file() and (checkout / "checkpoints").is_dir():
    return checkout / "checkpoints"
  return Path(str(importlib.resources.files("hdjax") / PACKAGED))
