"""Failed clients (``RoundInputs.reported``, :mod:`sfljax.faults`) and skipped non-finite steps.

Everything runs through the algorithm API (build / round / begin+steps) on a
tiny MLP over 8x8 digits, 3 clients with unequal shards (12, 20, 28 samples,
batch 8: 4 steps per round), SGD with momentum (so that optimizer states have
rows to check). References are computed by hand: the
per-participant trained parts taken from the round's working state before the
aggregation (the local training does not depend on who reports), averaged in
float64 over the reporters; a plain Python loop with whole-model gradients for
the relayed (SL) client model.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import assert_trees_close
from sfljax import algorithms, data, faults, models

LR = 0.1
OPT = optax.sgd(LR, momentum=0.9)
BATCH = 8
SIZES = (12, 20, 28)
CUT = 4                  # flat, fc1, bn, relu | fc2, relu2, head
U_CUT = (4, 6)           # U-shaped: the head block stays on the client

MODEL = models.SplitModel.from_modules(
    [("flat", lambda a: a.reshape((a.shape[0], -1))), ("fc1", nn.Dense(12)),
     ("bn", nn.BatchNorm(momentum=0.9)), ("relu", nn.relu), ("fc2", nn.Dense(12)),
     ("relu2", nn.relu), ("head", nn.Dense(10))],
    input_shape=(8, 8, 1), num_classes=10, name="tiny")


@functools.lru_cache(maxsize=None)
def _client_data():
  ds = data.load_digits(0, image_size=8)
  bounds = np.cumsum((0,) + SIZES)
  parts = [np.arange(bounds[k], bounds[k + 1]) for k in range(len(SIZES))]
  return data.ClientData.from_partition(ds.x_train, ds.y_train, parts)


@functools.lru_cache(maxsize=None)
def _variables():
  return MODEL.init(jax.random.key(0))


@functools.lru_cache(maxsize=None)
def _alg(name, skip=False, cuts=CUT):
  return algorithms.build(name, MODEL, cut=cuts, optimizer=OPT, skip_nonfinite=skip)


@functools.lru_cache(maxsize=None)
def _round(name, skip=False, cuts=CUT):
  return jax.jit(_alg(name, skip, cuts).round)


@functools.lru_cache(maxsize=None)
def _working(name, skip=False, cuts=CUT):
  """The round's working state after every step, before the aggregation."""
  alg = _alg(name, skip, cuts)

  def working(state, inp):
    carry = alg.begin(state, inp)
    return jax.lax.fori_loop(0, alg.num_steps(inp), lambda t, c: alg.step(c, inp, t), carry)

  return jax.jit(working)


def _schedule(round_index=0):
  return data.batch_schedule(_client_data().counts, BATCH, seed=0, round_index=round_index)


def _inputs(mask=None, reported=None, x=None, clients=None, client_order=(0, 1, 2),
            round_index=0):
  cd = _client_data()
  idx, default_mask = _schedule(round_index)
  mask = default_mask if mask is None else mask
  ids = np.arange(len(SIZES)) if clients is None else np.asarray(clients)
  idx, mask = idx[ids], mask[ids]
  rng = data.rng_for(0, 3, round_index)
  steps = idx.shape[1]
  step_orders = np.stack([rng.permutation(len(ids)) for _ in range(steps)]).astype(np.int32)
  return algorithms.RoundInputs(
      jnp.asarray(cd.x if x is None else x), jnp.asarray(cd.y), jnp.asarray(idx),
      jnp.asarray(mask), jnp.asarray(cd.counts[ids], jnp.float32), jnp.asarray(step_orders),
      jnp.asarray(client_order, jnp.int32), jax.random.key(round_index),
      None if clients is None else jnp.asarray(clients, jnp.int32),
      None if reported is None else jnp.asarray(reported, bool))


def _state(name, cuts=CUT):
  return _alg(name, cuts=cuts).init(_variables(), len(SIZES))


def _hand_average(stacked, weights, reported):
  """float64 n_k-weighted mean over the reporters of a [M, ...] tree."""
  w = np.asarray(weights, np.float64) * np.asarray(reported, np.float64)
  w = w / w.sum()
  return jax.tree.map(lambda a: np.tensordot(w, np.asarray(a, np.float64), axes=1), stacked)


def _rows(tree, rows):
  return jax.tree.map(lambda a: np.asarray(a)[np.asarray(rows)], tree)


