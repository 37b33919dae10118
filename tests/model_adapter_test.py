"""Tests for user-supplied Flax blocks: SplitModel.from_modules, the block
adapter, dropout PRNG keys through apply_part, and SplitModel.resolve_cuts."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfljax.models import SplitModel, apply_part, get_model, subset

TOL = dict(rtol=1e-5, atol=1e-5)
RATE = 0.5
SHAPE = (6, 6, 1)


class BNBlock(nn.Module):
  """A user module with batch norm, taking ``train``."""

  @nn.compact
  def __call__(self, x, train):
    return nn.BatchNorm(use_running_average=not train, momentum=0.9)(x)


class DropBlock(nn.Module):
  """A user module with dropout, taking ``deterministic``."""

  @nn.compact
  def __call__(self, x, *, deterministic):
    return nn.Dropout(RATE)(x, deterministic=deterministic)


def _flatten(x):
  return x.reshape(x.shape[0], -1)


def _user_model(**kw):
  blocks = [("conv1", nn.Conv(4, (3, 3))), ("relu1", nn.relu), ("bn", BNBlock()),
            ("flat", _flatten), ("fc1", nn.Dense(16)), ("drop", DropBlock()),
            ("fc2", nn.Dense(3))]
  return SplitModel.from_modules(blocks, input_shape=SHAPE, num_classes=3, **kw)


def _random_variables(model, seed=0):
  """Random variables of the model's structure (non-trivial batch-norm state)."""
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  rs = np.random.RandomState(seed)

  def draw(path, s):
    names = [getattr(p, "key", "") for p in path]
    noise = rs.standard_normal(s.shape).astype(np.float32)
    if names[0] == "batch_stats":
      return np.exp(0.3 * noise) if names[-1] == "var" else 0.1 * noise
    if names[-1] == "kernel":
      return noise / np.sqrt(np.prod(s.shape[:-1]))
    return 1.0 + 0.1 * noise if names[-1] == "scale" else 0.1 * noise

  return jax.tree_util.tree_map_with_path(lambda p, s: jnp.asarray(draw(p, s)), shapes)


def _inputs(batch=3, seed=1):
  return jnp.asarray(np.random.RandomState(seed).standard_normal((batch,) + SHAPE), jnp.float32)


def _by_hand_to_bn(params, x):
  """conv1 + ReLU with plain lax ops (the input of the 'bn' block)."""
  p = params["conv1"]
  h = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jnp.maximum(h + p["bias"], 0.0)


def _by_hand_eval(variables, x):
  """The whole user model in eval mode, written out with jnp."""
  params, stats = variables["params"], variables["batch_stats"]
  h = _by_hand_to_bn(params, x)
  bn, st = params["bn"]["BatchNorm_0"], stats["bn"]["BatchNorm_0"]
  h = (h - st["mean"]) / jnp.sqrt(st["var"] + 1e-5) * bn["scale"] + bn["bias"]
  h = h.reshape(h.shape[0], -1)
  h = h @ params["fc1"]["kernel"] + params["fc1"]["bias"]
  return h @ params["fc2"]["kernel"] + params["fc2"]["bias"]  # dropout: identity


# ---------------------------------------------------------------------------
# from_modules: structure, outputs, parts, batch statistics.
# ---------------------------------------------------------------------------


def test_from_modules_structure_and_detection():
  model = _user_model()
  assert model.block_names == ("conv1", "relu1", "bn", "flat", "fc1", "drop", "fc2")
  assert model.default_cut == 3 and model.name == "custom" and model.norm == "custom"
  assert model.has_batch_stats and model.needs_rng
  shapes = jax.eval_shape(model.init, jax.random.key(0))
  # Module blocks: variables directly under the block name, as module.init gives them.
  assert shapes["params"]["conv1"]["kernel"].shape == (3, 3, 1, 4)
  assert shapes["params"]["fc1"]["kernel"].shape == (6 * 6 * 4, 16)
  assert set(shapes["params"]) == {"conv1", "bn", "fc1", "fc2"}
  assert set(shapes["batch_stats"]) == {"bn"}
  # Bare blocks named by their module name, else block<i>; dict names; detection.
  bare = SplitModel.from_modules([nn.Dense(4, name="enc"), nn.relu, nn.Dense(2)],
                                 input_shape=(5,), num_classes=2, default_cut=1)
  assert bare.block_names == ("enc", "block1", "block2") and bare.default_cut == 1
  assert not bare.has_batch_stats and not bare.needs_rng
  as_dict = SplitModel.from_modules({"a": nn.Dense(4), "b": nn.Dropout(0.2), "c": nn.Dense(2)},
                                    input_shape=(5,), num_classes=2)
  assert as_dict.block_names == ("a", "b", "c") and as_dict.needs_rng
  assert not as_dict.has_batch_stats and as_dict.default_cut == 1


