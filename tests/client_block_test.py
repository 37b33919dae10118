"""``--client-block B``: a step runs block by block, end to end, with the unblocked result.

A synchronous step of K participants with blocks of B runs block b's clients'
forward, the server for them, their backward and optimizer updates, then
block b + 1 (:func:`sfljax.algorithms.client_blocks`); FL's local steps
likewise. The blocked run must give the unblocked run's state and metrics:

* ``sequential``: bit for bit (8 clients, blocks 3 + 3 + 2). Inside a block
  the clients run one after another in a scan, the same operations as
  without blocks. A block of one client is the exception (not tested bit
  for bit): the executor vmaps a group of one and XLA compiles it outside
  any loop, fused with its surroundings, which can change the last bit
  (measured: 1.5e-8 on a weight after two rounds with 7 clients in blocks
  of 3).
* ``vmap`` (7 clients: blocks 3 + 3 + 1): inside a block B clients are
  vmapped instead of K. XLA:CPU vectorises a sum over the samples (e.g. a
  bias gradient) across the vmapped client axis, with a tiling that depends
  on the number of clients, so the last bit of such a sum can differ
  (measured on LeNet: 1e-10 on a bias gradient after one step, 3e-8 on the
  weights after two rounds; 0 for this MLP's SFLV2). Compared with
  ``atol=1e-6``, ``rtol=1e-5``: float32 rounding, far below what a wrong
  client order or a missed or doubled client update changes here (those
  breakages fail these tests).

Most of these run on a tiny MLP (BatchNorm, dropout: per-client keys) over
8x8 digits to keep compilation short; the memory test compiles the
paper's LeNet.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh

from sfljax import algorithms, data, execution, models, sides
from sfljax.config import Config, ConfigError
from sfljax.train import Experiment

SIZES = (5, 8, 3, 12, 7, 9, 4, 6)   # 8 clients, unequal (batch 4: 3 steps, padded steps too)
BLOCK = 3                           # blocks 3 + 3 + a remainder of 2
CUT, U_CUT = 5, (5, 7)           # head: flat fc1 bn relu drop | fc2 relu2 | tail: head
OPT = optax.sgd(0.1, momentum=0.9)   # with a state per client (and per server replica)
ALGORITHMS = ["sflv1", "sflv2", "sflv3", "sflv1_u", "sflv2_u", "fl"]

MODEL = models.SplitModel.from_modules(
    [("flat", lambda a: a.reshape((a.shape[0], -1))), ("fc1", nn.Dense(16, use_bias=False)),
     ("bn", nn.BatchNorm(momentum=0.9)), ("relu", nn.relu), ("drop", nn.Dropout(0.25)),
     ("fc2", nn.Dense(16)), ("relu2", nn.relu), ("head", nn.Dense(10))],
    input_shape=(8, 8, 1), num_classes=10, name="tiny")


def _augment(key, x):
  """A keyed augmentation (the keys are the clients', whatever the block)."""
  return x + 0.1 * jax.random.normal(key, x.shape, x.dtype)


@functools.lru_cache(maxsize=None)
def _data(sizes=SIZES):
  ds = data.load_digits(0, image_size=8)
  bounds = np.cumsum((0,) + tuple(sizes))
  return ds, [np.arange(bounds[k], bounds[k + 1]) for k in range(len(sizes))]


def _algorithm(name, strategy, block, skip=False, augment=False, policy="persistent"):
  base = name.removesuffix("_u")
  cut = None if base == "fl" else U_CUT if name.endswith("_u") else CUT
  return algorithms.build(base, MODEL, cut=cut, optimizer=OPT,
                          executor=execution.ClientExecutor(strategy, block),
                          augment=_augment if augment else None, skip_nonfinite=skip,
                          policy=algorithms.OPTIMIZER_POLICIES[policy])


@functools.lru_cache(maxsize=None)
def _experiment(name, sizes, config):
  """The round inputs' source (its config draws participants and faults)."""
  ds, parts = _data(sizes)
  return Experiment(Config(algorithm=name.removesuffix("_u"), clients=len(sizes), batch_size=4,
                           **dict(config)), dataset=ds, parts=parts, model=MODEL,
                    algorithm=_algorithm(name, "sequential", None))


def _run(name, strategy, block, rounds=2, skip=False, augment=False, sizes=SIZES,
         policy="persistent", **config):
  """``rounds`` rounds of ``name`` (``_u``: U-shaped) with blocks of ``block``:
  (the final algorithm state, every round's per-participant BatchStats)."""
  exp = _experiment(name, sizes, tuple(sorted(config.items())))
  alg = _algorithm(name, strategy, block, skip, augment, policy)
  state, history = alg.init(MODEL.init(jax.random.key(0)), len(sizes)), []
  round_fn = jax.jit(alg.round)
  for r in range(rounds):
    state, stats = round_fn(state, exp.round_inputs(r))
    history.append(stats)
  return state, history


def _assert_same(blocked, whole, strategy):
  """Every leaf of the states and of the rounds' stats: equal (sequential), or
  within float32 rounding (vmap: see the module docstring)."""
  paths = jax.tree_util.tree_leaves_with_path(blocked)
  leaves = jax.tree.leaves(whole)
  assert jax.tree.structure(blocked) == jax.tree.structure(whole)
  for (path, x), y in zip(paths, leaves):
    what = jax.tree_util.keystr(path)
    if strategy == "sequential":
      np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=what)
    else:
      # The two programs vectorise differently (batches of 3 and 1 clients against 7), so
      # their float32 rounding differs (~1e-7 per operation); two rounds of momentum SGD
      # carry it to about 1e-5 of a leaf's scale (1.2e-5 at most measured, on a leaf of
      # scale ~0.5, with the suite's XLA flags, tests/conftest.py), also on elements near
      # zero, so the bound is relative to the leaf's largest value, not elementwise. A
      # wrong block, order or step changes leaves by 1e-2 of their scale or more.
      y = np.asarray(y)
      np.testing.assert_allclose(np.asarray(x), y, rtol=0,
                                 atol=1e-4 * float(np.max(np.abs(y), initial=0.0)) + 1e-6,
                                 err_msg=what)


