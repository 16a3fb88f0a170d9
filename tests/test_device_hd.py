"""`hd` on the device: the model and statistics tables (`device_tables.py`) and the hierarchy
(`hierarchy.device_hierarchy_one`) against the host drafters, and the device loop's `hd` against `ar` and `hd_host`."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from hdjax.drafting import device_ngram, device_tables, model_db, stats_db, store
from hdjax.drafting.context_db import context_drafter
from hdjax.drafting.hierarchy import HierarchyDrafter, device_hierarchy_one

BIG = (70_000, 131_071, 65_536, 199_999, 5, 100_003)  # a vocabulary above 65,536 ids (Llama-3 has 128k)


def to_lists(out) -> list[list[list[int]]]:
  return [[[int(t) for t in row if t >= 0] for row in chains if row[0] >= 0] for chains in np.asarray(out)]


def buffer(streams, size: int):
  buf = np.full((len(streams), size), 3, np.int32)  # stale tokens past each length must be ignored
  lengths = np.ones(len(streams), np.int32)
  for b, s in enumerate(streams):
    buf[b, :len(s)], lengths[b] = s, len(s)
  return jnp.asarray(buf), jnp.asarray(lengths)


lookup = jax.jit(device_tables.lookup, static_argnames="exhaustive")


def device_lookup(table, contexts, size: int = 64, exhaustive: bool = False):
  """Each context's chains from `table`; both searches (bisection, every key at once) must agree on them."""
  got = to_lists(lookup(table, *buffer([c[-size:] for c in contexts], size), exhaustive=exhaustive))
  if not exhaustive:
    assert got == device_lookup(table, contexts, size, exhaustive=True)
  return got


def random_docs(rng, alphabet, num=20, max_len=30):
  return [rng.choice(alphabet, rng.integers(1, max_len)).tolist() for _ in range(num)]


def random_dbs(seed: int, alphabet, max_entries: int = 100_000):
  rng = np.random.default_rng(seed)
  mdb = model_db.ModelDB(model_db.NgramConfig(max_entries=max_entries))
  for doc in random_docs(rng, alphabet):
    mdb.add_sequence(doc)
  sdb = stats_db.from_stream(stats_db.corpus_stream(random_docs(rng, alphabet, 40)),
                             stats_db.StatsConfig(top_k=5, min_count=1))
  contexts = [rng.choice(alphabet, rng.integers(1, 6)).tolist() for _ in range(40)]
  return mdb, sdb, contexts


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10**6), big=st.booleans(), shape=st.sampled_from([(7, 4), (3, 2), (7, 1), (2, 6)]),
       max_entries=st.sampled_from([10, 100_000]))
def test_tables_equal_host_drafters_on_random_streams(seed, big, shape, max_entries):
  """Small alphabets (many shared keys, ties in counts), also of ids above 65,536; pruned model databases."""
  alphabet = np.asarray(BIG if big else range(5))
  mdb, sdb, contexts = random_dbs(seed, alphabet, max_entries)
  max_chains, depth = shape
  for db, kind in ((mdb, "model"), (sdb, "stats")):
    table = device_tables.table_for(db, kind, max_chains, depth)
    assert device_lookup(table, contexts) == [db.draft(c, max_chains, depth) for c in contexts], kind


def test_model_table_follows_the_online_updates():
  """A snapshot per version: rebuilt after `finish` folds a sequence in, reused while nothing changed."""
  db = model_db.ModelDB()
  db.add_sequence([1, 2, 3, 4])
  first = device_tables.table_for(db, "model", 7, 4)
  assert device_tables.table_for(db, "model", 7, 4) is first
  session = db.session()
  session.start([9])
  session.extend([1, 2, 5, 5, 1, 2, 5])
  session.finish()
  table = device_tables.table_for(db, "model", 7, 4)
  assert table is not first
  assert device_lookup(table, [[1, 2], [2], [7, 5]]) == [db.draft(c, 7, 4) for c in ([1, 2], [2], [7, 5])]
  assert device_lookup(table, [[1, 2]]) == [[[3, 4], [5], [5, 5, 1, 2]]]  # counts tie: by token ids
  assert table.keys[0].shape == first.keys[0].shape  # padded rows: same shape, no recompile


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), big=st.booleans(), max_entries=st.sampled_from([30, 100_000]))
def test_model_table_updates_equal_a_full_build(seed, big, max_entries):
  """The table after each online update (changed keys' chains rewritten, new keys inserted in order) holds the
  same arrays as one built from scratch from the database now, through growth past the rows and pruning."""
  rng = np.random.default_rng(seed)
  alphabet = np.asarray(BIG if big else range(40))
  db = model_db.ModelDB(model_db.NgramConfig(max_entries=max_entries))
  db.add_sequence(rng.choice(alphabet, 30).tolist())
  device_tables.table_for(db, "model", 3, 4)
  updated, docs = 0, random_docs(rng, alphabet, num=12, max_len=60)
  for doc in docs:
    since = db.version
    db.add_sequence(doc)
    updated += db.changed_since(since) is not None  # None: pruned, rebuilt whole
    table = device_tables.table_for(db, "model", 3, 4)
    rows = tuple(k.shape[0] for k in table.keys)
    want_keys, want_chains = device_tables.model_arrays(db, 3, 4, rows)
    for got, want in zip(table.keys + table.chains, want_keys + want_chains):
      np.testing.assert_array_equal(np.asarray(got), want)
  if max_entries == 100_000:  # never pruned: every update was made in place
    assert updated == len(docs)


