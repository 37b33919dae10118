"""What a researcher reaches for on an Experiment, checked against hand counts."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from conftest import small_digits
from sfljax import data
from sfljax.config import Config, ConfigError
from sfljax.train import DP_METRICS, LEAKAGE_METRICS, METRICS, Experiment


def _exp(algorithm="sflv1", clients=3, **kw):
  ds = small_digits(48, 24)
  parts = [np.arange(16 * k, 16 * (k + 1)) for k in range(clients)]
  kw.setdefault("batch_size", 8)
  return Experiment(Config(algorithm=algorithm, clients=clients, rounds=2, **kw), dataset=ds,
                    parts=parts)


def _counts(opt_state):
  flat, _ = jax.tree_util.tree_flatten_with_path(opt_state)
  return {int(np.asarray(v).ravel()[0]) for p, v in flat if "count" in jax.tree_util.keystr(p)}


def test_samples_are_placed_once_without_a_copy_on_cpu():
  """One device reads the dataset's own images through the clients' rows: no
  padded per-client copy is made, and on CPU the device arrays use the host
  buffers, which are read-only from then on."""
  ds = small_digits(48, 24)
  ds = dataclasses.replace(ds, x_train=data.aligned(ds.x_train),
                           y_train=data.aligned(np.asarray(ds.y_train, np.int32)))
  parts = [np.arange(16 * k, 16 * (k + 1))[::-1] for k in range(3)]
  exp = Experiment(Config(clients=3, rounds=2, batch_size=8), dataset=ds, parts=parts)
  cd = exp.client_data
  assert "x" not in vars(cd) and "y" not in vars(cd)   # the padded copy: never built
  np.testing.assert_array_equal(np.asarray(exp._x), ds.x_train)
  np.testing.assert_array_equal(np.asarray(exp._y), ds.y_train)
  np.testing.assert_array_equal(np.asarray(exp._rows), np.stack(parts))
  if jax.default_backend() == "cpu":
    assert exp._x.unsafe_buffer_pointer() == ds.x_train.ctypes.data
  with pytest.raises(ValueError, match="read-only"):
    ds.x_train[0, 0] = 1.0
  assert ds.y_train.flags.writeable   # the labels are copied (int32), the caller's stay theirs
  # On demand, the padded shards are the parts' samples.
  np.testing.assert_array_equal(cd.x[1], ds.x_train[parts[1]])
  np.testing.assert_array_equal(cd.y[2], ds.y_train[parts[2]])


@pytest.mark.parametrize("algorithm,server_updates", [("sflv1", 2), ("sflv2", 6), ("sl", 6)])
def test_schedules_count_updates_per_side(algorithm, server_updates):
  """3 clients x 16 samples, batch 8: each client takes 2 steps per round; a
  replica takes its client's 2, a shared server all 6."""
  exp = _exp(algorithm, lr_schedule="cosine")
  assert exp.steps_per_round == (2 if algorithm != "sl" else 6)
  state, _ = exp.train_round(exp.init())
  assert _counts(state.algo.client_opt) == {2}
  assert _counts(state.algo.server_opt) == {server_updates}


def test_per_client_metrics_and_documented_keys():
  exp = _exp("sflv2")
  state, m = exp.step(exp.init())
  assert set(m) <= set(METRICS)
  assert set(METRICS) - set(DP_METRICS) - set(LEAKAGE_METRICS) <= set(m)
  assert len(m["client_train_loss"]) == 3
  # The round's loss is the sample-weighted mean of the clients' (16 samples each).
  assert m["train_loss"] == pytest.approx(np.mean(m["client_train_loss"]), rel=1e-6)
  part = _exp("sflv1", client_fraction=0.34)
  _, m = part.step(part.init())
  assert sum(v is not None for v in m["client_train_loss"]) == 1


def test_evaluate_on_own_arrays_matches_a_direct_apply():
  exp = _exp()
  state, _ = exp.train_round(exp.init())
  v = exp.global_variables(state)
  x, y = exp.dataset.x_test[:10], exp.dataset.y_test[:10]
  logits = exp.model.full().apply(v, x, train=False)
  got = exp.evaluate(v, x, y)
  assert got["accuracy"] == pytest.approx(float(np.mean(np.argmax(logits, -1) == y)))
  assert got["loss"] == pytest.approx(float(np.mean(
      optax.softmax_cross_entropy_with_integer_labels(logits, y))), rel=1e-5)


