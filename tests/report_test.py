"""sfljax.report on run directories written by hand, with numbers worked out by hand."""

import argparse
import json
import math
import os
import re
import subprocess
import sys

import pytest

from sfljax import report
from sfljax.report import ReportError

BASE = {"algorithm": "sflv1", "clients": 5, "lr": 0.001, "rounds": 4, "seed": 0,
        "model": "lenet", "dataset": "digits", "norm": None}


def _row(r, acc, seconds=None, up=None, down=None, **extra):
  m = {"round": r, "test_accuracy": acc, "train_loss": 2.0 / r, "test_loss": 2.5 / r,
       "train_accuracy": 0.1 * r, "client_train_loss": [0.1, None]}
  if seconds is not None:
    m["seconds"] = seconds
  if up is not None:
    m["bytes_client_to_server"], m["bytes_server_to_client"] = up, down
  m.update(extra)
  return m


def _write_run(path, config, rows, tail="", summary=None):
  os.makedirs(path)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump({"config": config, "resolved": {"cut": 2}, "environment": {}}, f)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    for m in rows:
      f.write(json.dumps(m) + "\n")   # NaN/Infinity as Python's json writes them.
    f.write(tail)
  if summary is not None:
    with open(os.path.join(path, "summary.json"), "w") as f:
      json.dump(summary, f)
  return str(path)


@pytest.fixture
def runs(tmp_path):
  """a: sflv1, finished. b: sflv2 with lr=0.01, killed mid-write (torn last line).
  c: the same config as a, its last test accuracy NaN and no timings or traffic."""
  a = _write_run(tmp_path / "a", BASE,
                 [_row(r, acc, s, 1_000_000, 2_000_000)
                  for r, acc, s in ((1, 0.5, 1.0), (2, 0.7, 3.0), (3, 0.9, 2.0), (4, 0.8, 10.0))],
                 summary={"best_test_accuracy": 0.9, "best_round": 3})
  b = _write_run(tmp_path / "b", dict(BASE, algorithm="sflv2", lr=0.01),
                 [_row(1, 0.6, 0.5, 500, 700), _row(2, math.nan, 0.7, 500, 700),
                  _row(3, 0.6, math.inf)],
                 tail='{"round": 4, "test_accuracy": 0.')
  c = _write_run(tmp_path / "c", BASE, [_row(1, 0.4), _row(2, math.nan)])
  return a, b, c


def _table_rows(text):
  lines = text.splitlines()
  assert set(lines[1]) <= {"-", " "}
  return [re.split(r" {2,}", line) for line in [lines[0]] + lines[2:]]


def test_summary_table_numbers(runs):
  rows = _table_rows(report.summary_table(report.load_runs(runs)))
  assert rows == [
      ["run", "rounds", "best test acc", "at round", "final test acc", "median s/round",
       "bytes/round"],
      # a: best 0.9 in round 3, final 0.8, median of 1, 3, 2, 10 s = 2.5, 1 MB + 2 MB a round.
      ["sflv1 lr=0.001 (a)", "4", "0.9000", "3", "0.8000", "2.500", "3.0 MB"],
      # b: the torn line 4 is dropped; NaN accuracy skipped, the tie goes to round 1;
      # median of the finite 0.5, 0.7 s; round 3 logged no traffic: (1200 + 1200) / 2.
      ["sflv2 lr=0.01", "3", "0.6000", "1", "0.6000", "0.600", "1.2 kB"],
      # c: final accuracy NaN, no seconds, no bytes.
      ["sflv1 lr=0.001 (c)", "2", "0.4000", "1", "-", "-", "-"]]
  stats = report.run_stats(report.load_run(runs[0]))
  assert stats == {"rounds": 4, "best_test_accuracy": 0.9, "best_round": 3,
                   "final_test_accuracy": 0.8, "median_seconds": 2.5,
                   "bytes_per_round": 3_000_000.0}


def test_a_run_without_rounds(tmp_path):
  empty = _write_run(tmp_path / "empty", BASE, [])
  run = report.load_run(empty)
  assert run.metrics == [] and run.summary is None and run.label == "sflv1"
  assert _table_rows(report.summary_table([run]))[1] == ["sflv1", "0", "-", "-", "-", "-", "-"]


