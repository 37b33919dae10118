"""Throughput benchmark: algorithms x models x numbers of clients, against PyTorch.

For every model, number of clients K and algorithm this measures, each
configuration in a fresh worker process (so peak memory is its own):

* compile time of the round's programs,
* seconds per round (median of --repeats timed rounds after one warm-up round),
  training samples per second and achieved GFLOP/s (the model's forward+backward
  FLOPs from XLA's cost analysis times the samples, over the round's time),
* peak memory: the worker's peak RSS, and the accelerator's peak bytes in use
  when the backend reports them.

With ``--torch`` (needs ``pip install torch==2.13.0``) the same configuration
also runs through ``torch_baseline.py``, a PyTorch loop shaped like the
official SplitFed code, in the same benchmark run, and each row gets
``speedup_vs_torch`` = PyTorch seconds per round / sfljax seconds per round.
A large fp32 matmul is timed once per run as the machine's FLOP/s ceiling.

Workloads: LeNet on real digits images (28x28x1), each client holding
--samples-per-client samples; ResNet18 on seeded random 64x64x3 images with
7 classes (the paper's HAM10000 shape). A configuration whose predicted round
time (from the previous K, scaled linearly) exceeds --budget seconds is skipped
and listed as such.

  python experiments/benchmark.py                             # the README's table
  python experiments/benchmark.py --models lenet --clients 100 --algorithms sflv1 --torch
  python experiments/benchmark.py --fashion-mnist /usr/share/datasets/fashion-mnist
  # The workloads users run (SUITE), each against the PyTorch loop:
  python experiments/benchmark.py --suite --torch --fashion-mnist /usr/share/datasets/fashion-mnist
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

# Per model: input shape, classes, samples per client and batch size of the grid.
WORKLOADS = {
    "lenet": {"input_shape": (28, 28, 1), "num_classes": 10, "samples_per_client": 64,
              "batch_size": 32},
    "resnet18": {"input_shape": (64, 64, 3), "num_classes": 7, "samples_per_client": 256,
                 "batch_size": 256},
}


def machine() -> dict:
  from sfljax.train import environment
  info = environment()
  info["cpu_count"] = os.cpu_count()
  sys.path.insert(0, HERE)
  from torch_baseline import cpu_model   # Imports without torch.
  info["cpu_model"] = cpu_model()
  try:
    import jax
    info["device_kind"] = jax.devices()[0].device_kind
  except Exception:  # noqa: BLE001 - descriptive only
    pass
  return info


def matmul_peak(n: int = 2048, repeats: int = 7, dtype: str = "float32") -> float:
  """Median GFLOP/s of an n^3 matmul in ``dtype`` on the default device."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    times.append(time.perf_counter() - t0)
  return 2 * n ** 3 / statistics.median(times) / 1e9


def workload(model: str, clients: int, per_client: int, seed: int = 0,
             fashion_mnist: str | None = None):
  """The dataset and the clients' index arrays of a benchmark configuration.

  LeNet trains on the real Fashion-MNIST training images when ``fashion_mnist``
  (an IDX directory) is given, else on real digits images, tiled.
  """
  import numpy as np
  from sfljax import data
  n = clients * per_client
  if model == "lenet" and fashion_mnist:
    ds = data.load_dataset("fashion_mnist", data_dir=fashion_mnist)
    if n > len(ds.y_train):
      raise ValueError(f"{clients} x {per_client} samples > Fashion-MNIST's {len(ds.y_train)}")
    parts = [np.arange(k * per_client, (k + 1) * per_client) for k in range(clients)]
    return ds, parts
  if model == "lenet":  # Real digits images, tiled.
    ds = data.load_digits(seed)
    reps = -(-n // len(ds.y_train))
    x = np.concatenate([ds.x_train] * reps)[:n]
    y = np.concatenate([ds.y_train] * reps)[:n]
  else:
    w = WORKLOADS[model]
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + w["input_shape"], dtype=np.float32)
    y = rng.integers(0, w["num_classes"], n).astype(np.int32)
    ds = data.Dataset(name="synthetic", x_train=x[:0], y_train=y[:0], x_test=x[:256],
                      y_test=y[:256], num_classes=w["num_classes"])
  ds = dataclasses.replace(ds, x_train=x, y_train=y)
  parts = [np.arange(k * per_client, (k + 1) * per_client) for k in range(clients)]
  return ds, parts


