"""The algorithms against independent whole-model computations."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_trees_close, client_batches, reference_train, small_digits
from sfljax.train import Config, Experiment


def _experiment(dataset=None, parts=None, **kw):
  kw.setdefault("clients", 1 if parts is None else len(parts))
  kw.setdefault("batch_size", 8)
  kw.setdefault("rounds", 2)
  return Experiment(Config(**kw), dataset=dataset or small_digits(), parts=parts)


def _train(exp, rounds):
  state = exp.init()
  for _ in range(rounds):
    state, _ = exp.train_round(state)
  return state


@pytest.mark.parametrize("optimizer,lr,algorithms", [
    ("sgd", 0.05, [("sl", "paper"), ("sflv2", "paper"), ("centralized", "paper")]),
    ("adam", 1e-3, [("sflv1", "paper"), ("sflv2", "client"), ("centralized", "paper")])])
def test_one_client_split_algorithms_equal_centralized_reference(optimizer, lr, algorithms):
  """K=1: SL, SFLV1, SFLV2 (both orders) = whole-model training on the same batches
  (each algorithm with one of the two optimizers, for test time)."""
  ds = small_digits()
  rounds = 2
  ref_exp = _experiment(ds, algorithm="centralized", optimizer=optimizer, lr=lr)
  variables = ref_exp.model.init(jax.random.key(0))
  opt = optax.sgd(lr) if optimizer == "sgd" else optax.adam(lr)
  cd, opt_state = ref_exp.client_data, None
  for r in range(rounds):
    idx, mask = ref_exp.round_inputs(r)[2:4]
    batches = client_batches(np.asarray(idx), np.asarray(mask), 0)
    variables, opt_state = reference_train(ref_exp.model, variables, cd.x[0], cd.y[0],
                                           batches, opt, opt_state)
  for algorithm, order in algorithms:
    exp = _experiment(ds, algorithm=algorithm, sflv2_order=order, optimizer=optimizer, lr=lr)
    state = _train(exp, rounds)
    assert_trees_close(exp.global_variables(state), variables, atol=2e-5)


def test_one_client_cli_style_metrics_identical_across_split_algorithms():
  """With one client the batch order depends only on seed and round: same losses."""
  ds = small_digits()
  hist = {a: _experiment(ds, algorithm=a).run() for a in ("sl", "sflv1", "sflv2")}
  for a in ("sflv1", "sflv2"):
    for h0, h1 in zip(hist["sl"], hist[a]):
      for key in ("train_loss", "test_loss", "test_accuracy"):
        assert h0[key] == pytest.approx(h1[key], abs=1e-5)


def _unequal_dataset_and_parts():
  """3 clients with 20, 13 and 7 samples."""
  ds = small_digits(40, 16)
  parts = [np.arange(0, 20), np.arange(20, 33), np.arange(33, 40)]
  return ds, parts


@pytest.mark.parametrize("algorithm", ["fl", "sflv1"])
@pytest.mark.parametrize("strategy", ["vmap", "sequential"])
def test_unequal_clients_fedavg_equals_per_client_reference(algorithm, strategy):
  """Padding + masking: each client's local epoch matches training on its own
  unpadded shard; the global model is the n_k/n mean (incl. BN statistics)."""
  ds, parts = _unequal_dataset_and_parts()
  exp = _experiment(ds, parts, algorithm=algorithm, batch_size=6, norm="batch",
                    optimizer="adam", lr=1e-3, strategy=strategy)
  variables = exp.model.init(jax.random.key(0))
  idx, mask = (np.asarray(a) for a in exp.round_inputs(0)[2:4])
  locals_, counts = [], []
  for k, p in enumerate(parts):
    v, _ = reference_train(exp.model, variables, ds.x_train[p], ds.y_train[p],
                           client_batches(idx, mask, k), optax.adam(1e-3))
    locals_.append(v)
    counts.append(len(p))
  w = np.asarray(counts, np.float64) / sum(counts)
  expected = jax.tree.map(lambda *xs: sum(wi * np.asarray(x, np.float64) for wi, x in zip(w, xs)),
                          *locals_)
  state = _train(exp, 1)
  got = exp.global_variables(state)
  assert "batch_stats" in got
  assert_trees_close(got, expected, atol=3e-5)


def test_sflv1_one_sgd_step_replica_average_equals_step_on_averaged_gradient():
  """Equal shards, one local step: averaged server replicas = one server step on the
  averaged server gradient (computed here from the whole model)."""
  ds = small_digits(24, 8)
  lr = 0.1
  exp = _experiment(ds, algorithm="sflv1", clients=3, batch_size=8, optimizer="sgd", lr=lr)
  variables = exp.model.init(jax.random.key(0))
  module = exp.model.full()
  idx, mask = (np.asarray(a) for a in exp.round_inputs(0)[2:4])
  cd = exp.client_data

  def loss(params, xb, yb):
    logits = module.apply({"params": params}, xb, train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  grads = [jax.grad(loss)(variables["params"], cd.x[k][idx[k, 0]], cd.y[k][idx[k, 0]])
           for k in range(3)]
  mean_grad = jax.tree.map(lambda *g: sum(np.asarray(x, np.float64) for x in g) / 3, *grads)
  expected = jax.tree.map(lambda p, g: np.asarray(p, np.float64) - lr * g,
                          variables["params"], mean_grad)
  state = _train(exp, 1)
  _, server = exp.model.split_variables({"params": expected}, (exp.cut,))
  assert_trees_close(state.algo.server["params"], server["params"], atol=1e-6)
  assert_trees_close(exp.global_variables(state)["params"], expected, atol=1e-6)


def test_fl_one_sgd_step_equals_centralized_step_on_union_batch(monkeypatch):
  """FL with one local SGD step = one SGD step on the union batch, weighted by n_k."""
  ds, parts = small_digits(30, 8), [np.arange(0, 18), np.arange(18, 30)]
  lr = 0.1
  exp = _experiment(ds, parts, algorithm="fl", batch_size=18, optimizer="sgd", lr=lr)
  variables = exp.model.init(jax.random.key(0))
  module = exp.model.full()

  def loss(params):  # Mean over the union = n_k/n-weighted mean of client means.
    logits = module.apply({"params": params}, ds.x_train[:30], train=True)
    return optax.softmax_cross_entropy_with_integer_labels(logits, ds.y_train[:30]).mean()

  g = jax.grad(loss)(variables["params"])
  expected = jax.tree.map(lambda p, gi: p - lr * gi, variables["params"], g)
  state = _train(exp, 1)
  assert_trees_close(exp.global_variables(state)["params"], expected, atol=1e-6)


def test_sl_with_sgd_equals_whole_model_training_in_client_turn_order(monkeypatch):
  """Vanilla SL relays one model: with SGD it is whole-model training over client
  0's batches, then client 1's, ... in the round's client order."""
  ds, parts = small_digits(36, 8), [np.arange(0, 14), np.arange(14, 26), np.arange(26, 36)]
  exp = _experiment(ds, parts, algorithm="sl", batch_size=5, optimizer="sgd", lr=0.05)
  variables = exp.model.init(jax.random.key(0))
  for r in range(2):
    inp = exp.round_inputs(r)
    idx, mask = np.asarray(inp.idx), np.asarray(inp.mask)
    for k in np.asarray(inp.client_order):
      variables, _ = reference_train(exp.model, variables, ds.x_train[parts[k]],
                                     ds.y_train[parts[k]], client_batches(idx, mask, k),
                                     optax.sgd(0.05))
  state = _train(exp, 2)
  assert_trees_close(exp.global_variables(state), variables, atol=2e-5)


