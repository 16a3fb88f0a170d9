"""Issue 18, launcher side: bad input records, flags and output paths end in one `error:` line with exit status 2
before any model work; every launcher runs as `python experiments/X.py` and as `python -m experiments.X`; a resumed
exit-head training keeps one log line per step."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from experiments import common
from hdjax.errors import HdjaxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def _is_launcher(fname: str) -> bool:
  if not fname.endswith(".py"):
    return False
  with open(os.path.join(ROOT, "experiments", fname), encoding="utf-8") as f:
    return 'if __name__ == "__main__":' in f.read()


LAUNCHERS = sorted(f[:-3] for f in os.listdir(os.path.join(ROOT, "experiments")) if _is_launcher(f))
BOOTSTRAP = "if __package__ in (None, \"\"):"


def launch(name: str, *args: str, script: bool = False, cwd: str = ROOT) -> subprocess.CompletedProcess:
  """`python experiments/NAME.py ARGS` (from `cwd`, no PYTHONPATH) or `python -m experiments.NAME ARGS`."""
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [os.path.join(ROOT, "experiments", f"{name}.py")] if script else ["-m", f"experiments.{name}"]
  return subprocess.run([sys.executable, *cmd, *args], cwd=cwd, env=env, capture_output=True, text=True,
                        timeout=120, check=False)


def assert_one_error(proc: subprocess.CompletedProcess, message: str) -> None:
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1 and message in lines[0], proc.stderr[-2000:]


def write_lines(path, *rows) -> str:
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return str(path)


# ------------------------------------------------------------------------------------------------ records
Q = dict(question_id=1, category="qa", turns=["What is 2+2?"])


@pytest.mark.parametrize("rows, message", [
    ([Q, dict(Q, question_id=2, turns="text")], ":2: bad 'turns'"),
    ([dict(Q, turns=[])], ":1: bad 'turns'"),
    ([dict(Q, turns=["ok", ""])], ":1: bad 'turns'"),
    ([dict(Q, turns=[3])], ":1: bad 'turns'"),
    ([Q, Q], ":2: question_id 1 repeats line 1"),
    ([Q, dict(Q, question_id="1")], None),  # "1" and 1 are different ids
    ([dict(Q, question_id=None)], ":1: bad 'question_id'"),
    ([dict(Q, question_id=1.5)], ":1: bad 'question_id'"),
    ([dict(Q, category=7)], ":1: bad 'category'"),
    ([{"question_id": 1, "turns": ["x"]}], ":1: record lacks 'category'"),
    ([Q, "[1, 2]"], ":2: a record must be a JSON object"),
    ([Q, "{not json"], ":2: not valid JSON"),
    ([], "no records"),
    (["", "  "], "no records"),
])
def test_question_records_are_checked_with_file_and_line(tmp_path, rows, message):
  path = write_lines(tmp_path / "q.jsonl", *rows)
  if message is None:
    assert len(common.read_questions(path)) == len(rows)
    return
  with pytest.raises(HdjaxError, match=re.escape(message)):
    common.read_questions(path)


def test_real_spec_bench_questions_pass():
  assert len(common.read_questions(common.SPEC_BENCH_QUESTIONS)) == 480


def test_invalid_utf8_input_is_one_error(tmp_path):
  path = tmp_path / "q.jsonl"
  path.write_bytes(b'{"question_id": 1, "category": "qa", "turns": ["\xff"]}\n')
  with pytest.raises(HdjaxError, match="not UTF-8"):
    common.read_questions(str(path))


@pytest.mark.parametrize("text, message", [
    ("[1]", "must be a JSON object {method: {option: value}}"),
    ('{"hd": 3}', "must be a JSON object"),
    ('{"hd": {"max_deph": 3}}', "method 'hd' has no option max_deph; its options: "),
    ('{"hd": {"max_depth": "3"}}', "option max_depth='3'"),
    ('{"pld": {}}', "names method(s) pld not in --methods=ar,hd"),
    ("{", "not valid JSON"),
])
def test_method_options_are_checked(text, message):
  with pytest.raises(HdjaxError, match=re.escape(message)):
    common.parse_method_options(text, ["ar", "hd"])
  assert common.parse_method_options('{"hd": {"max_depth": 3}}', ["ar", "hd"]) == {"hd": {"max_depth": 3}}


@pytest.mark.parametrize("values, message", [(["abc"], "list of integers"), (["0"], ">= 1"), ([], "non-empty"),
                                             (["1.5"], "list of integers")])
def test_integer_list_flags(values, message):
  with pytest.raises(HdjaxError, match=re.escape(message)):
    common.int_list("prefill_lengths", values)
  assert common.int_list("prefill_lengths", ["512", "2048"]) == [512, 2048]


def test_output_paths_are_checked_before_work(tmp_path):
  a_file = tmp_path / "file"
  a_file.write_text("x")
  for path, message in [(str(a_file), "is a file"), (str(a_file / "sub"), "is a file"),
                        ("/proc/hdjax_out", "is not writable"), ("", "is empty")]:
    with pytest.raises(HdjaxError, match=message):
      common.check_output_dir(path)
  with pytest.raises(HdjaxError, match="is a directory"):
    common.check_output_file(str(tmp_path))
  common.check_output_dir(str(tmp_path / "new" / "dir"))
  assert os.listdir(tmp_path / "new" / "dir") == []  # the probe file is gone
  (tmp_path / "new" / "dir" / "ar.jsonl").mkdir()
  with pytest.raises(HdjaxError, match="ar.jsonl is a directory"):
    common.check_output_dir(str(tmp_path / "new" / "dir"), ["summary.json", "ar.jsonl"])


def test_longctx_build_inputs_are_checked_before_the_model_loads(tmp_path):
  from experiments import longctx_lib  # pylint: disable=import-outside-toplevel
  with pytest.raises(HdjaxError, match="unknown --build set"):
    longctx_lib.check_build(["passkey", "nope"], str(tmp_path))
  with pytest.raises(HdjaxError, match="file not found"):
    longctx_lib.check_build(["passkey"], str(tmp_path / "missing.jsonl"))


# ------------------------------------------------------------------------------------------------ launchers
def test_every_launcher_bootstraps_the_repository_path():
  """`python experiments/X.py` has only experiments/ on sys.path: each launcher adds the repository root
  before its first project import."""
  assert {"generate", "specbench", "longctx", "train_exit_heads", "build_datastores"} <= set(LAUNCHERS)
  for name in LAUNCHERS:
    with open(os.path.join(ROOT, "experiments", f"{name}.py"), encoding="utf-8") as f:
      text = f.read()
    first_import = min(text.index(m) for m in ("\nimport hdjax", "\nfrom hdjax", "\nfrom experiments")
                       if m in text)
    assert BOOTSTRAP in text[:first_import], name


@pytest.mark.parametrize("name, args, message, script", [
    ("generate", ["--prompt=hi", "--max_new_tokens=4", "--chunk_tokens=0"], "--chunk_tokens must be >= 1", True),
    ("generate", ["--prompt=hi", "--temperature=nan"], "--temperature must be >= 0, got nan", False),
    ("generate", ["--prompt=hi", "--method=hd", '--method_options={{"hd": {{"chunk_tokens": 4}}}}'],
     "the launcher sets chunk_tokens itself", False),
    ("specbench", ["--questions={q_turns_text}"], "q_turns_text.jsonl:1: bad 'turns'", True),
    ("specbench", ["--questions={q_empty}"], "no records", False),
    ("specbench", ["--method_options=[1]"], "--method_options must be a JSON object", True),
    ("specbench", ["--out_dir={a_file}"], "is a file", False),
    ("longctx", ["--prompts={p_dup}", "--out_dir={out}"], "p_dup.jsonl:2: id 'a' repeats line 1", True),
    ("longctx", ["--prompts={p_good}", "--out_dir=/proc/hdjax_out"], "is not writable", False),
    ("longctx", ["--build=passkey", "--lengths=2k", "--out_dir={out}"], "--lengths must be a comma-separated", True),
    ("build_datastores", ["--batch_size=0", "--out_dir={out}"], "--batch_size must be >= 1", True),
    ("bench_decode", ["--prefill_lengths=abc"], "--prefill_lengths must be a comma-separated list of integers", False),
    ("bench_batch", ["--out={out}"], "is a directory", True),
    ("bench_peers", ["--dtypes=float16"], "--dtypes must be float32 and/or bfloat16", True),
    ("bench_peers", ["--stage=prefill", "--lengths=4k"], "--lengths must be a comma-separated", False),
    ("bench_steps", ["--nodes=0"], "must be positive", True),
    ("bench_steps", ["--profile=-1"], "--profile must be >= 0", False),
    ("adadecode_sweep", ["--per_category=0"], "--per_category must be >= 1", False),
    ("train_exit_heads", ["--config.steps=0"], "--config.steps must be >= 1", True),
    ("main", ["--out_dir={a_file}"], "is a file", True),
])
def test_launcher_bad_input_is_one_line(tmp_path, name, args, message, script):
  """Each case in one start form (the script form from another directory); the first also in the other."""
  a_file = tmp_path / "a_file"
  a_file.write_text("x")
  files = dict(a_file=str(a_file), out=str(tmp_path / "out"),
               q_turns_text=write_lines(tmp_path / "q_turns_text.jsonl", dict(Q, turns="text")),
               q_empty=write_lines(tmp_path / "q_empty.jsonl"),
               p_dup=write_lines(tmp_path / "p_dup.jsonl", dict(id="a", prompt="x"), dict(id="a", prompt="y")),
               p_good=write_lines(tmp_path / "p_good.jsonl", dict(id="a", prompt="x")))
  (tmp_path / "out").mkdir()
  args = [a.format(**files) for a in args]
  assert_one_error(launch(name, *args, script=script, cwd=str(tmp_path) if script else ROOT), message)
  if "--chunk_tokens=0" in args:  # the case that used to hang
    assert_one_error(launch(name, *args), message)


# ------------------------------------------------------------------------------------------------ exit-head log
def test_resumed_training_log_keeps_one_line_per_step(tmp_path):
  from experiments import train_exit_heads  # pylint: disable=import-outside-toplevel
  log = tmp_path / "metrics.jsonl"
  write_lines(log, *[dict(step=s, loss=1.0) for s in range(1, 16)], '{"step": 16, "lo')  # killed after step 15
  train_exit_heads.truncate_log(str(log), 10)  # the last checkpoint
  assert [json.loads(l)["step"] for l in log.read_text().splitlines()] == list(range(1, 11))
  run = dict(model="m", layers=[6, 10], steps=5)
  train_exit_heads.check_run(str(tmp_path), run)
  train_exit_heads.check_run(str(tmp_path), run)  # the same run resumes
  with pytest.raises(HdjaxError, match=re.escape("layers=[6, 10]; now layers=[6, 12]")):
    train_exit_heads.check_run(str(tmp_path), dict(run, layers=[6, 12]))
  (tmp_path / "other" / "ckpt" / "3").mkdir(parents=True)
  with pytest.raises(HdjaxError, match="unknown run"):
    train_exit_heads.check_run(str(tmp_path / "other"), run)


@pytest.mark.slow
def test_killed_and_resumed_training_logs_each_step_once(tmp_path):
  """The real launcher (SmolLM2, a few ShareGPT exchanges): stop after step 3 (checkpoint at 2), resume to 4."""
  args = [f"--config.workdir={tmp_path}", "--config.num_train_seqs=4", "--config.num_eval_seqs=6", "--config.steps=4",
          "--config.ckpt_every=2", "--config.batch=8", "--config.layers=(6,)", "--config.table_layers=(6,)",
          "--config.greedy_seqs=2", "--config.greedy_tokens=8", "--config.export_dir="]
  for stop_after in (3, -1):
    proc = launch("train_exit_heads", *args, f"--config.stop_after={stop_after}")
    assert proc.returncode == 0, proc.stderr[-2000:]
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "step" in r] == [1, 2, 3, 4] and "eval" in rows[-1]
  assert_one_error(launch("train_exit_heads", *args, "--config.layers=(8,)"), "holds checkpoints of another run")


def test_speed_dtype_follows_the_cpus_bf16_units(monkeypatch):
  """The timed launchers' `--dtype=auto`: bf16 only where the CPU has bf16 units (the tests run on CPU)."""
  assert common.speed_dtype("float32") == "float32" and common.speed_dtype("bfloat16") == "bfloat16"
  monkeypatch.setattr(common, "cpu_info", lambda: ("Some Xeon", frozenset({"avx2", "amx_bf16", "avx512_bf16"})))
  assert common.speed_dtype() == "bfloat16"
  assert common.cpu_model().endswith("bf16 units: amx_bf16 avx512_bf16")
  monkeypatch.setattr(common, "cpu_info", lambda: ("AMD EPYC", frozenset({"avx2"})))
  assert common.speed_dtype() == "float32" and common.cpu_model().endswith("no bf16 units")
  assert common.cpu_model().startswith("AMD EPYC, ")


def test_memory_map_budget_is_a_clear_error():
  """Near the kernel's memory-map limit a launcher stops with one HdjaxError instead of crashing inside LLVM."""
  common.check_memory_maps()  # this test process is far below the limit
  with pytest.raises(HdjaxError, match="vm.max_map_count"):
    common.check_memory_maps(fraction=0.0)


def test_bench_decode_runs_on_the_embedded_model(tmp_path):
  """The main job's second stage end to end on SmolLM2, tiny budgets, without HF (its EOS trick once broke
  `make run` without any test noticing)."""
  out = tmp_path / "bench.json"
  proc = launch("bench_decode", "--nohf", "--repeats=1", "--new_tokens=3", "--prefill_lengths=16", "--batches=1",
                f"--out={out}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  kinds = {(r["kind"], r["size"]) for r in json.loads(out.read_text())["rows"]}
  assert kinds == {("prefill", 16), ("decode", 1)}
