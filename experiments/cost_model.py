"""The paper's cost analysis (Table 2) as a tool, fed with measured numbers.

For a dataset/model/cut it

1. computes the sizes the formulas need from the actual arrays: |W| (all
   model variables), beta|W| (the client half), q (smashed bytes per sample),
   p (training samples);
2. checks that the paper's per-round communication, 2K|W| (FL) and
   2pq + 2beta K|W| (SL/SFL), equals what the training code counts
   (``Experiment.traffic``, i.e. the bytes reported in metrics.jsonl) for
   every number of clients;
3. measures on this machine T (one forward/backward/update of the full model
   over p samples, from the median time of a compiled step) and T_fedavg (a
   compiled n_k/n average of K full models);
4. predicts the wall time of one global epoch with Table 2's formulas

     FL     T + 2|W|/R + T_fedavg
     SL     T + 2pq/R + 2 beta K |W| / R
     SFLV1  T + 2pq/(K R) + 2 beta |W| / R + T_fedavg
     SFLV2  T + 2pq/(K R) + 2 beta |W| / R + T_fedavg / 2

   for each number of clients K and link rate R (bytes/s), and plots them;

5. with stragglers (``--straggler-spread S > 0``), gives every client k a
   compute slowdown c_k and a link slowdown l_k (its rate is R / l_k), both
   lognormal with median 1 and log-spread S, drawn from ``--straggler-seed``
   (client k's pair depends only on the seed and k, so the first clients are
   the same for every K). Synchronous schedules (FL, SFLV1, SFLV2 in the
   paper's order) wait for the slowest participant, client-major ones (SL,
   SFLV2 in the official code's client order) add the clients' turns:

     FL            max_k [c_k T + 2|W| l_k/R] + T_fedavg
     SFLV1         max_k [c_k T + 2pq l_k/(K R) + 2 beta |W| l_k/R] + T_fedavg
     SFLV2         max_k [same] + T_fedavg / 2
     SL            sum_k [c_k T/K + 2pq l_k/(K R) + 2 beta |W| l_k/R]
     SFLV2 client  sum_k [c_k T/K + 2pq l_k/(K R)] + max_k [2 beta |W| l_k/R] + T_fedavg / 2

   A client's compute slowdown scales the paper's whole compute term of its
   path (T for the parallel schedules, its turn's share T/K for the
   client-major ones), server part included: the measured T does not split
   client from server compute. Spread 0 (the default) gives c = l = 1 and
   reproduces the formulas of 4. exactly (SFLV2 client order, not in the
   paper's Table 2: T + 2pq/R + 2 beta |W|/R + T_fedavg/2).

  python experiments/cost_model.py --dataset fashion_mnist \
      --data-dir /usr/share/datasets/fashion-mnist --out experiments/results/cost_model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfljax import comm, data, fedavg, models
from sfljax.train import Config, Experiment


def _median_seconds(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def sizes(model: models.SplitModel, cut: int, input_shape) -> dict:
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  client, _ = model.split_variables(shapes, (cut,))
  client_mod, _ = model.parts((cut,))
  x1 = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  smashed = jax.eval_shape(lambda v, x: models.apply_part(client_mod, v, x, train=True)[0],
                           client, x1)
  return {"W": comm.tree_bytes(shapes), "betaW": comm.tree_bytes(client),
          "q": comm.tree_bytes(smashed)}


def measure_times(model: models.SplitModel, ds: data.Dataset, batch: int, clients) -> dict:
  """T for the whole training set and T_fedavg for each K, on this machine."""
  module = model.full()
  variables = jax.jit(model.init)(jax.random.key(0))
  opt = optax.adam(1e-3)
  x = jnp.asarray(ds.x_train[:batch])
  y = jnp.asarray(ds.y_train[:batch])

  @jax.jit
  def step(v, o):
    def loss(p):
      out = models.apply_part(module, {**v, "params": p}, x, train=True)[0]
      return optax.softmax_cross_entropy_with_integer_labels(out, y).mean()
    g = jax.grad(loss)(v["params"])
    u, o = opt.update(g, o, v["params"])
    return optax.apply_updates(v["params"], u), o

  per_batch = _median_seconds(step, variables, opt.init(variables["params"]))
  t_full = per_batch * len(ds.y_train) / batch
  t_fedavg = {}
  for k in clients:
    stacked = fedavg.broadcast(variables, k)
    avg = jax.jit(fedavg.weighted_average)
    t_fedavg[k] = _median_seconds(avg, stacked, jnp.ones((k,)))
  return {"T": t_full, "T_per_sample": per_batch / batch, "T_fedavg": t_fedavg}


ALGORITHMS = ("fl", "sl", "sflv1", "sflv2", "sflv2_client")
"""The predicted schedules (``sflv2_client``: SFLV2 in the official code's client order)."""


def stragglers(k: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Clients 0..k-1's compute and link slowdowns, ``([k], [k])`` float64.

  Each is ``exp(spread * z)`` with z standard normal (lognormal, median 1),
  client i's pair drawn from ``(seed, i)`` alone. Spread 0: all exactly 1.
  """
  if spread < 0:
    raise ValueError(f"spread: must be >= 0, got {spread}")
  z = np.array([np.random.default_rng([int(seed), i]).standard_normal(2) for i in range(k)],
               np.float64).reshape(k, 2)
  factors = np.exp(float(spread) * z)
  return factors[:, 0], factors[:, 1]


def predict(s: dict, p: int, k: int, rate: float, t: float, t_fedavg: float,
            compute=None, link=None) -> dict:
  """Seconds per global epoch of every schedule in :data:`ALGORITHMS`.

  ``compute``, ``link``: the K clients' slowdowns (:func:`stragglers`;
  None: all 1, Table 2 exactly). Synchronous schedules take the slowest
  client's time, client-major ones the sum of the clients' turns (module
  docstring).
  """
  w, bw, q = s["W"], s["betaW"], s["q"]
  c = np.ones(k) if compute is None else np.asarray(compute, np.float64)
  ln = np.ones(k) if link is None else np.asarray(link, np.float64)
  if c.shape != (k,) or ln.shape != (k,):
    raise ValueError(f"compute, link: need one slowdown per client ({k}), got "
                     f"{c.shape} and {ln.shape}")
  # With c = l = 1 every expression below is, operation for operation, Table 2's
  # (x * 1.0 and the max or mean of equal values are exact).
  split_sync = float(np.max(c * t + 2 * p * q * ln / (k * rate) + 2 * bw * ln / rate))
  return {"fl": float(np.max(c * t + 2 * w * ln / rate)) + t_fedavg,
          "sl": (t * float(np.mean(c)) + 2 * p * q * float(np.mean(ln)) / rate
                 + 2 * bw * k * float(np.mean(ln)) / rate),
          "sflv1": split_sync + t_fedavg,
          "sflv2": split_sync + t_fedavg / 2,
          "sflv2_client": (t * float(np.mean(c)) + 2 * p * q * float(np.mean(ln)) / rate
                           + float(np.max(2 * bw * ln / rate)) + t_fedavg / 2)}


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--dataset", default="digits")
  ap.add_argument("--data-dir", default=None)
  ap.add_argument("--model", default="lenet")
  ap.add_argument("--cut", type=int, default=None)
  ap.add_argument("--batch-size", type=int, default=1024)
  ap.add_argument("--clients", type=int, nargs="+", default=[1, 2, 5, 10, 20, 50, 100])
  ap.add_argument("--rates", type=float, nargs="+", default=[1e6, 1e7, 1e8, 1e9],
                  help="link rates R in bytes per second")
  ap.add_argument("--straggler-spread", type=float, default=0.0,
                  help="log-spread of the clients' lognormal compute and link slowdowns "
                       "(0: identical clients, Table 2)")
  ap.add_argument("--straggler-seed", type=int, default=0)
  ap.add_argument("--out", default="experiments/results/cost_model")
  args = ap.parse_args(argv)

  ds = data.load_dataset(args.dataset, data_dir=args.data_dir)
  model = models.get_model(args.model, input_shape=ds.input_shape, num_classes=ds.num_classes)
  cut = args.cut or model.default_cut
  s = sizes(model, cut, ds.input_shape)
  p = len(ds.y_train)

  checks = []
  for k in args.clients:
    for alg in ("fl", "sl", "sflv1", "sflv2"):
      counted = Experiment(Config(algorithm=alg, model=args.model,
                                  cut=None if alg == "fl" else cut, dataset=args.dataset,
                                  clients=k, batch_size=args.batch_size),
                           dataset=ds).traffic
      total = counted.smashed + counted.smashed_grad + counted.model_up + counted.model_down
      formula = 2 * k * s["W"] if alg == "fl" else 2 * p * s["q"] + 2 * s["betaW"] * k
      checks.append({"clients": k, "algorithm": alg, "counted_bytes": total,
                     "formula_bytes": formula, "labels_bytes": counted.labels})
      if total != formula:
        raise SystemExit(f"byte mismatch for {alg} K={k}: counted {total}, formula {formula}")
  print(f"|W| = {s['W']} B, beta|W| = {s['betaW']} B (beta = {s['betaW'] / s['W']:.4f}), "
        f"q = {s['q']} B/sample, p = {p}; counted bytes equal Table 2 for "
        f"{len(checks)} (algorithm, K) pairs")

  times = measure_times(model, ds, args.batch_size, args.clients)
  print(f"T = {times['T']:.2f} s per pass over p samples "
        f"({1e6 * times['T_per_sample']:.1f} us/sample); T_fedavg(K) = "
        + ", ".join(f"{k}: {1e3 * v:.2f} ms" for k, v in times["T_fedavg"].items()))
  rows = []
  for rate in args.rates:
    for k in args.clients:
      compute, link = stragglers(k, args.straggler_spread, args.straggler_seed)
      pred = predict(s, p, k, rate, times["T"], times["T_fedavg"][k], compute, link)
      rows.append({"rate": rate, "clients": k, **pred})
  os.makedirs(args.out, exist_ok=True)
  with open(os.path.join(args.out, "cost_model.json"), "w") as f:
    json.dump({"settings": vars(args), "sizes": s, "p": p, "times": times,
               "byte_checks": checks, "predictions": rows, "backend": jax.default_backend()},
              f, indent=2)
  lines = ["| R (MB/s) | K | FL s | SL s | SFLV1 s | SFLV2 s | SFLV2 (client order) s |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    lines.append(f"| {r['rate'] / 1e6:g} | {r['clients']} | {r['fl']:.2f} | {r['sl']:.2f} | "
                 f"{r['sflv1']:.2f} | {r['sflv2']:.2f} | {r['sflv2_client']:.2f} |")
  with open(os.path.join(args.out, "cost_model.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  print("\n".join(lines))

  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(4 * len(args.rates), 3.6))
  FigureCanvasAgg(fig)
  for i, rate in enumerate(args.rates):
    ax = fig.add_subplot(1, len(args.rates), i + 1)
    sub = [r for r in rows if r["rate"] == rate]
    for alg in ALGORITHMS:
      ax.plot([r["clients"] for r in sub], [r[alg] for r in sub], marker="o", label=alg)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients K")
    ax.set_title(f"R = {rate / 1e6:g} MB/s")
    ax.grid(alpha=0.3)
    if i == 0:
      ax.set_ylabel("predicted seconds per global epoch")
      ax.legend()
  fig.suptitle(f"Table 2 cost model, {args.dataset} / {args.model} (cut {cut}), "
               f"T measured on {jax.default_backend()}")
  fig.tight_layout()
  fig.savefig(os.path.join(args.out, "cost_model.png"), dpi=110)
  print(f"saved {args.out}/cost_model.{{json,md,png}}")


if __name__ == "__main__":
  main()
