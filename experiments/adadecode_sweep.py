"""AdaDecode vs ar on a stratified Spec-Bench subset, in one process after warm-up: speedup, parity, exit rates,
rejection, the identity-head ablation, reduced-vocabulary heads, a gamma sweep (PNG) and a per-component cost
profile.

  .venv/bin/python -m experiments.adadecode_sweep --per_category=3 --max_new_tokens=128 \
      --gammas=0.5,0.75,0.9 --head_vocabs=1024,2048,4096 --out_dir=results/adadecode
  .venv/bin/python -m experiments.adadecode_sweep --sharegpt_val=13 --layer_sets=22,22+26 \
      --noablation --nowithout_verification --out_dir=results/adadecode_val     (choosing layers on validation)
  .venv/bin/python experiments/adadecode_sweep.py ...     (the same, from any directory)
"""

from __future__ import annotations

import collections
import functools
import json
import os
import sys

if __package__ in (None, ""):  # started as `python experiments/X.py`: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import hdjax
from experiments.common import (SPEC_BENCH_QUESTIONS, at_least, check_output_dir, each_shape, int_list, median_ms,
                                print_start, pyplot, read_questions, require, run_main, speed_dtype, write_json_atomic)
from hdjax import model
from hdjax.adadecode import decode
from hdjax.adadecode.heads import load_heads
from hdjax.exit_heads import head_logits, reduced_logits
from hdjax.adadecode.train import first_exchanges
from hdjax.decoding.autoregressive import next_pow2
from hdjax.attention import causal_mask
from hdjax.errors import HdjaxError
from hdjax.kvcache import init_cache

# exchanges; the heads' training, held-out and vocabulary text ends before it (docs/results/adadecode.md)
VAL_SKIP = 2200
VAL_CHARS = (20, 600)
flags.DEFINE_string("questions", SPEC_BENCH_QUESTIONS, "Spec-Bench question file")
flags.DEFINE_integer("sharegpt_val", 0, "> 0: run on that many ShareGPT validation prompts instead of --questions "
                     f"(first user turns of {VAL_CHARS[0]}-{VAL_CHARS[1]} characters of the exchanges from {VAL_SKIP} "
                     "on, after all the exit heads' training and vocabulary text)")
flags.DEFINE_integer("per_category", 3, "questions per category (the first ones of each)")
flags.DEFINE_list("categories", [], "categories to keep (default: all)")
flags.DEFINE_integer("max_new_tokens", 128, "new tokens per question")
flags.DEFINE_string("heads", decode.DEFAULT_HEADS_DIR, "trained exit heads directory")
flags.DEFINE_list("head_layers", [str(l) for l in decode.DEFAULT_LAYERS], "which trained heads to use")
flags.DEFINE_float("gamma", decode.AdaDecodeConfig().gamma, "default confidence threshold (the method's default)")
flags.DEFINE_integer("max_pending", 5, "pending early tokens at most")
flags.DEFINE_list("gammas", ["0.5", "0.9"], "extra gammas for the sweep (the default gamma is always run)")
flags.DEFINE_integer("head_vocab", decode.DEFAULT_HEAD_VOCAB,
                     "candidate ids the heads score in the gamma sweep (0: full vocabulary)")
flags.DEFINE_list("head_vocabs", ["0"], "extra head_vocab values run at the default gamma")
flags.DEFINE_list("layer_sets", [], "extra sets of head layers ('+'-joined, e.g. 24+26) run at the default gamma")
flags.DEFINE_bool("ablation", True, "also run the original LM head (identity T_i) at the trained layers")
flags.DEFINE_bool("without_verification", True,
                  "also run the default config keeping every early token unchecked (the paper's ablation; lossy)")
flags.DEFINE_enum("dtype", "auto", ["auto", "float32", "bfloat16"],
                  "weight dtype (auto: `common.speed_dtype`; AdaDecode returns ar's tokens in both)")
flags.DEFINE_string("out_dir", "results/adadecode", "output directory")
F = flags.FLAGS


def sharegpt_validation(n: int) -> list[dict]:
  """The validation split on which the method's settings are chosen (never Spec-Bench)."""
  picked = [e[0]["content"] for e in first_exchanges(10 * n, skip=VAL_SKIP)
            if VAL_CHARS[0] <= len(e[0]["content"]) <= VAL_CHARS[1]][:n]
  return [dict(question_id=f"sharegpt_val_{i}", category="sharegpt_val", turns=[text]) for i, text in enumerate(picked)]


def select_questions(path, per_category, categories):
  by_cat = collections.OrderedDict()
  for q in read_questions(path):
    if categories and q["category"] not in categories:
      continue
    if len(by_cat.setdefault(q["category"], [])) < per_category:
      by_cat[q["category"]].append(q)
  return [q for qs in by_cat.values() for q in qs]