def train_flops_per_sample(exp, batch_size: int) -> float:
  """Forward+backward FLOPs of the whole model per sample (XLA cost analysis)."""
  import jax
  import jax.numpy as jnp
  import optax
  from sfljax import models
  module = exp.model.full()
  variables = jax.eval_shape(exp.model.init, jax.random.key(0))
  x = jax.ShapeDtypeStruct((batch_size,) + exp.dataset.input_shape, jnp.float32)
  y = jax.ShapeDtypeStruct((batch_size,), jnp.int32)

  def loss(params, state, xb, yb):
    logits, _ = models.apply_part(module, {**state, "params": params}, xb, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  state = {k: v for k, v in variables.items() if k != "params"}
  cost = jax.jit(jax.grad(loss)).lower(variables["params"], state, x, y).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost.get("flops", 0.0)) / batch_size


def peak_rss_bytes() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_peak_bytes() -> int | None:
  import jax
  try:
    stats = jax.devices()[0].memory_stats()
  except Exception:  # noqa: BLE001 - not every backend reports
    return None
  return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def measure(cfg, ds, parts, repeats: int, budget: float) -> dict:
  """Compile, one warm-up round, then ``repeats`` timed rounds (one if over budget)."""
  import numpy as np
  from sfljax.train import Experiment
  exp = Experiment(cfg, dataset=ds, parts=parts)
  state = exp.init()
  compile_s = exp.compile(state)
  t0 = time.perf_counter()
  state, _ = exp.train_round(state)          # Warm-up, and a budget probe.
  times = [time.perf_counter() - t0]
  if times[0] < budget:
    # Short rounds are noisy: time at least ~2 s worth of them (at most 50).
    repeats = max(repeats, min(50, int(2.0 / max(times[0], 1e-3))))
    times = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      state, _ = exp.train_round(state)        # Pulls the metrics: synchronous.
      times.append(time.perf_counter() - t0)
  sec = statistics.median(times)
  samples = int(np.sum(exp.client_data.counts)) * cfg.local_epochs
  if cfg.client_fraction < 1:
    samples = int(round(samples * exp.num_participants / exp.client_data.num_clients))
  return {"algorithm": cfg.algorithm, "model": cfg.model, "strategy": exp.executor.name,
          "step_loop": exp.executor.step_loop, "client_block": cfg.client_block,
          "clients": len(parts), "participants": exp.num_participants,
          "batch_size": cfg.batch_size, "samples_per_round": samples,
          "compile_seconds": compile_s, "seconds_per_round": sec,
          "samples_per_second": samples / sec, "timed_rounds": len(times),
          "all_round_seconds": times, "exp": exp}