@pytest.mark.parametrize("strategy", ["sequential", "vmap"])
@pytest.mark.parametrize("name", ALGORITHMS)
def test_blocked_rounds_equal_unblocked(name, strategy):
  """Blocks of 3, two rounds: every leaf of the state (models, optimizer states,
  BatchNorm statistics) and every participant's stats as without blocks; SFLV2's
  shared server takes the clients in its random order across the blocks.
  Sequential: 8 clients (blocks 3 + 3 + 2), bit for bit. Vmap: 7 clients
  (3 + 3 + a block of one), to float32 rounding (the module docstring)."""
  sizes = SIZES if strategy == "sequential" else SIZES[:7]
  _assert_same(_run(name, strategy, BLOCK, sizes=sizes), _run(name, strategy, None, sizes=sizes),
               strategy)


@pytest.mark.parametrize("name", ["sflv1", "fl"])
def test_blocks_with_reference_optimizer_states(name):
  """``reference`` optimizer states (re-created each round / step, stored
  compacted; FL's blocked round runs block-major and re-creates one block's
  states at a time): blocked = unblocked bit for bit."""
  _assert_same(_run(name, "sequential", BLOCK, policy="reference"),
               _run(name, "sequential", None, policy="reference"), "sequential")


@pytest.mark.parametrize("name", ["sflv2", "fl"])
def test_blocks_with_partial_participation(name):
  """5 of the 8 clients take part each round (a fresh draw per round; blocks of
  3 + 2 over the participants' rows), with a keyed augmentation (keys by client
  id, not by row): the blocked rounds are the unblocked ones, and the clients
  sitting out keep their rows."""
  kw = dict(client_fraction=0.6, augment=True)
  assert len(_experiment(name, SIZES, (("client_fraction", 0.6),)).round_inputs(0).clients) == 5
  _assert_same(_run(name, "sequential", BLOCK, **kw), _run(name, "sequential", None, **kw),
               "sequential")


