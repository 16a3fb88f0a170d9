"""HD's model- and statistics-dependent databases: drafts against brute-force n-gram scans, online updates,
persistence (atomic, tokenizer-tagged, corrupt files), the truncated-ShareGPT reader and the resumable build."""

from __future__ import annotations

import collections
import io
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from hdjax.drafting import model_db, sharegpt, stats_db, store
from hdjax.errors import HdjaxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK_A = SimpleNamespace(identity="tokenizer-a")
TOK_B = SimpleNamespace(identity="tokenizer-b")


def brute_force_draft(docs, context, max_chains, depth, orders=(2, 1), width=4, top_k=None, min_count=1):
  """Scans every document for each key order: counts the next-`width` continuations after each occurrence of the
  context's last k tokens, ranks by (count desc, tokens), keeps top_k, cuts to depth, drops repeats."""
  for k in orders:
    if len(context) < k:
      continue
    key = list(context[-k:])
    counts = {}
    for doc in docs:
      for i in range(k, len(doc)):
        if doc[i - k:i] == key:
          cont = tuple(doc[i:i + width])
          counts[cont] = counts.get(cont, 0) + 1
    ranked = sorted((c for c, n in counts.items() if n >= min_count), key=lambda c: (-counts[c], c))[:top_k]
    if not ranked:
      continue
    out = []
    for cont in ranked:
      if list(cont[:depth]) not in out:
        out.append(list(cont[:depth]))
    return out[:max_chains]
  return []


def random_docs(seed, num=40, vocab=6, max_len=40):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, vocab, rng.integers(1, max_len)).tolist() for _ in range(num)]


def random_queries(seed, num=200, vocab=7):
  rng = np.random.default_rng(seed)
  return [(rng.integers(0, vocab, rng.integers(0, 4)).tolist(), int(rng.integers(1, 8)), int(rng.integers(1, 5)))
          for _ in range(num)]


def model_db_of(docs, **config):
  db = model_db.ModelDB(model_db.NgramConfig(**config), TOK_A.identity)
  for doc in docs:
    db.add_sequence(doc)
  return db


@pytest.mark.parametrize("seed", [0, 1])
def test_model_db_drafts_equal_brute_force(seed):
  docs = random_docs(seed)
  db = model_db_of(docs)
  for context, max_chains, depth in random_queries(seed + 10):
    assert db.draft(context, max_chains, depth) == brute_force_draft(docs, context, max_chains, depth)


def test_key_falls_back_from_two_tokens_to_one():
  db = model_db_of([[1, 2, 3, 4, 5, 6], [9, 2, 7, 7]])
  assert db.draft([1, 2], 7, 4) == [[3, 4, 5, 6]]  # 2-token key found: only its continuation
  assert db.draft([8, 2], 7, 4) == [[3, 4, 5, 6], [7, 7]]  # (8, 2) unseen: key 2 alone, ranked by tokens on ties
  assert db.draft([8, 8], 7, 4) == []
  assert db.draft([], 7, 4) == []


def test_online_update_across_requests_changes_drafts():
  db = model_db_of([[5, 6, 1, 1]])
  assert db.draft([5, 6], 3, 2) == [[1, 1]]
  for _ in range(2):  # two finished requests that continued (5, 6) differently
    db.start([100, 101])
    db.extend([5, 6, 2])
    db.extend([3, 4])
    db.finish()
  assert db.draft([5, 6], 3, 2) == [[2, 3], [1, 1]]
  assert db.draft([100, 101], 3, 2) == []  # prompt tokens are not folded in, only generated ones
  db.start([1])
  db.extend([7, 7, 7])
  assert db.draft([7, 7], 3, 2) == []  # nothing folded in before finish()


def test_prune_keeps_the_most_frequent_entries():
  counts = collections.Counter()
  for doc in random_docs(3, num=60):
    counts.update(model_db.count_ngrams(doc, (2, 1), 4))
  db = model_db.ModelDB(model_db.NgramConfig(max_entries=25))
  db.add_counts(counts)
  db.prune()
  kept = sorted(n for _, _, n in db.entries())
  assert db.num_entries == 25 and kept == sorted(counts.values())[-25:]


