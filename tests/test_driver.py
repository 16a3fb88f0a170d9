"""The one driver (`hdjax/decoding/driver.py`): every kind of decoding loop streams exactly the tokens it returns,
equal to its one-shot output, with one host wait per chunk; a warm-up compiles the loop and runs no step; and a
batch through any loop returns, row by row, its reference method's single-sequence output, with consistent
stats."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from hdjax import compilation, lazy
from hdjax.decoding import driver
from hdjax.decoding.state import DecodeState
from tests.conftest import make_tiny_lm

LAZY = lazy.LazyConfig(prune_layers=(1, 2), keep_ratios=(0.6, 0.4), min_prompt=0, bucket=64, chunk=48,
                       reselect_every=3, revive_budget=4)
# one of each loop: ArLoop, LazyLoop, AdaLoop, DeviceLoop, HostLoop, RevivingLoop, and the device loop over a
# frozen pruned prefill
LOOPS = {
    "ar": {}, "lazy": dict(lazy_config=LAZY), "adadecode": dict(heads="identity", head_layers=(2,), gamma=0.0),
    "pld": {}, "pld_host": {}, "lazy+pld": dict(lazy_config=LAZY),
    "lazy+pld_frozen": dict(lazy_config=dataclasses.replace(LAZY, revive=False)),
}
METHOD = {"lazy+pld_frozen": "lazy+pld"}
# what each loop's greedy output equals: `ar`, or `lazy` with the same schedule
REFERENCE = {"lazy": "lazy", "lazy+pld": "lazy", "lazy+pld_frozen": "lazy"}


@pytest.fixture(scope="module")
def lm():
  return make_tiny_lm(seed=4)


def prompts(seed: int, lengths) -> list[list[int]]:
  rng = np.random.default_rng(seed)
  motif = [int(x) for x in rng.integers(3, 128, 7)]
  return [[int(x) for x in rng.integers(3, 128, n - 21)] + motif * 3 for n in lengths]


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in ("ar", "lazy+pld_frozen") else n
                                  for n in LOOPS])
def test_streaming_sends_what_one_shot_returns(lm, name):
  method, options = METHOD.get(name, name), LOOPS[name]
  prompt = prompts(0, (40,))
  want = lm.generate(prompt, method=method, max_new_tokens=23, **options)[0]
  got: list[list[int]] = []
  out = lm.generate(prompt, method=method, max_new_tokens=23, on_tokens=got.append, chunk_tokens=5, **options)[0]
  assert [t for chunk in got for t in chunk] == out.token_ids == want.token_ids
  assert got[0] == out.token_ids[:1]  # the first token goes out as soon as it is known
  assert len(got) >= 2 and out.stats["host_syncs"] > want.stats["host_syncs"]


@pytest.mark.parametrize("name", ["ar", "lazy", "adadecode", "pld"])
def test_warmup_compiles_and_runs_no_step(lm, name):
  method, options = METHOD.get(name, name), LOOPS[name]
  prompt = prompts(1, (41,))
  warm = lm.generate(prompt, method=method, max_new_tokens=19, warmup=True, **options)[0]
  assert len(warm.token_ids) == 1 and warm.stats["accept_lengths"] == [1]
  before = compilation.TRACE_COUNTS.copy()
  out = lm.generate(prompts(2, (44,)), method=method, max_new_tokens=17, **options)[0]
  assert compilation.TRACE_COUNTS == before and len(out.token_ids) == 17  # same cache shape: nothing traced again


# ar, pld and adadecode batches: also tests/test_autoregressive.py and tests/test_compose.py
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow)
                                  if n in ("ar", "pld", "adadecode", "lazy+pld_frozen") else n for n in LOOPS])
def test_a_batch_returns_each_rows_single_sequence_reference(lm, name):
  method, options = METHOD.get(name, name), LOOPS[name]
  reference = REFERENCE.get(name, "ar")
  batch = prompts(3, (40, 57, 33))
  out = lm.generate(batch, method=method, max_new_tokens=21, **options)
  for prompt, o in zip(batch, out):
    want = lm.generate([prompt], method=reference, max_new_tokens=21,
                       **({} if reference == "ar" else dict(lazy_config=options["lazy_config"])))[0]
    assert o.token_ids == want.token_ids
    assert o.stats["new_tokens"] == len(o.token_ids) == sum(o.stats["accept_lengths"])
    assert o.stats["tau"] == pytest.approx(np.mean(o.stats["accept_lengths"]))


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "lazy+pld_frozen" else n
                                  for n in LOOPS if not n.endswith("_host")])
def test_every_device_loop_steps_one_decode_state(lm, name, monkeypatch):
  """Every on-device loop starts, runs and returns a `DecodeState` whose counts are the results' own."""
  runs = []
  real_generate = driver.generate

  class Recording:
    def __init__(self, loop):
      self.loop = loop

    def __getattr__(self, attr):
      return getattr(self.loop, attr)

    def run(self, lm_, request, state, stop_at):
      out = self.loop.run(lm_, request, state, stop_at)
      runs.append((state, out))
      return out

  monkeypatch.setattr(driver, "generate", lambda lm_, request, method, loop, *args: real_generate(
      lm_, request, method, Recording(loop), *args))
  method, options = METHOD.get(name, name), LOOPS[name]
  results = lm.generate(prompts(2, (40, 33)), method=method, max_new_tokens=12, **options)
  assert len(runs) == 1
  state, out = runs[0]
  assert isinstance(state, DecodeState) and isinstance(out, DecodeState)
  assert np.asarray(out.new_b).tolist() == [len(r.token_ids) for r in results]
  assert all(r.token_ids == np.asarray(out.tokens_bs)[b, s:s + len(r.token_ids)].tolist()
             for b, (r, s) in enumerate(zip(results, np.asarray(out.start_b))))
