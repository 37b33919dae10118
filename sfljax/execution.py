"""How the client axis is executed: a strategy independent of the algorithms.

Algorithms call ``executor.map(fn, *args)`` where every leaf of ``args`` has
a leading client axis; the executor decides how the clients run inside the
compiled program:

* ``vmap``: all clients at once (``jax.vmap``); per-client weights become
  batched (grouped) operations. Expected to win on GPU/TPU.
* ``sequential``: one client after another inside the compiled program
  (a ``lax.scan`` over clients; unrolled for at most ``unroll_up_to``
  clients, 1 by default: with the matmul convolutions of :mod:`sfljax.conv`
  unrolling no longer pays on XLA:CPU). A group of one client is always just
  vmapped (free).
* ``block`` (``--client-block B``): at most B clients are in flight at once.
  The algorithms' steps read it (:func:`sfljax.algorithms.client_blocks`): a
  synchronous step of more than B clients runs block by block, end to end
  (block b's clients' forward, the server for them, their backward and
  optimizer updates, then block b + 1), so a step holds one block's
  activations and vjp residuals instead of every client's; FL's local steps
  likewise. Inside a block the strategy runs as configured (B clients
  vmapped, or one after another). The result is the unblocked one (bit for
  bit with ``sequential``; a different vmap width, or a block of a single
  client, may round differently in the last bit). Here,
  ``map`` itself only splits a vmapped group of more than B clients (one
  that no step split, e.g. a custom algorithm's) into vmapped blocks run one
  after another; a sequential map already has one client in flight. Not
  combined with a mesh of several devices (refused: :class:`ClientExecutor`).

The steps of a round are driven either by ``lax.fori_loop`` inside one
compiled round (``step_loop="scan"``) or by a Python loop over one compiled
step (``"python"``; no host round-trip: dispatch is asynchronous and metrics
are pulled once per round).

With a ``mesh`` (a :class:`jax.sharding.Mesh` with an axis named
``"clients"``, see :func:`sfljax.distributed.client_mesh`) the client axis is
additionally split over the mesh's devices with :func:`jax.shard_map`: each
device runs its K/D local clients with the strategy above, and the outputs
keep their leading client axis sharded over ``"clients"``. Everything outside
``map`` (FedAvg's weighted sum, a shared server's loop over clients) is left
to the compiler (GSPMD), so FedAvg becomes a cross-device reduction. A group
of one client (client-major schedules) is not split. With partial
participation the participants' rows of the per-client state and data are
read and written back on the devices that hold them (:meth:`ClientExecutor.take`,
:meth:`~ClientExecutor.put`, :meth:`~ClientExecutor.on_rows`): each device's
participants must be its own clients.

``auto`` picks per backend from the measurements in the README: on XLA:CPU a
vmapped convolution with per-client weights lowers to a grouped convolution,
slower than running the clients one by one, so CPU gets ``sequential``
clients; accelerators get ``vmap``. Every backend gets the ``scan`` step loop
(on CPU it measured faster than the Python loop once the convolutions were
matmuls).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

CLIENT_AXIS = "clients"
"""The mesh axis the client axis is sharded over."""

STRATEGIES: tuple[str, ...] = ("auto", "vmap", "sequential")
STEP_LOOPS: tuple[str, ...] = ("auto", "scan", "python")


@dataclasses.dataclass(frozen=True)
class ClientExecutor:
  """Maps a per-client function over a leading client axis.

  With ``mesh`` the clients are split over the mesh's ``"clients"`` axis and
  every device maps ``fn`` over its own clients with this strategy.
  """
  name: str
  block: int | None = None
  step_loop: str = "scan"

  unroll_up_to: int = 1   # sequential: unroll the client loop for at most this many clients
  mesh: Mesh | None = None

  def __post_init__(self):
    if self.mesh is not None and CLIENT_AXIS not in self.mesh.axis_names:
      raise ValueError(f"the executor's mesh needs an axis named {CLIENT_AXIS!r}, "
                       f"got axes {self.mesh.axis_names}")
    if self.block and self.num_devices > 1:
      raise ValueError(f"client blocks (block={self.block}) cannot be combined with a mesh of "
                       f"{self.num_devices} devices: blocks are taken over the whole client "
                       "axis, which is split over the devices; drop one of them")

  @property
  def num_devices(self) -> int:
    """Devices the client axis is split over (1 without a mesh)."""
    return 1 if self.mesh is None else int(self.mesh.shape[CLIENT_AXIS])

  def map(self, fn: Callable[..., Any], *args):
    """``fn`` applied to every client's slice of ``args`` (this strategy)."""
    return self._split(self._map_local, fn, args)

  def vmap(self, fn: Callable[..., Any], *args):
    """``jax.vmap(fn)(*args)``, split over the mesh's devices if there is one.

    For cheap per-client work outside :meth:`map` (e.g. gathering the
    clients' batches from their data) that should stay on the device that
    holds the client instead of being left to the compiler's partitioner.
    """
    return self._split(lambda f, *a: jax.vmap(f)(*a), fn, args)

  def on_rows(self, fn: Callable[..., Any], tree, ids, *args):
    """``fn(tree, ids, *args)``: reads (or writes) the rows ``ids`` ([M] client
    ids) of ``tree``'s leaves ([K, ...]); ``args`` lead with the M participants.

    With a mesh every device runs ``fn`` on its own K/D rows of ``tree``, its
    M/D participants and their ``args``, with the ids made local to its
    block (``ids - d * K/D`` on device d): nothing is gathered across
    devices. The participants on device d (rows ``d*M/D ..``) must therefore
    be clients of its block ``d*K/D .. (d+1)*K/D - 1`` (the stratified draw
    of :func:`sfljax.data.sample_clients`). Without a mesh ``fn`` sees the
    global ids.
    """
    devices = self.num_devices
    if devices == 1:
      return fn(tree, ids, *args)
    num, rows = jax.tree.leaves(tree)[0].shape[0], ids.shape[0]
    if num % devices or rows % devices:
      raise ValueError(f"{rows} participants of {num} clients cannot be split evenly over "
                       f"{devices} devices: use numbers divisible by {devices} or change "
                       "--devices")

    def local(t, i, *a):
      block = jax.tree.leaves(t)[0].shape[0]
      return fn(t, i - jax.lax.axis_index(CLIENT_AXIS).astype(i.dtype) * block, *a)

    spec = PartitionSpec(CLIENT_AXIS)
    return jax.shard_map(local, mesh=self.mesh, in_specs=(spec,) * (2 + len(args)),
                         out_specs=spec, check_vma=False)(tree, ids, *args)

  def take(self, tree, ids):
    """The rows ``ids`` of every leaf (each device reads its own: :meth:`on_rows`)."""
    return self.on_rows(lambda t, i: jax.tree.map(lambda x: x[i], t), tree, ids)

  def put(self, tree, ids, part):
    """``tree`` with the rows ``ids`` of every leaf replaced by ``part``'s
    (each device writes its own: :meth:`on_rows`)."""
    return self.on_rows(lambda t, i, p: jax.tree.map(lambda x, v: x.at[i].set(v), t, p),
                        tree, ids, part)

  def _split(self, local_map, fn, args):
    num = jax.tree.leaves(args)[0].shape[0]
    devices = self.num_devices
    if devices == 1 or num == 1:
      return local_map(fn, *args)
    if num % devices:
      raise ValueError(f"{num} clients cannot be split evenly over {devices} devices: "
                       f"use a number of clients divisible by {devices} or change --devices")
    spec = PartitionSpec(CLIENT_AXIS)
    # Every input and output is split over the clients and nothing is reduced
    # inside, so there are no replication types to check; unchecked, a
    # custom_vjp (sfljax.conv) whose vjp closure crosses from the forward
    # shard_map to the backward one keeps a consistent type.
    return jax.shard_map(lambda *a: local_map(fn, *a), mesh=self.mesh,
                         in_specs=tuple(spec for _ in args), out_specs=spec,
                         check_vma=False)(*args)

  def _map_local(self, fn: Callable[..., Any], *args):
    num = jax.tree.leaves(args)[0].shape[0]
    if self.name == "vmap" or num == 1:
      if self.block and num > self.block:
        return _blocked(fn, args, num, self.block)
      return jax.vmap(fn)(*args)
    if self.name == "sequential":
      unroll = num if num <= self.unroll_up_to else 1
      _, out = jax.lax.scan(lambda c, a: (c, fn(*a)), None, args, unroll=unroll)
      return out
    raise ValueError(f"unknown strategy {self.name!r}")