def profile(lm, heads, head_vocabs, reps: int = 20) -> dict:
  """Median ms of the pieces a decoding step is made of (one decoder layer for 1..W rows, one head, a reduced head
  of each size in `head_vocabs`, the LM head)."""
  cfg, params = lm.cfg, lm.params
  cache = init_cache(cfg, 1, 512)

  @jax.jit
  def layer(h_1rd, k, v):
    r = h_1rd.shape[1]
    pos = jnp.arange(100, 100 + r)[None]
    return model.run_layers(params, cfg, h_1rd, pos, causal_mask(pos, 512), cache.replace(k=k, v=v), pos, 7, 8).h_btd

  head = jax.jit(lambda h: head_logits(params, cfg, heads.t_idd[0], h))
  unembed = jax.jit(lambda h: model.unembed(params, cfg, h))

  out = {f"layer_rows{r}_ms": median_ms(layer, jnp.ones((1, r, cfg.d_model)), cache.k, cache.v, repeats=reps)
         for r in (1, 2, 4, 6)}
  out["head_ms"] = median_ms(head, jnp.ones((1, 1, cfg.d_model)), repeats=reps)
  for n in head_vocabs:
    w_nd = decode.loop_heads(lm, heads, n)[0][0]
    reduced = jax.jit(lambda h, w_nd=w_nd: reduced_logits(params, cfg, w_nd, h))
    out[f"reduced_head{n}_ms"] = median_ms(reduced, jnp.ones((1, 1, cfg.d_model)), repeats=reps)
  out["lm_head_ms"] = median_ms(unembed, jnp.ones((1, 1, cfg.d_model)), repeats=reps)
  return out


