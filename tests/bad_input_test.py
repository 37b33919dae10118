"""Bad input: one line naming the flag (or file) to fix, exit 2, nothing else.

The rule: a bad flag value, file or folder ends ``sfljax train`` with exactly
one line on stderr, ``sfljax: error: --the-flag: what is wrong; how to fix
it``, exit code 2, no traceback, no library warning or log line before it, and
no output directory. Each case here feeds one input a new user tried, through
the CLI (``sfljax.cli.main`` with capsys, or a subprocess where the real
stderr matters) and through the Python API. Everything fails before training
starts, so the file runs in seconds.
"""

import dataclasses
import logging
import math
import os
import socket
import struct
import subprocess
import sys
import time
import warnings

import jax
import numpy as np
import pytest

from sfljax import data, distributed, loaders, models, partitions
from sfljax.cli import main
from sfljax.config import MAX_SEED, Config, ConfigError


def _cli_error(capsys, tmp_path, argv, flag) -> str:
  """Runs ``sfljax train ... argv``; asserts the one-line refusal naming
  ``flag``; returns the line (without the ``sfljax: error: --flag: `` prefix)."""
  out = tmp_path / "run"
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    rc = main(["train", "--quiet", "--rounds", "1", "--out", str(out)] + list(argv))
  cap = capsys.readouterr()
  lines = cap.err.splitlines()
  assert rc == 2, cap.err
  assert len(lines) == 1, cap.err
  assert lines[0].startswith(f"sfljax: error: {flag}: "), lines[0]
  assert "Traceback" not in cap.err and cap.out == ""
  assert not [str(w.message) for w in caught]     # e.g. numpy's "Mean of empty slice"
  assert not out.exists()
  return lines[0][len(f"sfljax: error: {flag}: "):]


# -- 1. --seed ---------------------------------------------------------------

@pytest.mark.parametrize("seed", ["-1", str(MAX_SEED + 1), str(2**32), str(2**70)])
def test_seed_out_of_range_names_seed(seed, capsys, tmp_path):
  msg = _cli_error(capsys, tmp_path, ["--seed", seed], "--seed")
  assert msg == f"must be an integer from 0 to 2147483647 (2**31 - 1), got {seed}"


def test_seed_range_in_the_api():
  for seed in (-1, MAX_SEED + 1, 2**70, np.int64(-5)):
    with pytest.raises(ConfigError) as info:
      Config(seed=seed).validate()
    assert info.value.field == "seed" and "0 to 2147483647" in str(info.value)
  Config(seed=MAX_SEED).validate()
  # The largest seed is usable by everything that derives from it: NumPy
  # streams and the JAX keys of seed and seed + 1 (distinct, not truncated).
  data.rng_for(MAX_SEED, 4, 1).permutation(3)
  a, b = (np.asarray(jax.random.key_data(jax.random.key(s))) for s in (MAX_SEED, MAX_SEED + 1))
  assert a.tolist() == [0, MAX_SEED] and b.tolist() == [0, MAX_SEED + 1]


# -- 2. partition errors name the flag they are about --------------------------

@pytest.mark.parametrize("argv,flag,needle", [
    (["--partition", "classes", "--classes-per-client", "20"], "--classes-per-client",
     "labels hold only 10 classes"),
    (["--partition", "classes", "--clients", "2", "--classes-per-client", "3"],
     "--classes-per-client", "cannot cover all 10 classes"),
    (["--partition", "dirichlet", "--min-client-size", "2000"], "--min-client-size",
     "need 10000 samples"),
    (["--min-client-size", "0"], "--min-client-size", "at least 1"),
    (["--partition", "shards", "--shards-per-client", "1000"], "--shards-per-client",
     "5000 shards"),
    (["--clients", "5000"], "--clients", "use at most 1438 clients"),
])
def test_partition_errors_name_their_flag(argv, flag, needle, capsys, tmp_path):
  msg = _cli_error(capsys, tmp_path, argv, flag)
  assert needle in msg and not msg.endswith(f"({flag})")


def test_partition_command_names_the_flag_too(capsys):
  assert main(["partition", "--partition", "dirichlet", "--min-client-size", "2000"]) == 2
  err = capsys.readouterr().err
  assert err.startswith("sfljax: error: --min-client-size: ") and err.count("\n") == 1


