"""SplitFed algorithms as compositions of a few orthogonal choices.

A split algorithm (:class:`SplitFed`) is fixed by three choices:

* ``client_aggregation``: ``"fedavg"`` -- every client starts the round from
  the global client-side model and the fed server averages the clients'
  models (weights n_k/n) at the end of the round; ``"relay"`` -- one
  client-side model is handed from client to client (vanilla SL).
* ``server``: ``"replicas"`` -- one server-side copy per client, each starting
  the round from the global server model, averaged (n_k/n) at the round's
  end; ``"shared"`` -- one server-side model, updated after every single
  forward/backward.
* ``schedule``: ``"synchronous"`` -- at every step all clients compute their
  smashed data together; with a shared server it processes them one client at
  a time in a fresh random order per step (the SFLV2 paper text);
  ``"client_major"`` -- clients take turns in a random order per round, each
  running its whole local epoch before the next one starts (vanilla SL, and
  the official SFLV2 code).

So ``sflv1 = (fedavg, replicas, synchronous)``, ``sflv2 = (fedavg, shared,
synchronous)`` (or ``client_major`` for the official code's order) and
``sl = (relay, shared, client_major)``. :class:`FedAvg` (FL) trains whole
models locally; centralized training is FedAvg with one client that holds the
pooled data.

Optimizer states (:class:`OptimizerPolicy`):

* ``persistent`` (default): every client keeps one optimizer state for its
  client-side model (FL: its whole model) for the whole run; it is never
  averaged, and it is reused when the client's model is replaced by the
  averaged (or relayed) one. The server keeps one optimizer state per
  server-side model: per replica in SFLV1 (never averaged), one in SFLV2/SL.
  With one client every split algorithm is then the same computation as
  centralized training.
* ``reference``: what the official code does -- client optimizer states are
  created afresh at the start of every round, the server optimizer before
  every single step (FL: per client per round; centralized: never reset).

All functions are pure: state in, state out; the client axis of every
per-client quantity is the leading one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sfljax import fedavg
from sfljax.execution import ClientExecutor
from sfljax.models import SplitModel
from sfljax.split import (BatchStats, clients_forward, full_forward_backward,
                          keep_if, optimizer_step, server_forward_backward)

ALGORITHMS: tuple[str, ...] = ("centralized", "fl", "sl", "sflv1", "sflv2")


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

  x: [K, N_max, H, W, C] and y: [K, N_max], the padded client data.
  idx, mask: [K, T, B], each client's batches for the round (see
  :func:`sfljax.data.batch_schedule`). weights: [K] float, the n_k.
  step_orders: [T, K], the server's client order at each synchronous step.
  client_order: [K], the turn order for client-major schedules.
  key: the round's PRNG key; client k's batch t is augmented with
  ``fold_in(fold_in(key, t), c)`` where c is its client id, the same key
  whatever the algorithm.
  clients: [M] int32 or None. With partial participation the round's M
  participants: rows of ``x``/``y`` and of every per-client state; ``idx``,
  ``mask``, ``weights``, the orders and the stats then have M rows (row m is
  client ``clients[m]``). None: all K clients take part, in order.
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


def _client_ids(inp: RoundInputs):
  """The participants' client ids, [M]."""
  return jnp.arange(inp.idx.shape[0]) if inp.clients is None else inp.clients


def _participants(tree, inp: RoundInputs):
  """The rows of a per-client [K] pytree that take part in the round ([M])."""
  return tree if inp.clients is None else fedavg.index(tree, inp.clients)


def _write_back(full, part, inp: RoundInputs):
  """Writes the participants' rows back into a per-client [K] pytree."""
  return part if inp.clients is None else fedavg.update_index(full, inp.clients, part)


def _batch_key(inp: RoundInputs, client_id, t):
  return jax.random.fold_in(jax.random.fold_in(inp.key, t), client_id)


