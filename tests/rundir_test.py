"""Run directories: claimed atomically, never lost; non-finite runs fail;
signals and write errors end with one line and a resumable run."""

import errno
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from sfljax import rundir
from sfljax.cli import main

FAST = ["train", "--clients", "2", "--batch-size", "128", "--quiet"]


def _strict_rows(path):
  def refuse(token):
    raise ValueError(f"non-strict JSON token {token}")
  with open(path) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def _one_error_line(capsys, flag):
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith(f"sfljax: error: {flag}"), err
  return err[0]


# -- claiming -----------------------------------------------------------------------
def test_a_directory_is_claimed_by_one_run_only(tmp_path):
  out = str(tmp_path / "run")
  first = rundir.RunDir.claim(out)
  with pytest.raises(rundir.RunDirError, match="another sfljax process is writing"):
    rundir.RunDir.claim(out)
  first.release()
  with pytest.raises(rundir.RunDirError, match="not empty"):   # Now it holds a run.
    rundir.RunDir.claim(out)


def test_default_names_are_unique_within_one_second(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  runs = [rundir.RunDir.claim(None) for _ in range(3)]
  assert len({r.path for r in runs}) == 3
  for r in runs:
    assert rundir.is_run(r.path)
    r.release()


def test_two_processes_with_one_out_do_not_mix(tmp_path):
  out = str(tmp_path / "run")
  args = [sys.executable, "-m", "sfljax", *FAST, "--rounds", "2", "--out", out]
  procs = [subprocess.Popen(args, stderr=subprocess.PIPE, text=True) for _ in range(2)]
  results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
  codes = sorted(code for code, _ in results)
  assert codes == [0, 2], results
  loser = [err for code, err in results if code == 2][0]
  assert loser.count("\n") == 1 and "--out" in loser and "Traceback" not in loser
  rows = _strict_rows(os.path.join(out, "metrics.jsonl"))
  assert [r["round"] for r in rows] == [1, 2]


def test_overwrite_validates_first_and_recognises_runs_by_the_marker(tmp_path, capsys):
  out = str(tmp_path / "run")
  assert main(FAST + ["--rounds", "1", "--out", out]) == 0
  before = open(os.path.join(out, "metrics.jsonl")).read()
  # A bad value with --overwrite: refused before the old run is touched.
  assert main(FAST + ["--rounds", "1", "--out", out, "--overwrite", "--cut", "99"]) == 2
  _one_error_line(capsys, "--cut")
  assert open(os.path.join(out, "metrics.jsonl")).read() == before
  assert not glob.glob(out + ".replaced-*")
  # A user's folder that merely holds a config.json is not an sfljax run.
  mine = tmp_path / "project"
  mine.mkdir()
  (mine / "config.json").write_text('{"mine": true}')
  assert main(FAST + ["--rounds", "1", "--out", str(mine), "--overwrite"]) == 2
  assert "not an sfljax run" in _one_error_line(capsys, "--out")
  assert (mine / "config.json").read_text() == '{"mine": true}'
  # A good one replaces the run, and the moved-aside old run is gone after round 1.
  assert main(FAST + ["--rounds", "1", "--out", out, "--overwrite", "--seed", "1"]) == 0
  assert open(os.path.join(out, "metrics.jsonl")).read() != before
  assert not glob.glob(out + ".replaced-*")


def test_a_replacing_run_that_fails_keeps_the_old_run_aside(tmp_path, capsys):
  out = str(tmp_path / "run")
  assert main(FAST + ["--rounds", "1", "--out", out]) == 0
  before = open(os.path.join(out, "metrics.jsonl")).read()
  code = main(FAST + ["--rounds", "2", "--out", out, "--overwrite", "--optimizer", "sgd",
                      "--lr", "1e6"])
  assert code == 3
  aside = glob.glob(out + ".replaced-*")
  assert len(aside) == 1
  assert open(os.path.join(aside[0], "metrics.jsonl")).read() == before


def test_unwritable_out_is_one_line(capsys):
  assert main(FAST + ["--rounds", "1", "--out", "/proc/sfljax-cannot-write-here"]) == 2
  _one_error_line(capsys, "--out")
  existing = "/proc/self"   # Exists, not empty, not a run.
  assert main(FAST + ["--rounds", "1", "--out", existing]) == 2
  _one_error_line(capsys, "--out")


# -- non-finite values -------------------------------------------------------------------
def test_a_diverging_run_fails_and_writes_no_nan(tmp_path, capsys):
  out = str(tmp_path / "run")
  code = main(FAST + ["--rounds", "3", "--out", out, "--optimizer", "sgd", "--lr", "1e6"])
  assert code == 3
  line = _one_error_line(capsys, "round 1: non-finite")
  assert "--on-nonfinite skip" in line
  rows = _strict_rows(os.path.join(out, "metrics.jsonl"))
  assert rows == []                                  # Round 1 went NaN: not logged as data.
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["best_test_accuracy"] is None and summary["status"].startswith("stopped")


def test_metrics_and_config_are_strict_json(tmp_path):
  out = str(tmp_path / "run")
  assert main(FAST + ["--rounds", "2", "--out", out]) == 0
  _strict_rows(os.path.join(out, "metrics.jsonl"))
  for name in ("config.json", "summary.json", rundir.MARKER):
    json.loads(open(os.path.join(out, name)).read(),
                parse_constant=lambda t: (_ for _ in ()).throw(ValueError(t)))
  assert rundir.dumps({"a": float("nan"), "b": [1.0, float("inf")]}) == '{"a": null, "b": [1.0, null]}'


# -- write errors and signals ------------------------------------------------------------
def test_disk_full_mid_run_is_one_line_and_resumable(tmp_path, capsys, monkeypatch):
  out = str(tmp_path / "run")
  real = rundir.RunDir.append_metrics
  calls = []

  def full(self, f, row):
    calls.append(row["round"])
    if row["round"] == 3:
      f.write('{"round": 3, "tr')         # Torn, as a full disk leaves it.
      f.flush()
      raise OSError(errno.ENOSPC, "No space left on device")
    real(self, f, row)

  monkeypatch.setattr(rundir.RunDir, "append_metrics", full)
  code = main(FAST + ["--rounds", "4", "--out", out, "--checkpoint-every", "1"])
  assert code == 2
  line = _one_error_line(capsys, "")
  assert "No space left on device" in line and "--resume" in line
  monkeypatch.setattr(rundir.RunDir, "append_metrics", real)
  assert main(["train", "--resume", out, "--quiet"]) == 0
  assert [r["round"] for r in _strict_rows(os.path.join(out, "metrics.jsonl"))] == [1, 2, 3, 4]


def _wait_lines(path, n, proc, timeout=300):
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(path) and open(path).read().count("\n") >= n:
      return
    time.sleep(0.02)
  raise AssertionError("the run ended or stalled before it could be signalled")


def test_sigterm_keeps_the_rounds_and_resumes(tmp_path):
  out = str(tmp_path / "run")
  proc = subprocess.Popen([sys.executable, "-m", "sfljax", *FAST, "--rounds", "30", "--out", out,
                           "--checkpoint-every", "0"], stderr=subprocess.PIPE, text=True)
  _wait_lines(os.path.join(out, "metrics.jsonl"), 1, proc)
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=300) == 143
  err = proc.stderr.read()
  lines = err.strip().splitlines()
  assert lines[0] == "sfljax: stopping after the current round (again to stop at once)", err
  assert len(lines) == 2 and "--resume" in lines[1] and "Traceback" not in err, err
  done = len(_strict_rows(os.path.join(out, "metrics.jsonl")))
  from sfljax import checkpoint
  assert checkpoint.Checkpoints(os.path.join(out, "checkpoints")).latest() == done