def _assert_equal(a, b):
  la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _differs(a, b):
  return any(not np.array_equal(np.asarray(x), np.asarray(y))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


REPORTED = (True, False, True)
W = np.asarray(SIZES, np.float64)


# -- section 1: reported ----------------------------------------------------

def test_sflv1_fedavg_and_replicas_reweighted_over_reporters():
  state = _state("sflv1")
  carry = _working("sflv1")(state, _inputs())            # local training, nobody failed
  new, stats = _round("sflv1")(state, _inputs(reported=REPORTED))
  assert_trees_close(new.client, _hand_average(carry.client, W, REPORTED), atol=1e-6)
  assert_trees_close(new.server, _hand_average(carry.server, W, REPORTED), atol=1e-6)
  assert _differs(new.client, _round("sflv1")(state, _inputs())[0].client)
  # Optimizer rows: the failed participant's as at the round's start, the others trained.
  for got, trained, start in ((new.client_opt, carry.client_opt, state.client_opt),
                              (new.server_opt, carry.server_opt, state.server_opt)):
    _assert_equal(_rows(got, [0, 2]), _rows(trained, [0, 2]))
    _assert_equal(_rows(got, [1]), _rows(start, [1]))
  np.testing.assert_array_equal(np.asarray(stats.nonfinite), [0, 0, 0])
  # Everyone reporting is the program without failure handling, bit for bit.
  _assert_equal(_round("sflv1")(state, _inputs(reported=(True,) * 3)),
                _round("sflv1")(state, _inputs()))


def test_fl_reweighted_over_reporters():
  state = _state("fl")
  carry = _working("fl")(state, _inputs())
  new, _ = _round("fl")(state, _inputs(reported=REPORTED))
  assert_trees_close(new.model, _hand_average(carry.models, W, REPORTED), atol=1e-6)
  _assert_equal(_rows(new.opt, [0, 2]), _rows(carry.opt, [0, 2]))
  _assert_equal(_rows(new.opt, [1]), _rows(state.opt, [1]))


@pytest.mark.parametrize("name", ["sflv1", "sflv2", "sl", "fl"])
def test_nobody_reports_keeps_the_round_start_models(name):
  state = _state(name)
  new, _ = _round(name)(state, _inputs(reported=(False,) * 3))
  if name == "fl":
    _assert_equal(new.model, state.model)
    _assert_equal(new.opt, state.opt)
    return
  _assert_equal(new.client, state.client)      # FedAvg'd or relayed client part
  _assert_equal(new.client_opt, state.client_opt)
  if name == "sflv1":                          # replicas: the average of none
    _assert_equal(new.server, state.server)
    _assert_equal(new.server_opt, state.server_opt)
  else:                                        # a shared server keeps what it trained
    assert _differs(new.server, state.server)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(new))


def test_sflv3_failed_client_keeps_its_own_part_and_optimizer_rows():
  """Partial participation (clients 0, 2 of 3 take part) with client 2 failing:
  its rows and the non-participant's stay, client 0's are trained."""
  state = _state("sflv3")
  reported_run, _ = _round("sflv3")(state, _inputs(clients=[0, 2], reported=[True, False],
                                                   client_order=(0, 1)))
  normal_run, _ = _round("sflv3")(state, _inputs(clients=[0, 2], client_order=(0, 1)))
  for field in ("client", "client_opt", "server_opt"):
    got, normal, start = (getattr(s, field) for s in (reported_run, normal_run, state))
    _assert_equal(_rows(got, [0]), _rows(normal, [0]))
    assert _differs(_rows(got, [0]), _rows(start, [0]))
    _assert_equal(_rows(got, [1, 2]), _rows(start, [1, 2]))
  assert _differs(reported_run.server, normal_run.server)   # client 2's replica left out


