"""Every split composition against an independent whole-model reference.

The reference below follows the paper's pseudo-code with plain Python loops
over clients and a whole-model ``jax.grad`` at every client batch: no vjp
exchange, no vmap, no sides. For a client's batch it differentiates the
whole model at (that client's client part, the server part that client's
batch meets: its replica, or the shared server as it stands at that client's
turn), then takes one SGD step on both. With plain SGD the split algorithms
must reproduce it to float32 rounding.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_trees_close, small_digits
from sfljax import algorithms, sides
from sfljax.config import Config
from sfljax.split import merge_parts
from sfljax.train import Experiment

LR = 0.05


def _parts_of(model, variables, cuts):
  parts = model.split_variables(variables, cuts)
  client = parts[0] if len(parts) == 2 else merge_parts(parts[0], parts[2])
  return client, parts[1]


@functools.partial(jax.jit, static_argnums=0)
def _whole_grad(model, client, server, x, y):
  module = model.full()

  def loss(c, s):
    logits = module.apply(model.merge_variables((c, s)), x, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  return jax.grad(loss, argnums=(0, 1))(client, server)


def _sgd(tree, grad):
  return jax.tree.map(lambda p, g: p - LR * g, tree, grad)


def reference_round(model, client, server, comp: sides.Composition, cuts, cd, inputs, weights):
  """One round of ``comp`` by hand. ``client``: global client part ({'params'}), or a
  list of per-client ones when clients keep their own."""
  idx, mask = np.asarray(inputs.idx), np.asarray(inputs.mask)
  orders, client_order = np.asarray(inputs.step_orders), np.asarray(inputs.client_order)
  k, steps = idx.shape[:2]
  own = comp.aggregation.name == "none"
  relay = comp.aggregation.name == "relay"
  clients = list(client) if own else [client for _ in range(k)]
  replicas = comp.server.name == "replicas"
  servers = [server for _ in range(k)] if replicas else None
  shared = server

  def batch(c, t):
    b = idx[c, t][mask[c, t]]
    return jnp.asarray(cd.x[c][b]), jnp.asarray(cd.y[c][b])

  def one(c, t):
    nonlocal shared, relayed
    if not mask[c, t].any():
      return
    x, y = batch(c, t)
    cv = relayed if relay else clients[c]
    sv = servers[c] if replicas else shared
    gc, gs = _whole_grad(model, cv, sv, x, y)
    if relay:
      relayed = _sgd(cv, gc)
    else:
      clients[c] = _sgd(cv, gc)
    if replicas:
      servers[c] = _sgd(sv, gs)
    else:
      shared = _sgd(sv, gs)

  relayed = client
  if comp.schedule.name == "synchronous":
    # All clients' forward passes at step t use their models from before step t; the
    # client parts are independent of each other, so sequencing them in the server's
    # order gives the same result for the client parts, and the shared server's.
    for t in range(steps):
      for c in orders[t]:
        one(int(c), t)
  else:
    for c in client_order:
      for t in range(steps):
        one(int(c), t)
  w = np.asarray(weights, np.float64) / np.sum(weights)
  avg = lambda trees: jax.tree.map(lambda *a: sum(wi * ai for wi, ai in zip(w, a)), *trees)  # noqa: E731
  new_server = avg(servers) if replicas else shared
  if relay:
    return relayed, new_server
  return (clients if own else avg(clients)), new_server


def _dataset_and_parts():
  ds = small_digits(60, 24)
  parts = [np.arange(0, 24), np.arange(24, 42), np.arange(42, 60)]   # 24, 18, 18 samples
  return ds, parts


CASES = [  # (algorithm, sflv2_order, cut)
    ("sflv1", "paper", None), ("sflv2", "paper", None), ("sflv2", "client", None),
    ("sl", "paper", None), ("sflv3", "paper", None),
    ("sflv1", "paper", "1,4"), ("sflv2", "paper", "1,4"), ("sflv2", "client", "2,3"),
    ("sl", "paper", "1,4"), ("sflv3", "paper", "2,4"),
]


OVERRIDES = [  # Compositions no name covers, built from the CLI's side overrides.
    ("sflv3", "paper", "1,4", {"server_side": "shared", "schedule": "client_major"}),
    ("sflv1", "paper", None, {"client_aggregation": "none", "server_side": "shared"}),
]


@pytest.mark.parametrize("algorithm,order,cut,sides_", [c + ({},) for c in CASES] + OVERRIDES)
def test_composition_equals_hand_sequenced_whole_model_sgd(algorithm, order, cut, sides_):
  ds, parts = _dataset_and_parts()
  exp = Experiment(Config(algorithm=algorithm, sflv2_order=order, cut=cut, clients=3,
                          batch_size=8, optimizer="sgd", lr=LR, rounds=2, **sides_),
                   dataset=ds, parts=parts)
  for field, choice in sides_.items():
    side = {"client_aggregation": "aggregation", "server_side": "server"}.get(field, field)
    assert getattr(exp.algorithm.composition, side).name == choice
  comp, cuts = exp.algorithm.composition, exp.algorithm.cuts
  assert (comp.labels.name == "client") == (cut is not None)
  variables = exp.model.init(jax.random.key(exp.config.seed))
  client, server = _parts_of(exp.model, variables, cuts)
  if comp.aggregation.name == "none":
    client = [client] * 3
  state = exp.init()
  for r in range(2):
    inputs = exp.round_inputs(r)
    client, server = reference_round(exp.model, client, server, comp, cuts, exp.client_data,
                                     inputs, exp.client_data.counts)
    state, _ = exp.train_round(state)
  got = state.algo
  assert_trees_close(got.server, server, atol=3e-5)
  if comp.aggregation.name == "none":
    for c in range(3):
      assert_trees_close(jax.tree.map(lambda a: a[c], got.client), client[c], atol=3e-5)
  else:
    assert_trees_close(got.client, client, atol=3e-5)


def test_shared_server_order_matters_for_the_reference():
  """The reference is sensitive to the shared server's client order (so the test above
  would catch a server that ignored it)."""
  ds, parts = _dataset_and_parts()
  exp = Experiment(Config(algorithm="sflv2", clients=3, batch_size=8, optimizer="sgd", lr=LR,
                          rounds=1), dataset=ds, parts=parts)
  variables = exp.model.init(jax.random.key(0))
  client, server = _parts_of(exp.model, variables, exp.algorithm.cuts)
  inputs = exp.round_inputs(0)
  a = reference_round(exp.model, client, server, exp.algorithm.composition, exp.algorithm.cuts,
                      exp.client_data, inputs, exp.client_data.counts)
  flipped = inputs._replace(step_orders=inputs.step_orders[:, ::-1])
  b = reference_round(exp.model, client, server, exp.algorithm.composition, exp.algorithm.cuts,
                      exp.client_data, flipped, exp.client_data.counts)
  diff = max(float(jnp.max(jnp.abs(u - v))) for u, v in zip(jax.tree.leaves(a[1]),
                                                             jax.tree.leaves(b[1])))
  assert diff > 1e-4


@pytest.mark.parametrize("algorithm,order,cut", [
    ("sflv1", "paper", "1,4"), ("sflv2", "paper", "2,4"), ("sflv2", "client", "1,3"),
    ("sl", "paper", "1,4"), ("sflv3", "paper", "1,4"), ("sflv3", "paper", None)])
def test_one_client_every_form_equals_centralized_whole_model_adam(algorithm, order, cut):
  ds = small_digits(40, 16)
  parts = [np.arange(40)]
  cfg = dict(clients=1, batch_size=8, optimizer="adam", lr=1e-3, rounds=2)
  ref = Experiment(Config(algorithm="centralized", **cfg), dataset=ds, parts=parts)
  exp = Experiment(Config(algorithm=algorithm, sflv2_order=order, cut=cut, **cfg),
                   dataset=ds, parts=parts)
  module = exp.model.full()
  params = exp.model.init(jax.random.key(0))["params"]
  opt = optax.adam(1e-3)
  opt_state = opt.init(params)

  @jax.jit
  def update(p, o, x, y):
    g = jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(
        module.apply({"params": q}, x, train=True), y).mean())(p)
    u, o = opt.update(g, o, p)
    return optax.apply_updates(p, u), o

  for r in range(2):
    inputs = ref.round_inputs(r)
    idx, mask = np.asarray(inputs.idx[0]), np.asarray(inputs.mask[0])
    for t in range(idx.shape[0]):
      b = idx[t][mask[t]]
      params, opt_state = update(params, opt_state, jnp.asarray(ds.x_train[b]),
                                 jnp.asarray(ds.y_train[b]))
  state = exp.init()
  for _ in range(2):
    state, _ = exp.train_round(state)
  assert_trees_close(exp.global_variables(state)["params"], params, atol=2e-5)


def test_u_shaped_server_functions_never_receive_labels_or_loss():
  """Spies on the server body's two functions: no integer (label) array reaches them,
  and the client tail is where the loss is computed."""
  ds, parts = _dataset_and_parts()
  seen = {"server": [], "tail": 0}
  labels = sides.CLIENT_LABELS

  def spy_forward(module, variables, smashed, mask, dtype, rng):
    seen["server"].append((smashed, mask, rng))
    return labels.server_forward(module, variables, smashed, mask, dtype, rng)

  def spy_backward(vjp_fn, d_out):
    seen["server"].append((d_out,))
    return labels.server_backward(vjp_fn, d_out)

  def spy_tail(*args):
    seen["tail"] += 1
    return labels.client_tail(*args)

  spied = dataclasses.replace(labels, server_forward=spy_forward, server_backward=spy_backward,
                              client_tail=spy_tail)
  comp = algorithms.COMPOSITIONS["sflv2"].with_labels(spied)
  exp = Experiment(Config(algorithm="sflv2", cut="1,4", clients=3, batch_size=8, rounds=1),
                   dataset=ds, parts=parts, algorithm=comp)
  state, metrics = exp.train_round(exp.init())
  assert seen["server"] and seen["tail"]
  for args in seen["server"]:
    for leaf in jax.tree.leaves(args):
      if leaf is None or jnp.issubdtype(leaf.dtype, jax.dtypes.prng_key):
        continue
      assert not jnp.issubdtype(leaf.dtype, jnp.integer), "an integer array reached the server"
      assert leaf.ndim >= 1 and leaf.shape[0] == 8   # per-sample rows, no scalar loss
  assert np.isfinite(metrics["train_loss"])


def test_compositions_that_cannot_run_are_refused():
  with pytest.raises(sides.CompositionError, match="shared server"):
    sides.Composition(sides.RELAY, sides.REPLICAS, sides.CLIENT_MAJOR)
  with pytest.raises(sides.CompositionError, match="client_major"):
    sides.Composition(sides.RELAY, sides.SHARED, sides.SYNCHRONOUS)
  with pytest.raises(sides.CompositionError, match="synchronous"):
    sides.Composition(sides.FEDAVG, sides.REPLICAS, sides.CLIENT_MAJOR)