def worker(spec: dict) -> dict:
  """One configuration (run in its own process): sfljax or the PyTorch loop."""
  w = WORKLOADS[spec["model"]]
  if spec["engine"] == "torch":
    sys.path.insert(0, HERE)
    import torch_baseline
    run = lambda rounds, warmup: torch_baseline.run_baseline(  # noqa: E731
        spec["algorithm"], spec["model"], spec["clients"], spec["samples_per_client"],
        spec["batch_size"], rounds=rounds, warmup=warmup, budget=spec["budget"])
    r = run(1, 1)                                  # Warm-up and a probe round.
    probe = r["seconds_per_round"]
    if probe < spec["budget"]:                     # Like measure(): >= ~2 s of short rounds.
      more = max(spec["repeats"], min(50, int(2.0 / max(probe, 1e-3)))) - 1
      if more > 0:
        r = run(more, 1 if probe < 0.5 else 0)
        times = r["all_round_seconds"] + ([] if probe < 0.5 else [probe])
        r.update(all_round_seconds=times, timed_rounds=len(times),
                 seconds_per_round=statistics.median(times))
        r["samples_per_second"] = r["samples_per_round"] / r["seconds_per_round"]
    r["peak_rss_bytes"] = peak_rss_bytes()
    return r
  from sfljax.train import Config
  ds, parts = workload(spec["model"], spec["clients"], spec["samples_per_client"],
                       fashion_mnist=spec.get("fashion_mnist"))
  cfg = Config(algorithm=spec["algorithm"], model=spec["model"], clients=spec["clients"],
               batch_size=spec["batch_size"], strategy=spec["strategy"],
               step_loop=spec["step_loop"], client_block=spec["client_block"],
               client_fraction=spec.get("client_fraction", 1.0),
               precision=spec["precision"], rounds=1,
               conv_lowering=spec.get("conv_lowering", "auto"))
  r = measure(cfg, ds, parts, spec["repeats"], spec["budget"])
  exp = r.pop("exp")
  fps = train_flops_per_sample(exp, w["batch_size"] if spec["model"] == "resnet18" else 32)
  r.update({"framework": "sfljax", "precision": spec["precision"],
            "train_flops_per_sample": fps,
            "gflops_per_second": fps * r["samples_per_round"] / r["seconds_per_round"] / 1e9,
            "peak_rss_bytes": peak_rss_bytes(), "device_peak_bytes": device_peak_bytes()})
  return r


def run_worker(spec: dict, timeout: float) -> dict:
  """Runs :func:`worker` in a fresh process; its result, or the reason it has none."""
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)]
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    errs = [l for l in proc.stderr.splitlines() if "Error" in l.split(":")[0]]
    tail = (errs or proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"error": f"exit {proc.returncode}: {tail}"}
  return json.loads(lines[-1])


def measure_pair(spec: dict, args) -> dict:
  """sfljax's row for ``spec``; with ``--torch`` the PyTorch loop's time beside it."""
  r = {**spec, **run_worker(spec, args.timeout)}
  if args.torch and "error" not in r:
    t = run_worker({**spec, "engine": "torch"}, args.timeout)
    if "error" in t:
      r["torch_error"] = t["error"]
    else:
      r.update(torch_seconds_per_round=t["seconds_per_round"],
               torch_all_round_seconds=t["all_round_seconds"],
               torch_samples_per_second=t["samples_per_second"],
               torch_peak_rss_bytes=t["peak_rss_bytes"], torch_version=t["torch_version"],
               speedup_vs_torch=t["seconds_per_round"] / r["seconds_per_round"])
  return r


def per_sample_spread(rows: list[dict]) -> list[dict]:
  """Per (model, algorithm): largest / smallest seconds per sample over K."""
  out = []
  keys = sorted({(r["model"], r["algorithm"]) for r in rows if "seconds_per_round" in r})
  for model, alg in keys:
    rs = [r for r in rows if r.get("model") == model and r.get("algorithm") == alg
          and "seconds_per_round" in r and r.get("framework") == "sfljax"]
    if len(rs) < 2:
      continue
    cost = {r["clients"]: r["seconds_per_round"] / r["samples_per_round"] for r in rs}
    out.append({"model": model, "algorithm": alg, "clients": sorted(cost),
                "worst_over_best": max(cost.values()) / min(cost.values())})
  return out


def fmt_bytes(b) -> str:
  return "-" if b is None else f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