def test_ctrl_c_during_start_up_is_one_line(tmp_path):
  out = tmp_path / "run"
  # Ctrl-C as a terminal delivers it: the default handler (a test runner's worker may
  # ignore SIGINT, and a child inherits that).
  start = ("import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
           "sys.argv[0] = 'sfljax'; runpy.run_module('sfljax', run_name='__main__')")
  proc = subprocess.Popen([sys.executable, "-c", start, *FAST, "--rounds", "2", "--out",
                           str(out)], stderr=subprocess.PIPE, text=True)
  time.sleep(1.0)   # Inside the heavy imports (jax, flax), before any training.
  proc.send_signal(signal.SIGINT)
  assert proc.wait(timeout=300) == 130
  err = proc.stderr.read()
  assert err.count("\n") == 1 and "Traceback" not in err, err


def test_no_control_characters_when_stderr_is_a_file(tmp_path):
  out = str(tmp_path / "run")
  proc = subprocess.run([sys.executable, "-m", "sfljax", "train", "--clients", "2",
                         "--batch-size", "128", "--rounds", "2", "--out", out],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert "\r" not in proc.stderr and "\x1b" not in proc.stderr


def test_oversized_batch_is_clamped_to_the_largest_client(tmp_path):
  out = str(tmp_path / "run")
  assert main(["train", "--clients", "4", "--batch-size", "100000", "--rounds", "1", "--quiet",
               "--out", out]) == 0
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["resolved"]["batch_size"] == max(cfg["resolved"]["client_sizes"])
  assert cfg["config"]["batch_size"] == 100000


def test_a_round_too_large_for_memory_is_refused_up_front(tmp_path, capsys):
  out = tmp_path / "run"
  assert main(FAST + ["--local-epochs", "100000000", "--out", str(out)]) == 2
  assert "sample slots" in _one_error_line(capsys, "--local-epochs")
  assert not out.exists()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_an_interrupt_a_gc_callback_swallows_is_raised_again():
  # What CI once met: Ctrl-C landed inside JAX's garbage-collection callback during the
  # imports; the interpreter reports an exception there as "unraisable" and goes on,
  # and the run trained to the end with exit code 0.
  import gc
  from sfljax import cli
  reported, before = [], sys.unraisablehook
  sys.unraisablehook = reported.append   # what the interpreter would print
  startup = cli._StartUp().install()
  fired = []

  def callback(phase, info):
    if phase == "start" and not fired:
      fired.append(1)
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(1000):   # Python bytecode: the handler runs here, inside the callback.
        pass

  gc.callbacks.append(callback)
  try:
    gc.collect()   # The KeyboardInterrupt the handler raises is swallowed here.
    assert fired and startup.requested == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      startup.check()
    assert reported == []   # not printed as "Exception ignored in ..."
    other = type("Info", (), {"exc_value": ValueError("x")})()
    sys.unraisablehook(other)
    assert reported == [other]   # anything else still reaches the previous hook
  finally:
    gc.callbacks.remove(callback)
    startup.restore()
    assert sys.unraisablehook == reported.append
    sys.unraisablehook = before