def test_client_partition_and_partition_error_carry_the_flag():
  labels = np.repeat(np.arange(10), 10)
  for cfg, flag in ((Config(partition="classes", classes_per_client=11), "--classes-per-client"),
                    (Config(partition="classes", clients=2, classes_per_client=1),
                     "--classes-per-client"),
                    (Config(min_client_size=30), "--min-client-size"),
                    (Config(partition="shards", shards_per_client=50), "--shards-per-client"),
                    (Config(clients=101), "--clients")):
    with pytest.raises(ConfigError) as info:
      cfg.client_partition(labels)
    assert info.value.flag == flag, (cfg, info.value)
  with pytest.raises(ConfigError) as info:   # A class held by more clients than it has samples.
    Config(partition="classes", clients=4).client_partition(np.array([0] + [1] * 9))
  assert info.value.flag == "--classes-per-client" and "1 samples but" in str(info.value)
  skewed = np.array([0] * 2 + [1] * 100)
  with pytest.raises(ConfigError) as info:
    Config(partition="classes", clients=2, classes_per_client=1,
           min_client_size=10).client_partition(skewed)
  assert info.value.flag == "--min-client-size" and "only 2 samples" in str(info.value)
  with pytest.raises(partitions.PartitionError) as info:
    partitions.partition(labels, 2, "dirichlet", alpha=-1.0)
  assert info.value.flag == "--alpha" and "(--alpha)" in str(info.value)
  with pytest.raises(partitions.PartitionError) as info:
    partitions.partition(labels.reshape(10, 10), 2, "dirichlet")
  assert info.value.flag is None


# -- 3. and 10. NaN / inf / out of range in every float flag ------------------

@pytest.mark.parametrize("flag,value", [
    ("--alpha", "nan"), ("--alpha", "inf"), ("--alpha", "0"), ("--alpha", "-1"),
    ("--lr", "nan"), ("--lr", "inf"), ("--lr=-inf", None), ("--lr", "1e400"),
    ("--momentum", "nan"), ("--weight-decay", "inf"), ("--weight-decay", "nan"),
    ("--label-smoothing", "inf"), ("--label-smoothing", "nan"), ("--dropout", "nan"),
    ("--client-fraction", "nan"), ("--client-fraction", "inf"), ("--dropout-rate", "nan"),
    ("--dropout-rate", "inf"),
])
def test_non_finite_and_bad_floats_name_their_flag(flag, value, capsys, tmp_path):
  argv = [flag] if value is None else [flag, value]   # "--lr -inf" reads as two flags.
  flag = flag.split("=")[0]
  if flag == "--momentum":
    argv += ["--optimizer", "sgd"]
  _cli_error(capsys, tmp_path, argv, flag)


def test_alpha_is_checked_whatever_the_partition():
  for alpha in (math.nan, math.inf, -math.inf, 0.0, -0.5, True, "1"):
    for scheme in ("iid", "dirichlet", "shards", "classes"):
      with pytest.raises(ConfigError) as info:
        Config(partition=scheme, alpha=alpha).validate()
      assert info.value.flag == "--alpha"
  Config(alpha=1e-3).validate()


def test_every_float_field_refuses_nan_and_inf():
  floats = [f.name for f in dataclasses.fields(Config)
            if f.type in ("float", float) and f.metadata.get("cli", True)]
  assert {"lr", "momentum", "weight_decay", "label_smoothing", "dropout", "alpha",
          "client_fraction", "dropout_rate"} <= set(floats)
  for name in floats:
    for bad in (math.nan, math.inf, -math.inf):
      extra = {"optimizer": "sgd"} if name == "momentum" else {}
      with pytest.raises(ConfigError) as info:
        Config(**{name: bad}, **extra).validate()
      assert info.value.field == name


@pytest.mark.parametrize("flag,value", [("--lr", "abc"), ("--clients", "2.5"),
                                        ("--seed", "1e3"), ("--lr", "-inf")])
def test_non_numbers_name_the_flag_first(flag, value, capsys, tmp_path):
  _cli_error(capsys, tmp_path, [flag, value], flag)


@pytest.mark.parametrize("flag,value", [("--lr", "abc"), ("--clients", "2.5"),
                                        ("--seed", "1e3")])
