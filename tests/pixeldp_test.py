"""Tests for sfljax.privacy.pixeldp, each against an independent computation."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import scipy.stats

from sfljax.conv import Conv
from sfljax.models import DenseBlock, SplitModel, apply_part, get_model
from sfljax.privacy import pixeldp as P

LENET_SHAPE = (12, 12, 1)

# Compilation dominates these tests on CPU (each program drawing random numbers
# compiles threefry): variables are drawn with NumPy, models are built once,
# and jitted functions take the module as a static (hashable) argument.


@functools.lru_cache(maxsize=None)
def _lenet():
  return get_model("lenet", input_shape=LENET_SHAPE)


@functools.lru_cache(maxsize=None)
def _dense_model(n_in=10, n_hidden=16):
  return SplitModel.from_modules([("fc1", DenseBlock(n_hidden)),
                                  ("fc2", DenseBlock(4, relu=False))],
                                 input_shape=(n_in,), num_classes=4, name="mlp")


def _init(model, seed=0):
  """Variables of ``model``'s structure drawn with NumPy: kernels N(0, 1/fan_in),
  biases and norm scales/offsets around 0.1 / 1."""
  rs = np.random.RandomState(seed)

  def draw(path, s):
    z = rs.standard_normal(s.shape).astype(np.float32)
    if path[-1].key == "kernel":
      return jnp.asarray(z / np.sqrt(np.prod(s.shape[:-1])))
    return jnp.asarray(1.0 + 0.1 * z if path[-1].key == "scale" else 0.1 * z)

  return jax.tree_util.tree_map_with_path(draw, jax.eval_shape(model.init, jax.random.key(0)))


@functools.partial(jax.jit, static_argnames=("module", "train"))
def _run(module, variables, x, rng=None, *, train):
  """``apply_part(module, ...)[0]``, jitted per (module, train)."""
  return apply_part(module, variables, x, train=train, rng=rng)[0]


def _scaled(params, factor):
  """Every kernel times ``factor`` (biases unchanged)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, a: a * factor if path[-1].key == "kernel" else a, params)


# ---------------------------------------------------------------------------
# Bounds against NumPy
# ---------------------------------------------------------------------------


def test_dense_bounds_are_the_exact_operator_norms():
  w = np.random.RandomState(0).standard_normal((30, 20)).astype(np.float32)
  params = {"fc": {"dense": {"kernel": jnp.asarray(w), "bias": jnp.zeros(20)}}}
  m = w.astype(np.float64).T  # the operator x -> x @ w as a matrix on column vectors
  l1, l2 = np.linalg.norm(m, 1), np.linalg.norm(m, 2)  # max column abs-sum, largest sv
  assert P.sensitivity_bound(params, "laplace") == pytest.approx(l1, rel=1e-12)
  assert P.sensitivity_bound(params, 2) == pytest.approx(l2, rel=1e-12)
  jitted = P.layer_bounds(params, 1)["fc"], P.layer_bounds(params, "gaussian")["fc"]
  np.testing.assert_allclose(np.asarray(jitted, np.float64), [l1, l2], rtol=2e-6)


