"""Per-sample training cost over the number of clients K, measured interleaved.

The issue's target "per-sample cost over K = 1...1000 within 1.5x" is a ratio
between configurations. ``benchmark.py`` times each K in its own process, one
after another; on the 2-core development machine the speed of short rounds
swings by up to 2x within minutes (e.g. SFLV2 at K = 1: 8-9 ms per round, then
17-20 ms), so such a grid measures the machine as much as the code. Here the
experiments of every K (one algorithm at a time) live in one process and take
turns: each *pass* times every K for about ``--slice`` seconds of consecutive
rounds (at least one round), in a rotated order, and the per-sample cost of
each K is the median over passes. The spread (worst / best over K) is taken
per pass and reported as the median and the range over passes, beside the
spread of the medians.

  python experiments/per_sample_spread.py --out experiments/results/per_sample_spread.json

Same workload as ``benchmark.py``'s LeNet grid: real digits images, 64
samples per client, batch 32, every client every round.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def build(algorithm: str, model: str, k: int, per_client: int, batch: int):
  import numpy as np
  import benchmark
  from sfljax.train import Config, Experiment
  ds, parts = benchmark.workload(model, k, per_client)
  cfg = Config(algorithm=algorithm, model=model, clients=k, batch_size=batch, rounds=1)
  exp = Experiment(cfg, dataset=ds, parts=parts)
  state = exp.init()
  compile_s = exp.compile(state)
  samples = int(np.sum(exp.client_data.counts)) * cfg.local_epochs
  return {"exp": exp, "state": state, "samples": samples, "compile_seconds": compile_s}


def run_slice(e: dict, seconds: float) -> tuple[int, float]:
  """Consecutive rounds for about ``seconds`` (at least one): (rounds, total seconds)."""
  n, total = 0, 0.0
  while n == 0 or total < seconds:
    t0 = time.perf_counter()
    e["state"], _ = e["exp"].train_round(e["state"])   # Pulls the metrics: synchronous.
    total += time.perf_counter() - t0
    n += 1
  return n, total


def measure(algorithm: str, model: str, clients: list[int], per_client: int, batch: int,
            passes: int, slice_s: float, warmup: int) -> dict:
  exps = {k: build(algorithm, model, k, per_client, batch) for k in clients}
  for e in exps.values():
    for _ in range(warmup):
      e["state"], _ = e["exp"].train_round(e["state"])
  per_pass = []   # [{k: seconds per sample}]
  for p in range(passes):
    order = clients[p % len(clients):] + clients[:p % len(clients)]
    costs = {}
    for k in order:
      n, total = run_slice(exps[k], slice_s)
      costs[k] = total / n / exps[k]["samples"]
    per_pass.append(costs)
  median_cost = {k: statistics.median(c[k] for c in per_pass) for k in clients}
  spreads = [max(c.values()) / min(c.values()) for c in per_pass]
  return {"algorithm": algorithm, "model": model, "clients": clients,
          "samples_per_client": per_client, "batch_size": batch,
          "compile_seconds": {k: exps[k]["compile_seconds"] for k in clients},
          "seconds_per_sample_median": median_cost,
          "samples_per_second_median": {k: 1.0 / v for k, v in median_cost.items()},
          "seconds_per_sample_per_pass": per_pass,
          "spread_of_medians": max(median_cost.values()) / min(median_cost.values()),
          "spread_per_pass_median": statistics.median(spreads),
          "spread_per_pass_range": [min(spreads), max(spreads)]}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", default="lenet", choices=("lenet",))
  ap.add_argument("--algorithms", nargs="+", default=["sflv1", "sflv2", "sl", "fl"])
  ap.add_argument("--clients", nargs="+", type=int, default=[1, 5, 100, 1000])
  ap.add_argument("--samples-per-client", type=int, default=64)
  ap.add_argument("--batch-size", type=int, default=32)
  ap.add_argument("--passes", type=int, default=7)
  ap.add_argument("--slice", type=float, default=0.5, help="seconds of rounds per K per pass")
  ap.add_argument("--warmup", type=int, default=2, help="untimed rounds per K after compiling")
  ap.add_argument("--out", required=True)
  args = ap.parse_args(argv)
  if os.path.exists(args.out):
    print(f"per_sample_spread: {args.out} exists; choose another --out", file=sys.stderr)
    return 2
  import benchmark
  result = {"machine": benchmark.machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "load_before": os.getloadavg()[0], "settings": vars(args), "rows": []}
  for alg in args.algorithms:
    r = measure(alg, args.model, args.clients, args.samples_per_client, args.batch_size,
                args.passes, args.slice, args.warmup)
    result["rows"].append(r)
    sps = "  ".join(f"K={k}: {v:,.0f}" for k, v in r["samples_per_second_median"].items())
    lo, hi = r["spread_per_pass_range"]
    print(f"{alg:6s} samples/s {sps}   spread of medians {r['spread_of_medians']:.2f}, "
          f"per pass {r['spread_per_pass_median']:.2f} ({lo:.2f}-{hi:.2f})", flush=True)
  result["load_after"] = os.getloadavg()[0]
  tmp = args.out + ".tmp"
  with open(tmp, "w") as f:
    json.dump(result, f, indent=1, default=str)
  os.replace(tmp, args.out)
  print(f"saved {args.out} (load {result['load_before']:.2f} before, "
        f"{result['load_after']:.2f} after)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
