"""The Algorithm protocol, SplitFed compositions and the FL baseline.

An algorithm is a handful of pure functions over a typed state
(:mod:`sfljax.state`)::

  init(variables, num_clients) -> state
  begin(state, inputs)         -> carry          # a round's working state
  num_steps(inputs)            -> int            # events in the round
  step(carry, inputs, t)       -> carry
  end(carry, inputs)           -> (state, per-participant BatchStats)
  round(state, inputs)         -> (state, stats) # begin, steps, end in one program
  global_variables(state, weights=None) -> the full model to evaluate
  client_variables(state)      -> [K] full models when clients keep their own, else None
  traffic(counts, local_epochs, input_shape, label_dtype) -> comm.Traffic

:class:`Algorithm` states the protocol; :class:`SplitFed` runs any
:class:`sfljax.sides.Composition`, and the named algorithms are compositions:

=========  ==================  ========  ============  ======================
name       client aggregation  server    schedule      labels
=========  ==================  ========  ============  ======================
sflv1      fedavg              replicas  synchronous   server (1 cut), client (2 cuts)
sflv2      fedavg              shared    synchronous*  server / client
sl         relay               shared    client_major  server / client
sflv3      none                replicas  synchronous   server / client
=========  ==================  ========  ============  ======================

(*) ``sflv2_order="client"``: client_major, the official code's order. Two
cuts (``cut=(c1, c2)``) make any of them U-shaped (labels on the client).
:class:`FedAvg` (FL) trains whole models locally; centralized training is
FedAvg with one client that holds the pooled data.

A client-major event writes its participant's rows of the per-client state
back at the start of the next event (``SplitCarry.pending``; XLA then
updates them in place), and a client block (below) at the start of the next
block: code that reads a round's working state after
``step`` without ``end`` (e.g. ``Experiment.local_models``) calls
:func:`settle` on it first.

Optimizer states (:class:`OptimizerPolicy`):

* ``persistent`` (default): every client keeps one optimizer state for its
  client part (FL: its whole model) for the whole run; it is never averaged,
  and it is reused when the client's model is replaced by the averaged (or
  relayed) one. The server keeps one optimizer state per server model: per
  replica (never averaged), one for a shared server. With one client every
  split algorithm is then the same computation as centralized training.
* ``reference``: what the official code does -- client optimizer states are
  created afresh at the start of every round, the server optimizer before
  every single step (FL: per client per round; centralized: never reset).
  Learning-rate schedules keep counting through the resets
  (:func:`sfljax.optimizers.reset`). Such a state is stored between its
  uses compacted (:func:`sfljax.optimizers.compact`: only the schedule
  counters), so 1000 clients' states cost next to nothing between rounds;
  it is in full only while in use (a client's for its round, a server's for
  one step).

Learning-rate schedules count optimizer updates per side: a client's
optimizer takes one update per step of that client (``steps`` per local
epoch); a server replica one per step of its client; a shared server one per
client batch, i.e. K times as many per round as one client.

Failed participants (:attr:`RoundInputs.reported` False; the host draws
them, :mod:`sfljax.faults`): a failed participant's client-side result never
reaches the fed server.

* FedAvg of client parts (``fedavg`` aggregation, FL's whole models) and the
  averaging of server replicas (``replicas``, SFLV1/SFLV3) are re-weighted
  over the reporting participants only: weights ``n_k * reported_k``,
  normalised over the reporters.
* A failed participant's per-client state rows stay as they were at the
  round's start: its own client part (``none`` aggregation, SFLV3), its
  client optimizer state (FL: its optimizer state), its server replica's
  optimizer state.
* A relayed client model (``relay``, SL) is snapshotted at the start of
  every client's turn and restored at the end of a failed client's turn: its
  client-side updates are discarded and the next client starts from the
  model the previous client handed on.
* A shared server (``shared``, SFLV2/SL) keeps the updates it made from a
  failed client's batches that reached it (the host masks out the batches
  after the failure); its optimizer state likewise.
* If no participant reports, every aggregated part (the global client part
  under ``fedavg``, the relayed model -- which no client then changed --,
  the averaged server replicas, FL's global model) stays as it was at the
  round's start (no 0/0).

``reported=None`` means everyone reported: the program is exactly the one
without failures.

Non-finite steps (``skip_nonfinite=True``): every optimizer step -- a
client's, the server's (each replica's or the shared server's, per client
batch) and FL's local steps -- is applied only if the batch's loss and the
gradients (and the updated BatchNorm statistics) of that side are all
finite; the server side checks the loss and its own gradients (U-shaped:
the client's verdict on its loss, as a flag sent with the cotangent), the
client side the loss, its gradients and the server side's verdict, so a
batch that is non-finite anywhere moves neither side. A dropped step's loss, correct
count and sample count are left out of the round's stats, and the stats'
``nonfinite`` counts the participant's dropped steps. A participant with any
dropped step in a round counts as not reported (above): its client update
for the round is dropped. Off (the default), no check is compiled.

Client blocks (``executor.block`` = B, ``--client-block``): a step of a group
of more than B clients (a synchronous step; FL's local steps) runs block by
block, end to end -- block b's clients' forward, the server for them, their
backward and optimizer updates, then block b + 1 (:func:`client_blocks`) --
so one block's activations and vjp residuals are alive at a time. A client
depends on the others only through a shared server's order, so a shared
server's blocks follow it (block b: the participants ``order[bB:(b+1)B]``,
served in that order); server replicas and FL take consecutive rows. The
result is the unblocked step's (bit for bit with sequential clients; see
:mod:`sfljax.execution`). Client-major schedules (groups of one) and a
relayed client model are never blocked.

Client-side DP-SGD (``privacy``, a :class:`sfljax.privacy.dpsgd.DPSGD`):
the client's head runs forward per example (``jax.vjp`` per example, vmapped
inside the client's map) and turns the server's cotangent into per-example
gradients; with a U-shaped split the tail's per-example gradients join them;
each example's client-side gradient is clipped to C, the real rows summed,
N(0, (sigma C)^2) added once with the key ``fold_in(batch_key, 4)``, and the
sum divided by the expected batch. FL and centralized do the same on the
whole model. The server side is unchanged. Steps exist where
``RoundInputs.active`` says (Poisson batches can be empty and must still
release noise). A model with BatchNorm is refused.

All functions are pure: state in, state out; the client axis of every
per-client quantity is the leading one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfljax import comm, fedavg, optimizers, sides, split as split_lib, state as state_lib
from sfljax.execution import ClientExecutor
from sfljax.models import SplitModel
from sfljax.split import (BatchStats, Loss, apply_with_state, full_forward_backward, keep_if,
                          merge_parts, optimizer_step)
from sfljax.state import FLCarry, FLState, SplitCarry, SplitState

COMPOSITIONS: dict[str, sides.Composition] = {
    "sflv1": sides.Composition(sides.FEDAVG, sides.REPLICAS, sides.SYNCHRONOUS),
    "sflv2": sides.Composition(sides.FEDAVG, sides.SHARED, sides.SYNCHRONOUS),
    "sl": sides.Composition(sides.RELAY, sides.SHARED, sides.CLIENT_MAJOR),
    "sflv3": sides.Composition(sides.OWN, sides.REPLICAS, sides.SYNCHRONOUS),
}
"""The named split algorithms (two-part form; :meth:`Composition.with_labels`
with :data:`sfljax.sides.CLIENT_LABELS` gives the U-shaped form)."""

ALGORITHMS: tuple[str, ...] = ("centralized", "fl", "sl", "sflv1", "sflv2", "sflv3")


@dataclasses.dataclass(frozen=True)
class OptimizerPolicy:
  """When optimizer states are re-created (see the module docstring)."""
  client_reset_each_round: bool = False
  server_reset_each_step: bool = False


PERSISTENT = OptimizerPolicy(False, False)
REFERENCE = OptimizerPolicy(True, True)
OPTIMIZER_POLICIES = {"persistent": PERSISTENT, "reference": REFERENCE}


class RoundInputs(NamedTuple):
  """Everything one round consumes; all arrays live on the device.

  x: [K, N_max, H, W, C] and y: [K, N_max], the padded client data; or, with
  ``rows`` given, x: [N, H, W, C] and y: [N] the samples and rows: [K, N_max]
  int32, client k's r-th sample's index into them (:class:`sfljax.data.ClientData`).
  idx, mask: [M, T, B], each participant's batches for the round (see
  :func:`sfljax.data.batch_schedule`). weights: [M] float, the n_k.
  step_orders: [T, M], the shared server's client order at each synchronous
  step. client_order: [M], the turn order for client-major schedules.
  key: the round's PRNG key; client c's step t uses
  ``fold_in(fold_in(key, t), c)`` (augmentation), and its fold-ins 1, 2, 3
  for the dropout of the client head, the server part and the client tail,
  the same keys whatever the algorithm.
  clients: [M] int32 or None. With partial participation the round's M
  participants: rows of ``x``/``y`` and of every per-client state. None:
  all K clients take part, in order. With the clients sharded over D devices
  the participants on device d (rows ``d*M/D ..``) must be clients of its
  own block of K/D (:func:`sfljax.data.sample_clients` with ``strata=D``).
  reported: [M] bool or None, one per participant (row order of ``idx``).
  False: the participant failed this round and its client-side result never
  reaches the fed server: FedAvg of client parts and the averaging of server
  replicas are re-weighted over the reporters (weights ``n_k * reported``,
  normalised over them); its per-client state rows (own client part,
  client optimizer state, server replica's optimizer state) stay as they
  were at the round's start; under a relayed client model its turn's
  client-side updates are discarded (the next client starts from the model
  it was handed); a shared server keeps the updates it made from the
  batches of it that reached the server (mask out the batches after the
  failure on the host: :func:`sfljax.faults.apply`). If nobody reports, the
  aggregated parts stay as they were at the round's start. None: everyone
  reported (the program without failure handling).
  active: [M, T] bool or None: which of the participants' steps exist. A
  client's step that exists takes its optimizer step even when its batch
  has no real sample -- client-side DP-SGD with Poisson sampling
  (:mod:`sfljax.privacy.sampling`) must release its noise whatever the
  draw. None: a step exists when its batch has a real sample.
  """
  x: jax.Array
  y: jax.Array
  idx: jax.Array
  mask: jax.Array
  weights: jax.Array
  step_orders: jax.Array
  client_order: jax.Array
  key: jax.Array
  clients: jax.Array | None = None
  reported: jax.Array | None = None
  active: jax.Array | None = None
  rows: jax.Array | None = None


@runtime_checkable
class Algorithm(Protocol):
  """What :class:`sfljax.train.Experiment` needs of an algorithm (see the module docstring)."""

  def init(self, variables, num_clients: int) -> Any: ...
  def begin(self, state, inp: RoundInputs) -> Any: ...
  def num_steps(self, inp: RoundInputs) -> int: ...
  def step(self, carry, inp: RoundInputs, t) -> Any: ...
  def end(self, carry, inp: RoundInputs) -> tuple[Any, BatchStats]: ...
  def round(self, state, inp: RoundInputs) -> tuple[Any, BatchStats]: ...
  def global_variables(self, state, weights=None) -> Any: ...
  def client_variables(self, state) -> Any: ...
  def traffic(self, counts, local_epochs: int, input_shape, label_dtype) -> comm.Traffic: ...


def _client_ids(inp: RoundInputs):
  """The participants' client ids, [M]."""
  return jnp.arange(inp.idx.shape[0]) if inp.clients is None else inp.clients


def batch_key(inp: RoundInputs, client_id, t):
  """Client ``client_id``'s key for its step ``t`` of the round."""
  return jax.random.fold_in(jax.random.fold_in(inp.key, t), client_id)


def _batch(inp: RoundInputs, t, executor: ClientExecutor, augment=None, rows=None):
  """Participants' batch ``t`` (all, or the rows ``rows``): x [G, B, ...], y, mask [G, B].

  With every client taking part the gather runs per client on the device that
  holds the client (``executor.vmap``), so a sharded run moves no data here;
  with partial participation each device reads its own participants' batches
  (``executor.on_rows``).
  """
  ids = _client_ids(inp)
  idx, mask = inp.idx[:, t], inp.mask[:, t]
  if rows is not None:
    ids, idx, mask = ids[rows], idx[rows], mask[rows]
  if inp.rows is not None:   # One device: the samples, read through the clients' rows.
    r = jax.vmap(lambda c, i: inp.rows[c][i])(ids, idx)
    x, y = inp.x[r], inp.y[r]
  elif inp.clients is None and rows is None:
    x, y = executor.vmap(lambda xs, ys, i: (xs[i], ys[i]), inp.x, inp.y, idx)
  elif rows is None:   # The participants' batches, each read where its client's data lives.
    x, y = executor.on_rows(
        lambda data, c, i: jax.vmap(lambda c, i: (data[0][c][i], data[1][c][i]))(c, i),
        (inp.x, inp.y), ids, idx)
  else:
    x = jax.vmap(lambda c, i: inp.x[c][i])(ids, idx)
    y = jax.vmap(lambda c, i: inp.y[c][i])(ids, idx)
  if augment is not None:
    keys = jax.vmap(lambda c: batch_key(inp, c, t))(ids)
    x = executor.vmap(augment, keys, x)
  return x, y, mask, ids


def _keys(inp: RoundInputs, ids, t, needed: bool, noise: bool = False) -> sides.Keys:
  """The group's keys at step ``t``: fold-ins 1, 2, 3 of each client's batch key
  for dropout (``needed``), 4 for DP-SGD's noise (``noise``)."""
  if not (needed or noise):
    return sides.Keys()
  base = jax.vmap(lambda c: batch_key(inp, c, t))(ids)
  fold = lambda i: jax.vmap(lambda k: jax.random.fold_in(k, i))(base)  # noqa: E731
  if not needed:
    return sides.Keys(noise=fold(4))
  return sides.Keys(client=fold(1), server=fold(2), tail=fold(3),
                    noise=fold(4) if noise else None)


def _step_active(inp: RoundInputs, s, rows, m):
  """[G] bool: which of the group's clients take step ``s`` (``inp.active``, or a real sample)."""
  if inp.active is None:
    return jnp.any(m, axis=-1)
  act = inp.active[:, s]
  return act if rows is None else act[rows]


def _check_privacy(alg) -> None:
  if alg.privacy is not None and getattr(alg.model, "has_batch_stats", False):
    raise ValueError("client-side DP-SGD needs per-example gradients, which BatchNorm mixes "
                     "across the batch: use a model without it (--norm group or none)")


def _zeros_stats(num_clients: int, nonfinite: bool = False) -> BatchStats:
  """A round's zero stats; ``nonfinite``: with the counter (else None until ``end``)."""
  return BatchStats.zeros((num_clients,), nonfinite=nonfinite)


def _handles_faults(alg, inp: RoundInputs) -> bool:
  """Static: does this round need failure handling (reported given, or skipping)?"""
  return inp.reported is not None or alg.skip_nonfinite


def _reporters(alg, inp: RoundInputs, stats: BatchStats):
  """[M] bool: reported and (with ``skip_nonfinite``) no step dropped this round."""
  ok = (jnp.ones(stats.count.shape, bool) if inp.reported is None
        else jnp.asarray(inp.reported, bool))
  if alg.skip_nonfinite:
    ok = ok & (stats.nonfinite == 0)
  return ok


def _reset_each(opt, params, stacked_state):
  """Every row of a per-client optimizer state created afresh (schedules keep counting)."""
  return jax.vmap(lambda o: optimizers.reset(opt, params, o))(stacked_state)


def _stored(reset: bool, opt_state, batch_dims: int = 0):
  """An optimizer state as kept between its uses: in full, or when it is re-created
  before every use (``reset``) only the schedule counters (:func:`sfljax.optimizers.compact`)."""
  return optimizers.compact(opt_state, batch_dims) if reset else opt_state


def settle(carry):
  """``carry`` with the last event's deferred rows (``carry.pending``) written
  back into its per-client arrays: a round's working state as the steps left
  it, for reading outside :meth:`SplitFed.end` (which settles first)."""
  if getattr(carry, "pending", None) is None:
    return carry
  rows, values = carry.pending
  return carry.replace(pending=None, **{
      f: fedavg.update_index(getattr(carry, f), rows, v) for f, v in values.items()})


@dataclasses.dataclass(frozen=True)
class SplitFed:
  """A split algorithm: a composition of sides run over a split model.

  ``cuts``: one cut (two-part split) or two (U-shaped: blocks [0, c1) and
  [c2, end) on the client, [c1, c2) on the server); the composition's labels
  side must match (:func:`build` picks it).
  """
  composition: sides.Composition
  model: SplitModel
  cuts: tuple[int, ...]
  client_optimizer: optax.GradientTransformation
  server_optimizer: optax.GradientTransformation
  loss: Loss | None = None
  policy: OptimizerPolicy = PERSISTENT
  executor: ClientExecutor = ClientExecutor("vmap")
  augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  compute_dtype: Any = None   # e.g. jnp.bfloat16: mixed precision, float32 master weights
  skip_nonfinite: bool = False  # drop steps with non-finite values (module docstring)
  privacy: Any = None   # sfljax.privacy.dpsgd.DPSGD: client-side DP-SGD (module docstring)
  # penalty(x, smashed, mask) -> scalar added to each client's loss (e.g. NoPeek,
  # sfljax.leakage.nopeek); its gradient joins the server's cotangent.
  smashed_penalty: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None

  def __post_init__(self):
    _check_privacy(self)
    if self.smashed_penalty is not None and self.privacy is not None:
      raise ValueError("smashed_penalty mixes the examples of a batch, which DP-SGD's "
                       "per-example clipping does not bound: drop one of them")
    cuts = tuple(self.cuts) if not isinstance(self.cuts, int) else (self.cuts,)
    object.__setattr__(self, "cuts", self.model.check_cut(cuts))
    want = self.composition.labels.num_cuts
    if len(self.cuts) != want:
      raise sides.CompositionError(
          f"labels on the {self.composition.labels.name} need {want} cut(s), got {self.cuts}")

  # -- parts ---------------------------------------------------------------
  @property
  def parts(self):
    """(head, server) or (head, server body, tail) modules."""
    return self.model.parts(self.cuts)

  def _split(self, variables):
    parts = self.model.split_variables(variables, self.cuts)
    client = parts[0] if len(parts) == 2 else merge_parts(parts[0], parts[2])
    return client, parts[1]

  @property
  def _per_client(self) -> frozenset:
    c = self.composition
    return frozenset({"client_opt"} | ({"client"} if c.aggregation.per_client else set())
                     | ({"server_opt"} if c.server.per_client else set()))

  @property
  def _row_fields(self) -> tuple[str, ...]:
    """The carry's [M, ...] fields an event reads and writes by participant row."""
    c = self.composition
    return (("client_opt",) + (() if c.aggregation.handoff else ("client",))
            + (("server", "server_opt") if c.server.per_client else ()))

  def _defer(self, carry: SplitCarry, rows) -> SplitCarry:
    """``carry`` with ``rows``' current values pending (writing them back is a no-op)."""
    return carry.replace(pending=(rows, {f: fedavg.index(getattr(carry, f), rows)
                                         for f in self._row_fields}))

  @property
  def _needs_rng(self) -> bool:
    return bool(getattr(self.model, "needs_rng", False))

  # -- state ---------------------------------------------------------------
  def init(self, variables, num_clients: int) -> SplitState:
    """State from the full model's initial variables."""
    c = self.composition
    client, server = self._split(variables)
    pol = self.policy
    client_opt = fedavg.broadcast(
        _stored(pol.client_reset_each_round, self.client_optimizer.init(client["params"])),
        num_clients)
    server_opt = c.server.init_opt(
        _stored(pol.server_reset_each_step, self.server_optimizer.init(server["params"])),
        num_clients)
    if c.aggregation.per_client:
      client = fedavg.broadcast(client, num_clients)
    return SplitState(client, server, client_opt, server_opt, per_client=self._per_client)

  def global_variables(self, state: SplitState, weights=None):
    """The full model (client part(s) + server part). When every client keeps
    its own client part, their average (weights n_k, uniform if None)."""
    client = state.client
    if self.composition.aggregation.per_client:
      k = jax.tree.leaves(client)[0].shape[0]
      client = fedavg.weighted_average(client, jnp.ones((k,)) if weights is None else weights)
    return self.model.merge_variables((client, state.server))

  def client_variables(self, state: SplitState):
    """Every client's own full model [K, ...] when clients keep their own, else None."""
    if not self.composition.aggregation.per_client:
      return None
    k = jax.tree.leaves(state.client)[0].shape[0]
    server = fedavg.broadcast(state.server, k)
    return jax.vmap(lambda c, s: self.model.merge_variables((c, s)))(state.client, server)

  # -- one round: begin, steps, end -------------------------------------
  def num_steps(self, inp: RoundInputs) -> int:
    """Events in a round: T synchronous steps, or M*T client-major ones."""
    m, t = inp.idx.shape[:2]
    return self.composition.schedule.num_steps(m, t)

  def begin(self, state: SplitState, inp: RoundInputs) -> SplitCarry:
    """The round's working state: participants (and replicas) start from the stored models."""
    c, m = self.composition, inp.weights.shape[0]
    view = state if inp.clients is None else state_lib.gather(state, inp.clients,
                                                                 self.executor)
    copt = view.client_opt
    if self.policy.client_reset_each_round:
      params = jax.tree.map(lambda a: a[0], view.client["params"]) if c.aggregation.per_client \
          else view.client["params"]
      copt = _reset_each(self.client_optimizer, params, copt)
    per_client = frozenset({"client_opt", "stats"}
                           | (set() if c.aggregation.handoff else {"client"})
                           | ({"server", "server_opt"} if c.server.per_client else set()))
    client = c.aggregation.begin(view.client, m)
    start = handed = None
    if _handles_faults(self, inp):
      replicas = c.server.per_client
      start = SplitState(view.client, view.server if replicas else None, view.client_opt,
                         view.server_opt if replicas else None, per_client=view.per_client)
      handed = client if c.aggregation.handoff else None
    carry = SplitCarry(client=client,
                       server=c.server.begin(view.server, m), client_opt=copt,
                       server_opt=view.server_opt, stats=_zeros_stats(m, self.skip_nonfinite),
                       stored=None if inp.clients is None else state, start=start,
                       handed=handed, per_client=per_client)
    group = c.schedule.group_size(m)
    if group < m:   # Events take a few rows: their write-back is deferred (SplitCarry.pending).
      carry = self._defer(carry, jnp.arange(group, dtype=jnp.int32))
    return carry

  def server_update(self, sv, so, sv_fwd, grads, active):
    """The server's optimizer step after one client batch (skipped for padding;
    with ``skip_nonfinite`` also when its gradients or updated state are not finite)."""
    if self.skip_nonfinite:
      active = active & split_lib.all_finite(grads, split_lib._state(sv_fwd))
    reset = self.policy.server_reset_each_step
    sv_new, so_new = optimizer_step(self.server_optimizer, sv_fwd, so, grads, reset=reset)
    so_new = _stored(reset, so_new)
    return keep_if(active, (sv_new, so_new), (sv, so))

  def checked_server_update(self, sv, so, sv_fwd, grads, active, stats: BatchStats):
    """:meth:`server_update` for one client batch whose loss sums are ``stats``:
    returns ``(sv, so, stats)``. With ``skip_nonfinite`` the step is taken only
    if the loss, the gradients and the updated state are finite, and a dropped
    batch's ``stats`` come back zeroed with ``nonfinite`` 1 (the client side
    then drops its step too); otherwise exactly :meth:`server_update`."""
    if not self.skip_nonfinite:
      return (*self.server_update(sv, so, sv_fwd, grads, active), stats)
    ok = jnp.isfinite(stats.loss_sum) & split_lib.all_finite(grads, split_lib._state(sv_fwd))
    sv, so = self.server_update(sv, so, sv_fwd, grads, active & ok)
    return sv, so, stats.dropped(ok, jnp.ones_like(ok))

  def step(self, carry: SplitCarry, inp: RoundInputs, t) -> SplitCarry:
    """Event ``t`` of the round (see :meth:`num_steps`).

    With ``executor.block`` = B and a group of more than B clients (a
    synchronous step), the group runs block by block, end to end: block b's
    clients' forward, the server for them, their backward and optimizer
    updates, then block b + 1 (:func:`client_blocks`). Only one block's
    activations and vjp residuals are alive at a time, and the result is the
    unblocked step's: a client depends on the others only through a shared
    server's order, which the blocks follow.
    """
    c = self.composition
    rows, s, order = c.schedule.event(inp, t)
    group = inp.weights.shape[0] if rows is None else rows.shape[0]
    block = self.executor.block
    if not block or group <= block or c.aggregation.handoff:
      return self._group_step(carry, inp, t, rows, s, order)
    rows = jnp.arange(group, dtype=jnp.int32) if rows is None else rows
    if not c.server.per_client:   # A shared server takes the clients in ``order``.
      rows = rows[order]
    pending = carry.pending is not None
    # Each block writes the previous block's rows back just before it reads its
    # own (SplitCarry.pending), so XLA updates the [M, ...] arrays in place;
    # written back at once, a block of one client copied them whole.
    carry = client_blocks(
        lambda cr, r: self._group_step(cr, inp, t, r, s,
                                       jnp.arange(r.shape[0], dtype=order.dtype)),
        self._defer(settle(carry), rows[:block]), rows, block)
    carry = settle(carry)
    return self._defer(carry, rows) if pending else carry

  def _group_step(self, carry: SplitCarry, inp: RoundInputs, t, rows, s, order) -> SplitCarry:
    """One step of the group ``rows`` ([G] participant rows, None: all of them,
    in row order), their step ``s``, the shared server's ``order`` over the group."""
    c = self.composition
    deferred = rows is not None and carry.pending is not None
    carry = settle(carry)   # The last event's rows, written back just before this one reads.
    x, y, m, ids = _batch(inp, s, self.executor, self.augment, rows)
    keys = _keys(inp, ids, s, self._needs_rng, self.privacy is not None)
    take = (lambda tree: tree) if rows is None else (lambda tree: fedavg.index(tree, rows))
    put = ((lambda full, part: part) if rows is None
           else (lambda full, part: fedavg.update_index(full, rows, part)))
    handoff = c.aggregation.handoff
    cvars = fedavg.broadcast(carry.client, 1) if handoff else take(carry.client)
    copt = take(carry.client_opt)
    svars = take(carry.server) if c.server.per_client else carry.server
    sopt = take(carry.server_opt) if c.server.per_client else carry.server_opt

    grads, cvars_fwd, svars, sopt, stats = c.labels.exchange(
        self, self.parts, cvars, svars, sopt, x, y, m, keys, order)

    def client_one(cv_old, cv_fwd, co, g, act):
      cv_new, co_new = optimizer_step(self.client_optimizer, cv_fwd, co, g)
      return keep_if(act, (cv_new, co_new), (cv_old, co))

    active = _step_active(inp, s, rows, m)
    if self.skip_nonfinite:
      # The server side's verdict (nonfinite 1: it dropped the batch) and the loss.
      server_ok = jnp.isfinite(stats.loss_sum)
      if stats.nonfinite is not None:
        server_ok = server_ok & (stats.nonfinite == 0)

      def client_checked(cv_old, cv_fwd, co, g, act, sok):
        ok = sok & split_lib.all_finite(g, split_lib._state(cv_fwd))
        return (*client_one(cv_old, cv_fwd, co, g, act & ok), ok)

      cvars, copt, ok = self.executor.map(client_checked, cvars, cvars_fwd, copt, grads,
                                          active, server_ok)
      stats = stats.dropped(ok, active)
    else:
      cvars, copt = self.executor.map(client_one, cvars, cvars_fwd, copt, grads, active)
    new_rows = {"client_opt": copt}
    if not handoff:
      new_rows["client"] = cvars
    if c.server.per_client:
      new_rows.update(server=svars, server_opt=sopt)
    if deferred:
      fields, pending = {}, (rows, new_rows)
    else:
      fields, pending = {f: put(getattr(carry, f), v) for f, v in new_rows.items()}, None
    if handoff:
      fields["client"] = fedavg.index(cvars, 0)
    if not c.server.per_client:
      fields.update(server=svars, server_opt=sopt)
    client = fields.pop("client", carry.client)
    new_stats = put(carry.stats, take(carry.stats) + stats)
    handed = carry.handed
    if handoff and carry.start is not None:
      # The relayed model: snapshot at the start of each client's turn; a failed
      # client's turn is undone at its end (the next client gets what it was handed).
      first, last = c.schedule.turn(inp, t)
      handed = fedavg.select(first, carry.client, carry.handed)
      ok = _reporters(self, inp, new_stats)[rows[0]]
      client = fedavg.select(last & ~ok, handed, client)
    return carry.replace(client=client, stats=new_stats, handed=handed, pending=pending,
                         **fields)

  def end(self, carry: SplitCarry, inp: RoundInputs) -> tuple[SplitState, BatchStats]:
    """Aggregation: returns ``(new_state, per-participant BatchStats [M])``."""
    c = self.composition
    carry = settle(carry)
    stats = carry.stats.with_nonfinite()
    carry = carry.replace(client_opt=_stored(self.policy.client_reset_each_round,
                                             carry.client_opt, 1))
    if carry.start is None:
      new = SplitState(client=c.aggregation.end(carry.client, inp.weights),
                       server=c.server.end(carry.server, inp.weights),
                       client_opt=carry.client_opt, server_opt=carry.server_opt,
                       per_client=self._per_client)
    else:
      ok, start = _reporters(self, inp, stats), carry.start
      server_opt = carry.server_opt
      if c.server.per_client:
        server_opt = fedavg.keep_rows(ok, server_opt, start.server_opt)
      new = SplitState(
          client=c.aggregation.end_reported(carry.client, inp.weights, ok, start.client),
          server=c.server.end_reported(carry.server, inp.weights, ok, start.server),
          client_opt=fedavg.keep_rows(ok, carry.client_opt, start.client_opt),
          server_opt=server_opt, per_client=self._per_client)
    if carry.stored is not None:
      new = state_lib.scatter(carry.stored, inp.clients, new, self.executor)
    return new, stats

  def round(self, state, inp: RoundInputs):
    """One global epoch in one program (steps under ``lax.fori_loop``)."""
    return fused_round(self, state, inp)

  # -- communication ---------------------------------------------------------
  def traffic(self, counts, local_epochs: int, input_shape, label_dtype) -> comm.Traffic:
    """Bytes moved in a round by participants holding ``counts`` samples (by kind)."""
    shapes = jax.eval_shape(self.model.init, jax.random.key(0))
    client, server = self._split(shapes)
    parts = self.parts
    x1 = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
    head = jax.eval_shape(
        lambda v, x: apply_with_state(parts[0], v, x, None, self.compute_dtype,
                                      jax.random.key(0))[0],
        self.model.split_variables(shapes, self.cuts)[0], x1)
    body_out = 0
    if len(parts) == 3:
      body = jax.eval_shape(
          lambda v, a: apply_with_state(parts[1], v, a, None, self.compute_dtype,
                                        jax.random.key(0))[0], server, head)
      body_out = comm.tree_bytes(body)
    return comm.split_traffic(counts, local_epochs, comm.tree_bytes(head),
                              0 if body_out else np.dtype(label_dtype).itemsize,
                              comm.tree_bytes(client), server_out_bytes_per_sample=body_out)


def client_blocks(group_step, carry, rows, block: int):
  """``group_step(carry, block_rows)`` for blocks of ``block`` of ``rows`` ([G]
  participant rows), one block after another: ``rows[:B]``, ``rows[B:2B]``, ...

  The full blocks run under a ``lax.scan`` (one compiled block body); a
  smaller last block, when ``block`` does not divide G, is one more call with
  its own (static) size. Nothing is padded: a padded row would be a
  duplicate whose scattered write-back races with the real one.
  """
  num = rows.shape[0]
  full, rest = divmod(num, block)
  if full:
    carry, _ = jax.lax.scan(lambda c, r: (group_step(c, r), None), carry,
                            rows[:full * block].reshape(full, block))
  if rest:
    carry = group_step(carry, rows[full * block:])
  return carry


def fused_round(algorithm, state, inp):
  """begin, every step under ``lax.fori_loop``, end: one round in one program."""
  carry = algorithm.begin(state, inp)
  carry = jax.lax.fori_loop(0, algorithm.num_steps(inp),
                            lambda t, c: algorithm.step(c, inp, t), carry)
  return algorithm.end(carry, inp)


@dataclasses.dataclass(frozen=True)
class FedAvg:
  """FL: every client trains the whole model locally, then weighted averaging.

  With one client holding the pooled data this is centralized training.
  """
  model: SplitModel
  optimizer: optax.GradientTransformation
  loss: Loss | None = None
  policy: OptimizerPolicy = PERSISTENT
  executor: ClientExecutor = ClientExecutor("vmap")
  augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  compute_dtype: Any = None
  skip_nonfinite: bool = False  # drop local steps with non-finite values (module docstring)
  privacy: Any = None   # sfljax.privacy.dpsgd.DPSGD: DP-SGD on the whole model

  def __post_init__(self):
    _check_privacy(self)

  def init(self, variables, num_clients: int) -> FLState:
    opt = _stored(self.policy.client_reset_each_round, self.optimizer.init(variables["params"]))
    return FLState(variables, fedavg.broadcast(opt, num_clients))

  def global_variables(self, state: FLState, weights=None):
    return state.model

  def client_variables(self, state):
    return None

  def num_steps(self, inp: RoundInputs) -> int:
    return inp.idx.shape[1]

  def begin(self, state: FLState, inp: RoundInputs, *, reset_opt: bool = True) -> FLCarry:
    """The round's working state (``reset_opt`` False: optimizer states that the
    policy re-creates each round are left as stored, for the caller to re-create)."""
    m = inp.weights.shape[0]
    opt = state.opt if inp.clients is None else self.executor.take(state.opt, inp.clients)
    start = FLState(state.model, opt) if _handles_faults(self, inp) else None
    if self.policy.client_reset_each_round and reset_opt:
      opt = _reset_each(self.optimizer, state.model["params"], opt)
    return FLCarry(fedavg.broadcast(state.model, m), opt, _zeros_stats(m, self.skip_nonfinite),
                   None if inp.clients is None else state, start)

  def step(self, carry: FLCarry, inp: RoundInputs, t) -> FLCarry:
    """Every participant's local step ``t``; with ``executor.block`` = B and more
    than B participants, block by block (consecutive rows, :func:`client_blocks`)."""
    num, block = inp.weights.shape[0], self.executor.block
    if not block or num <= block:
      return self._group_step(carry, inp, t, None)
    return client_blocks(lambda cr, r: self._group_step(cr, inp, t, r), carry,
                         jnp.arange(num, dtype=jnp.int32), block)

  def _group_step(self, carry: FLCarry, inp: RoundInputs, t, rows) -> FLCarry:
    """Local step ``t`` of the participants ``rows`` ([G], None: all of them)."""
    take = (lambda tree: tree) if rows is None else (lambda tree: fedavg.index(tree, rows))
    models, opt, st = self._local_step(take(carry.models), take(carry.opt), inp, t, rows)
    if rows is None:
      return carry.replace(models=models, opt=opt, stats=carry.stats + st)
    put = lambda full, part: fedavg.update_index(full, rows, part)  # noqa: E731
    return carry.replace(models=put(carry.models, models), opt=put(carry.opt, opt),
                         stats=put(carry.stats, take(carry.stats) + st))

  def _local_step(self, models, opt, inp: RoundInputs, t, rows):
    """Local step ``t`` of the participants ``rows`` ([G], None: all of them)
    from their ``models`` and ``opt`` ([G, ...]): new models, optimizer states
    and the step's BatchStats [G]."""
    module = self.model.full()
    needs_rng = bool(getattr(self.model, "needs_rng", False))

    def local(v, o, xb, yb, mb, act, key, noise_key):
      if self.privacy is None:
        grads, v_fwd, stats = full_forward_backward(module, v, xb, yb, mb, self.compute_dtype,
                                                    self.loss, key)
      else:
        per_example, v_fwd, stats = split_lib.full_forward_backward_per_example(
            module, v, xb, yb, mb, self.compute_dtype, self.loss, key)
        grads = self.privacy.privatize(per_example, mb, noise_key)
      v_new, o_new = optimizer_step(self.optimizer, v_fwd, o, grads)
      active = act
      if self.skip_nonfinite:
        ok = jnp.isfinite(stats.loss_sum) & split_lib.all_finite(grads, split_lib._state(v_fwd))
        stats = stats.dropped(ok, active)
        active = active & ok
      v, o = keep_if(active, (v_new, o_new), (v, o))
      return v, o, stats

    x, y, m, ids = _batch(inp, t, self.executor, self.augment, rows)
    keys = _keys(inp, ids, t, needs_rng, self.privacy is not None)
    act = _step_active(inp, t, rows, m)
    args = [a for a in (keys.client, keys.noise) if a is not None]

    def mapped(v, o, xb, yb, mb, a, *ks):
      ks = list(ks)
      key = ks.pop(0) if keys.client is not None else None
      noise_key = ks.pop(0) if keys.noise is not None else None
      return local(v, o, xb, yb, mb, a, key, noise_key)

    return self.executor.map(mapped, models, opt, x, y, m, act, *args)

  def end(self, carry: FLCarry, inp: RoundInputs):
    stats = carry.stats.with_nonfinite()
    opt = _stored(self.policy.client_reset_each_round, carry.opt, 1)
    if carry.start is None:
      model = fedavg.weighted_average(carry.models, inp.weights)
    else:  # Failed participants: left out of the average, their optimizer rows kept.
      ok = _reporters(self, inp, stats)
      model = fedavg.reported_average(carry.models, inp.weights, ok, carry.start.model)
      opt = fedavg.keep_rows(ok, opt, carry.start.opt)
    if carry.stored is not None:
      opt = self.executor.put(carry.stored.opt, inp.clients, opt)
    return FLState(model, opt), stats

  def round(self, state, inp: RoundInputs):
    """One round in one program. With ``executor.block`` = B and more than B
    participants, block-major: the clients of an FL round do not depend on
    each other, so each block of B runs all its local steps before the next
    block starts, and only one block's optimizer states are in their working
    form at a time (with ``reference`` optimizer states the others stay
    compacted, :func:`sfljax.optimizers.compact`). Every client computes what
    the step-by-step blocks compute, so the result is the same bit for bit."""
    num, block = inp.weights.shape[0], self.executor.block
    if not block or num <= block:
      return fused_round(self, state, inp)
    reset = self.policy.client_reset_each_round
    carry = self.begin(state, inp, reset_opt=False)
    steps = self.num_steps(inp)

    def one_block(c: FLCarry, rows):
      models, opt = fedavg.index(c.models, rows), fedavg.index(c.opt, rows)
      if reset:
        opt = _reset_each(self.optimizer, state.model["params"], opt)

      def local(t, acc):
        models, opt, stats = acc
        models, opt, st = self._local_step(models, opt, inp, t, rows)
        return models, opt, stats + st

      models, opt, stats = jax.lax.fori_loop(0, steps, local,
                                             (models, opt, fedavg.index(c.stats, rows)))
      put = lambda full, part: fedavg.update_index(full, rows, part)  # noqa: E731
      return c.replace(models=put(c.models, models), opt=put(c.opt, _stored(reset, opt, 1)),
                       stats=put(c.stats, stats))

    carry = client_blocks(one_block, carry, jnp.arange(num, dtype=jnp.int32), block)
    return self.end(carry, inp)

  def traffic(self, counts, local_epochs, input_shape, label_dtype) -> comm.Traffic:
    del local_epochs, input_shape, label_dtype
    shapes = jax.eval_shape(self.model.init, jax.random.key(0))
    return comm.fl_traffic(len(counts), comm.tree_bytes(shapes))


@dataclasses.dataclass(frozen=True)
class Centralized(FedAvg):
  """One client holding all data, one optimizer for the whole run: no traffic."""

  def traffic(self, counts, local_epochs, input_shape, label_dtype) -> comm.Traffic:
    return comm.Traffic()


def composition(name: str, *, num_cuts: int = 1, sflv2_order: str = "paper") -> sides.Composition:
  """The named composition (see :data:`COMPOSITIONS`); two cuts make it U-shaped."""
  if name not in COMPOSITIONS:
    raise ValueError(f"unknown split algorithm {name!r}: choose one of "
                     f"{', '.join(COMPOSITIONS)}")
  comp = COMPOSITIONS[name]
  if name == "sflv2" and sflv2_order == "client":
    comp = dataclasses.replace(comp, schedule=sides.CLIENT_MAJOR)
  return comp.with_labels(sides.CLIENT_LABELS) if num_cuts == 2 else comp


def build(name: str | sides.Composition, model: SplitModel, *, cut=None, optimizer=None,
          client_optimizer=None, server_optimizer=None, executor=ClientExecutor("vmap"),
          policy: OptimizerPolicy = PERSISTENT, sflv2_order: str = "paper", augment=None,
          compute_dtype=None, loss: Loss | None = None, skip_nonfinite: bool = False,
          privacy=None, smashed_penalty=None):
  """The algorithm ``name`` (see :data:`ALGORITHMS`) or a composition, built.

  ``cut``: an int, a block name, or two of them (U-shaped); default the
  model's. ``optimizer`` serves both sides unless ``client_optimizer`` /
  ``server_optimizer`` are given. ``skip_nonfinite``: drop optimizer steps
  with non-finite values (see the module docstring). ``smashed_penalty``:
  split algorithms only, see :class:`SplitFed`.
  """
  if smashed_penalty is not None and name in ("fl", "centralized"):
    raise ValueError(f"smashed_penalty: {name} has no cut (no smashed data)")
  client_optimizer = client_optimizer or optimizer
  server_optimizer = server_optimizer or optimizer
  if client_optimizer is None or server_optimizer is None:
    raise ValueError("optimizer: give an optax optimizer (or client_optimizer and "
                     "server_optimizer)")
  common = dict(executor=executor, augment=augment, compute_dtype=compute_dtype, loss=loss,
                skip_nonfinite=skip_nonfinite, privacy=privacy)
  if name == "fl":
    return FedAvg(model=model, optimizer=client_optimizer, policy=policy, **common)
  if name == "centralized":  # One optimizer for the whole run, never reset.
    return Centralized(model=model, optimizer=client_optimizer, policy=PERSISTENT, **common)
  cuts = model.resolve_cuts(cut) if hasattr(model, "resolve_cuts") else model.check_cut(
      model.default_cut if cut is None else cut)
  if isinstance(name, sides.Composition):
    comp = name
    if len(cuts) == 2 and comp.labels.num_cuts == 1:
      comp = comp.with_labels(sides.CLIENT_LABELS)
  elif name in COMPOSITIONS:
    comp = composition(name, num_cuts=len(cuts), sflv2_order=sflv2_order)
  else:
    raise ValueError(f"unknown algorithm {name!r}: choose one of {', '.join(ALGORITHMS)}")
  return SplitFed(comp, model, cuts, client_optimizer, server_optimizer, policy=policy,
                  smashed_penalty=smashed_penalty, **common)