def _conv_matrix(kernel, hw, padding):
  """The stride-1 conv on an (H, W, Cin) input as an explicit NumPy matrix."""
  kh, kw, cin, cout = kernel.shape
  h, w = hw
  lo_h, lo_w = ((kh - 1) // 2, (kw - 1) // 2) if padding == "SAME" else (0, 0)
  oh, ow = (h, w) if padding == "SAME" else (h - kh + 1, w - kw + 1)
  m = np.zeros((oh, ow, cout, h, w, cin))
  for a in range(oh):
    for b in range(ow):
      for i in range(kh):
        for j in range(kw):
          r, c = a + i - lo_h, b + j - lo_w
          if 0 <= r < h and 0 <= c < w:
            m[a, b, :, r, c, :] += kernel[i, j].T
  return m.reshape(oh * ow * cout, h * w * cin)


@pytest.mark.parametrize("ksize,cin,cout,padding", [(3, 2, 4, "SAME"), (5, 1, 6, "SAME"),
                                                    (3, 3, 2, "VALID")])
def test_conv_bounds_dominate_the_exact_operator_norms(ksize, cin, cout, padding):
  rs = np.random.RandomState(ksize + cin)
  kernel = rs.standard_normal((ksize, ksize, cin, cout)).astype(np.float32)
  hw = (7, 6)
  m = _conv_matrix(kernel.astype(np.float64), hw, padding)
  # The explicit matrix is the library's conv (checks the independent construction).
  x = rs.standard_normal((1,) + hw + (cin,)).astype(np.float32)
  y = Conv(cout, (ksize, ksize), padding=padding, use_bias=False).apply(
      {"params": {"kernel": jnp.asarray(kernel)}}, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y).ravel(), m @ x.ravel(), rtol=1e-4, atol=1e-4)
  params = {"c": {"conv": {"kernel": jnp.asarray(kernel), "bias": jnp.zeros(cout)}}}
  l1, l2 = np.linalg.norm(m, 1), np.linalg.norm(m, 2)
  b1, b2 = P.sensitivity_bound(params, 1), P.sensitivity_bound(params, 2)
  assert b1 >= l1 * (1 - 1e-12) and b2 >= l2 * (1 - 1e-12)
  if padding == "SAME":  # an interior pixel is read by every tap: the L1 bound is exact
    assert b1 == pytest.approx(l1, rel=1e-12)
  assert b2 < 3 * l2  # an upper bound, but not a vacuous one


# ---------------------------------------------------------------------------
# Empirical sensitivity of the projected pre-noise part
# ---------------------------------------------------------------------------


def _max_ratios(f, param_sets, in_shape, p, seed=0):
  """Per params in ``param_sets``: the largest ||f(x) - f(x')||_p / ||x - x'||_p
  found over random pairs, pairs found by gradient ascent on the ratio (over x
  and a direction u, with ||x - x'||_p = 0.3 so that rounding cannot dominate)
  and single-coordinate steps of +-0.05 (the L1 worst case within a linear
  region) from a random positive point and from the ascent's points."""
  norm = lambda a: jnp.sum(jnp.abs(a).reshape(a.shape[0], -1) ** p, axis=1) ** (1 / p)
  ratio = lambda prm, a, b: norm(f(prm, a) - f(prm, b)) / norm(a - b)
  step_to = lambda u: 0.3 * u / norm(u).reshape((-1,) + (1,) * len(in_shape))
  opt = optax.adam(0.05)

  def objective(z, prm):
    xs, u = z
    return -jnp.sum(jnp.log(norm(f(prm, xs + step_to(u)) - f(prm, xs)) + 1e-12))

  @jax.jit
  def search(prm, pairs, z):
    def step(carry, _):
      z, s = carry
      upd, s = opt.update(jax.grad(objective)(z, prm), s, z)
      return (optax.apply_updates(z, upd), s), None
    (z, _), _ = jax.lax.scan(step, (z, opt.init(z)), None, length=100)
    # Single-coordinate steps (both signs) from the points the ascent found.
    base = jnp.repeat(z[0], n_in, axis=0)
    coords = jnp.tile(jnp.eye(n_in, dtype=z[0].dtype), (z[0].shape[0], 1)).reshape(base.shape)
    found = [ratio(prm, a, b) for a, b in pairs] + [ratio(prm, z[0], z[0] + step_to(z[1])),
                                                    ratio(prm, base, base + 0.05 * coords),
                                                    ratio(prm, base, base - 0.05 * coords)]
    return jnp.max(jnp.concatenate(found))

  rs = np.random.RandomState(seed)
  n_in = int(np.prod(in_shape))
  x = rs.standard_normal((32,) + in_shape).astype(np.float32)
  x0 = np.repeat(np.abs(rs.standard_normal((1,) + in_shape)).astype(np.float32), n_in, 0)
  pairs = [(x, x + s * rs.standard_normal(x.shape).astype(np.float32)) for s in (1.0, 0.05)]
  pairs.append((x0, x0 + 0.05 * np.eye(n_in, dtype=np.float32).reshape(x0.shape)))
  z0 = tuple(jnp.asarray(rs.standard_normal((12,) + in_shape), jnp.float32) for _ in range(2))
  return [float(search(prm, pairs, z0)) for prm in param_sets]


