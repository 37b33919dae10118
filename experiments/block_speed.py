"""Round time with and without ``--client-block``, measured in one process.

Builds one :class:`sfljax.train.Experiment` per block size on the same
workload (a ``benchmark.py --suite`` workload, optionally resized), compiles
each, then runs their rounds alternately (A B, B A, ...) so that the
machine's drift hits every block size alike, and reports each one's median
round time and the median of its per-round ratios to the first block size's
round time; it also checks that every final state equals the first one bit
for bit (blocks are the unblocked computation, see the README).

  python experiments/block_speed.py whole_1000 sflv1 --rounds 6 --blocks - 50 \
      --fashion-mnist /usr/share/datasets/fashion-mnist

``-`` means no blocks. Only meaningful on a quiet machine (the load is printed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def measure(workload: str, algorithm: str, blocks, rounds: int, fashion_mnist=None,
            clients=None, samples_per_client=None) -> list[dict]:
  import jax
  import numpy as np
  import benchmark
  from sfljax.train import Config, Experiment
  w = dict(benchmark.SUITE[workload])
  clients = clients or w["clients"]
  per_client = samples_per_client or w["samples_per_client"]
  ds, parts = benchmark.workload(w["model"], clients, per_client,
                                 fashion_mnist=fashion_mnist if w.get("fashion_mnist") else None)
  exps, states = {}, {}
  for b in blocks:
    cfg = Config(algorithm=algorithm, model=w["model"], clients=clients,
                 batch_size=w["batch_size"], rounds=1, client_block=b)
    exp = Experiment(cfg, dataset=ds, parts=parts)
    state = exp.init()
    exp.compile(state)
    states[b], _ = exp.train_round(state)   # Warm-up.
    exps[b] = exp
  times = {b: [] for b in blocks}
  for i in range(rounds):
    for b in (blocks if i % 2 == 0 else blocks[::-1]):
      t0 = time.perf_counter()
      states[b], _ = exps[b].train_round(states[b])
      times[b].append(time.perf_counter() - t0)
  first = blocks[0]
  rows = []
  for b in blocks:
    equal = all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(states[b].algo),
                                                     jax.tree.leaves(states[first].algo)))
    rows.append({"workload": workload, "algorithm": algorithm, "clients": clients,
                 "samples_per_client": per_client, "client_block": b,
                 "seconds_per_round": statistics.median(times[b]),
                 "ratio_to_first": statistics.median(
                     [x / y for x, y in zip(times[b], times[first])]),
                 "state_equal_to_first": bool(equal), "round_seconds": times[b]})
  return rows


def main(argv=None) -> int:
  import benchmark
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("workload", choices=list(benchmark.SUITE))
  p.add_argument("algorithm", choices=["sflv1", "sflv2", "sflv3", "fl"])
  p.add_argument("--blocks", nargs="+", default=["-", "50"],
                 help="client block sizes ('-': none); ratios are to the first")
  p.add_argument("--rounds", type=int, default=6, help="timed rounds per block size")
  p.add_argument("--fashion-mnist", metavar="DIR", default=None,
                 help="the real Fashion-MNIST IDX directory for the workloads that use it "
                      "(without it LeNet trains on the digits images tiled, as in benchmark.py)")
  p.add_argument("--clients", type=int, default=None, help="override the workload's clients")
  p.add_argument("--samples-per-client", type=int, default=None)
  p.add_argument("--out", default=None, help="also write the rows as JSON here")
  args = p.parse_args(argv)
  try:
    blocks = [None if b == "-" else int(b) for b in args.blocks]
  except ValueError:
    p.error(f"--blocks: integers or '-', got {args.blocks}")
  if any(b is not None and b < 1 for b in blocks) or args.rounds < 1:
    p.error("--blocks must be >= 1 and --rounds >= 1")
  load = os.getloadavg()[0]
  rows = measure(args.workload, args.algorithm, blocks, args.rounds, args.fashion_mnist,
                 args.clients, args.samples_per_client)
  print(f"load {load:.2f} before, {os.getloadavg()[0]:.2f} after")
  for r in rows:
    print(f"{r['workload']} {r['algorithm']} block {r['client_block'] or '-'}: "
          f"{r['seconds_per_round']:.3f} s/round, ratio {r['ratio_to_first']:.3f}, "
          f"state equal to the first: {r['state_equal_to_first']}")
  if args.out:
    with open(args.out, "w") as f:
      json.dump(rows, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