def grid(args) -> dict:
  import jax
  rows = []
  print(f"matmul peak: {args.peak:.0f} GFLOP/s ({jax.default_backend()})", flush=True)
  head = (f"{'model':9s} {'algorithm':9s} {'K':>5s} {'compile s':>9s} {'s/round':>9s} "
          f"{'samples/s':>10s} {'GFLOP/s':>8s} {'peak RSS':>9s} {'torch s/round':>13s} "
          f"{'speedup':>7s}")
  print(head, flush=True)
  for model in args.models:
    w = WORKLOADS[model]
    spc = args.samples_per_client or w["samples_per_client"]
    bs = args.batch_size or w["batch_size"]
    last: dict[str, tuple[int, float]] = {}
    for k in args.clients:
      for alg in args.algorithms:
        spec = {"engine": "sfljax", "model": model, "algorithm": alg, "clients": k,
                "samples_per_client": spc, "batch_size": bs, "strategy": args.strategy,
                "step_loop": args.step_loop, "client_block": args.client_block,
                "precision": args.precision, "conv_lowering": args.conv_lowering,
                "repeats": args.repeats, "budget": args.budget}
        if alg in last:
          k0, s0 = last[alg]
          predicted = s0 * k / k0
          if predicted > args.budget:
            rows.append({**spec, "skipped": f"predicted {predicted:.0f} s per round "
                                            f"> --budget {args.budget:.0f} s"})
            print(f"{model:9s} {alg:9s} {k:5d}  skipped: predicted {predicted:.0f} s/round",
                  flush=True)
            continue
        r = measure_pair(spec, args)
        rows.append(r)
        if "error" in r:
          print(f"{model:9s} {alg:9s} {k:5d}  failed: {r['error']}", flush=True)
          continue
        last[alg] = (k, r["seconds_per_round"])
        ts, sp = r.get("torch_seconds_per_round"), r.get("speedup_vs_torch")
        print(f"{model:9s} {alg:9s} {k:5d} {r['compile_seconds']:9.1f} "
              f"{r['seconds_per_round']:9.3f} {r['samples_per_second']:10.0f} "
              f"{r['gflops_per_second']:8.1f} {fmt_bytes(r['peak_rss_bytes']):>9s} "
              f"{'-' if ts is None else f'{ts:.3f}':>13s} "
              f"{'-' if sp is None else f'{sp:.2f}x':>7s}"
              f"{'' if r['timed_rounds'] > 1 else '  (timed once: over budget)'}",
              flush=True)
  spread = per_sample_spread(rows)
  for s in spread:
    print(f"per-sample cost {s['model']} {s['algorithm']}: worst/best over K={s['clients']} "
          f"= {s['worst_over_best']:.2f}", flush=True)
  return {"rows": rows, "per_sample_spread": spread}


# The workloads users run (issue: benchmark what the paper and researchers run,
# not only the case that flatters a batched implementation).
SUITE = {
    # The paper's configuration: the whole Fashion-MNIST training set over 5
    # clients, batch 1024, LeNet.
    "paper_lenet": {"model": "lenet", "clients": 5, "samples_per_client": 12000,
                    "batch_size": 1024, "fashion_mnist": True},
    # The paper's HAM10000 shape (64x64x3, 7 classes), ResNet18, 5 clients,
    # batch 256, one batch per client per round (per-step cost as in the paper).
    "paper_resnet18": {"model": "resnet18", "clients": 5, "samples_per_client": 256,
                       "batch_size": 256},
    # The whole Fashion-MNIST training set over many clients, batch 32.
    "whole_100": {"model": "lenet", "clients": 100, "samples_per_client": 600,
                  "batch_size": 32, "fashion_mnist": True},
    "whole_1000": {"model": "lenet", "clients": 1000, "samples_per_client": 60,
                   "batch_size": 32, "fashion_mnist": True},
    # Small shards: 64 samples per client (the README's grid).
    "small_100": {"model": "lenet", "clients": 100, "samples_per_client": 64,
                  "batch_size": 32},
}


