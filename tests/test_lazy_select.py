"""LazyLLM selection options for keeping what the answer needs (issue 16): an observation window that ends before
the chat template's trailing tokens (`score_skip`), attention sinks kept unconditionally (`keep_sinks`), together
with span pooling (`score_pool`). Each is tested gathered == masked, and for what it promises to keep."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from hdjax import lazy
from tests.test_lazy import SCHEDULE, _prefill, _prompts, check_gathered_equals_masked, lm8  # noqa: F401


@pytest.mark.parametrize("window,pool,skip,sinks", [(1, 1, 3, 0), (1, 1, 0, 5), (4, 7, 6, 8), (8, 15, 6, 0)])
def test_gathered_equals_masked_with_skip_and_sinks(lm8, window, pool, skip, sinks):  # noqa: F811
  cfg = dataclasses.replace(SCHEDULE, score_window=window, score_pool=pool, score_skip=skip, keep_sinks=sinks)
  prompts = _prompts(seed=21)
  st_g = check_gathered_equals_masked(lm8, cfg, prompts)
  c = np.asarray(st_g.computed_lbs)
  assert np.all(c[1:] <= c[:-1]) and c[-1].sum() < c[0].sum()
  for b, p in enumerate(prompts):  # the window, the skipped tail and the sinks run every layer
    assert np.all(c[:, b, len(p) - window - skip:len(p)] == 1)
    assert np.all(c[:, b, :sinks] == 1)


def test_skip_changes_the_selection(lm8):  # noqa: F811
  """Skipping the tail scores with other rows, so (on random weights) another set survives."""
  prompts = _prompts(seed=22)
  kept = [np.asarray(_prefill(lm8, dataclasses.replace(SCHEDULE, score_window=4, score_skip=skip), prompts,
                              gathered=True)[1].computed_lbs[-1]) for skip in (0, 6)]
  assert not np.array_equal(kept[0], kept[1])


@pytest.mark.parametrize("window,skip", [(1, 5), (4, 6)])
def test_skipped_scores_are_earlier_rows_of_full_attention(lm8, window, skip):  # noqa: F811
  """With skip s the score equals rows [last - s - window + 1, last - s] of a dense NumPy softmax(QK^T)."""
  cfg = lm8.cfg
  n = 40
  prompt = _prompts(lengths=(n,))[0]
  pos = jnp.arange(n)[None]
  h = lazy.model.embed(lm8.params, cfg, jnp.asarray([prompt]))
  scores, _ = lazy.score_tokens(lm8.params, cfg, 0, h, pos, jnp.ones((1, n), bool), jnp.asarray([n - 1]), window,
                                skip)
  p = lazy.model.layer_params(lm8.params, 0)
  q = np.asarray(lazy._norm_qk(cfg, p, h, pos, "q"))[0]  # pylint: disable=protected-access
  k = np.asarray(lazy._norm_qk(cfg, p, h, pos, "k"))[0]  # pylint: disable=protected-access
  k = np.repeat(k, cfg.q_per_kv, axis=1)
  logits = np.einsum("tnh,snh->nts", q, k) / np.sqrt(cfg.head_dim)
  logits = np.where(np.tril(np.ones((n, n), bool))[None], logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  rows = slice(n - skip - window, n - skip)
  np.testing.assert_allclose(np.asarray(scores)[0], probs[:, rows].mean((0, 1)), atol=1e-6)


def test_pooling_keeps_a_run_whole():
  """A 5-token run next to one high-scoring token, with the rest scored above the run: without pooling the run is
  dropped, with a pool reaching across it the run survives whole (no digit of a number pruned alone)."""
  n, count = 64, 16
  rng = np.random.default_rng(0)
  scores = rng.uniform(0.2, 1.0, (1, n)).astype(np.float32)
  scores[0, 30] = 5.0  # e.g. "key" in "the pass key is 48213"
  scores[0, 32:37] = 0.01  # the digits themselves score low
  positions = jnp.arange(n)[None]
  valid = jnp.ones((1, n), bool)
  for pool, whole in ((1, False), (15, True)):
    pooled = lazy.pool_scores(jnp.asarray(scores), positions, valid, n, pool)
    kept_bk = lazy._select(pooled, positions, valid, jnp.asarray([n - 1]), count)  # pylint: disable=protected-access
    kept = set(np.asarray(kept_bk)[0].tolist())
    assert set(range(32, 37)) <= kept if whole else not set(range(32, 37)) & kept


def test_bad_skip_or_sinks_is_an_error(lm8):  # noqa: F811
  for field in ("score_skip", "keep_sinks"):
    with pytest.raises(lazy.HdjaxError, match="score_skip and keep_sinks"):
      dataclasses.replace(SCHEDULE, **{field: -1}).validate(lm8.cfg)
