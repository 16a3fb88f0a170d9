"""Exit-head training: truncated ShareGPT streaming, KL training that helps, orbax resume == uninterrupted run,
head save/load round trip with the vocabulary ranking, heads read and folded once per version of their files."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from hdjax.adadecode import decode, heads as heads_lib, train
from hdjax import model
from hdjax.adadecode.heads import load_heads, load_vocab, rank_vocab, save_heads
from hdjax.decoding.request import GenerateRequest
from hdjax.decoding.sampling import SamplingConfig
from hdjax.errors import HdjaxError
from hdjax.exit_heads import ExitHeads, head_logits, identity_heads
from tests.conftest import make_tiny_lm

LAYERS = (1, 2, 3)


@pytest.fixture(scope="module")
def tiny_data():
  lm = make_tiny_lm(0)
  # a random tiny model is almost uniform at the output and its last layer barely moves the residual stream:
  # sharpen the LM head and amplify the last layer so that intermediate heads have something to learn
  head, down = lm.cfg.weight_name("lm_head"), lm.cfg.weight_name("down")
  embedder = dict(lm.params["embedder"], **{head: lm.params["embedder"][head] * 50.0})
  last = lm.params["layers"][-1]
  layers = lm.params["layers"][:-1] + (dict(last, **{down: last[down] * 30.0}),)
  lm.params = dict(lm.params, embedder=embedder, layers=layers)
  rng = np.random.default_rng(0)
  seqs = [rng.integers(3, lm.cfg.vocab_size, size=32).tolist() for _ in range(8)]
  data = train.collect_hidden(lm.params, lm.cfg, seqs, [4] * len(seqs), LAYERS, seq_len=32, batch=4)
  return lm, data


def test_first_exchanges_skips_and_counts_whole_exchanges(tmp_path):
  def conv(i, first="human"):
    return {"id": str(i), "conversations": [{"from": first, "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]}

  convs = [conv(0), conv(1, first="gpt"), conv(2), {"id": "3", "conversations": []}, conv(4), conv(5)]
  text = json.dumps(convs)
  path = tmp_path / "sharegpt.json"
  path.write_text(text[:text.index('"5"')])  # truncated inside the last conversation, as the package's file is
  users = lambda ex: [e[0]["content"] for e in ex]
  assert users(train.first_exchanges(10, path=str(path))) == ["q0", "q2", "q4"]
  # `skip` counts exchanges, not conversations: the skipped ones are exactly the ones a smaller call returned
  assert users(train.first_exchanges(1, skip=1, path=str(path))) == ["q2"]
  assert users(train.first_exchanges(5, skip=2, path=str(path))) == ["q4"]
  assert train.first_exchanges(2, path=str(path))[1][1] == {"role": "assistant", "content": "a2"}


def test_collect_hidden_matches_run_layers(tiny_data):
  lm, data = tiny_data
  assert data.inputs_inrd.shape == (len(LAYERS), 8 * 28, lm.cfg.d_model)
  # the final-layer state gives the model's own logits
  rng = np.random.default_rng(0)
  seq = rng.integers(3, lm.cfg.vocab_size, size=32).tolist()
  want = lm.logits(seq)[4:]
  got = np.asarray(model.unembed(lm.params, lm.cfg, jnp.asarray(data.final_rd[None, :28]))[0])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_identity_head_is_the_lm_head(tiny_data):
  lm, data = tiny_data
  h = jnp.asarray(data.final_rd[None, :5])
  np.testing.assert_allclose(head_logits(lm.params, lm.cfg, jnp.eye(lm.cfg.d_model), h),
                             model.unembed(lm.params, lm.cfg, h), rtol=1e-5, atol=1e-5)


def _fit(lm, data, ckpt_dir, **kw):
  return train.fit(lm.params, lm.cfg, data, steps=8, batch=32, lr=1e-2, warmup_frac=0.03, weight_decay=0.0, seed=0,
                   ckpt_dir=str(ckpt_dir), ckpt_every=3, **kw)


def test_kl_gradient_step_lowers_kl(tiny_data):
  lm, data = tiny_data
  x_ird, f_rd = jnp.asarray(data.inputs_inrd[:, :128]), jnp.asarray(data.final_rd[:128])
  t_idd = identity_heads(lm.cfg, LAYERS).t_idd
  kl_i = lambda t: train.kl_per_head(lm.params, lm.cfg, t, x_ird, f_rd)[0]
  g_idd = jax.grad(lambda t: jnp.sum(kl_i(t)))(t_idd)
  step_idd = 1e-2 * g_idd / jnp.linalg.norm(g_idd, axis=(1, 2), keepdims=True)
  assert np.all(np.asarray(kl_i(t_idd - step_idd)) < np.asarray(kl_i(t_idd)))
  assert np.all(np.asarray(kl_i(t_idd + step_idd)) > np.asarray(kl_i(t_idd)))


def test_resumed_training_equals_uninterrupted(tiny_data, tmp_path):
  lm, data = tiny_data
  full = _fit(lm, data, tmp_path / "full")
  killed = _fit(lm, data, tmp_path / "resumed", stop_after=5)
  assert int(killed.step) == 5
  resumed = _fit(lm, data, tmp_path / "resumed")  # restores step 3's checkpoint (every 3 steps), replays 4..8
  assert int(resumed.step) == 8
  np.testing.assert_array_equal(np.asarray(resumed.t_idd), np.asarray(full.t_idd))
  assert not np.array_equal(np.asarray(killed.t_idd), np.asarray(full.t_idd))


def test_rank_vocab_counts_reply_tokens_after_eos():
  seqs = [[9, 9, 9, 5, 5, 7, 2], [9, 7, 5, 7, 2, 2]]
  # replies start at 3 and 1: counts 5:3, 7:3, 2:3 (EOS, ranked first anyway), 9 only in the prompt of seq 0
  assert rank_vocab(seqs, [3, 1], 16, first_ids=(2,)) == (2, 5, 7)
  assert rank_vocab(seqs, [0, 0], 16) == (9, 2, 5, 7)


def test_heads_round_trip(tmp_path):
  lm = make_tiny_lm(0)
  heads = ExitHeads((1, 3), jax.random.normal(jax.random.key(0), (2, lm.cfg.d_model, lm.cfg.d_model)), (4, 0, 9))
  save_heads(str(tmp_path / "h"), heads, "tiny")
  back = load_heads(str(tmp_path / "h"), lm.cfg)
  assert back.layers == heads.layers and back.vocab_ids == (4, 0, 9)
  np.testing.assert_array_equal(np.asarray(back.t_idd), np.asarray(heads.t_idd))
  (tmp_path / "h" / "vocab.json").write_text('{"ids": [4, 100000]}')
  with pytest.raises(HdjaxError, match="vocab.json"):
    load_heads(str(tmp_path / "h"), lm.cfg)


def test_saving_heads_over_others_swaps_them_whole(tmp_path, monkeypatch):
  lm = make_tiny_lm(0)
  d = lm.cfg.d_model
  old = ExitHeads((1, 3), jnp.ones((2, d, d)), (4, 0, 9))
  new = ExitHeads((2,), 2 * jnp.ones((1, d, d)), (7,))
  path = str(tmp_path / "h")
  save_heads(path, old, "tiny")

  def killed(*args, **kwargs):
    raise KeyboardInterrupt

  with monkeypatch.context() as m:  # killed after the matrices, before heads.json: the old heads stay whole
    m.setattr(json, "dump", killed)
    with pytest.raises(KeyboardInterrupt):
      save_heads(path, new, "tiny")
  back = load_heads(path, lm.cfg)
  assert back.layers == (1, 3) and back.vocab_ids == (4, 0, 9) and float(back.t_idd[0, 0, 0]) == 1.0
  save_heads(path, new, "tiny")
  back = load_heads(path, lm.cfg)
  assert back.layers == (2,) and back.vocab_ids == (7,) and float(back.t_idd[0, 0, 0]) == 2.0
  assert sorted(p.name for p in tmp_path.iterdir()) == ["h"]  # nothing left beside it


def test_evaluate_counts_every_row(tiny_data):
  lm, data = tiny_data
  t_idd = identity_heads(lm.cfg, LAYERS).t_idd
  kl_i, agree_i = train.kl_per_head(lm.params, lm.cfg, t_idd, jnp.asarray(data.inputs_inrd), jnp.asarray(data.final_rd))
  got = train.evaluate(lm.params, lm.cfg, t_idd, data, chunk=96)  # 224 rows: chunks of 96, 96 and 32
  np.testing.assert_allclose(got["agree"], agree_i, rtol=1e-6)
  np.testing.assert_allclose(got["kl"], kl_i, rtol=1e-4)


def test_heads_are_read_and_folded_once_per_version_of_their_files(tmp_path, monkeypatch):
  lm = make_tiny_lm(0)
  d = lm.cfg.d_model
  path = str(tmp_path / "h")
  save_heads(path, ExitHeads((1, 3), jnp.ones((2, d, d)), (4, 0, 9)), "tiny")
  reads = []
  monkeypatch.setattr(heads_lib, "load_vocab", lambda *a: reads.append(a) or load_vocab(*a))

  def request(**options):
    return GenerateRequest(((1, 2),), 4, SamplingConfig(), 0, tuple(dict(heads=path, **options).items()))

  first = decode.resolve_heads(lm, request())
  folded = decode.loop_heads(lm, first, 2)
  assert decode.resolve_heads(lm, request()) is first and len(reads) == 1  # one read from disk
  assert all(a is b for a, b in zip(decode.loop_heads(lm, first, 2), folded))  # one fold
  np.testing.assert_array_equal(np.asarray(folded[1]), [4, 0])
  assert decode.resolve_heads(lm, request(head_layers=[3])).layers == (3,)
  lm.params = jax.tree.map(lambda x: x * 2, lm.params)  # new params: folded again
  assert not np.array_equal(np.asarray(decode.loop_heads(lm, first, 2)[0]), np.asarray(folded[0]))
  save_heads(path, ExitHeads((2,), 2 * jnp.ones((1, d, d)), (7,)), "tiny")  # re-exported: read again
  again = decode.resolve_heads(lm, request())
  assert again.layers == (2,) and again.vocab_ids == (7,) and float(again.t_idd[0, 0, 0]) == 2.0
  with pytest.raises(HdjaxError, match="list of integers"):
    decode.resolve_heads(lm, request(head_layers=2))
