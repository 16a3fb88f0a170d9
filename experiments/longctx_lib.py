"""Library side of experiments/longctx.py: everything but the flags and `main`, importable by tests."""

from __future__ import annotations

import collections
import os
import random
import re
import statistics


from experiments import common
from hdjax.errors import HdjaxError


TASKS = ("passkey", "multidoc", "multidoc_qa")


def _articles(path: str) -> list[dict]:
  rows = [r for r in common.read_jsonl(path) if r.get("document") and r.get("summary")]
  if not rows:
    raise HdjaxError(f"{path}: no rows with 'document' and 'summary'")
  return rows


def _fit(lm, make_prompt, docs: list[str], limit: int) -> tuple[str, int]:
  """The longest prefix of `docs` whose chat-templated prompt stays within `limit` tokens."""
  n_tok = lambda k: len(lm.tokenizer.apply_chat_template([{"role": "user", "content": make_prompt(docs[:k])}]))
  lo, hi = 1, len(docs)
  while lo < hi:
    mid = (lo + hi + 1) // 2
    lo, hi = (mid, hi) if n_tok(mid) <= limit else (lo, mid - 1)
  return make_prompt(docs[:lo]), lo


def build_passkey(lm, articles, limit: int, rng: random.Random, idx: int) -> dict:
  key = f"{rng.randrange(10000, 100000)}"
  sentences = [s for a in rng.sample(articles, 40) for s in a["document"].split("\n") if s.strip()]
  needle = f"The pass key is {key}. Remember it. {key} is the pass key."
  head = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"
  tail = "\n\nWhat is the pass key? Answer with the 5-digit number only."
  depth = rng.random()

  def make(parts):
    at = int(depth * len(parts))
    return head + "\n".join(parts[:at] + [needle] + parts[at:]) + tail

  prompt, _ = _fit(lm, make, sentences, limit)
  return dict(id=f"passkey-{limit}-{idx}", task="passkey", target_len=limit, prompt=prompt, answer=key,
              depth=round(depth, 3))


def build_multidoc(lm, articles, limit: int, rng: random.Random, idx: int) -> dict:
  """4 to 8 whole articles (as many as fit in `limit` tokens); the question names one of the first four."""
  pool = [a for a in articles if limit / 10 < len(a["document"]) / 4.2 < limit / 4]
  if len(pool) < 8:
    raise HdjaxError(f"multidoc: not enough articles of a suitable size for length {limit}")
  docs = rng.sample(pool, 8)
  target = rng.randrange(4)
  opening = " ".join(docs[target]["document"].split()[:12])
  question = f"\n\nSummarize in one sentence the article that begins with \"{opening}\"."

  def make(parts):
    return "\n\n".join(f"Article {i + 1}:\n{p}" for i, p in enumerate(parts)) + question

  texts = [d["document"] for d in docs]
  prompt, fitted = _fit(lm, make, texts, limit)
  while fitted < 4:  # the first four do not fit whole: shorten the longest until they do
    longest = max(range(4), key=lambda i: len(texts[i]))
    texts[longest] = texts[longest][:int(len(texts[longest]) * 0.9)]
    prompt, fitted = _fit(lm, make, texts, limit)
  return dict(id=f"multidoc-{limit}-{idx}", task="multidoc", target_len=limit, prompt=prompt,
              reference=docs[target]["summary"], n_docs=fitted)


# Synthetic facts for multidoc_qa: (sentence inserted into an article, question, kind of answer, values). Each prompt
# gives every article a different fact, so the question has to be matched to its fact, not just to "the odd
# sentence out"; values are invented, so the answer cannot come from the model's prior.
QA_FACTS = (
    ("The name of the mayor's dog is {}.", "What is the name of the mayor's dog?", "name",
     ("Biscuit", "Pepper", "Rufus", "Mabel", "Nugget", "Crumble", "Winston", "Tilly")),
    ("The winning raffle number drawn that evening was {}.", "What was the winning raffle number drawn that evening?",
     "number", None),
    ("The old lighthouse on the hill is painted {}.", "What colour is the old lighthouse on the hill painted?",
     "colour", ("purple", "orange", "turquoise", "pink", "silver", "yellow", "crimson", "lilac")),
    ("The company's new headquarters will be in {}.", "In which city will the company's new headquarters be?",
     "city", ("Lisbon", "Oslo", "Nairobi", "Montreal", "Osaka", "Valencia", "Krakow", "Perth")),
    ("The festival's official mascot is a {}.", "What animal is the festival's official mascot?", "animal",
     ("penguin", "giraffe", "hedgehog", "kangaroo", "flamingo", "walrus", "badger", "tortoise")),
    ("The code name of the secret project was {}.", "What was the code name of the secret project?", "code name",
     ("Falcon", "Bluebell", "Granite", "Monsoon", "Juniper", "Comet", "Thistle", "Harbour")),
    ("The new bridge was designed by an engineer called {}.", "What was the name of the engineer who designed the "
     "new bridge?", "name", ("Harriet Vance", "Omar Castell", "Ingrid Solberg", "Felix Marlow", "Priya Anand",
                              "Tobias Wren", "Elena Duarte", "Magnus Reid")),
    ("The number of volunteers who helped at the event was {}.", "How many volunteers helped at the event?", "number",
     None),
)


