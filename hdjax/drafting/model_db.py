"""HD's model-dependent database: n-gram counts of the target model's own outputs, updated online across requests.

Each entry is (key, continuation) -> count, where the key is the 1 or 2 tokens before a position and the continuation
the next `continuation` tokens (shorter at the end of a sequence). It is filled offline from the model's greedy
outputs on ShareGPT prompts, then every finished request folds its generated tokens in: the temporal locality the
method is named for. Like the official code it keeps only the `max_entries` most frequent entries.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import time
from typing import Any, Iterable, Sequence

import numpy as np

from hdjax.drafting import sharegpt, store
from hdjax.errors import HdjaxError

KIND = "model_db"


@dataclasses.dataclass(frozen=True)
class NgramConfig:
  key_orders: tuple[int, ...] = (2, 1)  # tried in this order; the first key found answers
  continuation: int = 4
  max_entries: int = 100_000


Key = tuple[int, ...]
Continuation = tuple[int, ...]


def count_ngrams(tokens: Sequence[int], key_orders: Iterable[int], continuation: int
                 ) -> collections.Counter[tuple[Key, Continuation]]:
  """(key, continuation) counts of one token stream: every position with `k` tokens before it, for each order k."""
  tokens = [int(t) for t in tokens]
  counts: collections.Counter[tuple[Key, Continuation]] = collections.Counter()
  for k in key_orders:
    for i in range(k, len(tokens)):
      counts[(tuple(tokens[i - k:i]), tuple(tokens[i:i + continuation]))] += 1
  return counts


def rank_continuations(conts: dict[Continuation, int]) -> list[Continuation]:
  """Most frequent first; ties broken by the token ids, so the order never depends on insertion."""
  return sorted(conts, key=lambda c: (-conts[c], c))


def select_chains(ranked: Iterable[Continuation], max_chains: int, depth: int) -> list[list[int]]:
  """The first `max_chains` distinct continuations of `ranked`, each cut to `depth` tokens."""
  out, seen = [], set()
  for cont in ranked:
    chain = cont[:depth]
    if chain and chain not in seen:
      seen.add(chain)
      out.append(list(chain))
      if len(out) == max_chains:
        break
  return out


class ModelDB(store.PersistedDB):
  """A `Drafter` over n-gram counts of the target model's outputs (see the module docstring)."""

  KIND = KIND
  name = "model"

  def __init__(self, config: NgramConfig = NgramConfig(), tokenizer_identity: str = "",
               info: dict[str, Any] | None = None):
    self.config = config
    self.tokenizer_identity = tokenizer_identity
    self.info = dict(info or {})
    self._table: dict[Key, dict[Continuation, int]] = {}
    self._ranked: dict[Key, list[Continuation]] = {}
    self._generated: list[int] = []
    self.version = 0  # counts changes to the table: device tables (`device_tables.py`) are updated on change
    self.replaced_at = 0  # the version at which the whole table was last replaced (pruned or loaded)
    self._changed_at: dict[Key, int] = {}  # per key, the version that last changed it (since `replaced_at`)

  @property
  def num_entries(self) -> int:
    return sum(len(c) for c in self._table.values())

  def entries(self) -> Iterable[tuple[Key, Continuation, int]]:
    return ((key, cont, n) for key, conts in self._table.items() for cont, n in conts.items())

  def add_counts(self, counts: collections.Counter[tuple[Key, Continuation]]) -> None:
    self.version += 1
    for (key, cont), n in counts.items():
      self._table.setdefault(key, {})
      self._table[key][cont] = self._table[key].get(cont, 0) + n
      self._ranked.pop(key, None)
      self._changed_at[key] = self.version

  def changed_since(self, version: int) -> list[Key] | None:
    """The keys whose continuations changed after `version`, or None when the whole table was replaced since."""
    if self.replaced_at > version:
      return None
    return [key for key, at in self._changed_at.items() if at > version]

  def _replaced(self) -> None:
    self.version += 1
    self.replaced_at = self.version
    self._changed_at = {}

  def add_sequence(self, tokens: Sequence[int]) -> None:
    """Folds every n-gram of one token stream in, then prunes once the table is twice its budget."""
    self.add_counts(count_ngrams(tokens, self.config.key_orders, self.config.continuation))
    if self.num_entries > 2 * self.config.max_entries:
      self.prune()

  def prune(self) -> None:
    """Keeps the `max_entries` most frequent (key, continuation) entries (ties by key, then continuation)."""
    kept = sorted(self.entries(), key=lambda e: (-e[2], len(e[0]), e[0], e[1]))[:self.config.max_entries]
    self._replaced()
    self._table, self._ranked = {}, {}
    for key, cont, n in kept:
      self._table.setdefault(key, {})[cont] = n

  # Drafter protocol.
  def start(self, prompt: Sequence[int]) -> None:
    del prompt  # the offline table holds model outputs only; so do the online updates
    self._generated = []

  def extend(self, tokens: Sequence[int]) -> None:
    self._generated.extend(int(t) for t in tokens)

  def draft(self, context: Sequence[int], max_chains: int, depth: int) -> list[list[int]]:
    for k in self.config.key_orders:
      if len(context) < k:
        continue
      chains = self.chains(tuple(int(t) for t in context[-k:]), max_chains, depth)
      if chains:
        return chains
    return []

  def chains(self, key: Key, max_chains: int, depth: int) -> list[list[int]]:
    """The drafts of one key: its continuations ranked, distinct, cut to `depth` (none for an unknown key)."""
    conts = self._table.get(key)
    if not conts:
      return []
    ranked = self._ranked.get(key)
    if ranked is None:
      ranked = self._ranked[key] = rank_continuations(conts)
    return select_chains(ranked, max_chains, depth)

  def finish(self) -> None:
    if self._generated:
      self.add_sequence(self._generated)
    self._generated = []

  def session(self) -> "ModelDBSession":
    """A `Drafter` for one sequence over this table. Each row of a batch needs its own: the rows of one batch
    sharing this object's generated tokens once taught the table n-grams that spanned two rows."""
    return ModelDBSession(self)

  # Persistence.
  def to_arrays(self) -> dict[str, np.ndarray]:
    """Keys [E, max order] and continuations [E, continuation], -1 padded, with counts [E]; one row per entry."""
    width = max(self.config.key_orders)
    rows = list(self.entries())
    keys = np.full((len(rows), width), -1, np.int32)
    conts = np.full((len(rows), self.config.continuation), -1, np.int32)
    for r, (key, cont, _) in enumerate(rows):
      keys[r, :len(key)] = key
      conts[r, :len(cont)] = cont
    counts = np.asarray([n for _, _, n in rows], np.int64)
    return dict(keys=keys, conts=conts, counts=counts, key_orders=np.asarray(self.config.key_orders, np.int32),
                max_entries=np.asarray(self.config.max_entries, np.int64))

  @classmethod
  def from_arrays(cls, arrays: dict[str, np.ndarray], tokenizer_identity: str = "",
                  info: dict[str, Any] | None = None) -> "ModelDB":
    check_arrays(arrays)
    config = NgramConfig(tuple(int(k) for k in arrays["key_orders"]), int(arrays["conts"].shape[1]),
                         int(arrays["max_entries"]))
    db = cls(config, tokenizer_identity, info)
    db._replaced()  # pylint: disable=protected-access
    for key, cont, n in zip(arrays["keys"].tolist(), arrays["conts"].tolist(), arrays["counts"].tolist()):
      db._table.setdefault(tuple(t for t in key if t >= 0), {})[tuple(t for t in cont if t >= 0)] = n
    return db

  def save(self, path: str | None = None) -> None:
    """Prunes to the budget, then writes atomically (to `checkpoints/hd/model_db.npz` by default)."""
    self.prune()
    super().save(path)


