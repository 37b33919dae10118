"""Typed algorithm state that declares which leaves are per client.

An algorithm's state (and a round's working state) is a
:func:`flax.struct.dataclass` whose static field ``per_client`` names the
fields whose every leaf leads with the client axis ([K, ...]). Sharding,
partial participation and checkpointing read the declaration instead of
probing shapes:

* :func:`per_client_mask` -- the same pytree with ``True`` on per-client
  leaves (a mesh shards those over its ``"clients"`` axis, replicates the
  rest);
* :func:`gather` / :func:`scatter` -- a round's participants' rows of every
  per-client field, and writing them back.

>>> state = SplitState(client=c, server=s, client_opt=co, server_opt=so,
...                    per_client=frozenset({"client_opt"}))
>>> per_client_mask(state).client_opt   # a tree of True
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import struct

from sfljax import fedavg


def _data_fields(obj):
  return [f.name for f in dataclasses.fields(obj) if f.metadata.get("pytree_node", True)]


def per_client_mask(tree):
  """``tree`` with every leaf replaced by whether it leads with the client axis.

  ``tree`` is a state dataclass (with a ``per_client`` declaration), a
  container of them, or a pytree of per-client arrays (``True`` everywhere)
  when it has no declaration.
  """
  if dataclasses.is_dataclass(tree) and hasattr(tree, "per_client"):
    updates = {}
    for name in _data_fields(tree):
      value = getattr(tree, name)
      if dataclasses.is_dataclass(value) and hasattr(value, "per_client"):
        updates[name] = per_client_mask(value)
      else:
        flag = name in tree.per_client
        updates[name] = jax.tree.map(lambda _, f=flag: f, value)
    return tree.replace(**updates)
  return jax.tree.map(lambda _: True, tree)


def gather(state, ids, executor=None):
  """The rows ``ids`` ([M]) of every per-client field; other fields as they are.

  ``executor``: a :class:`sfljax.execution.ClientExecutor` whose mesh the
  state is sharded over reads every device's rows on that device
  (:meth:`~sfljax.execution.ClientExecutor.take`)."""
  take = fedavg.index if executor is None else executor.take
  return state.replace(**{n: take(getattr(state, n), ids) for n in state.per_client})


def scatter(full, ids, part, executor=None):
  """Writes the rows of ``part``'s per-client fields back into ``full`` at ``ids``;
  the other fields are taken from ``part`` (``executor``: as in :func:`gather`)."""
  put = fedavg.update_index if executor is None else executor.put
  return part.replace(**{n: put(getattr(full, n), ids, getattr(part, n))
                         for n in part.per_client})


@struct.dataclass
class SplitState:
  """A split algorithm's state between rounds.

  client: the client-side variables (both client parts of a U-shaped split,
    keyed by block name); one global model, or [K, ...] when every client
    keeps its own (``"client"`` in ``per_client``).
  server: the server-side variables (one model: replicas are averaged at the
    end of every round).
  client_opt: every client's optimizer state, [K, ...].
  server_opt: the server's optimizer state; [K, ...] with one replica per
    client.
  """
  client: Any
  server: Any
  client_opt: Any
  server_opt: Any
  per_client: frozenset = struct.field(pytree_node=False, default=frozenset())


@struct.dataclass
class SplitCarry:
  """A split algorithm's working state inside a round (participants' rows).

  ``stats`` holds every participant's summed :class:`sfljax.split.BatchStats`;
  ``stored`` the state the round started from, when only some clients take
  part (their rows are written back into it), else None.
  ``start``: only when the round handles failed participants (reported or
  skipped non-finite steps), a :class:`SplitState` of the participants' rows
  at the round's start (``client``, ``client_opt``; ``server`` and
  ``server_opt`` for per-client server replicas, else None), which failed
  participants' rows and nobody-reported aggregates fall back to; else None.
  ``handed``: only then and for a relayed client model, the model the
  current client was handed at the start of its turn; else None.
  ``pending``: for schedules whose events take a few participants' rows,
  ``(rows, {field: rows' new values})`` of the last event, written into
  ``client``, ``client_opt``, ``server``, ``server_opt`` at the start of the
  next event (or at the round's end) instead of at once; else None. Written
  back just before the next read, the rows are updated in place, where a
  write right after the read costs XLA copies of the whole [K, ...] arrays.
  """
  client: Any
  server: Any
  client_opt: Any
  server_opt: Any
  stats: Any
  stored: Any = None
  start: Any = None
  handed: Any = None
  pending: Any = None
  per_client: frozenset = struct.field(pytree_node=False, default=frozenset())


@struct.dataclass
class FLState:
  """FL / centralized: the global model and every client's optimizer state."""
  model: Any
  opt: Any
  per_client: frozenset = struct.field(pytree_node=False, default=frozenset({"opt"}))


@struct.dataclass
class FLCarry:
  """FL inside a round: every participant's local model and optimizer state.

  ``start``: only when the round handles failed participants, an
  :class:`FLState` of the global model and the participants' optimizer rows
  at the round's start; else None.
  """
  models: Any
  opt: Any
  stats: Any
  stored: Any = None
  start: Any = None
  per_client: frozenset = struct.field(pytree_node=False,
                                       default=frozenset({"models", "opt", "stats"}))
