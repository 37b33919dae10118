"""Comparing finished (or interrupted) runs: a plain-text table and a figure.

>>> runs = load_runs(["runs/a", "runs/b"])   # doctest: +SKIP
>>> print(summary_table(runs))               # doctest: +SKIP
>>> plot_runs(runs, "compare.png")           # doctest: +SKIP

On the command line (wired in :mod:`sfljax.cli` through :func:`add_commands` and
:func:`run_command`)::

  sfljax summary RUN_DIR [RUN_DIR ...]
  sfljax plot RUN_DIR [RUN_DIR ...] --out fig.png

A run directory is what ``sfljax train --out DIR`` writes: ``config.json``,
``metrics.jsonl`` (one JSON object per finished round) and, once training ends,
``summary.json``. Every number here is recomputed from ``metrics.jsonl``, so an
interrupted run (no ``summary.json``, maybe a torn last line) compares like a
finished one. Only the standard library is needed, and matplotlib for plots.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
from typing import Any, Sequence

COMMANDS = ("plot", "summary")
"""The subcommands that :func:`add_commands` adds and :func:`run_command` runs."""

_RUN_HINT = "pass a directory written by `sfljax train --out DIR`"


class ReportError(ValueError):
  """A run directory or output path that cannot be used; the message is one line naming
  the file, what is wrong and what to do."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One run directory, read.

  ``metrics`` holds one dict per finished round, in order, each round once (see
  :func:`load_run`); ``summary`` is None for a run that did not finish; ``label`` names
  the run in tables and legends (:func:`load_runs` makes the labels of runs compared
  together tell them apart).
  """
  path: str
  config: dict[str, Any]
  resolved: dict[str, Any]
  metrics: list[dict[str, Any]]
  summary: dict[str, Any] | None
  label: str


# -- reading -------------------------------------------------------------------------------

def _read_text(file: str) -> str:
  try:
    with open(file, encoding="utf-8") as f:
      return f.read()
  except UnicodeDecodeError:
    raise ReportError(f"{file}: not UTF-8 text; restore the file or leave this run out") \
        from None
  except OSError as e:
    raise ReportError(f"{file}: cannot read it ({e.strerror or e}); check its permissions") \
        from None


def _read_json(file: str) -> Any:
  try:
    return json.loads(_read_text(file))
  except json.JSONDecodeError as e:
    raise ReportError(f"{file}: broken JSON (line {e.lineno} column {e.colno}: {e.msg}); "
                      "restore the file or leave this run out") from None


def _read_metrics(file: str) -> list[dict[str, Any]]:
  """The rows of metrics.jsonl. A broken last line is a write torn by a killed run and is
  dropped; a broken line before it is an error. When a round number repeats (a resumed
  run that appended rounds the interrupted one had logged past its checkpoint), the later
  rows win: rows logged earlier for that round and after it are dropped."""
  lines = _read_text(file).split("\n")
  while lines and not lines[-1].strip():
    lines.pop()
  rows: list[dict[str, Any]] = []
  for n, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError as e:
      if n == len(lines):
        break   # Torn by a run killed mid-write: the rounds before it stand.
      raise ReportError(f"{file}: line {n} is broken JSON ({e.msg}, column {e.colno}) but is "
                        f"not the last line, so it is not a torn write; fix or delete line "
                        f"{n}") from None
    if not isinstance(row, dict):
      raise ReportError(f"{file}: line {n} is {type(row).__name__}, not a JSON object of one "
                        f"round's metrics; fix or delete line {n}")
    r = row.get("round")
    if isinstance(r, bool) or not isinstance(r, int):
      raise ReportError(f"{file}: line {n} has no integer 'round' ({r!r}); fix or delete "
                        f"line {n}")
    while rows and rows[-1]["round"] >= r:
      rows.pop()
    rows.append(row)
  return rows


def load_run(path: str | os.PathLike, label: str | None = None) -> Run:
  """Reads a run directory; ``label`` defaults to the run's algorithm (use
  :func:`load_runs` for labels that tell several runs apart).

  Raises :class:`ReportError` for a path that is not a directory, a missing
  ``config.json`` or ``metrics.jsonl``, broken JSON (except a torn last line of
  ``metrics.jsonl``, which is dropped) or a config.json without a ``config`` object.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise ReportError(f"{path}: no such directory; {_RUN_HINT}")
  if not os.path.isdir(path):
    raise ReportError(f"{path}: not a directory; {_RUN_HINT}")
  config_file = os.path.join(path, "config.json")
  metrics_file = os.path.join(path, "metrics.jsonl")
  summary_file = os.path.join(path, "summary.json")
  if not os.path.isfile(config_file):
    raise ReportError(f"{config_file}: missing, so {path} is not an sfljax run; {_RUN_HINT}")
  if not os.path.isfile(metrics_file):
    raise ReportError(f"{metrics_file}: missing (the run wrote its config but no metrics "
                      "file); rerun it or leave it out")
  doc = _read_json(config_file)
  if not isinstance(doc, dict) or not isinstance(doc.get("config"), dict):
    raise ReportError(f"{config_file}: no \"config\" object, so it is not an sfljax run's "
                      f"config; {_RUN_HINT}")
  resolved = doc.get("resolved")
  metrics = _read_metrics(metrics_file)
  summary = _read_json(summary_file) if os.path.isfile(summary_file) else None
  if summary is not None and not isinstance(summary, dict):
    raise ReportError(f"{summary_file}: not a JSON object; restore it or delete it (the "
                      "table does not need it)")
  config = doc["config"]
  if label is None:
    label = str(config.get("algorithm") or _dir_name(path))
  return Run(path=path, config=config, resolved=resolved if isinstance(resolved, dict) else {},
             metrics=metrics, summary=summary, label=label)


