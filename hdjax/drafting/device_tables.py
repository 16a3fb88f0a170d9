"""HD's model and statistics databases on the device: sorted key tables with precomputed ranked chains.

A `DeviceTable` holds, per key order k (tried in the host drafter's order, longest first), the distinct k-token
keys sorted lexicographically as int32 columns `keys[U, k]`, and per key the chains the host drafter returns for
it, `chains[U, C, depth]` padded with -1: `select_chains(ranked, max_chains, depth)` over the key's continuations
in the host's ranking (count, then token ids, as `rank_continuations` and `StatsDB` rank them), computed once on
the host with numpy. A lookup (`lookup`) takes the last k tokens of each sequence's buffer and finds them among
the order-k keys; the first order whose key is present answers, as on the host. It finds them by bisection (CPU)
or by comparing every key at once (`exhaustive`, GPU/TPU: `EngineLayout.exhaustive_lookup`): bisecting the
SmolLM2 statistics table's 618k keys is ~20 dependent gathers per key order, each a kernel of its own on a GPU,
where one pass over the table (5 MB) is one fused compare-and-reduce.

Keys stay two (or k) int32 columns compared lexicographically rather than one int64 code (`stats_db.KEY_BASE`):
jax runs with x64 off, and a 2-token code of a vocabulary above 46,341 ids does not fit int32. The search is a
fixed number of bisection steps (ceil(log2(U)) + 1) over the sorted rows, so any vocabulary below 2**31 works.
Padding rows (keys INT32_MAX, after every real key) round the row count up, so that a database that grows
between requests (the model database) keeps one shape, and one compile, over many requests.

Pure JAX, static shapes, no host callbacks: `lookup` runs inside the jitted decoding loop (`device_loop.py`).
The host drafters (`ModelDB.draft`, `StatsDB.draft`) stay the reference; `tests/test_device_hd.py` compares them.
"""

from __future__ import annotations

import dataclasses
import weakref

import jax
import jax.numpy as jnp
import numpy as np

PAD = -1
KEY_PAD = np.iinfo(np.int32).max  # keys of padding rows: sort after every real key, never equal a token


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DeviceTable:
  """Per key order (`orders`, static): sorted keys [U_k, k] and ranked chains [U_k, C_k, depth] (-1 padded)."""

  keys: tuple  # of int32 arrays [U_k, k]
  chains: tuple  # of int32 arrays [U_k, C_k, depth]
  orders: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
  num_chains: int = dataclasses.field(metadata=dict(static=True))  # chains per lookup (max_chains)
  depth: int = dataclasses.field(metadata=dict(static=True))


GROW_HEADROOM = 4  # a table that must grow is resized to this many times its keys, then keeps that shape (and the
#                   loop's compile) until the database outgrows it (resized at each power of two, Spec-Bench's 60
#                   questions recompiled the device loop 3 times, 8-10 s each)


def _round_rows(n: int, grow: bool, previous: int = 0) -> int:
  """Rows of a table holding n keys: n + 1 (one padding row); with `grow`, `previous` rows while they hold n + 1,
  else the power of two >= GROW_HEADROOM * (n + 1) (at least 256)."""
  if not grow:
    return n + 1
  if n + 1 <= previous:
    return previous
  return max(256, 1 << int(np.ceil(np.log2(GROW_HEADROOM * (n + 1)))))