@pytest.mark.parametrize("case,mechanism,sensitivity", [
    ("lenet_conv1", "laplace", 1.0), ("lenet_conv1", "gaussian", 0.5),
    ("mlp_fc1", "laplace", 0.5), ("mlp_fc1", "gaussian", 1.0)])
def test_projection_bounds_the_empirical_sensitivity(case, mechanism, sensitivity):
  # The dense kernels are shaped so that the other norm's projection would not
  # suffice: wide (10 -> 16) for L1, tall (64 -> 4) for L2.
  shape = (10, 16) if mechanism == "laplace" else (64, 4)
  base, after = (_lenet(), "conv1") if case == "lenet_conv1" else (_dense_model(*shape), "fc1")
  delta = 1e-5 if mechanism == "gaussian" else None
  model = P.insert_noise_layer(base, after, 0.5, mechanism, delta, sensitivity)
  pre = P.pre_noise_blocks(model)
  part = model.parts(len(pre))[0]
  f = lambda prm, a: part.apply({"params": prm}, a, train=False)
  params = _scaled(model.subset(_init(model, 1), pre)["params"], 8.0)
  projected = P.model_projection(model)(params)
  assert P.model_sensitivity(model, projected) <= sensitivity
  unprojected, kept = _max_ratios(f, [params, projected], model.input_shape,
                                  1 if mechanism == "laplace" else 2)
  assert unprojected > 1.5 * sensitivity  # large weights exceed it: the check can fail
  assert kept <= sensitivity * (1 + 1e-4)


# ---------------------------------------------------------------------------
# The noise
# ---------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("layer", "train"))
def _noise(layer, x, key, train=True):
  return layer.apply({}, x, train=train, rngs={"dropout": key})


@pytest.mark.parametrize("mechanism", ["laplace", "gaussian"])
def test_noise_has_the_stated_distribution(mechanism):
  eps, sens, delta = 0.5, 1.5, (1e-5 if mechanism == "gaussian" else None)
  layer = P.PixelDPNoise(eps, mechanism, delta, sens)
  x = jnp.asarray(np.random.RandomState(0).standard_normal((200, 100)), jnp.float32)
  z = np.asarray(_noise(layer, x, jax.random.key(7)) - x, np.float64).ravel()
  if mechanism == "laplace":
    b = sens / eps
    var, ref = 2 * b * b, scipy.stats.laplace(scale=b)
    wrong = scipy.stats.norm(scale=math.sqrt(2) * b)
  else:
    sigma = sens * math.sqrt(2 * math.log(1.25 / delta)) / eps
    var, ref, wrong = sigma ** 2, scipy.stats.norm(scale=sigma), scipy.stats.laplace(
        scale=sigma / math.sqrt(2))
  assert P.noise_scale(eps, mechanism, delta, sens) == pytest.approx(math.sqrt(
      var / (2 if mechanism == "laplace" else 1)), rel=1e-12)
  assert abs(z.mean()) < 5 * math.sqrt(var / z.size)
  assert z.var() == pytest.approx(var, rel=0.06)
  assert scipy.stats.kstest(z, ref.cdf).pvalue > 1e-3
  assert scipy.stats.kstest(z, wrong.cdf).pvalue < 1e-6  # same variance, other shape: rejected


def test_noise_is_fresh_per_example_and_reproducible():
  layer = P.PixelDPNoise(1.0)
  x = jnp.ones((2, 3, 3, 2))
  a = _noise(layer, x, jax.random.key(0))
  assert not np.allclose(a[0], a[1])  # two identical examples, different noise
  assert len(np.unique(np.asarray(a))) == a.size  # and different per element
  np.testing.assert_array_equal(a, _noise(layer, x, jax.random.key(0)))
  assert not np.allclose(a, _noise(layer, x, jax.random.key(1)))
  np.testing.assert_array_equal(a, _noise(layer, x, jax.random.key(0), train=False))
  quiet = P.PixelDPNoise(1.0, eval_noise=False)
  np.testing.assert_array_equal(quiet.apply({}, x, train=False), x)