@jax.jit
def _whole_step(cvars, svars, copt, sopt, x, y):
  """One optimizer step of the whole model on a batch, by parts: (client vars,
  server vars, client opt, server opt) after it."""
  module = MODEL.full()

  def loss(cp, sp):
    v = MODEL.merge_variables(({**cvars, "params": cp}, {**svars, "params": sp}))
    logits, upd = module.apply(v, x, train=True, mutable=["batch_stats"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), upd

  (gc, gs), upd = jax.grad(loss, argnums=(0, 1), has_aux=True)(cvars["params"],
                                                                 svars["params"])
  new_c, new_s = MODEL.split_variables({**MODEL.merge_variables((cvars, svars)), **upd}, (CUT,))
  uc, copt = OPT.update(gc, copt, cvars["params"])
  us, sopt = OPT.update(gs, sopt, svars["params"])
  return ({**new_c, "params": optax.apply_updates(cvars["params"], uc)},
          {**new_s, "params": optax.apply_updates(svars["params"], us)}, copt, sopt)


def test_sl_failed_client_turn_discarded_shared_server_keeps_its_batches():
  """SL, clients in turn 0, 1, 2; client 1 fails after the forward pass of its
  step 1 (batches 2, 3 masked out). Reference: a plain loop of whole-model SGD
  steps where the relayed model goes back to what client 1 was handed at the
  end of its turn, while the shared server keeps its steps on client 1's
  batches 0 and 1."""
  cd = _client_data()
  idx, mask = _schedule()
  f = faults.Faults(np.array(REPORTED), np.array([-1, 1, -1]))
  mask = faults.apply(mask, f, "after_forward")
  assert mask[1, :2].any() and not mask[1, 2:].any()
  state = _state("sl")
  new, stats = _round("sl")(state, _inputs(mask=mask, reported=f.reported))
  relayed, shared = state.client, state.server
  sopt = OPT.init(shared["params"])
  copts = [OPT.init(relayed["params"]) for _ in range(3)]   # every client keeps its own
  for k in (0, 1, 2):
    handed = relayed
    for t in range(idx.shape[1]):
      if mask[k, t].any():
        b = idx[k, t][mask[k, t]]
        relayed, shared, copts[k], sopt = _whole_step(relayed, shared, copts[k], sopt,
                                                      cd.x[k][b], cd.y[k][b])
    if not f.reported[k]:
      relayed = handed
  assert_trees_close(new.client, relayed, atol=2e-5)
  assert_trees_close(new.server, shared, atol=2e-5)
  assert_trees_close(new.server_opt, sopt, atol=2e-5)
  assert_trees_close(_rows(new.client_opt, [0, 2]),
                     jax.tree.map(lambda a, b: np.stack([a, b]), copts[0], copts[2]), atol=2e-5)
  _assert_equal(_rows(new.client_opt, [1]), _rows(state.client_opt, [1]))
  assert float(stats.count[1]) == mask[1].sum()   # its batches up to the failure reached the server


def test_sflv2_shared_server_keeps_failed_clients_updates():
  """Same fault-applied mask, client 1 failed vs everyone reporting: the shared
  server (and its optimizer state) is identical, the client part is not."""
  idx, mask = _schedule()
  f = faults.Faults(np.array(REPORTED), np.array([-1, 0, -1]))
  mask = faults.apply(mask, f, "after_forward")
  state = _state("sflv2")
  failed, _ = _round("sflv2")(state, _inputs(mask=mask, reported=f.reported))
  everyone, _ = _round("sflv2")(state, _inputs(mask=mask, reported=(True,) * 3))
  _assert_equal(failed.server, everyone.server)
  _assert_equal(failed.server_opt, everyone.server_opt)
  assert _differs(failed.server, state.server)
  assert _differs(failed.client, everyone.client)
  _assert_equal(_rows(failed.client_opt, [1]), _rows(state.client_opt, [1]))


# -- section 2: faults.draw / apply -------------------------------------------

def _unequal_mask(local_epochs=2):
  return data.batch_schedule(np.array([3, 17, 9, 25, 1, 12]), 4, seed=1, round_index=2,
                             local_epochs=local_epochs)[1]


def test_draw_is_deterministic_and_fail_steps_are_real_steps():
  mask = _unequal_mask()
  real = faults.real_steps(mask)
  np.testing.assert_array_equal(real.sum(-1), 2 * np.ceil(np.array([3, 17, 9, 25, 1, 12]) / 4))
  seen_late_epoch = False
  for r in range(40):
    a = faults.draw(7, r, mask, 0.5, "after_forward")
    b = faults.draw(7, r, mask, 0.5, "after_forward")
    _assert_equal(tuple(a), tuple(b))
    assert a.reported.dtype == bool and a.reported.shape == (6,)
    for k in range(6):
      if a.reported[k]:
        assert a.fail_step[k] == -1
      else:
        assert real[k, a.fail_step[k]]
        seen_late_epoch |= a.fail_step[k] >= mask.shape[1] // 2
    up = faults.draw(7, r, mask, 0.5, "before_upload")
    _assert_equal(up.reported, a.reported)       # the same clients fail, at their last step
    last = np.array([np.flatnonzero(real[k])[-1] for k in range(6)])
    np.testing.assert_array_equal(up.fail_step, np.where(up.reported, -1, last))
    more = faults.draw(7, r, mask, 0.8, "after_forward")
    assert not (~a.reported & more.reported).any()   # failing at 0.5 -> failing at 0.8
  assert seen_late_epoch                         # failures in the second local epoch too
  rounds = {tuple(faults.draw(7, r, mask, 0.5, "after_forward").reported) for r in range(40)}
  assert len(rounds) > 10


def test_draw_edge_rates_and_bad_arguments():
  mask = _unequal_mask()
  none = faults.draw(0, 0, mask, 0.0, "after_forward")
  assert none.reported.all() and (none.fail_step == -1).all()
  np.testing.assert_array_equal(faults.apply(mask, none, "after_forward"), mask)
  everyone = faults.draw(0, 0, mask, 1.0, "after_forward")
  assert not everyone.reported.any()
  rate = np.mean([~faults.draw(0, r, mask, 0.3, "after_forward").reported
                  for r in range(300)])
  assert 0.25 < rate < 0.35
  with pytest.raises(ValueError, match="point"):
    faults.draw(0, 0, mask, 0.1, "midway")
  with pytest.raises(ValueError, match="rate"):
    faults.draw(0, 0, mask, 1.5, "after_forward")


def test_apply_masks_exactly_the_steps_after_the_fail_step():
  mask = _unequal_mask()
  f = faults.draw(3, 1, mask, 0.6, "after_forward")
  assert (~f.reported).sum() >= 2
  out = faults.apply(mask, f, "after_forward")
  assert out is not mask and np.array_equal(mask, _unequal_mask())   # input untouched
  for k in range(6):
    if f.reported[k]:
      np.testing.assert_array_equal(out[k], mask[k])
    else:
      s = f.fail_step[k]
      np.testing.assert_array_equal(out[k, :s + 1], mask[k, :s + 1])
      assert not out[k, s + 1:].any()
  assert faults.apply(mask, f, "before_upload") is mask


# -- section 3: skip_nonfinite -----------------------------------------------

def _poisoned_x(client, rows, value=np.nan):
  x = np.array(_client_data().x)
  x[client, rows] = value
  return x


def _step_of(sample, client=1):
  idx, mask = _schedule()
  return [t for t in range(idx.shape[1]) if (mask[client, t] & (idx[client, t] == sample)).any()]


def test_skip_nonfinite_sflv1_drops_the_client_and_stays_finite():
  state = _state("sflv1")
  x = _poisoned_x(1, slice(None))                       # all of client 1's data is NaN
  new, stats = _round("sflv1", skip=True)(state, _inputs(x=x))
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(new))
  real_steps = faults.real_steps(_schedule()[1]).sum(-1)
  np.testing.assert_array_equal(np.asarray(stats.nonfinite), [0, real_steps[1], 0])
  assert float(stats.count[1]) == 0 and np.isfinite(np.asarray(stats.loss_sum)).all()
  np.testing.assert_array_equal(np.asarray(stats.count), [SIZES[0], 0, SIZES[2]])
  carry = _working("sflv1")(state, _inputs())           # clean data, nobody failed
  assert_trees_close(new.client, _hand_average(carry.client, W, REPORTED), atol=1e-6)
  assert_trees_close(new.server, _hand_average(carry.server, W, REPORTED), atol=1e-6)
  _assert_equal(_rows(new.client_opt, [1]), _rows(state.client_opt, [1]))
  # Skipping off: the NaN reaches the model.
  off, off_stats = _round("sflv1")(state, _inputs(x=x))
  assert not np.isfinite(np.asarray(off.client["params"]["fc1"]["kernel"])).all()
  np.testing.assert_array_equal(np.asarray(off_stats.nonfinite), [0, 0, 0])


