"""CPU benchmark of the convolution lowerings in sfljax.conv.

Measures, interleaved in one process (the 2-core machine may be shared, so
alternatives are always timed round-robin and medians are reported):

1. components: per layer, forward / input-gradient / kernel-gradient time of
   each method (xla, patches, taps);
2. layers: per layer fwd+bwd time of each named lowering and of 'auto',
   with GFLOP/s (fwd+bwd = 3x the forward FLOPs, 2x if the layer's input
   gradient is not needed, e.g. the stem and LeNet conv1);
3. end to end: ResNet18 64x64 full-model SGD train step (batch 256) with
   lowering 'xla' vs 'auto', and the LeNet client half (cut 2) fwd+bwd at
   batch 1024.

  python experiments/conv_bench.py                 # everything, saves JSON
  python experiments/conv_bench.py --parts layers --repeats 7
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from sfljax import conv, models  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import profile_step  # noqa: E402

# (name, batch, H=W, C_in, C_out, k, stride, padding, needs input gradient)
RESNET_LAYERS = [
    ("r18_stem_64x64_3-64_k7s2", 256, 64, 3, 64, 7, 2, ((3, 3), (3, 3)), False),
    ("r18_16x16_64-64_k3", 256, 16, 64, 64, 3, 1, ((1, 1), (1, 1)), True),
    ("r18_16x16-8x8_64-128_k3s2", 256, 16, 64, 128, 3, 2, ((1, 1), (1, 1)), True),
    ("r18_16x16-8x8_64-128_k1s2", 256, 16, 64, 128, 1, 2, "VALID", True),
    ("r18_8x8_128-128_k3", 256, 8, 128, 128, 3, 1, ((1, 1), (1, 1)), True),
    ("r18_8x8-4x4_128-256_k3s2", 256, 8, 128, 256, 3, 2, ((1, 1), (1, 1)), True),
    ("r18_8x8-4x4_128-256_k1s2", 256, 8, 128, 256, 1, 2, "VALID", True),
    ("r18_4x4_256-256_k3", 256, 4, 256, 256, 3, 1, ((1, 1), (1, 1)), True),
    ("r18_4x4-2x2_256-512_k3s2", 256, 4, 256, 512, 3, 2, ((1, 1), (1, 1)), True),
    ("r18_4x4-2x2_256-512_k1s2", 256, 4, 256, 512, 1, 2, "VALID", True),
    ("r18_2x2_512-512_k3", 256, 2, 512, 512, 3, 1, ((1, 1), (1, 1)), True),
]
LENET_LAYERS = [
    (f"lenet_conv{i}_b{b}", b, h, cin, cout, 5, 1, pad, i == 2)
    for b in (32, 1024)
    for i, (h, cin, cout, pad) in enumerate([(28, 1, 6, "SAME"), (14, 6, 16, "VALID")], start=1)
] + [("lenet32x32x3_conv1_b1024", 1024, 32, 3, 6, 5, 1, "VALID", False)]
LAYERS = RESNET_LAYERS + LENET_LAYERS


def machine() -> dict:
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    cpu = names[0] if names else platform.processor()
  except OSError:
    cpu = platform.processor()
  return {"cpu_model": cpu, "cpu_count": os.cpu_count(), "jax": jax.__version__,
          "backend": jax.default_backend(), "python": platform.python_version(),
          "platform": platform.platform()}


def interleaved(fns: dict, args: dict, repeats: int) -> dict:
  """Median seconds per call of each fn, timed round-robin after a warm-up."""
  for k, f in fns.items():
    jax.block_until_ready(f(*args[k]))
  times = {k: [] for k in fns}
  for _ in range(repeats):
    for k, f in fns.items():
      t0 = time.perf_counter()
      jax.block_until_ready(f(*args[k]))
      times[k].append(time.perf_counter() - t0)
  return {k: statistics.median(v) for k, v in times.items()}


def _layer_data(layer, seed=0):
  name, b, h, cin, cout, k, s, pad, _ = layer
  rs = np.random.RandomState(seed)
  x = jnp.asarray(rs.standard_normal((b, h, h, cin)), jnp.float32)
  w = jnp.asarray(rs.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin), jnp.float32)
  pads = conv.normalize_padding(pad, (h, h), (k, k), (s, s))
  y = conv.conv2d(x, w, strides=s, padding=pads, lowering="xla")
  g = jnp.asarray(rs.standard_normal(y.shape), jnp.float32)
  flops = 2.0 * y.shape[0] * y.shape[1] * y.shape[2] * cout * k * k * cin
  return x, w, g, (s, s), pads, flops


def torch_components(layer, repeats) -> dict | None:
  """PyTorch's (mkldnn) forward / input-gradient / kernel-gradient ms for the same layer
  (NCHW, same threads as XLA uses: all cores), or None without torch."""
  try:
    import torch
  except ImportError:
    return None
  torch.set_num_threads(os.cpu_count() or 1)
  name, b, h, cin, cout, k, s, pad, need_dx = layer
  pads = conv.normalize_padding(pad, (h, h), (k, k), (s, s))
  (t, bo), (l, r) = pads
  g = torch.Generator().manual_seed(0)
  x = torch.randn(b, cin, h + t + bo, h + l + r, generator=g)  # padded up front (asymmetric pads)
  w = torch.randn(cout, cin, k, k, generator=g) / float(np.sqrt(k * k * cin))
  with torch.no_grad():
    y = torch.nn.functional.conv2d(x, w, stride=s)
  gy = torch.randn(y.shape, generator=g)
  mask = [bool(need_dx), True, False]

  def fwd():
    with torch.no_grad():
      torch.nn.functional.conv2d(x, w, stride=s)

  def bwd(which):
    m = [which == "dx", which == "dw", False]
    torch.ops.aten.convolution_backward(gy, x, w, None, [s, s], [0, 0], [1, 1], False, [0, 0],
                                        1, m)
  fns = {"fwd/torch": fwd, "dw/torch": lambda: bwd("dw")}
  if need_dx:
    fns["dx/torch"] = lambda: bwd("dx")
  del mask
  for f in fns.values():
    f()
  times = {key: [] for key in fns}
  for _ in range(repeats):
    for key, f in fns.items():
      t0 = time.perf_counter()
      f()
      times[key].append(time.perf_counter() - t0)
  return {key: statistics.median(v) for key, v in times.items()}


def bench_components(layers, repeats) -> dict:
  out = {}
  for layer in layers:
    x, w, g, s, pads, flops = _layer_data(layer)
    fns, args = {}, {}
    for m in conv.METHODS:
      fns[f"fwd/{m}"] = jax.jit(lambda x, w, m=m: conv._fwd(m, x, w, s, pads))
      args[f"fwd/{m}"] = (x, w)
      if layer[-1]:
        fns[f"dx/{m}"] = jax.jit(lambda g, w, m=m: conv._input_grad(m, g, x.shape, x.dtype, w, s, pads))
        args[f"dx/{m}"] = (g, w)
      fns[f"dw/{m}"] = jax.jit(lambda g, x, m=m: conv._kernel_grad(m, g, x, w.shape, w.dtype, s, pads))
      args[f"dw/{m}"] = (g, x)
    t = interleaved(fns, args, repeats)
    t.update(torch_components(layer, repeats) or {})
    out[layer[0]] = {k: {"ms": 1e3 * v, "gflops": flops / v / 1e9} for k, v in t.items()}
    best = {p: min((k for k in t if k.startswith(p + "/") and not k.endswith("/torch")),
                   key=t.get) for p in ("fwd", "dx", "dw") if any(k.startswith(p + "/") for k in t)}
    print(layer[0], " ".join(f"{k}={1e3 * v:.1f}" for k, v in t.items()), "best:", best, flush=True)
  return out


def _fwd_bwd_fn(lowering, s, pads, need_dx):
  def loss(x, w, g):
    return jnp.vdot(conv.conv2d(x, w, strides=s, padding=pads, lowering=lowering), g)
  return jax.jit(jax.grad(loss, argnums=(0, 1) if need_dx else 1))


def bench_layers(layers, repeats, lowerings=("xla", "patches", "taps", "auto")) -> dict:
  out = {}
  for layer in layers:
    x, w, g, s, pads, flops = _layer_data(layer)
    need_dx = layer[-1]
    total_flops = flops * (3 if need_dx else 2)
    fns = {lo: _fwd_bwd_fn(lo, s, pads, need_dx) for lo in lowerings}
    t = interleaved(fns, {lo: (x, w, g) for lo in lowerings}, repeats)
    out[layer[0]] = {
        "shape": dict(batch=layer[1], hw=layer[2], c_in=layer[3], c_out=layer[4], k=layer[5],
                      stride=layer[6], padding=str(layer[7]), input_grad=need_dx),
        "auto": list(conv.auto_lowering(x.shape, w.shape, s, pads)),
        "ms": {lo: 1e3 * v for lo, v in t.items()},
        "gflops": {lo: total_flops / v / 1e9 for lo, v in t.items()},
        "speedup_auto_vs_xla": t["xla"] / t["auto"] if "auto" in t else None,
    }
    print(layer[0], " ".join(f"{lo}={1e3 * v:.1f}ms" for lo, v in t.items()),
          "auto=", out[layer[0]]["auto"], flush=True)
  return out


def _with_lowering(forced):
  """Forces the lowering of every sfljax.conv.conv2d call (models.Conv uses 'auto')."""
  orig = conv.conv2d

  def patched(x, kernel, *, strides=1, padding="SAME", lowering="auto"):
    del lowering  # every conv of the model uses the benchmarked one
    return orig(x, kernel, strides=strides, padding=padding, lowering=forced)
  return mock.patch.object(conv, "conv2d", patched)


def bench_resnet(batch, repeats) -> dict:
  import optax
  model = models.get_model("resnet18", input_shape=(64, 64, 3), num_classes=7)
  variables = model.init(jax.random.key(0))
  module = model.full()
  opt = optax.sgd(0.01, momentum=0.9)
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.standard_normal((batch, 64, 64, 3)), jnp.float32)
  y = jnp.asarray(rs.randint(0, 7, batch))

  def make_step(lowering):
    with _with_lowering(lowering):
      step = profile_step.whole_model_step(module, opt)
      args = (variables["params"], variables["batch_stats"], opt.init(variables["params"]), x, y)
      compiled = jax.jit(step).lower(*args).compile()  # traced with the patched lowering
    return compiled, args

  fns, args = {}, {}
  for lo in ("xla", "auto"):
    fns[lo], args[lo] = make_step(lo)
  t = interleaved(fns, args, repeats)
  res = {lo: {"step_ms": 1e3 * v, "samples_per_s": batch / v} for lo, v in t.items()}
  res["speedup"] = t["xla"] / t["auto"]
  print("resnet18 64x64 train step", res, flush=True)
  return res


def bench_lenet(batch, repeats) -> dict:
  model = models.get_model("lenet", input_shape=(28, 28, 1), num_classes=10)
  variables = model.init(jax.random.key(0))
  client = model.parts(2)[0]
  cvars = model.split_variables(variables, 2)[0]
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.standard_normal((batch, 28, 28, 1)), jnp.float32)
  g = jnp.asarray(rs.standard_normal((batch, 5, 5, 16)), jnp.float32)

  def make(lowering):
    with _with_lowering(lowering):
      def f(p, x, g):
        out, vjp = jax.vjp(lambda p: models.apply_part(client, {"params": p}, x, train=True)[0], p)
        return out, vjp(g)[0]
      return jax.jit(f).lower(cvars["params"], x, g).compile()

  lowerings = ("xla", "patches", "taps", "auto")
  fns = {lo: make(lo) for lo in lowerings}
  t = interleaved(fns, {lo: (cvars["params"], x, g) for lo in lowerings}, repeats)
  res = {lo: {"ms": 1e3 * v, "samples_per_s": batch / v} for lo, v in t.items()}
  res["speedup_auto_vs_xla"] = t["xla"] / t["auto"]
  print(f"lenet client half fwd+bwd batch {batch}", res, flush=True)
  return res


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--parts", default="components,layers,resnet,lenet")
  ap.add_argument("--repeats", type=int, default=5)
  ap.add_argument("--layers", default="", help="substring filter on layer names")
  ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results",
                                                "conv_bench_cpu.json"))
  ap.add_argument("--no-save", action="store_true")
  ap.add_argument("--merge", action="store_true",
                  help="update the parts measured now in an existing --out file")
  args = ap.parse_args(argv)
  parts = args.parts.split(",")
  layers = [l for l in LAYERS if args.layers in l[0]]
  result = {"machine": machine(), "repeats": args.repeats,
            "note": "median seconds of interleaved runs after warm-up; fwd+bwd"}
  if "components" in parts:
    result["components"] = bench_components(layers, args.repeats)
  if "layers" in parts:
    result["layers"] = bench_layers(layers, args.repeats)
  if "resnet" in parts:
    result["resnet18_64x64_train_step_b256"] = bench_resnet(256, args.repeats)
  if "lenet" in parts:
    result["lenet_client_fwd_bwd_b1024"] = bench_lenet(1024, args.repeats)
  if not args.no_save:
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    if args.merge and os.path.exists(args.out):
      with open(args.out) as f:
        old = json.load(f)
      old.update(result)
      result = old
    with open(args.out, "w") as f:
      json.dump(result, f, indent=1)
    print("saved", args.out)


if __name__ == "__main__":
  main()