def test_sflv3_client_models_and_their_test_accuracy():
  """Each client's own model = its own client part + the averaged server; its
  client_test_accuracy is that model on the client's own test shard."""
  exp = _exp("sflv3")
  state, m = exp.step(exp.init())
  models = exp.client_models(state)
  acc = []
  for k, shard in enumerate(exp._test_shards):
    v = jax.tree.map(lambda a: a[k], models)
    logits = exp.model.full().apply(v, exp.dataset.x_test[shard], train=False)
    acc.append(np.mean(np.argmax(logits, -1) == exp.dataset.y_test[shard]))
  assert m["client_test_accuracy"] == pytest.approx(float(np.mean(acc)))
  # The clients' own client parts differ (no aggregation); the server part is one model.
  c = jax.tree.leaves(state.algo.client)[0]
  assert not np.allclose(c[0], c[1])
  assert _exp("sflv1").client_models(exp.init()) is None


@pytest.mark.parametrize("algorithm,kw", [("sflv1", {}), ("sflv2", {"sflv2_order": "client"})])
def test_local_models_are_the_pre_aggregation_models(algorithm, kw):
  """FedAvg (weights 16 each) of the local client parts = the next state's client part
  (SFLV2 in client order: the last client's row is written back after its last event)."""
  exp = _exp(algorithm, **kw)
  state = exp.init()
  local = exp.local_models(state)
  new, _ = exp.train_round(state)
  avg = jax.tree.map(lambda a: np.mean(np.asarray(a, np.float64), axis=0), local["client"])
  for a, b in zip(jax.tree.leaves(avg), jax.tree.leaves(new.algo.client)):
    np.testing.assert_allclose(a, np.asarray(b), atol=1e-6)
  program = exp._local
  exp.local_models(new)
  assert exp._local is program and program._cache_size() == 1   # asked again: no recompilation


def test_compilation_is_kept_out_of_the_first_rounds_seconds():
  exp = _exp(batch_size=7, eval_batch_size=13)   # shapes no other test compiles
  state, m1 = exp.step(exp.init())
  state, m2 = exp.step(state)
  assert exp.compile_seconds is not None and exp.compile_seconds > m1["seconds"]
  assert m1["seconds"] < 5 * m2["seconds"] + 0.3   # round 1 costs about what round 2 does


def test_dropout_keys_per_client_and_step():
  """Two clients with the same data and init but their own dropout keys train to
  different models; the same seed repeats bit for bit."""
  ds = small_digits(16, 8)
  ds = dataclasses.replace(ds, x_train=np.concatenate([ds.x_train, ds.x_train]),
                           y_train=np.concatenate([ds.y_train, ds.y_train]))
  parts = [np.arange(16), np.arange(16, 32)]   # the same 16 images on both clients
  cfg = Config(algorithm="sflv3", clients=2, batch_size=8, dropout=0.5, rounds=1)
  runs = []
  for _ in range(2):
    exp = Experiment(cfg, dataset=ds, parts=parts)
    runs.append(exp.train_round(exp.init())[0])
  c = jax.tree.leaves(runs[0].algo.client)[0]
  assert not np.allclose(c[0], c[1])
  for a, b in zip(jax.tree.leaves(runs[0].algo), jax.tree.leaves(runs[1].algo)):
    np.testing.assert_array_equal(a, b)


def test_bad_datasets_and_parts_are_refused_naming_the_argument():
  ds = small_digits(48, 24)
  bad = ds.__class__(**{**ds.__dict__, "y_train": ds.y_train + 10})
  with pytest.raises(ConfigError, match="dataset.y_train"):
    Experiment(Config(clients=1), dataset=bad, parts=[np.arange(48)])
  with pytest.raises(ConfigError, match="parts: "):
    Experiment(Config(clients=2), dataset=ds, parts=[np.arange(30), np.arange(20, 48)])
  with pytest.raises(ConfigError, match=r"^cut \(--cut\): "):
    Experiment(Config(cut="conv9"), dataset=ds)


@pytest.mark.parametrize("seed", [0, 2**31 - 1])
def test_round_key_is_documented_fold_in(seed):
  """RoundInputs.key of round r is fold_in(key(seed + 1), r) (computed by a
  compiled function, not eagerly), also for the largest seed."""
  exp = _exp(seed=seed)
  for r in (0, 3, 1000):
    want = jax.random.key_data(jax.random.fold_in(jax.random.key(seed + 1), r))
    np.testing.assert_array_equal(jax.random.key_data(exp.round_inputs(r).key), want)
