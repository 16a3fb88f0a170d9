"""The main job (`make run`): what hdjax does, in one screen.

Four stages, each one of the project's launchers run as a subprocess (its full output goes to a log file; the
terminal shows one progress line per stage), then one table:

  1. Spec-Bench: 12 questions (2 per category), first turns, 128 new tokens, greedy: ar, pld, hd, adadecode,
     hd+adadecode in one process, interleaved per question; speedup over ar, tau, identical outputs;
  2. the baseline: hdjax ar against HF transformers on the same GGUF weights (decode B = 1 and 8, prefill 512);
  3. LazyLLM long context: one passkey and one multi-document QA prompt of ~2k tokens, full prefill vs lazy,
     TTFT against ours and HF's full prefill, answers found;
  4. batched decoding: hd against batched ar at B = 1, 4, 8.

Each stage's line shows its compile time apart from its timed work where the launcher reports it
(`summary["compile"]`). Runs as `python -m experiments.main` from the repository root (what `make run` does) or
as `python experiments/main.py` from anywhere; `--stages` picks stages, `--budget=tiny` is the tests' smoke size.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import re
import sys

if __package__ in (None, ""):  # started as `python experiments/X.py`: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import subprocess
import time
from typing import Any, Sequence

from absl import flags
import tqdm

from experiments.common import SPEC_BENCH_QUESTIONS, check_output_dir, run_main
from hdjax.errors import HdjaxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("specbench", "baseline", "longctx", "batch")
SPECBENCH_METHODS = "ar,pld,hd,adadecode,hd+adadecode"

_OUT = flags.DEFINE_string("out_dir", "results", "Where every stage writes its outputs (and logs/).")
_STAGES = flags.DEFINE_list("stages", list(STAGES), f"Stages to run, in this order: {', '.join(STAGES)}.")
_BUDGET = flags.DEFINE_enum("budget", "default", ["default", "tiny"],
                            "default: the settings of `make run`; tiny: seconds of work per stage (a smoke test).")
_QUESTIONS = flags.DEFINE_string("questions", SPEC_BENCH_QUESTIONS,
                                 "Spec-Bench question file (the Spec-Bench and batched stages).")


@dataclasses.dataclass(frozen=True)
class Stage:
  key: str
  title: str         # what the progress line says
  argv: list[str]    # python -m <argv>
  progress: str = ""  # a regex matching one line of the launcher's output per unit of timed work
  units: int = 0     # how many such lines the stage prints


def stages(out_dir: str, budget: str, questions: str) -> list[Stage]:
  """Every stage's launcher command. The defaults are sized for ~15 minutes on a 2-core AVX2 CPU, setup included:
  the Spec-Bench stage dominates (its 12 first turns have 5 prompt shapes to compile per method, then 12 x 128
  tokens per method)."""
  tiny = budget == "tiny"
  methods = "ar,pld" if tiny else SPECBENCH_METHODS
  limit, subset, new = ("2", "first", "8") if tiny else ("2", "stratified", "128")
  num_questions = 2 if tiny else 12
  decode_batches, prefill = ("1", "64") if tiny else ("1,8", "512")
  sets, length = ("passkey", "256") if tiny else ("passkey,multidoc_qa", "2048")
  batches = "1,2" if tiny else "1,4,8"
  return [
      Stage("specbench", f"Spec-Bench: {num_questions} questions, first turns, {new} new tokens, {methods}",
            ["experiments.specbench", f"--questions={questions}", f"--methods={methods}", f"--limit={limit}",
             f"--subset={subset}", "--max_turns=1", f"--max_new_tokens={new}", f"--out_dir={out_dir}/specbench"],
            progress=r"^\S+ \S+ q\S+: \d+ tokens", units=num_questions * len(methods.split(","))),
      Stage("baseline", f"hdjax ar vs HF transformers on the same weights: decode B={decode_batches}, "
                        f"prefill {prefill} tokens",
            ["experiments.bench_decode", "--repeats=1", f"--new_tokens={'4' if tiny else '64'}",
             f"--prefill_lengths={prefill}", f"--batches={decode_batches}", *(["--nohf"] if tiny else []),
             f"--out={out_dir}/bench_decode.json"]),
      Stage("longctx", f"LazyLLM long context: {sets.replace(',', ' + ')} at ~{length} tokens, full prefill vs lazy",
            ["experiments.longctx", f"--build={sets}", f"--lengths={length}", "--num=1", "--methods=full,lazy",
             f"--max_new_tokens={'4' if tiny else '16'}", *([] if tiny else ["--hf"]),
             f"--out_dir={out_dir}/longctx"],
            progress=r"^\S+ full=", units=len(sets.split(","))),
      Stage("batch", f"batched decoding: hd vs batched ar at B = {batches.replace(',', ', ')}, short prompts",
            ["experiments.bench_batch", f"--questions={questions}", f"--batches={batches}", "--methods=hd",
             "--categories=mt_bench,qa,math_reasoning", f"--max_new_tokens={'8' if tiny else '32'}",
             f"--out={out_dir}/bench_batch.json"],
            progress=r"^B=", units=2 * len(batches.split(","))),
  ]


def _load(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


def _duration(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def compile_note(summary: dict[str, Any]) -> tuple[float | None, str]:
  """Compile seconds and a per-method note from a launcher's `summary["compile"]` ({method: {programs, seconds,
  cache_hits}}), when the launcher reports it."""
  per = summary.get("compile") if isinstance(summary, dict) else None
  if not isinstance(per, dict) or not per:
    return None, ""
  total, parts = 0.0, []
  for method, c in per.items():
    if not isinstance(c, dict) or "seconds" not in c:
      continue
    total += float(c["seconds"])
    hits = f", {c['cache_hits']} from the cache" if c.get("cache_hits") else ""
    parts.append(f"{method} {c['seconds']:.0f}s ({c.get('programs', '?')} compiled{hits})")
  return (total, "; ".join(parts)) if parts else (None, "")


def stage_timing(key: str, out_dir: str) -> tuple[float | None, float | None, str]:
  """(compile seconds, timed seconds, per-method compile note) of a finished stage, from its outputs."""
  try:
    if key == "specbench":
      summary = _load(f"{out_dir}/specbench/summary.json")
      timed = sum(sum(r["choices"][0]["wall_time"]) for m in summary["methods"]
                  for r in _read_jsonl(f"{out_dir}/specbench/{m}.jsonl"))
    elif key == "longctx":
      summary = _load(f"{out_dir}/longctx/summary.json")
      timed = sum(r["total_s"] for m in summary["methods"] for r in _read_jsonl(f"{out_dir}/longctx/{m}.jsonl"))
    elif key == "batch":
      summary = _load(f"{out_dir}/bench_batch.json")
      timed = sum(r["decode_s"] for r in summary["rows"]) * summary.get("repeats", 1)
    else:
      summary, timed = _load(f"{out_dir}/bench_decode.json"), None
  except (OSError, KeyError, TypeError, ValueError):
    return None, None, ""
  seconds, note = compile_note(summary)
  return seconds, timed, note


def run_stage(stage: Stage, log_path: str, env: dict[str, str], tty: bool) -> tuple[int, float]:
  """Runs the stage's launcher with its output in `log_path`; returns (exit status, seconds)."""
  pattern = re.compile(stage.progress) if stage.progress else None
  start = time.perf_counter()
  bar = tqdm.tqdm(total=stage.units or None, disable=not tty, leave=False, dynamic_ncols=True, mininterval=0,
                  bar_format="  {bar:20}| {n_fmt}/{total_fmt} {elapsed}  {postfix}" if stage.units else
                  "  {elapsed}  {postfix}")
  with open(log_path, "w", encoding="utf-8") as log, bar:
    proc = subprocess.Popen([sys.executable, "-m", *stage.argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=ROOT, bufsize=1)
    assert proc.stdout is not None
    for line in proc.stdout:
      log.write(line)
      log.flush()
      if line.strip():  # the launcher's last line beside the bar
        bar.set_postfix_str(line.strip(), refresh=False)
      bar.update(bool(pattern and pattern.search(line)))
    status = proc.wait()
  return status, time.perf_counter() - start


def _count(rate: float | None, n: int) -> str:
  return "-" if rate is None else f"{round(rate * n)}/{n}"


def report(out_dir: str, keys: Sequence[str] = STAGES) -> list[str]:
  """The closing table: one line per method and figure, read from the files each stage's launcher wrote."""
  head = f"{'stage':24s} {'method':13s} {'speedup':20s} {'tau':>5s}  {'identical':10s} vs HF transformers"
  lines = [head, "-" * len(head)]
  hf_decode = ""
  if "baseline" in keys:
    rows = _load(f"{out_dir}/bench_decode.json")["rows"]
    for r in rows:
      if r["hf_tps"] == r["hf_tps"] and r["hf_tps"]:  # HF measured (not NaN)
        if r["kind"] == "decode" and r["size"] == 1:
          hf_decode = f"{r['hdjax_tps'] / r['hf_tps']:.2f}x greedy (B=1, fp32)"
  if "specbench" in keys:
    summary = _load(f"{out_dir}/specbench/summary.json")
    dtype = summary.get("settings", {}).get("dtype", "")
    stage = f"Spec-Bench ({dtype})" if dtype else "Spec-Bench"
    for method, cats in summary["methods"].items():
      o = cats["overall"]
      n = o.get("questions", 0)
      if method == "ar":
        speed, same, vs_hf = f"1.00x ({o['tokens_per_s']:.1f} tok/s)", "reference", hf_decode or "-"
      else:
        speed, same, vs_hf = f"{o.get('speedup', float('nan')):.2f}x", _count(o.get("identical_rate"), n), "-"
      lines.append(f"{stage:24s} {method:13s} {speed:20s} {o['tau']:5.2f}  {same:10s} {vs_hf}")
  if "baseline" in keys:
    for r in _load(f"{out_dir}/bench_decode.json")["rows"]:
      what = f"decode B={r['size']}" if r["kind"] == "decode" else f"prefill {r['size']}"
      ratio = (f"{r['hdjax_tps'] / r['hf_tps']:.2f}x ({r['hdjax_tps']:.0f} vs {r['hf_tps']:.0f} tok/s)"
               if r["hf_tps"] == r["hf_tps"] and r["hf_tps"] else "not measured")
      lines.append(f"{'baseline (fp32)':24s} {'ar':13s} {what:20s} {'':5s}  {'':10s} {ratio}")
  if "longctx" in keys:
    summary = _load(f"{out_dir}/longctx/summary.json")
    base = summary.get("base", "full")
    for method, groups in summary["methods"].items():
      if method == base:
        continue
      for name, g in groups.items():
        task, _, length = name.partition("@")
        found = g.get("correct")
        base_found = summary["methods"].get(base, {}).get(name, {}).get("correct")
        notes = [f"TTFT {g['ttft_speedup_vs_hf']:.2f}x HF prefill"] if g.get("ttft_speedup_vs_hf") else []
        if found is not None:
          notes.append(f"answers {found}/{g['n']} (full {base_found}/{g['n']})")
        vs_hf = "; ".join(notes) or "-"
        lines.append(f"{'long ctx ' + task + ' ' + length:24s} {method:13s} "
                     f"{'TTFT ' + format(g['ttft_speedup_vs_base'], '.2f') + 'x vs full':20s} {'-':>5s}  "
                     f"{'1st tok ' + _count(g['first_token_agreement'], g['n']):10s} {vs_hf}")
  if "batch" in keys:
    batch = _load(f"{out_dir}/bench_batch.json")
    dtype = batch.get("dtype", "")
    for r in batch["rows"]:
      if r["method"] == "ar":
        continue
      ar_tps = r["tokens_per_s"] / r["throughput_vs_ar"]
      lines.append(f"{'batched B=' + str(r['batch']) + (' (' + dtype + ')' if dtype else ''):24s} {r['method']:13s} "
                   f"{format(r['throughput_vs_ar'], '.2f') + 'x (ar ' + format(ar_tps, '.0f') + ' tok/s)':20s} "
                   f"{r.get('tau', 1.0):5.2f}  {_count(r.get('identical_to_ar'), r['batch']):10s} -")
  return lines


def plots(out_dir: str) -> list[str]:
  candidates = ["specbench/speedup.png", "specbench/accept_lengths.png", "longctx/ttft.png", "bench_batch.png"]
  return [os.path.join(out_dir, p) for p in candidates if os.path.isfile(os.path.join(out_dir, p))]


def host_line(out_dir: str) -> str:
  """The machine (as `experiments.common.device_name` writes it), the commit and the date."""
  device = ""
  for path, get in ((f"{out_dir}/specbench/summary.json", lambda s: s.get("settings", {}).get("device")),
                    (f"{out_dir}/bench_batch.json", lambda s: s.get("device"))):
    if os.path.isfile(path) and not device:
      device = get(_load(path)) or ""
  if not device:
    from experiments.common import device_name  # pylint: disable=import-outside-toplevel  (imports jax)
    device = device_name()
  return f"host: {device} | commit {commit()} | {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"


def commit() -> str:
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                          check=True, timeout=10).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True,
                           text=True, check=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"
  return head + (" + local changes" if dirty else "")