class ModelDBSession:
  """One sequence's `Drafter` view of a shared `ModelDB`: drafts from the shared table, keeps its own generated
  tokens and folds them in at `finish` (rows finish in order, each as its own sequence)."""

  name = "model"

  def __init__(self, db: ModelDB):
    self.db = db
    self._generated: list[int] = []

  def start(self, prompt: Sequence[int]) -> None:
    del prompt  # like `ModelDB.start`: the table learns model outputs only
    self._generated = []

  def extend(self, tokens: Sequence[int]) -> None:
    self._generated.extend(int(t) for t in tokens)

  def draft(self, context: Sequence[int], max_chains: int, depth: int) -> list[list[int]]:
    return self.db.draft(context, max_chains, depth)

  def finish(self) -> None:
    if self._generated:
      self.db.add_sequence(self._generated)
    self._generated = []


def check_arrays(arrays: dict[str, np.ndarray]) -> None:
  """The layout `to_arrays` writes: keys [E, max order], conts [E, C] and counts [E] of one length E, token ids
  >= -1 (padding), key orders within the key width, a positive entry budget."""
  store.check_arrays(arrays, dict(keys=2, conts=2, counts=1, key_orders=1, max_entries=0))
  keys, conts, counts, orders = arrays["keys"], arrays["conts"], arrays["counts"], arrays["key_orders"]
  if not len(keys) == len(conts) == len(counts):
    raise HdjaxError(f"keys, conts and counts have {len(keys)}, {len(conts)} and {len(counts)} rows")
  if not len(orders) or orders.min() < 1 or orders.max() > keys.shape[1] or conts.shape[1] < 1:
    raise HdjaxError(f"key_orders {orders.tolist()} do not fit keys of width {keys.shape[1]}, or no continuation")
  if len(keys) and (min(keys.min(), conts.min()) < -1 or counts.min() < 1) or int(arrays["max_entries"]) < 1:
    raise HdjaxError("token ids below -1, counts below 1 or max_entries below 1")


