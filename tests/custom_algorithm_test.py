"""The custom-algorithm example (experiments/custom_algorithm.py): SFLV1 with
FedAvgM on the client parts, against independent computations."""

import os
import sys

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest

import sfljax
from conftest import assert_trees_close, small_digits
from sfljax import algorithms, state as state_lib
from sfljax.train import Config, Experiment, RunState

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

from custom_algorithm import FedAvgM, MomentumState, fedavgm_experiment  # noqa: E402

ROUNDS = 2
# Uneven clients (n_k = 20, 16, 12), so FedAvg's weights and the padding matter.
PARTS = [np.arange(0, 20), np.arange(20, 36), np.arange(36, 48)]


def _mlp(ds):
  """A small model that compiles fast; batch norm on the client side, so the
  client part has batch_stats besides its params (cut after ``bn``)."""
  blocks = {"flat": lambda x: x.reshape(x.shape[0], -1), "fc1": nn.Dense(32),
            "bn": nn.BatchNorm(), "act": nn.relu, "out": nn.Dense(ds.num_classes)}
  return sfljax.SplitModel.from_modules(blocks, input_shape=ds.input_shape,
                                        num_classes=ds.num_classes, default_cut=3)


def _config(**kw):
  kw = {"clients": len(PARTS), "batch_size": 8, "rounds": ROUNDS, "optimizer": "sgd",
        "lr": 0.05, **kw}
  return Config(**kw)


def _f64(tree):
  return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


@pytest.fixture(scope="module")
def plain():
  """Plain SFLV1 from the config, and its states after rounds 0, 1, 2 with
  the round metrics."""
  ds = small_digits()
  exp = Experiment(_config(), dataset=ds, parts=PARTS, model=_mlp(ds))
  states, metrics = [exp.init()], []
  for _ in range(ROUNDS):
    state, m = exp.train_round(states[-1])
    states.append(state)
    metrics.append(m)
  return exp, states, metrics


def _wrapped(plain_exp, beta, server_lr):
  """FedAvgM around the plain run's own algorithm, with the same Experiment settings."""
  return Experiment(_config(), dataset=plain_exp.dataset, parts=plain_exp.parts,
                    model=plain_exp.model,
                    algorithm=FedAvgM(plain_exp.algorithm, beta=beta, server_lr=server_lr))


def test_no_momentum_and_unit_server_lr_is_plain_sflv1(plain):
  """beta=0, server_lr=1: w_old - (w_old - fedavg) = fedavg, so the same run as SFLV1."""
  plain_exp, plain_states, plain_metrics = plain
  exp = _wrapped(plain_exp, beta=0.0, server_lr=1.0)
  state = exp.init()
  assert_trees_close(state.algo.inner, plain_states[0].algo, atol=0, rtol=0)
  for r in range(ROUNDS):
    state, metrics = exp.train_round(state)
    assert isinstance(state.algo, MomentumState)
    assert_trees_close(state.algo.inner, plain_states[r + 1].algo, atol=1e-6, rtol=1e-6)
    assert metrics["train_loss"] == pytest.approx(plain_metrics[r]["train_loss"], rel=1e-6)
    assert metrics["train_accuracy"] == plain_metrics[r]["train_accuracy"]
  assert_trees_close(exp.global_variables(state), plain_exp.global_variables(plain_states[-1]),
                     atol=1e-6, rtol=1e-6)


def test_momentum_equals_hand_computation_from_the_inner_fedavg(plain):
  """beta=0.9: every round, the wrapper's client params and velocity equal
  FedAvgM computed in NumPy float64 from the plain SFLV1 round (its FedAvg of
  the client parts) run from the wrapper's own state; batch_stats, the server
  part and the optimizer states are the plain round's."""
  beta, server_lr = 0.9, 1.0
  plain_exp = plain[0]
  exp = _wrapped(plain_exp, beta=beta, server_lr=server_lr)
  state = exp.init()
  velocity = jax.tree.map(np.zeros_like, _f64(state.algo.inner.client["params"]))
  for r in range(ROUNDS):
    fed = plain_exp.train_round(RunState(state.algo.inner, r))[0].algo
    old, avg = _f64(state.algo.inner.client["params"]), _f64(fed.client["params"])
    velocity = jax.tree.map(lambda v, o, a: beta * v + (o - a), velocity, old, avg)
    expected = jax.tree.map(lambda o, v: o - server_lr * v, old, velocity)
    state, _ = exp.train_round(state)
    got = state.algo.inner
    assert_trees_close(got.client["params"], expected, atol=1e-6, rtol=1e-5)
    assert_trees_close(state.algo.velocity, velocity, atol=1e-6, rtol=1e-5)
    assert_trees_close(got.client["batch_stats"], fed.client["batch_stats"], atol=1e-6,
                       rtol=1e-5)
    assert_trees_close(got.server, fed.server, atol=1e-6, rtol=1e-5)
    assert_trees_close(got.client_opt, fed.client_opt, atol=1e-6, rtol=1e-5)
    if r > 0:  # The momentum moved the model away from FedAvg's: the check has teeth.
      gap = max(float(np.max(np.abs(e - a))) for e, a in
                zip(jax.tree.leaves(expected), jax.tree.leaves(avg)))
      assert gap > 1e-3, gap


