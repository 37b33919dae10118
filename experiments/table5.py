"""Reproduces one row of the SplitFed paper's Table 5 (all five schemes).

  python experiments/table5.py experiments/configs/table5/fashion_mnist_lenet.json \
      --data-dir /usr/share/datasets/fashion-mnist --rounds 50 \
      --out experiments/results/table5_fashion_mnist_lenet

Each scheme runs through the CLI (``sfljax train``) into ``OUT/<scheme>/``; a
scheme whose run is already complete is skipped, so schemes can be run in
separate processes (``--schemes sl``) and the report rebuilt afterwards
(``--report-only``). The report is ``OUT/results.md`` (best and final test
accuracy per scheme next to the paper's) and ``OUT/accuracy.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from sfljax.cli import main as sfljax_main

FLAGS = {"dataset": "--dataset", "model": "--model", "clients": "--clients",
         "partition": "--partition", "local_epochs": "--local-epochs",
         "batch_size": "--batch-size", "optimizer": "--optimizer", "lr": "--lr",
         "rounds": "--rounds", "seed": "--seed"}


def _metrics(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


def run_scheme(spec, scheme, out, rounds, data_dir, extra):
  run_dir = os.path.join(out, scheme)
  if len(_metrics(os.path.join(run_dir, "metrics.jsonl"))) >= rounds and \
      os.path.exists(os.path.join(run_dir, "summary.json")):
    print(f"{scheme}: complete, skipped")
    return 0
  cfg = dict(spec["config"], rounds=rounds)
  argv = ["train", "--algorithm", scheme, "--out", run_dir, "--overwrite"]
  for key, flag in FLAGS.items():
    argv += [flag, str(cfg[key])]
  if data_dir:
    argv += ["--data-dir", data_dir]
  print("sfljax " + " ".join(argv + extra), flush=True)
  return sfljax_main(argv + extra)


def report(spec, out):
  rows, curves = [], {}
  for scheme in spec["schemes"]:
    m = _metrics(os.path.join(out, scheme, "metrics.jsonl"))
    if not m:
      continue
    curves[scheme] = m
    best = max(m, key=lambda r: r["client_test_accuracy"])
    rows.append((scheme, len(m), 100 * best["client_test_accuracy"], best["round"],
                 100 * m[-1]["client_test_accuracy"], 100 * max(r["test_accuracy"] for r in m),
                 spec["paper_accuracy"][scheme],
                 sum(r["seconds"] for r in m) / len(m)))
  lines = ["| scheme | rounds | best test acc. % (round) | final % | best global-model acc. % "
           "| paper % | best − paper | s / round |",
           "| --- | --- | --- | --- | --- | --- | --- | --- |"]
  for s, n, best, rnd, final, glob, paper, sec in rows:
    lines.append(f"| {s} | {n} | {best:.2f} ({rnd}) | {final:.2f} | {glob:.2f} | {paper:.1f} "
                 f"| {best - paper:+.2f} | {sec:.2f} |")
  table = "\n".join(lines)
  with open(os.path.join(out, "results.md"), "w") as f:
    f.write(f"# {spec['description']}\n\nTest accuracy is the mean over the 5 clients' test "
            "shards (the paper's metric) of the round's global model; the global-model "
            "column is the same model on the whole test set.\n\n" + table + "\n")
  print(table)
  try:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError:
    print("matplotlib missing: no plot (pip install 'sfljax[plot]')")
    return
  fig = Figure(figsize=(7, 4.5))
  FigureCanvasAgg(fig)
  ax = fig.add_subplot()
  styles = ("-", "--", "-.", ":", (0, (5, 1)))   # Coinciding curves stay visible.
  for i, (scheme, m) in enumerate(curves.items()):
    ax.plot([r["round"] for r in m], [100 * r["client_test_accuracy"] for r in m], label=scheme,
            linestyle=styles[i % len(styles)], linewidth=2.2 if i % 2 else 1.4)
  ax.set_xlabel("global epoch (round)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(spec["description"].split(";")[0])
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(out, "accuracy.png"), dpi=120)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("config")
  p.add_argument("--out", required=True)
  p.add_argument("--rounds", type=int, default=None, help="default: the config's (200)")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--schemes", nargs="+", default=None)
  p.add_argument("--report-only", action="store_true")
  args, extra = p.parse_known_args(argv)
  with open(args.config) as f:
    spec = json.load(f)
  rounds = args.rounds or spec["config"]["rounds"]
  os.makedirs(args.out, exist_ok=True)
  if not args.report_only:
    for scheme in args.schemes or spec["schemes"]:
      rc = run_scheme(spec, scheme, args.out, rounds, args.data_dir, extra)
      if rc:
        return rc
  report(spec, args.out)
  return 0


if __name__ == "__main__":
  sys.exit(main())
