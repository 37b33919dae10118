"""Tests for sfljax.models: splitting, vjp exchange, batch-norm masking, vmap."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sfljax import models
from sfljax.models import apply_part, get_model

TOL = dict(rtol=1e-5, atol=1e-5)

# (model name, input shape) configurations exercised by the split tests.
CONFIGS = [
    ("lenet", (28, 28, 1)),
    ("lenet", (32, 32, 3)),
    ("alexnet", (32, 32, 3)),
    ("vgg16", (32, 32, 3)),
    ("resnet18", (32, 32, 3)),
]


def _random_variables(model, seed=0, blocks=None):
  """Random variables of the right structure, drawn with numpy (fast on CPU).

  Shapes come from ``jax.eval_shape(model.init, ...)``; weights are scaled by
  1/sqrt(fan_in) and the norm parameters / running statistics are made
  non-trivial so that eval mode differs from train mode.  ``blocks``
  restricts the result to those blocks (e.g. one part's block names).
  """
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  if blocks is not None:
    shapes = {col: {b: tree[b] for b in blocks if b in tree} for col, tree in shapes.items()}
  rs = np.random.RandomState(seed)

  def draw(path, s):
    names = [getattr(p, "key", "") for p in path]
    noise = rs.standard_normal(s.shape).astype(np.float32)
    if names[-1] == "kernel":
      return noise / np.sqrt(np.prod(s.shape[:-1]))
    if names[0] == "batch_stats":
      return np.exp(0.3 * noise) if names[-1] == "var" else 0.1 * noise
    if names[-1] == "scale":
      return 1.0 + 0.1 * noise
    return 0.1 * noise  # biases

  return jax.tree_util.tree_map(jnp.asarray, jax.tree_util.tree_map_with_path(draw, shapes))


def _setup(name, shape, batch=3, norm=None, num_classes=10, seed=0):
  model = get_model(name, input_shape=shape, num_classes=num_classes, norm=norm)
  variables = _random_variables(model, seed)
  x = jnp.asarray(np.random.RandomState(seed + 100).standard_normal((batch,) + shape),
                  jnp.float32)
  return model, variables, x


def _assert_tree_close(a, b, **tol):
  assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), **(tol or TOL))


def _compose(model, variables, cuts, x, train, mask=None):
  parts = model.parts(cuts)
  part_vars = model.split_variables(variables, cuts)
  stats = []
  for module, pv in zip(parts, part_vars):
    x, new_stats = apply_part(module, pv, x, train=train, mask=mask)
    stats.append({"params": {}, "batch_stats": new_stats})
  merged = model.merge_variables(stats)
  return x, merged["batch_stats"]


# ---------------------------------------------------------------------------
# 1. Composition of parts == unsplit model.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,shape", CONFIGS, ids=lambda v: str(v))
def test_parts_compose_to_full_model(name, shape):
  model, variables, x = _setup(name, shape)
  n, d = model.num_blocks, model.default_cut
  full = model.full()
  y_eval = full.apply(variables, x, train=False)
  y_train, upd = full.apply(variables, x, train=True, mutable=["batch_stats"])
  has_bn = name != "lenet"
  assert ("batch_stats" in variables) == has_bn == model.has_batch_stats
  if has_bn:  # the train-mode update must actually change the statistics
    diff = jax.tree_util.tree_map(lambda a, b: jnp.max(jnp.abs(a - b)),
                                  upd["batch_stats"], variables["batch_stats"])
    assert min(jax.tree_util.tree_leaves(diff)) > 1e-4
  assert y_eval.shape == (x.shape[0], 10)
  assert np.allclose(y_eval, y_train) != has_bn

  for cuts in [(d,), (1,), (n - 1,), (1, n - 1), (d, d + 1)]:
    parts = model.parts(cuts)
    assert len(parts) == len(cuts) + 1
    assert sum(len(p.names) for p in parts) == n
    part_vars = model.split_variables(variables, cuts)
    for pv in part_vars:
      assert "params" in pv and (("batch_stats" in pv) == has_bn)
    _assert_tree_close(model.merge_variables(part_vars), variables)

    out, stats = _compose(model, variables, cuts, x, train=False)
    np.testing.assert_allclose(out, y_eval, **TOL)
    if has_bn:
      _assert_tree_close(stats, variables["batch_stats"])
    out, stats = _compose(model, variables, cuts, x, train=True)
    np.testing.assert_allclose(out, y_train, **TOL)
    if has_bn:
      _assert_tree_close(stats, upd["batch_stats"])


def test_split_variables_structure():
  model = get_model("resnet18", input_shape=(32, 32, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0))
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]) == set(model.block_names)
  client, server = model.split_variables(variables, model.default_cut)
  assert set(client["params"]) == {"stem", "layer1_0"}
  assert set(client["batch_stats"]) == {"stem", "layer1_0"}
  assert "layer1_1" in server["params"] and "head" in server["params"]
  assert "head" not in server["batch_stats"]  # the head has no batch norm
  head_only = model.split_variables(variables, model.num_blocks - 1)[1]
  assert head_only["batch_stats"] == {}
  lenet = get_model("lenet")
  assert set(jax.eval_shape(lenet.init, jax.random.key(0))) == {"params"}
  with pytest.raises(ValueError, match="more than one part"):
    model.merge_variables([client, client])
  with pytest.raises(ValueError, match="unknown block 'conv9'"):
    model.merge_variables([client, {"params": {"conv9": {}}}])
  (whole,) = model.split_variables(variables, ())  # no cut: one part, the full model
  assert whole == variables and len(model.parts(())) == 1


def test_resnet18_64x64_forward_shape():
  # Shape-only forward (jax.eval_shape): the official 64x64 setting must not break
  # (the official avg_pool2d(7) would); global average pooling gives [B, 512].
  model = get_model("resnet18", input_shape=(64, 64, 3), num_classes=7)
  variables = jax.eval_shape(model.init, jax.random.key(0))
  client, server = model.parts(model.default_cut)
  cv, sv = model.split_variables(variables, model.default_cut)
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  smashed, _ = jax.eval_shape(lambda v, x: apply_part(client, v, x, train=True), cv, x)
  assert smashed.shape == (2, 16, 16, 64)
  logits, stats = jax.eval_shape(lambda v, a: apply_part(server, v, a, train=True), sv, smashed)
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert jax.tree_util.tree_structure(stats) == jax.tree_util.tree_structure(sv["batch_stats"])


# ---------------------------------------------------------------------------
# 2. Gradients through the vjp exchange == gradients of the unsplit model.
# ---------------------------------------------------------------------------


def _masked_ce(logits, labels, mask):
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  return jnp.sum(ce * mask) / jnp.sum(mask)


GRAD_CASES = [
    ("resnet18", (32, 32, 3), "batch", None),  # client head / server at the paper's cut
    ("lenet", (32, 32, 3), "group", None),
    ("lenet", (28, 28, 1), "batch", (1, 3)),  # U-shaped: client head / server / client tail
]


@pytest.mark.parametrize("name,shape,norm,cuts", GRAD_CASES, ids=lambda v: str(v))
def test_vjp_exchange_matches_full_gradient(name, shape, norm, cuts):
  batch, pad = 6, 2  # sample 2 is padding
  model, variables, x = _setup(name, shape, batch=batch, norm=norm)
  cuts = cuts or (model.default_cut,)
  labels = jnp.arange(batch) % model.num_classes
  mask = jnp.ones(batch).at[pad].set(0.0)
  x = x.at[pad].set(50.0 * x[pad] + 7.0)  # padding with wildly different statistics
  parts = model.parts(cuts)
  pvars = model.split_variables(variables, cuts)

  # --- split: client head forward with vjp, server/tail value_and_grad. ---
  # (Each computation is jitted as a whole: eager op-by-op autodiff is slow on CPU.)
  @jax.jit
  def split_step(pvars, x):
    def head_fn(p, xx):
      return apply_part(parts[0], {**pvars[0], "params": p}, xx, train=True, mask=mask)

    smashed, head_vjp, head_stats = jax.vjp(head_fn, pvars[0]["params"], x, has_aux=True)

    def rest_loss(rest_params, a):
      new_stats = []
      for module, pv, p in zip(parts[1:], pvars[1:], rest_params):
        a, s = apply_part(module, {**pv, "params": p}, a, train=True, mask=mask)
        new_stats.append(s)
      return _masked_ce(a, labels, mask), new_stats

    rest_params = [pv["params"] for pv in pvars[1:]]
    (loss, rest_stats), (rest_grads, d_smashed) = jax.value_and_grad(
        rest_loss, argnums=(0, 1), has_aux=True)(rest_params, smashed)
    head_grads, dx = head_vjp(d_smashed)
    return loss, [head_grads, *rest_grads], [head_stats, *rest_stats], dx

  loss, grads, stats, dx = split_step(pvars, x)
  split_grads = model.merge_variables([{"params": g} for g in grads])["params"]
  split_stats = model.merge_variables(
      [{"params": {}, "batch_stats": s} for s in stats])["batch_stats"]

  # --- reference: the unsplit model, differentiated directly. ---
  @jax.jit
  def full_grad(params, xx):
    def loss_fn(params):
      logits, upd = model.full().apply({**variables, "params": params}, xx, train=True,
                                       mask=mask, mutable=["batch_stats"])
      return _masked_ce(logits, labels, mask), (logits, upd.get("batch_stats", {}))
    return jax.value_and_grad(loss_fn, has_aux=True)(params)

  (ref_loss, (ref_logits, ref_stats)), ref_grads = full_grad(variables["params"], x)
  np.testing.assert_allclose(loss, ref_loss, **TOL)
  _assert_tree_close(split_grads, ref_grads, rtol=1e-4, atol=1e-5)
  assert set(split_grads) == set(model.block_names)
  assert max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(split_grads)) > 1e-3
  if norm == "batch":
    _assert_tree_close(split_stats, ref_stats)
  else:
    assert split_stats == {} and "batch_stats" not in variables
  # The padded sample gets no input gradient.
  np.testing.assert_array_equal(np.asarray(dx[pad]), 0.0)
  assert np.abs(np.asarray(dx)).max() > 1e-4

  # --- padding is invisible. (1) Other padding content: same loss, grads, stats. ---
  x_alt = x.at[pad].set(-3.0 * x[pad] - 20.0)
  (alt_loss, (alt_logits, alt_stats)), alt_grads = full_grad(variables["params"], x_alt)
  np.testing.assert_allclose(alt_loss, ref_loss, **TOL)
  _assert_tree_close(alt_grads, ref_grads, rtol=1e-4, atol=1e-5)
  _assert_tree_close(alt_stats, ref_stats)
  # (2) Same outputs and batch statistics as running the model on the real samples only.
  real = np.flatnonzero(np.asarray(mask))
  real_logits, real_upd = jax.jit(lambda v, xx: model.full().apply(
      v, xx, train=True, mutable=["batch_stats"]))(variables, x[real])
  np.testing.assert_allclose(ref_logits[real], real_logits, rtol=1e-4, atol=1e-4)
  if norm == "batch":
    _assert_tree_close(ref_stats, real_upd["batch_stats"], rtol=1e-4, atol=1e-5)
  if name == "lenet" and norm == "batch":  # ... whereas ignoring the mask changes them.
    unmasked = model.full().apply(variables, x, train=True, mutable=["batch_stats"])[1]
    assert not np.allclose(unmasked["batch_stats"]["conv1"]["norm"]["mean"],
                           ref_stats["conv1"]["norm"]["mean"], atol=1e-2)


def test_all_padding_batch_keeps_stats_and_is_finite():
  model, variables, x = _setup("lenet", (28, 28, 1), norm="batch")
  mask = jnp.zeros((x.shape[0],))
  y, stats = apply_part(model.full(), variables, x, train=True, mask=mask)
  assert np.all(np.isfinite(y))
  _assert_tree_close(stats, variables["batch_stats"])
  # Sanity: an all-ones mask does update them, and equals mask=None.
  y1, stats1 = apply_part(model.full(), variables, x, train=True, mask=jnp.ones(x.shape[0]))
  y2, stats2 = apply_part(model.full(), variables, x, train=True)
  np.testing.assert_allclose(y1, y2, **TOL)
  _assert_tree_close(stats1, stats2)
  assert not np.allclose(stats1["conv1"]["norm"]["mean"], variables["batch_stats"]["conv1"]["norm"]["mean"])


# ---------------------------------------------------------------------------
# 3. Parameter counts computed by hand.
# ---------------------------------------------------------------------------


def _count(tree):
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(tree))


def test_lenet_param_count():
  model = get_model("lenet", input_shape=(28, 28, 1), num_classes=10)
  params = jax.eval_shape(model.init, jax.random.key(0))["params"]
  expected = {
      "conv1": 6 * (5 * 5 * 1) + 6,
      "conv2": 16 * (5 * 5 * 6) + 16,
      "fc1": 400 * 120 + 120,
      "fc2": 120 * 84 + 84,
      "fc3": 84 * 10 + 10,
  }
  assert {k: _count(v) for k, v in params.items()} == expected
  total = _count(params)
  assert total == sum(expected.values()) == 61706
  assert 55_000 <= total <= 65_000


def test_resnet18_param_count():
  model = get_model("resnet18", input_shape=(64, 64, 3), num_classes=7)
  variables = jax.eval_shape(model.init, jax.random.key(0))

  def bn(c):
    return 2 * c  # scale + bias (running stats are not parameters)

  def basic(cin, cout, stride):
    n = 3 * 3 * cin * cout + bn(cout) + 3 * 3 * cout * cout + bn(cout)
    if stride != 1 or cin != cout:
      n += cin * cout + bn(cout)
    return n

  expected = {"stem": 7 * 7 * 3 * 64 + bn(64)}
  cin = 64
  for stage, c in enumerate((64, 128, 256, 512), start=1):
    for j in range(2):
      expected[f"layer{stage}_{j}"] = basic(cin, c, 2 if stage > 1 and j == 0 else 1)
      cin = c
  expected["head"] = 512 * 7 + 7
  assert {k: _count(v) for k, v in variables["params"].items()} == expected
  assert _count(variables["params"]) == sum(expected.values()) == 11_180_103
  # Running stats: mean + var for every batch norm, i.e. as many as scale + bias.
  norm_params = {blk: {k: v for k, v in p.items() if "norm" in k}
                 for blk, p in variables["params"].items()}
  assert _count(variables["batch_stats"]) == _count(norm_params) == 2 * 64 + 2 * (
      2 * 64 * 2 + 128 * 5 + 256 * 5 + 512 * 5)
  # Official init: conv ~ N(0, 2 / (k*k*out)), BN scale 1 / bias 0.  Checked on the
  # client part only (with an rbg key: both keep the init fast on CPU).
  client = model.parts(model.default_cut)[0]
  cv = client.init(jax.random.key(0, impl="rbg"), jnp.zeros((1, 64, 64, 3)), train=False)
  for blk, conv, k, c in [("stem", "conv", 7, 64), ("layer1_0", "conv2", 3, 64)]:
    kernel = np.asarray(cv["params"][blk][conv]["kernel"])
    expected_std = np.sqrt(2 / (k * k * c))
    assert abs(kernel.std() / expected_std - 1) < 0.05 and abs(kernel.mean()) < 0.05 * expected_std
    assert abs(np.abs(kernel).max()) > 3 * expected_std  # normal, not truncated
  np.testing.assert_array_equal(cv["params"]["stem"]["norm"]["scale"], 1.0)
  np.testing.assert_array_equal(cv["params"]["stem"]["norm"]["bias"], 0.0)
  np.testing.assert_array_equal(cv["batch_stats"]["layer1_0"]["norm1"]["var"], 1.0)


# ---------------------------------------------------------------------------
# 4. Validation messages.
# ---------------------------------------------------------------------------


def test_check_cut():
  model = get_model("lenet")
  valid = "valid cuts are 1..4 (1=after conv1, 2=after conv2, 3=after fc1, 4=after fc2)"
  assert model.check_cut(2) == (2,)
  assert model.check_cut([1, 4]) == (1, 4)
  assert model.check_cut(np.int64(3)) == (3,)
  assert model.default_cut == 2 and model.num_blocks == 5
  with pytest.raises(ValueError) as e:
    model.check_cut(9)
  assert str(e.value) == f"cut 9 is out of range for lenet: {valid}"
  for bad in [0, 5, -1, (1, 5), (2, 2), (3, 1), 2.0, (1, "2")]:
    with pytest.raises(ValueError, match=re.escape(valid)) as e:
      model.check_cut(bad)
    assert "\n" not in str(e.value)
  with pytest.raises(ValueError, match="strictly increasing"):
    model.parts((3, 2))
  with pytest.raises(ValueError, match=re.escape("valid cuts are 1..15 (1=after conv1_1")):
    get_model("vgg16", input_shape=(32, 32, 3)).split_variables({"params": {}}, 16)
  assert get_model("vgg16", input_shape=(32, 32, 3)).default_cut == 4
  assert get_model("alexnet", input_shape=(32, 32, 3)).default_cut == 2
  assert get_model("resnet18", input_shape=(32, 32, 3)).default_cut == 2


def test_get_model_errors():
  assert models.MODELS == ("lenet", "alexnet", "vgg16", "resnet18")
  with pytest.raises(ValueError) as e:
    get_model("x")
  assert str(e.value) == "unknown model 'x': choose one of lenet, alexnet, vgg16, resnet18"
  with pytest.raises(ValueError) as e:
    get_model("lenet", norm="layer")
  msg = str(e.value)
  assert "\n" not in msg and "'layer'" in msg
  assert all(n in msg for n in ("batch", "group", "none"))
  assert get_model("lenet").norm == "none"
  assert get_model("alexnet", input_shape=(32, 32, 3)).norm == "batch"
  assert get_model("resnet18", norm="group").norm == "group"


# ---------------------------------------------------------------------------
# 5. vmap over clients == Python loop.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name,shape,norm,train", [("lenet", (28, 28, 1), "batch", True),
                                                   ("lenet", (28, 28, 1), "batch", False),
                                                   ("resnet18", (32, 32, 3), None, True)])
def test_vmap_over_clients(name, shape, norm, train):
  model = get_model(name, input_shape=shape, norm=norm)
  client = model.parts(model.default_cut)[0]
  per_client = [_random_variables(model, seed=i, blocks=client.names) for i in range(3)]
  xs = jax.random.normal(jax.random.key(5), (3, 4) + shape)
  masks = jnp.array([[1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], jnp.float32)
  stacked = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *per_client)

  y, stats = jax.jit(jax.vmap(lambda v, x, m: apply_part(client, v, x, train=train, mask=m)))(
      stacked, xs, masks)
  for i in range(3):
    yi, si = apply_part(client, per_client[i], xs[i], train=train, mask=masks[i])
    np.testing.assert_allclose(y[i], yi, **TOL)
    _assert_tree_close(jax.tree_util.tree_map(lambda a: a[i], stats), si)
  # Clients really differ.
  assert not np.allclose(y[0], y[1])
  # Client 2 is all padding: its running statistics are untouched.
  _assert_tree_close(jax.tree_util.tree_map(lambda a: a[2], stats),
                     per_client[2]["batch_stats"])


def test_max_pool_2x2_equals_flax_max_pool_in_value_and_gradient():
  """Ties (half-integer values), odd sizes: same outputs and the same
  first-maximum gradient routing as nn.max_pool."""
  import flax.linen as nn
  from sfljax.models import max_pool_2x2
  for shape in [(3, 8, 8, 2), (2, 11, 10, 3), (1, 5, 7, 1)]:
    x = jnp.round(jax.random.normal(jax.random.key(0), shape) * 2) / 2
    ref, ref_vjp = jax.vjp(lambda z: nn.max_pool(z, (2, 2), strides=(2, 2)), x)
    got, got_vjp = jax.vjp(max_pool_2x2, x)
    g = jax.random.normal(jax.random.key(1), ref.shape)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
    np.testing.assert_array_equal(np.asarray(got_vjp(g)[0]), np.asarray(ref_vjp(g)[0]))
    np.testing.assert_array_equal(np.asarray(got_vjp(g)[0]), _pool_grad_reference(x, g))


def _pool_grad_reference(x, g):
  """NumPy loops: each 2x2 window's cotangent to its first maximum (row-major)."""
  x, g = np.asarray(x), np.asarray(g)
  out = np.zeros_like(x)
  for b, i, j, c in np.ndindex(g.shape):
    win = x[b, 2 * i:2 * i + 2, 2 * j:2 * j + 2, c].reshape(-1)
    k = int(np.argmax(win))   # NumPy's argmax: the first maximum.
    out[b, 2 * i + k // 2, 2 * j + k % 2, c] = g[b, i, j, c]
  return out


def test_max_pool_2x2_gradient_is_exact_with_ties_infinities_and_bf16():
  """All-equal windows, -inf and bf16: the gradient is a routing (no
  arithmetic), so it must equal the reference exactly, in any dtype."""
  from sfljax.models import max_pool_2x2
  x = np.zeros((2, 6, 4, 3), np.float32)
  x[0, :2, :2, 0] = [[1, 1], [1, 1]]                 # four-way tie
  x[0, 2:4, :2, 1] = [[-np.inf, -np.inf], [-np.inf, -np.inf]]
  x[1] = np.round(np.random.RandomState(0).standard_normal((6, 4, 3)))
  for dtype in (jnp.float32, jnp.bfloat16):
    xd = jnp.asarray(x, dtype)
    y, vjp = jax.vjp(max_pool_2x2, xd)
    g = jnp.asarray(np.random.RandomState(1).standard_normal(y.shape), dtype)
    got = np.asarray(vjp(g)[0].astype(jnp.float32))
    np.testing.assert_array_equal(got, _pool_grad_reference(xd.astype(jnp.float32),
                                                            g.astype(jnp.float32)))
    assert vjp(g)[0].dtype == dtype


# ---------------------------------------------------------------------------
# 6. Classifier dropout (get_model(..., dropout=rate)).
# ---------------------------------------------------------------------------


def _no_rng_blocks_fail(model, shape):
  """Names of the blocks whose train-mode apply fails without a dropout key
  (shape-only traces: cheap)."""
  variables = jax.eval_shape(model.init, jax.random.key(0))
  x = jax.ShapeDtypeStruct((2,) + shape, jnp.float32)
  failing = []
  for k, (part, pv) in enumerate(zip(model.parts(tuple(range(1, model.num_blocks))),
                                     model.split_variables(variables,
                                                           tuple(range(1, model.num_blocks))))):
    try:
      jax.eval_shape(lambda v, a, part=part: apply_part(part, v, a, train=True), pv, x)
    except ValueError as e:
      assert "pass rng=" in str(e)
      failing.append(part.names[0])
    x = jax.eval_shape(lambda v, a, k, part=part: apply_part(
        part, v, a, train=True, rng=jax.random.key(k)), pv, x, k)[0]
  return failing


@pytest.mark.parametrize("name,shape", [("lenet", (28, 28, 1)), ("resnet18", (32, 32, 3))],
                         ids=str)
def test_dropout_zero_is_the_model_without_dropout(name, shape):
  """Rate 0 builds the same variables and the very same computation (equal
  jaxprs, hence bit-identical outputs) as no ``dropout`` argument, with no
  random numbers drawn in train mode; rate > 0 in eval mode is that same
  computation too.  (Traces only: compiling ResNet18 is slow on CPU.)"""
  plain = get_model(name, input_shape=shape)
  zero = get_model(name, input_shape=shape, dropout=0.0)
  some = get_model(name, input_shape=shape, dropout=0.3)
  assert (plain.dropout, zero.dropout, some.dropout) == (0.0, 0.0, 0.3)
  assert not plain.needs_rng and not zero.needs_rng and some.needs_rng
  trees = [jax.eval_shape(m.init, jax.random.key(0)) for m in (plain, zero, some)]
  assert trees[0] == trees[1] == trees[2]  # dropout has no variables
  variables = trees[0]
  x = jax.ShapeDtypeStruct((2,) + shape, jnp.float32)
  mask = jax.ShapeDtypeStruct((2,), jnp.float32)

  def jaxpr(model, train, rng=None):
    return str(jax.make_jaxpr(lambda v, a, m: apply_part(
        model.full(), v, a, train=train, mask=m, rng=rng))(variables, x, mask))

  for train in (False, True):
    assert jaxpr(zero, train) == jaxpr(plain, train)
  assert jaxpr(some, False) == jaxpr(plain, False)
  # Rate 0: no random numbers in train mode, even when a key is given.
  train_jaxpr = jaxpr(zero, True, rng=jax.random.key(0))
  assert train_jaxpr == jaxpr(plain, True)
  assert "random" not in train_jaxpr and "threefry" not in train_jaxpr
  assert "random_bits" in jaxpr(some, True, rng=jax.random.key(0))
  assert _no_rng_blocks_fail(zero, shape) == []


@pytest.mark.parametrize("name,shape,blocks", [
    ("lenet", (28, 28, 1), ["fc1", "fc2"]),
    ("alexnet", (32, 32, 3), ["fc1", "fc2"]),
    ("vgg16", (32, 32, 3), ["fc1", "fc2"]),
    ("resnet18", (32, 32, 3), ["head"]),
], ids=str)
def test_dropout_placement(name, shape, blocks):
  assert _no_rng_blocks_fail(get_model(name, input_shape=shape, dropout=0.5), shape) == blocks


class _DropoutAt(nn.Module):
  """nn.Dropout(rate) at the path ``block/dropout``, applied directly."""
  block: str
  rate: float

  @nn.compact
  def __call__(self, h):
    class Block(nn.Module):
      rate: float

      @nn.compact
      def __call__(self, h):
        return nn.Dropout(self.rate, name="dropout")(h, deterministic=False)

    return Block(self.rate, name=self.block)(h)


def test_dropout_by_hand():
  """LeNet's fc1 = dropout(relu(dense(flatten(x)))); ResNet18's head =
  dense(dropout(mean(x))), with nn.Dropout's mask for the same key."""
  rate, key = 0.5, jax.random.key(11)
  rs = np.random.RandomState(2)
  lenet = get_model("lenet", dropout=rate)
  fc1 = lenet.parts((2, 3))[1]
  p = {"dense": {"kernel": jnp.asarray(rs.standard_normal((400, 120)) / 20, jnp.float32),
                 "bias": jnp.asarray(rs.standard_normal(120) * 0.1, jnp.float32)}}
  x = jnp.asarray(rs.standard_normal((3, 5, 5, 16)), jnp.float32)
  y, _ = apply_part(fc1, {"params": {"fc1": p}}, x, train=True, rng=key)
  h = np.maximum(np.asarray(x).reshape(3, -1) @ p["dense"]["kernel"] + p["dense"]["bias"], 0)
  ref = _DropoutAt("fc1", rate).apply({}, jnp.asarray(h), rngs={"dropout": key})
  np.testing.assert_allclose(y, ref, **TOL)
  assert 0 < np.mean((np.asarray(y) == 0) & (h > 0)) < 0.5

  resnet = get_model("resnet18", input_shape=(32, 32, 3), num_classes=4, dropout=rate)
  head = resnet.parts(resnet.num_blocks - 1)[1]
  p = {"fc": {"kernel": jnp.asarray(rs.standard_normal((512, 4)) / 20, jnp.float32),
              "bias": jnp.asarray(rs.standard_normal(4), jnp.float32)}}
  x = jnp.asarray(rs.standard_normal((3, 2, 2, 512)), jnp.float32)
  y, _ = apply_part(head, {"params": {"head": p}}, x, train=True, rng=key)
  pooled = _DropoutAt("head", rate).apply({}, jnp.mean(x, axis=(1, 2)), rngs={"dropout": key})
  np.testing.assert_allclose(y, pooled @ p["fc"]["kernel"] + p["fc"]["bias"], **TOL)
  y_eval, _ = apply_part(head, {"params": {"head": p}}, x, train=False, rng=key)
  np.testing.assert_allclose(y_eval, jnp.mean(x, axis=(1, 2)) @ p["fc"]["kernel"]
                             + p["fc"]["bias"], **TOL)
  assert not np.allclose(y, y_eval)


def test_dropout_rate_errors():
  for bad in (-0.1, 1.0, True, "0.5"):
    with pytest.raises(ValueError, match="dropout must be a rate in") as e:
      get_model("lenet", dropout=bad)
    assert "\n" not in str(e.value)