def test_model_table_changes_since_a_version():
  db = model_db.ModelDB()
  db.add_sequence([1, 2, 3])
  version = db.version
  db.add_sequence([2, 3, 9])
  assert sorted(db.changed_since(version)) == [(2,), (2, 3), (3,)]  # keys of [2, 3, 9]'s n-grams only
  assert db.changed_since(db.version) == []
  rows = tuple(k.shape[0] for k in device_tables.model_arrays(db, 3, 4)[0])
  before = device_tables.model_arrays(db, 3, 4, rows)
  db.add_sequence([9, 3, 2, 7])  # changes (3,) and (2,); adds (9,), (7,), (9, 3), (3, 2), (2, 7)
  got = device_tables.updated_arrays(db, *before, db.version - 1, 3, 4)
  assert got is not None  # made in place, not rebuilt
  want = device_tables.model_arrays(db, 3, 4, rows)
  for g, w in zip(got[0] + got[1], want[0] + want[1]):
    np.testing.assert_array_equal(g, w)
  db.prune()
  assert db.changed_since(version) is None  # replaced wholesale: rebuild


@pytest.fixture(scope="module")
def real_dbs(smollm):
  if not (store.default_path("stats_db").is_file() and store.default_path("model_db").is_file()):
    pytest.skip("the SmolLM2 databases are not built (python -m experiments.build_datastores)")
  return model_db.ModelDB.load(smollm.tokenizer), stats_db.StatsDB.load(smollm.tokenizer)


REAL_TEXT = ("Here is a Python function that returns the square of a number:\n\ndef square(x):\n    return x * x\n\n"
             "For example, square(3) returns 9. In other words, the function multiplies the number by itself. "
             "I hope this helps! Let me know if you have any other questions.")


def test_tables_equal_host_drafters_on_real_text(smollm, real_dbs):
  stream = smollm.tokenizer.encode(REAL_TEXT)
  contexts = [stream[:n] for n in range(1, len(stream) + 1)]
  for db, kind in zip(real_dbs, ("model", "stats")):
    table = device_tables.table_for(db, kind, 7, 4)
    want = [db.draft(c, 7, 4) for c in contexts]
    assert device_lookup(table, contexts) == want, kind
    assert sum(map(bool, want)) > len(contexts) / 2, kind  # real text: most positions draft


def host_hierarchy(mdb, sdb, stream, max_chains, depth, max_nodes):
  model = mdb.session()
  drafter = HierarchyDrafter([context_drafter(), model, sdb], max_nodes)
  drafter.start(stream)
  return drafter.draft(stream, max_chains, depth)


@functools.partial(jax.jit, static_argnames=("max_chains", "depth", "max_nodes"))
def device_hierarchy(tables, tokens_bs, lengths_b, max_chains, depth, max_nodes):
  context = device_ngram.device_draft(tokens_bs, lengths_b,
                                      device_ngram.DeviceNgramConfig.like(context_drafter().config, max_chains, depth))
  sources = [context] + [device_tables.lookup(t, tokens_bs, lengths_b) for t in tables]
  return jax.vmap(lambda *s: device_hierarchy_one(s, max_chains, max_nodes))(*sources)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10**6), big=st.booleans(), shape=st.sampled_from([(7, 4, 7), (7, 4, 3), (3, 2, 15)]))
