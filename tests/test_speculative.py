"""The speculative loop: lossless against `ar` (greedy ids, sampling distribution), adversarial trees, recompiles."""

from __future__ import annotations

import collections
import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hdjax import compilation
from hdjax.api import GenerateRequest
from hdjax.decoding.sampling import SamplingConfig
from hdjax.decoding.speculative import SpecConfig, speculative_generate
from hdjax.drafting.hierarchy import HierarchyDrafter
from tests.conftest import make_tiny_lm

REPETITIVE = tuple([5, 6, 7, 8, 9, 10] * 6)


class ScriptedDrafter:
  """Proposes chains from a function of the tokens generated so far (oracle, wrong, duplicated, random...)."""

  name = "scripted"

  def __init__(self, propose):
    self.propose = propose
    self.generated: list[int] = []

  def start(self, prompt):
    self.generated = []

  def extend(self, tokens):
    self.generated.extend(tokens)

  def draft(self, context, max_chains, depth):
    return self.propose(list(self.generated), max_chains, depth)[:max_chains]

  def finish(self):
    pass


def request_for(prompts, max_new, temperature=0.0, seed=0, **options):
  return GenerateRequest(tuple(tuple(p) for p in prompts), max_new, SamplingConfig(temperature), seed,
                         tuple(sorted(options.items())))


@pytest.fixture(scope="module")
def lm():
  return make_tiny_lm()


@pytest.fixture(scope="module")
def eos_lm():
  """A tiny model whose greedy continuation of REPETITIVE emits EOS early (EOS = its 7th greedy token)."""
  base = make_tiny_lm()
  ids = base.generate([REPETITIVE], max_new_tokens=12)[0].token_ids
  return make_tiny_lm(eos_ids=(ids[6],))


@pytest.mark.parametrize("method", ["pld_host", "hd_context_host"])  # the host loops (device: test_device_loop.py)
@pytest.mark.parametrize("max_new", [1, 7, 40])
def test_registered_methods_equal_ar(lm, method, max_new):
  prompts = [REPETITIVE, REPETITIVE[:17], [3, 1, 4, 1, 5, 9, 2, 6]]
  ref = lm.generate(prompts, method="ar", max_new_tokens=max_new)
  out = lm.generate(prompts, method=method, max_new_tokens=max_new)
  for r, o in zip(ref, out):
    assert o.token_ids == r.token_ids
    assert sum(o.stats["accept_lengths"]) == len(o.token_ids)
  if max_new == 40:
    assert out[0].stats["tau"] > 1.5  # the repetitive prompt is drafted well: the test exercises acceptance


def test_eos_inside_an_accepted_draft_stops_like_ar(eos_lm):
  ref = eos_lm.generate([REPETITIVE], max_new_tokens=30)[0].token_ids
  assert len(ref) == 7 and ref[-1] in eos_lm.cfg.eos_ids
  oracle = lambda gen, c, d: [list(ref[len(gen):len(gen) + d]) + [0] * d]
  out = speculative_generate(eos_lm, request_for([REPETITIVE], 30), "oracle",
                             lambda spec: ScriptedDrafter(oracle), SpecConfig(max_depth=8))
  assert out[0].token_ids == ref


def reference_ids(lm, prompt, max_new):
  return lm.generate([prompt], max_new_tokens=max_new)[0].token_ids


STRATEGIES = ["oracle", "wrong", "duplicates", "random", "oracle_then_wrong"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(STRATEGIES), seed=st.integers(0, 1000), depth=st.integers(1, 6),
       buckets=st.sampled_from([(1, 4), (1, 4, 8, 16), (1, 16)]), tight=st.booleans())
