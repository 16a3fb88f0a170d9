"""The main job (`make run`): its stages' settings, its progress runner and its closing table, which reads the files
the launchers write; one slow test runs the whole job at the tiny budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from experiments import main as main_job

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write(path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj))


def _write_jsonl(path, rows):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fake_outputs(tmp_path, with_compile: bool):
  _write(tmp_path / "bench_decode.json", dict(rows=[dict(kind="prefill", size=512, hdjax_tps=300.0, hf_tps=400.0),
                                                    dict(kind="decode", size=1, hdjax_tps=12.0, hf_tps=10.0)]))
  summary = dict(methods=dict(ar=dict(overall=dict(tau=1.0, tokens_per_s=20.0, questions=12)),
                              hd=dict(overall=dict(speedup=1.5, tau=2.0, identical_rate=1.0, questions=12,
                                                   tokens_per_s=30.0))),
                 settings=dict(dtype="float32", device="cpu x1 (cpu: Test CPU, 2 cores, no bf16 units)"))
  if with_compile:
    summary["compile"] = dict(ar=dict(programs=3, seconds=10.0, cache_hits=0),
                              hd=dict(programs=4, seconds=20.0, cache_hits=2))
  _write(tmp_path / "specbench/summary.json", summary)
  for method in ("ar", "hd"):
    _write_jsonl(tmp_path / f"specbench/{method}.jsonl", [dict(choices=[dict(wall_time=[2.0])])] * 12)
  group = dict(n=2, ttft_s=2.0, ttft_speedup_vs_base=3.0, total_s=4.0, total_speedup_vs_base=2.5,
               computed_fraction_prefill=0.4, first_token_agreement=1.0, correct=2, ttft_speedup_vs_hf=4.5)
  _write(tmp_path / "longctx/summary.json",
         dict(base="full", methods={"full": {"passkey@2048": dict(group, correct=1)}, "lazy": {"passkey@2048": group}}))
  for method in ("full", "lazy"):
    _write_jsonl(tmp_path / f"longctx/{method}.jsonl", [dict(total_s=3.0)] * 2)
  _write(tmp_path / "bench_batch.json",
         dict(dtype="float32", device="x", repeats=1,
              rows=[dict(method="ar", batch=8, tokens_per_s=30.0, decode_s=5.0),
                    dict(method="hd", batch=8, tokens_per_s=45.0, decode_s=4.0, throughput_vs_ar=1.5, tau=1.6,
                         identical_to_ar=1.0)]))


def test_default_stages_are_the_settings_where_each_method_can_show_its_gain(tmp_path):
  by_key = {s.key: s for s in main_job.stages(str(tmp_path), "default", "Q")}
  assert list(by_key) == list(main_job.STAGES)
  spec = by_key["specbench"].argv
  for flag in ("--methods=ar,pld,hd,adadecode,hd+adadecode", "--limit=2", "--subset=stratified", "--max_turns=1",
               "--max_new_tokens=128", "--questions=Q"):
    assert flag in spec
  assert by_key["specbench"].units == 12 * 5
  assert "--hf" in by_key["longctx"].argv and "--methods=full,lazy" in by_key["longctx"].argv
  assert "--batches=1,4,8" in by_key["batch"].argv
  for stage in by_key.values():  # every stage writes under the job's output directory
    assert any(a.startswith(("--out=", "--out_dir=")) and str(tmp_path) in a for a in stage.argv)


def test_report_has_one_line_per_figure(tmp_path):
  _fake_outputs(tmp_path, with_compile=False)
  lines = main_job.report(str(tmp_path))
  body = lines[2:]
  assert len(body) == 2 + 2 + 1 + 1  # Spec-Bench ar, hd; baseline prefill, decode; lazy; batched hd
  assert "1.00x (20.0 tok/s)" in body[0] and "1.20x greedy (B=1, fp32)" in body[0]
  assert "1.50x" in body[1] and "12/12" in body[1] and "2.00" in body[1] and "(float32)" in body[1]
  assert "0.75x" in body[2] and "1.20x (12 vs 10 tok/s)" in body[3]
  assert "TTFT 3.00x vs full" in body[4] and "TTFT 4.50x HF prefill" in body[4] and "answers 2/2 (full 1/2)" in body[4]
  assert "1.50x (ar 30 tok/s)" in body[5] and "8/8" in body[5] and "B=8" in body[5]


def test_report_reads_only_the_stages_asked(tmp_path):
  _fake_outputs(tmp_path, with_compile=False)
  (tmp_path / "bench_decode.json").unlink()
  lines = main_job.report(str(tmp_path), ["specbench"])
  assert len(lines) == 2 + 2 and lines[2].rstrip().endswith("-")  # no HF figure without the baseline stage
  with pytest.raises(FileNotFoundError):
    main_job.report(str(tmp_path))


@pytest.mark.parametrize("with_compile", [False, True])
def test_stage_timing_splits_compile_from_timed_work(tmp_path, with_compile):
  _fake_outputs(tmp_path, with_compile)
  compile_s, timed_s, note = main_job.stage_timing("specbench", str(tmp_path))
  assert timed_s == pytest.approx(2 * 12 * 2.0)
  if with_compile:
    assert compile_s == 30.0 and "ar 10s (3 compiled)" in note and "hd 20s (4 compiled, 2 from the cache)" in note
  else:
    assert compile_s is None and note == ""
  assert main_job.stage_timing("longctx", str(tmp_path))[1] == pytest.approx(12.0)
  assert main_job.stage_timing("batch", str(tmp_path))[1] == pytest.approx(9.0)
  assert main_job.stage_timing("baseline", str(tmp_path))[:2] == (None, None)
  assert main_job.stage_timing("specbench", str(tmp_path / "missing")) == (None, None, "")


def test_compile_note_ignores_what_it_cannot_read():
  assert main_job.compile_note({}) == (None, "")
  assert main_job.compile_note(dict(compile="n/a")) == (None, "")
  assert main_job.compile_note(dict(compile=dict(ar=dict(programs=2)))) == (None, "")
  assert main_job.compile_note(dict(compile=dict(ar=dict(seconds=4.0)))) == (4.0, "ar 4s (? compiled)")


def test_run_stage_logs_everything_and_counts_progress_lines(tmp_path):
  data = tmp_path / "d.json"
  data.write_text(json.dumps(dict(a=1, b=2, c=3)))
  stage = main_job.Stage("x", "pretty-print", ["json.tool", str(data)], progress=r'^\s+"[ab]"', units=2)
  log = tmp_path / "x.log"
  status, seconds = main_job.run_stage(stage, str(log), dict(os.environ), tty=False)
  assert status == 0 and seconds > 0 and '"c": 3' in log.read_text()
  status, _ = main_job.run_stage(main_job.Stage("y", "fails", ["json.tool", str(tmp_path / "none.json")]),
                                 str(log), dict(os.environ), tty=False)
  assert status != 0 and "none.json" in log.read_text()


def test_progress_bar_counts_the_stage_units_on_a_terminal(tmp_path, capsys):
  """On a terminal the stage's bar (tqdm, on stderr) counts the launcher's lines that match its progress pattern."""
  data = tmp_path / "d.json"
  data.write_text(json.dumps(dict(a=1, b=2, c=3)))
  stage = main_job.Stage("x", "pretty-print", ["json.tool", str(data)], progress=r'^\s+"[ab]"', units=2)
  status, _ = main_job.run_stage(stage, str(tmp_path / "x.log"), dict(os.environ), tty=True)
  assert status == 0 and "2/2" in capsys.readouterr().err


def test_unknown_stage_is_one_error_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.main", "--stages=specbench,nope",
                         f"--out_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: --stages")


@pytest.mark.slow
def test_main_job_runs_end_to_end_at_the_tiny_budget(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.main", "--budget=tiny", f"--out_dir={tmp_path}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=1200, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
  out = proc.stdout
  assert out.count("      done in") == 4 and "host: " in out and "commit " in out
  assert "Spec-Bench" in out and "pld" in out and "2/2" in out and "long ctx passkey 256" in out
  assert "plots: " in out and (tmp_path / "specbench" / "speedup.png").is_file()
  for key in main_job.STAGES:
    assert (tmp_path / "logs" / f"{key}.log").stat().st_size > 0
