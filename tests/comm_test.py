"""Communication counts against the paper's Table 2 formulas, sizes computed by hand."""

import pytest

from sfljax.train import Config, Experiment

F32 = 4
# LeNet on 28x28x1, 10 classes, by hand: conv1 5*5*1*6+6, conv2 5*5*6*16+16,
# fc1 400*120+120, fc2 120*84+84, fc3 84*10+10.
CLIENT_PARAMS = (5 * 5 * 1 * 6 + 6) + (5 * 5 * 6 * 16 + 16)
FULL_PARAMS = CLIENT_PARAMS + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)
Q = 16 * 5 * 5 * F32   # smashed data of one sample after conv2 + pool: 16 x 5 x 5


@pytest.mark.parametrize("algorithm", ["sl", "sflv1", "sflv2"])
@pytest.mark.parametrize("local_epochs", [1, 2])
def test_split_traffic_matches_paper_formula(algorithm, local_epochs):
  k = 5
  exp = Experiment(Config(algorithm=algorithm, clients=k, local_epochs=local_epochs))
  p = len(exp.dataset.y_train) * local_epochs          # samples processed per round
  w_client = CLIENT_PARAMS * F32                       # beta * |W|
  t = exp.traffic
  per_client_paper = 2 * (p / k) * Q + 2 * w_client     # (2p/K) q + 2 beta |W|
  assert t.smashed + t.smashed_grad + t.model_up + t.model_down == pytest.approx(k * per_client_paper)
  assert t.labels == p * F32                            # int32 labels travel with the smashed data
  assert t.client_to_server == p * Q + p * F32 + k * w_client
  assert t.server_to_client == p * Q + k * w_client


def test_fl_and_centralized_traffic():
  exp = Experiment(Config(algorithm="fl", clients=7))
  assert exp.traffic.client_to_server == exp.traffic.server_to_client == 7 * FULL_PARAMS * F32
  assert exp.traffic.smashed == 0
  assert Experiment(Config(algorithm="centralized")).traffic.client_to_server == 0


def test_metrics_report_the_counts():
  exp = Experiment(Config(algorithm="sflv2", clients=3, rounds=1))
  (m,) = exp.run()
  p = len(exp.dataset.y_train)
  assert m["bytes_client_to_server"] == p * Q + p * F32 + 3 * CLIENT_PARAMS * F32
  assert m["bytes_server_to_client"] == p * Q + 3 * CLIENT_PARAMS * F32
  assert m["bytes_smashed"] == p * Q


def _measured_bytes(algorithm, cut, rounds_inputs=0):
  """Runs one round with spies on the exchange and returns the bytes of the arrays that
  actually crossed, per kind: per-sample row sizes from the arrays the server received
  and sent, times the real samples in the round's masks."""
  import dataclasses

  import jax
  import numpy as np

  from conftest import small_digits
  from sfljax import algorithms, sides

  rows = {}

  def record(kind, array):
    rows[kind] = array.size * array.dtype.itemsize // array.shape[0]   # bytes of one sample

  two = sides.SERVER_LABELS
  u = sides.CLIENT_LABELS

  def server_step(module, variables, smashed, labels, mask, *args):
    record("smashed", smashed)
    record("labels", labels)
    out = two.server_step(module, variables, smashed, labels, mask, *args)
    record("smashed_grad", out[1])
    return out

  def server_forward(module, variables, smashed, mask, *args):
    record("smashed", smashed)
    out = u.server_forward(module, variables, smashed, mask, *args)
    record("server_out", out[0])
    return out

  def server_backward(vjp_fn, d_out):
    record("server_out_grad", d_out)
    out = u.server_backward(vjp_fn, d_out)
    record("smashed_grad", out[1])
    return out

  labels = (dataclasses.replace(u, server_forward=server_forward, server_backward=server_backward)
            if "," in cut else dataclasses.replace(two, server_step=server_step))
  comp = algorithms.COMPOSITIONS[algorithm].with_labels(labels)
  ds = small_digits(45, 10)
  parts = [np.arange(0, 20), np.arange(20, 33), np.arange(33, 45)]
  exp = Experiment(Config(algorithm=algorithm, cut=cut, clients=3, batch_size=8, rounds=1),
                   dataset=ds, parts=parts, algorithm=comp)
  state = exp.init()
  samples = int(np.asarray(exp.round_inputs(0).mask).sum())
  _, metrics = exp.step(state)
  client_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state.algo.client))
  return metrics, {k: v * samples for k, v in rows.items()}, client_bytes, samples


@pytest.mark.parametrize("algorithm,cut", [("sflv2", "2"), ("sflv1", "1,4"), ("sl", "conv2,fc2")])
def test_traffic_equals_the_bytes_of_the_arrays_exchanged(algorithm, cut):
  metrics, measured, client_bytes, samples = _measured_bytes(algorithm, cut)
  assert samples == 45
  for kind in ("smashed", "smashed_grad", "labels", "server_out", "server_out_grad"):
    assert metrics[f"bytes_{kind}"] == measured.get(kind, 0), kind
  assert metrics["bytes_model_up"] == metrics["bytes_model_down"] == 3 * client_bytes
  if "," in cut:   # U-shaped: labels never travel; the body's output and its gradient do.
    assert metrics["bytes_labels"] == 0 and metrics["bytes_server_out"] > 0


def test_u_shaped_traffic_matches_the_formula_by_hand():
  """LeNet cut 1,4: head conv1 (6x14x14 after pool) up, fc2's 84 outputs down; the
  client model is conv1 + fc3. Per client (2p/K)(q1 + q2) + 2|W^C|."""
  k = 5
  exp = Experiment(Config(algorithm="sflv1", cut="1,4", clients=k))
  p = len(exp.dataset.y_train)
  q1, q2 = 6 * 14 * 14 * F32, 84 * F32
  w_client = ((5 * 5 * 1 * 6 + 6) + (84 * 10 + 10)) * F32
  t = exp.traffic
  assert (t.smashed, t.smashed_grad, t.server_out, t.server_out_grad, t.labels) == (
      p * q1, p * q1, p * q2, p * q2, 0)
  assert t.client_to_server + t.server_to_client == pytest.approx(
      k * (2 * (p / k) * (q1 + q2) + 2 * w_client))