def _batch(inp: RoundInputs, t, executor: ClientExecutor, augment=None):
  """All participants' batch ``t``: x [M, B, ...], y [M, B], mask [M, B].

  With every client taking part the gather runs per client on the device that
  holds the client (``executor.vmap``), so a sharded run moves no data here.
  """
  idx, ids = inp.idx[:, t], _client_ids(inp)
  if inp.clients is None:
    x, y = executor.vmap(lambda xs, ys, i: (xs[i], ys[i]), inp.x, inp.y, idx)
  else:
    x = jax.vmap(lambda c, i: inp.x[c][i])(ids, idx)
    y = jax.vmap(lambda c, i: inp.y[c][i])(ids, idx)
  if augment is not None:
    keys = jax.vmap(lambda c: _batch_key(inp, c, t))(ids)
    x = executor.vmap(augment, keys, x)
  return x, y, inp.mask[:, t]


def _client_batch(inp: RoundInputs, k, t, augment=None):
  """Participant ``k``'s batch ``t`` with a leading group axis of one."""
  idx, c = inp.idx[k, t], _client_ids(inp)[k]
  x = inp.x[c][idx]
  if augment is not None:
    x = augment(_batch_key(inp, c, t), x)
  return x[None], inp.y[c][idx][None], inp.mask[k, t][None]


def _zeros_stats(num_clients: int) -> BatchStats:
  z = jnp.zeros((num_clients,), jnp.float32)
  return BatchStats(z, z, z)


def _expand(tree):
  return jax.tree.map(lambda x: x[None], tree)