@pytest.mark.parametrize("name", ["sflv1", "fl"])
def test_blocks_with_client_faults(name):
  """Clients failing mid-round (``dropout_rate``) and non-finite checks on: the
  round's start rows, the re-weighted FedAvg and the kept optimizer rows are
  the unblocked round's."""
  kw = dict(dropout_rate=0.4, skip=True)
  assert not all(np.asarray(_experiment(name, SIZES, (("dropout_rate", 0.4),))
                            .round_inputs(r).reported).all() for r in range(2))  # Faults happen.
  _assert_same(_run(name, "sequential", BLOCK, **kw), _run(name, "sequential", None, **kw),
               "sequential")


def test_config_client_block_reaches_the_step():
  """``Config(client_block=3)`` reaches the executor and the algorithm built from
  the config, whose synchronous step then scans over the 2 full blocks of 3 of
  the 8 clients (and calls the block of 2 once); without it, no block scan."""
  ds, parts = _data()
  lengths = {}
  for block in (None, BLOCK):
    exp = Experiment(Config(algorithm="sflv2", clients=len(SIZES), batch_size=4, rounds=1,
                            strategy="sequential", client_block=block), dataset=ds, parts=parts,
                     model=MODEL)
    assert exp.executor.block == block and exp.algorithm.executor.block == block
    state, inp = jax.eval_shape(exp.init).algo, exp.round_inputs(0)
    carry = jax.eval_shape(exp.algorithm.begin, state, inp)
    jaxpr = jax.make_jaxpr(lambda c, i: exp.algorithm.step(c, i, 0))(carry, inp).jaxpr
    # (length, the lengths of the scans inside) of the step's scans.
    lengths[block] = sorted(
        (e.params["length"], tuple(sorted({x.params["length"] for x in e.params["jaxpr"].eqns
                                           if x.primitive.name == "scan"})))
        for e in jaxpr.eqns if e.primitive.name == "scan")
  # Blocked: a scan over the 2 full blocks, with the block's client scans (3) inside,
  # and the block of 2's own client scans; unblocked: scans over all 8 clients.
  assert (2, (3,)) in lengths[BLOCK] and {n for n, _ in lengths[BLOCK]} == {2}, lengths
  assert {n for n, _ in lengths[None]} == {8}, lengths


@pytest.mark.parametrize("name", ["sflv1"])
def test_blocks_bound_the_compiled_round_memory(name):
  """LeNet, 64 clients of one batch of 32 (random 28x28 inputs: only the
  compiled program is looked at), vmapped: the compiled round's temporary
  buffers with blocks of 8 are several times smaller than without blocks, as
  a step holds one block's activations and vjp residuals, not 64 clients'.

  Measured (XLA:CPU, jax 0.10.2): 528 MiB without blocks, 81 MiB with blocks
  of 8 (73 MiB at 32 clients: flat in K); SFLV1 before this change, when only
  each map was split into blocks and every client's residuals stayed alive
  between the forward and the server's reply, 183 MiB (133 at 32 clients),
  which fails the bound. (FL: 528 and 82 MiB; its step was one map already,
  106 MiB before.)
  """
  num, size = 64, 32
  rng = np.random.default_rng(0)
  ds = data.Dataset("random", rng.normal(size=(num * size, 28, 28, 1)).astype(np.float32),
                    (np.arange(num * size) % 10).astype(np.int32),
                    np.zeros((10, 28, 28, 1), np.float32), np.arange(10, dtype=np.int32), 10)
  parts = [np.arange(k * size, (k + 1) * size) for k in range(num)]
  temp = {}
  for block in (None, 8):
    exp = Experiment(Config(algorithm=name, clients=num, batch_size=size, rounds=1,
                            strategy="vmap", client_block=block), dataset=ds, parts=parts)
    state, inp = jax.eval_shape(exp.init).algo, exp.round_inputs(0)
    compiled = jax.jit(exp.algorithm.round).lower(state, inp).compile()
    temp[block] = compiled.memory_analysis().temp_size_in_bytes
  assert temp[8] * 4 < temp[None], temp


