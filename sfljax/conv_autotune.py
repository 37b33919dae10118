"""Convolution lowerings chosen by measurement on the machine that runs them.

:func:`sfljax.conv.auto_lowering` is a fixed rule measured on the 2-core
development CPU. :class:`Autotune` is a lowering policy that instead times
every candidate (:data:`sfljax.conv.METHODS`) for the forward pass, the input
gradient and the kernel gradient of each distinct convolution (input shape,
kernel shape, strides, padding, dtype) the first time a model traces it, keeps
the fastest of each (timed inside a ``lax.scan``, the context the training
programs run them in), and stores the choice in a JSON cache keyed by the
machine (CPU model and count, backend, device kind, jax version), like cuDNN's
benchmark mode. Later traces, in this process or any other, read the cache
and measure nothing.

A candidate replaces the fixed rule's choice only when it is faster by more
than :data:`MARGIN`: timings that differ by noise keep the rule. Components
are timed alone; inside a whole round XLA may fuse neighbouring operations
differently, so check whole rounds (``experiments/benchmark.py --suite``)
before trusting a choice.

Lowerings differ in float rounding. A run is reproducible bit for bit under
one cache: the cache is never rewritten for an entry it holds (delete the
file, or point ``SFLJAX_CONV_CACHE`` elsewhere, to measure again), and the
training CLI writes the choices it used into the run's ``summary.json``.

Usage::

    policy = Autotune()                       # cache: $SFLJAX_CONV_CACHE or
    model = get_model("resnet18", ..., conv_lowering=policy)   # ~/.cache/sfljax/
    ...                                       # policy.used: the choices made
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax import lax

from sfljax import conv

__all__ = ["Autotune", "MARGIN", "default_cache_path", "machine_key", "measure", "policy"]

MARGIN = 0.10   # a candidate must beat the rule's choice by more than 10%
# Each candidate runs inside a lax.scan over this many different inputs: the
# training programs run their steps in a scan, and XLA:CPU compiles some
# convolutions far slower inside a loop body (LeNet's conv2 kernel gradient at
# batch 32: 0.9 ms alone, 8.0 ms per iteration in a scan).
SCAN_LENGTH = 4
PARTS = ("fwd", "dx", "dw")


def default_cache_path() -> str:
  """``$SFLJAX_CONV_CACHE``, else ``$XDG_CACHE_HOME/sfljax/conv_lowerings.json``
  (``~/.cache`` when XDG_CACHE_HOME is unset)."""
  if os.environ.get("SFLJAX_CONV_CACHE"):
    return os.environ["SFLJAX_CONV_CACHE"]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "sfljax", "conv_lowerings.json")


def _cpu_model() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def machine_key() -> str:
  """What a measurement depends on besides the convolution itself."""
  dev = jax.devices()[0]
  return "|".join([jax.default_backend(), dev.device_kind, _cpu_model(),
                   f"{os.cpu_count()} cpus", f"jax {jax.__version__}",
                   f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')}"])


def conv_key(x_shape, w_shape, strides, pads, dtype) -> str:
  return (f"x{'x'.join(map(str, x_shape))} w{'x'.join(map(str, w_shape))} "
          f"s{strides[0]}x{strides[1]} p{pads[0][0]},{pads[0][1]},{pads[1][0]},{pads[1][1]} "
          f"{jnp.dtype(dtype).name}")


def _median_seconds(f, args, repeats: int) -> float:
  jax.block_until_ready(f(*args))          # compile + warm-up
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def measure(x_shape, w_shape, strides, pads, dtype, *, repeats: int = 3,
            methods=conv.METHODS, parts=PARTS) -> dict[str, dict[str, float]]:
  """Median seconds of each method for each part: ``{part: {method: s}}``,
  per call inside a ``lax.scan`` of :data:`SCAN_LENGTH` calls on different
  fixed random inputs.

  ``methods``: the methods timed for every part, or a mapping part ->
  methods (e.g. only the fixed rule's choice per part). ``parts``: which of
  :data:`PARTS` to time (a model's first layer needs no input gradient).

  Runs eagerly even when called while a function is being traced (each
  candidate is its own compiled program).
  """
  x_shape, w_shape = tuple(x_shape), tuple(w_shape)
  strides = tuple(strides)
  pads = tuple(tuple(p) for p in pads)
  unknown = [p for p in parts if p not in PARTS]
  if unknown:
    raise ValueError(f"unknown parts {unknown}: choose from {PARTS}")
  if isinstance(methods, Mapping):
    missing = [p for p in parts if p not in methods]
    if missing:
      raise ValueError(f"methods names no methods for parts {missing}: give each of {parts}")
    per_part = {p: tuple(methods[p]) for p in parts}
  else:
    per_part = {p: tuple(methods) for p in parts}
  kh, kw, _, cout = w_shape
  ho = (x_shape[1] + sum(pads[0]) - kh) // strides[0] + 1
  wo = (x_shape[2] + sum(pads[1]) - kw) // strides[1] + 1
  out: dict[str, dict[str, float]] = {p: {} for p in parts}
  n = SCAN_LENGTH
  scanned = lambda f: jax.jit(lambda *xs: lax.scan(lambda c, a: (c, f(*a)), None, xs)[1])
  with jax.ensure_compile_time_eval():
    kx, kw_, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (n,) + x_shape, dtype)
    w = jax.random.normal(kw_, (n,) + w_shape, dtype)
    g = jax.random.normal(kg, (n, x_shape[0], ho, wo, cout), dtype)
    programs = {
        "fwd": lambda m: (scanned(lambda x_, w_: conv._fwd(m, x_, w_, strides, pads)), (x, w)),
        "dx": lambda m: (scanned(lambda g_, w_: conv._input_grad(m, g_, x_shape, dtype, w_,
                                                                  strides, pads)), (g, w)),
        "dw": lambda m: (scanned(lambda g_, x_: conv._kernel_grad(m, g_, x_, w_shape, dtype,
                                                                   strides, pads)), (g, x)),
    }
    for p in parts:
      for m in per_part[p]:
        f, args = programs[p](m)
        out[p][m] = _median_seconds(f, args, repeats) / n
  return out


def choose(times: dict[str, dict[str, float]], rule: tuple[str, str, str]
           ) -> tuple[str, str, str]:
  """Per part, the fastest method if it beats the rule's by more than
  :data:`MARGIN`, else the rule's."""
  picked = []
  for part, ruled in zip(PARTS, rule):
    best = min(times[part], key=times[part].get)
    base = times[part].get(ruled)
    picked.append(best if base is None or times[part][best] < (1 - MARGIN) * base else ruled)
  return tuple(picked)


@contextlib.contextmanager
def _locked(path: str):
  import fcntl
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _read(path: str) -> dict:
  try:
    with open(path) as f:
      data = json.load(f)
    return data if isinstance(data, dict) else {}
  except (OSError, ValueError):
    return {}


@dataclasses.dataclass(frozen=True)
class Autotune:
  """A lowering policy for :func:`sfljax.conv.conv2d` / :class:`sfljax.conv.Conv`
  (``lowering=Autotune()``) and :func:`sfljax.models.get_model`
  (``conv_lowering=Autotune()``).

  Attributes:
    cache: the JSON cache file; ``None`` = :func:`default_cache_path`.
    repeats: timed calls per candidate (after a warm-up call).
    used: filled as convolutions are resolved: ``{conv key: [fwd, dx, dw]}``.
  """
  cache: str | None = None
  repeats: int = 3
  used: dict = dataclasses.field(default_factory=dict, compare=False, hash=False, repr=False)

  def path(self) -> str:
    return self.cache or default_cache_path()

  def __call__(self, x_shape, w_shape, strides, pads, dtype) -> tuple[str, str, str]:
    if jax.default_backend() != "cpu":
      return conv.auto_lowering(x_shape, w_shape, strides, pads)  # XLA's own everywhere else
    key, machine = conv_key(x_shape, w_shape, strides, pads, dtype), machine_key()
    entry = _read(self.path()).get(machine, {}).get(key)
    if entry is None:
      rule = conv.auto_lowering(x_shape, w_shape, strides, pads)
      times = measure(x_shape, w_shape, strides, pads, dtype, repeats=self.repeats)
      entry = {"lowering": list(choose(times, rule)), "rule": list(rule),
               "ms": {p: {m: round(s * 1e3, 4) for m, s in t.items()} for p, t in times.items()}}
      path = self.path()
      with _locked(path):   # Merge: entries another process wrote meanwhile are kept.
        data = _read(path)
        entry = data.setdefault(machine, {}).setdefault(key, entry)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
          json.dump(data, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    methods = tuple(entry["lowering"])
    if len(methods) != 3 or any(m not in conv.METHODS for m in methods):
      raise ValueError(f"{self.path()}: bad entry for {key}: {entry!r} (delete the file to "
                       "measure again)")
    self.used[key] = list(methods)
    return methods


def policy(name: str):
  """The ``lowering`` value for a ``--conv-lowering`` name: 'autotune' -> a
  fresh :class:`Autotune` (default cache), anything else unchanged."""
  return Autotune() if name == "autotune" else name