def test_adversarial_trees_never_change_greedy_output(lm, kind, seed, depth, buckets, tight):
  """`tight`: prompt + new tokens + node budget lands exactly on the cache size, so the last trees reach its end."""
  max_new = 20
  prompt = REPETITIVE[:64 - max_new - max(buckets)] if tight else REPETITIVE[:23]
  ref = reference_ids(lm, prompt, max_new)
  rng = np.random.default_rng(seed)

  def propose(gen, max_chains, d):
    truth = list(ref[len(gen):len(gen) + d])
    if kind == "oracle":
      return [truth]
    if kind == "wrong":
      return [[(t + 1 + k) % lm.cfg.vocab_size for t in truth] for k in range(3)]
    if kind == "duplicates":
      return [truth, truth, truth[:1], truth]
    if kind == "oracle_then_wrong":
      return [truth[:1] + [(t + 1) % lm.cfg.vocab_size for t in truth[1:]], truth]
    return [list(rng.integers(0, lm.cfg.vocab_size, size=rng.integers(1, d + 1))) for _ in range(max_chains)]

  out = speculative_generate(lm, request_for([prompt], max_new), "adversarial",
                             lambda spec: ScriptedDrafter(propose), SpecConfig(buckets=buckets, max_depth=depth))
  assert out[0].token_ids == ref
  if kind == "oracle" and max(buckets) > depth:
    assert out[0].stats["tau"] > min(depth, 3)


def test_recompiles_are_bounded(lm):
  before = compilation.TRACE_COUNTS["verify_step"]
  for n, prompt in enumerate([REPETITIVE[:20], REPETITIVE[:15], REPETITIVE[3:20], [7, 7, 7, 7]]):
    lm.generate([prompt], method="hd_context_host", max_new_tokens=21 + n)
  lm.generate([REPETITIVE[:20]], method="hd_context_host", max_new_tokens=24, warmup=True)
  # one cache size (64 slots), one batch size, one depth: at most one trace per bucket
  assert compilation.TRACE_COUNTS["verify_step"] - before <= len(SpecConfig().buckets)


def exact_joint(lm, prompt, temperature, length):
  """P(first `length` tokens) by enumeration from full causal forwards (independent of any decoding loop)."""
  vocab = lm.cfg.vocab_size
  next_probs = {}
  for k in range(length):
    for prefix in itertools.product(range(vocab), repeat=k):
      logits = lm.logits(list(prompt) + list(prefix))[-1] / temperature
      q = np.exp(logits - logits.max())
      next_probs[prefix] = q / q.sum()
  return {seq: float(np.prod([next_probs[seq[:k]][seq[k]] for k in range(length)]))
          for seq in itertools.product(range(vocab), repeat=length)}


def test_sampling_distribution_equals_target():
  """Tokens 1-3 of a speculative sampler (drafts accepted and rejected) vs the exact target distribution."""
  lm = make_tiny_lm(seed=3, vocab_size=6, eos_ids=(99,))
  prompt, length, num, temperature = (1, 2, 3, 1, 2, 3), 3, 6000, 0.5
  exact = exact_joint(lm, prompt, temperature, length)
  drafts = lambda gen, c, d: [[1, 2, 3, 4], [2, 2], [1, 3], [5]]
  out = speculative_generate(lm, request_for([prompt] * num, length, temperature, seed=11), "sampled",
                             lambda spec: ScriptedDrafter(drafts), SpecConfig(buckets=(1, 8), max_depth=3))
  assert np.mean([len(o.stats["accept_lengths"]) for o in out]) < 3  # drafts were accepted, not only bonus tokens
  tv, bound = total_variation_bound(exact, [tuple(o.token_ids[:length]) for o in out])
  assert tv < bound, (tv, bound)
  # and the check is strong enough to tell this target from the same model at another temperature
  wrong = np.asarray(list(exact_joint(lm, prompt, 1.0, length).values()))
  assert 0.5 * np.abs(wrong - np.asarray(list(exact.values()))).sum() > bound


def total_variation_bound(exact: dict, samples: list[tuple]) -> tuple[float, float]:
  """Total variation between the samples' frequencies and `exact`, and the 99.9th percentile of the same statistic
  for exact multinomial samples of that size (2000 simulated runs)."""
  keys = list(exact)
  p = np.asarray([exact[k] for k in keys])
  index = {k: i for i, k in enumerate(keys)}
  freq = np.bincount([index[s] for s in samples], minlength=len(keys)) / len(samples)
  null = 0.5 * np.abs(np.random.default_rng(0).multinomial(len(samples), p, size=2000) / len(samples) - p).sum(axis=1)
  return float(0.5 * np.abs(freq - p).sum()), float(np.quantile(null, 0.999))


