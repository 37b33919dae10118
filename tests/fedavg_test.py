"""FedAvg and the client executors against hand computations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfljax import execution, fedavg


def test_weighted_average_unequal_counts_matches_hand_computation():
  rng = np.random.default_rng(0)
  counts = np.array([10, 3, 7])
  tree = {"params": {"w": rng.normal(size=(3, 4, 2)).astype(np.float32)},
          "batch_stats": {"mean": rng.normal(size=(3, 5)).astype(np.float32),
                          "var": rng.uniform(size=(3, 5)).astype(np.float32)}}
  got = fedavg.weighted_average(jax.tree.map(jnp.asarray, tree), counts)
  for path in (("params", "w"), ("batch_stats", "mean"), ("batch_stats", "var")):
    leaf = tree[path[0]][path[1]].astype(np.float64)
    expected = (10 * leaf[0] + 3 * leaf[1] + 7 * leaf[2]) / 20
    np.testing.assert_allclose(got[path[0]][path[1]], expected, rtol=1e-6, atol=1e-7)


def test_weighted_average_of_identical_models_is_that_model():
  tree = {"w": jnp.arange(6.0).reshape(2, 3)}
  got = fedavg.weighted_average(fedavg.broadcast(tree, 4), [1, 2, 3, 4])
  np.testing.assert_allclose(got["w"], tree["w"], rtol=1e-6)


@pytest.mark.parametrize("strategy,block", [("vmap", None), ("sequential", None),
                                            ("sequential", 2), ("vmap", 2), ("vmap", 5)])
@pytest.mark.parametrize("num", [1, 3, 12])
def test_executors_match_python_loop(strategy, block, num):
  ex = execution.ClientExecutor(strategy, block)
  xs = jnp.arange(num * 4.0).reshape(num, 4)
  ws = jnp.arange(num * 4.0).reshape(num, 4) * 0.5
  fn = lambda x, w: (jnp.sin(x) * w, jnp.sum(x))
  got = jax.jit(lambda a, b: ex.map(fn, a, b))(xs, ws)
  for k in range(num):
    np.testing.assert_allclose(got[0][k], np.sin(np.asarray(xs[k])) * np.asarray(ws[k]), rtol=1e-6)
    np.testing.assert_allclose(got[1][k], np.sum(np.asarray(xs[k])), rtol=1e-6)


def test_auto_strategy_per_backend_and_bad_names():
  assert execution.resolve("auto", "cpu").name == "sequential"
  assert execution.resolve("auto", "cpu").step_loop == "scan"
  assert execution.resolve("auto", "gpu").name == "vmap"
  assert execution.resolve("auto", "tpu").step_loop == "scan"
  with pytest.raises(ValueError, match="choose one of auto, vmap, sequential"):
    execution.resolve("pmap")
