"""The command line, end to end."""

import json
import os
import subprocess
import sys

import pytest

from sfljax.cli import main


def _read_metrics(out):
  with open(os.path.join(out, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_default_run_end_to_end(tmp_path):
  """`sfljax train` with every default (digits, LeNet, SFLV1, 5 clients, 20 rounds)."""
  out = tmp_path / "run"
  proc = subprocess.run([sys.executable, "-m", "sfljax", "train", "--out", str(out)],
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr
  assert "best test accuracy" in proc.stdout
  cfg = json.loads((out / "config.json").read_text())
  assert cfg["config"]["algorithm"] == "sflv1" and cfg["config"]["clients"] == 5
  assert cfg["resolved"]["cut"] == 2 and "jax" in cfg["environment"]
  metrics = _read_metrics(out)
  assert [m["round"] for m in metrics] == list(range(1, 21))
  for key in ("train_loss", "test_loss", "test_accuracy", "seconds",
              "bytes_client_to_server", "bytes_server_to_client"):
    assert all(key in m for m in metrics)
  assert max(m["test_accuracy"] for m in metrics) >= 0.95
  summary = json.loads((out / "summary.json").read_text())
  assert summary["best_test_accuracy"] == max(m["test_accuracy"] for m in metrics)


def test_one_client_split_algorithms_log_identical_metrics(tmp_path):
  runs = {}
  for alg in ("sl", "sflv1", "sflv2"):
    out = str(tmp_path / alg)
    assert main(["train", "--algorithm", alg, "--clients", "1", "--rounds", "2",
                 "--out", out, "--quiet"]) == 0
    runs[alg] = _read_metrics(out)
  for alg in ("sflv1", "sflv2"):
    for a, b in zip(runs["sl"], runs[alg]):
      for key in ("train_loss", "test_loss", "test_accuracy"):
        assert a[key] == pytest.approx(b[key], abs=1e-5), (alg, key)


BAD = [
    (["--algorithm", "sflv4"], "--algorithm"),
    (["--model", "vgg19"], "--model"),
    (["--dataset", "imagenet"], "--dataset"),
    (["--optimizer", "lamb"], "--optimizer"),
    (["--strategy", "pmap"], "--strategy"),
    (["--clients", "0"], "--clients"),
    (["--rounds", "-3"], "--rounds"),
    (["--batch-size", "0"], "--batch-size"),
    (["--local-epochs", "0"], "--local-epochs"),
    (["--lr", "0"], "--lr"),
    (["--clients", "100000"], "--clients"),
    (["--cut", "7"], "--cut"),
    (["--model", "resnet18", "--cut", "11"], "--cut"),
    (["--out", "/dev/null/run"], "--out"),
    (["--client-fraction", "0"], "--client-fraction"),
    (["--client-fraction", "1.5"], "--client-fraction"),
    (["--algorithm", "centralized", "--client-fraction", "0.5"], "--client-fraction"),
    (["--client-block", "0"], "--client-block"),
    (["--precision", "fp8"], "--precision"),
    (["--cut", "3,2"], "--cut"),
    (["--cut", "1,9"], "--cut"),
    (["--cut", "conv9"], "--cut"),
    (["--cut", "fc3"], "--cut"),
    (["--algorithm", "fl", "--cut", "2"], "--cut"),
    (["--client-aggregation", "relay"], "--client-aggregation"),
    (["--algorithm", "sl", "--schedule", "synchronous"], "--schedule"),
    (["--algorithm", "sflv2", "--server-side", "replicas", "--schedule", "client_major"],
     "--schedule"),
    (["--momentum", "0.9"], "--momentum"),
    (["--lr-schedule", "linear"], "--lr-schedule"),
    (["--label-smoothing", "1"], "--label-smoothing"),
]


@pytest.mark.parametrize("flags,flag", BAD)
def test_bad_input_one_line_exit_2(flags, flag, capsys):
  assert main(["train", "--quiet"] + flags) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and flag in err and "Traceback" not in err
  if flag == "--cut" and "," not in flags[-1] and "fl" not in flags:
    assert "valid cuts are" in err   # Resolved against the model (syntax errors say more briefly)
  if flag in ("--algorithm", "--model", "--optimizer", "--strategy"):
    assert "choose from" in err


def test_bad_input_from_a_real_process_has_no_traceback():
  proc = subprocess.run([sys.executable, "-m", "sfljax", "train", "--algorithm", "nope"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
  assert "centralized, fl, sl, sflv1, sflv2" in proc.stderr.replace("'", "")


def test_refuses_to_overwrite_unless_told(tmp_path):
  out = str(tmp_path / "run")
  args = ["train", "--rounds", "1", "--clients", "2", "--out", out, "--quiet"]
  assert main(args) == 0
  before = open(os.path.join(out, "metrics.jsonl")).read()
  assert main(args + ["--seed", "1"]) == 2
  assert open(os.path.join(out, "metrics.jsonl")).read() == before   # nothing lost
  assert main(args + ["--seed", "1", "--overwrite"]) == 0
  assert open(os.path.join(out, "metrics.jsonl")).read() != before
  foreign = tmp_path / "notarun"
  foreign.mkdir()
  (foreign / "thesis.tex").write_text("keep me")
  assert main(["train", "--out", str(foreign), "--overwrite", "--quiet"]) == 2
  assert (foreign / "thesis.tex").read_text() == "keep me"


def test_config_error_creates_no_output_dir(tmp_path):
  out = tmp_path / "never"
  assert main(["train", "--cut", "99", "--out", str(out), "--quiet"]) == 2
  assert not out.exists()


FASHION = "/usr/share/datasets/fashion-mnist"


@pytest.mark.skipif(not os.path.isdir(FASHION),
                    reason="Debian's dataset-fashion-mnist is not installed (.ci/run installs it)")
def test_real_fashion_mnist_trains_through_the_cli(tmp_path):
  """The paper's Fashion-MNIST/LeNet setting (batch 1024, Adam 0.004), one round."""
  out = str(tmp_path / "fm")
  assert main(["train", "--dataset", "fashion_mnist", "--data-dir", FASHION, "--rounds", "1",
               "--batch-size", "1024", "--lr", "0.004", "--out", out, "--quiet"]) == 0
  (m,) = _read_metrics(out)
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["resolved"]["train_samples"] == 60000 and cfg["resolved"]["test_samples"] == 10000
  assert cfg["resolved"]["client_sizes"] == [12000] * 5
  assert m["test_accuracy"] > 0.6          # one epoch of LeNet: well above chance (0.1)
  assert m["bytes_smashed"] == 60000 * 16 * 5 * 5 * 4


def test_ham10000_trains_with_its_augmentation(tmp_path):
  """A fake HAM10000 folder in the real layout trains; the augmentation is wired in
  (turning it off changes the numbers) and the same seed repeats them."""
  from loaders_test import _make_ham
  folder = tmp_path / "ham"
  folder.mkdir()
  _make_ham(str(folder), n=40)
  runs = {}
  for name, extra in (("aug", []), ("aug2", []), ("noaug", ["--no-augment"])):
    out = str(tmp_path / name)
    assert main(["train", "--dataset", "ham10000", "--data-dir", str(folder), "--rounds", "1",
                 "--clients", "2", "--batch-size", "8", "--out", out, "--quiet"] + extra) == 0
    runs[name] = _read_metrics(out)[0]
  cfg = json.load(open(os.path.join(str(tmp_path / "aug"), "config.json")))
  assert cfg["resolved"]["input_shape"] == [64, 64, 3] and cfg["resolved"]["train_samples"] == 36
  assert runs["aug"]["train_loss"] == runs["aug2"]["train_loss"]
  assert runs["aug"]["train_loss"] != runs["noaug"]["train_loss"]


@pytest.mark.parametrize("flags,needle", [
    (["--dataset", "fashion_mnist", "--data-dir", "/nonexistent/fm"], "--data-dir"),
    (["--dataset", "ham10000"], "--data-dir"),
    (["--partition", "classes", "--classes-per-client", "11"], "--classes-per-client"),
    (["--partition", "dirichlet", "--alpha", "0"], "--alpha"),
    (["--partition", "shards", "--shards-per-client", "1000"], "--shards-per-client"),
])
def test_data_and_partition_errors_are_one_line(flags, needle, capsys):
  assert main(["train", "--quiet"] + flags) == 2
  err = capsys.readouterr().err.strip()
  assert "\n" not in err and needle in err and "Traceback" not in err


def test_partition_command_prints_counts_and_plots(tmp_path, capsys):
  png = tmp_path / "p.png"
  assert main(["partition", "--clients", "4", "--partition", "dirichlet", "--alpha", "0.3",
               "--plot", str(png)]) == 0
  out = capsys.readouterr().out.splitlines()
  rows = [l.split() for l in out[1:5]]
  assert sum(int(r[1]) for r in rows) == 1438          # every training sample, once
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
