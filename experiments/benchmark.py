"""Throughput of every algorithm and client-execution strategy.

For each algorithm x strategy x number of clients this builds a workload of
real digits images (tiled so every client holds --samples-per-client
samples), compiles the round ahead of time (timed separately), runs one
warm-up round and then --repeats timed rounds, and reports the median
seconds per round and training samples per second. Results are printed and
saved as JSON together with a description of the machine.

  python experiments/benchmark.py                       # the README's table
  python experiments/benchmark.py --clients 5 --algorithms sflv1 --strategies vmap
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import time

import jax
import numpy as np

from sfljax import data
from sfljax.train import Config, Experiment, environment


def machine() -> dict:
  info = environment()
  info["cpu_count"] = os.cpu_count()
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    info["cpu_model"] = names[0] if names else platform.processor()
  except OSError:
    info["cpu_model"] = platform.processor()
  return info


def workload(clients: int, per_client: int, seed: int = 0):
  """Real digits images tiled to clients * per_client samples, split in order."""
  ds = data.load_digits(seed)
  n = clients * per_client
  reps = -(-n // len(ds.y_train))
  x = np.concatenate([ds.x_train] * reps)[:n]
  y = np.concatenate([ds.y_train] * reps)[:n]
  ds = dataclasses.replace(ds, x_train=x, y_train=y)
  parts = [np.arange(k * per_client, (k + 1) * per_client) for k in range(clients)]
  return ds, parts


def measure(cfg: Config, ds, parts, repeats: int, budget: float) -> dict:
  exp = Experiment(cfg, dataset=ds, parts=parts)
  state = exp.init()
  compile_s = exp.compile(state)
  t0 = time.perf_counter()
  state, _ = exp.train_round(state)          # warm-up (and a budget probe)
  times = [time.perf_counter() - t0]
  if times[0] < budget:
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      state, _ = exp.train_round(state)        # train_round pulls the metrics: synchronous
      times.append(time.perf_counter() - t0)
  sec = statistics.median(times)
  samples = int(np.sum(exp.client_data.counts)) * cfg.local_epochs
  return {"algorithm": cfg.algorithm, "strategy": exp.executor.name,
          "step_loop": exp.executor.step_loop, "clients": len(parts),
          "samples_per_round": samples, "compile_seconds": compile_s,
          "seconds_per_round": sec, "samples_per_second": samples / sec,
          "timed_rounds": len(times), "all_round_seconds": times}


def fashion_mnist_epoch(args):
  ds = data.load_dataset("fashion_mnist", data_dir=args.fashion_mnist)
  parts = data.partition(ds.y_train, 5, seed=0)
  rows = []
  for alg in args.algorithms:
    cfg = Config(algorithm=alg, dataset="fashion_mnist", clients=5, batch_size=1024, lr=0.004,
                 step_loop=args.step_loop, rounds=1)
    r = measure(cfg, ds, parts, args.repeats, args.budget)
    rows.append(r)
    print(f"{alg:12s} {r['strategy']:10s} compile {r['compile_seconds']:.2f} s, "
          f"{r['seconds_per_round']:.2f} s per global epoch, "
          f"{r['samples_per_second']:.0f} samples/s", flush=True)
  out = args.out.replace(".json", "_fashion_mnist.json")
  with open(out, "w") as f:
    json.dump({"machine": machine(), "settings": vars(args), "results": rows,
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}, f, indent=2)
  print(f"saved {out}")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--algorithms", nargs="+",
                 default=["centralized", "fl", "sl", "sflv1", "sflv2"])
  p.add_argument("--strategies", nargs="+", default=["vmap", "sequential"])
  p.add_argument("--step-loop", default="auto")
  p.add_argument("--clients", nargs="+", type=int, default=[5, 100])
  p.add_argument("--samples-per-client", type=int, default=64)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--model", default="lenet")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--budget", type=float, default=30.0,
                 help="a configuration whose warm-up round takes longer is timed once")
  p.add_argument("--out", default="experiments/results/benchmark_cpu.json")
  p.add_argument("--fashion-mnist", metavar="DIR", default=None,
                 help="instead: one global epoch of the paper's Fashion-MNIST/LeNet setting "
                      "(60,000 samples, 5 clients, batch 1024) per algorithm, from the IDX files in DIR")
  args = p.parse_args(argv)
  if args.fashion_mnist:
    return fashion_mnist_epoch(args)

  rows = []
  print(f"{'algorithm':12s} {'strategy':10s} {'K':>4s} {'compile s':>9s} "
        f"{'s/round':>9s} {'samples/s':>10s}", flush=True)
  for k in args.clients:
    ds, parts = workload(k, args.samples_per_client)
    for alg in args.algorithms:
      for strategy in args.strategies:
        cfg = Config(algorithm=alg, model=args.model, clients=k, batch_size=args.batch_size,
                     strategy=strategy, step_loop=args.step_loop, rounds=1)
        r = measure(cfg, ds, parts, args.repeats, args.budget)
        rows.append(r)
        print(f"{alg:12s} {strategy:10s} {k:4d} {r['compile_seconds']:9.2f} "
              f"{r['seconds_per_round']:9.3f} {r['samples_per_second']:10.0f}"
              f"{'' if r['timed_rounds'] > 1 else '  (timed once: over budget)'}", flush=True)
  result = {"machine": machine(), "settings": vars(args), "results": rows,
            "date": time.strftime("%Y-%m-%d %H:%M:%S")}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ".tmp", "w") as f:
    json.dump(result, f, indent=2)
  os.replace(args.out + ".tmp", args.out)
  print(f"saved {args.out}")


if __name__ == "__main__":
  main()