@pytest.mark.parametrize("name,cuts", [("sflv2", CUT), ("sl", CUT), ("sflv2", U_CUT)])
def test_skip_nonfinite_one_batch_equals_masking_it_out(name, cuts):
  """One inf sample in client 1's step s: with skipping, the round equals the
  round on clean data with that step masked out and client 1 not reported
  (the shared server never takes the bad batch; client 1's update is dropped)."""
  idx, mask = _schedule()
  sample = int(idx[1, 1, 0])
  (s,) = _step_of(sample)
  x = _poisoned_x(1, sample, np.inf)
  state = _state(name, cuts)
  got, stats = _round(name, True, cuts)(state, _inputs(x=x))
  masked = mask.copy()
  masked[1, s] = False
  want, want_stats = _round(name, False, cuts)(state, _inputs(mask=masked, reported=REPORTED))
  assert_trees_close(got, want, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(stats.nonfinite), [0, 1, 0])
  np.testing.assert_allclose(np.asarray(stats.loss_sum), np.asarray(want_stats.loss_sum),
                             rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(stats.count), np.asarray(want_stats.count))


def test_skip_nonfinite_fl_drops_the_client():
  state = _state("fl")
  x = _poisoned_x(1, slice(None), np.inf)
  new, stats = _round("fl", skip=True)(state, _inputs(x=x))
  want, want_stats = _round("fl")(state, _inputs(reported=REPORTED))
  assert_trees_close(new, want, atol=1e-6)
  assert np.asarray(stats.nonfinite)[1] > 0 and np.asarray(stats.nonfinite)[[0, 2]].sum() == 0
  np.testing.assert_array_equal(np.asarray(stats.count), [SIZES[0], 0, SIZES[2]])
  np.testing.assert_allclose(np.asarray(stats.loss_sum)[[0, 2]],
                             np.asarray(want_stats.loss_sum)[[0, 2]], rtol=1e-6)
  assert float(stats.loss_sum[1]) == 0 and float(stats.correct[1]) == 0
  off, _ = _round("fl")(state, _inputs(x=x, reported=(True,) * 3))   # skipping off
  assert not np.isfinite(np.asarray(off.model["params"]["fc1"]["kernel"])).all()


