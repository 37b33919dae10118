"""The paper's privacy experiment on data here, and what DP costs per round.

The paper (Thapa et al., Fig. 5): SFLV1, AlexNet, MNIST, 5 clients, client-side
DP-SGD at epsilon = 0.5 (delta = 1e-5) with the PixelDP noise layer after the
first convolution at epsilon' in {0.5, 1, 2, 5, none}; about 40 / 64 / 73 / 77
/ 78 % test accuracy after 50 global epochs. MNIST cannot be downloaded here:
this runs the sweep on Fashion-MNIST (Debian's ``dataset-fashion-mnist``) and
on the embedded digits, plus a sweep of the client-side epsilon without
PixelDP, and writes a table, a JSON file and a privacy-utility plot::

  python experiments/privacy.py sweep --dataset digits --model lenet --rounds 50 --draws 20 \\
      --out experiments/results/privacy/digits
  python experiments/privacy.py sweep --dataset fashion_mnist \\
      --data-dir /usr/share/datasets/fashion-mnist --model lenet --rounds 2 --batch-size 64 \\
      --draws 20 --out experiments/results/privacy/fashion_mnist
  python experiments/privacy.py sweep --dataset digits --model alexnet --rounds 3 --draws 20 \\
      --sweeps pixeldp --out experiments/results/privacy/digits_alexnet
  python experiments/privacy.py sweep --dataset fashion_mnist \\
      --data-dir /usr/share/datasets/fashion-mnist --model alexnet --rounds 1 --batch-size 64 \\
      --draws 20 --sweeps pixeldp --out experiments/results/privacy/fashion_mnist_alexnet
  python experiments/privacy.py cost --dataset fashion_mnist \\
      --data-dir /usr/share/datasets/fashion-mnist --rounds 3

``cost`` times rounds with and without DP-SGD (and with the noise layer)
interleaved in one process, after a warm-up round each; medians.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sfljax.config import Config  # noqa: E402
from sfljax.train import Experiment  # noqa: E402

PIXELDP_EPSILONS = (0.5, 1.0, 2.0, 5.0, None)
CLIENT_EPSILONS = (0.5, 1.0, 2.0, 8.0, None)


def base_config(args) -> dict:
  return dict(algorithm="sflv1", dataset=args.dataset, data_dir=args.data_dir,
              model=args.model, norm="none", clients=5, rounds=args.rounds,
              local_epochs=args.local_epochs, batch_size=args.batch_size, optimizer="adam",
              lr=args.lr, seed=args.seed)


def configs(args):
  """(name, client epsilon, PixelDP epsilon', Config) of the sweep."""
  base = base_config(args)
  out = []
  for eps_p in PIXELDP_EPSILONS:
    out.append((args.client_epsilon, eps_p))
  for eps in CLIENT_EPSILONS if args.sweeps == "both" else ():
    if eps != args.client_epsilon:
      out.append((eps, None))
  rows = []
  for eps, eps_p in out:
    kw = dict(base)
    if eps is not None:
      kw.update(dp_clip=args.clip, dp_epsilon=eps, dp_delta=args.delta)
    if eps_p is not None:
      kw.update(pixeldp_epsilon=eps_p, pixeldp_layer=1, pixeldp_draws=args.draws)
    name = f"eps={eps if eps is not None else 'none'}, eps'={eps_p if eps_p is not None else 'none'}"
    rows.append((name, eps, eps_p, Config(**kw)))
  return rows


def sweep(args) -> None:
  os.makedirs(args.out, exist_ok=True)
  results = []
  for name, eps, eps_p, cfg in configs(args):
    t0 = time.perf_counter()
    exp = Experiment(cfg)
    history = exp.run()
    last = history[-1]
    row = {"name": name, "client_epsilon_target": eps, "pixeldp_epsilon": eps_p,
           "noise_multiplier": exp.config.dp_noise, "epsilon": last.get("epsilon"),
           "final_test_accuracy": last["test_accuracy"],
           "best_test_accuracy": max(m["test_accuracy"] for m in history),
           "accuracy_by_round": [m["test_accuracy"] for m in history],
           "seconds": time.perf_counter() - t0, "config": exp.config.to_dict()}
    results.append(row)
    print(f"{name}: final accuracy {row['final_test_accuracy']:.4f} (sigma "
          f"{row['noise_multiplier']}, epsilon {row['epsilon']}), {row['seconds']:.0f} s",
          flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:   # after every row
      json.dump({"args": vars(args), "rows": results}, f, indent=1)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(markdown(results, args))
  plot(results, args)


def markdown(results, args) -> str:
  lines = [f"SFLV1, {args.model} (no normalisation), {args.dataset}, 5 clients, "
           f"{args.rounds} rounds x {args.local_epochs} local epoch(s), batch {args.batch_size}, "
           f"adam lr {args.lr}, clip {args.clip}, delta {args.delta}, seed {args.seed}; PixelDP "
           f"after block 1 (conv1), Laplace, {args.draws or 300} draws per test prediction", "",
           "| client epsilon (target) | PixelDP epsilon' | sigma | epsilon reached | "
           "final test accuracy | best |", "| --- | --- | --- | --- | --- | --- |"]
  for r in results:
    sigma = f"{r['noise_multiplier']:.3f}" if r["noise_multiplier"] is not None else "-"
    reached = f"{r['epsilon']:.3f}" if r["epsilon"] is not None else "-"
    lines.append(f"| {r['client_epsilon_target'] or 'none'} | {r['pixeldp_epsilon'] or 'none'} "
                 f"| {sigma} | {reached} | {r['final_test_accuracy']:.4f} | "
                 f"{r['best_test_accuracy']:.4f} |")
  return "\n".join(lines) + "\n"


def plot(results, args) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  pix = [r for r in results if r["client_epsilon_target"] == args.client_epsilon]
  xs = [r["pixeldp_epsilon"] for r in pix if r["pixeldp_epsilon"] is not None]
  ys = [r["final_test_accuracy"] for r in pix if r["pixeldp_epsilon"] is not None]
  a.plot(xs, ys, "o-", label="PixelDP")
  none = [r["final_test_accuracy"] for r in pix if r["pixeldp_epsilon"] is None]
  if none:
    a.axhline(none[0], ls="--", c="gray", label="no PixelDP")
  a.set_xscale("log")
  a.set(xlabel="PixelDP epsilon'", ylabel="test accuracy", ylim=(0, 1),
        title=f"client epsilon {args.client_epsilon}")
  a.legend()
  cl = [r for r in results if r["pixeldp_epsilon"] is None]
  xs = [r["client_epsilon_target"] for r in cl if r["client_epsilon_target"] is not None]
  ys = [r["final_test_accuracy"] for r in cl if r["client_epsilon_target"] is not None]
  order = np.argsort(xs)
  b.plot(np.array(xs)[order], np.array(ys)[order], "o-", label="client-side DP-SGD")
  none = [r["final_test_accuracy"] for r in cl if r["client_epsilon_target"] is None]
  if none:
    b.axhline(none[0], ls="--", c="gray", label="no DP")
  if xs:
    b.set_xscale("log")
  b.set(xlabel="client-side epsilon (delta %g)" % args.delta, ylabel="test accuracy",
        ylim=(0, 1), title="no PixelDP")
  b.legend()
  fig.suptitle(f"SFLV1 {args.model}, {args.dataset}, 5 clients, {args.rounds} rounds")
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "privacy_utility.png"), dpi=120)