def test_sflv1_equals_fl_with_persistent_optimizers():
  """With per-client optimizer states, SFLV1 (replicas + FedAvg) and FL are the same
  computation; FL takes whole-model gradients, SFLV1 goes through the vjp exchange."""
  ds = small_digits(60, 8)
  got = []
  for algorithm in ("sflv1", "fl"):
    exp = _experiment(ds, algorithm=algorithm, clients=4, norm="batch")
    got.append(exp.global_variables(_train(exp, 2)))
  assert_trees_close(got[0], got[1], atol=3e-5)


@pytest.mark.parametrize("algorithm,order", [("sflv1", "paper"), ("sflv2", "paper"),
                                             ("sflv2", "client"), ("sl", "paper"),
                                             ("fl", "paper")])
def test_vmap_and_sequential_strategies_agree(algorithm, order):
  ds, parts = _unequal_dataset_and_parts()
  got = []
  for strategy in ("vmap", "sequential"):
    exp = _experiment(ds, parts, algorithm=algorithm, sflv2_order=order, batch_size=6,
                      norm="batch", strategy=strategy)
    got.append(exp.global_variables(_train(exp, 2)))
  assert_trees_close(got[0], got[1], atol=2e-5)


@pytest.mark.parametrize("algorithm", ["sflv1", "sflv2", "fl"])
def test_reference_optimizer_policy_stores_no_moments(algorithm):
  """Persistent mode keeps every Adam state in full and counts every step;
  reference mode re-creates them before use (its results are checked against
  the official code's PyTorch loop in cross_framework_test), so the state keeps
  none of their moments or counts: every leaf is empty, one row per client
  where the state is per client."""
  ds = small_digits(48, 8)
  steps = -(-24 // 8)
  ref = _experiment(ds, algorithm=algorithm, clients=2, optimizer_state="reference")
  per = _experiment(ds, algorithm=algorithm, clients=2)
  s_ref, s_per = _train(ref, 2).algo, _train(per, 2).algo
  opts = ((s_ref.opt,), (s_per.opt,)) if algorithm == "fl" else (
      (s_ref.client_opt, s_ref.server_opt), (s_per.client_opt, s_per.server_opt))
  for n, o in enumerate(opts[0]):
    leaves = jax.tree.leaves(o)
    assert leaves and all(a.size == 0 for a in leaves)
    shared = algorithm == "sflv2" and n == 1   # SFLV2's one server: no client rows
    assert all(a.shape == ((0,) if shared else (2, 0)) for a in leaves), [a.shape for a in leaves]
  counts = [np.asarray(o[0].count) for o in opts[1]]
  server_steps = 2 * 2 * steps   # SFLV2's one server: both clients' steps, two rounds
  assert np.all(counts[0] == 2 * steps)
  if algorithm != "fl":
    assert np.all(counts[1] == (server_steps if algorithm == "sflv2" else 2 * steps))


def test_same_seed_identical_metrics_and_different_seed_differs():
  ds = small_digits()
  run = lambda seed: _experiment(ds, algorithm="sflv2", clients=3, seed=seed).run()
  a, b, c = run(0), run(0), run(1)
  strip = lambda h: [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in h]
  assert strip(a) == strip(b)
  assert strip(a) != strip(c)


@pytest.mark.parametrize("step_loop", ["python", "scan"])
def test_no_recompilation_after_first_round(step_loop):
  exp = _experiment(algorithm="sflv1", clients=3, rounds=4, step_loop=step_loop)
  exp.run()
  assert exp.trace_count == len(exp._programs)
  assert all(p._cache_size() == 1 for p in exp._programs.values())


@pytest.mark.parametrize("algorithm", ["sflv2", "sl"])
def test_scan_and_python_step_loops_agree(algorithm):
  got = []
  for step_loop in ("scan", "python"):
    exp = _experiment(algorithm=algorithm, clients=3, step_loop=step_loop)
    got.append(exp.global_variables(_train(exp, 2)))
  assert_trees_close(got[0], got[1], atol=1e-6)


def test_step_keys_follow_client_ids_not_rows():
  """With partial participation (participants' rows are not their ids) and a
  block of rows, every participant's keys at step t are the documented
  fold_in(fold_in(fold_in(round key, t), client id), i): 1-3 dropout, 4 DP noise,
  computed here with jax.random directly."""
  from sfljax import algorithms
  exp = _experiment(small_digits(96, 8), clients=8, client_fraction=0.5, batch_size=4)
  inp = exp.round_inputs(1)
  clients = np.asarray(inp.clients)
  assert not np.array_equal(clients, np.arange(len(clients)))   # Rows differ from ids.
  rows = jnp.asarray([2, 0], jnp.int32)
  t = 3
  ids = algorithms._batch(inp, t, exp.executor, None, rows)[3]
  np.testing.assert_array_equal(np.asarray(ids), clients[[2, 0]])
  keys = algorithms._keys(inp, ids, t, needed=True, noise=True)
  for j, c in enumerate(clients[[2, 0]]):
    base = jax.random.fold_in(jax.random.fold_in(inp.key, t), int(c))
    for i, got in ((1, keys.client), (2, keys.server), (3, keys.tail), (4, keys.noise)):
      want = jax.random.key_data(jax.random.fold_in(base, i))
      np.testing.assert_array_equal(np.asarray(jax.random.key_data(got[j])), np.asarray(want))
  only_noise = algorithms._keys(inp, ids, t, needed=False, noise=True).noise
  np.testing.assert_array_equal(np.asarray(jax.random.key_data(only_noise)),
                                np.asarray(jax.random.key_data(keys.noise)))