def test_infinite_epsilon_is_the_identity_bit_for_bit():
  base = _lenet()
  model = P.insert_noise_layer(base, "conv1", math.inf)
  variables = _init(base)
  assert (jax.tree.structure(jax.eval_shape(model.init, jax.random.key(0)))
          == jax.tree.structure(variables))
  x = jnp.asarray(np.random.RandomState(0).standard_normal((3,) + LENET_SHAPE), jnp.float32)
  for train, rng in ((False, None), (True, jax.random.key(3))):
    want = _run(base.full(), variables, x, rng, train=train)
    got = _run(model.full(), variables, x, rng, train=train)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  for layer in (P.PixelDPNoise(math.inf), P.PixelDPNoise(math.inf, "gaussian", 1e-5)):
    for train in (False, True):
      assert layer.apply({}, x, train=train) is x  # no key needed, x itself


# ---------------------------------------------------------------------------
# Optimizer wrapper, model surgery, prediction
# ---------------------------------------------------------------------------


def test_projected_optimizer_keeps_params_projected():
  model = P.insert_noise_layer(_lenet(), "fc1", 0.5, "gaussian", 1e-5, sensitivity=2.0)
  params = _init(model)["params"]
  opt, plain = P.projected(optax.sgd(0.5, momentum=0.9), P.model_projection(model)), optax.sgd(
      0.5, momentum=0.9)
  state, plain_state, plain_params = opt.init(params), plain.init(params), params
  step, plain_step = jax.jit(opt.update), jax.jit(plain.update)
  rs = np.random.RandomState(0)
  for _ in range(4):
    grads = jax.tree.map(lambda a: jnp.asarray(3 * rs.standard_normal(a.shape), a.dtype), params)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert P.model_sensitivity(model, params) <= 2.0
    plain_updates, plain_state = plain_step(grads, plain_state, plain_params)
    plain_params = optax.apply_updates(plain_params, plain_updates)
  assert P.model_sensitivity(model, plain_params) > 2.0  # without the projection: exceeded
  for block in ("fc2", "fc3"):  # blocks after the noise: the plain optimizer's steps exactly
    for a, b in zip(jax.tree.leaves(params[block]), jax.tree.leaves(plain_params[block])):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with pytest.raises(ValueError, match="needs the params"):
    opt.update(grads, state)


def test_insert_noise_layer_keeps_the_cut_and_runs():
  base = _lenet()  # blocks conv1 conv2 fc1 fc2 fc3, default cut 2 (after conv2)
  cases = {"conv1": ("conv1", "pixeldp", "conv2"), 2: ("conv1", "conv2", "pixeldp"),
           "fc1": ("conv1", "conv2"), 0: ("pixeldp", "conv1", "conv2"), "3": ("conv1", "conv2")}
  for after, client in cases.items():
    model = P.insert_noise_layer(base, after, 1.0)
    assert model.needs_rng and not base.needs_rng and model.num_blocks == 6
    assert model.parts(model.resolve_cuts())[0].names == client
  assert P.pre_noise_blocks(P.insert_noise_layer(base, 3, 1.0)) == ("conv1", "conv2", "fc1")
  # A forward pass: the parts of the split draw the full model's noise for one key.
  model = P.insert_noise_layer(base, "conv1", 1.0)
  variables = _init(base)
  x = jnp.asarray(np.random.RandomState(1).standard_normal((2,) + LENET_SHAPE), jnp.float32)
  head, tail = model.parts(model.resolve_cuts())
  key = jax.random.key(5)
  smashed = _run(head, model.subset(variables, head.names), x, key, train=True)
  out = _run(tail, model.subset(variables, tail.names), smashed, key, train=True)
  full = _run(model.full(), variables, x, key, train=True)
  assert out.shape == (2, 10) and np.all(np.isfinite(out))
  np.testing.assert_allclose(out, full, rtol=1e-5, atol=1e-6)
  assert not np.allclose(full, _run(model.full(), variables, x, jax.random.key(6), train=True))
  # A PixelDPNoise block given to from_modules is detected as drawing random numbers.
  custom = SplitModel.from_modules([("fc1", DenseBlock(8)), ("noise", P.PixelDPNoise(1.0)),
                                    ("fc2", DenseBlock(3, relu=False))],
                                   input_shape=(5,), num_classes=3)
  assert custom.needs_rng and P.pre_noise_blocks(custom) == ("fc1",)


