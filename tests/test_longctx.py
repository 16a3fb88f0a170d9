"""The long-context launcher: one-line errors with exit status 2, and its scoring helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from experiments import longctx_lib as longctx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, module="experiments.longctx"):
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.parametrize("args, message", [
    (["--prompts=/nonexistent/p.jsonl", "--out_dir={out}"], "file not found"),
    (["--build=passkey", "--methods=full,nope", "--out_dir={out}"], "unknown method"),
    (["--build=passkey", "--out_dir="], "--out_dir is required"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, args, message):
  _assert_one_line_error(_launch(*(a.format(out=tmp_path) for a in args)), message)


@pytest.mark.parametrize("args, message", [
    (["--lengths=2k"], "take numbers"),
    (["--prune_layers=3,6"], "2 prune_layers but 0 keep_ratios"),
])
def test_prefill_profile_bad_input_is_one_line_exit_2(args, message):
  _assert_one_line_error(_launch(*args, module="experiments.bench_prefill"), message)


def _assert_one_line_error(proc, message):
  assert proc.returncode == 2
  lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
  assert len(lines) == 1 and message in lines[0]


def test_passkey_scoring():
  assert longctx.passkey_correct("The pass key is 48213.", "48213")
  assert longctx.passkey_correct("48,213", "48213")
  assert not longctx.passkey_correct("The pass key is 48214.", "48213")
  assert not longctx.passkey_correct("I don't know", "48213")


def test_summary_agreement_and_speedup():
  prompts = [dict(id="a", prompt="x", answer="12345", task="passkey", target_len=2048),
             dict(id="b", prompt="y", answer="54321", task="passkey", target_len=2048)]
  rows = {
      "full": [dict(id="a", token_ids=[1, 2], text="12345", ttft_s=2.0, total_s=3.0, prompt_tokens=2000),
               dict(id="b", token_ids=[3, 4], text="54321", ttft_s=4.0, total_s=5.0, prompt_tokens=2010)],
      "lazy": [dict(id="a", token_ids=[1, 5], text="12345", ttft_s=1.0, total_s=2.0, prompt_tokens=2000,
                    computed_fraction_prefill=0.5),
               dict(id="b", token_ids=[9, 4], text="99999", ttft_s=1.0, total_s=2.0, prompt_tokens=2010,
                    computed_fraction_prefill=0.4)],
  }
  g = longctx.summarize(rows, prompts)["methods"]["lazy"]["passkey@2048"]
  assert g["passkey_accuracy"] == 0.5 and g["first_token_agreement"] == 0.5
  assert g["ttft_speedup_vs_base"] == 3.0 and abs(g["computed_fraction_prefill"] - 0.45) < 1e-9
  assert "ttft_speedup_vs_hf" not in g
  with_hf = longctx.summarize(rows, prompts, dict(a=3.0, b=5.0))["methods"]
  assert with_hf["lazy"]["passkey@2048"]["ttft_speedup_vs_hf"] == 4.0  # median of 3.0 / 1.0 and 5.0 / 1.0
  assert with_hf["full"]["passkey@2048"]["ttft_speedup_vs_hf"] == pytest.approx(1.375)  # median of 1.5 and 1.25


def test_method_schedules_parse():
  assert longctx.parse_method("lazy") == ("lazy", {})
  assert longctx.parse_method("lazy@3-6:0.5-0.3") == ("lazy", dict(prune_layers=(3, 6), keep_ratios=(0.5, 0.3)))
  assert longctx.parse_method("lazy+hd@16:0.5:w16:p7") == (
      "lazy+hd", dict(prune_layers=(16,), keep_ratios=(0.5,), score_window=16, score_pool=7))
  for bad in ("lazy@3-x:0.5", "lazy@16:0.5:q3", "lazy@16:0.5:w", "lazy@16"):
    with pytest.raises(longctx.HdjaxError, match="bad schedule"):
      longctx.parse_method(bad)


def test_prefill_profile_recovers_the_quadratic_share():
  from experiments.bench_prefill import quadratic_share  # pylint: disable=import-outside-toplevel
  a, b = 3e-3, 2e-6  # ms per token, ms per token pair
  lengths = (512, 1024, 2048, 4096)
  want = {n: b * n / (a + b * n) for n in lengths}
  assert quadratic_share({n: a * n + b * n * n for n in lengths}) == pytest.approx(want, rel=1e-6)
  assert quadratic_share({n: a * n for n in lengths}) == pytest.approx({n: 0.0 for n in lengths}, abs=1e-6)


def test_method_schedules_parse_skip_and_sinks():
  assert longctx.parse_method("lazy@14:0.1:w16:p15:s6:k32") == (
      "lazy", dict(prune_layers=(14,), keep_ratios=(0.1,), score_window=16, score_pool=15, score_skip=6,
                   keep_sinks=32))


def test_qa_scoring():
  assert longctx.qa_correct("The mascot is a penguin.", "penguin")
  assert longctx.qa_correct("Harriet Vance", "Harriet Vance")
  assert longctx.qa_correct("4,821 volunteers", "4821")
  assert not longctx.qa_correct("penguins", "penguin")  # whole words only
  assert not longctx.qa_correct("48210", "4821")
  assert not longctx.qa_correct("I do not know.\nPenguin", "penguin")  # the first line only
  prompt = dict(task="multidoc_qa", answer="Oslo")
  assert longctx.answer_correct("Oslo.", prompt) and not longctx.answer_correct("12345", prompt)
  assert longctx.answer_correct("The pass key is 12345.", dict(task="passkey", answer="12345"))


class _ByteTokenizer:
  """Stands in for the chat template: one token per 4 characters plus a 20-token frame."""

  def apply_chat_template(self, messages):
    return [0] * (20 + len(messages[0]["content"]) // 4)


def test_multidoc_qa_builder():
  import random  # pylint: disable=import-outside-toplevel

  class FakeLM:
    tokenizer = _ByteTokenizer()

  articles = [dict(document="\n".join(f"Sentence {i} of article {a} says something." for i in range(12)),
                   summary="s") for a in range(40)]
  for idx in range(6):
    row = longctx.build_multidoc_qa(FakeLM(), articles, 1024, random.Random(idx), idx)
    assert row["task"] == "multidoc_qa" and len(FakeLM.tokenizer.apply_chat_template(
        [dict(content=row["prompt"])])) <= 1024
    assert row["n_docs"] >= 2 and 1 <= row["target_doc"] <= row["n_docs"]
    assert row["prompt"].count(f" {row['answer']}.") == 1  # the fact is stated once, in the target article
    facts = [f for f in longctx.QA_FACTS if f[2] == row["fact"] and f[1] in row["prompt"]]
    assert len(facts) == 1
    target_text = row["prompt"].split(f"Article {row['target_doc']}:\n")[1].split("\n\nArticle ")[0]
    assert facts[0][0].format(row["answer"]) in target_text


def test_summary_scores_qa_by_task():
  prompts = [dict(id="a", prompt="x", answer="Oslo", task="multidoc_qa", target_len=4096),
             dict(id="b", prompt="y", answer="4821", task="multidoc_qa", target_len=4096)]
  rows = {"full": [dict(id="a", token_ids=[1], text="Oslo", ttft_s=1.0, total_s=1.0, prompt_tokens=4000),
                   dict(id="b", token_ids=[2], text="4,821.", ttft_s=1.0, total_s=1.0, prompt_tokens=4000)]}
  g = longctx.summarize(rows, prompts)["methods"]["full"]["multidoc_qa@4096"]
  assert g["qa_accuracy"] == 1.0 and g["correct"] == 2 and "passkey_accuracy" not in g


def test_accuracy_table():
  prompts = [dict(id="a", prompt="x", answer="12345", task="passkey", target_len=4096),
             dict(id="q", prompt="y", answer="Oslo", task="multidoc_qa", target_len=4096)]
  rows = {"full": [dict(id="a", token_ids=[1], text="12345", ttft_s=4.0, total_s=4.0, prompt_tokens=4000),
                   dict(id="q", token_ids=[2], text="Oslo", ttft_s=4.0, total_s=4.0, prompt_tokens=4000)],
          "lazy": [dict(id="a", token_ids=[1], text="12340", ttft_s=2.0, total_s=2.0, prompt_tokens=4000,
                        computed_fraction_prefill=0.5),
                   dict(id="q", token_ids=[3], text="Oslo", ttft_s=1.0, total_s=1.0, prompt_tokens=4000,
                        computed_fraction_prefill=0.3)]}
  table = longctx.accuracy_table(longctx.summarize(rows, prompts)).splitlines()
  assert table[0].startswith("| method | token-layers | multidoc_qa@4096 correct |")
  assert table[2] == "| full | 1.000 | 1/1 | 1/1 | 1.00x | 1/1 | 1/1 | 1.00x |"
  assert table[3] == "| lazy | 0.400 | 1/1 | 0/1 | 4.00x | 0/1 | 1/1 | 2.00x |"


def test_method_schedules_parse_revival():
  assert longctx.parse_method("lazy+hd@14:0.1:e8:b2:r1") == (
      "lazy+hd", dict(prune_layers=(14,), keep_ratios=(0.1,), reselect_every=8, revive_budget=2, revive=True))
  assert longctx.parse_method("lazy+pld@14:0.1:r0")[1]["revive"] is False
  with pytest.raises(longctx.HdjaxError, match="bad schedule"):
    longctx.parse_method("lazy@14:0.1:r2")


def _pareto_run():
  """Two lengths; at 4096 full finds 3/4 passkeys and 1/2 QA answers."""
  prompts, rows = [], {"full": [], "fast": [], "faster": [], "fastest": []}
  texts = {  # method -> (passkeys found, QA answers found, first tokens equal, TTFT in s) at 4096
      "full": (3, 1, 6, 4.0), "fast": (2, 1, 6, 2.0), "faster": (3, 0, 6, 1.6), "fastest": (1, 0, 5, 1.0)}
  for length in (2048, 4096):
    for i in range(6):
      task = "passkey" if i < 4 else "multidoc_qa"
      answer = "12345" if task == "passkey" else "Oslo"
      prompts.append(dict(id=f"{task}-{length}-{i}", prompt="x", task=task, answer=answer, target_len=length))
      for method, (pk, qa, first, ttft) in texts.items():
        found = i < pk if task == "passkey" else i - 4 < qa
        if length == 2048:
          found, first, ttft = True, 6, ttft / 2
        rows[method].append(dict(id=prompts[-1]["id"], token_ids=[1 if i < first else 2], ttft_s=ttft,
                                 text=answer if found else "no", computed_fraction_prefill=ttft / 4.0))
  return rows, prompts


def test_pareto_points_rule_frontier_and_choice():
  rows, prompts = _pareto_run()
  points = {(p["method"], p["length"]): p for p in longctx.pareto_points(rows, prompts)}
  full, fast, faster, fastest = (points[(m, 4096)] for m in ("full", "fast", "faster", "fastest"))
  assert (full["passkey"], full["multidoc_qa"], full["first_token"], full["ttft_speedup"]) == (3, 1, 6, 1.0)
  assert (faster["passkey"], faster["multidoc_qa"], faster["ttft_speedup"]) == (3, 0, 2.5)
  assert fast["within_rule"] and faster["within_rule"]
  assert not fastest["within_rule"]  # 1/4 passkeys against full's 3/4, and 5/6 first tokens
  assert full["frontier"] and faster["frontier"] and fastest["frontier"]
  assert not fast["frontier"]  # faster finds as many answers (3) and is faster
  assert longctx.pareto_choice(list(points.values()), 4096, 2.3) == dict(chosen="faster", best_at_target="faster")
  assert longctx.pareto_choice(list(points.values()), 4096, 3.0) == dict(chosen="faster", best_at_target="fastest")
  assert longctx.pareto_choice(list(points.values()), 2048, 5.0) == dict(chosen="fastest", best_at_target=None)
  table = longctx.pareto_table(list(points.values()), 2.3)
  assert "| faster | 0.400 | 2.50x | 3/4 | 0/2 | 6/6 | yes | yes |" in table
  assert "Fastest within the rule: faster; most answers at >= 2.3x: faster." in table


def test_pareto_from_a_finished_run(tmp_path):
  rows, prompts = _pareto_run()
  run_dir = tmp_path / "run"
  run_dir.mkdir()
  for method, rs in rows.items():
    (run_dir / f"{method}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
  (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
  proc = _launch(f"--prompts={tmp_path / 'prompts.jsonl'}", "--methods=full,fast,faster,fastest",
                 f"--pareto_from={run_dir}", f"--out_dir={tmp_path / 'out'}")
  assert proc.returncode == 0, proc.stderr
  assert json.loads((tmp_path / "out" / "pareto.json").read_text())["target"] == 2.3
  assert "Fastest within the rule: faster" in (tmp_path / "out" / "pareto.md").read_text()
  assert (tmp_path / "out" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
  _assert_one_line_error(_launch(f"--prompts={tmp_path / 'prompts.jsonl'}", "--methods=full,nope",
                                 f"--pareto_from={run_dir}", f"--out_dir={tmp_path / 'out2'}"), "file not found")