def test_non_numbers_are_one_line_naming_the_flag(flag, value, capsys, tmp_path):
  out = tmp_path / "run"
  assert main(["train", "--quiet", "--out", str(out), flag, value]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("sfljax: error: ") and flag in err
  assert repr(value) in err and not out.exists()


# -- 4. and 6. IDX files: corrupt headers, empty sets -----------------------------

def _write_idx(folder, n_train=30, n_test=10, size=(28, 28), train_dims=None):
  """The four MNIST-format IDX files; ``train_dims`` overrides the train images' header."""
  rng = np.random.default_rng(0)
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    images = rng.integers(0, 256, (n,) + size, dtype=np.uint8)
    dims = train_dims if prefix == "train" and train_dims else (n,) + size
    with open(os.path.join(folder, f"{prefix}-images-idx3-ubyte"), "wb") as f:
      f.write(struct.pack(">I3i", 0x803, *dims) + images.tobytes())
    with open(os.path.join(folder, f"{prefix}-labels-idx1-ubyte"), "wb") as f:
      f.write(struct.pack(">Ii", 0x801, n) + (np.arange(n) % 10).astype(np.uint8).tobytes())
  return str(folder)


@pytest.mark.parametrize("dims", [(30, -28, 28), (30, 28, 0), (-30, 28, 28),
                                  (30, -2**31, -2**31)])
def test_idx_corrupt_header_names_the_file(dims, capsys, tmp_path):
  folder = _write_idx(tmp_path, train_dims=dims)
  path = os.path.join(folder, "train-images-idx3-ubyte")
  msg = _cli_error(capsys, tmp_path, ["--dataset", "mnist", "--data-dir", folder],
                   "--data-dir")
  assert msg.startswith(f"{path}: corrupt header: ") and "must be positive" in msg
  assert "bytes" not in msg                          # Not "expected -784 bytes".
  with pytest.raises(loaders.DatasetError, match="corrupt header"):
    loaders.load_idx("mnist", folder)


def test_idx_huge_header_is_truncated_not_overflowed(tmp_path):
  folder = _write_idx(tmp_path, train_dims=(2**31 - 1, 2**31 - 1, 2**31 - 1))
  with pytest.raises(loaders.DatasetError,
                     match=f"truncated: expected {(2**31 - 1)**3} bytes of data"):
    loaders.load_idx("mnist", folder)


@pytest.mark.parametrize("split,n_train,n_test", [("train", 0, 10), ("test", 30, 0)])
def test_idx_with_no_images_names_the_file(split, n_train, n_test, capsys, tmp_path):
  folder = _write_idx(tmp_path, n_train=n_train, n_test=n_test)
  prefix = "train" if split == "train" else "t10k"
  path = os.path.join(folder, f"{prefix}-images-idx3-ubyte")
  msg = _cli_error(capsys, tmp_path, ["--dataset", "fashion_mnist", "--data-dir", folder],
                   "--data-dir")
  assert msg.startswith(f"{path}: holds no images; the {split} set needs at least one")


def test_ham10000_with_one_image_leaves_no_training_set(tmp_path):
  (tmp_path / "HAM10000_metadata.csv").write_text("lesion_id,image_id,dx\nL1,ISIC_1,nv\n")
  with pytest.raises(loaders.DatasetError) as info:
    data.load_dataset("ham10000", data_dir=str(tmp_path))
  msg = str(info.value)
  assert msg.startswith(str(tmp_path / "HAM10000_metadata.csv") + ": ") and "at least 2" in msg


def test_tfds_split_with_no_records():
  with pytest.raises(loaders.DatasetError, match="^TFDS dataset 'mnist' in /d: split 'test' "
                                                 "has no records"):
    loaders._read_source([], "TFDS dataset 'mnist' in /d: split 'test'")


# -- 5. TFDS: no absl / TensorFlow log lines before the one line ---------------

def test_tfds_not_prepared_is_one_line_on_the_real_stderr(tmp_path):
  """A subprocess: absl's log lines would reach the real stderr, not capsys."""
  out = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "sfljax", "train", "--quiet", "--dataset",
                         "cifar10", "--data-dir", str(tmp_path), "--out", str(out)],
                        capture_output=True, text=True, timeout=120,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith("sfljax: error: --data-dir: TFDS dataset 'cifar10' is not "
                                f"prepared in {tmp_path}: "), proc.stderr
  assert proc.stderr.count("\n") == 1 and proc.stdout == ""
  assert not out.exists() and os.listdir(tmp_path) == []


def test_tfds_logs_are_silenced_only_around_tfds(tmp_path, caplog):
  absl = logging.getLogger("absl")
  before, env = absl.level, os.environ.get("TF_CPP_MIN_LOG_LEVEL")
  with caplog.at_level(logging.DEBUG):
    with pytest.raises(loaders.DatasetError, match="not prepared"):
      loaders.load_tfds("mnist", str(tmp_path))
  assert [r for r in caplog.records if r.name.startswith(("absl", "tensorflow"))] == []
  assert absl.level == before                                  # Restored.
  assert os.environ.get("TF_CPP_MIN_LOG_LEVEL") == env
  with caplog.at_level(logging.WARNING):
    absl.warning("still heard outside TFDS")
  assert any("still heard" in r.getMessage() for r in caplog.records)


# -- 7. images smaller than the model takes -----------------------------------

def test_idx_images_too_small_for_lenet_name_the_model(capsys, tmp_path):
  folder = _write_idx(tmp_path, size=(4, 4))
  msg = _cli_error(capsys, tmp_path, ["--dataset", "mnist", "--data-dir", folder], "--model")
  assert msg.startswith("images of 4x4 pixels are too small for lenet: it takes at least 12x12")