@pytest.mark.parametrize("min_count", [1, 2])
def test_stats_structures_equal_brute_force(min_count):
  docs = random_docs(4, num=60)
  config = stats_db.StatsConfig(top_k=3, min_count=min_count)
  stream = stats_db.corpus_stream(docs)
  table, suffix = stats_db.from_stream(stream, config), stats_db.SuffixArrayIndex(stream, config)
  for context, max_chains, depth in random_queries(5, num=300):
    want = brute_force_draft(docs, context, max_chains, depth, top_k=3, min_count=min_count)
    assert table.draft(context, max_chains, depth) == want
    assert suffix.draft(context, max_chains, depth) == want


def test_save_load_round_trip_and_tokenizer_identity(tmp_path):
  docs = random_docs(6)
  mdb = model_db_of(docs)
  mdb.save(str(tmp_path / "model_db.npz"))
  sdb = stats_db.from_stream(stats_db.corpus_stream(docs), stats_db.StatsConfig(min_count=1), TOK_A.identity)
  sdb.save(str(tmp_path / "stats_db.npz"))
  mdb2 = model_db.ModelDB.load(TOK_A, str(tmp_path / "model_db.npz"))
  sdb2 = stats_db.StatsDB.load(TOK_A, str(tmp_path / "stats_db.npz"))
  for context, max_chains, depth in random_queries(7):
    assert mdb2.draft(context, max_chains, depth) == mdb.draft(context, max_chains, depth)
    assert sdb2.draft(context, max_chains, depth) == sdb.draft(context, max_chains, depth)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["model_db.npz", "stats_db.npz"]  # no temp files left
  with pytest.raises(HdjaxError, match="built for tokenizer tokenizer-a.*tokenizer-b"):
    model_db.ModelDB.load(TOK_B, str(tmp_path / "model_db.npz"))
  with pytest.raises(HdjaxError, match="holds a 'model_db' database"):
    stats_db.StatsDB.load(TOK_A, str(tmp_path / "model_db.npz"))


