"""Client-side DP-SGD: the pieces (clip, noise) and the per-example gradients
through the exchange, each against an independent computation (NumPy float64,
a whole-model per-example ``jax.grad``, the plain algorithm)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sfljax import algorithms, models, split
from sfljax.algorithms import RoundInputs
from sfljax.privacy import dpsgd

MODEL = models.SplitModel.from_modules(
    [("conv", nn.Conv(4, (3, 3))), ("relu", nn.relu), ("flat", lambda a: a.reshape((a.shape[0], -1))),
     ("fc1", nn.Dense(8)), ("relu2", nn.relu), ("head", nn.Dense(10))],
    input_shape=(6, 6, 1), num_classes=10, name="tiny_conv")
CUT, U_CUT = 3, (3, 5)   # head: conv relu flat | server: fc1 relu2 (| tail: head)
B = 4


def _data(k, n, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(k, n, 6, 6, 1)).astype(np.float32)
  y = rng.integers(0, 10, size=(k, n)).astype(np.int32)
  return jnp.asarray(x), jnp.asarray(y)


def _inputs(x, y, idx, mask, active=None, seed=3):
  k, t = idx.shape[:2]
  return RoundInputs(x, y, jnp.asarray(idx, jnp.int32), jnp.asarray(mask, bool),
                     jnp.full((k,), float(x.shape[1])),
                     jnp.tile(jnp.arange(k, dtype=jnp.int32), (t, 1)),
                     jnp.arange(k, dtype=jnp.int32), jax.random.key(seed),
                     active=None if active is None else jnp.asarray(active, bool))


def _full_batches(k, n):
  idx = np.tile(np.arange(n).reshape(1, n // B, B), (k, 1, 1))
  return idx, np.ones_like(idx, bool)


# -- the pieces ----------------------------------------------------------------

def test_clipping_against_numpy_float64():
  rng = np.random.default_rng(0)
  g = {"a": rng.normal(size=(6, 3, 2)).astype(np.float32) * 3,
       "b": rng.normal(size=(6, 5)).astype(np.float32)}
  g["a"][2] *= 1e-3   # one example under the bound: left as it is
  g["b"][2] *= 1e-3
  mask = np.array([1, 1, 1, 1, 0, 1], bool)
  flat = np.concatenate([g["a"].reshape(6, -1), g["b"]], 1).astype(np.float64)
  norms = np.linalg.norm(flat, axis=1)
  np.testing.assert_allclose(dpsgd.per_example_norms(g), norms, rtol=1e-6)
  c = 1.5
  clipped = dpsgd.clip(g, c)
  cflat = np.concatenate([np.asarray(clipped["a"]).reshape(6, -1), clipped["b"]], 1)
  assert np.all(np.linalg.norm(cflat, axis=1) <= c * (1 + 1e-6))
  np.testing.assert_allclose(cflat[2], flat[2], rtol=1e-6)   # under C: unchanged
  want = (flat * np.minimum(1, c / norms)[:, None] * mask[:, None]).sum(0)
  got = dpsgd.clipped_sum(g, mask, c)
  np.testing.assert_allclose(np.concatenate([np.ravel(got["a"]), got["b"]]), want, rtol=1e-5,
                             atol=1e-6)
  # sigma = 0: the clipped sum over the expected batch.
  out = dpsgd.privatize(g, mask, jax.random.key(0), clip=c, noise_multiplier=0.0,
                        expected_batch=4)
  np.testing.assert_allclose(np.concatenate([np.ravel(out["a"]), out["b"]]), want / 4,
                             rtol=1e-5, atol=1e-6)


def test_padded_rows_contribute_exactly_zero():
  g = {"w": jnp.ones((3, 4)) * jnp.array([[1.0], [jnp.inf], [2.0]])}
  total = dpsgd.clipped_sum({"w": jnp.where(jnp.isinf(g["w"]), 1e30, g["w"])},
                            jnp.array([True, False, True]), 1e9)
  np.testing.assert_array_equal(total["w"], np.full(4, 3.0, np.float32))


def test_noise_on_the_sum_has_std_sigma_c():
  sigma, c, n = 1.3, 0.7, 200_000
  zero = {"w": jnp.zeros((1, n))}
  out = dpsgd.privatize(zero, jnp.array([True]), jax.random.key(11), clip=c,
                        noise_multiplier=sigma, expected_batch=1)["w"]
  out = np.asarray(out, np.float64)
  # std of the sample std of n normals: sigma c / sqrt(2n); 5 of those.
  assert abs(out.std() - sigma * c) < 5 * sigma * c / np.sqrt(2 * n)
  assert abs(out.mean()) < 5 * sigma * c / np.sqrt(n)
  again = dpsgd.privatize(zero, jnp.array([True]), jax.random.key(11), clip=c,
                          noise_multiplier=sigma, expected_batch=1)["w"]
  np.testing.assert_array_equal(out, np.asarray(again, np.float64))   # keyed: reproducible


def test_settings_refuse_bad_values():
  with pytest.raises(ValueError, match="clip"):
    dpsgd.DPSGD(clip=-1.0, noise_multiplier=1.0, expected_batch=4)
  with pytest.raises(ValueError, match="noise"):
    dpsgd.DPSGD(clip=1.0, noise_multiplier=-0.1, expected_batch=4)


# -- per-example gradients through the exchange -----------------------------------

def _whole_model_per_example(variables, xb, yb, params_of):
  """Reference: per-example gradients of the whole model's loss (one example at a time)."""
  full = MODEL.full()

  def loss(params, xi, yi):
    logits = full.apply({"params": params}, xi[None], train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yi[None])[0]

  g = jax.vmap(jax.grad(loss), in_axes=(None, 0, 0))(variables["params"], xb, yb)
  return {name: g[name] for name in params_of}


