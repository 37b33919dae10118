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