def test_from_modules_full_equals_layers_by_hand():
  model = _user_model()
  variables = _random_variables(model)
  x = _inputs()
  ref = _by_hand_eval(variables, x)
  y = model.full().apply(variables, x, train=False)
  np.testing.assert_allclose(y, ref, **TOL)
  y2, stats = apply_part(model.full(), variables, x, train=False, rng=jax.random.key(3))
  np.testing.assert_allclose(y2, ref, **TOL)  # eval mode ignores the key
  assert stats is variables["batch_stats"]
  # Real Flax init works too and has the same structure.
  real = model.init(jax.random.key(0), batch_size=2)
  assert jax.tree_util.tree_structure(real) == jax.tree_util.tree_structure(variables)


@pytest.mark.parametrize("cuts", [(3,), (1,), (6,), (1, 5), (3, 4)], ids=str)
def test_from_modules_parts_compose_to_full(cuts):
  model = _user_model()
  variables = _random_variables(model)
  x, key = _inputs(), jax.random.key(7)
  full = model.full()
  y_eval = full.apply(variables, x, train=False)
  y_train, upd = full.apply(variables, x, train=True, rngs={"dropout": key},
                            mutable=["batch_stats"])
  parts, part_vars = model.parts(cuts), model.split_variables(variables, cuts)
  assert [n for p in parts for n in p.names] == list(model.block_names)
  for train, ref in [(False, y_eval), (True, y_train)]:
    h, stats = x, []
    for module, pv in zip(parts, part_vars):
      # One key for every part: dropout masks depend on the block path only.
      h, s = apply_part(module, pv, h, train=train, rng=key)
      stats.append({"params": {}, "batch_stats": s})
    np.testing.assert_allclose(h, ref, **TOL)
    merged = model.merge_variables(stats)["batch_stats"]
    expected = upd["batch_stats"] if train else variables["batch_stats"]
    for a, b in zip(jax.tree_util.tree_leaves(merged), jax.tree_util.tree_leaves(expected)):
      np.testing.assert_allclose(a, b, **TOL)


def test_batch_stats_update_equals_direct_flax_apply():
  model = _user_model()
  variables = _random_variables(model)
  x = _inputs(batch=4)
  h = _by_hand_to_bn(variables["params"], x)
  bn_vars = {"params": variables["params"]["bn"], "batch_stats": variables["batch_stats"]["bn"]}
  ref_y, ref_upd = BNBlock().apply(bn_vars, h, train=True, mutable=["batch_stats"])
  # The 'bn' block alone (the middle part at cuts (2, 3)).
  bn_part = model.parts((2, 3))[1]
  assert bn_part.names == ("bn",)
  y, stats = apply_part(bn_part, model.subset(variables, ["bn"]), h, train=True)
  np.testing.assert_allclose(y, ref_y, **TOL)
  for a, b in zip(jax.tree_util.tree_leaves(stats["bn"]),
                  jax.tree_util.tree_leaves(ref_upd["batch_stats"])):
    np.testing.assert_allclose(a, b, **TOL)
  # The statistics really moved, and the whole model updates them the same way.
  assert not np.allclose(stats["bn"]["BatchNorm_0"]["mean"],
                         variables["batch_stats"]["bn"]["BatchNorm_0"]["mean"])
  _, full_stats = apply_part(model.full(), variables, x, train=True, rng=jax.random.key(0))
  np.testing.assert_allclose(full_stats["bn"]["BatchNorm_0"]["var"],
                             ref_upd["batch_stats"]["BatchNorm_0"]["var"], **TOL)