def build_multidoc_qa(lm, articles, limit: int, rng: random.Random, idx: int) -> dict:
  """Whole articles (as many as fit in `limit` tokens), each with one invented fact sentence inserted at a random
  sentence boundary, every article a different kind of fact; the question asks for one of them. The answer is
  checked by `qa_correct` (normalized containment)."""
  pool = [a for a in articles if limit / 12 < len(a["document"]) / 4.2 < limit / 4]
  if len(pool) < len(QA_FACTS):
    raise HdjaxError(f"multidoc_qa: not enough articles of a suitable size for length {limit}")
  docs = rng.sample(pool, len(QA_FACTS))
  facts = rng.sample(range(len(QA_FACTS)), len(QA_FACTS))
  texts, answers = [], []
  for doc, f in zip(docs, facts):
    sentence, _, _, values = QA_FACTS[f]
    value = str(rng.randrange(1000, 10000)) if values is None else rng.choice(values)
    lines = [s for s in doc["document"].split("\n") if s.strip()]
    at = rng.randrange(len(lines) + 1)
    texts.append("\n".join(lines[:at] + [sentence.format(value)] + lines[at:]))
    answers.append(value)
  pick = rng.random()

  def make(parts):
    target = int(pick * len(parts))
    _, question, kind, _ = QA_FACTS[facts[target]]
    return (f"Read the articles below, then answer this question: {question}\n\n"
            + "\n\n".join(f"Article {i + 1}:\n{p}" for i, p in enumerate(parts))
            + f"\n\nQuestion: {question} Answer with the {kind} only.")

  prompt, fitted = _fit(lm, make, texts, limit)
  while fitted < 2:  # fewer than two articles fit whole: shorten the longest of the first two until they do
    longest = max(range(2), key=lambda i: len(texts[i]))
    texts[longest] = texts[longest][:int(len(texts[longest]) * 0.9)]
    prompt, fitted = _fit(lm, make, texts, limit)
  target = int(pick * fitted)
  return dict(id=f"multidoc_qa-{limit}-{idx}", task="multidoc_qa", target_len=limit, prompt=prompt,
              answer=answers[target], n_docs=fitted, target_doc=target + 1, fact=QA_FACTS[facts[target]][2])


def check_build(tasks, xsum) -> None:
  """The --build sets are known and the XSum file exists (checked before the model loads)."""
  unknown = set(tasks) - set(TASKS)
  if unknown:
    raise HdjaxError(f"unknown --build set(s) {sorted(unknown)}; known: {', '.join(TASKS)}")
  if not os.path.isfile(xsum):
    raise HdjaxError(f"file not found: {xsum} (--xsum, needed by --build)")


def build_sets(lm, tasks, lengths, num, xsum, seed) -> list[dict]:
  articles = _articles(xsum)
  rows = []
  for task in tasks:
    for limit in lengths:
      rng = random.Random(f"{seed}-{task}-{limit}")
      make = dict(passkey=build_passkey, multidoc=build_multidoc, multidoc_qa=build_multidoc_qa)[task]
      rows += [make(lm, articles, limit, rng, i) for i in range(num)]
  return rows


def _rouge_l(a: str, b: str) -> float:
  from rouge_score import rouge_scorer  # pylint: disable=import-outside-toplevel
  return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(a, b)["rougeL"].fmeasure


def passkey_correct(text: str, answer: str) -> bool:
  found = re.findall(r"\d{5}", text.replace(",", ""))
  return bool(found) and found[0] == answer


