"""Library side of experiments/specbench.py: everything but the flags and `main`, importable by tests."""

from __future__ import annotations

import collections
import time
from typing import Any, Sequence

import numpy as np

import hdjax
from experiments.common import pyplot
from hdjax.adadecode.decode import AdaDecodeConfig
from hdjax.decoding import autoregressive as ar
from hdjax.decoding.request import slots_for



MT_BENCH = ("writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities")


def spec_bench_category(category: str) -> str:
  """Spec-Bench reports MT-bench's eight categories as one, `mt_bench`."""
  return "mt_bench" if category in MT_BENCH else category


def select_questions(questions: list[dict[str, Any]], limit: int | None, subset: str) -> list[dict[str, Any]]:
  """The first `limit` questions, or the first `limit` of each Spec-Bench category (file order kept)."""
  if limit is None:
    return questions
  if subset == "first":
    return questions[:limit]
  taken: collections.Counter = collections.Counter()
  out = []
  for q in questions:
    if taken[spec_bench_category(q["category"])] < limit:
      taken[spec_bench_category(q["category"])] += 1
      out.append(q)
  return out


def answer(lm: hdjax.LM, method: str, turns: Sequence[str], max_new_tokens: int, sampling: dict[str, Any], seed: int,
           options: dict[str, Any]) -> list[tuple[hdjax.GenerationResult, float]]:
  """All turns of one question; turn k's prompt holds the model's own earlier answers. `sampling`: `generate`'s
  temperature, top_k and top_p."""
  messages, out = [], []
  for turn in turns:
    messages.append({"role": "user", "content": turn})
    ids = lm.tokenizer.apply_chat_template(messages)
    start = time.perf_counter()
    res = lm.generate([ids], method=method, max_new_tokens=max_new_tokens, seed=seed, **sampling, **options)[0]
    out.append((res, time.perf_counter() - start))
    messages.append({"role": "assistant", "content": res.text})
  return out


# cache slots a method adds past its new tokens: none (`ar`), AdaDecode's window (max_pending + 1), tree rows up to
# the default and a larger node budget (a shape of AdaDecode's window was missed without it: one timed compile)
SPECULATIVE_EXTRA_ROWS = (0, AdaDecodeConfig().max_pending + 1, 8, 16)


# an answer's text can tokenize to a few more tokens than were generated when a later turn's prompt holds it
RETOKENIZED_SLACK = 8


def warmup_prompts(lm: hdjax.LM, questions: list[dict[str, Any]], max_new_tokens: int, max_turns: int | None = None
                   ) -> list[list[int]]:
  """One prompt per distinct compiled shape (prefill bucket and cache sizes) that any of the first `max_turns` turns
  (default: all) can have, so the timed runs compile nothing new: turn k's prompt holds k earlier answers of
  0..max_new_tokens (+ RETOKENIZED_SLACK) tokens each, and every length in that range is covered (an estimate of one
  length missed shapes: `ar` compiled during a timed second turn of `make run`)."""
  by_shape: dict[tuple[int, ...], list[int]] = {}
  for q in questions:
    messages: list[dict[str, str]] = []
    for k, turn in enumerate(q["turns"][:max_turns]):
      messages.append({"role": "user", "content": turn})
      shortest = lm.tokenizer.apply_chat_template(messages)
      for n in range(len(shortest), len(shortest) + k * (max_new_tokens + RETOKENIZED_SLACK) + 1):
        slots = tuple(slots_for(n, max_new_tokens, extra, lm.cfg.engine.min_rows) for extra in SPECULATIVE_EXTRA_ROWS)
        by_shape.setdefault((ar.prompt_bucket(n, lm.cfg.engine.min_rows), *slots),
                            shortest + [lm.cfg.pad_id] * (n - len(shortest)))
      messages.append({"role": "assistant", "content": ""})
  return [p[:lm.cfg.max_seq_len - max_new_tokens] for p in by_shape.values()]


def jsonable(x: Any) -> Any:
  if isinstance(x, dict):
    return {str(k): jsonable(v) for k, v in x.items() if not callable(v)}
  if isinstance(x, (list, tuple)):
    return [jsonable(v) for v in x]
  if isinstance(x, np.generic):
    return x.item()
  return x