@pytest.mark.parametrize("shape,ok", [((11, 11, 1), False), ((12, 12, 1), True),
                                      ((28, 11, 1), False), ((31, 12, 3), True),
                                      ((32, 15, 1), False), ((32, 16, 1), True),
                                      ((4, 40, 1), False), ((40, 40, 1), True)])
def test_lenet_smallest_input_matches_its_layers(shape, ok):
  if not ok:
    with pytest.raises(ValueError, match="too small for lenet: it takes at least 12x12"):
      models.get_model("lenet", input_shape=shape)
    return
  model = models.get_model("lenet", input_shape=shape)
  # The smallest accepted size still leaves a positive feature map after conv2's pool.
  variables = jax.eval_shape(model.init, jax.random.key(0))
  fc1_in = variables["params"]["fc1"]["dense"]["kernel"].shape[0]
  assert fc1_in >= 16


def test_small_images_from_the_api_name_the_model():
  ds = data.load_digits(0, image_size=8)
  with pytest.raises(ConfigError) as info:
    from sfljax.train import Experiment
    Experiment(Config(rounds=1), dataset=ds)
  assert info.value.flag == "--model" and "8x8" in str(info.value)
  assert "norm" not in info.value.message          # train.py maps "norm" to --norm.
  for name in ("alexnet", "vgg16", "resnet18"):     # These take any size.
    models.get_model(name, input_shape=(1, 1, 1))


# -- 8. --data-dir for a dataset that ships with sfljax -------------------------

def test_data_dir_with_digits_is_refused(capsys, tmp_path):
  msg = _cli_error(capsys, tmp_path, ["--data-dir", str(tmp_path)], "--data-dir")
  assert msg == "digits ships with sfljax; drop --data-dir"
  assert _cli_error(capsys, tmp_path, ["--data-dir", ""], "--data-dir").startswith("empty path")
  with pytest.raises(loaders.DatasetError, match="digits ships with sfljax"):
    data.load_dataset("digits", data_dir=str(tmp_path))
  assert set(data.EMBEDDED_DATASETS) <= set(data.DATASETS)
  Config(dataset="mnist", data_dir=str(tmp_path)).validate()


# -- 9. multi-host: an unreachable coordinator ----------------------------------

def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_worker_without_coordinator_says_so_and_gives_up(tmp_path):
  """Process 1 of 2 with nothing listening: the wait is announced, bounded by
  SFLJAX_COORDINATOR_TIMEOUT, and ends in one line naming the flag."""
  address = f"127.0.0.1:{_free_port()}"
  out = tmp_path / "run"
  env = dict(os.environ, SFLJAX_COORDINATOR_TIMEOUT="3", JAX_PLATFORMS="cpu")
  t0 = time.monotonic()
  proc = subprocess.run([sys.executable, "-m", "sfljax", "train", "--quiet", "--rounds", "1",
                         "--coordinator-address", address, "--num-processes", "2",
                         "--process-id", "1", "--out", str(out)],
                        capture_output=True, text=True, timeout=30, env=env)
  elapsed = time.monotonic() - t0
  lines = proc.stderr.splitlines()
  assert proc.returncode == 2, proc.stderr
  assert lines == [
      f"sfljax: waiting up to 3 s for the coordinator at {address} (process 1 of 2)",
      f"sfljax: error: --coordinator-address: no coordinator answered at {address} within "
      f"3 s; start process 0 first or check the address"], proc.stderr
  assert 3 <= elapsed < 25 and proc.stdout == "" and not out.exists()


def test_auto_detect_without_a_cluster_is_one_line(tmp_path):
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_", "KUBERNETES_"))}
  out = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "sfljax", "train", "--quiet", "--rounds", "1",
                         "--distributed-auto", "--out", str(out)],
                        capture_output=True, text=True, timeout=60,
                        env=dict(env, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith("sfljax: error: --distributed-auto: no cluster detected")
  assert proc.stderr.count("\n") == 1 and not out.exists()


@pytest.mark.parametrize("text", ["abc", "0", "-5", "nan", "inf"])
def test_coordinator_timeout_variable_is_checked(text, monkeypatch):
  monkeypatch.setenv(distributed.TIMEOUT_ENV, text)
  with pytest.raises(ValueError, match=f"^SFLJAX_COORDINATOR_TIMEOUT: must be a number of "
                                       f"seconds >= 1, got '{text}'"):
    distributed.coordinator_timeout()
  # Only a multi-process run reads it.
  assert distributed.initialize() is False


def test_coordinator_timeout_default_and_rounding(monkeypatch):
  monkeypatch.delenv(distributed.TIMEOUT_ENV, raising=False)
  assert distributed.coordinator_timeout() == 300
  monkeypatch.setenv(distributed.TIMEOUT_ENV, "2.5")
  assert distributed.coordinator_timeout() == 3