def test_missing_truncated_and_garbage_files_are_clear_errors(tmp_path):
  path = tmp_path / "model_db.npz"
  with pytest.raises(HdjaxError, match="database not found"):
    model_db.ModelDB.load(TOK_A, str(path))
  model_db_of(random_docs(8)).save(str(path))
  data = path.read_bytes()
  for name, content in [("truncated", data[:len(data) // 2]), ("garbage", b"not a database at all"),
                        ("empty", b"")]:
    bad = tmp_path / f"{name}.npz"
    bad.write_bytes(content)
    with pytest.raises(HdjaxError, match="corrupt database file") as err:
      model_db.ModelDB.load(TOK_A, str(bad))
    assert "\n" not in str(err.value)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
  path = tmp_path / "db.npz"
  store.save_arrays(path, "x", "t", dict(a=np.arange(3)))

  def crash_mid_write(f, **arrays):
    del arrays
    f.write(b"PK half a zip")
    raise OSError("disk full")

  monkeypatch.setattr(np, "savez_compressed", crash_mid_write)
  with pytest.raises(OSError, match="disk full"):
    store.save_arrays(path, "x", "t", dict(a=np.arange(5)))
  arrays, _ = store.load_arrays(path, "x", "t")
  assert arrays["a"].tolist() == [0, 1, 2] and os.listdir(tmp_path) == ["db.npz"]


def sharegpt_json(num):
  return json.dumps([{"id": f"c{i}", "conversations": [
      {"from": "human", "value": f"question {i} with \"quotes\", [brackets] and {{braces}}"},
      {"from": "gpt", "value": f"answer {i}"}, {"from": "human", "value": "more"},
      {"from": "gpt", "value": f"second answer {i}"}]} for i in range(num)], indent=2)


@pytest.mark.parametrize("chunk_chars", [7, 64, 1 << 20])
def test_reader_survives_a_truncated_json_array(chunk_chars):
  text = sharegpt_json(5)
  cut = text.index('"c4"') + 30  # inside the last record
  items = list(sharegpt.iter_json_array(io.StringIO(text[:cut]), chunk_chars))
  assert [r["id"] for r in items] == ["c0", "c1", "c2", "c3"]
  assert [r["id"] for r in sharegpt.iter_json_array(io.StringIO(text), chunk_chars)] == [f"c{i}" for i in range(5)]
  with pytest.raises(HdjaxError, match="not a JSON array"):
    list(sharegpt.iter_json_array(io.StringIO('{"a": 1}'), chunk_chars))


def test_first_user_and_assistant_turns(tmp_path):
  path = tmp_path / "sharegpt.json"
  path.write_text(sharegpt_json(3)[:-40])
  assert [cid for cid, _ in sharegpt.first_user_turns(str(path))] == ["c0", "c1"]
  assert list(sharegpt.assistant_turns(str(path)))[:3] == [(0, "answer 0"), (0, "second answer 0"), (1, "answer 1")]


def test_resumable_generation_continues_after_a_kill(tmp_path):
  prompts = [(f"p{i}", [i] * (1 + i % 5)) for i in range(23)]
  partial = str(tmp_path / "partial.npz")
  settings = dict(max_new_tokens=8, dtype="bfloat16")
  calls = []

  def generate(batch):
    calls.append(len(batch))
    return [[len(ids), ids[0], 2] for ids in batch]

  def killed_after_two_batches(batch):
    if len(calls) == 2:
      raise KeyboardInterrupt
    return generate(batch)

  def checkpoint(outputs):
    model_db.save_partial(partial, "tok", settings, outputs)

  reference = model_db.generate_outputs(generate, prompts, 4, {})
  calls.clear()
  with pytest.raises(KeyboardInterrupt):
    model_db.generate_outputs(killed_after_two_batches, prompts, 4, {}, checkpoint)
  done = model_db.load_partial(partial, "tok", settings)
  assert len(done) == 8
  calls.clear()
  resumed = model_db.generate_outputs(generate, prompts, 4, done, checkpoint)
  assert sum(calls) == len(prompts) - 8 and resumed == reference
  assert model_db.load_partial(partial, "tok", settings) == reference
  with pytest.raises(HdjaxError, match="max_new_tokens=8, not 16"):
    model_db.load_partial(partial, "tok", dict(settings, max_new_tokens=16))
  with pytest.raises(HdjaxError, match="dtype=bfloat16, not float32"):
    model_db.load_partial(partial, "tok", dict(settings, dtype="float32"))
  assert model_db.generate_outputs(generate, prompts, 4, {}, deadline=0.0) == {}


def test_lookup_stats_and_latency_helpers():
  docs = [[1, 2, 3, 4, 5, 6, 7]] * 3
  db = stats_db.from_stream(stats_db.corpus_stream(docs), stats_db.StatsConfig(min_count=1))
  stats = stats_db.lookup_stats(db, stats_db.corpus_stream([[1, 2, 3, 4, 5, 9]]))
  assert stats["positions"] == 4 and stats["hit"] == 1.0  # predicting tokens 3, 4, 5, 9
  assert stats["accepted"] == pytest.approx((3 + 2 + 1 + 0) / 4) and stats["first_token"] == 0.75
  latency = stats_db.draft_latency_us(db, [[1, 2]] * 10)
  assert latency["cold"] > 0 and latency["warm"] > 0


def test_launcher_missing_model_is_one_line_exit_2(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.build_datastores", "--model=/nonexistent/m.gguf",
                         f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"), check=False)
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.strip().startswith("error: model not found") and len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture(scope="module")
def smollm_tokenizer():
  from hdjax.api import resolve_path  # pylint: disable=import-outside-toplevel
  from hdjax.weights import gguf, tokenizer  # pylint: disable=import-outside-toplevel
  return tokenizer.from_gguf_fields(gguf.read_fields(gguf.open_reader(resolve_path("smollm2-135m"))))


@pytest.mark.skipif(not store.default_path("stats_db").is_file() or not store.default_path("model_db").is_file(),
                    reason="the SmolLM2 databases are not built (python -m experiments.build_datastores)")
def test_committed_smollm2_databases_load_and_draft_real_text(smollm_tokenizer):
  mdb, sdb = model_db.ModelDB.load(smollm_tokenizer), stats_db.StatsDB.load(smollm_tokenizer)
  assert mdb.num_entries > 1000 and sdb.num_entries > 100_000
  assert mdb.info["prompts"] > 0 and sdb.info["chars"] > 1_000_000
  context = smollm_tokenizer.encode("Here is a Python function that")
  for db in (mdb, sdb):
    chains = db.draft(context, 7, 4)
    assert 1 <= len(chains) <= 7 and all(1 <= len(c) <= 4 for c in chains)
    assert len({tuple(c) for c in chains}) == len(chains)
  assert sdb.draft(smollm_tokenizer.encode("for example,"), 1, 4)  # a common phrase always has a continuation


def test_database_scopes_keep_separate_online_model_databases(monkeypatch):
  from hdjax.decoding import speculative  # pylint: disable=import-outside-toplevel
  monkeypatch.setattr(model_db.ModelDB, "load", classmethod(lambda cls, tokenizer: model_db_of([[5, 6, 1, 1]])))
  monkeypatch.setattr(stats_db.StatsDB, "load", classmethod(lambda cls, tokenizer: object()))
  speculative.reset_databases()
  lm = SimpleNamespace(tokenizer=TOK_A)
  with speculative.database_scope("hd"):
    hd_db = speculative.SOURCES["model"](lm, None)
    hd_stats = speculative.SOURCES["stats"](lm, None)
  with speculative.database_scope("pld"):
    assert speculative.SOURCES["model"](lm, None) is not hd_db
    assert speculative.SOURCES["stats"](lm, None) is hd_stats  # read-only: one copy
  hd_db.start([0])
  hd_db.extend([5, 6, 2, 3])
  hd_db.finish()
  with speculative.database_scope("hd"):
    assert speculative.SOURCES["model"](lm, None).draft([5, 6], 3, 2) == [[1, 1], [2, 3]]  # tie: by token ids
  with speculative.database_scope("pld"):
    assert speculative.SOURCES["model"](lm, None).draft([5, 6], 3, 2) == [[1, 1]]  # learnt nothing from hd
  assert speculative.SOURCES["model"](lm, None).draft([5, 6], 3, 2) == [[1, 1]]
  speculative.reset_databases()


def test_tokenizer_identity_is_hashed_once_across_requests(monkeypatch):
  """Every request of a database-backed method looks its databases up by tokenizer identity; hashing the
  vocabulary on each lookup cost hd ~0.6 s per request (measured on the H100 run's per-question wall times)."""
  from tokenizers import Tokenizer, models  # pylint: disable=import-outside-toplevel
  from hdjax.decoding import speculative  # pylint: disable=import-outside-toplevel
  from hdjax.weights.tokenizer import HdTokenizer  # pylint: disable=import-outside-toplevel

  class CountingTokenizer:
    def __init__(self):
      self.inner, self.vocab_reads = Tokenizer(models.WordLevel({"a": 0, "b": 1}, unk_token="a")), 0

    def get_vocab(self, with_added_tokens=True):
      self.vocab_reads += 1
      return self.inner.get_vocab(with_added_tokens=with_added_tokens)

  counting = CountingTokenizer()
  lm = SimpleNamespace(tokenizer=HdTokenizer(counting, bos_id=0, eos_ids=(1,), chat_template=None))
  monkeypatch.setattr(stats_db.StatsDB, "load", classmethod(lambda cls, tokenizer: object()))
  speculative.reset_databases()
  first = speculative.SOURCES["stats"](lm, None)
  assert all(speculative.SOURCES["stats"](lm, None) is first for _ in range(5))
  assert counting.vocab_reads == 1
  speculative.reset_databases()