SQRT_MODEL = models.SplitModel.from_modules(
    [("flat", lambda a: a.reshape((a.shape[0], -1))), ("fc1", nn.Dense(12)),
     ("sqrt", lambda a: jnp.sqrt(jnp.abs(a))), ("fc2", nn.Dense(12)), ("relu", nn.relu),
     ("head", nn.Dense(10))],
    input_shape=(8, 8, 1), num_classes=10, name="sqrt")


def test_skip_nonfinite_client_gradients_only():
  """A batch whose loss and server gradients are finite but whose client
  gradients are not (sqrt|a| at a = 0: an all-zero sample through fc1 with its
  zero initial bias, at client 1's first step): SFLV1 skips that client step,
  counts it, and drops client 1 -- the same as skipping off with client 1 not
  reporting (its NaN client part left out of the average)."""
  idx, _ = _schedule()
  x = _poisoned_x(1, int(idx[1, 0, 0]), 0.0)
  alg_on, alg_off = (algorithms.build("sflv1", SQRT_MODEL, cut=3, optimizer=OPT,
                                      skip_nonfinite=skip) for skip in (True, False))
  state = alg_on.init(SQRT_MODEL.init(jax.random.key(0)), len(SIZES))
  got, stats = jax.jit(alg_on.round)(state, _inputs(x=x))
  want, _ = jax.jit(alg_off.round)(state, _inputs(x=x, reported=REPORTED))
  np.testing.assert_array_equal(np.asarray(stats.nonfinite), [0, 1, 0])
  assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(got))
  assert_trees_close(got, want, atol=1e-6)


def test_server_update_alone_skips_nonfinite_gradients():
  """For labels sides of one's own that call ``server_update`` directly."""
  state = _state("sflv2")
  grads = jax.tree.map(lambda a: jnp.full_like(a, jnp.nan), state.server["params"])
  sv, so = _alg("sflv2", True).server_update(state.server, state.server_opt, state.server,
                                             grads, jnp.asarray(True))
  _assert_equal((sv, so), (state.server, state.server_opt))
  sv, _ = _alg("sflv2").server_update(state.server, state.server_opt, state.server, grads,
                                      jnp.asarray(True))
  assert not np.isfinite(np.asarray(sv["params"]["head"]["kernel"])).any()


def test_failure_handling_is_compiled_only_when_asked():
  """reported=None and skipping off: fewer operations than with either (the
  default program has no failure handling and no extra finiteness tests)."""
  state = _state("sflv2")
  jaxpr = lambda skip, inp: str(jax.make_jaxpr(_alg("sflv2", skip).round)(state, inp))  # noqa
  off, on = jaxpr(False, _inputs()), jaxpr(True, _inputs())
  reported = jaxpr(False, _inputs(reported=REPORTED))
  assert off.count("is_finite") < on.count("is_finite")
  assert off.count("is_finite") == reported.count("is_finite")
  assert len(off.splitlines()) < len(reported.splitlines()) < len(on.splitlines())