@dataclasses.dataclass(frozen=True)
class SplitFed:
  """A split-learning algorithm: client halves, a server half, two optimizers."""
  model: SplitModel
  cut: int
  client_optimizer: optax.GradientTransformation
  server_optimizer: optax.GradientTransformation
  client_aggregation: str = "fedavg"
  server: str = "replicas"
  schedule: str = "synchronous"
  policy: OptimizerPolicy = PERSISTENT
  executor: ClientExecutor = ClientExecutor("vmap")
  augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  compute_dtype: Any = None   # e.g. jnp.bfloat16: mixed precision, float32 master weights

  def __post_init__(self):
    if self.client_aggregation not in ("fedavg", "relay"):
      raise ValueError(f"client_aggregation must be fedavg or relay, got {self.client_aggregation!r}")
    if self.server not in ("replicas", "shared"):
      raise ValueError(f"server must be replicas or shared, got {self.server!r}")
    if self.schedule not in ("synchronous", "client_major"):
      raise ValueError(f"schedule must be synchronous or client_major, got {self.schedule!r}")
    if self.server == "replicas" and self.schedule != "synchronous":
      raise ValueError("server replicas run synchronously: use schedule='synchronous'")
    if self.client_aggregation == "relay" and self.schedule != "client_major":
      raise ValueError("a relayed client model needs schedule='client_major'")

  @property
  def modules(self):
    return self.model.parts((self.cut,))

  # -- state ---------------------------------------------------------------
  def init(self, variables, num_clients: int) -> dict[str, Any]:
    """State from the full model's initial variables."""
    client, server = self.model.split_variables(variables, (self.cut,))
    server_opt = self.server_optimizer.init(server["params"])
    if self.server == "replicas":
      server_opt = fedavg.broadcast(server_opt, num_clients)
    client_opt = fedavg.broadcast(self.client_optimizer.init(client["params"]), num_clients)
    return {"client": client, "server": server,
            "client_opt": client_opt, "server_opt": server_opt}

  def global_variables(self, state) -> dict[str, Any]:
    """The full model the round produced (client half + server half)."""
    return self.model.merge_variables((state["client"], state["server"]))

  # -- one step for a group of clients ------------------------------------
  def _group_step(self, cvars, copt, svars, sopt, x, y, m, order):
    """One forward/backward for G clients; leaves of c* and x, y, m lead with G.

    ``svars``/``sopt`` lead with G for replicas; a shared server processes
    the G clients' smashed data one at a time in ``order``.
    """
    client_mod, server_mod = self.modules
    active = jnp.any(m, axis=-1)
    reset = self.policy.server_reset_each_step
    smashed, cvars_fwd, backward = clients_forward(self.executor, client_mod, cvars, x, m,
                                                   self.compute_dtype)

    def server_one(sv, so, a, yb, mb, act):
      grads, d_a, sv_new, stats = server_forward_backward(server_mod, sv, a, yb, mb,
                                                          self.compute_dtype)
      sv_new, so_new = optimizer_step(self.server_optimizer, sv_new, so, grads, reset=reset)
      sv, so = keep_if(act, (sv_new, so_new), (sv, so))
      return sv, so, d_a, stats

    if self.server == "replicas":
      svars, sopt, d_smashed, stats = self.executor.map(
          server_one, svars, sopt, smashed, y, m, active)
    else:
      def body(carry, k):
        sv, so, d_all = carry
        sv, so, d_k, st = server_one(sv, so, smashed[k], y[k], m[k], active[k])
        return (sv, so, d_all.at[k].set(d_k)), st

      num = order.shape[0]
      (svars, sopt, d_smashed), stats_in_order = jax.lax.scan(
          body, (svars, sopt, jnp.zeros_like(smashed)), order,
          unroll=num if num <= self.executor.unroll_up_to else 1)
      stats = jax.tree.map(lambda s: jnp.zeros_like(s).at[order].set(s), stats_in_order)

    grads = backward(d_smashed)

    def client_one(cv_old, cv_fwd, co, g, act):
      cv_new, co_new = optimizer_step(self.client_optimizer, cv_fwd, co, g)
      return keep_if(act, (cv_new, co_new), (cv_old, co))

    cvars, copt = self.executor.map(client_one, cvars, cvars_fwd, copt, grads, active)
    return cvars, copt, svars, sopt, stats

  # -- one round: begin, steps, end -------------------------------------
  def num_steps(self, inp: RoundInputs) -> int:
    """Steps in a round: T synchronous steps, or K*T client-major events."""
    k, t = inp.idx.shape[:2]
    return t if self.schedule == "synchronous" else k * t

  def begin(self, state, inp: RoundInputs):
    """The round's working state: participants (and replicas) start from the global models."""
    num_clients = inp.weights.shape[0]
    client, server = state["client"], state["server"]
    copt = _participants(state["client_opt"], inp)
    if self.policy.client_reset_each_round:
      copt = fedavg.broadcast(self.client_optimizer.init(client["params"]), num_clients)
    replicas = self.server == "replicas"
    sopt = _participants(state["server_opt"], inp) if replicas else state["server_opt"]
    relay = self.client_aggregation == "relay"
    carry = {"client": client if relay else fedavg.broadcast(client, num_clients),
             "client_opt": copt,
             "server": fedavg.broadcast(server, num_clients) if replicas else server,
             "server_opt": sopt,
             "stats": _zeros_stats(num_clients)}
    if inp.clients is not None:  # Every client's own states, to write the participants' back into.
      carry["all"] = {"client_opt": state["client_opt"],
                      "server_opt": state["server_opt"] if replicas else None}
    return carry

  def step(self, carry, inp: RoundInputs, t):
    """Step ``t`` of the round (see :meth:`num_steps`)."""
    cvars, copt = carry["client"], carry["client_opt"]
    svars, sopt, acc = carry["server"], carry["server_opt"], carry["stats"]
    if self.schedule == "synchronous":
      x, y, m = _batch(inp, t, self.executor, self.augment)
      cvars, copt, svars, sopt, st = self._group_step(
          cvars, copt, svars, sopt, x, y, m, inp.step_orders[t])
      acc = acc + st
    else:  # Client-major: event t is step t % T of the (t // T)-th client in turn.
      num_steps = inp.idx.shape[1]
      k, s = inp.client_order[t // num_steps], t % num_steps
      relay = self.client_aggregation == "relay"
      cv = cvars if relay else fedavg.index(cvars, k)
      x, y, m = _client_batch(inp, k, s, self.augment)
      cv, co, svars, sopt, st = self._group_step(
          _expand(cv), _expand(fedavg.index(copt, k)), svars, sopt, x, y, m,
          jnp.zeros((1,), jnp.int32))
      cv, co, st = fedavg.index((cv, co, st), 0)
      cvars = cv if relay else fedavg.update_index(cvars, k, cv)
      copt = fedavg.update_index(copt, k, co)
      acc = jax.tree.map(lambda a, v: a.at[k].add(v), acc, st)
    return {**carry, "client": cvars, "client_opt": copt, "server": svars, "server_opt": sopt,
            "stats": acc}

  def end(self, carry, inp: RoundInputs):
    """Aggregation: returns ``(new_state, per-client BatchStats [K])``."""
    client, server = carry["client"], carry["server"]
    if self.client_aggregation == "fedavg":
      client = fedavg.weighted_average(client, inp.weights)
    copt, sopt = carry["client_opt"], carry["server_opt"]
    if self.server == "replicas":
      server = fedavg.weighted_average(server, inp.weights)
      sopt = _write_back(carry.get("all", {}).get("server_opt"), sopt, inp)
    copt = _write_back(carry.get("all", {}).get("client_opt"), copt, inp)
    return ({"client": client, "server": server, "client_opt": copt,
             "server_opt": sopt}, carry["stats"])

  def round(self, state, inp: RoundInputs):
    """One global epoch in one program (steps under ``lax.fori_loop``)."""
    return _fused_round(self, state, inp)


def _fused_round(algorithm, state, inp):
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
  policy: OptimizerPolicy = PERSISTENT
  executor: ClientExecutor = ClientExecutor("vmap")
  augment: Callable[[jax.Array, jax.Array], jax.Array] | None = None
  compute_dtype: Any = None

  def init(self, variables, num_clients: int) -> dict[str, Any]:
    opt = fedavg.broadcast(self.optimizer.init(variables["params"]), num_clients)
    return {"model": variables, "opt": opt}

  def global_variables(self, state) -> dict[str, Any]:
    return state["model"]

  def num_steps(self, inp: RoundInputs) -> int:
    return inp.idx.shape[1]

  def begin(self, state, inp: RoundInputs):
    num_clients = inp.weights.shape[0]
    opt = _participants(state["opt"], inp)
    if self.policy.client_reset_each_round:
      opt = fedavg.broadcast(self.optimizer.init(state["model"]["params"]), num_clients)
    carry = {"models": fedavg.broadcast(state["model"], num_clients), "opt": opt,
             "stats": _zeros_stats(num_clients)}
    if inp.clients is not None:
      carry["all_opt"] = state["opt"]
    return carry

  def step(self, carry, inp: RoundInputs, t):
    module = self.model.full()

    def local(v, o, xb, yb, mb):
      grads, v_fwd, stats = full_forward_backward(module, v, xb, yb, mb, self.compute_dtype)
      v_new, o_new = optimizer_step(self.optimizer, v_fwd, o, grads)
      v, o = keep_if(jnp.any(mb), (v_new, o_new), (v, o))
      return v, o, stats

    x, y, m = _batch(inp, t, self.executor, self.augment)
    models, opt, st = self.executor.map(local, carry["models"], carry["opt"], x, y, m)
    return {**carry, "models": models, "opt": opt, "stats": carry["stats"] + st}

  def end(self, carry, inp: RoundInputs):
    return ({"model": fedavg.weighted_average(carry["models"], inp.weights),
             "opt": _write_back(carry.get("all_opt"), carry["opt"], inp)}, carry["stats"])

  def round(self, state, inp: RoundInputs):
    return _fused_round(self, state, inp)


def build(name: str, model: SplitModel, *, cut: int, optimizer, executor,
          policy: OptimizerPolicy = PERSISTENT, sflv2_order: str = "paper", augment=None,
          compute_dtype=None):
  """The algorithm called ``name`` (see :data:`ALGORITHMS`)."""
  common = dict(executor=executor, augment=augment, compute_dtype=compute_dtype)
  split = dict(model=model, cut=cut, client_optimizer=optimizer,
               server_optimizer=optimizer, policy=policy, **common)
  if name == "sflv1":
    return SplitFed(**split, client_aggregation="fedavg", server="replicas",
                    schedule="synchronous")
  if name == "sflv2":
    schedule = {"paper": "synchronous", "client": "client_major"}[sflv2_order]
    return SplitFed(**split, client_aggregation="fedavg", server="shared",
                    schedule=schedule)
  if name == "sl":
    return SplitFed(**split, client_aggregation="relay", server="shared",
                    schedule="client_major")
  if name == "fl":
    return FedAvg(model=model, optimizer=optimizer, policy=policy, **common)
  if name == "centralized":  # One optimizer for the whole run, never reset.
    return FedAvg(model=model, optimizer=optimizer, policy=PERSISTENT, **common)
  raise ValueError(f"unknown algorithm {name!r}: choose one of {', '.join(ALGORITHMS)}")