def replot(args) -> None:
  """The table and the plot again from ``OUT/results.json``."""
  with open(os.path.join(args.out, "results.json")) as f:
    saved = json.load(f)
  for key, value in saved["args"].items():
    if key not in ("command", "out"):
      setattr(args, key, value)
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(markdown(saved["rows"], args))
  plot(saved["rows"], args)


def cost(args) -> None:
  """Per-round training seconds: no DP, DP-SGD, DP-SGD + PixelDP, interleaved."""
  base = base_config(args)
  variants = {"no DP": {}, "DP-SGD": dict(dp_clip=args.clip, dp_noise=1.3),
              "DP-SGD + PixelDP": dict(dp_clip=args.clip, dp_noise=1.3, pixeldp_epsilon=1.0,
                                       pixeldp_layer=1)}
  exps, states, times = {}, {}, {k: [] for k in variants}
  for name, kw in variants.items():
    exps[name] = Experiment(Config(**{**base, **kw}))
    states[name] = exps[name].init()
    exps[name].compile(states[name])
    states[name], _ = exps[name].train_round(states[name])   # warm-up
  for _ in range(args.rounds):
    for name, exp in exps.items():
      t0 = time.perf_counter()
      states[name], _ = exp.train_round(states[name])
      times[name].append(time.perf_counter() - t0)
  load = os.getloadavg()[0]
  base_t = statistics.median(times["no DP"])
  print(f"{args.model} on {args.dataset}, SFLV1, 5 clients, batch {args.batch_size}, "
        f"load {load:.2f}")
  for name, ts in times.items():
    med = statistics.median(ts)
    print(f"  {name}: median {med:.2f} s per round over {len(ts)} rounds "
          f"({med / base_t:.2f}x no DP)")


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("command", choices=("sweep", "replot", "cost"))
  p.add_argument("--dataset", default="digits")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--model", default="lenet")
  p.add_argument("--rounds", type=int, default=50)
  p.add_argument("--local-epochs", type=int, default=1)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--clip", type=float, default=1.0)
  p.add_argument("--delta", type=float, default=1e-5)
  p.add_argument("--client-epsilon", type=float, default=0.5)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--sweeps", choices=("both", "pixeldp"), default="both",
                 help="both: the PixelDP sweep and the client-epsilon sweep; pixeldp: the first only")
  p.add_argument("--draws", type=int, default=None,
                 help="PixelDP noise draws per test prediction (default: PixelDP's 300)")
  p.add_argument("--out", default="experiments/results/privacy")
  args = p.parse_args(argv)
  {"sweep": sweep, "replot": replot, "cost": cost}[args.command](args)


if __name__ == "__main__":
  main()