def test_bare_flax_layers_as_blocks_get_mode_and_mask():
  """nn.BatchNorm / nn.Dropout / nn.LayerNorm as blocks: BatchNorm gets
  use_running_average and the padding mask (statistics over real samples
  only), Dropout gets deterministic, LayerNorm no mask (it is per sample)."""
  model = SplitModel.from_modules(
      {"fc": nn.Dense(6), "bn": nn.BatchNorm(momentum=0.9), "ln": nn.LayerNorm(),
       "drop": nn.Dropout(0.3), "out": nn.Dense(2)}, input_shape=(5,), num_classes=2)
  assert model.has_batch_stats and model.needs_rng
  variables = _random_variables(model)
  x = jnp.asarray(np.random.RandomState(0).standard_normal((4, 5)), jnp.float32)
  x = x.at[1].set(100.0)  # padding with wild statistics
  mask = jnp.array([1.0, 0.0, 1.0, 1.0])
  _, stats = apply_part(model.full(), variables, x, train=True, mask=mask, rng=jax.random.key(0))
  real = np.flatnonzero(np.asarray(mask))
  _, ref = apply_part(model.full(), variables, x[real], train=True, rng=jax.random.key(0))
  np.testing.assert_allclose(stats["bn"]["mean"], ref["bn"]["mean"], **TOL)
  np.testing.assert_allclose(stats["bn"]["var"], ref["bn"]["var"], **TOL)
  y0 = apply_part(model.full(), variables, x, train=False)[0]
  y1 = apply_part(model.full(), variables, x, train=False, mask=mask)[0]
  np.testing.assert_array_equal(y0, y1)  # eval mode: mask-independent
  # An attribute the user fixed is not overridden (Flax forbids setting both).
  fixed = SplitModel.from_modules([nn.Dense(3), nn.Dropout(0.5, deterministic=True)],
                                  input_shape=(2,), num_classes=3)
  assert not fixed.needs_rng


def test_mode_arguments_follow_the_signature():
  seen = {}

  def f_training(x, training):
    seen["training"] = training
    return x

  def f_mask(x, *, mask=None, use_running_average=None):
    seen["mask"], seen["ura"] = mask, use_running_average
    return x

  model = SplitModel.from_modules([f_training, f_mask, nn.Dense(2)], input_shape=(3,),
                                  num_classes=2)
  variables = model.init(jax.random.key(0))
  x = jnp.ones((2, 3))
  apply_part(model.full(), variables, x, train=True, mask=jnp.array([1.0, 0.0]))
  assert seen["training"] is True and seen["ura"] is False
  np.testing.assert_array_equal(seen["mask"], [True, False])  # the [B] mask, as a bool array
  apply_part(model.full(), variables, x, train=False)
  assert seen["training"] is False and seen["ura"] is True and seen["mask"] is None


# ---------------------------------------------------------------------------
# Dropout keys.
# ---------------------------------------------------------------------------


class _Inner(nn.Module):
  @nn.compact
  def __call__(self, h):
    return nn.Dropout(RATE)(h, deterministic=False)


class _DirectDropout(nn.Module):
  """nn.Dropout at the same module path as the user model's 'drop' block."""

  @nn.compact
  def __call__(self, h):
    return _Inner(name="drop")(h)


def test_dropout_keys():
  model = _user_model()
  variables = _random_variables(model)
  x = _inputs()
  full = model.full()
  k1, k2 = jax.random.key(1), jax.random.key(2)
  y1, _ = apply_part(full, variables, x, train=True, rng=k1)
  y1b, _ = apply_part(full, variables, x, train=True, rng=k1)
  y2, _ = apply_part(full, variables, x, train=True, rng=k2)
  np.testing.assert_array_equal(y1, y1b)
  assert not np.allclose(y1, y2)
  e1 = apply_part(full, variables, x, train=False, rng=k1)[0]
  e2 = apply_part(full, variables, x, train=False, rng=k2)[0]
  np.testing.assert_array_equal(e1, e2)
  np.testing.assert_array_equal(e1, apply_part(full, variables, x, train=False)[0])
  with pytest.raises(ValueError, match="pass rng=") as e:
    apply_part(full, variables, x, train=True)
  assert "\n" not in str(e.value)

  # The dropped units are those of nn.Dropout applied directly with that key.
  drop = model.parts((5, 6))[1]
  assert drop.names == ("drop",)
  h = jnp.asarray(np.abs(np.random.RandomState(3).standard_normal((3, 16))) + 0.5, jnp.float32)
  out, _ = apply_part(drop, {"params": {}}, h, train=True, rng=k1)
  ref = _DirectDropout().apply({}, h, rngs={"dropout": k1})
  kept = np.asarray(out) != 0
  np.testing.assert_array_equal(kept, np.asarray(ref) != 0)
  assert 0.2 < 1 - kept.mean() < 0.8
  np.testing.assert_allclose(np.asarray(out)[kept], np.asarray(h)[kept] / (1 - RATE), **TOL)
  out2, _ = apply_part(drop, {"params": {}}, h, train=True, rng=k2)
  assert not np.array_equal(np.asarray(out2) != 0, kept)


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------


