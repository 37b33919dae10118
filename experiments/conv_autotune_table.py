"""Measures (sfljax.conv_autotune) every convolution of the benchmark suite's
models and prints the per-layer table: forward / input gradient / kernel
gradient time of each lowering, the fixed rule's choice and the measured one.

  SFLJAX_CONV_CACHE=experiments/results/conv_autotune_cpu.json \\
      python experiments/conv_autotune_table.py > experiments/results/conv_autotune_cpu.md

Tracing a whole-model training step with the Autotune policy measures each
distinct convolution once (entries already in the cache are only read).
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp

from sfljax import conv_autotune, models

# (model, input shape, classes, batch): LeNet at the whole-dataset batch (32)
# and the paper's (1024); ResNet18 64x64 at the paper's batch (256).
CASES = (("lenet", (28, 28, 1), 10, 32), ("lenet", (28, 28, 1), 10, 1024),
         ("resnet18", (64, 64, 3), 7, 256))


def trace(policy, name, shape, classes, batch) -> None:
  model = models.get_model(name, input_shape=shape, num_classes=classes, conv_lowering=policy)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), 1))
  x = jax.ShapeDtypeStruct((batch,) + shape, jnp.float32)

  def loss(v, a):
    out = models.apply_part(model.full(), v, a, train=True)[0]
    return jnp.sum(out)
  jax.jit(jax.grad(loss, argnums=(0, 1))).lower(variables, x)


def main() -> None:
  policy = conv_autotune.Autotune()
  for case in CASES:
    print(f"measuring {case[0]} at batch {case[3]} ...", file=sys.stderr, flush=True)
    trace(policy, *case)
  with open(policy.path()) as f:
    entries = json.load(f)[conv_autotune.machine_key()]
  print(f"Machine: {conv_autotune.machine_key()}\n")
  print("ms per call (median of 3 after a warm-up); rule = `auto_lowering`, chosen = "
        "the measured choice (kept to the rule unless >10% faster)\n")
  print("| convolution | part | xla | patches | taps | rule | chosen |")
  print("| --- | --- | ---: | ---: | ---: | --- | --- |")
  for key in sorted(policy.used, key=lambda k: (len(k), k)):
    e = entries[key]
    for i, part in enumerate(conv_autotune.PARTS):
      ms = e["ms"][part]
      mark = lambda m: f"**{ms[m]:.2f}**" if m == e["lowering"][i] else f"{ms[m]:.2f}"
      print(f"| `{key}` | {part} | {mark('xla')} | {mark('patches')} | {mark('taps')} | "
            f"{e['rule'][i]} | {e['lowering'][i]} |")


if __name__ == "__main__":
  main()
