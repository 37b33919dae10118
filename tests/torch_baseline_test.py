"""Tests of experiments/torch_baseline.py (the PyTorch reference benchmark).

Each test checks the baseline against an independent computation: a
whole-model PyTorch training of the same batches, hand-computed weighted
means, hand-counted parameter/activation shapes.
"""

import copy
import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "experiments"))
import torch_baseline as tb  # noqa: E402

SCRIPT = os.path.join(ROOT, "experiments", "torch_baseline.py")


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def _batches_of(run, k):
  """Client k's batches in the last round, from the recorded permutation."""
  x, y = run.data[k]
  perm = run.last_perms[k]
  return [(x[perm[i:i + run.batch_size]], y[perm[i:i + run.batch_size]])
          for i in range(0, len(perm), run.batch_size)]


def _assert_state_close(a, b, atol=1e-6):
  assert list(a.keys()) == list(b.keys())
  for key in a:
    assert a[key].dtype == b[key].dtype, key
    torch.testing.assert_close(a[key], b[key], atol=atol, rtol=1e-5, msg=key)


def _whole_model_split_adam(client, server, batches, lr, opt=torch.optim.Adam):
  """Independent reference for one client's local epoch in SFLV1/SFLV2/SL:
  one autograd graph through both halves, a client Adam kept for the epoch
  and a server Adam created afresh every batch (the official code's reset)."""
  opt_c = opt(client.parameters(), lr=lr)
  for xb, yb in batches:
    opt_s = opt(server.parameters(), lr=lr)
    opt_c.zero_grad()
    opt_s.zero_grad()
    loss = torch.nn.functional.cross_entropy(server(client(xb)), yb)
    loss.backward()
    opt_s.step()
    opt_c.step()


@pytest.mark.parametrize("model,official,optimizer", [
    ("lenet", False, "adam"), ("lenet", True, "adam"), ("resnet18", False, "adam"),
    # SGD steps scale with the gradient (Adam's barely do): checks dA's magnitude.
    ("lenet", False, "sgd"), ("resnet18", True, "sgd")])
def test_sflv1_one_client_equals_whole_model_training(model, official, optimizer):
  kw = {"input_shape": (3, 32, 32)} if model == "resnet18" else {}
  run = tb.BaselineRun("sflv1", model, 1, 8, 4, official_server_copies=official,
                       optimizer=optimizer, lr=0.05 if optimizer == "sgd" else 1e-3, **kw)
  client0, server0 = copy.deepcopy(run.client_model), copy.deepcopy(run.server_model)
  run.run_round()
  assert len(run.last_losses) == 2
  client0.train(), server0.train()
  _whole_model_split_adam(client0, server0, _batches_of(run, 0), lr=run.lr,
                          opt=torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)
  _assert_state_close(run.client_model.state_dict(), client0.state_dict())
  _assert_state_close(run.server_model.state_dict(), server0.state_dict())
  # The models really moved.
  init = tb.BaselineRun("sflv1", model, 1, 8, 4, **kw)
  assert not torch.equal(init.client_model.state_dict()[next(iter(client0.state_dict()))],
                         client0.state_dict()[next(iter(client0.state_dict()))])


@pytest.mark.parametrize("algorithm", ["sflv2", "sl"])
def test_shared_server_two_clients_equals_sequential_whole_model(algorithm):
  run = tb.BaselineRun(algorithm, "lenet", 2, [8, 4], 4)
  client0, server = copy.deepcopy(run.client_model), copy.deepcopy(run.server_model)
  run.run_round()
  states = {}
  relay = client0
  for k in run.last_client_order:
    c = copy.deepcopy(client0 if algorithm == "sflv2" else relay)
    _whole_model_split_adam(c, server, _batches_of(run, k), lr=1e-3)
    states[k], relay = c.state_dict(), c
  _assert_state_close(run.server_model.state_dict(), server.state_dict())
  if algorithm == "sl":   # the last client's model is relayed on
    expect = relay.state_dict()
  else:                   # FedAvg with weights 8/12 and 4/12
    expect = {key: states[0][key] * (8 / 12) + states[1][key] * (4 / 12) for key in states[0]}
  _assert_state_close(run.client_model.state_dict(), expect)


def test_fl_weighted_fedavg_of_independent_local_trainings():
  run = tb.BaselineRun("fl", "lenet", 2, [8, 4], 4)
  full0 = copy.deepcopy(run.full_model)
  run.run_round()
  states = []
  for k in (0, 1):
    net = copy.deepcopy(full0)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for xb, yb in _batches_of(run, k):
      opt.zero_grad()
      torch.nn.functional.cross_entropy(net(xb), yb).backward()
      opt.step()
    states.append(net.state_dict())
  expect = {key: (8 * states[0][key].double() + 4 * states[1][key].double()).div(12).float()
            for key in states[0]}
  _assert_state_close(run.full_model.state_dict(), expect)


