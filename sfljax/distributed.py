"""The client axis over many devices and many hosts.

K clients are spread over D devices: every per-client array (client models,
optimizer states, SFLV1 server replicas, the clients' data and batch
schedules, their statistics) keeps its leading client axis, sharded over a
one-axis mesh named ``"clients"`` (:func:`client_mesh`); global models are
replicated. An executor with the mesh (``execution.resolve(..., mesh=mesh)``)
runs each device's K/D clients with :func:`jax.shard_map`; FedAvg's weighted
sum over the client axis is compiled (GSPMD) into per-device partial sums and
one cross-device all-reduce. A shared server (SFLV2, SL) still processes the
clients one at a time: correct when sharded, not faster. K must be divisible
by D.

Partial participation on a mesh is stratified: each round every device takes
M/D participants from its own K/D clients (``data.sample_clients(...,
strata=D)``), so M must be divisible by D too. The participants' inputs are
sharded like the clients and each device reads and writes back its own
participants' rows of the per-client state and data
(:meth:`sfljax.execution.ClientExecutor.take` / ``put``): nothing per client
is gathered across devices.

One process drives all local devices; with several hosts every host runs the
same program as one process (``jax.distributed.initialize``), and the mesh
spans all processes' devices. Every process builds the same host data (same
config and seed) and :func:`place` hands each device its slice.

>>> from sfljax import distributed, execution
>>> distributed.initialize(coordinator, num_processes, process_id)  # first, before any JAX work
>>> mesh = distributed.client_mesh()                # all devices of all processes
>>> executor = execution.resolve("auto", mesh=mesh)
>>> sh = distributed.Shardings.of(algorithm, variables, inputs, mesh)
>>> inputs = distributed.place(inputs, sh.inputs)
>>> round_fn = jax.jit(algorithm.round, out_shardings=(sh.state, sh.stats))
>>> stats = distributed.fetch(stats)                # NumPy, on every process

Launching
=========

One machine, several accelerators: nothing to launch, ``client_mesh()`` takes
all local devices. On a CPU-only machine, fake devices for testing:
``XLA_FLAGS=--xla_force_host_platform_device_count=4``.

GPU cluster, one process per host (each process drives all GPUs of its host),
the same command on every host, only ``--process-id`` differs::

  # host 0 (its address is the coordinator's), then hosts 1..N-1
  python -m sfljax train ... --coordinator-address 10.0.0.1:1234 \\
      --num-processes N --process-id 0
  python -m sfljax train ... --coordinator-address 10.0.0.1:1234 \\
      --num-processes N --process-id i

The coordinator port must be reachable from every host. Under SLURM or Open
MPI ``initialize(auto_detect=True)`` (``jax.distributed.initialize()``
without arguments) reads all three from the environment; to use only some
GPUs of a host set ``CUDA_VISIBLE_DEVICES`` or ``local_device_ids``.

Cloud TPU (a multi-host slice, e.g. v4-32): run the same command on every
host at once, with no coordinator flags and ``auto_detect`` (the TPU metadata
gives the coordinator, process count and id)::

  gcloud compute tpus tpu-vm ssh NAME --zone ZONE --worker=all \\
      --command="python -m sfljax train ... --distributed-auto"

CPU processes (tests): the same flags on one or several machines; the CPU
backend's cross-process collectives use gloo.

Joining waits at most ``SFLJAX_COORDINATOR_TIMEOUT`` seconds (default 300),
announced by one line on stderr (with explicit coordinator flags). A process other than 0 first waits for the
coordinator's port to answer and, if it never does, raises ``ValueError``
("--coordinator-address: no coordinator answered at HOST:PORT within N s;
..."). If the port answers but not every process joins in time, JAX would
abort the process with a C++ stack trace; instead one line
(``sfljax: error: ...``) is printed and the process exits with code 2.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import threading
import time
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sfljax.algorithms import RoundInputs
from sfljax.execution import CLIENT_AXIS
from sfljax.state import per_client_mask

__all__ = ["CLIENT_AXIS", "Shardings", "check_clients", "client_mesh", "client_sharding",
           "coordinator_timeout", "fetch", "initialize", "input_shardings", "is_main_process",
           "place", "replicate", "replicated_sharding", "shard_clients"]

TIMEOUT_ENV = "SFLJAX_COORDINATOR_TIMEOUT"
"""Environment variable: seconds a process waits for the others to join (default 300)."""
DEFAULT_TIMEOUT = 300
_EXIT_USAGE = 2        # sfljax.cli's exit code for bad input.
_JAX_GRACE = 10        # JAX's own deadline comes this much later than ours.


# -- processes ---------------------------------------------------------------

def _check_address(address: str) -> None:
  host, sep, port = address.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"--coordinator-address: expected host:port, got {address!r}")


def coordinator_timeout() -> int:
  """Seconds to wait for the processes of a multi-process run to join:
  ``$SFLJAX_COORDINATOR_TIMEOUT`` (a number of seconds >= 1, rounded up), else
  300. A bad value raises ``ValueError`` naming the variable."""
  text = os.environ.get(TIMEOUT_ENV, "").strip()
  if not text:
    return DEFAULT_TIMEOUT
  try:
    value = float(text)
  except ValueError:
    value = math.nan
  if not (math.isfinite(value) and value >= 1):
    raise ValueError(f"{TIMEOUT_ENV}: must be a number of seconds >= 1, got {text!r}")
  return int(math.ceil(value))


def _wait_for_port(address: str, deadline: float) -> bool:
  """Retries a TCP connection to ``host:port`` until it answers (True) or the
  ``time.monotonic()`` deadline passes (False). Nothing is sent."""
  host, _, port = address.rpartition(":")
  host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [::1]
  while True:
    left = deadline - time.monotonic()
    if left <= 0:
      return False
    try:
      with socket.create_connection((host, int(port)), timeout=min(left, 2.0)):
        return True
    except OSError:  # Refused, unreachable, not resolvable (yet): try again.
      time.sleep(max(0.0, min(0.25, deadline - time.monotonic())))


def _stall_exit(message: str) -> None:
  """Ends the process with one line: JAX would abort it with a C++ stack trace."""
  try:
    sys.stdout.flush()
    sys.stderr.write(f"sfljax: error: {message}\n")
    sys.stderr.flush()
  finally:
    os._exit(_EXIT_USAGE)  # pylint: disable=protected-access


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               local_device_ids: int | Sequence[int] | None = None, *,
               auto_detect: bool = False, timeout_seconds: int | None = None) -> bool:
  """Joins this process to a multi-process JAX run; call before any JAX work.

  No-op (returns False) for a single process: ``num_processes`` None or 1
  and no ``auto_detect``. Otherwise ``coordinator_address`` (``host:port``
  of process 0), ``num_processes`` and ``process_id`` are all required,
  unless ``auto_detect`` lets JAX read them from the cluster (Cloud TPU,
  SLURM, Open MPI, Kubernetes). On CPU the cross-process collectives use
  gloo. Returns True once initialized.

  Waits at most ``timeout_seconds`` (None: :func:`coordinator_timeout`, i.e.
  ``$SFLJAX_COORDINATOR_TIMEOUT`` or 300) and, given the coordinator, says so
  in one line on stderr first. A process other than 0 whose coordinator never answers raises
  ``ValueError`` ("--coordinator-address: no coordinator answered at
  HOST:PORT within N s; ..."); a run that does not gather all its processes
  in time ends the process with one line on stderr and exit code 2 (JAX
  itself would abort it).
  """
  if auto_detect:
    if any(v is not None for v in (coordinator_address, num_processes, process_id)):
      raise ValueError("auto-detection reads the coordinator, process count and id from "
                       "the cluster: give none of --coordinator-address, --num-processes, "
                       "--process-id")
  else:
    if num_processes is not None and (
        isinstance(num_processes, bool) or not isinstance(num_processes, (int, np.integer))
        or num_processes < 1):
      raise ValueError(f"--num-processes: must be a positive integer, got {num_processes!r}")
    if num_processes is None or num_processes == 1:
      if process_id not in (None, 0):
        raise ValueError(f"--process-id: {process_id!r} given for a single process "
                         "(set --num-processes)")
      if coordinator_address is not None and num_processes is None:
        raise ValueError("--coordinator-address given without --num-processes")
      return False
    if coordinator_address is None:
      raise ValueError(f"--coordinator-address: required with --num-processes {num_processes} "
                       "(host:port of process 0)")
    _check_address(coordinator_address)
    if process_id is None:
      raise ValueError(f"--process-id: required with --num-processes {num_processes}")
    if (isinstance(process_id, bool) or not isinstance(process_id, (int, np.integer))
        or not 0 <= process_id < num_processes):
      raise ValueError(f"--process-id: must be in 0..{num_processes - 1}, got {process_id!r}")
  if jax.distributed.is_initialized():
    raise RuntimeError("jax.distributed is already initialized in this process")
  if timeout_seconds is None:
    timeout_seconds = coordinator_timeout()
  elif (isinstance(timeout_seconds, bool) or not isinstance(timeout_seconds, (int, float))
        or not (math.isfinite(timeout_seconds) and timeout_seconds >= 1)):
    raise ValueError(f"timeout_seconds: must be a number of seconds >= 1, got "
                     f"{timeout_seconds!r}")
  timeout = int(math.ceil(timeout_seconds))
  deadline = time.monotonic() + timeout
  if jax.config.jax_cpu_collectives_implementation is None:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if auto_detect:  # No line here: the cluster may not be detected at all.
    kwargs = {}
    stalled = (f"--distributed-auto: the cluster's processes did not all join within "
               f"{timeout} s; start every process, or set {TIMEOUT_ENV}")
  else:
    kwargs = dict(coordinator_address=coordinator_address, num_processes=int(num_processes),
                  process_id=int(process_id))
    n, i = int(num_processes), int(process_id)
    if i == 0:
      print(f"sfljax: waiting up to {timeout} s for the other {n - 1} "
            f"process{'es' if n > 2 else ''} to join the coordinator at {coordinator_address} "
            f"(process 0 of {n})", file=sys.stderr, flush=True)
      stalled = (f"--num-processes: only some of the {n} processes joined the coordinator at "
                 f"{coordinator_address} within {timeout} s; start "
                 f"{'process 1' if n == 2 else f'processes 1..{n - 1}'} with the same "
                 f"--coordinator-address and --num-processes, or set {TIMEOUT_ENV}")
    else:
      print(f"sfljax: waiting up to {timeout} s for the coordinator at {coordinator_address} "
            f"(process {i} of {n})", file=sys.stderr, flush=True)
      if not _wait_for_port(coordinator_address, deadline):
        raise ValueError(f"--coordinator-address: no coordinator answered at "
                         f"{coordinator_address} within {timeout} s; start process 0 first "
                         f"or check the address")
      stalled = (f"--num-processes: the coordinator at {coordinator_address} answered but "
                 f"the {n} processes did not all join within {timeout} s; start every "
                 f"process (--process-id 0..{n - 1}) with the same --num-processes, or set "
                 f"{TIMEOUT_ENV}")
  # JAX aborts the process (C++ CHECK) when its deadline passes; ours comes first.
  left = max(5.0, deadline - time.monotonic())
  watchdog = threading.Timer(left, _stall_exit, args=(stalled,))
  watchdog.daemon = True
  watchdog.start()
  try:
    jax.distributed.initialize(**kwargs, local_device_ids=local_device_ids,
                               initialization_timeout=int(math.ceil(left)) + _JAX_GRACE)
  except RuntimeError as e:
    if "before any JAX" in str(e):
      raise RuntimeError("distributed.initialize must run before any JAX computation "
                         "(call it first in the program)") from e
    raise
  except ValueError as e:
    if not auto_detect:
      raise
    detail = " ".join(str(e).split())
    raise ValueError(f"--distributed-auto: no cluster detected (Cloud TPU, SLURM, Open MPI, "
                     f"Kubernetes; JAX: {detail}); give --coordinator-address, "
                     f"--num-processes and --process-id instead") from None
  finally:
    watchdog.cancel()
  return True


def is_main_process() -> bool:
  """True on process 0 (the one that should print and write files)."""
  return jax.process_index() == 0


# -- the mesh ----------------------------------------------------------------

def client_mesh(num_devices: int | None = None) -> Mesh:
  """A one-axis mesh ``"clients"`` over ``num_devices`` devices (default: all).

  With several processes the devices are taken evenly from every process
  (``num_devices / process_count`` local devices each, in process order), so
  ``num_devices`` must be a multiple of the number of processes.
  """
  devices = jax.devices()
  if num_devices is None:
    num_devices = len(devices)
  if isinstance(num_devices, bool) or not isinstance(num_devices, (int, np.integer)) \
      or num_devices < 1:
    raise ValueError(f"--devices: must be a positive integer, got {num_devices!r}")
  if num_devices > len(devices):
    raise ValueError(f"--devices: {num_devices} requested but only {len(devices)} "
                     f"{devices[0].platform} devices are available")
  processes = jax.process_count()
  if processes == 1:
    chosen = devices[:num_devices]
  else:
    if num_devices % processes:
      raise ValueError(f"--devices: {num_devices} devices cannot be taken evenly from "
                       f"{processes} processes: use a multiple of {processes}")
    per = num_devices // processes
    by_process: dict[int, list] = {}
    for d in devices:
      by_process.setdefault(d.process_index, []).append(d)
    chosen = [d for p in sorted(by_process) for d in by_process[p][:per]]
  return Mesh(np.array(chosen), (CLIENT_AXIS,))


def check_clients(num_clients: int, mesh: Mesh) -> None:
  """Raises ValueError unless the clients split evenly over the mesh."""
  devices = int(mesh.shape[CLIENT_AXIS])
  if num_clients % devices:
    raise ValueError(f"--clients: {num_clients} clients cannot be split evenly over "
                     f"{devices} devices: use a number of clients divisible by {devices} "
                     f"or change --devices")


# -- placement ---------------------------------------------------------------

def client_sharding(mesh: Mesh) -> NamedSharding:
  """The leading (client) axis split over the mesh's ``"clients"`` axis."""
  return NamedSharding(mesh, PartitionSpec(CLIENT_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  """A whole copy on every device of the mesh."""
  return NamedSharding(mesh, PartitionSpec())


_clients, _replicated = client_sharding, replicated_sharding


def _is_key(x) -> bool:
  return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _place_leaf(x, sharding: NamedSharding):
  if isinstance(x, jax.Array) and x.sharding == sharding:
    return x
  if jax.process_count() == 1:
    return jax.device_put(x, sharding)
  if _is_key(x):  # Typed PRNG keys: place the raw key data, wrap on the devices.
    impl = jax.random.key_impl(x)
    data = _place_leaf(jax.random.key_data(x), sharding)
    return jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl),
                   out_shardings=sharding)(data)
  if isinstance(x, jax.Array) and not x.is_fully_addressable:  # Global: reshard.
    return jax.jit(lambda a: a, out_shardings=sharding)(x)
  host = np.asarray(x)
  host = host.astype(jax.dtypes.canonicalize_dtype(host.dtype), copy=False)
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def place(tree, shardings):
  """Puts every leaf of ``tree`` on its sharding (``shardings``: one sharding,
  or a tree prefix of ``tree``).

  Leaves are host values (NumPy, Python scalars), local jax Arrays or global
  ones. With several processes every process must pass the same full
  (unsharded) value; each device receives its own slice.
  """
  if isinstance(shardings, jax.sharding.Sharding):
    return jax.tree.map(lambda x: _place_leaf(x, shardings), tree)
  return jax.tree.map(lambda s, sub: jax.tree.map(lambda x: _place_leaf(x, s), sub),
                      shardings, tree,
                      is_leaf=lambda s: isinstance(s, jax.sharding.Sharding))


def shard_clients(tree, mesh: Mesh):
  """Every leaf with its leading (client) axis split over the mesh."""
  for x in jax.tree.leaves(tree):
    if not np.ndim(x):
      raise ValueError("shard_clients: a scalar leaf has no client axis")
    check_clients(int(np.shape(x)[0]), mesh)
  return place(tree, _clients(mesh))


def replicate(tree, mesh: Mesh):
  """Every leaf whole on every device of the mesh."""
  return place(tree, _replicated(mesh))


def _fetch_leaf(x):
  if _is_key(x):
    x = jax.random.key_data(x)
  if not isinstance(x, jax.Array) or x.is_fully_addressable:
    return np.asarray(jax.device_get(x))
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def fetch(tree):
  """The tree as NumPy arrays, whole, on every process.

  A sharded array that spans several processes is all-gathered: a collective,
  so every process must call ``fetch`` on the same arrays in the same order.
  Typed PRNG keys come back as their raw key data.
  """
  return jax.tree.map(_fetch_leaf, tree)


# -- what is sharded ---------------------------------------------------------

def input_shardings(mesh: Mesh, inputs: RoundInputs | None = None) -> RoundInputs:
  """Per-client inputs (x, y, idx, mask, weights, clients, reported, active) sharded,
  orders and key replicated. With partial participation the participants'
  rows (idx, mask, weights, clients, reported) are split over the devices
  like the clients, so device d must hold its own clients' rows (the
  stratified draw, :func:`sfljax.data.sample_clients`). ``inputs``: a round's
  inputs whose absent (None) fields stay None here (a tree that matches them
  exactly, e.g. for ``jax.jit``'s ``in_shardings``)."""
  c, r = _clients(mesh), _replicated(mesh)
  sh = RoundInputs(x=c, y=c, idx=c, mask=c, weights=c, step_orders=r, client_order=r, key=r,
                   clients=c, reported=c, active=c)
  if inputs is not None:
    sh = sh._replace(**{f: None for f in ("clients", "reported", "active")
                        if getattr(inputs, f) is None})
  return sh


class Shardings(NamedTuple):
  """Where an algorithm's arrays live: trees of NamedSharding.

  ``state``: :meth:`init`'s output and :meth:`round`/:meth:`end`'s new state;
  ``carry``: :meth:`begin`/:meth:`step`'s output; ``stats``: the per-client
  BatchStats; ``inputs``: the RoundInputs. Per-client leaves are sharded over
  ``"clients"``, everything else replicated.
  """
  state: Any
  carry: Any
  stats: Any
  inputs: RoundInputs

  @classmethod
  def of(cls, algorithm, variables, inputs: RoundInputs, mesh: Mesh) -> "Shardings":
    """From the algorithm's typed state: ``variables`` are the full model's
    initial variables and ``inputs`` one round's inputs (arrays or shapes).
    The leaves the state declares per client (:mod:`sfljax.state`) are
    sharded, the rest replicated. With partial participation (``inputs.clients``)
    the M participants must split evenly over the devices too."""
    num_clients = int(inputs.x.shape[0])
    check_clients(num_clients, mesh)
    c, r = _clients(mesh), _replicated(mesh)
    variables = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), variables)
    inputs = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), inputs)
    state = jax.eval_shape(lambda v: algorithm.init(v, num_clients), variables)
    carry = jax.eval_shape(lambda v, i: algorithm.begin(algorithm.init(v, num_clients), i),
                           variables, inputs)
    ended, stats = jax.eval_shape(lambda v, i: algorithm.end(
        algorithm.begin(algorithm.init(v, num_clients), i), i), variables, inputs)

    def to_sharding(tree):
      return jax.tree.map(lambda per: c if per else r, per_client_mask(tree))

    state_sh = to_sharding(state)
    if to_sharding(ended) != state_sh:
      raise ValueError("the algorithm's end state is laid out unlike its initial state")
    if inputs.clients is not None:
      check_clients(int(inputs.clients.shape[0]), mesh)
    return cls(state_sh, to_sharding(carry), jax.tree.map(lambda _: c, stats),
               input_shardings(mesh, inputs))