def test_labels(runs, tmp_path):
  a, b, c = runs
  assert [r.label for r in report.load_runs([a, b])] == ["sflv1 lr=0.001", "sflv2 lr=0.01"]
  # Identical configs: the directory name tells them apart.
  assert [r.label for r in report.load_runs([a, c])] == ["sflv1 (a)", "sflv1 (c)"]
  d = _write_run(tmp_path / "d", dict(BASE, clients=10, norm="group"), [_row(1, 0.5)])
  assert [r.label for r in report.load_runs([a, b, d])] == [
      "sflv1 clients=5 lr=0.001 norm=None", "sflv2 clients=5 lr=0.01 norm=None",
      "sflv1 clients=10 lr=0.001 norm=group"]
  # The same directory twice: the path as given, then a number.
  assert [r.label for r in report.load_runs([a, a])] == [f"sflv1 ({a}) #1", f"sflv1 ({a}) #2"]
  labels = [r.label for r in report.load_runs([a, c, a])]
  assert labels == [f"sflv1 ({a}) #1", "sflv1 (c)", f"sflv1 ({a}) #3"]
  # A field only one config has (a newer version) differs.
  e = _write_run(tmp_path / "e", dict(BASE, precision="bf16"), [_row(1, 0.5)])
  assert [r.label for r in report.load_runs([a, e])] == ["sflv1", "sflv1 precision=bf16"]
  # Runs read one by one keep their own labels unless they repeat.
  one = [report.load_run(a, label="mine"), report.load_run(b)]
  assert _table_rows(report.summary_table(one))[1][0] == "mine"
  assert _table_rows(report.summary_table([report.load_run(a), report.load_run(c)]))[2][0] \
      == "sflv1 (c)"


def test_load_run_contents(runs):
  a = report.load_run(runs[0])
  assert a.path == runs[0] and a.config == BASE and a.resolved == {"cut": 2}
  assert a.summary == {"best_test_accuracy": 0.9, "best_round": 3}
  assert [m["round"] for m in a.metrics] == [1, 2, 3, 4]
  assert a.metrics[0]["client_train_loss"] == [0.1, None]


def test_torn_last_line_is_dropped(tmp_path):
  for i, tail in enumerate(['{"round": 3, "test_acc', '{"round": 3, "test_acc\n', "\n\n", "{"]):
    path = _write_run(tmp_path / f"r{i}", BASE, [_row(1, 0.5), _row(2, 0.6)], tail=tail)
    assert [m["round"] for m in report.load_run(path).metrics] == [1, 2]


def test_resumed_run_rounds_appear_once(tmp_path):
  # Checkpoint at 2, interrupted after 3, resumed from 2: the resumed rows win.
  path = _write_run(tmp_path / "resumed", BASE,
                    [_row(1, 0.1), _row(2, 0.2), _row(3, 0.3), _row(3, 0.33), _row(4, 0.4)])
  assert [(m["round"], m["test_accuracy"]) for m in report.load_run(path).metrics] == [
      (1, 0.1), (2, 0.2), (3, 0.33), (4, 0.4)]


def _error(path) -> str:
  with pytest.raises(ReportError) as e:
    report.load_run(path)
  message = str(e.value)
  assert "\n" not in message
  return message


