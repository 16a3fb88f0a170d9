"""The main job (`make run`): a streamed demo on the embedded SmolLM2, the baseline decode benchmark, a quick
stratified Spec-Bench subset (ar, pld, hd, adadecode) and a quick long-context set (full, lazy).

Each stage is one of the project's launchers, run as a subprocess so its flags and outputs are the documented
ones; results land under --out_dir.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

from absl import flags

from experiments.common import run_main
from hdjax.errors import HdjaxError

_OUT = flags.DEFINE_string("out_dir", "results", "Where every stage writes its outputs.")
_QUICK = flags.DEFINE_bool("quick", True, "Small budgets so the whole job fits in ~15 minutes on 2 CPU cores.")


def stages(out_dir: str, quick: bool) -> list[tuple[str, list[str]]]:
  bench = (["--repeats=1", "--new_tokens=128", "--prefill_lengths=512"] if quick
           else ["--repeats=3", "--new_tokens=256", "--prefill_lengths=512,2048"])
  per_category, new_tokens = ("1", "64") if quick else ("20", "256")
  lengths, num = ("4096", "1") if quick else ("2048,4096,7500", "8")
  return [
      ("demo", ["experiments.generate", "--prompt=Explain in three sentences why the sky is blue.",
                "--max_new_tokens=96"]),
      ("baseline decode benchmark", ["experiments.bench_decode", *bench, f"--out={out_dir}/bench_decode.json"]),
      ("Spec-Bench subset", ["experiments.specbench", "--methods=ar,pld,hd,adadecode", f"--limit={per_category}",
                             "--subset=stratified", f"--max_new_tokens={new_tokens}", f"--out_dir={out_dir}/specbench"]),
      ("long-context subset", ["experiments.longctx", "--build=passkey,multidoc", f"--lengths={lengths}",
                               f"--num={num}", "--methods=full,lazy", "--max_new_tokens=32",
                               f"--out_dir={out_dir}/longctx"]),
  ]


def main(argv):
  del argv
  os.makedirs(_OUT.value, exist_ok=True)
  started = time.perf_counter()
  for title, cmd in stages(_OUT.value, _QUICK.value):
    print(f"\n=== {title}: python -m {' '.join(cmd)}", flush=True)
    proc = subprocess.run([sys.executable, "-m", *cmd], check=False)
    if proc.returncode:
      raise HdjaxError(f"stage '{title}' failed with exit status {proc.returncode}")
  print(f"\nmain job done in {time.perf_counter() - started:.0f} s; outputs in {_OUT.value}/")


if __name__ == "__main__":
  run_main(main)