def _normalize(text: str) -> str:
  return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower().replace(",", "")).split())


def qa_correct(text: str, answer: str) -> bool:
  """The normalized answer (lower case, punctuation and thousands separators dropped) appears as whole words in
  the normalized first line of the response."""
  first = next((ln for ln in text.splitlines() if ln.strip()), "")
  return f" {_normalize(answer)} " in f" {_normalize(first)} "


def answer_correct(text: str, prompt: dict) -> bool:
  """Scores a response by its prompt's task: multidoc_qa by `qa_correct`, anything else with an answer as a
  passkey."""
  if prompt.get("task") == "multidoc_qa":
    return qa_correct(text, prompt["answer"])
  return passkey_correct(text, prompt["answer"])


def parse_method(spec: str) -> tuple[str, dict]:
  """'lazy@3-6:0.5-0.3' -> ('lazy', {prune_layers: (3, 6), keep_ratios: (0.5, 0.3)}); optional ':wW', ':pP',
  ':sS', ':kK', ':eE', ':bB' and ':rR' set score_window, score_pool, score_skip, keep_sinks, reselect_every,
  revive_budget and revive (0 or 1) ('lazy@16:0.5:w16:p7:s6:k32', 'lazy+hd@14:0.1:e8:b4'); plain names pass
  through."""
  name, _, schedule = spec.partition("@")
  if not schedule:
    return name, {}
  names = {"w": "score_window", "p": "score_pool", "s": "score_skip", "k": "keep_sinks", "e": "reselect_every",
           "b": "revive_budget", "r": "revive"}
  try:
    layers, ratios, *extras = schedule.split(":")
    opts = dict(prune_layers=tuple(int(x) for x in layers.split("-")),
                keep_ratios=tuple(float(x) for x in ratios.split("-")))
    for extra in extras:
      opts[names[extra[0]]] = int(extra[1:])
    if opts.get("revive", 1) not in (0, 1):
      raise ValueError
    if "revive" in opts:
      opts["revive"] = bool(opts["revive"])
  except (ValueError, KeyError, IndexError):
    raise HdjaxError(f"bad schedule in method {spec!r}: want "
                     f"NAME@L1-L2-...:R1-R2-...[:wW][:pP][:sS][:kK][:eE][:bB][:r0|:r1]") from None
  return name, opts


def _median(xs):
  return statistics.median(xs) if xs else None


def summarize(rows_by_method: dict[str, list[dict]], prompts: list[dict], hf_ttft: dict | None = None) -> dict:
  """Per method and prompt group: medians, speedups against the first method (and, given HF transformers' full
  prefill TTFT per prompt id, against it), agreement and accuracy."""
  base = list(rows_by_method)[0]
  base_by_id = {r["id"]: r for r in rows_by_method[base]}
  meta = {p["id"]: p for p in prompts}
  out = {}
  for method, rows in rows_by_method.items():
    groups = collections.defaultdict(list)
    for r in rows:
      p = meta[r["id"]]
      groups[f"{p.get('task', 'prompts')}@{p.get('target_len', 'any')}"].append(r)
    per = {}
    for name, rs in sorted(groups.items()):
      g = dict(n=len(rs), prompt_tokens=_median([r["prompt_tokens"] for r in rs]),
               ttft_s=_median([r["ttft_s"] for r in rs]), total_s=_median([r["total_s"] for r in rs]),
               computed_fraction_prefill=statistics.fmean(r.get("computed_fraction_prefill", 1.0) for r in rs),
               fallback=sum(bool(r.get("lazy_fallback")) for r in rs),
               ttft_speedup_vs_base=_median([base_by_id[r["id"]]["ttft_s"] / r["ttft_s"] for r in rs]),
               total_speedup_vs_base=_median([base_by_id[r["id"]]["total_s"] / r["total_s"] for r in rs]),
               first_token_agreement=statistics.fmean(
                   float(r["token_ids"][:1] == base_by_id[r["id"]]["token_ids"][:1]) for r in rs),
               rougeL_vs_base=statistics.fmean(_rouge_l(base_by_id[r["id"]]["text"], r["text"]) for r in rs))
      if hf_ttft:
        g["ttft_speedup_vs_hf"] = _median([hf_ttft[r["id"]] / r["ttft_s"] for r in rs])
      scored = [r for r in rs if "answer" in meta[r["id"]]]
      if scored:
        name_acc = "qa_accuracy" if meta[scored[0]["id"]].get("task") == "multidoc_qa" else "passkey_accuracy"
        g[name_acc] = statistics.fmean(float(answer_correct(r["text"], meta[r["id"]])) for r in scored)
        g["correct"] = sum(answer_correct(r["text"], meta[r["id"]]) for r in scored)
      if any("reference" in meta[r["id"]] for r in rs):
        g["rougeL_vs_reference"] = statistics.fmean(_rouge_l(meta[r["id"]]["reference"], r["text"]) for r in rs)
      per[name] = g
    out[method] = per
  return dict(base=base, methods=out)


