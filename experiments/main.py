"""The main job (`make run`): a streamed demo on the embedded SmolLM2, the baseline decode benchmark, a quick
stratified Spec-Bench subset (ar, pld, hd, adadecode, hd+adadecode), a quick long-context set (full, lazy,
lazy+hd) and batched throughput (ar, hd at B = 1, 4, 8), then one compact table of the headline figures.

Each stage is one of the project's launchers, run as a subprocess so its flags and outputs are the documented
ones; results land under --out_dir. Runs as `python -m experiments.main` from the repository root (what `make run`
does) or as `python experiments/main.py` from anywhere.
"""

from __future__ import annotations

import json
import os
import sys

if __package__ in (None, ""):  # started as `python experiments/X.py`: make the repository importable
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import subprocess
import time

from absl import flags

from experiments.common import check_output_dir, run_main
from hdjax.errors import HdjaxError

_OUT = flags.DEFINE_string("out_dir", "results", "Where every stage writes its outputs.")
_QUICK = flags.DEFINE_bool("quick", True, "Small budgets so the whole job fits in ~15 minutes on 2 CPU cores.")


def stages(out_dir: str, quick: bool) -> list[tuple[str, list[str]]]:
  bench = (["--repeats=1", "--new_tokens=64", "--prefill_lengths=512"] if quick
           else ["--repeats=3", "--new_tokens=256", "--prefill_lengths=512,2048"])
  per_category, new_tokens = ("1", "32") if quick else ("20", "256")
  lengths, num = ("2048", "1") if quick else ("2048,4096,7500", "8")
  return [
      ("demo", ["experiments.generate", "--prompt=Explain in three sentences why the sky is blue.",
                "--max_new_tokens=96"]),
      ("baseline decode benchmark", ["experiments.bench_decode", *bench, f"--out={out_dir}/bench_decode.json"]),
      ("Spec-Bench subset", ["experiments.specbench", "--methods=ar,pld,hd,adadecode,hd+adadecode",
                             f"--limit={per_category}", "--subset=stratified", f"--max_new_tokens={new_tokens}",
                             f"--out_dir={out_dir}/specbench"]),
      ("long-context subset", ["experiments.longctx", "--build=passkey,multidoc", f"--lengths={lengths}",
                               f"--num={num}", "--methods=full,lazy,lazy+hd", "--max_new_tokens=32",
                               f"--out_dir={out_dir}/longctx"]),
      ("batched throughput", ["experiments.bench_batch", f"--batches={'1,4,8' if quick else '1,4,8,16'}",
                              "--methods=hd,adadecode", f"--max_new_tokens={'32' if quick else '128'}",
                              *(["--categories=mt_bench,qa,math_reasoning"] if quick else []),
                              f"--out={out_dir}/bench_batch.json"]),
  ]


def _load(path: str):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def report(out_dir: str) -> list[str]:
  """The headline figures of every stage, one line each."""
  lines = [f"{'stage':26s} {'method':14s} figures"]
  for r in _load(f"{out_dir}/bench_decode.json")["rows"]:
    lines.append(f"{'vs HF transformers':26s} {r['kind'] + ' ' + str(r['size']):14s} {r['hdjax_tps']:.1f} tok/s vs "
                 f"{r['hf_tps']:.1f} ({r['hdjax_tps'] / r['hf_tps']:.2f}x)")
  for method, cats in _load(f"{out_dir}/specbench/summary.json")["methods"].items():
    o = cats["overall"]
    lines.append(f"{'Spec-Bench subset':26s} {method:14s} speedup {o.get('speedup', 1.0):.2f}x  tau {o['tau']:.2f}  "
                 f"identical {o.get('identical_rate', 1.0):.0%}")
  for method, groups in _load(f"{out_dir}/longctx/summary.json")["methods"].items():
    for name, g in groups.items():
      acc = f"  passkey {g['passkey_accuracy']:.0%}" if "passkey_accuracy" in g else ""
      lines.append(f"{'long context ' + name:26s} {method:14s} TTFT {g['ttft_s']:.1f}s "
                   f"({g['ttft_speedup_vs_base']:.2f}x)  total {g['total_s']:.1f}s ({g['total_speedup_vs_base']:.2f}x)"
                   f"  computed {g['computed_fraction_prefill']:.2f}{acc}")
  for r in _load(f"{out_dir}/bench_batch.json")["rows"]:
    vs = f" ({r['throughput_vs_ar']:.2f}x ar, identical {r['identical_to_ar']:.0%})" if r["method"] != "ar" else ""
    lines.append(f"{'batched B=' + str(r['batch']):26s} {r['method']:14s} {r['tokens_per_s']:.1f} tok/s{vs}")
  return lines


def main(argv):
  del argv
  check_output_dir(_OUT.value)
  started = time.perf_counter()
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))))
  for title, cmd in stages(_OUT.value, _QUICK.value):
    print(f"\n=== {title}: python -m {' '.join(cmd)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", *cmd], check=False, env=env)
    if proc.returncode:
      raise HdjaxError(f"stage '{title}' failed with exit status {proc.returncode}")
  print("\n" + "\n".join(report(_OUT.value)))
  print(f"\nmain job done in {time.perf_counter() - started:.0f} s; outputs in {_OUT.value}/")


if __name__ == "__main__":
  run_main(main)