def resolve(strategy: str = "auto", backend: str | None = None,
            block: int | None = None, step_loop: str = "auto",
            mesh: Mesh | None = None) -> ClientExecutor:
  """The executor for a strategy name; ``auto`` chooses by backend.

  ``mesh``: split the clients over its ``"clients"`` axis (see
  :func:`sfljax.distributed.client_mesh`); ``auto`` then uses the mesh
  devices' platform.
  """
  if strategy not in STRATEGIES:
    raise ValueError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
  if step_loop not in STEP_LOOPS:
    raise ValueError(f"unknown step loop {step_loop!r}: choose one of {', '.join(STEP_LOOPS)}")
  if backend is None and mesh is not None:
    backend = mesh.devices.flat[0].platform
  backend = backend or jax.default_backend()
  if strategy == "auto":
    strategy = "sequential" if backend == "cpu" else "vmap"
  if step_loop == "auto":  # Measured on CPU too since the matmul convolutions (README).
    step_loop = "scan"
  return ClientExecutor(strategy, block, step_loop, mesh=mesh)


def _blocked(fn, args, num: int, block: int):
  """Blocks of ``block`` clients, vmapped inside a block, one block after another.

  The full blocks run under a ``lax.scan``; a smaller last block (``block``
  does not divide ``num``) is one more vmap. Outputs, vjp closures included,
  are concatenated back into one client axis.
  """
  full, rest = divmod(num, block)
  _, out = jax.lax.scan(
      lambda c, a: (c, jax.vmap(fn)(*a)), None,
      jax.tree.map(lambda x: x[:full * block].reshape((full, block) + x.shape[1:]), args))
  out = jax.tree.map(lambda y: y.reshape((full * block,) + y.shape[2:]), out)
  if rest:
    last = jax.vmap(fn)(*jax.tree.map(lambda x: x[full * block:], args))
    out = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), out, last)
  return out