def test_end_applies_the_formula_with_any_beta_and_server_lr(plain):
  """``end`` alone, eagerly, with beta=0.5, server_lr=0.3 and a random velocity:
  the round starts from w_0 and its participants all hold w_1 (so FedAvg
  gives w_1); the result is w_0 - lr * (beta * v + w_0 - w_1), in float64."""
  plain_exp, states, _ = plain
  beta, server_lr = 0.5, 0.3
  alg = FedAvgM(plain_exp.algorithm, beta=beta, server_lr=server_lr)
  w0, w1 = states[0].algo.client["params"], states[1].algo.client["params"]
  leaves, treedef = jax.tree.flatten(w0)
  rng = np.random.default_rng(0)
  v = jax.tree.unflatten(treedef, [rng.normal(size=a.shape).astype(np.float32) for a in leaves])
  inputs = plain_exp.round_inputs(0)
  carry = alg.begin(MomentumState(states[1].algo, v), inputs).replace(start=w0)
  new, stats = alg.end(carry, inputs)
  velocity = jax.tree.map(lambda v, a, b: beta * v + (a - b), _f64(v), _f64(w0), _f64(w1))
  expected = jax.tree.map(lambda a, v: a - server_lr * v, _f64(w0), velocity)
  assert_trees_close(new.velocity, velocity, atol=1e-6, rtol=1e-6)
  assert_trees_close(new.inner.client["params"], expected, atol=1e-6, rtol=1e-6)
  assert_trees_close(new.inner.client["batch_stats"], states[1].algo.client["batch_stats"],
                     atol=1e-6, rtol=1e-6)
  assert stats.count.shape == (len(PARTS),)


def test_runs_through_experiment_as_an_algorithm_object():
  """Built from objects as in the module docstring; Experiment.run, finite metrics."""
  ds = small_digits()
  model = sfljax.get_model("lenet", input_shape=ds.input_shape, num_classes=ds.num_classes)
  inner = sfljax.build("sflv1", model, cut=2, client_optimizer=optax.sgd(0.05),
                       server_optimizer=optax.sgd(0.05),
                       executor=sfljax.execution.resolve("auto"))
  alg = FedAvgM(inner, beta=0.9, server_lr=1.0)
  assert isinstance(alg, algorithms.Algorithm)
  exp = Experiment(_config(), dataset=ds, parts=PARTS, model=model, algorithm=alg)
  assert exp.algorithm is alg and exp.cut == 2 and exp.executor == inner.executor
  assert exp.steps_per_round == 3   # ceil(20 / 8): the largest client's batches.
  history = exp.run()
  assert [h["round"] for h in history] == [1, 2]
  for h in history:
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy",
                "client_test_accuracy"):
      assert np.isfinite(h[key]), (key, h)
  assert exp.traffic == inner.traffic(exp.client_data.counts, 1, ds.input_shape,
                                      exp.client_data.y.dtype)
  mask = state_lib.per_client_mask(exp.final_state.algo)   # Recurses into the inner state.
  assert all(jax.tree.leaves(mask.inner.client_opt))
  assert not any(jax.tree.leaves(mask.velocity) + jax.tree.leaves(mask.inner.client))
  assert alg.client_variables(exp.final_state.algo) is None


def test_fedavgm_experiment_wraps_the_configs_algorithm(plain):
  """The config route builds the inner algorithm as Experiment does for plain SFLV1."""
  plain_exp = plain[0]
  exp = fedavgm_experiment(_config(), beta=0.5, server_lr=2.0, dataset=plain_exp.dataset,
                           parts=plain_exp.parts, model=plain_exp.model)
  alg = exp.algorithm
  assert isinstance(alg, FedAvgM) and (alg.beta, alg.server_lr) == (0.5, 2.0)
  assert alg.inner.composition == plain_exp.algorithm.composition == sfljax.COMPOSITIONS["sflv1"]
  assert alg.cuts == plain_exp.algorithm.cuts and alg.model is plain_exp.model
  assert alg.inner.policy == plain_exp.algorithm.policy
  assert exp.traffic == plain_exp.traffic


def test_refuses_inner_algorithms_without_fedavg_clients():
  model = sfljax.get_model("lenet")
  for name in ("sflv3", "sl"):
    with pytest.raises(ValueError, match="FedAvg"):
      FedAvgM(sfljax.build(name, model, optimizer=optax.sgd(0.1)))
  with pytest.raises(ValueError, match="beta"):
    FedAvgM(sfljax.build("sflv1", model, optimizer=optax.sgd(0.1)), beta=1.0)