def _error(fn, *args, **kw):
  with pytest.raises(ValueError) as e:
    fn(*args, **kw)
  msg = str(e.value)
  assert "\n" not in msg, msg
  return msg


def test_from_modules_errors():
  build = SplitModel.from_modules
  msg = _error(build, [("conv1", nn.Conv(4, (3, 3))), ("flat", _flatten),
                       ("conv2", nn.Conv(4, (3, 3))), ("fc", nn.Dense(3))],
               input_shape=(4, 4, 2), num_classes=3)
  assert msg.startswith("block 'conv2' cannot take the output of block 'flat' (shape (1, 64)): ")

  class Needs4D(nn.Module):
    @nn.compact
    def __call__(self, x):
      _, _, _, c = x.shape
      return nn.Dense(c)(x)

  msg = _error(build, [Needs4D(), nn.Dense(3)], input_shape=(5,), num_classes=3)
  assert msg.startswith("block 'block0' cannot take the input (shape (1, 5)): ValueError")
  msg = _error(build, [nn.Conv(4, (3, 3)), nn.Dense(3)], input_shape=(4, 4, 2), num_classes=3)
  assert "'block1'" in msg and "(1, 4, 4, 3)" in msg and "expected (1, 3)" in msg
  msg = _error(build, [nn.Dense(3, name="a"), nn.Dense(3, name="a")], input_shape=(2,),
               num_classes=3)
  assert "duplicate block name 'a'" in msg
  assert "at least 2 blocks" in _error(build, [nn.Dense(3)], input_shape=(2,), num_classes=3)
  assert "one array" in _error(build, [lambda x: (x, x), nn.Dense(3)], input_shape=(2,),
                               num_classes=3)
  assert "'2'" in _error(build, {"a": nn.Dense(3), "2": nn.Dense(3)}, input_shape=(2,),
                         num_classes=3)
  assert "class Dense" in _error(build, [nn.Dense(3), nn.Dense], input_shape=(2,),
                                 num_classes=3)
  assert "valid cuts are 1..1" in _error(build, [nn.Dense(3), nn.Dense(3)], input_shape=(2,),
                                         num_classes=3, default_cut=2)


# ---------------------------------------------------------------------------
# resolve_cuts / subset.
# ---------------------------------------------------------------------------


def test_resolve_cuts():
  model = get_model("lenet")  # conv1 conv2 fc1 fc2 fc3
  for spec, cuts in [(None, (2,)), (3, (3,)), (np.int64(1), (1,)), ("conv2", (2,)),
                     ("2", (2,)), (" 4 ", (4,)), ("1,4", (1, 4)), ("conv1,fc2", (1, 4)),
                     ("conv1, 3", (1, 3)), ([1, "fc2"], (1, 4)), (("fc1",), (3,)),
                     ((2, 3), (2, 3))]:
    assert model.resolve_cuts(spec) == cuts, spec
  valid = "valid cuts are 1..4 (1=after conv1, 2=after conv2, 3=after fc1, 4=after fc2)"
  for spec, why in [("3,2", "not strictly increasing"), ("2,2", "not strictly increasing"),
                    ("9", "out of range"), (0, "out of range"), ("fc9", "unknown block 'fc9'"),
                    ("fc3", "'fc3' is the last block"), ("1,2,3", "3 cuts"), ((), "0 cuts"),
                    ("conv1,", "empty cut"), (2.0, "not an int"), (True, "not an int"),
                    ([1, None], "None is not a cut")]:
    msg = _error(model.resolve_cuts, spec)
    assert why in msg and valid in msg, (spec, msg)
  custom = _user_model()
  assert custom.resolve_cuts("relu1,drop") == (2, 6)
  assert custom.resolve_cuts(None) == (3,)
  assert "'fc2' is the last block" in _error(custom.resolve_cuts, "fc2")


def test_subset():
  model = get_model("lenet", norm="batch")
  variables = jax.eval_shape(model.init, jax.random.key(0))
  sub = model.subset(variables, ["fc1", "conv2"])
  assert list(sub["params"]) == ["fc1", "conv2"] and list(sub["batch_stats"]) == ["conv2"]
  assert model.subset(variables, "fc3") == {"params": {"fc3": variables["params"]["fc3"]},
                                            "batch_stats": {}}
  assert subset(variables, ["conv1"])["params"] == {"conv1": variables["params"]["conv1"]}
  msg = _error(model.subset, variables, ["conv1", "fc9"])
  assert re.search(r"unknown block\(s\) 'fc9' for lenet: blocks are conv1, conv2", msg)
