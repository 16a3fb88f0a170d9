"""Streaming: run `generate` in a worker thread and yield text deltas as the method reports new tokens.

A method streams by calling the request option `on_tokens(new_ids)` (batch size 1) whenever it commits
tokens; a method that never calls it still works, its text arriving in one piece at the end.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from typing import Any, Iterator, Sequence

from hdjax.decoding.request import LoadedModel


@dataclasses.dataclass
class StreamEvent:
  delta: str
  token_ids: list[int]
  stats: dict[str, Any] | None = None


def stream_generate(lm: LoadedModel, prompt: Sequence[int], method: str = "ar", **kwargs) -> Iterator[StreamEvent]:
  events: queue.Queue = queue.Queue()
  done = object()
  outcome: dict[str, Any] = {}

  def worker():
    try:
      outcome["result"] = lm.generate([prompt], method=method, on_tokens=events.put, **kwargs)[0]
    except BaseException as e:  # re-raised in the consuming thread
      outcome["error"] = e
    events.put(done)

  thread = threading.Thread(target=worker, daemon=True)
  thread.start()
  ids: list[int] = []
  text = ""
  while (item := events.get()) is not done:
    ids.extend(int(t) for t in item)
    new_text = lm.decode_text(ids)
    yield StreamEvent(new_text[len(text):], list(ids))
    text = new_text
  thread.join()
  if "error" in outcome:
    raise outcome["error"]
  result = outcome["result"]
  yield StreamEvent(result.text[len(text):] if result.text.startswith(text) else "", result.token_ids,
                    result.stats)