def test_device_hierarchy_equals_host(seed, big, shape):
  """Context -> model -> statistics on every prefix of random streams: the same chains, in the same order."""
  alphabet = np.asarray(BIG if big else range(5))
  mdb, sdb, _ = random_dbs(seed, alphabet)
  max_chains, depth, max_nodes = shape
  stream = np.random.default_rng(seed + 1).choice(alphabet, 40).tolist()
  prefixes = [stream[:n] for n in range(1, len(stream) + 1)]
  tables = tuple(device_tables.table_for(db, kind, max_chains, depth) for db, kind in ((mdb, "model"), (sdb, "stats")))
  chains, counts = device_hierarchy(tables, *buffer(prefixes, 48), max_chains, depth, max_nodes)
  want = [host_hierarchy(mdb, sdb, p, max_chains, depth, max_nodes) for p in prefixes]
  assert to_lists(chains) == want
  assert np.asarray(counts).sum(axis=1).tolist() == [len(w) for w in want]
  assert np.asarray(counts)[:, 1:].sum() > 0  # the databases contributed


def test_device_hierarchy_equals_host_on_real_text(smollm, real_dbs):
  mdb, sdb = real_dbs
  stream = smollm.tokenizer.encode(REAL_TEXT)
  prefixes = [stream[:n] for n in range(1, len(stream) + 1)]
  tables = (device_tables.table_for(mdb, "model", 7, 4), device_tables.table_for(sdb, "stats", 7, 4))
  chains, counts = device_hierarchy(tables, *buffer(prefixes, 128), 7, 4, 7)
  assert to_lists(chains) == [host_hierarchy(mdb, sdb, p, 7, 4, 7) for p in prefixes]
  assert (np.asarray(counts) > 0).any(axis=0).all()  # every tier drafted somewhere


# The loop: `hd` on the device against `ar` and the host loop `hd_host`.
PROMPTS = [tuple([5, 6, 7, 8, 9, 10] * 5), (5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9, 10, 5, 6, 7, 8, 9),
           (3, 1, 4, 1, 5, 9, 2, 6)]


@pytest.fixture
def tiny_with_dbs():
  yield from tiny_hd_model()


def tiny_hd_model(**tiny_changes):
  """Yields the tiny model (`make_tiny_lm(**tiny_changes)`) with a tokenizer identity and small model and statistics
  databases (one per loop, so that each loop's model database learns only its own outputs), and the databases."""
  from types import SimpleNamespace  # pylint: disable=import-outside-toplevel
  from hdjax.api import LM  # pylint: disable=import-outside-toplevel
  from hdjax.decoding import speculative  # pylint: disable=import-outside-toplevel
  from tests.conftest import make_tiny_lm  # pylint: disable=import-outside-toplevel
  base = make_tiny_lm(**tiny_changes)
  lm = LM(base.cfg, base.params, SimpleNamespace(identity="tiny-hd", decode=lambda ids: ""), name="tiny")
  rng = np.random.default_rng(0)
  docs = [rng.integers(0, 12, 40).tolist() for _ in range(30)] + [list(p) for p in PROMPTS]
  sdb = stats_db.from_stream(stats_db.corpus_stream(docs), stats_db.StatsConfig())
  dbs = {}
  for scope in ("device", "host"):
    dbs[scope] = model_db.ModelDB()
    for doc in docs[:10]:
      dbs[scope].add_sequence(doc)
    speculative._LOADED[("model", "tiny-hd", scope)] = dbs[scope]  # pylint: disable=protected-access
  speculative._LOADED[("stats", "tiny-hd", "")] = sdb  # pylint: disable=protected-access
  yield lm, dbs
  speculative.reset_databases()


def test_tiny_hd_equals_ar_and_the_host_loop_across_requests(tiny_with_dbs):
  """Batch 3, then batch 1, then batch 3 again: the device loop's trees are the host loop's (same steps, accept
  lengths and buckets), and both model databases learn the same n-grams between requests."""
  from hdjax.decoding import speculative  # pylint: disable=import-outside-toplevel
  lm, dbs = tiny_with_dbs
  for prompts in (PROMPTS, PROMPTS[2:], PROMPTS):
    ref = lm.generate(list(prompts), method="ar", max_new_tokens=26)
    with speculative.database_scope("device"):
      out = lm.generate(list(prompts), method="hd", max_new_tokens=26)
    with speculative.database_scope("host"):
      host = lm.generate(list(prompts), method="hd_host", max_new_tokens=26)
    for r, o, h in zip(ref, out, host):
      assert o.token_ids == r.token_ids == h.token_ids
      assert o.stats["engine"] == "device" and h.stats["engine"] == "host"
      assert o.stats["sources"] == h.stats["sources"] == "context,model,stats"
      for key in ("accept_lengths", "steps", "bucket_counts"):
        assert o.stats[key] == h.stats[key], key
      assert o.stats["host_syncs"] == 2
    assert sorted(dbs["device"].entries()) == sorted(dbs["host"].entries())
  assert sum(o.stats["source_chains"]["model"] + o.stats["source_chains"]["stats"] for o in out) > 0


