"""How the client axis is executed: a strategy independent of the algorithms.

Algorithms call ``executor.map(fn, *args)`` where every leaf of ``args`` has
a leading client axis; the executor decides how the clients run inside the
compiled program:

* ``vmap``: all clients at once (``jax.vmap``); per-client weights become
  batched (grouped) operations. Expected to win on GPU/TPU.
* ``sequential``: one client after another inside the compiled program
  (``jax.lax.map``); with ``block`` > 1, blocks of that many clients are
  vmapped and the blocks run one after another.

``auto`` picks per backend from the measurements in the README: on XLA:CPU a
vmapped convolution with per-client weights lowers to a grouped convolution
whose gradient is far slower than running the clients one by one, so CPU gets
``sequential``; accelerators get ``vmap``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax

STRATEGIES: tuple[str, ...] = ("auto", "vmap", "sequential")


@dataclasses.dataclass(frozen=True)
class ClientExecutor:
  """Maps a per-client function over a leading client axis."""
  name: str
  block: int | None = None

  def map(self, fn: Callable[..., Any], *args):
    if self.name == "vmap":
      return jax.vmap(fn)(*args)
    if self.name == "sequential":
      return jax.lax.map(lambda a: fn(*a), args, batch_size=self.block)
    raise ValueError(f"unknown strategy {self.name!r}")


def resolve(strategy: str = "auto", backend: str | None = None,
            block: int | None = None) -> ClientExecutor:
  """The executor for a strategy name; ``auto`` chooses by backend."""
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
  if strategy == "auto":
    backend = backend or jax.default_backend()
    strategy = "sequential" if backend == "cpu" else "vmap"
  return ClientExecutor(strategy, block)
