"""Per-layer convolution table: each lowering against PyTorch, for the layers the workloads run.

For every convolution of LeNet (batch 32 and 1024) and of ResNet18 64x64
(batch 256), each part a training step runs -- forward, input gradient
(not for a model's first layer, whose input is data) and kernel gradient --
is timed with each method of ``sfljax.conv`` (``xla``, ``patches``,
``taps``) *inside a ``lax.scan``* of 4 calls on different inputs, as the
rounds run them and as ``--conv-lowering autotune`` measures
(``sfljax.conv_autotune.measure``), beside the method the fixed rule picks
(``sfljax.conv.auto_lowering``) and PyTorch's own forward /
``convolution_backward`` for the same shapes (oneDNN, as many threads as
cores; its input is padded beforehand, so its times leave padding out).
PyTorch runs no loop: each of its calls is timed alone.

  python experiments/conv_layer_table.py --out experiments/results/conv_layers

writes ``conv_layers.json`` and ``conv_layers.md`` into ``--out`` (a new
folder). XLA's convolution is not timed on maps of at most 2x2 outputs
(the rule's ``tiny`` layers): there it takes seconds per call
(``conv_bench_cpu.json``: 2.2 s and 8.9 s), and the table says so.

A first layer's input gradient is not timed (its input is data). With
``--methods all`` (default) every method is timed for every part, 4 calls
per scan and ``--repeats`` + 1 scans: on the 2-core CPU ``--layers lenet``
takes about 2 minutes, but ResNet18's layers far longer (the stem's
``taps`` forward alone is ~7.6 s per call, XLA's kernel gradient of the
16x16x64 layers ~17 s). ``--methods rule`` times only the method the fixed
rule picks for each part, beside PyTorch: the per-layer profile of what the
rounds run, e.g. for ResNet18:

  python experiments/conv_layer_table.py --out DIR --layers r18 --methods rule
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

PARTS = ("fwd", "dx", "dw")
METHODS = ("xla", "patches", "taps")
PART_NAMES = {"fwd": "forward", "dx": "input gradient", "dw": "kernel gradient"}


def layer_shapes(layer):
  """(x_shape, w_shape, strides, pads) of a ``conv_bench`` layer tuple."""
  from sfljax import conv
  _, b, h, cin, cout, k, s, pad, _ = layer
  pads = conv.normalize_padding(pad, (h, h), (k, k), (s, s))
  return (b, h, h, cin), (k, k, cin, cout), (s, s), pads


def skipped_methods(x_shape, w_shape, strides, pads) -> tuple[str, ...]:
  """Methods not timed for this shape: XLA's on outputs of at most 2x2."""
  from sfljax import conv
  ho = conv._out_size(x_shape[1], w_shape[0], strides[0], *pads[0])
  wo = conv._out_size(x_shape[2], w_shape[1], strides[1], *pads[1])
  return ("xla",) if ho * wo <= 4 else ()


def measure_layer(layer, repeats: int, methods: str = "all") -> dict:
  """{"parts": {part: {method: ms}}, "rule": [...], "torch": {part: ms} or None, ...}.

  ``methods``: "all" (every method not skipped) or "rule" (the rule's only)."""
  import jax.numpy as jnp
  import conv_bench
  from sfljax import conv, conv_autotune
  x_shape, w_shape, strides, pads = layer_shapes(layer)
  skip = skipped_methods(x_shape, w_shape, strides, pads)
  parts = PARTS if layer[-1] else ("fwd", "dw")
  rule = conv.auto_lowering(x_shape, w_shape, strides, pads)
  if methods == "rule":
    timed = {p: (m,) for p, m in zip(PARTS, rule) if p in parts}
  else:
    timed = tuple(m for m in METHODS if m not in skip)
  times = conv_autotune.measure(x_shape, w_shape, strides, pads, jnp.float32, repeats=repeats,
                                methods=timed, parts=parts)
  torch = conv_bench.torch_components(layer, repeats)
  return {
      "layer": layer[0], "batch": layer[1], "x": list(x_shape), "kernel": list(w_shape),
      "strides": list(strides), "pads": [list(p) for p in pads],
      "parts": {p: {m: 1e3 * t for m, t in times[p].items()} for p in parts},
      "skipped": list(skip),
      "rule": list(rule),
      "torch": None if torch is None else {k.split("/")[0]: 1e3 * v for k, v in torch.items()
                                           if k.split("/")[0] in parts},
  }


def summarize(rows: list[dict]) -> list[dict]:
  """Per layer: the rule's parts summed against PyTorch's, and the ratio
  (PyTorch ms / sfljax ms: above 1 means the rule's lowering is faster)."""
  out = []
  for r in rows:
    rule = dict(zip(PARTS, r["rule"]))
    ours = sum(r["parts"][p][rule[p]] for p in r["parts"])
    theirs = None if r["torch"] is None else sum(r["torch"][p] for p in r["parts"])
    out.append({"layer": r["layer"], "rule_ms": ours, "torch_ms": theirs,
                "torch_over_rule": None if theirs is None else theirs / ours})
  return out