def load_runs(paths: Sequence[str | os.PathLike]) -> list[Run]:
  """Reads run directories and labels them together (:func:`run_labels`)."""
  runs = [load_run(p) for p in paths]
  return [dataclasses.replace(r, label=text) for r, text in zip(runs, run_labels(runs))]


# -- labels --------------------------------------------------------------------------------

def _dir_name(path: str) -> str:
  return os.path.basename(os.path.normpath(os.path.abspath(path)))


def _value_text(v: Any) -> str:
  if isinstance(v, float):
    return format(v, "g")
  if isinstance(v, (list, dict)):
    return json.dumps(v, separators=(",", ":"), sort_keys=True)
  return str(v)


def run_labels(runs: Sequence[Run]) -> list[str]:
  """Labels that tell ``runs`` apart: the algorithm, then ``field=value`` for every config
  field (alphabetical) whose value is not the same in all of the runs, e.g.
  ``"sflv1 clients=5 lr=0.001"`` and ``"sflv2 clients=10 lr=0.001"``. Runs that would
  still share a label (identical configs) get their directory name added,
  ``"sflv2 (seed-a)"``; if even that repeats, the path as given (and the run's
  position, ``#2``, for a directory passed twice)."""
  configs = [r.config for r in runs]
  keys = sorted({k for c in configs for k in c} - {"algorithm"})
  differing = [k for k in keys   # A field some configs lack differs too.
               if len({json.dumps(c[k], sort_keys=True, default=str) if k in c else None
                       for c in configs}) > 1]
  labels = []
  for r in runs:
    words = [str(r.config.get("algorithm") or "run")]
    words += [f"{k}={_value_text(r.config[k])}" for k in differing if k in r.config]
    labels.append(" ".join(words))
  base = list(labels)
  for name in (lambda i: f" ({_dir_name(runs[i].path)})", lambda i: f" ({runs[i].path})",
               lambda i: f" ({runs[i].path}) #{i + 1}"):
    repeated = {text for text in labels if labels.count(text) > 1}
    if not repeated:
      break
    labels = [base[i] + name(i) if text in repeated else text
              for i, text in enumerate(labels)]
  return labels


