"""NoPeek through the vjp exchange: a one-client round equals plain SGD on the
whole model's loss plus the distance-correlation penalty, computed here by a
whole-model ``jax.grad`` with a direct distance correlation of its own."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sfljax import algorithms, models
from sfljax.algorithms import RoundInputs
from sfljax.leakage import NoPeek
from sfljax.privacy import dpsgd

MODEL = models.SplitModel.from_modules(
    [("conv", nn.Conv(3, (3, 3))), ("relu", nn.relu),
     ("flat", lambda a: a.reshape((a.shape[0], -1))),
     ("fc1", nn.Dense(8)), ("relu2", nn.relu), ("head", nn.Dense(10))],
    input_shape=(6, 6, 1), num_classes=10, name="tiny_conv")
CUT, U_CUT = 3, (3, 5)
B = 8


def _dcor(x, z):
  """Distance correlation written out (V-statistic), independent of sfljax.leakage."""
  def centred(a):
    a = a.reshape(a.shape[0], -1)
    d2 = jnp.sum((a[:, None] - a[None]) ** 2, -1)
    d = jnp.where(d2 > 0, jnp.sqrt(jnp.where(d2 > 0, d2, 1.0)), 0.0)
    return d - d.mean(0) - d.mean(1)[:, None] + d.mean()
  a, b = centred(x), centred(z)
  return jnp.sqrt(jnp.mean(a * b) / jnp.sqrt(jnp.mean(a * a) * jnp.mean(b * b)))


def _inputs(x, y, mask):
  k = x.shape[0]
  idx = np.tile(np.arange(B).reshape(1, 1, B), (k, 1, 1))
  return RoundInputs(jnp.asarray(x), jnp.asarray(y), jnp.asarray(idx, jnp.int32),
                     jnp.asarray(mask, bool), jnp.full((k,), float(B)),
                     jnp.tile(jnp.arange(k, dtype=jnp.int32), (1, 1)),
                     jnp.arange(k, dtype=jnp.int32), jax.random.key(0))


@pytest.mark.parametrize("cut", [(CUT,), U_CUT])
def test_one_client_round_is_sgd_on_loss_plus_penalty(cut):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(1, B, 6, 6, 1)).astype(np.float32)
  y = rng.integers(0, 10, size=(1, B)).astype(np.int32)
  mask = np.ones((1, 1, B), bool)
  mask[0, 0, 5] = False            # a padded row: left out of the loss and the penalty
  w, lr = 0.7, 0.5
  alg = algorithms.build("sflv1", MODEL, cut=cut, optimizer=optax.sgd(lr),
                         smashed_penalty=NoPeek(w))
  variables = MODEL.init(jax.random.key(1))
  state, _ = jax.jit(alg.round)(alg.init(variables, 1), _inputs(x, y, mask))

  real = mask[0, 0]
  xr, yr = x[0][real], y[0][real]
  head = MODEL.parts(cut)[0]
  full = MODEL.full()

  def objective(params, penalty):
    logits = full.apply({"params": params}, xr, train=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, yr).mean()
    smashed = head.apply({"params": params}, xr, train=True)
    return ce + penalty * _dcor(xr, smashed)

  g = jax.grad(objective)(variables["params"], w)
  g0 = jax.grad(objective)(variables["params"], 0.0)
  client, server = alg._split(variables)
  got = {**state.client["params"], **state.server["params"]}
  for name in variables["params"]:
    for p0, gi, p1 in zip(jax.tree.leaves(variables["params"][name]), jax.tree.leaves(g[name]),
                          jax.tree.leaves(got[name])):
      np.testing.assert_allclose(p1, np.asarray(p0) - lr * np.asarray(gi), rtol=1e-4,
                                 atol=2e-6)
  # The penalty reaches the client's head only: the server's gradient is the plain one.
  for name in server["params"]:
    for a, b in zip(jax.tree.leaves(g[name]), jax.tree.leaves(g0[name])):
      np.testing.assert_array_equal(a, b)
  moved = max(float(jnp.max(jnp.abs(a - b))) for n in client["params"]
              for a, b in zip(jax.tree.leaves(g[n]), jax.tree.leaves(g0[n])))
  assert moved > 1e-4   # the penalty changed the head's gradient


def test_penalty_and_dp_are_refused_together():
  with pytest.raises(ValueError, match="smashed_penalty"):
    algorithms.build("sflv1", MODEL, cut=CUT, optimizer=optax.sgd(0.1),
                     smashed_penalty=NoPeek(1.0), privacy=dpsgd.DPSGD(1.0, 1.0, B))
  with pytest.raises(ValueError, match="no cut"):
    algorithms.build("fl", MODEL, optimizer=optax.sgd(0.1), smashed_penalty=NoPeek(1.0))
  with pytest.raises(ValueError, match=">= 0"):
    NoPeek(-1.0)
