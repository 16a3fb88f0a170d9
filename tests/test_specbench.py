"""Spec-Bench launcher: question selection, Spec-Bench's speedup rule, one-line errors, an end-to-end run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from experiments import specbench_lib as specbench

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def questions():
  cats = ["writing", "coding", "translation", "translation", "qa", "translation", "qa"]
  return [dict(question_id=i, category=c, turns=[f"q{i}"]) for i, c in enumerate(cats)]


def test_stratified_selection_keeps_file_order_and_groups_mt_bench():
  picked = specbench.select_questions(questions(), 2, "stratified")
  assert [q["question_id"] for q in picked] == [0, 1, 2, 3, 4, 6]  # writing+coding are both mt_bench
  assert [q["question_id"] for q in specbench.select_questions(questions(), 3, "first")] == [0, 1, 2]
  assert len(specbench.select_questions(questions(), None, "first")) == 7


def row(qid, cat, tokens, wall, ids, accept, draft=0.0, verify=0.0, syncs=None):
  stats = dict(accept_lengths=accept, steps=len(accept))
  stats.update(dict(draft_s=draft, verify_s=verify) if syncs is None else dict(host_syncs=syncs))
  return dict(question_id=qid, category=cat, choices=[dict(new_tokens=[tokens], wall_time=[wall], token_ids=[ids],
                                                           stats=[stats])])


def test_summary_follows_spec_bench_rule():
  ar = [row(0, "qa", 10, 1.0, [1] * 10, [1] * 10), row(1, "rag", 20, 4.0, [2] * 20, [1] * 20)]
  hd = [row(0, "qa", 10, 0.5, [1] * 10, [1, 4, 5], 0.05, 0.45), row(1, "rag", 20, 1.0, [3] * 20, [10, 10], 0.1, 0.9)]
  s = specbench.summarize({"ar": ar, "hd": hd})["methods"]
  # per-question tokens/s averaged: ar (10 + 5) / 2 = 7.5, hd (20 + 20) / 2 = 20
  assert s["hd"]["overall"]["speedup"] == pytest.approx(20 / 7.5)
  assert s["hd"]["qa"]["speedup"] == pytest.approx(2.0) and s["hd"]["rag"]["speedup"] == pytest.approx(4.0)
  assert s["hd"]["overall"]["tau"] == pytest.approx(30 / 5)
  assert s["hd"]["overall"]["draft_share"] == pytest.approx(0.15 / 1.5)
  assert s["hd"]["overall"]["identical_rate"] == 0.5 and s["ar"]["overall"]["speedup"] == 1.0
  assert s["hd"]["overall"]["host_syncs_per_turn"] is None


def test_summary_of_a_device_loop_reports_host_syncs_not_a_draft_share():
  pld = [row(0, "qa", 10, 0.5, [1] * 10, [1, 4, 5], syncs=2), row(1, "rag", 20, 1.0, [3] * 20, [10, 10], syncs=4)]
  s = specbench.summarize({"pld": pld})["methods"]["pld"]["overall"]
  assert s["draft_share"] is None and s["host_syncs_per_turn"] == 3.0


@pytest.mark.parametrize("args, message", [
    (["--questions=/nonexistent.jsonl"], "file not found"),
    (["--methods=ar,nope"], "unknown method"),
    (["--limit=0"], "--limit"),
    (["--max_new_tokens=0"], "--max_new_tokens"),
])
def test_bad_input_is_one_line_exit_2(args, message, tmp_path):
  proc = subprocess.run([sys.executable, "-m", "experiments.specbench", f"--out_dir={tmp_path}", *args], cwd=REPO,
                        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": REPO}, timeout=300)
  assert proc.returncode == 2
  lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
  assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


@pytest.mark.slow
def test_end_to_end_real_model(tmp_path):
  qfile = tmp_path / "q.jsonl"
  qfile.write_text("\n".join(json.dumps(q) for q in [
      dict(question_id=1, category="writing", turns=["Say hello.", "Say it again."]),
      dict(question_id=2, category="qa", turns=["Name a colour."])]) + "\n")
  out = tmp_path / "out"
  subprocess.run([sys.executable, "-m", "experiments.specbench", f"--questions={qfile}", "--methods=ar,pld,hd_context",
                  "--max_new_tokens=12", f"--out_dir={out}"], cwd=REPO, check=True, timeout=900,
                 env={**os.environ, "PYTHONPATH": REPO})
  summary = json.loads((out / "summary.json").read_text())
  assert set(summary["methods"]) == {"ar", "pld", "hd_context"}
  assert summary["methods"]["hd_context"]["overall"]["identical_rate"] == 1.0
  rows = [json.loads(l) for l in (out / "pld.jsonl").read_text().splitlines()]
  assert [r["question_id"] for r in rows] == [1, 2] and len(rows[0]["choices"][0]["turns"]) == 2
  assert rows[0]["category"] == "mt_bench" and (out / "speedup.png").stat().st_size > 0
