"""Experiment.save / restore and load_model: the Python side of checkpoints."""

import os

import jax
import numpy as np
import pytest

from conftest import small_digits
from sfljax import apply_part, checkpoint
from sfljax.config import Config
from sfljax.train import Experiment


def _cfg(**kw):
  base = dict(algorithm="sflv3", clients=3, rounds=3, batch_size=16, seed=4)
  base.update(kw)
  return Config(**base)


def _leaves(tree):
  return [np.asarray(a) for a in jax.tree.leaves(tree)]


@pytest.mark.parametrize("policy", ["persistent", "reference"])
def test_restore_continues_bit_for_bit_in_a_new_experiment(tmp_path, policy):
  """Also with reference optimizer states, stored compacted (zero-size leaves,
  which orbax does not save: the checkpoint leaves them out and the restore
  puts them back)."""
  ds = small_digits()
  exp = Experiment(_cfg(optimizer_state=policy, lr_schedule="cosine"), dataset=ds)
  state = exp.init()
  state, _ = exp.step(state)
  path = str(tmp_path / "ckpt")
  exp.save(state, path)
  ahead, m_ahead = exp.step(state)

  other = Experiment(_cfg(optimizer_state=policy, lr_schedule="cosine"), dataset=ds)
  restored = other.restore(path)   # A new process would build exactly this.
  assert restored.round == 1
  assert jax.tree.structure(restored.algo) == jax.tree.structure(state.algo)
  empty = [a.shape for a in jax.tree.leaves(restored.algo) if a.size == 0]
  assert bool(empty) == (policy == "reference")
  assert empty == [a.shape for a in jax.tree.leaves(state.algo) if a.size == 0]
  for a, b in zip(_leaves(restored.algo), _leaves(state.algo)):
    np.testing.assert_array_equal(a, b)
  again, m_again = other.step(restored)
  for a, b in zip(_leaves(again.algo), _leaves(ahead.algo)):
    np.testing.assert_array_equal(a, b)
  assert m_again["train_loss"] == m_ahead["train_loss"]
  assert m_again["client_test_accuracy"] == m_ahead["client_test_accuracy"]


def test_keep_bounds_the_rounds_on_disk(tmp_path):
  exp = Experiment(_cfg(algorithm="sflv1"), dataset=small_digits())
  state = exp.init()
  path = str(tmp_path / "ckpt")
  for _ in range(3):
    state, _ = exp.step(state)
    exp.save(state, path, keep=2)
  assert checkpoint.Checkpoints(path).rounds() == [2, 3]
  assert exp.restore(path, 2).round == 2
  with pytest.raises(checkpoint.CheckpointError, match="no checkpoint of round 1"):
    exp.restore(path, 1)


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
  ds = small_digits()
  exp = Experiment(_cfg(algorithm="sflv1"), dataset=ds)
  state, _ = exp.step(exp.init())
  path = str(tmp_path / "ckpt")
  exp.save(state, path)
  with pytest.raises(checkpoint.CheckpointError, match="lr=0.001"):
    Experiment(_cfg(algorithm="sflv1", lr=0.01), dataset=ds).restore(path)
  # Another structure (per-client client parts) cannot be read into this state either.
  with pytest.raises(checkpoint.CheckpointError):
    Experiment(_cfg(algorithm="sflv3"), dataset=ds).restore(path)
  with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
    exp.restore(str(tmp_path / "empty"))


def test_load_model_predicts_like_the_trained_global_model(tmp_path):
  """The saved global model, loaded from the run directory alone, gives the
  accuracy the experiment measured for it."""
  from sfljax.cli import main
  out = str(tmp_path / "run")
  assert main(["train", "--clients", "3", "--rounds", "2", "--batch-size", "64", "--quiet",
               "--out", out]) == 0
  model, variables = checkpoint.load_model(out)
  cfg = Config(clients=3, rounds=2, batch_size=64)
  exp = Experiment(cfg)
  logits, _ = apply_part(model.full(), variables, exp.dataset.x_test, train=False)
  acc = float(np.mean(np.argmax(np.asarray(logits), -1) == exp.dataset.y_test))
  import json
  last = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][-1]
  assert acc == pytest.approx(last["test_accuracy"], abs=1e-12)
  with pytest.raises(checkpoint.CheckpointError, match="config.json"):
    checkpoint.load_model(str(tmp_path))


