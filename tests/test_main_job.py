"""The main job's closing table reads every stage's outputs (the files the launchers write)."""

from __future__ import annotations

import json

import pytest

from experiments import main as main_job


def _write(path, obj):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(obj))


def test_report_has_one_line_per_figure(tmp_path):
  _write(tmp_path / "bench_decode.json", dict(rows=[dict(kind="decode", size=1, hdjax_tps=12.0, hf_tps=10.0)]))
  overall = dict(speedup=1.5, tau=2.0, identical_rate=1.0)
  _write(tmp_path / "specbench/summary.json",
         dict(methods=dict(ar=dict(overall=dict(tau=1.0)), hd=dict(overall=overall))))
  group = dict(ttft_s=2.0, ttft_speedup_vs_base=3.0, total_s=4.0, total_speedup_vs_base=2.5,
               computed_fraction_prefill=0.4, passkey_accuracy=0.5)
  _write(tmp_path / "longctx/summary.json", dict(methods={"lazy+hd": {"passkey@4096": group}}))
  _write(tmp_path / "bench_batch.json", dict(rows=[dict(method="ar", batch=8, tokens_per_s=30.0),
                                                   dict(method="hd", batch=8, tokens_per_s=45.0,
                                                        throughput_vs_ar=1.5, identical_to_ar=1.0)]))
  lines = main_job.report(str(tmp_path))
  assert len(lines) == 1 + 1 + 2 + 1 + 2
  assert "1.20x" in lines[1] and "speedup 1.50x" in lines[3]
  assert "lazy+hd" in lines[4] and "(2.50x)" in lines[4] and "passkey 50%" in lines[4]
  assert "1.50x ar" in lines[6]


def test_report_needs_every_stage(tmp_path):
  with pytest.raises(FileNotFoundError):
    main_job.report(str(tmp_path))