def test_fedavg_matches_hand_computed_weighted_mean_with_bn_buffers():
  torch.manual_seed(0)
  a, _ = tb.build_model("resnet18", input_shape=(3, 32, 32))
  b, _ = tb.build_model("resnet18", input_shape=(3, 32, 32))
  a.train(), b.train()
  with torch.no_grad():   # give the BN buffers different values
    a(torch.randn(4, 3, 32, 32))
    for _ in range(3):
      b(torch.randn(4, 3, 32, 32) * 2 + 1)
  sa, sb = a.state_dict(), b.state_dict()
  assert "stem.1.running_mean" in sa and "stem.1.num_batches_tracked" in sa
  avg = tb.fedavg([sa, sb], [300, 100])
  for key in sa:
    if sa[key].is_floating_point():
      expect = (0.75 * sa[key].double() + 0.25 * sb[key].double()).float()
      torch.testing.assert_close(avg[key], expect, atol=1e-6, rtol=1e-6, msg=key)
    else:
      assert avg[key].dtype == sa[key].dtype
      assert avg[key].item() == round(0.75 * sa[key].item() + 0.25 * sb[key].item())
  assert float((avg["stem.1.running_mean"] - sa["stem.1.running_mean"]).abs().max()) > 1e-3
  # Equal weights: the plain mean; one state dict: itself, exactly.
  mean = tb.fedavg([sa, sb])
  torch.testing.assert_close(mean["stem.0.weight"], (sa["stem.0.weight"] + sb["stem.0.weight"]) / 2)
  one = tb.fedavg([sa], [7])
  assert all(torch.equal(one[k], sa[k]) for k in sa)


def _count(module):
  return sum(p.numel() for p in module.parameters())


def test_architectures_match_sfljax_shapes():
  # LeNet 28x28x1: conv1 6@5x5 SAME (156), conv2 16@5x5 (2,416) | fc 400-120-84-10.
  c, s = tb.build_model("lenet")
  assert list(c._modules) == ["conv1", "conv2"] and list(s._modules) == ["fc1", "fc2", "fc3"]
  assert (_count(c), _count(s)) == (156 + 2416, 48120 + 10164 + 850)
  assert c(torch.zeros(2, 1, 28, 28)).shape == (2, 16, 5, 5)
  # ResNet18 64x64x3, 7 classes, no conv bias: client = stem + layer1_0.
  c, s = tb.build_model("resnet18")
  assert list(c._modules) == ["stem", "layer1_0"]
  assert not any(isinstance(m, torch.nn.Conv2d) and m.bias is not None for m in c.modules())
  assert not any(isinstance(m, torch.nn.Conv2d) and m.bias is not None for m in s.modules())
  stem = 3 * 64 * 49 + 2 * 64
  unit64 = 2 * (64 * 64 * 9 + 2 * 64)
  assert _count(c) == stem + unit64
  # Standard torchvision ResNet18 has 11,689,512 params with a 1000-way fc.
  assert _count(c) + _count(s) == 11_689_512 - (512 * 1000 + 1000) + (512 * 7 + 7)
  smashed = c(torch.zeros(2, 3, 64, 64))
  assert smashed.shape == (2, 64, 16, 16)
  assert s(smashed).shape == (2, 7)
  with pytest.raises(ValueError, match="cut"):
    tb.build_model("lenet", cut=5)


def test_run_baseline_result_and_budget():
  r = tb.run_baseline("sflv2", "lenet", 3, 8, 4, rounds=2, warmup=1, threads=1)
  assert r["timed_rounds"] == 2 and len(r["all_round_seconds"]) == 2
  assert r["seconds_per_round"] == pytest.approx(sum(r["all_round_seconds"]) / 2)
  assert r["samples_per_round"] == 24
  assert r["samples_per_second"] == pytest.approx(24 / r["seconds_per_round"])
  assert r["torch_version"] == torch.__version__ and r["threads"] == 1
  assert len(r["warmup_round_seconds"]) == 1 and r["final_loss"] > 0
  assert len(r["all_round_cpu_seconds"]) == 2 and r["cpu_seconds_per_round"] > 0
  r = tb.run_baseline("sl", "lenet", 2, 4, 4, rounds=3, warmup=1, budget=0.0, threads=1)
  assert r["timed_rounds"] == 1
  with pytest.raises(ValueError, match="algorithm"):
    tb.run_baseline("sflv3", "lenet", 2, 4, 4)


def test_cli_writes_json(tmp_path, capsys):
  out = tmp_path / "res" / "tb.json"
  rc = tb.main(["--algorithms", "sflv1", "fl", "--clients", "2", "--samples-per-client", "4",
                "--batch-size", "4", "--repeats", "1", "--threads", "1", "--out", str(out)])
  assert rc == 0
  text = capsys.readouterr().out
  assert "sflv1" in text and "fl" in text and "saved" in text
  d = json.loads(out.read_text())
  assert [r["algorithm"] for r in d["results"]] == ["sflv1", "fl"]
  assert d["machine"]["torch_version"] == torch.__version__
  assert not [p for p in os.listdir(out.parent) if p != "tb.json"]   # no temp file left


def test_cli_without_torch_prints_one_line_and_exits_2():
  code = ("import sys, runpy; sys.modules['torch'] = None; "
          f"sys.argv = [{SCRIPT!r}, '--clients', '2']; "
          f"runpy.run_path({SCRIPT!r}, run_name='__main__')")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert p.returncode == 2
  lines = (p.stdout + p.stderr).strip().splitlines()
  assert len(lines) == 1, lines
  assert "pip install torch==2.13.0" in lines[0] and "Traceback" not in lines[0]
  # The module still imports (for the main benchmark), and says why it cannot run.
  code = ("import sys; sys.modules['torch'] = None; "
          f"sys.path.insert(0, {os.path.dirname(SCRIPT)!r}); import torch_baseline as tb; "
          "assert not tb.torch_available()\n"
          "try:\n  tb.run_baseline('sflv1', 'lenet', 2, 4, 4)\n"
          "except ImportError as e:\n  print(e)")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stderr
  assert "pip install torch==2.13.0" in p.stdout