def test_predict_with_draws_is_the_mean_softmax():
  model = P.insert_noise_layer(_dense_model(), "fc1", 0.5)
  variables = _init(model)
  x = jnp.asarray(np.random.RandomState(2).standard_normal((3, 10)), jnp.float32)
  apply_fn = P.noisy_apply(model.full())
  key = jax.random.key(9)
  got = P.predict_with_draws(apply_fn, variables, x, key, draws=5)
  one = jax.jit(lambda k: jax.nn.softmax(apply_fn(variables, x, k)))
  want = np.mean([one(k) for k in jax.random.split(key, 5)], 0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.sum(got, -1), 1.0, rtol=1e-5)
  assert P.DEFAULT_DRAWS == 300
  with pytest.raises(ValueError, match="needs a 'dropout' key"):
    apply_part(model.full(), variables, x, train=False)
  with pytest.raises(ValueError, match="draws"):
    P.predict_with_draws(apply_fn, variables, x, key, draws=0)


# ---------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,match", [
    (dict(epsilon=0.0), "epsilon must be a number > 0"),
    (dict(epsilon=-1.0), "epsilon must be a number > 0"),
    (dict(epsilon=float("nan")), "epsilon must be a number > 0"),
    (dict(epsilon=1.0, mechanism="gaussian"), "needs delta"),
    (dict(epsilon=2.0, mechanism="gaussian", delta=1e-5), "epsilon <= 1"),
    (dict(epsilon=1.0, mechanism="gaussian", delta=1.5), "delta must be in"),
    (dict(epsilon=1.0, delta=1e-5), "laplace mechanism is \\(epsilon, 0\\)"),
    (dict(epsilon=1.0, mechanism="uniform"), "unknown mechanism"),
    (dict(epsilon=1.0, sensitivity=0.0), "sensitivity must be"),
])
def test_bad_noise_parameters_are_refused(kwargs, match):
  with pytest.raises(ValueError, match=match):
    P.PixelDPNoise(**kwargs)
  with pytest.raises(ValueError, match=match):
    P.insert_noise_layer(_lenet(), "conv1", **kwargs)


@pytest.mark.parametrize("build,after,match", [
    (lambda: get_model("lenet", input_shape=LENET_SHAPE, norm="batch"), "conv1", "BatchNorm"),
    (lambda: get_model("alexnet", input_shape=(8, 8, 1)), "conv2", "BatchNorm"),
    (lambda: get_model("lenet", input_shape=LENET_SHAPE, norm="group"), "conv2", "group"),
    (lambda: get_model("lenet", input_shape=LENET_SHAPE, dropout=0.5), "fc2", "dropout"),
    (lambda: get_model("resnet18", input_shape=(8, 8, 1), norm="none"), "stem", "ResNetStem"),
    (_lenet, "fc3", "not after the last block"),
    (_lenet, "conv9", "unknown block"),
    (_lenet, True, "block count or a block name"),
])
def test_bad_placements_are_refused(build, after, match):
  with pytest.raises(ValueError, match=match):
    P.insert_noise_layer(build(), after, 1.0)


def test_other_bad_input_is_refused():
  lenet = _lenet()
  with pytest.raises(ValueError, match="sensitivity is 1"):
    P.insert_noise_layer(lenet, 0, 1.0, sensitivity=0.5)
  with pytest.raises(ValueError, match="already has"):
    P.insert_noise_layer(P.insert_noise_layer(lenet, 1, 1.0), 3, 1.0, name="second")
  with pytest.raises(ValueError, match="expected exactly one"):
    P.model_projection(lenet)
  params = _init(lenet)["params"]
  with pytest.raises(ValueError, match="none of the pre-noise blocks"):
    P.project({"fc3": params["fc3"]}, 1, blocks=("conv1",))
  with pytest.raises(ValueError, match="lack the pre-noise"):
    P.sensitivity_bound({"fc3": params["fc3"]}, 1, blocks=("conv1",))
  bn = _init(get_model("lenet", input_shape=LENET_SHAPE, norm="group"))
  with pytest.raises(ValueError, match="exactly one conv"):
    P.sensitivity_bound(bn["params"], 2, blocks=("conv1",))
  with pytest.raises(ValueError, match="norm"):
    P.sensitivity_bound(params, 3)