def main(argv):
  del argv
  require(per_category=(F.per_category, at_least(1)), max_new_tokens=(F.max_new_tokens, at_least(1)),
          max_pending=(F.max_pending, at_least(1)), gamma=(F.gamma, at_least(0)),
          head_vocab=(F.head_vocab, at_least(0)))
  head_layers = int_list("head_layers", F.head_layers)
  head_vocabs = sorted(set(int_list("head_vocabs", F.head_vocabs, low=0)) - {F.head_vocab})
  layer_sets = [tuple(int_list("layer_sets", text.split("+"))) for text in F.layer_sets]
  try:
    gammas = sorted({F.gamma} | {float(g) for g in F.gammas})
  except ValueError:
    raise HdjaxError(f"--gammas must be numbers, got {','.join(F.gammas)!r}") from None
  require(**{f"gammas[{i}]": (g, at_least(0)) for i, g in enumerate(gammas)})
  qs = (sharegpt_validation(F.sharegpt_val) if F.sharegpt_val > 0
        else select_questions(F.questions, F.per_category, set(F.categories)))
  if not qs:
    raise HdjaxError(f"no questions in categories {F.categories} of {F.questions}")
  check_output_dir(F.out_dir, ["runs.jsonl", "summary.json", "gamma_sweep.png"])
  dtype = speed_dtype(F.dtype)
  print_start("adadecode_sweep", dtype=dtype, questions=len(qs), max_new_tokens=F.max_new_tokens, heads=F.heads)
  lm = hdjax.load("smollm2-135m", dtype=dtype)
  all_heads = load_heads(F.heads, lm.cfg)
  trained = decode.select_heads(lm.cfg, all_heads, head_layers)
  other_sets = [decode.select_heads(lm.cfg, all_heads, layers) for layers in layer_sets]  # bad layers fail here
  prompts = [lm.tokenizer.apply_chat_template([{"role": "user", "content": q["turns"][0]}]) for q in qs]
  for n in [F.head_vocab] + head_vocabs:  # a bad head_vocab fails here, before any timed run
    decode.loop_heads(lm, trained, n)
  configs = ([("ar", "ar", {})]
             + [(f"adadecode_g{g}", "adadecode", dict(heads=trained, gamma=g, head_vocab=F.head_vocab))
                for g in gammas]
             + [(f"adadecode_v{n}_g{F.gamma}", "adadecode", dict(heads=trained, gamma=F.gamma, head_vocab=n))
                for n in head_vocabs]
             + [(f"adadecode_L{'+'.join(map(str, h.layers))}_g{F.gamma}", "adadecode",
                 dict(heads=h, gamma=F.gamma, head_vocab=F.head_vocab)) for h in other_sets])
  if F.ablation:
    configs.append((f"identity_g{F.gamma}", "adadecode",
                    dict(heads="identity", head_layers=trained.layers, gamma=F.gamma, head_vocab=F.head_vocab)))
  if F.without_verification:  # `verify` is traced: the default config's compiled loop serves it
    configs.append((f"unverified_g{F.gamma}", "adadecode",
                    dict(heads=trained, gamma=F.gamma, head_vocab=F.head_vocab, verify=False)))

  def gen(method, opts, prompt):
    kw = dict(max_pending=F.max_pending, **opts) if method == "adadecode" else {}
    return lm.generate([prompt], method=method, max_new_tokens=F.max_new_tokens, **kw)[0]

  # warm-up: one prompt per shape bucket (prefill length, cache slots), so no compile lands in a timed run
  buckets = {(next_pow2(len(p)), next_pow2(len(p) + F.max_new_tokens + F.max_pending + 1, 64)): p for p in prompts}
  for name, method, opts in configs[:2] + configs[1 + len(gammas):]:  # gamma is traced; head_vocab is a shape
    each_shape(name, list(buckets.values()), functools.partial(gen, method, opts))
  os.makedirs(F.out_dir, exist_ok=True)
  rows = []
  log = open(os.path.join(F.out_dir, "runs.jsonl"), "w", encoding="utf-8")
  for q, prompt in zip(qs, prompts):  # interleave the configs per question, so load changes hit them alike
    ref = None
    for name, method, opts in configs:
      res = gen(method, opts, prompt)
      ref = res.token_ids if ref is None else ref
      st = {k: v for k, v in res.stats.items() if k != "accept_lengths"}
      rows.append(dict(question_id=q["question_id"], category=q["category"], config=name,
                       same_as_ar=res.token_ids == ref,
                       tok_per_s=len(res.token_ids) / res.stats["decode_s"], **st))
      log.write(json.dumps(rows[-1]) + "\n")
      log.flush()
    print(q["category"], {r["config"]: round(r["tok_per_s"], 1) for r in rows[-len(configs):]}, flush=True)
  log.close()

  def agg(name, category=None):
    sel = [r for r in rows if r["config"] == name and (category is None or r["category"] == category)]
    ar_sel = [r for r in rows if r["config"] == "ar" and (category is None or r["category"] == category)]
    out = dict(speedup=float(np.mean([r["tok_per_s"] for r in sel]) / np.mean([r["tok_per_s"] for r in ar_sel])),
               identical=f"{sum(r['same_as_ar'] for r in sel)}/{len(sel)}")
    if name != "ar":
      early = sum(r["early_tokens"] for r in sel)
      toks = sum(r["new_tokens"] for r in sel)
      exits = np.sum([r["exits"] for r in sel], axis=0)
      evals = np.sum([r["head_evals"] for r in sel], axis=0)
      layers = sel[0]["head_layers"]
      rej = sum(r["rejections"] for r in sel)
      out.update(accepted_early_per_token=sum(r["early_accepted"] for r in sel) / toks,
                 rejection_rate=rej / max(rej + sum(r["early_accepted"] for r in sel), 1),
                 early_tokens_per_token=early / toks,
                 exit_rate_per_layer={str(l): float(x / max(e, 1)) for l, x, e in zip(layers, exits, evals)},
                 head_evals_per_token=float(np.sum(evals) / toks),
                 mean_pending_depth=sum(r["mean_pending_depth"] * r["verifications"] for r in sel)
                 / max(sum(r["verifications"] for r in sel), 1),
                 layer_steps_per_token=sum(r["layer_steps"] for r in sel) / toks)
    return out

  cats = list(dict.fromkeys(q["category"] for q in qs))
  summary = dict(questions=len(qs), max_new_tokens=F.max_new_tokens, dtype=dtype, heads=F.heads,
                 head_layers=list(trained.layers),
                 max_pending=F.max_pending, overall={n: agg(n) for n, _, _ in configs},
                 per_category={c: {n: agg(n, c)["speedup"] for n, _, _ in configs} for c in cats},
                 head_vocab=F.head_vocab, profile_ms=profile(lm, trained, [n for n in head_vocabs if n > 0]))
  write_json_atomic(os.path.join(F.out_dir, "summary.json"), summary)
  print(json.dumps(summary, indent=1))

  plt = pyplot(os.path.join(F.out_dir, "gamma_sweep.png"))
  if plt is None:
    return
  fig, ax = plt.subplots(figsize=(5, 3.5))
  sp = [summary["overall"][f"adadecode_g{g}"]["speedup"] for g in gammas]
  rj = [summary["overall"][f"adadecode_g{g}"]["rejection_rate"] for g in gammas]
  ax.plot(gammas, sp, "o-", label="speedup vs ar")
  ax.plot(gammas, rj, "s--", label="rejection rate")
  ax.axhline(1.0, color="gray", lw=0.5)
  ax.set_xlabel("gamma")
  source = "ShareGPT validation" if F.sharegpt_val else "Spec-Bench"
  ax.set_title(f"AdaDecode, SmolLM2-135M {dtype} CPU, {len(qs)} {source} prompts")
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(F.out_dir, "gamma_sweep.png"), dpi=120)


if __name__ == "__main__":
  run_main(main)
