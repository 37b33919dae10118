"""The four orthogonal choices a split algorithm is composed of.

Each choice is a small frozen object with one contract; a
:class:`Composition` of one of each is a split algorithm
(:class:`sfljax.algorithms.SplitFed` runs it). A researcher can write another
implementation of any one contract and compose it with the others without
touching library code.

* **Client aggregation** -- how client parts are kept between rounds:
  :data:`FEDAVG` (one global client model; every participant starts the
  round from it; the fed server averages the participants' models, weights
  n_k/n), :data:`RELAY` (one client model handed from client to client:
  vanilla SL), :data:`OWN` (no aggregation: every client keeps its own,
  SFLV3).
* **Server side** -- how the server part runs: :data:`REPLICAS` (one copy per
  participant, each starting the round from the global server model,
  averaged n_k/n at the round's end; one optimizer state per client) or
  :data:`SHARED` (one model, updated after every single client's batch, in
  the order the schedule gives).
* **Schedule** -- the order of a round's work: :data:`SYNCHRONOUS` (at every
  step all participants compute their smashed data together; a shared server
  takes them one at a time in a fresh random order per step: the SFLV2 paper
  text) or :data:`CLIENT_MAJOR` (clients take turns in a random order per
  round, each running its whole local epoch before the next: vanilla SL and
  the official SFLV2 code).
* **Labels** -- where the labels (and the loss) live: :data:`SERVER_LABELS`
  (two-part split: client head, server rest) or :data:`CLIENT_LABELS`
  (U-shaped split: client head, server body, client tail; the server never
  sees labels or the loss). See :mod:`sfljax.split` for the exchanges.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from sfljax import fedavg, split
from sfljax.models import subset
from sfljax.split import merge_parts


class CompositionError(ValueError):
  """A composition of sides that cannot run."""


# -- client aggregation ------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ClientAggregation:
  """How client parts are kept between rounds and combined at a round's end.

  ``per_client``: the state keeps one client model per client ([K, ...]).
  ``handoff``: the round works on one client model handed between clients.
  ``begin(client, m)`` turns the stored client model(s) (already the
  participants' rows when ``per_client``) into the round's working model(s);
  ``end(working, weights)`` turns them back into what is stored.
  ``end_reported(working, weights, reported, start)`` does the same when some
  participants failed (``reported``: [M] bool; ``start``: the stored client
  model(s) of the round's start, the participants' rows when ``per_client``);
  it is called only when a round has failures to handle
  (:attr:`sfljax.algorithms.RoundInputs.reported` or ``skip_nonfinite``), so
  a side that does not implement it runs unchanged otherwise.
  """
  name: str = "custom"
  per_client: bool = False
  handoff: bool = False

  def begin(self, client, num_participants: int):
    raise NotImplementedError

  def end(self, working, weights):
    raise NotImplementedError

  def end_reported(self, working, weights, reported, start):
    raise NotImplementedError(
        f"client aggregation {self.name!r} does not handle failed participants: implement "
        "end_reported(working, weights, reported, start)")


@dataclasses.dataclass(frozen=True)
class FedAvgClients(ClientAggregation):
  """Participants start from the global client model; FedAvg (n_k/n) at the end."""
  name: str = "fedavg"

  def begin(self, client, num_participants):
    return fedavg.broadcast(client, num_participants)

  def end(self, working, weights):
    return fedavg.weighted_average(working, weights)

  def end_reported(self, working, weights, reported, start):
    """FedAvg over the reporters only (weights n_k, normalised over them); the
    round's starting model when nobody reports."""
    return fedavg.reported_average(working, weights, reported, start)


@dataclasses.dataclass(frozen=True)
class RelayClients(ClientAggregation):
  """One client model handed from client to client (vanilla SL).

  A failed client's updates are discarded during the round, at the end of
  its turn (:class:`sfljax.algorithms.SplitFed` restores the model it was
  handed), so the next client starts from what the previous one handed on;
  the end of the round keeps the model as it is.
  """
  name: str = "relay"
  handoff: bool = True

  def begin(self, client, num_participants):
    return client

  def end(self, working, weights):
    return working

  def end_reported(self, working, weights, reported, start):
    return working


@dataclasses.dataclass(frozen=True)
class OwnClients(ClientAggregation):
  """No aggregation: every client keeps its own client model (SFLV3)."""
  name: str = "none"
  per_client: bool = True

  def begin(self, client, num_participants):
    return client

  def end(self, working, weights):
    return working

  def end_reported(self, working, weights, reported, start):
    """A failed participant's own client model stays as it was at the round's start."""
    return fedavg.keep_rows(reported, working, start)


FEDAVG = FedAvgClients()
RELAY = RelayClients()
OWN = OwnClients()


# -- server side -------------------------------------------------------------

Turn = Callable[[Any, Any, Any], tuple[Any, Any, Any]]
"""``turn(server_vars, server_opt, payload) -> (server_vars, server_opt, out)``:
the server's work for one client's batch (see :mod:`sfljax.algorithms`)."""


@dataclasses.dataclass(frozen=True)
class ServerSide:
  """How the server part runs for a group of clients.

  ``per_client``: one server model and optimizer state per participant in a
  round (the optimizer states persist per client).
  ``run(turn, sv, so, payload, order, executor)`` applies ``turn`` to every
  client of the group (``payload`` leaves lead with the group) and returns
  the new server variables, optimizer state and the stacked outputs in
  group order. ``end_reported(working, weights, reported, start)``: ``end``
  when some participants failed (``reported`` [M] bool, ``start`` the server
  model of the round's start); called only when a round has failures to
  handle.

  With client blocks (``executor.block``, :func:`sfljax.algorithms.client_blocks`)
  ``run`` sees one block at a time: for a ``per_client`` side consecutive rows
  of the group, otherwise the clients ``order[bB:(b+1)B]`` with the order
  ``0..B-1`` -- so a server shared by the clients must depend on the other
  clients only through ``order`` (as :class:`SharedServer` does).
  """
  name: str = "custom"
  per_client: bool = False

  def init_opt(self, opt_state, num_clients: int):
    return fedavg.broadcast(opt_state, num_clients) if self.per_client else opt_state

  def begin(self, server, num_participants: int):
    raise NotImplementedError

  def end(self, working, weights):
    raise NotImplementedError

  def end_reported(self, working, weights, reported, start):
    raise NotImplementedError(
        f"server side {self.name!r} does not handle failed participants: implement "
        "end_reported(working, weights, reported, start)")

  def run(self, turn: Turn, sv, so, payload, order, executor):
    raise NotImplementedError


@dataclasses.dataclass(frozen=True)
class ServerReplicas(ServerSide):
  """One server replica per participant, averaged (n_k/n) at the round's end."""
  name: str = "replicas"
  per_client: bool = True

  def begin(self, server, num_participants):
    return fedavg.broadcast(server, num_participants)

  def end(self, working, weights):
    return fedavg.weighted_average(working, weights)

  def end_reported(self, working, weights, reported, start):
    """The reporters' replicas averaged (weights n_k, normalised over them);
    the round's starting server model when nobody reports."""
    return fedavg.reported_average(working, weights, reported, start)

  def run(self, turn, sv, so, payload, order, executor):
    del order  # Replicas are independent: every client at once.
    return executor.map(turn, sv, so, payload)


@dataclasses.dataclass(frozen=True)
class SharedServer(ServerSide):
  """One server model, updated after each client's batch, clients in ``order``.

  A failed participant's batches that reached the server were trained on:
  the shared server keeps those updates (only the batches after the failure
  are masked out, by the host, see :mod:`sfljax.faults`).
  """
  name: str = "shared"

  def begin(self, server, num_participants):
    return server

  def end(self, working, weights):
    return working

  def end_reported(self, working, weights, reported, start):
    return working

  def run(self, turn, sv, so, payload, order, executor):
    def body(carry, k):
      sv, so, outs = carry
      sv, so, out = turn(sv, so, fedavg.index(payload, k))
      outs = jax.tree.map(lambda a, v: a.at[k].set(v), outs, out)
      return (sv, so, outs), None

    num = order.shape[0]
    first = jax.eval_shape(turn, sv, so, fedavg.index(payload, 0))[2]
    outs = jax.tree.map(lambda s: jnp.zeros((num,) + s.shape, s.dtype), first)
    (sv, so, outs), _ = jax.lax.scan(body, (sv, so, outs), order,
                                     unroll=num if num <= executor.unroll_up_to else 1)
    return sv, so, outs


REPLICAS = ServerReplicas()
SHARED = SharedServer()


# -- schedule ----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Schedule:
  """The order of a round's work.

  ``num_steps(m, t)``: events in a round for m participants with t steps
  each. ``event(inp, t)``: which participants (rows, [G]), which of their
  steps, and the shared server's order over the group ([G]) at event ``t``;
  ``group_size(m)`` is G (a static number). ``turn(inp, t)``: for schedules
  whose clients take turns, whether event ``t`` is the first and whether it
  is the last of its client's turn (two scalar bools); a relayed client
  model needs it to discard a failed client's turn.
  """
  name: str = "custom"

  def num_steps(self, num_participants: int, steps: int) -> int:
    raise NotImplementedError

  def group_size(self, num_participants: int) -> int:
    raise NotImplementedError

  def event(self, inp, t):
    raise NotImplementedError

  def turn(self, inp, t):
    raise NotImplementedError(f"schedule {self.name!r} has no client turns")


@dataclasses.dataclass(frozen=True)
class Synchronous(Schedule):
  """Every participant's step t at event t; a shared server's order from ``inp.step_orders``."""
  name: str = "synchronous"

  def num_steps(self, num_participants, steps):
    return steps

  def group_size(self, num_participants):
    return num_participants

  def event(self, inp, t):
    return None, t, inp.step_orders[t]   # None: all participants, in row order


@dataclasses.dataclass(frozen=True)
class ClientMajor(Schedule):
  """Clients in ``inp.client_order``, each running all its steps before the next."""
  name: str = "client_major"

  def num_steps(self, num_participants, steps):
    return num_participants * steps

  def group_size(self, num_participants):
    return 1

  def event(self, inp, t):
    steps = inp.idx.shape[1]
    k = inp.client_order[t // steps]
    return k[None], t % steps, jnp.zeros((1,), jnp.int32)

  def turn(self, inp, t):
    steps = inp.idx.shape[1]
    s = t % steps
    return s == 0, s == steps - 1


SYNCHRONOUS = Synchronous()
CLIENT_MAJOR = ClientMajor()


# -- where the labels live ---------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Keys:
  """A group's per-client PRNG keys for one step (None: the model needs none)."""
  client: Any = None
  server: Any = None
  tail: Any = None
  noise: Any = None   # client-side DP-SGD's noise keys (algorithms with ``privacy``)


def private_gradients(alg, per_example, mask, keys: Keys):
  """Every client's DP-SGD gradient (``alg.privacy``, :mod:`sfljax.privacy.dpsgd`)
  from its per-example gradients ``[G, B, ...]``: clipped jointly over all of
  the client's parameters (head and tail), summed over real rows, noised once."""
  return alg.executor.map(alg.privacy.privatize, per_example, mask, keys.noise)


def with_penalty(alg, x, smashed, mask, d_smashed):
  """The server's cotangent plus the gradient of the client's own term on its
  smashed data, ``alg.smashed_penalty(x, smashed, mask)`` (e.g. NoPeek's
  distance correlation, :func:`sfljax.leakage.nopeek`), per client. The
  client's objective is then the server's loss plus the penalty, and its
  closure turns the sum into its gradients as usual."""
  penalty = getattr(alg, "smashed_penalty", None)
  if penalty is None:
    return d_smashed

  def one(xb, a, mb):
    g = jax.grad(lambda s: penalty(xb, s.astype(jnp.float32), mb))(a)
    return g.astype(a.dtype)

  return d_smashed + alg.executor.map(one, x, smashed, mask)


@dataclasses.dataclass(frozen=True)
class ServerLabels:
  """Two-part split: the client sends smashed data and labels; the server
  computes the loss and returns the smashed-data cotangent."""
  name: str = "server"
  num_cuts: int = 1
  server_step: Callable[..., Any] = split.server_forward_backward

  def exchange(self, alg, parts, cvars, svars, sopt, x, y, m, keys: Keys, order):
    """One forward/backward of a group: ``(client grads, client vars after the
    forward, server vars, server opt, stats)``. With ``alg.privacy`` the
    client grads are DP-SGD's (per-example vjps of the head, clipped, noised)."""
    head, server_mod = parts
    dtype, active = alg.compute_dtype, jnp.any(m, axis=-1)
    private = getattr(alg, "privacy", None) is not None
    forward = split.clients_forward_per_example if private else split.clients_forward
    smashed, cvars_fwd, backward = forward(alg.executor, head, cvars, x, m, dtype, keys.client)

    def turn(sv, so, p):
      a, yb, mb, act, key = p
      grads, d_a, sv_new, stats = self.server_step(server_mod, sv, a, yb, mb, dtype, alg.loss, key)
      sv, so, stats = alg.checked_server_update(sv, so, sv_new, grads, act, stats)
      return sv, so, (d_a, stats)

    svars, sopt, (d_smashed, stats) = alg.composition.server.run(
        turn, svars, sopt, (smashed, y, m, active, keys.server), order, alg.executor)
    d_smashed = with_penalty(alg, x, smashed, m, d_smashed)
    if private:   # The mean loss sent d loss_i / count: scaled back to each example's own.
      per_example = backward(d_smashed, jnp.sum(m, axis=-1, dtype=jnp.float32))
      return private_gradients(alg, per_example, m, keys), cvars_fwd, svars, sopt, stats
    return backward(d_smashed), cvars_fwd, svars, sopt, stats


@dataclasses.dataclass(frozen=True)
class ClientLabels:
  """U-shaped split: labels and loss stay on the client.

  Per client batch: head forward (client) -> ``server_forward`` (body, no
  labels) -> ``client_tail`` (tail, loss, backward; sends the body output's
  cotangent) -> ``server_backward`` (body gradients and the smashed-data
  cotangent) -> head backward (client). The server's two functions take no
  labels and return no loss.
  """
  name: str = "client"
  num_cuts: int = 2
  server_forward: Callable[..., Any] = split.server_body_forward
  server_backward: Callable[..., Any] = split.server_body_backward
  client_tail: Callable[..., Any] = split.client_tail_forward_backward
  client_tail_per_example: Callable[..., Any] = split.tail_forward_backward_per_example

  def exchange(self, alg, parts, cvars, svars, sopt, x, y, m, keys: Keys, order):
    head, body, tail = parts
    dtype, active = alg.compute_dtype, jnp.any(m, axis=-1)
    private = getattr(alg, "privacy", None) is not None
    head_vars, tail_vars = subset(cvars, head.names), subset(cvars, tail.names)
    forward = split.clients_forward_per_example if private else split.clients_forward
    smashed, head_fwd, head_backward = forward(alg.executor, head, head_vars, x, m, dtype,
                                               keys.client)
    client_tail = self.client_tail_per_example if private else self.client_tail

    def turn(sv, so, p):
      a, tv, yb, mb, act, skey, tkey = p
      out, vjp_fn, sv_fwd = self.server_forward(body, sv, a, mb, dtype, skey)
      tgrads, d_out, tv_new, stats = client_tail(tail, tv, out, yb, mb, dtype, alg.loss, tkey)
      grads, d_a = self.server_backward(vjp_fn, d_out)
      sv, so, stats = alg.checked_server_update(sv, so, sv_fwd, grads, act, stats)
      return sv, so, (d_a, tgrads, split._state(tv_new), stats)

    svars, sopt, (d_smashed, tail_grads, tail_state, stats) = alg.composition.server.run(
        turn, svars, sopt, (smashed, tail_vars, y, m, active, keys.server, keys.tail), order,
        alg.executor)
    d_smashed = with_penalty(alg, x, smashed, m, d_smashed)
    cvars_fwd = merge_parts(head_fwd, {**tail_state, "params": tail_vars["params"]})
    if private:   # Head and tail clipped together: one per-example gradient of the client.
      head_grads = head_backward(d_smashed, jnp.sum(m, axis=-1, dtype=jnp.float32))
      per_example = merge_parts(head_grads, tail_grads)
      return private_gradients(alg, per_example, m, keys), cvars_fwd, svars, sopt, stats
    grads = merge_parts(head_backward(d_smashed), tail_grads)
    return grads, cvars_fwd, svars, sopt, stats


SERVER_LABELS = ServerLabels()
CLIENT_LABELS = ClientLabels()


# -- a composition -----------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Composition:
  """One choice of each side; :meth:`check` refuses combinations that cannot run."""
  aggregation: ClientAggregation = FEDAVG
  server: ServerSide = REPLICAS
  schedule: Schedule = SYNCHRONOUS
  labels: Any = SERVER_LABELS

  def __post_init__(self):
    self.check()

  def check(self) -> None:
    a, s, sch = self.aggregation, self.server, self.schedule
    if a.handoff and s.per_client:
      raise CompositionError(
          f"client aggregation {a.name!r} hands one client model from client to client, which "
          f"cannot feed per-client server {s.name!r}: use a shared server")
    if a.handoff and sch.name == "synchronous":
      raise CompositionError(f"client aggregation {a.name!r} hands one model between clients "
                             "in turn: use the client_major schedule")
    if s.per_client and sch.name == "client_major":
      raise CompositionError(f"server {s.name!r} keeps one replica per client, which runs "
                             "synchronously: use the synchronous schedule")

  def with_labels(self, labels) -> "Composition":
    return dataclasses.replace(self, labels=labels)

  def describe(self) -> dict[str, str]:
    return {"client_aggregation": self.aggregation.name, "server": self.server.name,
            "schedule": self.schedule.name, "labels": self.labels.name}