def ranked_chains(keys_mk: np.ndarray, conts_mc: np.ndarray, max_chains: int, depth: int, grow: bool = False,
                  previous_rows: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """One order's arrays from its (key, continuation) rows in ranked order within each key (rows of one key need
  not be contiguous; their relative order is the ranking). Returns keys [U', k] sorted (padding rows last) and
  chains [U', C, depth]: per key the first `max_chains` distinct non-empty continuations cut to `depth` tokens
  (`select_chains`), C = min(max_chains, the most any key has), or max_chains with `grow` (a fixed shape)."""
  num_rows, order = keys_mk.shape
  keys_mk = np.asarray(keys_mk, np.int64)
  trunc_md = np.full((num_rows, depth), PAD, np.int64)
  width = min(depth, conts_mc.shape[1])
  trunc_md[:, :width] = conts_mc[:, :width]
  trunc_md[np.logical_or.accumulate(trunc_md < 0, axis=1)] = PAD  # a continuation ends at its first padding
  # rows grouped by key, ranking kept within a key (stable sort on the key columns)
  perm = np.lexsort(tuple(keys_mk.T[::-1])) if num_rows else np.zeros(0, np.int64)  # lexsort is stable
  keys_mk, trunc_md = keys_mk[perm], trunc_md[perm]
  new_m = np.ones(num_rows, bool)
  new_m[1:] = (keys_mk[1:] != keys_mk[:-1]).any(axis=1)
  group_m = np.cumsum(new_m) - 1
  uniq = keys_mk[new_m]
  # a row is kept when its chain is non-empty and no earlier row of its key has the same chain
  _, first = np.unique(np.concatenate([group_m[:, None], trunc_md], axis=1), axis=0, return_index=True)
  keep_m = np.zeros(num_rows, bool)
  keep_m[first] = True
  keep_m &= trunc_md[:, 0] >= 0
  kept_before = np.cumsum(keep_m) - keep_m  # kept rows before each row
  rank_m = kept_before - kept_before[np.flatnonzero(new_m)][group_m]
  keep_m &= rank_m < max_chains
  per_key = max_chains if grow else (int(rank_m[keep_m].max()) + 1 if keep_m.any() else 1)  # growing: fixed shape
  rows = _round_rows(len(uniq), grow, previous_rows)
  keys_uk = np.full((rows, order), KEY_PAD, np.int32)
  keys_uk[:len(uniq)] = uniq
  chains_ucd = np.full((rows, per_key, depth), PAD, np.int32)
  chains_ucd[group_m[keep_m], rank_m[keep_m]] = trunc_md[keep_m]
  return keys_uk, chains_ucd


def model_arrays(db, max_chains: int, depth: int, previous_rows: tuple[int, ...] = ()
                 ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Host arrays (keys, chains per order) of a `ModelDB`'s whole table: per key, continuations ranked by count
  then token ids; each order keeps its `previous_rows` while its keys fit."""
  arrays = db.to_arrays()
  keys, conts, counts = arrays["keys"], arrays["conts"], arrays["counts"]
  key_len = (keys >= 0).sum(axis=1)
  out_keys, out_chains = [], []
  for i, k in enumerate(db.config.key_orders):
    sel = key_len == k
    kk, cc, nn = keys[sel, :k], conts[sel], counts[sel]
    # ranking: -count, then the continuation's ids (-1 padding sorts first: a shorter prefix ranks first,
    # as Python compares tuples)
    order = np.lexsort(tuple(cc.T[::-1]) + (-nn,))
    k_keys, k_chains = ranked_chains(kk[order], cc[order], max_chains, depth, grow=True,
                                     previous_rows=previous_rows[i] if previous_rows else 0)
    out_keys.append(k_keys)
    out_chains.append(k_chains)
  return out_keys, out_chains


def _sortable(keys_uk: np.ndarray) -> np.ndarray:
  """[U] byte strings that sort as the rows of `keys_uk` (non-negative int32) sort lexicographically."""
  return np.ascontiguousarray(keys_uk.astype(">i4")).view(f"V{4 * keys_uk.shape[1]}").ravel()


def updated_arrays(db, keys: list[np.ndarray], chains: list[np.ndarray], since: int, max_chains: int, depth: int
                   ) -> tuple[list[np.ndarray], list[np.ndarray]] | None:
  """`model_arrays` of `db` now, from its arrays at version `since` and the keys changed after it: changed keys
  get their chains again and new keys are inserted in order, in the same shapes. None when that is not possible
  (the table was replaced, or an order outgrew its rows): build it whole."""
  changed = db.changed_since(since)
  if changed is None:
    return None
  out_keys, out_chains = [], []
  for k, keys_uk, chains_ucd in zip(db.config.key_orders, keys, chains):
    touched = sorted(key for key in changed if len(key) == k)
    if not touched:
      out_keys.append(keys_uk)
      out_chains.append(chains_ucd)
      continue
    touched_tk = np.asarray(touched, np.int32).reshape(len(touched), k)
    rows, used = keys_uk.shape[0], int(np.count_nonzero(keys_uk[:, 0] != KEY_PAD))
    at = np.searchsorted(_sortable(keys_uk[:used]), _sortable(touched_tk))
    is_new = (at == used) | ~np.all(keys_uk[np.minimum(at, max(used - 1, 0))] == touched_tk, axis=1)
    if used + int(is_new.sum()) + 1 > rows:
      return None
    keys_uk = np.concatenate([np.insert(keys_uk[:used], at[is_new], touched_tk[is_new], axis=0),
                              keys_uk[used + int(is_new.sum()):]])
    chains_ucd = np.concatenate([np.insert(chains_ucd[:used], at[is_new], PAD, axis=0),
                                 chains_ucd[used + int(is_new.sum()):]])
    for row, key in zip(np.searchsorted(_sortable(keys_uk), _sortable(touched_tk)), touched):
      chains_ucd[row] = PAD
      for c, chain in enumerate(db.chains(key, max_chains, depth)):
        chains_ucd[row, c, :len(chain)] = chain
    out_keys.append(keys_uk)
    out_chains.append(chains_ucd)
  return out_keys, out_chains


def stats_arrays(db, max_chains: int, depth: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Host arrays (keys, chains per order) of a `StatsDB`: per key its stored continuations, in their stored
  (ranked) order."""
  out_keys, out_chains = [], []
  for k in db.config.key_orders:
    table = db.tables[k]
    offsets = np.asarray(table["offsets"], np.int64)
    rows_per_key = np.diff(offsets)
    keys = np.repeat(np.asarray(table["keys"]), rows_per_key, axis=0)
    k_keys, k_chains = ranked_chains(keys, np.asarray(table["conts"]), max_chains, depth)
    out_keys.append(k_keys)
    out_chains.append(k_chains)
  return out_keys, out_chains


@dataclasses.dataclass(frozen=True)
class _Snapshot:
  version: int
  keys: list  # host copies of the table's arrays, which the next update starts from
  chains: list
  table: DeviceTable


_CACHE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def table_for(db, kind: str, max_chains: int, depth: int) -> DeviceTable:
  """The device table of `db` ("model" or "stats"), built once per (max_chains, depth) and, for the model
  database, updated after it changed (its `version`), from the keys that changed when it can: a snapshot, exact
  for a request because the model database changes only when a request finishes."""
  per_db = _CACHE.setdefault(db, {})
  version = getattr(db, "version", 0)
  cached = per_db.get((max_chains, depth))
  if cached is not None and cached.version == version:
    return cached.table
  if kind != "model":
    keys, chains = stats_arrays(db, max_chains, depth)
  else:
    update = cached and updated_arrays(db, cached.keys, cached.chains, cached.version, max_chains, depth)
    keys, chains = update or model_arrays(db, max_chains, depth,
                                          tuple(k.shape[0] for k in cached.keys) if cached else ())
  table = DeviceTable(tuple(jnp.asarray(k) for k in keys), tuple(jnp.asarray(c) for c in chains),
                      tuple(db.config.key_orders), max_chains, depth)
  per_db[(max_chains, depth)] = _Snapshot(version, keys, chains, table)
  return table


def _search(keys_uk: jax.Array, query_k: jax.Array) -> jax.Array:
  """The first row whose key is >= query (lexicographic), by bisection over the sorted rows."""
  rows = keys_uk.shape[0]
  lo, hi = jnp.int32(0), jnp.int32(rows)
  for _ in range(int(np.ceil(np.log2(rows + 1))) + 1):
    mid = (lo + hi) // 2
    row = keys_uk[jnp.minimum(mid, rows - 1)]
    # row < query: at the first differing column row's token is smaller
    diff = row != query_k
    first = jnp.argmax(diff)
    less = jnp.any(diff) & (row[first] < query_k[first])
    go_right = (lo < hi) & less
    lo, hi = jnp.where(go_right, mid + 1, lo), jnp.where((lo < hi) & ~less, mid, hi)
  return lo


def _find(keys_uk: jax.Array, query_k: jax.Array, exhaustive: bool) -> tuple[jax.Array, jax.Array]:
  """The row of `query_k` among the distinct sorted keys, and whether it is there."""
  if exhaustive:
    match_u = jnp.all(keys_uk == query_k[None, :], axis=1)
    return jnp.argmax(match_u), jnp.any(match_u)
  row = jnp.minimum(_search(keys_uk, query_k), keys_uk.shape[0] - 1)
  return row, jnp.all(keys_uk[row] == query_k)


def lookup_one(table: DeviceTable, tokens_s: jax.Array, length: jax.Array, exhaustive: bool = False) -> jax.Array:
  """[num_chains, depth] chains of one sequence (its first `length` tokens), -1 padded: the first key order whose
  key (the last k tokens) is in the table answers."""
  size = tokens_s.shape[0]
  out = jnp.full((table.num_chains, table.depth), PAD, jnp.int32)
  found = jnp.bool_(False)
  for k, keys_uk, chains_ucd in zip(table.orders, table.keys, table.chains):
    query_k = tokens_s[jnp.clip(length - k + jnp.arange(k), 0, size - 1)].astype(jnp.int32)
    row, present = _find(keys_uk, query_k, exhaustive)
    hit = (length >= k) & present & ~found
    got = chains_ucd[row][:table.num_chains]
    got = jnp.pad(got, ((0, table.num_chains - got.shape[0]), (0, 0)), constant_values=PAD)
    out = jnp.where(hit, got, out)
    found |= hit
  return out


def lookup(table: DeviceTable, tokens_bs: jax.Array, lengths_b: jax.Array, exhaustive: bool = False) -> jax.Array:
  """[B, num_chains, depth] chains per sequence of the buffer `tokens_bs` [B, S] (`lengths_b` tokens each)."""
  return jax.vmap(lambda t, n: lookup_one(table, t, n, exhaustive))(tokens_bs, lengths_b.astype(jnp.int32))