@pytest.mark.parametrize("cuts", [(CUT,), U_CUT])
def test_per_example_client_gradients_equal_the_whole_model_reference(cuts):
  variables = MODEL.init(jax.random.key(1))
  x, y = _data(1, 5)
  xb, yb = x[0], y[0]
  mask = jnp.array([True, True, True, False, True])
  parts = MODEL.split_variables(variables, cuts)
  mods = MODEL.parts(cuts)
  ex = algorithms.ClientExecutor("vmap")
  smashed, _, backward = split.clients_forward_per_example(ex, mods[0], jax.tree.map(
      lambda a: a[None], parts[0]), xb[None], mask[None])
  count = jnp.sum(mask, dtype=jnp.float32)
  if len(cuts) == 1:
    _, d_a, _, _ = split.server_forward_backward(mods[1], parts[1], smashed[0], yb, mask)
    got = backward(d_a[None], count[None])
    got = jax.tree.map(lambda a: a[0], got)
  else:
    out, vjp_fn, _ = split.server_body_forward(mods[1], parts[1], smashed[0], mask)
    tail_g, d_out, _, _ = split.tail_forward_backward_per_example(mods[2], parts[2], out, yb,
                                                                  mask)
    _, d_a = split.server_body_backward(vjp_fn, d_out)
    got = {**jax.tree.map(lambda a: a[0], backward(d_a[None], count[None])), **tail_g}
  names = list(parts[0]["params"]) + (list(parts[2]["params"]) if len(cuts) == 2 else [])
  want = _whole_model_per_example(variables, xb, yb, names)
  for name in names:
    for leaf_got, leaf_want in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name])):
      real = np.asarray(mask)
      np.testing.assert_allclose(np.asarray(leaf_got)[real], np.asarray(leaf_want)[real],
                                 rtol=2e-5, atol=1e-6)
      np.testing.assert_array_equal(np.asarray(leaf_got)[~real], 0.0)


# -- the algorithms ---------------------------------------------------------------

def _round(name, privacy, inp, cut=CUT, lr=0.1):
  alg = algorithms.build(name, MODEL, cut=cut if name not in ("fl", "centralized") else None,
                         optimizer=optax.sgd(lr), privacy=privacy)
  state = alg.init(MODEL.init(jax.random.key(1)), inp.idx.shape[0])
  return alg, jax.jit(alg.round)(state, inp)


@pytest.mark.parametrize("name,cut", [("sflv2", CUT), ("sl", CUT), ("sflv1", U_CUT),
                                      ("fl", None)])
def test_no_noise_and_a_huge_clip_is_the_plain_step(name, cut):
  x, y = _data(3, 8)
  inp = _inputs(x, y, *_full_batches(3, 8))
  big = dpsgd.DPSGD(clip=1e9, noise_multiplier=0.0, expected_batch=B)
  _, (plain, _) = _round(name, None, inp, cut)
  _, (private, _) = _round(name, big, inp, cut)
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(private)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)


