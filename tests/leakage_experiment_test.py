"""The leakage measures in a run: they leave training untouched, the probe's
view of the cut matches a whole-model computation, the CLI writes the metrics,
the summary and the reconstruction grid, and bad settings are one line."""

import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sfljax import data, split
from sfljax.cli import main
from sfljax.config import Config
from sfljax.train import LEAKAGE_METRICS, Experiment

BASE = dict(dataset="digits", clients=2, rounds=1, batch_size=64, lr=0.05, seed=3)
FAST = dict(leakage_probe=96, leakage_decoder_steps=10)


def _parts():
  ds = data.load_dataset("digits", seed=3)
  n = len(ds.y_train)
  return ds, [np.arange(0, n // 3), np.arange(n // 3, 2 * (n // 3))]   # the last third held out


def test_measures_leave_training_bit_for_bit_unchanged():
  ds, parts = _parts()
  plain = Experiment(Config(**BASE), ds, parts)
  measured = Experiment(Config(**BASE, leakage=True, **FAST), ds, parts)
  s0, m0 = plain.step(plain.init())
  s1, m1 = measured.step(measured.init())
  for key in ("train_loss", "test_loss", "test_accuracy", "client_test_accuracy"):
    assert m0[key] == m1[key], key
  for a, b in zip(jax.tree.leaves(s0.algo), jax.tree.leaves(s1.algo)):
    np.testing.assert_array_equal(a, b)
  assert not set(LEAKAGE_METRICS) & set(m0)
  assert set(LEAKAGE_METRICS) <= set(m1)   # the last round: inversion included
  assert 0 < m1["leak_dcor"] <= 1 and 0 <= m1["leak_label_auc"] <= 1
  assert m1["leak_inversion_mse"] > 0 and -1 <= m1["leak_inversion_ssim"] <= 1
  # The auxiliary set: the third no part holds.
  assert len(measured.leakage.aux_x) == len(ds.y_train) - 2 * (len(ds.y_train) // 3)


@pytest.mark.parametrize("cut", ["2", "2,4"])
def test_the_probe_sees_the_smashed_data_and_the_cut_gradient(cut):
  exp = Experiment(Config(**BASE, leakage=True, cut=cut, **FAST))
  probe = exp.leakage
  variables = exp.global_variables(exp.init())
  x, y = probe.probe_x[:32], jnp.asarray(probe.probe_y[:32])
  smashed, grads, _ = probe._views(variables, x, y, jax.random.key(0))
  cuts = exp.cuts
  model = exp.model
  head = model.parts(cuts[:1])[0]
  np.testing.assert_allclose(smashed, head.apply(variables, x, train=False), rtol=1e-5,
                             atol=1e-6)
  # Reference: the whole model's loss with a perturbation added where the server's view
  # is (the cut, or the output of the server's body), differentiated at zero.
  blocks = model.parts(cuts[-1:])
  front, back = blocks

  def loss(delta):
    a = front.apply(variables, x, train=False) + delta
    logits = back.apply(variables, a, train=False)
    return split.cross_entropy(logits, y, jnp.ones(y.shape, bool))

  at = front.apply(variables, x, train=False)
  want = jax.grad(loss)(jnp.zeros_like(at))
  np.testing.assert_allclose(grads, want, rtol=1e-5, atol=1e-8)


def test_cli_writes_metrics_summary_and_the_grid(tmp_path):
  out = tmp_path / "run"
  argv = ["train", "--quiet", "--dataset", "digits", "--clients", "2", "--rounds", "2",
          "--batch-size", "64", "--leakage", "--leakage-probe", "64", "--leakage-decoder-steps",
          "10", "--leakage-holdout", "0.2", "--nopeek-weight", "0.5", "--out", str(out)]
  assert main(argv) == 0
  rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
  assert "leak_dcor" in rows[0] and "leak_inversion_ssim" not in rows[0]
  assert "leak_inversion_ssim" in rows[1]
  summary = json.load(open(out / "summary.json"))["leakage"]
  assert summary["leak_inversion_ssim"] == rows[1]["leak_inversion_ssim"]
  assert summary["leak_dcor"] == rows[1]["leak_dcor"]
  grid = Image.open(out / "inversion_round0002.png")
  assert grid.mode == "L" and grid.size[0] > grid.size[1] > 0
  assert not (out / "inversion_round0001.png").exists()


@pytest.mark.parametrize("argv,flag", [
    (["--leakage", "--algorithm", "fl"], "--leakage"),
    (["--leakage-probe", "10"], "--leakage-probe"),
    (["--leakage", "--leakage-aux", "100000"], "--leakage-aux"),
    (["--leakage", "--leakage-probe", "100000"], "--leakage-probe"),
    (["--leakage", "--leakage-holdout", "1.5"], "--leakage-holdout"),
    (["--nopeek-weight", "1", "--algorithm", "centralized"], "--nopeek-weight"),
    (["--nopeek-weight", "1", "--dp-clip", "1", "--dp-noise", "1", "--norm", "none"],
     "--nopeek-weight"),
])
def test_bad_leakage_settings_are_one_line(argv, flag, capsys, tmp_path):
  out = tmp_path / "run"
  with warnings.catch_warnings(record=True):
    rc = main(["train", "--quiet", "--dataset", "digits", "--rounds", "1", "--clients", "3",
               "--out", str(out)] + argv)
  err = capsys.readouterr().err
  assert rc == 2 and len(err.splitlines()) == 1, err
  assert err.startswith(f"sfljax: error: {flag}: ") and "Traceback" not in err, err
  assert not out.exists()