def chat(lm, texts):
  return [lm.tokenizer.apply_chat_template([{"role": "user", "content": t}]) for t in texts]


REAL_TEXTS = ("Write a Python function that returns the square of a number.",
              "List the numbers from 1 to 20 separated by commas.",
              "Summarize in one sentence: The quick brown fox jumps over the lazy dog. The dog sleeps.")


@pytest.mark.slow  # ~110 s on the shared CPU; the default suite checks real-model hd == ar in bf16 (test_bf16_lossless)
def test_real_model_hd_equals_ar_and_the_host_loop(smollm, real_dbs):
  """SmolLM2 fp32 with its real databases (each loop its own copy of the model database): batch 1 and batch 3,
  48 tokens; the host syncs stay 2 whatever the number of steps."""
  from hdjax.decoding import speculative  # pylint: disable=import-outside-toplevel
  del real_dbs  # skips without the databases
  prompts = chat(smollm, REAL_TEXTS)
  speculative.reset_databases()
  try:
    refs = [smollm.generate([p], max_new_tokens=48)[0].token_ids for p in prompts]
    for batch in ([[p] for p in prompts] + [prompts]):
      with speculative.database_scope("device-test"):
        out = smollm.generate(batch, method="hd", max_new_tokens=48)
      with speculative.database_scope("host-test"):
        host = smollm.generate(batch, method="hd_host", max_new_tokens=48)
      want = [refs[prompts.index(p)] for p in batch]
      assert [o.token_ids for o in out] == want == [h.token_ids for h in host]
      for o, h in zip(out, host):
        assert o.stats["engine"] == "device" and o.stats["host_syncs"] == 2
        assert o.stats["accept_lengths"] == h.stats["accept_lengths"]
    assert max(o.stats["tau"] for o in out) > 1.3
    short = smollm.generate(prompts[:1], method="hd", max_new_tokens=8)[0]
    assert short.stats["host_syncs"] == out[0].stats["host_syncs"] and short.stats["steps"] < out[0].stats["steps"]
  finally:
    speculative.reset_databases()


@pytest.mark.slow
def test_any_order_of_the_sources_runs_on_the_device_as_on_the_host(tiny_with_dbs):
  """The `order` ablations (the databases asked in another order, or some of them) take the host loop's steps."""
  from hdjax.decoding import speculative  # pylint: disable=import-outside-toplevel
  lm, dbs = tiny_with_dbs
  ref = lm.generate(list(PROMPTS[:2]), max_new_tokens=20)
  for order in ("stats,context", "model,stats,context", "context,pld", "stats"):
    with speculative.database_scope("device"):
      out = lm.generate(list(PROMPTS[:2]), method="hd", max_new_tokens=20, order=order)
    with speculative.database_scope("host"):
      host = lm.generate(list(PROMPTS[:2]), method="hd_host", max_new_tokens=20, order=order)
    for r, o, h in zip(ref, out, host):
      assert o.token_ids == r.token_ids == h.token_ids, order
      assert o.stats["engine"] == "device" and o.stats["sources"] == h.stats["sources"] == order
      assert o.stats["accept_lengths"] == h.stats["accept_lengths"], order
  with speculative.database_scope("device"):
    version = dbs["device"].version
    warm = lm.generate([PROMPTS[0]], method="hd", max_new_tokens=20, warmup=True)[0]
    assert len(warm.token_ids) == 1 and dbs["device"].version == version  # a warm-up teaches the database nothing


def test_a_growing_model_table_keeps_its_shape():
  """The model table's shapes (rows per key order, chains per key) stay put while the database doubles, so the
  device loop is not recompiled between requests (it was, three times in one Spec-Bench run, at 8-10 s each)."""
  rng = np.random.default_rng(0)
  db = model_db.ModelDB()
  db.add_sequence(rng.integers(0, 5000, 3000).tolist())
  shapes = lambda t: [a.shape for a in t.keys + t.chains]  # noqa: E731
  table = device_tables.table_for(db, "model", 7, 4)
  entries = db.num_entries
  while db.num_entries < 2 * entries:
    db.add_sequence(rng.integers(0, 5000, 500).tolist())
    assert shapes(device_tables.table_for(db, "model", 7, 4)) == shapes(table)
