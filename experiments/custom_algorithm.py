"""A new algorithm without touching the library: SFLV1 with FedAvgM on the clients.

FedAvgM (Hsu, Qi and Brown 2019, "Measuring the effects of non-identical
data distribution for federated visual classification", arXiv 1909.06335)
gives the fed server momentum. Here it acts on SFLV1's client-side models:
the fed server treats the round's FedAvg step as a pseudo-gradient and keeps
a velocity::

  delta = w_old - fedavg(w_1, ..., w_M)       # w: client-side params
  v     = beta * v + delta
  w_new = w_old - server_lr * v

The client part's other collections (batch_stats) are FedAvg's, the server
part and everything else are the inner SFLV1's. With ``beta=0`` and
``server_lr=1`` it is plain SFLV1.

:class:`FedAvgM` is a wrapper that speaks the Algorithm protocol
(:class:`sfljax.algorithms.Algorithm`) around an inner
:class:`sfljax.algorithms.SplitFed` whose client aggregation is FedAvg; its
state is a typed :class:`MomentumState` (the inner state plus the velocity),
so sharding and partial participation read its per-client declaration as
usual. Build it from objects::

  inner = sfljax.build("sflv1", model, cut=2, client_optimizer=optax.sgd(0.05),
                       server_optimizer=optax.sgd(0.05),
                       executor=sfljax.execution.resolve("auto"))
  alg = FedAvgM(inner, beta=0.9, server_lr=1.0)
  exp = Experiment(Config(clients=5, rounds=3), model=model, algorithm=alg)

or from a config (the inner algorithm built from the config's names exactly as
``Experiment`` builds plain SFLV1)::

  exp = fedavgm_experiment(Config(clients=5, optimizer="sgd", lr=0.05), beta=0.9)

Run it next to plain SFLV1 on the embedded digits::

  python experiments/custom_algorithm.py --rounds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from sfljax import algorithms
from sfljax.state import SplitCarry, SplitState
from sfljax.train import Config, Experiment


@struct.dataclass
class MomentumState:
  """FedAvgM's state between rounds.

  inner: the inner algorithm's state; its ``client`` holds the global client
    part after the momentum step.
  velocity: the fed server's velocity, a tree like the client-side params
    (one, replicated: not per client).
  """
  inner: SplitState
  velocity: Any
  per_client: frozenset = struct.field(pytree_node=False, default=frozenset())


@struct.dataclass
class MomentumCarry:
  """FedAvgM inside a round: the inner carry, and the round's starting global
  client params and velocity (both replicated)."""
  inner: SplitCarry
  start: Any
  velocity: Any
  per_client: frozenset = struct.field(pytree_node=False, default=frozenset())

  @property
  def client(self):
    """The participants' working client parts (as ``Experiment.local_models`` reads them)."""
    return self.inner.client

  @property
  def server(self):
    """The working server part(s)."""
    return self.inner.server


