"""What the server can learn from the cut, measured per configuration.

Each configuration trains SFLV1 with ``--leakage`` (sfljax.leakage) and
records its accuracy beside the leakage measures of its last round: distance
correlation between inputs and smashed data, the label attack's AUC on the
gradients the server sees, and model inversion (MSE, PSNR, SSIM) by a decoder
the server trains on held-out training data. The configurations vary the cut
depth (LeNet cuts 1-4; AlexNet cuts 1-2, on the embedded digits by default to
keep the study's CPU time down, ``--alexnet-dataset`` to change it), two-part
against U-shaped, the NoPeek weight, the PixelDP noise layer's epsilon' and
client-side DP-SGD::

  python experiments/leakage.py study --dataset fashion_mnist \\
      --data-dir /usr/share/datasets/fashion-mnist --rounds 2 --alexnet-dataset digits \\
      --alexnet-rounds 10 --out experiments/results/leakage/fashion_mnist
  python experiments/leakage.py replot --out experiments/results/leakage/fashion_mnist

It writes ``results.json`` (after every configuration), ``table.md``,
``accuracy_vs_leakage.png`` (one point per configuration) and one
reconstruction grid per configuration (``grids/<name>.png``: originals above,
the server's reconstructions below). ``--only NAME,NAME`` runs a subset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from sfljax import data  # noqa: E402
from sfljax.config import Config  # noqa: E402
from sfljax.leakage import inversion  # noqa: E402
from sfljax.train import Experiment  # noqa: E402

KEYS = ("leak_dcor", "leak_label_auc", "leak_label_auc_norm", "leak_inversion_mse",
        "leak_inversion_psnr", "leak_inversion_ssim")


def configurations(args) -> list[tuple[str, str, dict]]:
  """(name, what varies, Config overrides) of the study."""
  rows = []
  for cut in (1, 2, 3, 4):
    rows.append((f"lenet-cut{cut}", "cut depth", dict(cut=cut)))
  rows.append(("lenet-u1", "U-shaped", dict(cut="1,4")))
  rows.append(("lenet-u2", "U-shaped", dict(cut="2,4")))
  for w in (0.5, 2.0):
    rows.append((f"lenet-cut1-nopeek{w:g}", "NoPeek", dict(cut=1, nopeek_weight=w)))
  for eps in (1.0, 5.0):
    rows.append((f"lenet-cut1-pixeldp{eps:g}", "PixelDP",
                 dict(cut=1, pixeldp_epsilon=eps, pixeldp_layer=1, pixeldp_draws=args.draws)))
  rows.append(("lenet-cut1-dp-eps5", "client DP-SGD",
               dict(cut=1, dp_clip=1.0, dp_epsilon=5.0)))
  for cut in (1, 2):   # AlexNet on --alexnet-dataset (named by it unless digits)
    where = "" if args.alexnet_dataset == "digits" else f"-{args.alexnet_dataset}"
    rows.append((f"alexnet{where}-cut{cut}", "cut depth (AlexNet)",
                 dict(model="alexnet", cut=cut, rounds=args.alexnet_rounds,
                      dataset=args.alexnet_dataset,
                      data_dir=args.data_dir if args.alexnet_dataset == args.dataset else None)))
  return rows


def first_images(cfg, n: int):
  """The configured dataset with only its first ``n`` training images (the test
  set whole), for shorter AlexNet runs: on the whole Fashion-MNIST an AlexNet
  round (5 clients, batch 64) takes ~5 minutes on the 2-core CPU."""
  ds = data.load_dataset(cfg.dataset, data_dir=cfg.data_dir)
  if not 0 < n <= len(ds.y_train):
    raise SystemExit(f"leakage.py: --alexnet-train must be in 1..{len(ds.y_train)}, got {n}")
  return dataclasses.replace(ds, x_train=ds.x_train[:n], y_train=ds.y_train[:n])


def base(args) -> dict:
  return dict(algorithm="sflv1", dataset=args.dataset, data_dir=args.data_dir, model="lenet",
              norm="none", clients=5, rounds=args.rounds, batch_size=args.batch_size,
              optimizer="adam", lr=args.lr, seed=args.seed, leakage=True,
              leakage_probe=args.probe, leakage_aux=args.aux,
              leakage_decoder_steps=args.decoder_steps)


def study(args) -> None:
  os.makedirs(os.path.join(args.out, "grids"), exist_ok=True)
  path = os.path.join(args.out, "results.json")
  results = []
  if os.path.exists(path) and args.only:   # a subset: the other rows are kept
    with open(path) as f:
      results = json.load(f)["rows"]
  only = set(args.only.split(",")) if args.only else None
  for name, varies, overrides in configurations(args):
    if only is not None and name not in only:
      continue
    cfg = Config(**{**base(args), **overrides})
    t0 = time.perf_counter()
    subset = cfg.model == "alexnet" and args.alexnet_train
    exp = Experiment(cfg, dataset=first_images(cfg, args.alexnet_train) if subset else None)
    history = exp.run()
    last = history[-1]
    row = {"name": name, "varies": varies, "cut": exp.config.cut, "model": cfg.model,
           "dataset": cfg.dataset, "train_images": len(exp.dataset.y_train),
           "rounds": cfg.rounds, "test_accuracy": last["test_accuracy"],
           "epsilon": last.get("epsilon"), **{k: last.get(k) for k in KEYS},
           "leakage_seconds": last.get("leakage_seconds"),
           "seconds": time.perf_counter() - t0, "config": exp.config.to_dict()}
    images = exp.inversion_images
    inversion.save_grid(os.path.join(args.out, "grids", f"{name}.png"), images["originals"],
                        images["reconstructions"])
    results = [r for r in results if r["name"] != name] + [row]
    print(f"{name}: accuracy {row['test_accuracy']:.4f}, dcor {row['leak_dcor']:.3f}, label "
          f"AUC {row['leak_label_auc']:.3f}, inversion SSIM {row['leak_inversion_ssim']:.3f}, "
          f"{row['seconds']:.0f} s", flush=True)
    with open(path, "w") as f:
      json.dump({"args": vars(args), "rows": results}, f, indent=1)
  write_outputs(results, args)


def markdown(results, args) -> str:
  lines = [f"SFLV1, 5 clients (dataset, training images and rounds per row), batch "
           f"{args.batch_size}, adam lr {args.lr}, no normalisation layers, seed "
           f"{args.seed}; 10% of the training set held out as the server's auxiliary data "
           f"({args.aux or 'all'} used); measures on the first "
           f"{args.probe or 'min(512, test set)'} test images after "
           f"the last round; decoder {args.decoder_steps} Adam steps", "",
           "| configuration | dataset | training images | rounds | varies | cut | test accuracy "
           "| dcor | label AUC (direction) | label AUC (norm) | inversion MSE | PSNR (dB) | SSIM |",
           "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in results:
    lines.append(f"| {r['name']} | {r.get('dataset', args.dataset)} | "
                 f"{r.get('train_images', 'all')} | {r['rounds']} | {r['varies']} | "
                 f"{r['cut']} | {r['test_accuracy']:.4f} | "
                 f"{r['leak_dcor']:.3f} | {r['leak_label_auc']:.3f} | "
                 f"{r['leak_label_auc_norm']:.3f} | {r['leak_inversion_mse']:.3f} | "
                 f"{r['leak_inversion_psnr']:.2f} | {r['leak_inversion_ssim']:.3f} |")
  return "\n".join(lines) + "\n"


def plot(results, args) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
  for ax, key, label in zip(axes, ("leak_inversion_ssim", "leak_dcor", "leak_label_auc"),
                            ("inversion SSIM", "distance correlation",
                             "label attack AUC (direction)")):
    for r in results:
      ax.scatter(r[key], r["test_accuracy"], s=20)
      ax.annotate(r["name"], (r[key], r["test_accuracy"]), fontsize=6,
                  xytext=(3, 2), textcoords="offset points")
    ax.set(xlabel=f"{label} (higher leaks more)", ylabel="test accuracy")
  fig.suptitle("accuracy vs leakage, SFLV1 (LeNet and AlexNet; datasets per row in "
               "table.md); one point per configuration")
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "accuracy_vs_leakage.png"), dpi=120)


def write_outputs(results, args) -> None:
  with open(os.path.join(args.out, "table.md"), "w") as f:
    f.write(markdown(results, args))
  plot(results, args)


def replot(args) -> None:
  with open(os.path.join(args.out, "results.json")) as f:
    saved = json.load(f)
  for key, value in saved["args"].items():
    if key not in ("command", "out", "only"):
      setattr(args, key, value)
  write_outputs(saved["rows"], args)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("command", choices=("study", "replot"))
  p.add_argument("--dataset", default="fashion_mnist")
  p.add_argument("--data-dir", default=None)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--alexnet-rounds", type=int, default=10)
  p.add_argument("--alexnet-dataset", default="digits")
  p.add_argument("--alexnet-train", type=int, default=None, metavar="N",
                 help="AlexNet rows: only the dataset's first N training images")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--probe", type=int, default=None,
                 help="probe test images (default 512, or the whole test set if smaller)")
  p.add_argument("--aux", type=int, default=None, help="decoder training samples (default all)")
  p.add_argument("--decoder-steps", type=int, default=500)
  p.add_argument("--draws", type=int, default=20, help="PixelDP draws per test prediction")
  p.add_argument("--only", default=None, help="comma-separated configuration names")
  p.add_argument("--out", default="experiments/results/leakage/fashion_mnist")
  args = p.parse_args(argv)
  {"study": study, "replot": replot}[args.command](args)


if __name__ == "__main__":
  main()