def _labels_of(runs: Sequence[Run]) -> list[str]:
  """The runs' own labels, or :func:`run_labels` where those repeat."""
  own = [r.label for r in runs]
  return own if len(set(own)) == len(own) else run_labels(runs)


# -- numbers -------------------------------------------------------------------------------

def _finite(v: Any) -> float | None:
  if isinstance(v, bool) or not isinstance(v, (int, float)):
    return None
  return float(v) if math.isfinite(v) else None


def run_stats(run: Run) -> dict[str, Any]:
  """The numbers of :func:`summary_table` for one run (None where there is none):
  ``rounds`` (the last finished round), ``best_test_accuracy`` and ``best_round`` (the
  highest finite test accuracy, first round on a tie), ``final_test_accuracy`` (the last
  round's), ``median_seconds`` (per round), ``bytes_per_round`` (mean over the rounds of
  bytes_client_to_server + bytes_server_to_client)."""
  m = run.metrics
  acc = [(_finite(row.get("test_accuracy")), row["round"]) for row in m]
  scored = [(a, r) for a, r in acc if a is not None]
  best = max(scored, key=lambda ar: (ar[0], -ar[1])) if scored else (None, None)
  seconds = [s for s in (_finite(row.get("seconds")) for row in m) if s is not None]
  traffic = []
  for row in m:
    up = _finite(row.get("bytes_client_to_server"))
    down = _finite(row.get("bytes_server_to_client"))
    if up is not None and down is not None:
      traffic.append(up + down)
  return {"rounds": m[-1]["round"] if m else 0,
          "best_test_accuracy": best[0], "best_round": best[1],
          "final_test_accuracy": acc[-1][0] if acc else None,
          "median_seconds": statistics.median(seconds) if seconds else None,
          "bytes_per_round": sum(traffic) / len(traffic) if traffic else None}


def human_bytes(n: float | None) -> str:
  """``12.3 MB`` (decimal units: kB = 1000 B); ``-`` for None or non-finite."""
  if n is None or not math.isfinite(n):
    return "-"
  if abs(n) < 1000:
    return f"{n:.0f} B"
  for unit in ("kB", "MB", "GB", "TB", "PB"):
    n /= 1000
    if abs(n) < 999.5 or unit == "PB":   # 999.5 would print as 1000.
      return f"{n:.1f} {unit}" if abs(n) < 99.95 else f"{n:.0f} {unit}"
  raise AssertionError("unreachable")


def summary_table(runs: Sequence[Run]) -> str:
  """A plain-text table, one row per run: label, rounds, best test accuracy and its
  round, final test accuracy, median seconds per round, client<->server bytes per round.
  Missing or non-finite values are shown as ``-``."""
  def num(x, fmt):
    return "-" if x is None else format(x, fmt)

  header = ["run", "rounds", "best test acc", "at round", "final test acc", "median s/round",
            "bytes/round"]
  rows = []
  for label, run in zip(_labels_of(runs), runs):
    s = run_stats(run)
    rows.append([label, str(s["rounds"]), num(s["best_test_accuracy"], ".4f"),
                 num(s["best_round"], "d"), num(s["final_test_accuracy"], ".4f"),
                 num(s["median_seconds"], ".3f"), human_bytes(s["bytes_per_round"])])
  widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]

  def line(cells):
    return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


# -- plotting ------------------------------------------------------------------------------

def _series(run: Run, key: str) -> tuple[list[int], list[float]]:
  xs, ys = [], []
  for row in run.metrics:
    v = _finite(row.get(key))
    xs.append(row["round"])
    ys.append(math.nan if v is None else v)   # A gap in the line.
  return xs, ys