def test_sequential_block_keeps_clients_one_at_a_time():
  """``map`` with the sequential strategy and a block runs the clients one
  after another (one scan over all of them), not as vmapped blocks; with
  vmap, blocks of vmapped clients: full blocks scanned, the remainder once."""
  xs = jnp.arange(7 * 3.0).reshape(7, 3)
  fn = lambda x: jnp.sin(x) * 2   # noqa: E731

  def scans(ex):
    jaxpr = jax.make_jaxpr(lambda a: ex.map(fn, a))(xs).jaxpr
    return [e.params["length"] for e in jaxpr.eqns if e.primitive.name == "scan"]

  assert scans(execution.ClientExecutor("sequential", 2)) == [7]
  assert scans(execution.ClientExecutor("vmap", 2)) == [3]
  for ex in (execution.ClientExecutor("sequential", 2), execution.ClientExecutor("vmap", 2)):
    np.testing.assert_allclose(jax.jit(lambda a, ex=ex: ex.map(fn, a))(xs), fn(xs), rtol=1e-6)


def test_blocks_over_a_mesh_are_refused():
  """Blocks over a mesh of several devices: a clear error up front."""
  with pytest.raises(ConfigError, match="client_block.*devices"):
    Config(client_block=8, devices=2).validate()
  Config(client_block=8, devices=1).validate()
  mesh = AbstractMesh((2,), (execution.CLIENT_AXIS,))
  with pytest.raises(ValueError, match="client blocks.*mesh of 2 devices"):
    execution.ClientExecutor("vmap", 4, mesh=mesh)
  execution.ClientExecutor("vmap", None, mesh=mesh)


@dataclasses.dataclass(frozen=True)
class _Halves(sides.Schedule):
  """A schedule of groups: participants 0..m/2-1 take their step t, then the others."""
  name: str = "halves"

  def num_steps(self, num_participants, steps):
    return 2 * steps

  def group_size(self, num_participants):
    return num_participants // 2

  def event(self, inp, t):
    g = inp.weights.shape[0] // 2
    rows = jnp.arange(g, dtype=jnp.int32) + (t % 2) * g
    return rows, t // 2, jnp.arange(g, dtype=jnp.int32)


@pytest.mark.parametrize("block", [None, 2])
def test_grouped_schedule_with_deferred_rows_equals_sflv1(block):
  """A schedule whose events take groups of 4 of the 8 participants defers each
  group's write-back to the next event (SplitCarry.pending); with blocks of 2
  each group runs as 2 + 2 around it. With per-client server replicas the
  clients are independent, so it must give SFLV1's state and stats, bit for
  bit (sequential clients). (Not blocks of 3: the remainder would be a block
  of one client, the exception in the module docstring.)"""
  exp = _experiment("sflv1", SIZES, ())
  comp = sides.Composition(sides.FEDAVG, sides.REPLICAS, _Halves())
  alg = algorithms.build(comp, MODEL, cut=CUT, optimizer=OPT,
                         executor=execution.ClientExecutor("sequential", block))
  state, history = alg.init(MODEL.init(jax.random.key(0)), len(SIZES)), []
  round_fn = jax.jit(alg.round)
  for r in range(2):
    state, stats = round_fn(state, exp.round_inputs(r))
    history.append(stats)
  _assert_same((state, history), _run("sflv1", "sequential", None), "sequential")