def _fmt(v) -> str:
  return "—" if v is None else f"{v:.2f}"


def markdown(result: dict) -> str:
  rows, totals = result["rows"], summarize(result["rows"])
  lines = [
      "# Convolutions per layer: each lowering (in a scan) against PyTorch",
      "",
      f"Machine: {result['machine']['cpu_model']}, {result['machine']['cpu_count']} cores, "
      f"jax {result['machine']['jax']}, torch {result.get('torch_version') or 'absent'}; "
      f"{result['date']}, load {result['load_before']:.2f} before and "
      f"{result['load_after']:.2f} after.",
      f"Command: `{result['command']}`",
      "",
      "ms per call. sfljax's methods: median of "
      f"{result['repeats']} scans of 4 calls (after a warm-up), per call. PyTorch: median of "
      f"{result['repeats']} calls alone (after a warm-up), input padded beforehand. "
      "**bold** = the method the fixed rule (`auto_lowering`) picks. "
      "PyTorch ÷ rule above 1: the rule's method is faster than PyTorch's.",
      "",
      "| layer | part | xla | patches | taps | rule | PyTorch | PyTorch ÷ rule |",
      "| --- | --- | ---: | ---: | ---: | --- | ---: | ---: |",
  ]
  for r in rows:
    rule = dict(zip(PARTS, r["rule"]))
    for p, t in r["parts"].items():
      cells = []
      for m in METHODS:
        if m in r["skipped"]:
          cells.append("not timed")
        elif m not in t:
          cells.append("—")
        else:
          cells.append(f"**{t[m]:.2f}**" if m == rule[p] else f"{t[m]:.2f}")
      torch = None if r["torch"] is None else r["torch"][p]
      ratio = None if torch is None else torch / t[rule[p]]
      lines.append(f"| `{r['layer']}` | {PART_NAMES[p]} | " + " | ".join(cells)
                   + f" | {rule[p]} | {_fmt(torch)} | {_fmt(ratio)} |")
  lines += ["", "Per layer, the parts a training step runs, summed:", "",
            "| layer | sfljax (rule) ms | PyTorch ms | PyTorch ÷ rule |",
            "| --- | ---: | ---: | ---: |"]
  for t in totals:
    lines.append(f"| `{t['layer']}` | {t['rule_ms']:.2f} | {_fmt(t['torch_ms'])} "
                 f"| {_fmt(t['torch_over_rule'])} |")
  if any(m not in t and m not in r["skipped"] for r in rows for t in r["parts"].values()
         for m in METHODS):
    lines += ["", "—: not timed in this run (`--methods rule` times only the rule's method)."]
  if any(r["skipped"] for r in rows):
    lines += ["", "not timed: XLA's convolution on outputs of at most 2x2 takes seconds per "
              "call on this CPU (`conv_bench_cpu.json`), and the rule never picks it there."]
  return "\n".join(lines) + "\n"


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", required=True, help="a new folder for conv_layers.json and .md")
  ap.add_argument("--layers", nargs="*", default=None,
                  help="substrings of conv_bench layer names (default: all)")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--methods", choices=("all", "rule"), default="all",
                  help="time every method (all) or only the fixed rule's per part (rule)")
  args = ap.parse_args(argv)
  if os.path.exists(args.out):
    print(f"conv_layer_table: --out {args.out} exists; give a new folder", file=sys.stderr)
    return 2
  if args.repeats < 1:
    print("conv_layer_table: --repeats must be at least 1", file=sys.stderr)
    return 2
  import conv_bench
  layers = [l for l in conv_bench.LAYERS
            if not args.layers or any(s in l[0] for s in args.layers)]
  if not layers:
    print(f"conv_layer_table: no layer matches {args.layers}; names are "
          f"{', '.join(l[0] for l in conv_bench.LAYERS)}", file=sys.stderr)
    return 2
  try:
    import torch
    torch_version = torch.__version__
  except ImportError:
    torch_version = None
  load_before = os.getloadavg()[0]
  rows = []
  for layer in layers:
    rows.append(measure_layer(layer, args.repeats, args.methods))
    print(layer[0], json.dumps(rows[-1]["parts"]), "torch", json.dumps(rows[-1]["torch"]),
          flush=True)
  result = {"machine": conv_bench.machine(), "torch_version": torch_version,
            "date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
            "load_before": load_before, "load_after": os.getloadavg()[0],
            "repeats": args.repeats,
            "command": "python experiments/conv_layer_table.py " + " ".join(
                argv if argv is not None else sys.argv[1:]),
            "rows": rows, "totals": summarize(rows)}
  tmp = args.out + ".partial"   # renamed into place once both files are whole
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  with open(os.path.join(tmp, "conv_layers.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(tmp, "conv_layers.md"), "w") as f:
    f.write(markdown(result))
  os.rename(tmp, args.out)
  print(markdown(result))
  return 0


if __name__ == "__main__":
  sys.exit(main())