# Building: the model's greedy outputs on ShareGPT first user turns, generated in resumable batches.
PARTIAL_KIND = "model_outputs_partial"
LEGACY_SETTINGS = {"dtype": "float32"}  # partial files made before the dtype was recorded were fp32


def select_prompts(tokenizer, num_prompts: int, max_prompt_tokens: int, path: str | None = None
                   ) -> list[tuple[str, list[int]]]:
  """The first `num_prompts` distinct ShareGPT first user turns (file order) whose chat-templated ids fit
  `max_prompt_tokens`, as (conversation id, ids). A prefix of the list for a larger `num_prompts`."""
  out, seen = [], set()
  for cid, text in sharegpt.first_user_turns(path):
    if len(out) == num_prompts:
      break
    if text in seen or len(text) > 8 * max_prompt_tokens:
      continue
    seen.add(text)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": text}])
    if len(ids) <= max_prompt_tokens:
      out.append((cid, ids))
  return out


def load_partial(path: str, identity: str, settings: dict) -> dict[str, list[int]]:
  """Outputs generated so far ({conversation id: token ids}) with the generation `settings` (e.g.
  max_new_tokens, dtype) they were made with; empty when no partial file exists. A file written before a setting
  was recorded holds the setting's `LEGACY_SETTINGS` value."""
  if not os.path.isfile(path):
    return {}
  arrays, info = store.load_arrays(path, PARTIAL_KIND, identity)
  for name, value in settings.items():
    held = info.get(name, LEGACY_SETTINGS.get(name))
    if held != value:
      raise HdjaxError(f"{path} holds outputs made with {name}={held}, not {value}; pass the same value or delete "
                       f"the file")
  flat, offsets = arrays["tokens"].tolist(), arrays["offsets"].tolist()
  return {str(cid): flat[offsets[i]:offsets[i + 1]] for i, cid in enumerate(arrays["ids"].tolist())}


def save_partial(path: str, identity: str, settings: dict, outputs: dict[str, list[int]]) -> None:
  ids = list(outputs)
  offsets = np.cumsum([0] + [len(outputs[c]) for c in ids]).astype(np.int64)
  flat = np.asarray([t for c in ids for t in outputs[c]], np.int32)
  store.save_arrays(path, PARTIAL_KIND, identity, dict(ids=np.asarray(ids, dtype=str), tokens=flat,
                                                        offsets=offsets), dict(settings), compress=False)


def generate_outputs(generate, prompts: list[tuple[str, list[int]]], batch_size: int, done: dict[str, list[int]],
                     on_batch=lambda outputs: None, progress=None, deadline: float | None = None,
                     chunk_batches: int = 4) -> dict[str, list[int]]:
  """Greedy outputs for the prompts not in `done`, in file-order chunks of `chunk_batches` batches, each chunk
  sorted by length so a batch holds prompts of similar length.

  `generate(list of ids) -> list of token-id lists`; `on_batch(outputs)` runs after every batch (checkpointing);
  `progress` is an optional tqdm bar advanced by prompts; no batch starts after `deadline` (a `time.time()`).
  """
  outputs = dict(done)
  todo = [p for p in prompts if p[0] not in outputs]
  chunk = batch_size * chunk_batches
  for chunk_start in range(0, len(todo), chunk):
    ordered = sorted(todo[chunk_start:chunk_start + chunk], key=lambda p: len(p[1]))
    for start in range(0, len(ordered), batch_size):
      if deadline is not None and time.time() > deadline:
        return outputs
      batch = ordered[start:start + batch_size]
      for (cid, _), ids in zip(batch, generate([ids for _, ids in batch])):
        outputs[cid] = [int(t) for t in ids]
      on_batch(outputs)
      if progress is not None:
        progress.update(len(batch))
  return outputs
