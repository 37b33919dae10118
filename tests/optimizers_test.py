"""Optimizers from names, each checked against a hand-written NumPy float64 update."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sfljax import optimizers

TARGET = np.array([0.5, -1.0, 2.0, 0.25])
START = np.array([1.0, 0.3, -0.7, 0.0])
SCALE = np.array([1.0, 3.0, 0.5, 2.0])


def _grad(p):
  """Gradient of the quadratic 0.5 * sum(SCALE * (p - TARGET)^2), in float64."""
  return SCALE * (p - TARGET)


def _run_optax(opt, steps):
  """``steps`` optax updates from START on the quadratic; the params after each."""
  params = {"w": jnp.asarray(START, jnp.float32)}
  state = opt.init(params)
  out = []
  update = jax.jit(opt.update)
  for _ in range(steps):
    g = {"w": jnp.asarray(_grad(np.asarray(params["w"], np.float64)), jnp.float32)}
    upd, state = update(g, state, params)
    params = optax.apply_updates(params, upd)
    out.append(np.asarray(params["w"], np.float64))
  return out


def _cosine(lr, t, total):
  return lr * 0.5 * (1 + math.cos(math.pi * min(t, total) / total))


def test_adamw_cosine_matches_hand_written_adamw():
  lr, wd, total, steps = 0.05, 0.1, 6, 8           # past the end: the rate stays at 0
  b1, b2, eps = 0.9, 0.999, 1e-8
  p, m, v = START.copy(), np.zeros(4), np.zeros(4)
  expected = []
  for t in range(steps):
    g = _grad(p)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat, v_hat = m / (1 - b1 ** (t + 1)), v / (1 - b2 ** (t + 1))
    p = p - _cosine(lr, t, total) * (m_hat / (np.sqrt(v_hat) + eps) + wd * p)
    expected.append(p.copy())
  got = _run_optax(optimizers.make_optimizer("adamw", lr, weight_decay=wd, schedule="cosine",
                                             total_steps=total), steps)
  np.testing.assert_allclose(np.stack(got), np.stack(expected), rtol=0, atol=2e-6)
  assert np.array_equal(got[-1], got[-2])           # cosine reached 0 at step 6


def test_sgd_momentum_step_schedule_matches_hand_written_sgd():
  lr, mu, wd, total, steps = 0.1, 0.8, 0.05, 8, 10
  # Updates 0..3 at lr, 4 and 5 at lr/10 (from 50%), 6.. at lr/100 (from 75%).
  rates = [lr] * 4 + [lr * 0.1] * 2 + [lr * 0.01] * 4
  p, trace = START.copy(), np.zeros(4)
  expected = []
  for t in range(steps):
    g = _grad(p) + wd * p                            # coupled L2
    trace = g + mu * trace
    p = p - rates[t] * trace
    expected.append(p.copy())
  got = _run_optax(optimizers.make_optimizer("sgd", lr, momentum=mu, weight_decay=wd,
                                             schedule="step", total_steps=total), steps)
  np.testing.assert_allclose(np.stack(got), np.stack(expected), rtol=0, atol=2e-6)


@pytest.mark.parametrize("total,boundaries", [
    (8, {4: 0.1, 6: 0.1}), (10, {5: 0.1, 8: 0.1}), (3, {2: 0.1, 3: 0.1}),
    (1, {1: pytest.approx(0.01)})])
def test_step_boundaries(total, boundaries):
  assert optimizers.step_boundaries(total) == boundaries
  sched = optimizers.learning_rate(1.0, "step", total)
  for t in range(total + 2):
    want = 1.0 * (0.1 if t >= 0.5 * total else 1) * (0.1 if t >= 0.75 * total else 1)
    assert float(sched(t)) == pytest.approx(want, rel=1e-6), t


def test_constant_rate_is_the_float():
  assert optimizers.learning_rate(0.01, "constant") == 0.01
  lr = 0.02
  got = _run_optax(optimizers.make_optimizer("sgd", lr), 1)[0]
  np.testing.assert_allclose(got, START - lr * _grad(START), atol=1e-7)


def test_adam_weight_decay_is_coupled_l2():
  lr, wd, eps = 0.01, 0.5, 1e-8
  g = _grad(START) + wd * START                      # first Adam step: lr * g / (|g| + eps)
  got = _run_optax(optimizers.make_optimizer("adam", lr, weight_decay=wd), 1)[0]
  np.testing.assert_allclose(got, START - lr * g / (np.abs(g) + eps), atol=1e-6)


def test_reset_keeps_schedule_count_and_zeroes_moments():
  lr, total = 0.1, 20
  opt = optimizers.make_optimizer("adam", lr, schedule="cosine", total_steps=total)
  params = {"w": jnp.asarray(START, jnp.float32)}
  state = opt.init(params)
  for _ in range(10):
    upd, state = opt.update({"w": jnp.asarray(_grad(START), jnp.float32)}, state, params)
  fresh = jax.jit(lambda p, s: optimizers.reset(opt, p, s))(params, state)
  adam_state = fresh[0]
  assert int(adam_state.count) == 0
  assert all(float(jnp.abs(x).max()) == 0 for x in (adam_state.mu["w"], adam_state.nu["w"]))
  g = np.array([2.0, -0.5, 1e-3, 4.0])
  upd, _ = opt.update({"w": jnp.asarray(g, jnp.float32)}, fresh, params)
  # Fresh Adam moments: the first update is -lr_t * g / (|g| + eps), lr_t = cosine at 10 = lr / 2.
  lr_10 = lr * 0.5 * (1 + math.cos(math.pi * 10 / 20))
  # (float32 Adam: 1 - 0.999 carries a 1e-5 relative rounding error.)
  np.testing.assert_allclose(np.asarray(upd["w"]), -lr_10 * g / (np.abs(g) + 1e-8), rtol=3e-5)
  restart, _ = opt.update({"w": jnp.asarray(g, jnp.float32)}, opt.init(params), params)
  assert float(jnp.abs(restart["w"])[0]) == pytest.approx(lr, rel=3e-5)   # the lost schedule


def test_reset_under_vmap_and_inject_hyperparams():
  sched = optax.linear_schedule(1.0, 0.0, 10)
  opt = optax.inject_hyperparams(optax.sgd)(learning_rate=sched, momentum=0.9)
  params = {"w": jnp.ones((3, 2))}                   # three models stacked
  state = jax.vmap(opt.init)(params)
  for _ in range(4):
    _, state = jax.vmap(opt.update)({"w": jnp.ones((3, 2))}, state, params)
  fresh = jax.vmap(lambda p, s: optimizers.reset(opt, p, s))(params, state)
  assert fresh.count.tolist() == [4, 4, 4]
  assert float(jnp.abs(fresh.inner_state[0].trace["w"]).max()) == 0


@pytest.mark.parametrize("make", [
    lambda: optimizers.make_optimizer("adam", 0.1, schedule="cosine", total_steps=20),
    lambda: optimizers.make_optimizer("adamw", 0.1, weight_decay=0.01, schedule="step",
                                      total_steps=8),
    lambda: optimizers.make_optimizer("sgd", 0.1, momentum=0.9),
    lambda: optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(1.0, 0.0, 10),
                                                momentum=0.9),
])
def test_compact_keeps_what_reset_reads(make):
  """reset from the compact state = reset from the full one (whose counters the
  updates moved), for one model and for stacked ones; nothing else is kept."""
  opt = make()
  params = {"w": jnp.asarray(START, jnp.float32), "b": jnp.ones((2, 3))}
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  state = opt.init(params)
  for _ in range(5):
    _, state = opt.update(grads, state, params)
  small = optimizers.compact(state)
  same = jax.tree.map(lambda a, b: a.dtype == b.dtype and np.array_equal(a, b),
                      optimizers.reset(opt, params, small), optimizers.reset(opt, params, state))
  assert all(jax.tree.leaves(same))
  full_size = sum(a.size for a in jax.tree.leaves(state))
  assert sum(a.size for a in jax.tree.leaves(small)) <= 8 < full_size   # counters only
  stacked = jax.tree.map(lambda a: jnp.stack([a, a, a]), state)
  small3 = optimizers.compact(stacked, batch_dims=1)
  assert all(a.shape[0] == 3 and a.size <= 3 * 8 for a in jax.tree.leaves(small3))
  fresh = jax.vmap(lambda s: optimizers.reset(opt, params, s))(small3)
  ref = optimizers.reset(opt, params, state)
  assert all(jax.tree.leaves(jax.tree.map(lambda a, b: np.array_equal(a, np.stack([b] * 3)),
                                          fresh, ref)))


@pytest.mark.parametrize("call,arg", [
    (lambda: optimizers.make_optimizer("lamb", 0.1), "name"),
    (lambda: optimizers.make_optimizer("sgd", 0.0), "lr"),
    (lambda: optimizers.make_optimizer("sgd", float("nan")), "lr"),
    (lambda: optimizers.make_optimizer("sgd", 0.1, momentum=1.0), "momentum"),
    (lambda: optimizers.make_optimizer("adam", 0.1, momentum=0.9), "momentum"),
    (lambda: optimizers.make_optimizer("adamw", 0.1, momentum=0.5), "momentum"),
    (lambda: optimizers.make_optimizer("sgd", 0.1, weight_decay=-1), "weight_decay"),
    (lambda: optimizers.make_optimizer("sgd", 0.1, schedule="linear"), "schedule"),
    (lambda: optimizers.make_optimizer("sgd", 0.1, schedule="cosine"), "total_steps"),
    (lambda: optimizers.learning_rate(0.1, "step", 0), "total_steps"),
    (lambda: optimizers.reset(optax.adam(0.1), {"w": jnp.ones(2)},
                              optax.sgd(0.1).init({"w": jnp.ones(2)})), "old_state"),
])
def test_errors_name_the_argument(call, arg):
  with pytest.raises(ValueError, match=f"^{arg}: "):
    call()