def test_the_package_reaches_checkpoints_and_every_submodule():
  import importlib

  import sfljax
  assert sfljax.checkpoint.load_model is checkpoint.load_model is sfljax.load_model
  for name in sfljax._MODULES:
    assert getattr(sfljax, name) is importlib.import_module(f"sfljax.{name}")
  assert set(sfljax.__all__) <= set(dir(sfljax))
  with pytest.raises(AttributeError):
    sfljax.no_such_name


def _status_kib(field):
  with open("/proc/self/status") as f:
    return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def _reset_peak_rss():
  """Resets the process's peak resident set (VmHWM); False where Linux refuses."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def test_saving_holds_no_second_copy_of_the_state(tmp_path):
  """The arrays are written uncompressed: compressing buffers the whole
  compressed state in memory (about its size again: random float32 barely
  compresses). 128 MB of state may add at most a quarter of that to the peak
  resident set, and the files hold every byte."""
  if not os.path.exists("/proc/self/clear_refs"):
    pytest.skip("needs Linux's /proc to read the peak resident set")
  rng = np.random.default_rng(0)
  state = {"a": jax.device_put(rng.standard_normal((32, 2**20), np.float32)),
           "b": jax.device_put(rng.standard_normal((2**20,), np.float32))}
  nbytes = sum(a.nbytes for a in state.values())
  jax.block_until_ready(state)
  ckpt = checkpoint.Checkpoints(str(tmp_path / "ckpt"))
  ckpt.save(0, {"a": state["b"][:4]})   # orbax's imports and threads, before measuring
  if not _reset_peak_rss():
    pytest.skip("the peak resident set cannot be reset here")
  before = _status_kib("VmRSS")
  ckpt.save(1, state)
  extra = (_status_kib("VmHWM") - before) * 1024
  assert extra < nbytes / 4, f"saving {nbytes / 2**20:.0f} MiB took {extra / 2**20:.0f} MiB more"
  on_disk = sum(os.path.getsize(os.path.join(d, f))
                for d, _, fs in os.walk(tmp_path / "ckpt" / "1") for f in fs)
  assert on_disk >= nbytes
  restored, _ = ckpt.restore(like=state)
  for k in state:
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))


def test_compressed_checkpoints_of_earlier_versions_restore(tmp_path):
  """Checkpoints written by orbax's default (compressed) handler, as earlier
  versions wrote them, restore bit for bit."""
  import orbax.checkpoint as ocp
  rng = np.random.default_rng(1)
  state = {"w": jax.device_put(rng.standard_normal((64, 33), np.float32)),
           "n": jax.device_put(np.arange(5, dtype=np.int32))}
  directory = tmp_path / "ckpt"
  mgr = ocp.CheckpointManager(str(directory), options=ocp.CheckpointManagerOptions(
      create=True, enable_async_checkpointing=False))
  mgr.save(3, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({"format": checkpoint.FORMAT,
                                                                  "round": 3}),
      **{"global": ocp.args.StandardSave({"g": state["w"]})}), force=True)
  mgr.wait_until_finished()
  mgr.close()
  ckpt = checkpoint.Checkpoints(str(directory))
  restored, meta = ckpt.restore(like=state)
  assert meta["round"] == 3
  np.testing.assert_array_equal(ckpt.restore_global()["g"], np.asarray(state["w"]))
  for k in state:
    np.testing.assert_array_equal(np.asarray(restored[k]), np.asarray(state[k]))
