"""Client faults and non-finite values through the Experiment (the host side:
sfljax.faults draws, metrics, a round nobody reports, stop vs skip)."""

import jax
import numpy as np
import pytest

from conftest import small_digits
from sfljax.config import Config
from sfljax.train import Experiment, NonFiniteError


def _leaves(tree):
  # Copies: a NumPy view of a device buffer on CPU would keep it from being donated.
  return [np.array(a) for a in jax.tree.leaves(tree)]


@pytest.mark.parametrize("donate", [False, True])
@pytest.mark.parametrize("algorithm", ["sflv1", "sflv2", "fl"])
def test_a_round_nobody_reports_keeps_the_previous_model(algorithm, donate):
  # SFLV2's shared server is trained by the batches that reached it before a
  # failure: without the round's own "nobody reported" choice it would move.
  exp = Experiment(Config(algorithm=algorithm, clients=3, rounds=1, batch_size=16,
                          dropout_rate=1.0), dataset=small_digits(), donate=donate)
  state = exp.init()
  before = _leaves(state.algo)
  new, m = exp.step(state)
  assert m["reported"] == 0 and m["failed_clients"] == [0, 1, 2]
  assert new.round == 1
  for a, b in zip(_leaves(new.algo), before):
    np.testing.assert_array_equal(a, b)
  assert all(a.is_deleted() for a in jax.tree.leaves(state.algo)) == donate


def test_a_donating_experiment_computes_the_same_rounds():
  # Failures, skipped non-finite steps and partial participation: every path
  # of the round's end, with the input state's buffers reused or not.
  def history(donate):
    exp = Experiment(Config(algorithm="sflv2", clients=4, rounds=3, batch_size=16,
                            dropout_rate=0.5, on_nonfinite="skip", client_fraction=0.75,
                            seed=3), dataset=small_digits(), donate=donate)
    state, out = exp.init(), []
    for _ in range(3):
      old = state
      state, m = exp.step(state)
      out.append((m["train_loss"], m["failed_clients"], _leaves(state.algo)))
      assert all(a.is_deleted() for a in jax.tree.leaves(old.algo)) == donate
    return out
  for (la, fa, sa), (lb, fb, sb) in zip(history(False), history(True)):
    assert la == lb and fa == fb
    for a, b in zip(sa, sb):
      np.testing.assert_array_equal(a, b)


def test_failures_are_seeded_and_reported_in_the_metrics():
  def history(seed):
    exp = Experiment(Config(algorithm="sflv1", clients=4, rounds=3, batch_size=16,
                            dropout_rate=0.5, seed=seed), dataset=small_digits())
    return exp.run()
  a, b = history(0), history(0)
  assert [m["failed_clients"] for m in a] == [m["failed_clients"] for m in b]
  assert [m["train_loss"] for m in a] == [m["train_loss"] for m in b]
  for m in a:
    assert m["reported"] == 4 - len(m["failed_clients"])
  assert any(m["failed_clients"] for m in a)
  plain = Experiment(Config(algorithm="sflv1", clients=4, rounds=3, batch_size=16),
                     dataset=small_digits()).run()
  assert all(m["failed_clients"] == [] and m["reported"] == 4 for m in plain)


def test_stop_raises_naming_the_round_and_client_and_skip_drops_that_client():
  ds = small_digits()
  x = ds.x_train.copy()
  x[:16] = 3e38                       # Client 0: finite inputs whose activations overflow.
  import dataclasses
  ds = dataclasses.replace(ds, x_train=x)
  parts = [np.arange(0, 16), np.arange(16, 32), np.arange(32, 48)]
  cfg = dict(algorithm="sflv1", clients=3, rounds=2, batch_size=16)
  exp = Experiment(Config(**cfg), dataset=ds, parts=parts)
  state = exp.init()
  with pytest.raises(NonFiniteError, match=r"^round 1: non-finite training loss \(clients 0\)"):
    exp.step(state)
  exp = Experiment(Config(**cfg, on_nonfinite="skip"), dataset=ds, parts=parts)
  state, m = exp.step(exp.init())
  assert m["nonfinite_clients"] == [0] and m["reported"] == 2
  assert all(np.all(np.isfinite(a)) for a in _leaves(state.algo))
  assert np.isfinite(m["test_loss"]) and np.isfinite(m["train_loss"])


def test_a_model_whose_evaluation_overflows_stops_in_either_mode():
  cfg = dict(algorithm="sflv1", clients=3, rounds=6, batch_size=16, optimizer="sgd", lr=1e6)
  for mode in ("stop", "skip"):
    exp = Experiment(Config(**cfg, on_nonfinite=mode), dataset=small_digits())
    state = exp.init()
    with pytest.raises(NonFiniteError, match=r"^round \d+: non-finite"):
      for _ in range(6):
        state, _ = exp.step(state)