def suite(args) -> dict:
  """Every workload of :data:`SUITE` x algorithm, sfljax and (--torch) PyTorch."""
  rows = []
  print(f"{'workload':15s} {'algorithm':9s} {'compile s':>9s} {'s/round':>9s} "
        f"{'samples/s':>10s} {'peak RSS':>9s} {'torch s/round':>13s} {'speedup':>7s}",
        flush=True)
  for name in args.workloads:
    w = SUITE[name]
    if w.get("fashion_mnist") and not args.fashion_mnist:
      print(f"{name:15s} skipped: needs --fashion-mnist DIR", flush=True)
      rows.append({"workload": name, **w, "skipped": "needs --fashion-mnist DIR"})
      continue
    for alg in args.algorithms:
      spec = {"engine": "sfljax", "model": w["model"], "algorithm": alg,
              "clients": w["clients"], "samples_per_client": w["samples_per_client"],
              "batch_size": w["batch_size"], "strategy": args.strategy,
              "step_loop": args.step_loop, "client_block": args.client_block,
              "precision": args.precision, "conv_lowering": args.conv_lowering,
              "repeats": args.repeats, "budget": args.budget,
              "fashion_mnist": args.fashion_mnist if w.get("fashion_mnist") else None}
      load = os.getloadavg()[0]  # The machine must be quiet: recorded per row.
      r = {"workload": name, "load_before": load, **measure_pair(spec, args)}
      r["load_after"] = os.getloadavg()[0]
      rows.append(r)
      if "error" in r:
        print(f"{name:15s} {alg:9s} failed: {r['error']}", flush=True)
        continue
      ts, sp = r.get("torch_seconds_per_round"), r.get("speedup_vs_torch")
      print(f"{name:15s} {alg:9s} {r['compile_seconds']:9.1f} {r['seconds_per_round']:9.3f} "
            f"{r['samples_per_second']:10.0f} {fmt_bytes(r['peak_rss_bytes']):>9s} "
            f"{'-' if ts is None else f'{ts:.3f}':>13s} "
            f"{'-' if sp is None else f'{sp:.2f}x':>7s}  load {load:.2f}-{r['load_after']:.2f}",
            flush=True)
  return {"rows": rows}


