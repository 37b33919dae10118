"""Client-side DP-SGD in a whole run: Poisson batches, epsilon per round against
a direct dp-accounting computation, the ledger through a checkpoint, the
calibrated noise in config.json, and bad settings refused in one line."""

import json
import math
import warnings

import dp_accounting
import jax
import numpy as np
import pytest

from sfljax.cli import main
from sfljax.config import Config, ConfigError
from sfljax.train import Experiment

BASE = dict(dataset="digits", clients=3, rounds=2, batch_size=64, norm="none", lr=3e-3,
            dp_clip=1.0, dp_noise=1.1, seed=4)


def _direct_epsilon(q, sigma, steps, delta):
  event = dp_accounting.SelfComposedDpEvent(
      dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
  acc = dp_accounting.rdp.RdpAccountant()
  acc.compose(event)
  return acc.get_epsilon(delta)


def test_epsilon_per_round_and_the_ledger_through_a_checkpoint(tmp_path):
  exp = Experiment(Config(**BASE))
  history = exp.run()
  counts = exp.client_data.counts
  for m in history:
    r = m["round"]
    want = [_direct_epsilon(min(1.0, 64 / n), 1.1, r * math.ceil(n / 64), 1e-5) for n in counts]
    np.testing.assert_allclose(m["client_epsilon"], want, rtol=1e-9)
    assert m["epsilon"] == max(m["client_epsilon"]) and m["dp_overflow_steps"] == 0
    assert np.isfinite(m["test_loss"])
  assert history[1]["epsilon"] > history[0]["epsilon"] > 0
  # Resumed from round 1's checkpoint: round 2 is the uninterrupted run's, bit for bit.
  first = exp.init()
  first, _ = exp.step(first)
  exp.save(first, str(tmp_path / "ckpt"))
  back = exp.restore(str(tmp_path / "ckpt"))
  assert back.privacy == first.privacy and back.round == 1
  _, again = exp.step(back)
  for key in ("epsilon", "client_epsilon", "train_loss", "test_loss", "test_accuracy"):
    assert again[key] == history[1][key], key


def test_calibrated_noise_is_written_and_reaches_the_target(tmp_path):
  out = tmp_path / "run"
  argv = ["train", "--quiet", "--dataset", "digits", "--clients", "3", "--rounds", "1",
          "--batch-size", "64", "--norm", "none", "--dp-clip", "1", "--dp-epsilon", "3",
          "--out", str(out)]
  assert main(argv) == 0
  config = json.load(open(out / "config.json"))
  sigma = config["config"]["dp_noise"]
  assert sigma > 0 and config["config"]["dp_epsilon"] == 3
  summary = json.load(open(out / "summary.json"))["dp"]
  assert summary["noise_multiplier"] == sigma
  assert summary["epsilon"] <= 3 * (1 + 1e-6) and summary["epsilon"] > 2.9
  assert len(summary["client_epsilon"]) == 3


@pytest.mark.parametrize("argv,flag", [
    (["--dp-clip", "-1", "--dp-noise", "1"], "--dp-clip"),
    (["--dp-noise", "1"], "--dp-noise"),
    (["--dp-clip", "1"], "--dp-clip"),
    (["--dp-clip", "1", "--dp-noise", "1", "--dp-delta", "0.01"], "--dp-delta"),
    (["--dp-clip", "1", "--dp-noise", "1", "--norm", "batch"], "--norm"),
    (["--dp-clip", "1", "--dp-noise", "0.3", "--dp-epsilon", "1"], "--dp-noise"),
    (["--pixeldp-layer", "1"], "--pixeldp-layer"),
    (["--pixeldp-epsilon", "-1"], "--pixeldp-epsilon"),
    (["--pixeldp-epsilon", "1", "--pixeldp-layer", "3", "--norm", "none"], "--pixeldp-layer"),
    (["--pixeldp-epsilon", "1", "--norm", "batch"], "--pixeldp-layer"),
    (["--pixeldp-epsilon", "2", "--pixeldp-mechanism", "gaussian", "--pixeldp-delta", "1e-5",
      "--norm", "none"], "--pixeldp-epsilon"),
    (["--pixeldp-epsilon", "1", "--algorithm", "fl"], "--pixeldp-epsilon"),
])
def test_bad_privacy_settings_are_one_line(argv, flag, capsys, tmp_path):
  out = tmp_path / "run"
  with warnings.catch_warnings(record=True):
    rc = main(["train", "--quiet", "--rounds", "1", "--clients", "3", "--out", str(out)] + argv)
  err = capsys.readouterr().err
  assert rc == 2 and len(err.splitlines()) == 1, err
  assert err.startswith(f"sfljax: error: {flag}: ") and "Traceback" not in err, err
  assert not out.exists()


def test_batchnorm_refused_in_the_api():
  with pytest.raises(ConfigError, match="BatchNorm"):
    Experiment(Config(**{**BASE, "norm": "batch"}))


def test_pixeldp_run_keeps_the_pre_noise_bound_and_noises_predictions():
  from sfljax.privacy import pixeldp
  cfg = Config(dataset="digits", clients=3, rounds=1, batch_size=64, norm="none", lr=0.05,
               optimizer="sgd", pixeldp_epsilon=1.0, pixeldp_layer="conv1", pixeldp_draws=2,
               cut="conv2", seed=1)
  exp = Experiment(cfg)
  assert exp.model.block_names[:3] == ("conv1", "pixeldp", "conv2") and exp.cut == 3
  state = exp.init()
  params = exp.global_variables(state)["params"]
  big = {**params, "conv1": jax.tree.map(lambda a: a * 50, params["conv1"])}
  assert pixeldp.model_sensitivity(exp.model, big) > 1      # the bound can be broken ...
  state, _ = exp.step(state)
  trained = exp.global_variables(state)["params"]
  assert pixeldp.model_sensitivity(exp.model, trained) <= 1 + 1e-4   # ... training keeps it
  # Predictions are noisy: the same weights without the noise layer score otherwise.
  plain = Experiment(Config(**{**cfg.to_dict(), "pixeldp_epsilon": None, "pixeldp_layer": None,
                               "pixeldp_draws": None}))
  variables = exp.global_variables(state)
  noisy = exp.evaluate(state)["test_loss"]
  clean = float(np.mean(plain._eval(variables, *plain._test)[0][:plain._n_test]))
  assert np.isfinite(noisy) and np.isfinite(clean) and abs(noisy - clean) > 1e-3