def main(argv):
  del argv
  keys = [k.strip() for k in _STAGES.value if k.strip()]
  unknown = [k for k in keys if k not in STAGES]
  if unknown or not keys:
    raise HdjaxError(f"--stages takes some of {', '.join(STAGES)}; got {','.join(_STAGES.value)!r}")
  out_dir = _OUT.value
  check_output_dir(out_dir)
  os.makedirs(os.path.join(out_dir, "logs"), exist_ok=True)
  if {"specbench", "batch"} & set(keys) and not os.path.isfile(_QUESTIONS.value):
    raise HdjaxError(f"question file not found: {_QUESTIONS.value} (--questions)")
  chosen = [s for s in stages(out_dir, _BUDGET.value, _QUESTIONS.value) if s.key in keys]
  env = dict(os.environ, PYTHONUNBUFFERED="1",
             PYTHONPATH=os.pathsep.join(filter(None, (ROOT, os.environ.get("PYTHONPATH")))))
  tty = sys.stdout.isatty()
  started = time.perf_counter()
  print(f"hdjax main job: {len(chosen)} stages on the embedded SmolLM2-135M-Instruct; full logs in {out_dir}/logs/",
        flush=True)
  for i, stage in enumerate(chosen, 1):
    log_path = os.path.join(out_dir, "logs", f"{stage.key}.log")
    print(f"\n[{i}/{len(chosen)}] {stage.title}\n      python -m {' '.join(stage.argv)}", flush=True)
    status, seconds = run_stage(stage, log_path, env, tty)
    if status:
      with open(log_path, encoding="utf-8") as f:
        tail = f.readlines()[-15:]
      print("".join("      | " + line for line in tail), end="")
      raise HdjaxError(f"stage '{stage.key}' failed with exit status {status} (log: {log_path})")
    compile_s, timed_s, note = stage_timing(stage.key, out_dir)
    parts = []
    if compile_s is not None:
      parts.append(f"compile {_duration(compile_s)}")
    if timed_s is not None:
      parts.append(f"timed work {_duration(timed_s)}")
    if compile_s is not None or timed_s is not None:
      other = seconds - (compile_s or 0.0) - (timed_s or 0.0)
      parts.append(f"{'load and warm-up' if compile_s is None else 'load and the rest'} {_duration(max(other, 0))}")
    print(f"      done in {_duration(seconds)}" + (f": {', '.join(parts)}" if parts else ""), flush=True)
    if note:
      print(f"      compile per method: {note}", flush=True)
  print(f"\n{host_line(out_dir)}")
  print("\n".join(report(out_dir, keys)))
  print("\nspeedup: per-question tokens/s over ar's in the same run, after warm-up; identical: outputs with ar's "
        "exact token ids")
  written = plots(out_dir)
  if written:
    print("plots: " + ", ".join(written))
  print(f"main job done in {_duration(time.perf_counter() - started)}; outputs in {out_dir}/")


if __name__ == "__main__":
  run_main(main)
