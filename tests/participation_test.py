"""Partial participation and mixed precision against independent computations
(client blocks: ``client_block_test.py``)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_trees_close, client_batches, reference_train, small_digits
from sfljax import data
from sfljax.train import Config, Experiment


def _unequal(num_clients=5):
  """Clients with 4, 8, 12, ... samples of the real digits (unequal shards)."""
  sizes = [4 * (k + 1) for k in range(num_clients)]
  ds = small_digits(sum(sizes), 16)
  bounds = np.cumsum([0] + sizes)
  return ds, [np.arange(bounds[k], bounds[k + 1]) for k in range(num_clients)]


def test_sample_clients_seeded_distinct_sorted():
  a = data.sample_clients(100, 0.1, seed=3, round_index=7)
  assert a.tolist() == data.sample_clients(100, 0.1, seed=3, round_index=7).tolist()
  assert len(a) == 10 and len(set(a.tolist())) == 10 and np.all(np.diff(a) > 0)
  assert a.min() >= 0 and a.max() < 100
  rounds = [tuple(data.sample_clients(100, 0.1, seed=3, round_index=r)) for r in range(20)]
  assert len(set(rounds)) == 20                  # A fresh draw every round.
  assert data.sample_clients(100, 1.0, seed=3, round_index=0) is None
  assert len(data.sample_clients(10, 0.01, seed=0, round_index=0)) == 1   # At least one.


@pytest.mark.parametrize("algorithm", ["fl", "sflv1"])
def test_partial_participation_equals_per_client_reference(algorithm):
  """Each round only the sampled clients train, each from the global model with
  its own persistent Adam state (fresh the first time it is picked); the new
  global model is their n_k-weighted mean (float64). Other clients' states
  are untouched."""
  ds, parts = _unequal(5)
  exp = Experiment(Config(algorithm=algorithm, clients=5, batch_size=6, client_fraction=0.4,
                          norm="batch", optimizer="adam", lr=1e-3, rounds=3),
                   dataset=ds, parts=parts)
  opt = optax.adam(1e-3)
  glob = exp.model.init(jax.random.key(0))
  opt_states = {}
  state = exp.init()
  seen = set()
  for r in range(3):
    ids = exp.participants(r)
    assert len(ids) == 2
    seen.update(ids.tolist())
    inp = exp.round_inputs(r)
    idx, mask = np.asarray(inp.idx), np.asarray(inp.mask)
    assert idx.shape[0] == 2 and np.asarray(inp.clients).tolist() == ids.tolist()
    locals_, counts = [], []
    for m, c in enumerate(ids):
      p = parts[c]
      v, opt_states[c] = reference_train(exp.model, glob, ds.x_train[p], ds.y_train[p],
                                         client_batches(idx, mask, m), opt, opt_states.get(c))
      locals_.append(v)
      counts.append(len(p))
    w = np.asarray(counts, np.float64) / sum(counts)
    glob = jax.tree.map(lambda *xs: sum(wi * np.asarray(x, np.float64) for wi, x in zip(w, xs)),
                        *locals_)
    state, _ = exp.train_round(state)
    assert_trees_close(exp.global_variables(state), glob, atol=3e-5)
    glob = jax.tree.map(lambda x: np.asarray(x, np.float32), glob)
  assert len(seen) > 2                           # Different clients took part.
  # A client that never took part still holds a fresh optimizer state.
  never = sorted(set(range(5)) - seen)
  if never:
    key = "opt" if algorithm == "fl" else "client_opt"
    mu = getattr(state.algo, key)[0].mu
    assert all(float(jnp.abs(x[never[0]]).max()) == 0 for x in jax.tree.leaves(mu))
  assert exp.trace_count == len(exp._programs)   # Sampling never recompiles.
  assert all(p._cache_size() == 1 for p in exp._programs.values())


def test_partial_participation_traffic_counts_only_participants():
  ds, parts = _unequal(5)
  exp = Experiment(Config(algorithm="sflv2", clients=5, batch_size=6, client_fraction=0.6,
                          rounds=2), dataset=ds, parts=parts)
  history = exp.run()
  for r, metrics in enumerate(history):
    ids = exp.participants(r)
    n = sum(len(parts[c]) for c in ids)
    assert metrics["participants"] == 3
    # Smashed rows of one sample: 16 channels x 5 x 5 float32 after LeNet's conv2 (28x28 input).
    assert metrics["bytes_smashed"] == n * 16 * 5 * 5 * 4


def test_bf16_compute_keeps_float32_master_weights_and_follows_the_float32_gradient():
  """One SGD step with one client: the bf16 update is the float32 whole-model
  update up to bfloat16 rounding; weights, BN statistics and optimizer stay
  float32; the smashed data travel as bfloat16 (half the bytes)."""
  ds = small_digits(16, 8)
  lr = 0.5
  runs = {}
  for precision in ("fp32", "bf16"):
    exp = Experiment(Config(algorithm="sflv1", clients=1, batch_size=16, optimizer="sgd",
                            lr=lr, precision=precision, rounds=1), dataset=ds)
    state, _ = exp.train_round(exp.init())
    runs[precision] = (exp, exp.global_variables(state))
  exp, got = runs["bf16"]
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(got))
  assert exp.traffic.smashed * 2 == runs["fp32"][0].traffic.smashed
  init = exp.model.init(jax.random.key(0))
  module = exp.model.full()
  idx = np.asarray(exp.round_inputs(0).idx)[0, 0]

  def loss(params):
    logits = module.apply({"params": params}, ds.x_train[idx], train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ds.y_train[idx]).mean()

  g = jax.grad(loss)(init["params"])
  fp32 = runs["fp32"][1]
  bf16_error = []
  for p0, gi, p1, q1 in zip(jax.tree.leaves(init["params"]), jax.tree.leaves(g),
                            jax.tree.leaves(got["params"]), jax.tree.leaves(fp32["params"])):
    step = (np.asarray(p0, np.float64) - np.asarray(p1, np.float64)) / lr
    step32 = (np.asarray(p0, np.float64) - np.asarray(q1, np.float64)) / lr
    ref = np.asarray(gi, np.float64)
    # bfloat16 keeps ~3 significant digits; gradients that are long sums (a
    # conv bias sums 16 x 28 x 28 terms) lose more: ~15% in norm measured here.
    assert np.linalg.norm(step - ref) <= 0.25 * np.linalg.norm(ref), step.shape
    assert np.dot(step.ravel(), ref.ravel()) >= 0.95 * np.linalg.norm(step) * np.linalg.norm(ref)
    # The float32 run follows the float32 gradient to float32 rounding (the
    # update p0 - lr*g in float32 loses ~1e-7 relative of |p0|/lr per entry).
    tol = 1e-6 * np.abs(np.asarray(p0, np.float64)).max() / lr + 1e-5 * np.abs(ref).max()
    np.testing.assert_allclose(step32, ref, atol=tol)
    bf16_error.append(np.linalg.norm(step - ref) / max(np.linalg.norm(ref), 1e-12))
  # It did compute in bf16: errors far above float32 rounding (bf16 has an
  # 8-bit mantissa, ~4e-3 relative per rounding).
  assert max(bf16_error) > 1e-3, bf16_error