def suite_markdown(result: dict) -> str:
  """The table of a saved suite run."""
  lines = ["| workload | algorithm | s/round (median) | samples/s | peak RSS | PyTorch s/round "
           "| speedup |", "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in result["rows"]:
    if "seconds_per_round" not in r:
      lines.append(f"| {r['workload']} | {r.get('algorithm', '')} "
                   f"| {r.get('skipped') or r.get('error')} | | | | |")
      continue
    ts, sp = r.get("torch_seconds_per_round"), r.get("speedup_vs_torch")
    lines.append(f"| {r['workload']} | {r['algorithm']} | {r['seconds_per_round']:.3f} "
                 f"| {r['samples_per_second']:,.0f} | {fmt_bytes(r['peak_rss_bytes'])} "
                 f"| {'-' if ts is None else f'{ts:.3f}'} "
                 f"| {'-' if sp is None else f'{sp:.2f}×'} |")
  return "\n".join(lines)


def fashion_mnist_epoch(args) -> dict:
  """One global epoch of the paper's Fashion-MNIST/LeNet setting per algorithm."""
  from sfljax import data
  from sfljax.train import Config
  ds = data.load_dataset("fashion_mnist", data_dir=args.fashion_mnist)
  parts = data.partition(ds.y_train, 5, seed=0)
  rows = []
  for alg in args.algorithms:
    cfg = Config(algorithm=alg, dataset="fashion_mnist", clients=5, batch_size=1024, lr=0.004,
                 step_loop=args.step_loop, rounds=1)
    r = measure(cfg, ds, parts, args.repeats, args.budget)
    r.pop("exp")
    rows.append(r)
    print(f"{alg:12s} {r['strategy']:10s} compile {r['compile_seconds']:.2f} s, "
          f"{r['seconds_per_round']:.2f} s per global epoch, "
          f"{r['samples_per_second']:.0f} samples/s", flush=True)
  return {"rows": rows}


def markdown(result: dict) -> str:
  """The README's table of a saved grid."""
  lines = ["| algorithm | K | compile s | s/round | samples/s | GFLOP/s | peak RSS "
           "| PyTorch s/round | speedup |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in result["rows"]:
    if "seconds_per_round" not in r:
      why = r.get("skipped") or r.get("error")
      lines.append(f"| {r['algorithm']} | {r['clients']} | {why} | | | | | | |")
      continue
    ts, sp = r.get("torch_seconds_per_round"), r.get("speedup_vs_torch")
    lines.append(
        f"| {r['algorithm']} | {r['clients']} | {r['compile_seconds']:.1f} "
        f"| {r['seconds_per_round']:.3f} | {r['samples_per_second']:,.0f} "
        f"| {r['gflops_per_second']:.1f} | {fmt_bytes(r['peak_rss_bytes'])} "
        f"| {'-' if ts is None else f'{ts:.3f}'} | {'-' if sp is None else f'{sp:.2f}×'} |")
  return "\n".join(lines)


def save(path: str, obj) -> None:
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(path + ".tmp", path)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", nargs="+", default=["lenet", "resnet18"], choices=sorted(WORKLOADS))
  p.add_argument("--algorithms", nargs="+", default=["sflv1", "sflv2", "sl", "fl"])
  p.add_argument("--clients", nargs="+", type=int, default=[1, 5, 20, 100, 1000])
  p.add_argument("--samples-per-client", type=int, default=None,
                 help="default: per model (lenet 64, resnet18 256)")
  p.add_argument("--batch-size", type=int, default=None,
                 help="default: per model (lenet 32, resnet18 256)")
  p.add_argument("--strategy", default="auto")
  p.add_argument("--step-loop", default="auto")
  p.add_argument("--client-block", type=int, default=None)
  p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
  p.add_argument("--conv-lowering", default="auto",
                 choices=("auto", "autotune", "xla", "patches", "taps"),
                 help="sfljax's --conv-lowering (autotune: measured in the worker, cached in "
                      "$SFLJAX_CONV_CACHE or ~/.cache/sfljax; compile seconds then include it)")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--budget", type=float, default=60.0,
                 help="seconds per round: slower configurations are timed once, and larger "
                      "K predicted to exceed it are skipped")
  p.add_argument("--timeout", type=float, default=1800.0, help="per worker process")
  p.add_argument("--torch", action="store_true",
                 help="also run the official-shaped PyTorch loop (needs torch) and report ratios")
  p.add_argument("--out", default="experiments/results/benchmark_cpu.json")
  p.add_argument("--fashion-mnist", metavar="DIR", default=None,
                 help="instead: one global epoch of the paper's Fashion-MNIST/LeNet setting "
                      "(60,000 samples, 5 clients, batch 1024) per algorithm")
  p.add_argument("--suite", action="store_true",
                 help="instead of the grid: the workloads users run (SUITE: the paper's "
                      "configurations, the whole Fashion-MNIST over 100 and 1000 clients, "
                      "small shards); needs --fashion-mnist DIR for the Fashion-MNIST ones")
  p.add_argument("--workloads", nargs="+", default=list(SUITE), choices=list(SUITE),
                 help="with --suite: which workloads")
  p.add_argument("--markdown", metavar="JSON", default=None,
                 help="print the table of a saved result as markdown and exit")
  p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.markdown:
    with open(args.markdown) as f:
      saved = json.load(f)
    print(suite_markdown(saved) if saved.get("settings", {}).get("suite") else markdown(saved))
    return 0
  if args.worker:
    print(json.dumps(worker(json.loads(args.worker))))
    return 0
  if args.torch:
    sys.path.insert(0, HERE)
    import torch_baseline
    if not torch_baseline.torch_available():
      print("benchmark: --torch needs PyTorch: pip install torch==2.13.0", file=sys.stderr)
      return 2
  if args.suite:
    result = suite(args)
    out = args.out.replace(".json", "_suite.json")
  elif args.fashion_mnist:
    result = fashion_mnist_epoch(args)
    out = args.out.replace(".json", "_fashion_mnist.json")
  else:
    args.peak = matmul_peak()
    result = grid(args)
    result["matmul_peak_gflops"] = args.peak
    out = args.out
  result.update({"machine": machine(), "settings": vars(args),
                 "date": time.strftime("%Y-%m-%d %H:%M:%S")})
  save(out, result)
  print(f"saved {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