def accuracy_table(summary: dict) -> str:
  """A markdown table, one row per method: per prompt group the answers found (passkey, QA), first tokens equal
  to the base method's, and the mean fraction of prompt token-layers computed (a load-independent proxy for
  prefill cost); TTFT speedups against the base are medians and depend on machine load."""
  methods = summary["methods"]
  groups = sorted({g for per in methods.values() for g in per})
  head = ["method", "token-layers"] + [f"{g} {col}" for g in groups for col in ("correct", "first token =",
                                                                                 "TTFT vs base")]
  lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  for method, per in methods.items():
    n_all = sum(g["n"] for g in per.values())
    frac = sum(g["computed_fraction_prefill"] * g["n"] for g in per.values()) / max(n_all, 1)
    cells = [method, f"{frac:.3f}"]
    for name in groups:
      g = per.get(name)
      if g is None:
        cells += ["", "", ""]
        continue
      cells += [f"{g['correct']}/{g['n']}" if "correct" in g else "-",
                f"{round(g['first_token_agreement'] * g['n'])}/{g['n']}", f"{g['ttft_speedup_vs_base']:.2f}x"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(rows_by_method: dict[str, list[dict]], path: str) -> None:
  plt = common.pyplot(path)
  if plt is None:
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for method, rows in rows_by_method.items():
    pts = sorted((r["prompt_tokens"], r["ttft_s"]) for r in rows)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=method, markersize=3)
  ax.set_xlabel("prompt tokens")
  ax.set_ylabel("TTFT (s)")
  ax.set_title("SmolLM2-135M fp32, CPU: time to first token")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def pareto_points(rows_by_method: dict[str, list[dict]], prompts: list[dict]) -> list[dict]:
  """One point per method and prompt length (`target_len`): the median over that length's prompts of the TTFT
  speedup against the first (base) method, the passkey and QA answers found, the first tokens equal to the
  base's, and the mean fraction of prompt token-layers computed. `within_rule`: answers within one prompt of the
  base on each task and first-token agreement >= 95% (issue 16's accuracy rule); `frontier`: no other point at
  that length is at least as fast and finds at least as many answers, one of them strictly."""
  base = list(rows_by_method)[0]
  meta = {p["id"]: p for p in prompts}
  base_by_id = {r["id"]: r for r in rows_by_method[base]}
  points = []
  for method, rows in rows_by_method.items():
    by_len = collections.defaultdict(list)
    for r in rows:
      by_len[meta[r["id"]].get("target_len", "any")].append(r)
    for length, rs in sorted(by_len.items(), key=lambda kv: str(kv[0])):
      pt = dict(method=method, length=length, n=len(rs),
                ttft_speedup=_median([base_by_id[r["id"]]["ttft_s"] / r["ttft_s"] for r in rs]),
                token_layers=statistics.fmean(r.get("computed_fraction_prefill", 1.0) for r in rs),
                first_token=sum(r["token_ids"][:1] == base_by_id[r["id"]]["token_ids"][:1] for r in rs))
      for task in ("passkey", "multidoc_qa"):
        scored = [r for r in rs if meta[r["id"]].get("task") == task and "answer" in meta[r["id"]]]
        pt[task] = sum(answer_correct(r["text"], meta[r["id"]]) for r in scored)
        pt[f"{task}_n"] = len(scored)
      points.append(pt)
  base_at = {p["length"]: p for p in points if p["method"] == base}
  for p in points:
    b = base_at[p["length"]]
    p["found"] = p["passkey"] + p["multidoc_qa"]
    p["within_rule"] = (p["passkey"] >= b["passkey"] - 1 and p["multidoc_qa"] >= b["multidoc_qa"] - 1
                        and p["first_token"] >= 0.95 * p["n"])
  for p in points:
    rivals = [q for q in points if q["length"] == p["length"] and q is not p]
    p["frontier"] = not any(q["ttft_speedup"] >= p["ttft_speedup"] and q["found"] >= p["found"]
                            and (q["ttft_speedup"], q["found"]) != (p["ttft_speedup"], p["found"]) for q in rivals)
  return points