@dataclasses.dataclass(frozen=True)
class FedAvgM:
  """Server momentum on the fed server's aggregation of client parts (see the module docstring).

  Args:
    inner: a :class:`sfljax.algorithms.SplitFed` whose client aggregation is
      FedAvg (sflv1 or sflv2, two-part or U-shaped).
    beta: the server momentum (0: none).
    server_lr: the fed server's learning rate on the pseudo-gradient.
  """
  inner: algorithms.SplitFed
  beta: float = 0.9
  server_lr: float = 1.0

  def __post_init__(self):
    agg = getattr(getattr(self.inner, "composition", None), "aggregation", None)
    if agg is None or agg.per_client or agg.handoff:
      raise ValueError("inner: FedAvgM needs a SplitFed whose client aggregation is FedAvg "
                       f"(sflv1, sflv2), got {getattr(agg, 'name', type(self.inner).__name__)}")
    if not 0 <= self.beta < 1:
      raise ValueError(f"beta: the server momentum must be in [0, 1), got {self.beta}")
    if not self.server_lr > 0:
      raise ValueError(f"server_lr: must be positive, got {self.server_lr}")

  # -- what Experiment reads of an algorithm, from the inner one --------------
  @property
  def model(self):
    """The inner algorithm's split model."""
    return self.inner.model

  @property
  def cuts(self) -> tuple[int, ...]:
    """The inner algorithm's cut(s)."""
    return self.inner.cuts

  @property
  def executor(self):
    """How the client axis runs (the inner algorithm's executor)."""
    return self.inner.executor

  @property
  def composition(self):
    """The inner composition (its schedule gives the steps per round)."""
    return self.inner.composition

  @property
  def parts(self):
    """The inner algorithm's part modules."""
    return self.inner.parts

  # -- the protocol ------------------------------------------------------------
  def init(self, variables, num_clients: int) -> MomentumState:
    """The inner state and a zero velocity."""
    inner = self.inner.init(variables, num_clients)
    return MomentumState(inner, jax.tree.map(jnp.zeros_like, inner.client["params"]))

  def num_steps(self, inp: algorithms.RoundInputs) -> int:
    """The inner algorithm's events per round."""
    return self.inner.num_steps(inp)

  def begin(self, state: MomentumState, inp: algorithms.RoundInputs) -> MomentumCarry:
    """The inner round's working state; remembers where the round started."""
    return MomentumCarry(self.inner.begin(state.inner, inp), state.inner.client["params"],
                         state.velocity)

  def step(self, carry: MomentumCarry, inp: algorithms.RoundInputs, t) -> MomentumCarry:
    """The inner algorithm's event ``t``."""
    return carry.replace(inner=self.inner.step(carry.inner, inp, t))

  def end(self, carry: MomentumCarry, inp: algorithms.RoundInputs):
    """The inner aggregation (FedAvg), then the momentum step on the client params."""
    new, stats = self.inner.end(carry.inner, inp)
    beta, lr = self.beta, self.server_lr
    delta = jax.tree.map(lambda old, avg: old - avg, carry.start, new.client["params"])
    velocity = jax.tree.map(lambda v, d: beta * v + d, carry.velocity, delta)
    params = jax.tree.map(lambda old, v: old - lr * v, carry.start, velocity)
    inner = new.replace(client={**new.client, "params": params})
    return MomentumState(inner, velocity), stats

  def round(self, state: MomentumState, inp: algorithms.RoundInputs):
    """begin, steps, end in one program."""
    return algorithms.fused_round(self, state, inp)

  def global_variables(self, state: MomentumState, weights=None):
    """The full model: the global client part with the server part."""
    return self.inner.global_variables(state.inner, weights)

  def client_variables(self, state: MomentumState):
    """None: every client holds the global client part."""
    return None

  def traffic(self, counts, local_epochs: int, input_shape, label_dtype):
    """The inner algorithm's: the momentum lives on the fed server and moves no bytes."""
    return self.inner.traffic(counts, local_epochs, input_shape, label_dtype)


def fedavgm_experiment(config: Config, *, beta: float = 0.9, server_lr: float = 1.0,
                       **objects) -> Experiment:
  """An :class:`Experiment` running FedAvgM around the algorithm the config
  names (sflv1 or sflv2), built exactly as for the plain run: same model,
  optimizers, executor, optimizer policy, loss. ``objects``: as for
  :class:`Experiment` (``dataset``, ``parts``, ``model``, ...)."""
  plain = Experiment(config, **objects)
  objects = {**objects, "model": plain.model, "dataset": plain.dataset, "parts": plain.parts}
  return Experiment(config, algorithm=FedAvgM(plain.algorithm, beta, server_lr), **objects)


def main(argv=None):
  """Trains plain SFLV1 and SFLV1 + FedAvgM on the embedded digits from the
  same config; prints both test accuracies per round; returns the histories."""
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--rounds", type=int, default=3)
  ap.add_argument("--clients", type=int, default=5)
  ap.add_argument("--partition", default="iid")
  ap.add_argument("--lr", type=float, default=0.05)
  ap.add_argument("--beta", type=float, default=0.9)
  ap.add_argument("--server-lr", type=float, default=1.0)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)

  cfg = Config(algorithm="sflv1", dataset="digits", clients=args.clients, rounds=args.rounds,
               partition=args.partition, optimizer="sgd", lr=args.lr, seed=args.seed)
  runs = {"sflv1": Experiment(cfg),
          f"sflv1+fedavgm(beta={args.beta}, server_lr={args.server_lr})":
              fedavgm_experiment(cfg, beta=args.beta, server_lr=args.server_lr)}
  results = {}
  for name, exp in runs.items():
    t0 = time.perf_counter()
    history = exp.run()
    results[name] = history
    accs = " ".join(f"{h['test_accuracy']:.3f}" for h in history)
    print(f"{name}: test accuracy per round {accs} ({time.perf_counter() - t0:.1f} s)")
  for name, history in results.items():
    print(f"{name}: final test accuracy {history[-1]['test_accuracy']:.4f}")
  return results


if __name__ == "__main__":
  main()
