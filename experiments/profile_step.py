"""Where a whole-model train step's time goes, per XLA operation and per layer.

Compiles one train step (forward, backward, Adam) of a built-in model at a
batch size, times it (median of ``--steps`` steps), then records
``--trace-steps`` steps under ``jax.profiler`` and attributes each executed
XLA operation (a fusion, a convolution, a dot, a copy, ...) to the model
layer and phase (forward / backward / optimizer) its metadata names.
With ``--torch`` the same model's step in PyTorch (the official-shaped
baseline's models, ``experiments/torch_baseline.py``) is timed in the same
process for comparison.  Writes ``OUT/profile.json`` and ``OUT/profile.md``.

  python experiments/profile_step.py --model lenet --batch 1024 --torch --out /tmp/prof

Timings are only meaningful on a quiet machine (the load is recorded).
"""
from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import pathlib
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfljax import models

SHAPES = {"lenet": ((28, 28, 1), 10), "alexnet": ((28, 28, 1), 10), "resnet18": ((64, 64, 3), 7)}
TORCH_MODELS = ("lenet", "resnet18")   # the models experiments/torch_baseline.py builds


def whole_model_step(module, opt):
  """``step(params, batch_stats, opt_state, x, y) -> (params, batch_stats, opt_state, loss)``:
  one whole-model train step (forward, backward, ``opt``), mean cross-entropy."""
  def step(params, stats, opt_state, x, y):
    def loss_fn(p):
      logits, new_stats = models.apply_part(module, {"params": p, "batch_stats": stats}, x,
                                            train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new_stats
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss
  return step


def build_step(model_name: str, batch: int, lowering: str = "auto"):
  shape, classes = SHAPES[model_name]
  model = models.get_model(model_name, input_shape=shape, num_classes=classes,
                           conv_lowering=lowering)
  variables = model.init(jax.random.key(0))
  module = model.full()
  opt = optax.adam(1e-3)
  rs = np.random.RandomState(0)
  x = jnp.asarray(rs.standard_normal((batch,) + shape), jnp.float32)
  y = jnp.asarray(rs.randint(0, classes, batch))
  stats = variables.get("batch_stats", {})

  step = whole_model_step(module, opt)
  args = (variables["params"], stats, opt.init(variables["params"]), x, y)
  compiled = jax.jit(step).lower(*args).compile()
  return compiled, args


def time_steps(compiled, args, steps: int) -> list[float]:
  out = compiled(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return times


_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\S+\s+([\w\-]+)\(")
_OPNAME = re.compile(r'op_name="([^"]*)"')


def hlo_index(hlo_text: str) -> dict[str, tuple[str, str]]:
  """Instruction name -> (opcode, metadata op_name) for the entry and loop bodies."""
  index = {}
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m:
      continue
    name, opcode = m.groups()
    if opcode == "fusion":
      kind = re.search(r"kind=(k\w+)", line)
      opcode = f"fusion:{kind.group(1)}" if kind else opcode
      if "__ynn_fusion" in line or "__xnn_fusion" in line:
        opcode += "(ynn/xnn)"
    op = _OPNAME.search(line)
    index.setdefault(name, (opcode, op.group(1) if op else ""))
  return index


def classify(op_name: str) -> tuple[str, str]:
  """(phase, layer) of an operation from its metadata op_name."""
  if not op_name:
    return "other", "?"
  if "transpose(jvp" in op_name:
    phase = "backward"
  elif "jvp(" in op_name:
    phase = "forward"
  else:
    phase = "optimizer"
  # Flax paths look like jit(step)/jvp(Sequential)/<block>/...; keep the block name.
  layer = "?"
  m = re.search(r"Sequential\)*/(\w+)", op_name)
  if m:
    layer = m.group(1)
  elif phase == "optimizer":
    layer = "adam"
  elif "softmax_cross_entropy" in op_name or "log_softmax" in op_name:
    layer = "loss"
  return phase, layer


def trace_ops(compiled, args, steps: int) -> dict[str, float]:
  """Executed XLA operation name -> total seconds over ``steps`` steps."""
  with tempfile.TemporaryDirectory() as d:
    jax.block_until_ready(compiled(*args))
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    for _ in range(steps):
      jax.block_until_ready(compiled(*args))
    jax.profiler.stop_trace()
    files = list(pathlib.Path(d).rglob("perfetto_trace.json.gz"))
    if not files:
      raise SystemExit("profile_step: jax.profiler wrote no perfetto trace")
    with gzip.open(files[0], "rt") as f:
      trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  totals = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and "dur" in e:
      totals[e["name"]] += e["dur"] * 1e-6
  return dict(totals)


def torch_step_times(model_name: str, batch: int, steps: int) -> list[float] | None:
  try:
    import torch
  except ImportError:
    return None
  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
  import torch_baseline
  shape, classes = SHAPES[model_name]
  torch.manual_seed(0)
  client, server = torch_baseline.build_model(model_name, input_shape=(shape[2], shape[0], shape[1]),
                                              num_classes=classes)
  net = torch.nn.Sequential(client, server)
  opt = torch.optim.Adam(net.parameters(), lr=1e-3)
  x = torch.randn((batch, shape[2], shape[0], shape[1]))
  y = torch.randint(0, classes, (batch,))
  loss_fn = torch.nn.CrossEntropyLoss()

  def one():
    opt.zero_grad()
    loss_fn(net(x), y).backward()
    opt.step()
  one()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    one()
    times.append(time.perf_counter() - t0)
  return times


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--model", choices=sorted(SHAPES), default="lenet")
  ap.add_argument("--batch", type=int, default=1024)
  ap.add_argument("--steps", type=int, default=10, help="timed steps (median)")
  ap.add_argument("--trace-steps", type=int, default=5)
  ap.add_argument("--lowering", default="auto", help="--conv-lowering of the model")
  ap.add_argument("--top", type=int, default=25)
  ap.add_argument("--torch", action="store_true")
  ap.add_argument("--out", required=True)
  a = ap.parse_args(argv)
  if a.batch < 1 or a.steps < 1 or a.trace_steps < 1:
    ap.error("--batch, --steps and --trace-steps must be positive")
  if a.torch and a.model not in TORCH_MODELS:
    ap.error(f"--torch: the PyTorch baseline builds {' and '.join(TORCH_MODELS)} only, "
             f"not {a.model}: drop --torch")
  out = pathlib.Path(a.out)
  if out.exists() and any(out.iterdir()):
    ap.error(f"--out {out} is not empty: give a new folder")

  load_before = os.getloadavg()[0]
  compiled, args = build_step(a.model, a.batch, a.lowering)
  index = hlo_index(compiled.as_text())
  times = time_steps(compiled, args, a.steps)
  step_s = statistics.median(times)
  torch_times = torch_step_times(a.model, a.batch, a.steps) if a.torch else None
  totals = trace_ops(compiled, args, a.trace_steps)
  load_after = os.getloadavg()[0]

  ops = []
  for name, secs in totals.items():
    if name not in index:
      continue
    opcode, op_name = index[name]
    phase, layer = classify(op_name)
    ops.append({"op": name, "opcode": opcode, "ms_per_step": 1e3 * secs / a.trace_steps,
                "phase": phase, "layer": layer, "op_name": op_name})
  ops.sort(key=lambda o: -o["ms_per_step"])
  traced = sum(o["ms_per_step"] for o in ops)
  by_layer = collections.defaultdict(float)
  by_opcode = collections.defaultdict(float)
  for o in ops:
    by_layer[(o["layer"], o["phase"])] += o["ms_per_step"]
    by_opcode[o["opcode"]] += o["ms_per_step"]

  report = {
      "model": a.model, "batch": a.batch, "lowering": a.lowering,
      "jax": jax.__version__, "backend": jax.default_backend(),
      "cpu_count": os.cpu_count(), "load_before": load_before, "load_after": load_after,
      "step_ms_median": 1e3 * step_s, "step_ms_all": [1e3 * t for t in times],
      "torch_step_ms_median": None if not torch_times else 1e3 * statistics.median(torch_times),
      "torch_step_ms_all": None if not torch_times else [1e3 * t for t in torch_times],
      "traced_ms_per_step": traced, "ops": ops,
      "by_layer_phase": [{"layer": k[0], "phase": k[1], "ms_per_step": v}
                         for k, v in sorted(by_layer.items(), key=lambda kv: -kv[1])],
      "by_opcode": dict(sorted(by_opcode.items(), key=lambda kv: -kv[1])),
  }
  lines = [f"# {a.model} train step, batch {a.batch} (forward + backward + Adam)", "",
           f"jax {jax.__version__} on {jax.default_backend()}, {os.cpu_count()} cores, "
           f"load {load_before:.2f} before, {load_after:.2f} after.", "",
           f"- sfljax (`--conv-lowering {a.lowering}`): median **{1e3 * step_s:.1f} ms** per step "
           f"({', '.join(f'{1e3 * t:.0f}' for t in times)})"]
  if torch_times:
    lines.append(f"- PyTorch, same model and batch: median **{report['torch_step_ms_median']:.1f} ms** "
                 f"({', '.join(f'{1e3 * t:.0f}' for t in torch_times)})")
  lines += [f"- XLA operations in the trace: {traced:.1f} ms per step "
            f"(summed over the threads that ran them; shares below are of this sum)", "",
            "## By layer and phase", "", "| layer | phase | ms/step | share |", "| --- | --- | ---: | ---: |"]
  lines += [f"| {r['layer']} | {r['phase']} | {r['ms_per_step']:.1f} | {r['ms_per_step'] / traced:.0%} |"
            for r in report["by_layer_phase"]]
  lines += ["", "## By operation kind", "", "| kind | ms/step | share |", "| --- | ---: | ---: |"]
  lines += [f"| {k} | {v:.1f} | {v / traced:.0%} |" for k, v in report["by_opcode"].items()]
  lines += ["", f"## The {a.top} most expensive operations", "",
            "| op | kind | layer | phase | ms/step | source |", "| --- | --- | --- | --- | ---: | --- |"]
  for o in ops[:a.top]:
    src = o["op_name"].split("/")[-1] if o["op_name"] else ""
    lines.append(f"| {o['op']} | {o['opcode']} | {o['layer']} | {o['phase']} | "
                 f"{o['ms_per_step']:.1f} | {src} |")
  out.mkdir(parents=True, exist_ok=True)
  (out / "profile.json").write_text(json.dumps(report, indent=1))
  (out / "profile.md").write_text("\n".join(lines) + "\n")
  print("\n".join(lines[:8 + len(report["by_layer_phase"])]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