def answer_row(q: dict[str, Any], method: str, model_id: str, turns: list[tuple[hdjax.GenerationResult, float]]
               ) -> dict[str, Any]:
  choice = dict(index=0, turns=[r.text for r, _ in turns], new_tokens=[len(r.token_ids) for r, _ in turns],
                wall_time=[w for _, w in turns], decoding_steps=[r.stats["steps"] for r, _ in turns],
                # device-to-host waits while decoding, per turn (None where a method does not count them)
                host_syncs=[r.stats.get("host_syncs") for r, _ in turns],
                accept_lengths=[a for r, _ in turns for a in r.stats["accept_lengths"]],
                token_ids=[r.token_ids for r, _ in turns], stats=[jsonable(r.stats) for r, _ in turns])
  return dict(question_id=q["question_id"], category=spec_bench_category(q["category"]), method=method,
              model_id=model_id,
              choices=[choice])


def summarize(rows_by_method: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
  """Spec-Bench's rule: per-question tokens/s averaged over questions, then the ratio to `ar`."""
  def speed(row):
    c = row["choices"][0]
    return sum(c["new_tokens"]) / max(sum(c["wall_time"]), 1e-9)

  ref = rows_by_method.get("ar")
  categories = sorted({r["category"] for rows in rows_by_method.values() for r in rows})
  summary: dict[str, Any] = {"methods": {}}
  for method, rows in rows_by_method.items():
    per_cat = {}
    for cat in categories + ["overall"]:
      idx = [i for i, r in enumerate(rows) if cat in ("overall", r["category"])]
      steps = [s for i in idx for st in rows[i]["choices"][0]["stats"] for s in st["accept_lengths"]]
      stats = [st for i in idx for st in rows[i]["choices"][0]["stats"]]
      timed = [st for st in stats if "draft_s" in st]  # host loops time their drafting; on the device it is fused
      draft, verify = sum(st["draft_s"] for st in timed), sum(st.get("verify_s", 0.0) for st in timed)
      syncs = [st["host_syncs"] for st in stats if "host_syncs" in st]
      entry = dict(questions=len(idx), tokens_per_s=float(np.mean([speed(rows[i]) for i in idx])),
                   tau=float(np.mean(steps)), draft_share=draft / max(draft + verify, 1e-12) if timed else None,
                   host_syncs_per_turn=float(np.mean(syncs)) if syncs else None)
      if ref is not None:
        entry["speedup"] = entry["tokens_per_s"] / float(np.mean([speed(ref[i]) for i in idx]))
        entry["identical_rate"] = float(np.mean([rows[i]["choices"][0]["token_ids"] ==
                                                 ref[i]["choices"][0]["token_ids"] for i in idx]))
      per_cat[cat] = entry
    summary["methods"][method] = per_cat
  return summary


def plot_speedups(summary: dict[str, Any], path: str) -> None:
  plt = pyplot(path)
  if plt is None:
    return
  methods = [m for m, cats in summary["methods"].items() if "speedup" in cats["overall"]]
  categories = list(summary["methods"][methods[0]]) if methods else []
  fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(categories)), 4))
  width = 0.8 / max(len(methods), 1)
  for k, m in enumerate(methods):
    ax.bar(np.arange(len(categories)) + k * width, [summary["methods"][m][c]["speedup"] for c in categories],
           width, label=m)
  ax.axhline(1.0, color="grey", lw=0.8)
  ax.set_xticks(np.arange(len(categories)) + 0.4 - width / 2, categories, rotation=20)
  ax.set_ylabel("speedup over ar")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_accept_lengths(rows_by_method: dict[str, list[dict[str, Any]]], path: str) -> None:
  """Share of decoding steps that emitted k tokens, per method (`ar` always emits 1 and is left out)."""
  plt = pyplot(path)
  if plt is None:
    return
  lengths = {m: [a for r in rows for a in r["choices"][0]["accept_lengths"]] for m, rows in rows_by_method.items()
             if m != "ar"}
  top = max((max(v) for v in lengths.values() if v), default=1)
  fig, ax = plt.subplots(figsize=(6, 3.5))
  width = 0.8 / max(len(lengths), 1)
  for k, (m, v) in enumerate(lengths.items()):
    counts = np.bincount(v, minlength=top + 1)[1:]
    ax.bar(np.arange(1, top + 1) + k * width, counts / max(counts.sum(), 1), width, label=m)
  ax.set_xlabel("tokens emitted per step")
  ax.set_ylabel("share of steps")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