def pareto_choice(points: list[dict], length, target: float) -> dict:
  """At one length: the fastest non-base point within the accuracy rule (`chosen`), and the most accurate point
  at `target` speedup or more (`best_at_target`, ties to the faster); None where there is none."""
  base = points[0]["method"]
  at = [p for p in points if p["length"] == length and p["method"] != base]
  within = [p for p in at if p["within_rule"]]
  fast = [p for p in at if p["ttft_speedup"] >= target]
  return dict(chosen=max(within, key=lambda p: p["ttft_speedup"])["method"] if within else None,
              best_at_target=max(fast, key=lambda p: (p["found"], p["ttft_speedup"]))["method"] if fast else None)


def pareto_table(points: list[dict], target: float) -> str:
  """Markdown, one table per prompt length: each method's point, whether it is within the accuracy rule and on
  the frontier, then the choice."""
  out = []
  for length in sorted({p["length"] for p in points}, key=str):
    at = [p for p in points if p["length"] == length]
    out += [f"### {length} tokens", "",
            "| schedule | token-layers | TTFT speedup | passkey | QA exact match | first token = base | within rule "
            "| frontier |", "|---|---|---|---|---|---|---|---|"]
    for p in sorted(at, key=lambda p: -p["ttft_speedup"]):
      out.append(f"| {p['method']} | {p['token_layers']:.3f} | {p['ttft_speedup']:.2f}x | "
                 f"{p['passkey']}/{p['passkey_n']} | {p['multidoc_qa']}/{p['multidoc_qa_n']} | "
                 f"{p['first_token']}/{p['n']} | {'yes' if p['within_rule'] else 'no'} | "
                 f"{'yes' if p['frontier'] else ''} |")
    choice = pareto_choice(points, length, target)
    out += ["", f"Fastest within the rule: {choice['chosen'] or 'none'}; most answers at >= {target:g}x: "
            f"{choice['best_at_target'] or 'none'}.", ""]
  return "\n".join(out)


def plot_pareto(points: list[dict], path: str, target: float) -> None:
  """Per prompt length, TTFT speedup (x) against the fraction of answers found and of first tokens equal to the
  base's (y); the base (full prefill) is a star, the frontier a line, `target` a dotted vertical."""
  plt = common.pyplot(path)
  if plt is None:
    return
  lengths = sorted({p["length"] for p in points}, key=str)
  base = points[0]["method"]
  fig, axes = plt.subplots(2, len(lengths), figsize=(5.5 * len(lengths), 7), squeeze=False)
  for col, length in enumerate(lengths):
    at = sorted((p for p in points if p["length"] == length), key=lambda p: p["ttft_speedup"])
    for row, (label, y_of) in enumerate((
        ("answers found (passkey + QA)", lambda p: p["found"] / max(p["passkey_n"] + p["multidoc_qa_n"], 1)),
        ("first token = full prefill", lambda p: p["first_token"] / p["n"]))):
      ax = axes[row][col]
      for p in at:
        is_base = p["method"] == base
        ax.plot(p["ttft_speedup"], y_of(p), "*" if is_base else "o", markersize=12 if is_base else 6,
                color="black" if is_base else ("tab:green" if p["within_rule"] else "tab:red"))
        if row == 0:
          ax.annotate(p["method"].replace("lazy@", "@"), (p["ttft_speedup"], y_of(p)), fontsize=6,
                      xytext=(3, 3), textcoords="offset points")
      if row == 0:
        front = [p for p in at if p["frontier"]]
        ax.plot([p["ttft_speedup"] for p in front], [y_of(p) for p in front], "-", color="tab:blue", alpha=0.5)
      ax.axvline(target, linestyle=":", color="gray")
      ax.set_xlabel(f"TTFT speedup vs {base} (median)")
      ax.set_ylabel(label)
      ax.set_ylim(-0.05, 1.05)
      ax.set_title(f"{length} tokens: green = within one prompt of {base}")
  fig.suptitle("SmolLM2-135M fp32, CPU: LazyLLM schedules")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
