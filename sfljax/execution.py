"""How the client axis is executed: a strategy independent of the algorithms.

Algorithms call ``executor.map(fn, *args)`` where every leaf of ``args`` has
a leading client axis; the executor decides how the clients run inside the
compiled program:

* ``vmap``: all clients at once (``jax.vmap``); per-client weights become
  batched (grouped) operations. Expected to win on GPU/TPU.
* ``sequential``: one client after another inside the compiled program
  (a ``lax.scan`` over clients, fully unrolled for at most ``unroll_up_to``
  clients, which XLA:CPU runs ~2.5x faster than a loop body at the price of
  longer compilation); with ``block`` > 1, blocks of that many clients are
  vmapped and the blocks run one after another. A group of one client is
  always just vmapped (free).

The steps of a round are driven either by ``lax.fori_loop`` inside one
compiled round (``step_loop="scan"``) or by a Python loop over one compiled
step (``"python"``; no host round-trip: dispatch is asynchronous and metrics
are pulled once per round).

``auto`` picks per backend from the measurements in the README: on XLA:CPU a
vmapped convolution with per-client weights lowers to a grouped convolution
whose gradient is far slower than running the clients one by one, and loop
bodies run slower than the same step compiled on its own, so CPU gets
``sequential`` clients and a Python step loop; accelerators get ``vmap`` and
``scan``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

STRATEGIES: tuple[str, ...] = ("auto", "vmap", "sequential")
STEP_LOOPS: tuple[str, ...] = ("auto", "scan", "python")


@dataclasses.dataclass(frozen=True)
class ClientExecutor:
  """Maps a per-client function over a leading client axis."""
  name: str
  block: int | None = None
  step_loop: str = "scan"

  unroll_up_to: int = 8   # sequential: unroll the client loop for at most this many clients

  def map(self, fn: Callable[..., Any], *args):
    num = jax.tree.leaves(args)[0].shape[0]
    if self.name == "vmap" or num == 1:
      return jax.vmap(fn)(*args)
    if self.name == "sequential":
      if self.block:
        return jax.lax.map(lambda a: fn(*a), args, batch_size=self.block)
      unroll = num if num <= self.unroll_up_to else 1
      _, out = jax.lax.scan(lambda c, a: (c, fn(*a)), None, args, unroll=unroll)
      return out
    raise ValueError(f"unknown strategy {self.name!r}")


def resolve(strategy: str = "auto", backend: str | None = None,
            block: int | None = None, step_loop: str = "auto") -> ClientExecutor:
  """The executor for a strategy name; ``auto`` chooses by backend."""
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
  if step_loop not in STEP_LOOPS:
    raise ValueError(f"unknown step loop {step_loop!r}: choose one of {', '.join(STEP_LOOPS)}")
  backend = backend or jax.default_backend()
  if strategy == "auto":
    strategy = "sequential" if backend == "cpu" else "vmap"
  if step_loop == "auto":
    step_loop = "python" if backend == "cpu" else "scan"
  return ClientExecutor(strategy, block, step_loop)