@pytest.mark.slow  # ~30 s, the host loops on SmolLM2 (the device loops: test_device_loop.py); `make test-slow` runs it
def test_real_model_greedy_equals_ar(smollm):
  prompts = [smollm.tokenizer.apply_chat_template([{"role": "user", "content": c}]) for c in (
      "Repeat this sentence three times: the cat sat on the mat.",
      "List the numbers from 1 to 20 separated by commas.",
      "Write a Python function that returns the square of a number.")]
  refs = [smollm.generate([p], max_new_tokens=48)[0].token_ids for p in prompts]
  taus = []
  for method in ["pld_host", "hd_context_host"]:  # the host loops (device: test_device_loop.py)
    for prompt, ref in zip(prompts, refs):
      out = smollm.generate([prompt], method=method, max_new_tokens=48)[0]
      assert out.token_ids == ref, (method, smollm.tokenizer.decode(ref))
      taus.append(out.stats["tau"])
  assert max(taus) > 1.5


@pytest.mark.slow
def test_spec_bench_questions_greedy_equal_ar(smollm):
  """First turns of 20 Spec-Bench questions (stratified), every speculative method whose sources exist."""
  from experiments.common import SPEC_BENCH_QUESTIONS, read_jsonl  # pylint: disable=import-outside-toplevel
  from experiments.specbench import select_questions  # pylint: disable=import-outside-toplevel
  questions = select_questions(read_jsonl(SPEC_BENCH_QUESTIONS), 4, "stratified")[:20]
  prompts = [smollm.tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}]) for q in questions]
  for prompt in prompts:
    ref = smollm.generate([prompt], max_new_tokens=64)[0].token_ids
    for method in ["pld", "hd_context", "hd", "hd+adadecode"]:
      assert smollm.generate([prompt], method=method, max_new_tokens=64)[0].token_ids == ref, method


def test_each_row_of_a_batch_teaches_the_model_database_its_own_ngrams():
  """The online model database learns a batch's rows as separate sequences: exactly the n-grams of each row's
  output, never one that spans two rows (one ModelDB shared by every row once mixed them, e.g. (11 -> 21))."""
  from types import SimpleNamespace  # pylint: disable=import-outside-toplevel
  from hdjax.api import LM  # pylint: disable=import-outside-toplevel
  from hdjax.decoding import speculative  # pylint: disable=import-outside-toplevel
  from hdjax.drafting.model_db import ModelDB, count_ngrams  # pylint: disable=import-outside-toplevel
  base = make_tiny_lm()
  lm = LM(base.cfg, base.params, SimpleNamespace(identity="tiny-test", decode=lambda ids: ""), name="tiny")
  db = ModelDB()
  with speculative.database_scope("row-isolation"):
    speculative._LOADED[("model", "tiny-test", "row-isolation")] = db  # pylint: disable=protected-access
    try:
      out = lm.generate([REPETITIVE[:20], [3, 1, 4, 1, 5, 9, 2, 6]], method="hd_model", max_new_tokens=12)
    finally:
      speculative._LOADED.pop(("model", "tiny-test", "row-isolation"))  # pylint: disable=protected-access
  want = sum((count_ngrams(o.token_ids, db.config.key_orders, db.config.continuation) for o in out),
             collections.Counter())
  assert {(key, cont): n for key, cont, n in db.entries()} == dict(want)


class _Fixed:
  name = "fixed"

  def __init__(self, chains):
    self.chains = chains

  def draft(self, context, max_chains, depth):
    return self.chains[:max_chains]


def test_hierarchy_asks_sources_in_order():
  hd = HierarchyDrafter([_Fixed([]), _Fixed([[1, 2], [1, 2]]), _Fixed([[3], [4], [5]])], max_nodes=4)
  assert hd.draft([0], max_chains=7, depth=4) == [[1, 2], [3], [4]]  # duplicate dropped; stops at 4 nodes
  assert HierarchyDrafter([_Fixed([])], max_nodes=4).draft([0], 7, 4) == []
