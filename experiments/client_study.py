"""How the number of clients affects SFLV1, SFLV2, SL and FL (a small version of
the paper's Fig. 3 study), on real Fashion-MNIST with LeNet.

  python experiments/client_study.py --data-dir /usr/share/datasets/fashion-mnist \
      --out experiments/results/client_study

Every (algorithm, K) run trains on the same seeded subset of the training
set (``--train-samples``), IID over K clients, and is evaluated each round
on the full test set. A finished run (its metrics file has all rounds) is
skipped, so the study can be resumed. Writes ``OUT/<alg>_K<k>.jsonl``,
``OUT/results.md`` and ``OUT/accuracy.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import numpy as np

from sfljax import data
from sfljax.train import Config, Experiment


def _load(path):
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(l) for l in f if l.strip()]


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--data-dir", default="/usr/share/datasets/fashion-mnist")
  ap.add_argument("--clients", type=int, nargs="+", default=[5, 10, 20, 50, 100])
  ap.add_argument("--algorithms", nargs="+", default=["sflv1", "sflv2", "sl", "fl"])
  ap.add_argument("--train-samples", type=int, default=12000)
  ap.add_argument("--rounds", type=int, default=10)
  ap.add_argument("--batch-size", type=int, default=64)
  ap.add_argument("--lr", type=float, default=1e-3)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--out", default="experiments/results/client_study")
  args = ap.parse_args(argv)

  full = data.load_dataset("fashion_mnist", data_dir=args.data_dir)
  keep = np.sort(data.rng_for(args.seed, 9).permutation(len(full.y_train))[:args.train_samples])
  ds = dataclasses.replace(full, x_train=full.x_train[keep], y_train=full.y_train[keep])
  os.makedirs(args.out, exist_ok=True)
  for k in args.clients:
    for alg in args.algorithms:
      path = os.path.join(args.out, f"{alg}_K{k}.jsonl")
      if len(_load(path)) >= args.rounds:
        continue
      cfg = Config(algorithm=alg, dataset="fashion_mnist", clients=k, rounds=args.rounds,
                   batch_size=args.batch_size, lr=args.lr, seed=args.seed)
      exp = Experiment(cfg, dataset=ds)
      with open(path + ".tmp", "w") as f:
        def log(m, f=f):
          f.write(json.dumps(m) + "\n")
          f.flush()
        exp.run(callback=log)
      os.replace(path + ".tmp", path)
      m = _load(path)
      print(f"{alg:6s} K={k:4d}: best {max(r['test_accuracy'] for r in m):.4f} "
            f"final {m[-1]['test_accuracy']:.4f}  {np.median([r['seconds'] for r in m]):.2f} s/round"
            f"  compile {exp.compile_seconds:.1f} s", flush=True)

  lines = ["| algorithm | " + " | ".join(f"K={k}" for k in args.clients) + " |",
           "| --- |" + " --- |" * len(args.clients)]
  for alg in args.algorithms:
    cells = []
    for k in args.clients:
      m = _load(os.path.join(args.out, f"{alg}_K{k}.jsonl"))
      cells.append(f"{100 * max(r['test_accuracy'] for r in m):.1f} / "
                   f"{100 * m[-1]['test_accuracy']:.1f} "
                   f"({np.median([r['seconds'] for r in m]):.1f} s)" if m else "—")
    lines.append(f"| {alg} | " + " | ".join(cells) + " |")
  with open(os.path.join(args.out, "results.md"), "w") as f:
    f.write(f"Fashion-MNIST, LeNet, {args.train_samples} training samples (seeded subset), IID, "
            f"batch {args.batch_size}, Adam lr {args.lr}, {args.rounds} rounds, seed {args.seed}. "
            "Cells: best / final test accuracy % on the full 10,000-image test set "
            "(median seconds per round on this machine).\n\n" + "\n".join(lines) + "\n")
  print("\n".join(lines))

  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(4 * len(args.algorithms), 3.6))
  FigureCanvasAgg(fig)
  for i, alg in enumerate(args.algorithms):
    ax = fig.add_subplot(1, len(args.algorithms), i + 1)
    for k in args.clients:
      m = _load(os.path.join(args.out, f"{alg}_K{k}.jsonl"))
      ax.plot([r["round"] for r in m], [100 * r["test_accuracy"] for r in m], label=f"K={k}")
    ax.set_title(alg)
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)
    if i == 0:
      ax.set_ylabel("test accuracy (%)")
      ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "accuracy.png"), dpi=110)


if __name__ == "__main__":
  main()