def test_errors_name_the_file_and_line(tmp_path, runs):
  assert "no such directory" in _error(tmp_path / "nope")
  (tmp_path / "file").write_text("x")
  assert "not a directory" in _error(tmp_path / "file")
  (tmp_path / "bare").mkdir()
  msg = _error(tmp_path / "bare")
  assert os.path.join(str(tmp_path / "bare"), "config.json") in msg and "missing" in msg
  os.remove(os.path.join(runs[0], "metrics.jsonl"))
  msg = _error(runs[0])
  assert os.path.join(runs[0], "metrics.jsonl") in msg and "missing" in msg

  broken = _write_run(tmp_path / "broken", BASE, [_row(1, 0.5)])
  with open(os.path.join(broken, "config.json"), "w") as f:
    f.write('{"config": {"algorithm": "sfl')
  msg = _error(broken)
  assert os.path.join(broken, "config.json") in msg and "broken JSON" in msg

  notrun = _write_run(tmp_path / "notrun", BASE, [_row(1, 0.5)])
  with open(os.path.join(notrun, "config.json"), "w") as f:
    f.write('{"algorithm": "sflv1"}')
  assert 'no "config" object' in _error(notrun)

  middle = _write_run(tmp_path / "middle", BASE, [_row(1, 0.5)],
                      tail='{"round": 2, "test_accuracy"\n' + json.dumps(_row(3, 0.7)) + "\n")
  msg = _error(middle)
  assert os.path.join(middle, "metrics.jsonl") in msg and "line 2 " in msg

  for bad, what in (("[1, 2]", "list"), ('{"test_accuracy": 0.5}', "no integer 'round'")):
    path = _write_run(tmp_path / f"bad{what[:2]}", BASE, [_row(1, 0.5)],
                      tail=bad + "\n" + json.dumps(_row(2, 0.6)) + "\n")
    msg = _error(path)
    assert "line 2" in msg and what in msg

  summ = _write_run(tmp_path / "summ", BASE, [_row(1, 0.5)])
  with open(os.path.join(summ, "summary.json"), "w") as f:
    f.write("{")
  assert os.path.join(summ, "summary.json") in _error(summ)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_writes_a_png(runs, tmp_path):
  matplotlib = pytest.importorskip("matplotlib")
  import matplotlib.image
  out = str(tmp_path / "compare.png")
  assert report.plot_runs(report.load_runs(runs), out) == out
  with open(out, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  image = matplotlib.image.imread(out)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  assert image[..., :3].std() > 0          # Not a blank canvas.
  assert sorted(os.listdir(tmp_path)) == ["a", "b", "c", "compare.png"]   # No temp file left.


def test_plot_refuses_bad_outputs(runs, tmp_path):
  loaded = report.load_runs(runs)
  with pytest.raises(ReportError, match="does not exist"):
    report.plot_runs(loaded, str(tmp_path / "missing" / "fig.png"))
  with pytest.raises(ReportError, match="is a directory"):
    report.plot_runs(loaded, str(tmp_path))
  with pytest.raises(ReportError, match="cannot write .xyz"):
    report.plot_runs(loaded, str(tmp_path / "fig.xyz"))
  with pytest.raises(ReportError, match="no runs"):
    report.plot_runs([], str(tmp_path / "fig.png"))
  assert not os.path.exists(tmp_path / "missing")


class _Parser(argparse.ArgumentParser):   # Like sfljax.cli's: errors raise.
  def error(self, message):
    raise ValueError(message)


def _cli():
  p = _Parser(prog="sfljax")
  sub = p.add_subparsers(dest="command", parser_class=_Parser)
  sub.required = True
  report.add_commands(sub, _Parser)
  return p


def test_commands(runs, tmp_path, capsys):
  a, b, c = runs
  args = _cli().parse_args(["summary", a, b])
  assert report.run_command(args) == 0
  assert capsys.readouterr().out == report.summary_table(report.load_runs([a, b])) + "\n"
  out = str(tmp_path / "fig.png")
  assert report.run_command(_cli().parse_args(["plot", a, b, c, "--out", out])) == 0
  assert capsys.readouterr().out == f"plot written to {out}\n"
  with open(out, "rb") as f:
    assert f.read(8) == PNG_SIGNATURE
  with pytest.raises(ValueError, match="--out"):
    _cli().parse_args(["plot", a])
  with pytest.raises(ValueError):
    _cli().parse_args(["summary"])
  with pytest.raises(ReportError, match="no such directory"):
    report.run_command(_cli().parse_args(["summary", a, str(tmp_path / "nope")]))
  assert set(report.COMMANDS) == {"plot", "summary"}


def test_human_bytes():
  assert [report.human_bytes(n) for n in (0, 999, 1000, 12_345, 99_949, 99_950, 999_499,
                                          999_500, 12_300_000, 4.5e9, 2e15, 3e18)] == [
      "0 B", "999 B", "1.0 kB", "12.3 kB", "99.9 kB", "100 kB", "999 kB",
      "1.0 MB", "12.3 MB", "4.5 GB", "2.0 PB", "3000 PB"]
  assert report.human_bytes(None) == report.human_bytes(math.nan) == "-"


def test_import_is_light():
  code = ("import sys, sfljax.report; "
          "assert 'matplotlib' not in sys.modules, 'matplotlib imported eagerly'")
  subprocess.run([sys.executable, "-c", code], check=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