def plot_runs(runs: Sequence[Run], out_png: str | os.PathLike) -> str:
  """Saves one figure comparing ``runs``: test accuracy per round (left) and train loss
  per round, solid, with test loss dashed in the same colour (right); one line per run,
  labelled with its label. Returns the path. The directory of ``out_png`` must exist;
  the format follows its extension (PNG without one). Uses matplotlib's object API with
  the Agg canvas (no pyplot, no global backend change)."""
  out = os.fspath(out_png)
  if not runs:
    raise ReportError("plot: no runs to plot; pass at least one run directory")
  folder = os.path.dirname(os.path.abspath(out))
  if not os.path.isdir(folder):
    raise ReportError(f"{out}: the directory {folder} does not exist; create it or choose "
                      "another --out")
  if os.path.isdir(out):
    raise ReportError(f"{out}: is a directory; give a file name such as {out}/compare.png")
  fmt = os.path.splitext(out)[1].lstrip(".").lower() or "png"
  try:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError:
    raise ReportError('plotting needs matplotlib: pip install "sfljax[plot]"') from None
  if fmt not in FigureCanvasAgg(Figure()).get_supported_filetypes():
    raise ReportError(f"{out}: matplotlib cannot write .{fmt} files; use .png, .pdf or .svg")

  fig = Figure(figsize=(12, 4.5), layout="constrained")
  FigureCanvasAgg(fig)
  acc_ax, loss_ax = fig.subplots(1, 2)
  colors = matplotlib.colormaps["tab10" if len(runs) <= 10 else "tab20"]
  for i, (label, run) in enumerate(zip(_labels_of(runs), runs)):
    color = colors(i % colors.N)
    marker = "o" if len(run.metrics) <= 30 else None
    acc_ax.plot(*_series(run, "test_accuracy"), color=color, marker=marker, markersize=3,
                label=label)
    loss_ax.plot(*_series(run, "train_loss"), color=color, marker=marker, markersize=3,
                 label=label)
    loss_ax.plot(*_series(run, "test_loss"), color=color, linestyle="--")
  acc_ax.set(title="test accuracy", xlabel="round", ylabel="accuracy")
  loss_ax.set(title="train loss (solid), test loss (dashed)", xlabel="round", ylabel="loss")
  for ax in (acc_ax, loss_ax):
    ax.grid(True, alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)
  acc_ax.legend(fontsize="small")
  tmp = os.path.join(folder, f".{os.path.basename(out)}.{os.getpid()}.tmp")
  try:
    fig.savefig(tmp, format=fmt, dpi=120)
    os.replace(tmp, out)
  except OSError as e:
    raise ReportError(f"{out}: cannot write it ({e.strerror or e}); choose another --out") \
        from None
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return out


# -- command line --------------------------------------------------------------------------

def add_commands(subparsers, parser_class=None) -> None:
  """Adds ``plot`` and ``summary`` to the CLI's ``subparsers`` (the object
  ``add_subparsers`` returned). ``parser_class`` is accepted for symmetry with the
  CLI's other commands but not needed: ``add_subparsers(parser_class=...)`` already
  makes every subparser of that class."""
  del parser_class
  p = subparsers.add_parser("plot", help="plot test accuracy and losses per round of runs")
  p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories to compare")
  p.add_argument("--out", required=True, metavar="PNG",
                 help="the figure's file (its directory must exist)")
  s = subparsers.add_parser("summary", help="a table comparing runs")
  s.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories to compare")


def run_command(args) -> int:
  """Runs ``args.command`` (one of :data:`COMMANDS`): ``summary`` prints the table,
  ``plot`` writes the figure and prints where. Returns the exit code (0); bad input
  raises :class:`ReportError`."""
  if args.command not in COMMANDS:
    raise ValueError(f"run_command: not a report command: {args.command!r}")
  runs = load_runs(args.runs)
  if args.command == "summary":
    print(summary_table(runs))
  else:
    print(f"plot written to {plot_runs(runs, args.out)}")
  return 0