def test_one_client_sflv1_step_is_dp_sgd_on_the_client_part_and_plain_on_the_server():
  x, y = _data(1, B)
  idx, mask = _full_batches(1, B)
  mask[0, 0, 1] = False
  inp = _inputs(x, y, idx, mask)
  c, sigma = 0.05, 0.8
  alg, (state, _) = _round("sflv1", dpsgd.DPSGD(c, sigma, B), inp, lr=1.0)
  variables = MODEL.init(jax.random.key(1))
  head = list(MODEL.split_variables(variables, (CUT,))[0]["params"])
  per_ex = _whole_model_per_example(variables, x[0], y[0], head)
  flat = np.concatenate([np.asarray(l, np.float64).reshape(B, -1)
                         for l in jax.tree.leaves(per_ex)], 1)
  norms = np.linalg.norm(flat, axis=1)
  assert np.all(norms[mask[0, 0]] > c)   # the clip bites
  f = np.minimum(1, c / norms) * mask[0, 0]
  clipped = jax.tree.map(lambda g: np.tensordot(f, np.asarray(g, np.float64), 1), per_ex)
  noise_key = jax.random.fold_in(algorithms.batch_key(inp, 0, 0), 4)
  noisy = dpsgd.add_noise(jax.tree.map(jnp.zeros_like, clipped), noise_key, sigma * c)
  for name in head:
    for p0, g, z, p1 in zip(jax.tree.leaves(variables["params"][name]),
                            jax.tree.leaves(clipped[name]), jax.tree.leaves(noisy[name]),
                            jax.tree.leaves(state.client["params"][name])):
      np.testing.assert_allclose(p1, np.asarray(p0) - (g + np.asarray(z)) / B, rtol=1e-4,
                                 atol=1e-6)
  # The server side is not private: its plain mean gradient over the real samples.
  full = MODEL.full()

  def loss(params):
    logits = full.apply({"params": params}, x[0], train=True)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, y[0])
    return jnp.sum(ce * mask[0, 0]) / mask[0, 0].sum()

  g = jax.grad(loss)(variables["params"])
  server = MODEL.split_variables(variables, (CUT,))[1]["params"]
  for name in server:
    for p0, gi, p1 in zip(jax.tree.leaves(server[name]), jax.tree.leaves(g[name]),
                          jax.tree.leaves(state.server["params"][name])):
      np.testing.assert_allclose(p1, p0 - gi, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", ["sflv1", "fl"])
def test_an_active_step_with_an_empty_draw_releases_noise(name):
  x, y = _data(2, B)
  idx, mask = _full_batches(2, B)
  mask[1] = False                          # client 1 drew nobody
  private = dpsgd.DPSGD(1.0, 1.0, B)
  _, (state, stats) = _round(name, private, _inputs(x, y, idx, mask, active=np.ones((2, 1))))
  assert float(stats.count[1]) == 0
  # SFLV1/FL average the two clients: client 1's noise-only update moves the average
  # away from client 0's update alone (computed with client 1 inactive).
  _, (alone, _) = _round(name, private, _inputs(x, y, idx, mask, active=[[1], [0]]))
  moved = [float(jnp.max(jnp.abs(a - b))) for a, b in zip(
      jax.tree.leaves(state), jax.tree.leaves(alone))]
  assert max(moved) > 1e-4


def test_batchnorm_model_is_refused():
  bn = models.get_model("lenet", input_shape=(28, 28, 1), num_classes=10, norm="batch")
  with pytest.raises(ValueError, match="BatchNorm"):
    algorithms.build("sflv1", bn, optimizer=optax.sgd(0.1),
                     privacy=dpsgd.DPSGD(1.0, 1.0, 8))


def test_every_client_and_step_draws_its_own_noise():
  # Two clients with the same data and batches keep their own models (sflv3): only
  # their noise tells them apart. Same seed: the same numbers again.
  x, y = _data(1, 2 * B)
  x, y = jnp.concatenate([x, x]), jnp.concatenate([y, y])
  inp = _inputs(x, y, *_full_batches(2, 2 * B))
  private = dpsgd.DPSGD(1.0, 1.0, B)
  _, (state, _) = _round("sflv3", private, inp)
  w = state.client["params"]["conv"]["kernel"]
  assert float(jnp.max(jnp.abs(w[0] - w[1]))) > 1e-3
  _, (again, _) = _round("sflv3", private, inp)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)


def test_one_client_dp_sflv1_is_dp_sgd_centralized():
  # U-shaped with a parameter-free server body (relu, flat): every parameter is on the
  # client, so DP-SFLV1 with one client must be DP-SGD on the whole model -- the same
  # samples, clip, noise keys -- computed here without any split.
  x, y = _data(1, 2 * B)
  idx, mask = _full_batches(1, 2 * B)
  mask[0, 1, 2] = False
  inp = _inputs(x, y, idx, mask)
  private = dpsgd.DPSGD(0.05, 1.3, B)
  _, (split_state, split_stats) = _round("sflv1", private, inp, cut=(1, 3))
  alg, (central, central_stats) = _round("centralized", private, inp)
  assert not jax.tree.leaves(split_state.server["params"])
  merged = MODEL.merge_variables((split_state.client, split_state.server))["params"]
  for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(central.model["params"])):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(split_stats.loss_sum, central_stats.loss_sum, rtol=1e-5)
