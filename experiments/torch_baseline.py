"""PyTorch reference benchmark shaped like the official SplitFed code.

The loops follow the authors' PyTorch scripts
(chandra2thapa/SplitFed-When-Federated-Learning-Meets-Split-Learning): one
process, clients simulated one after another in a random order each round,
and a per-mini-batch exchange of smashed data and its gradient.  The models
replicate ``sfljax.models`` (LeNet 28x28x1 and ResNet18 64x64x3, NCHW) block
for block, split at the same default cut, so sfljax's speed can be reported
against this loop in the same run.

Per round (one local epoch per client):

* ``sflv1``: per client, a copy of the global client model (Adam created per
  client per round) and a server-side replica started from the global server
  model.  Per batch: client forward -> ``fx.clone().detach().requires_grad_()``
  -> server forward / cross-entropy / backward -> server Adam step (the Adam is
  re-created every batch, as in the official code) -> ``smashed.grad`` back ->
  client backward -> client step.  At the end of the round, FedAvg (weights
  n_k / n) of the client models and of the server replicas (whole
  ``state_dict``, BatchNorm buffers included).
* ``sflv2``: as ``sflv1`` but one shared server model updated in place after
  every batch, clients handled in turn (each its whole local epoch); FedAvg of
  the client models only.
* ``sl``: vanilla split learning: one client model relayed from client to
  client (Adam per client), one server model (Adam re-created per batch).
* ``fl``: FedAvg: each client trains a copy of the whole model (Adam per
  client per round), then the models are averaged.

Data are synthetic random tensors of the right shape (fixed torch seed),
materialised up front; each client's shard is reshuffled every round
(``DataLoader(shuffle=True)`` in the official code) and cut into batches of
``batch_size`` (the last one may be smaller).  Image decoding/augmentation and
evaluation are not timed: the round is training only, like sfljax's
``Experiment.train_round``.

Differences from the official scripts, on purpose: Adam lr 1e-3 (sfljax's
default; the scripts use 1e-4, which does not change the speed); no conv bias
before BatchNorm and global average pooling in ResNet18 (as in sfljax); FedAvg
weighted by n_k / n (the scripts use an unweighted mean, identical for equal
shards).  By default the SFLV1 server replica is trained in place; the official
script deep-copies it twice per batch (``official_server_copies=True`` /
``--official-server-copies`` reproduces that).

Python API (used by the main benchmark)::

  import torch_baseline
  r = torch_baseline.run_baseline("sflv1", "lenet", clients=100,
                                  samples_per_client=64, batch_size=32)
  r["seconds_per_round"], r["samples_per_second"]

CLI::

  python experiments/torch_baseline.py --algorithms sflv1 sflv2 sl fl --model lenet \\
      --clients 100 --samples-per-client 64 --batch-size 32 --repeats 3 --out FILE.json

Needs PyTorch (CPU build): ``pip install torch==2.13.0`` or ``pip install -e .[torch]``.
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import numbers
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Sequence

try:  # PyTorch is optional: the module imports without it.
  import torch
  from torch import nn
  import torch.nn.functional as F
except ImportError:  # pragma: no cover - exercised by the no-torch CLI test
  torch = None

__all__ = [
    "ALGORITHMS",
    "INSTALL_HINT",
    "MODELS",
    "BaselineRun",
    "build_model",
    "fedavg",
    "main",
    "run_baseline",
    "torch_available",
]

ALGORITHMS: tuple[str, ...] = ("sflv1", "sflv2", "sl", "fl")
MODELS: tuple[str, ...] = ("lenet", "resnet18")
# model -> (input shape (C, H, W), number of classes, default cut)
MODEL_DEFAULTS = {"lenet": ((1, 28, 28), 10, 2), "resnet18": ((3, 64, 64), 7, 2)}
INSTALL_HINT = ("PyTorch is not installed: the baseline needs its CPU build, "
                "`pip install torch==2.13.0` (or `pip install -e .[torch]`)")


def torch_available() -> bool:
  """Whether PyTorch could be imported."""
  return torch is not None


def _require_torch():
  if torch is None:
    raise ImportError(INSTALL_HINT)


# ---------------------------------------------------------------------------
# Models: the blocks of sfljax.models, in PyTorch (NCHW)
# ---------------------------------------------------------------------------

if torch is not None:

  class BasicBlock(nn.Module):
    """Two 3x3 convs (no bias) + BN + ReLU; 1x1 conv + BN projection shortcut
    when the stride or the channel count changes (sfljax.models.BasicBlock)."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
      super().__init__()
      self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
      self.norm1 = nn.BatchNorm2d(cout)
      self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
      self.norm2 = nn.BatchNorm2d(cout)
      self.shortcut = None
      if stride != 1 or cin != cout:
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
      y = F.relu(self.norm1(self.conv1(x)))
      y = self.norm2(self.conv2(y))
      s = x if self.shortcut is None else self.shortcut(x)
      return F.relu(y + s)


def _lenet_blocks(input_shape, num_classes):
  """LeNet-5 as sfljax ``_lenet`` (norm 'none'): conv1 6@5x5 (SAME below 32
  px, else VALID) + ReLU + 2x2 pool, conv2 16@5x5 VALID + ReLU + pool, fc1 120,
  fc2 84, fc3 num_classes."""
  c, h, _ = input_shape
  pad1 = 2 if h < 32 else 0
  conv1 = nn.Sequential(nn.Conv2d(c, 6, 5, padding=pad1), nn.ReLU(), nn.MaxPool2d(2))
  conv2 = nn.Sequential(nn.Conv2d(6, 16, 5), nn.ReLU(), nn.MaxPool2d(2))
  with torch.no_grad():
    flat = conv2(conv1(torch.zeros((1,) + tuple(input_shape)))).numel()
  return [("conv1", conv1), ("conv2", conv2),
          ("fc1", nn.Sequential(nn.Flatten(), nn.Linear(flat, 120), nn.ReLU())),
          ("fc2", nn.Sequential(nn.Linear(120, 84), nn.ReLU())),
          ("fc3", nn.Linear(84, num_classes))]


def _resnet18_blocks(input_shape, num_classes):
  """ResNet18 as sfljax ``_resnet18`` (norm 'batch'): stem (7x7/2 conv 64, no
  bias, BN, ReLU, 3x3/2 max-pool pad 1), layer1_0 .. layer4_1 basic blocks
  (64, 128, 256, 512; stride 2 at layer2_0/3_0/4_0), head (global average
  pooling + Linear).  Convs: He normal (fan-out) init; BN weight 1, bias 0."""
  c = input_shape[0]
  blocks = [("stem", nn.Sequential(nn.Conv2d(c, 64, 7, stride=2, padding=3, bias=False),
                                   nn.BatchNorm2d(64), nn.ReLU(),
                                   nn.MaxPool2d(3, stride=2, padding=1)))]
  cin = 64
  for stage, ch in enumerate((64, 128, 256, 512), start=1):
    for j in range(2):
      blocks.append((f"layer{stage}_{j}",
                     BasicBlock(cin, ch, 2 if stage > 1 and j == 0 else 1)))
      cin = ch
  blocks.append(("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                       nn.Linear(512, num_classes))))
  for _, block in blocks:
    for m in block.modules():
      if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
  return blocks


def build_model(model: str, *, cut: int | None = None, input_shape: Sequence[int] | None = None,
                num_classes: int | None = None):
  """Returns ``(client, server)``: two ``nn.Sequential`` of named blocks.

  ``client`` holds the first ``cut`` blocks (default: 2, sfljax's default cut:
  LeNet conv1+conv2, ResNet18 stem+layer1_0), ``server`` the rest.
  ``input_shape`` is (C, H, W).  Parameters are initialised from torch's
  global RNG (seed it for reproducibility).
  """
  _require_torch()
  if model not in MODEL_DEFAULTS:
    raise ValueError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")
  shape0, classes0, cut0 = MODEL_DEFAULTS[model]
  input_shape = tuple(int(d) for d in (input_shape or shape0))
  num_classes = int(num_classes or classes0)
  cut = cut0 if cut is None else int(cut)
  builder = _lenet_blocks if model == "lenet" else _resnet18_blocks
  blocks = builder(input_shape, num_classes)
  if not 1 <= cut < len(blocks):
    raise ValueError(f"cut {cut} is out of range for {model}: valid cuts are 1..{len(blocks) - 1}")
  return (nn.Sequential(collections.OrderedDict(blocks[:cut])),
          nn.Sequential(collections.OrderedDict(blocks[cut:])))


# ---------------------------------------------------------------------------
# FedAvg over state dicts
# ---------------------------------------------------------------------------


class _FedAvg:
  """Streaming weighted mean of state dicts (the total weight is known up
  front, so a single client with weight n/n is copied exactly)."""

  def __init__(self, total: float):
    if total <= 0:
      raise ValueError("FedAvg needs a positive total weight")
    self.total = float(total)
    self.sum = None
    self.dtypes = None

  def add(self, state_dict, weight: float):
    if weight < 0:
      raise ValueError("FedAvg weights must be non-negative")
    a = float(weight) / self.total
    if self.sum is None:
      self.dtypes = {k: v.dtype for k, v in state_dict.items()}
      self.sum = collections.OrderedDict(
          (k, v.detach() * a if v.is_floating_point() else v.detach().double() * a)
          for k, v in state_dict.items())
      return
    if state_dict.keys() != self.sum.keys():
      raise ValueError("FedAvg: state dicts have different keys")
    for k, v in state_dict.items():
      self.sum[k].add_(v.detach().to(self.sum[k].dtype), alpha=a)

  def result(self):
    if self.sum is None:
      raise ValueError("FedAvg of no state dicts")
    return collections.OrderedDict(
        (k, v if self.dtypes[k].is_floating_point else torch.round(v).to(self.dtypes[k]))
        for k, v in self.sum.items())


def fedavg(state_dicts, weights=None):
  """Weighted mean of ``state_dicts`` with weights ``weights`` (e.g. n_k).

  Weights are normalised (n_k / n); ``None`` means equal weights.  Every entry
  is averaged, BatchNorm running statistics included; integer buffers
  (``num_batches_tracked``) are averaged and rounded back to their dtype.
  """
  _require_torch()
  state_dicts = list(state_dicts)
  weights = [1.0] * len(state_dicts) if weights is None else [float(w) for w in weights]
  if len(weights) != len(state_dicts) or not state_dicts:
    raise ValueError("fedavg needs one weight per state dict and at least one state dict")
  acc = _FedAvg(sum(weights))
  for sd, w in zip(state_dicts, weights):
    acc.add(sd, w)
  return acc.result()


# ---------------------------------------------------------------------------
# The official-shaped training loops
# ---------------------------------------------------------------------------


def _accuracy(logits, y):
  """The official ``calculate_accuracy`` (percent of correct argmax)."""
  preds = logits.max(1, keepdim=True)[1]
  return 100.0 * preds.eq(y.view_as(preds)).sum().float() / preds.shape[0]


class BaselineRun:
  """One configuration: global models, per-client data, ``run_round()``.

  Attributes after construction: ``client_model`` / ``server_model`` (the
  global models; for ``fl`` they are the two halves of ``full_model``), and
  ``data`` (per-client ``(x, y)`` tensors).  After each round:
  ``last_client_order`` (clients in processing order), ``last_perms[k]``
  (client k's sample order; its batches are consecutive slices of
  ``batch_size``) and ``last_losses`` (every batch's loss, in order).

  ``optimizer='sgd'`` swaps Adam for plain SGD on both sides (for tests: SGD
  steps are proportional to the gradients, Adam's are nearly scale-free).
  """

  def __init__(self, algorithm: str, model: str, clients: int,
               samples_per_client: int | Sequence[int], batch_size: int, *,
               cut: int | None = None, lr: float = 1e-3, seed: int = 0,
               input_shape: Sequence[int] | None = None, num_classes: int | None = None,
               official_server_copies: bool = False, optimizer: str = "adam"):
    _require_torch()
    if optimizer not in ("adam", "sgd"):
      raise ValueError(f"unknown optimizer {optimizer!r}: choose 'adam' or 'sgd'")
    if algorithm not in ALGORITHMS:
      raise ValueError(f"unknown algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    if model not in MODEL_DEFAULTS:
      raise ValueError(f"unknown model {model!r}: choose one of {', '.join(MODELS)}")
    if isinstance(samples_per_client, numbers.Integral):
      counts = [int(samples_per_client)] * int(clients)
    else:
      counts = [int(n) for n in samples_per_client]
    if int(clients) < 1 or len(counts) != int(clients) or min(counts) < 1:
      raise ValueError("need clients >= 1 and samples_per_client >= 1 for every client")
    if int(batch_size) < 1:
      raise ValueError("batch_size must be >= 1")
    self.algorithm, self.model, self.lr = algorithm, model, float(lr)
    self.batch_size, self.counts = int(batch_size), counts
    self.official_server_copies = bool(official_server_copies)
    self.optimizer = optimizer
    shape0, classes0, cut0 = MODEL_DEFAULTS[model]
    self.input_shape = tuple(int(d) for d in (input_shape or shape0))
    self.num_classes = int(num_classes or classes0)
    self.cut = cut0 if cut is None else int(cut)

    torch.manual_seed(seed)
    self.client_model, self.server_model = build_model(
        model, cut=self.cut, input_shape=self.input_shape, num_classes=self.num_classes)
    self.full_model = nn.Sequential(collections.OrderedDict(
        client=self.client_model, server=self.server_model))
    gen = torch.Generator().manual_seed(seed + 1)
    self.data = [(torch.randn((n,) + self.input_shape, generator=gen),
                  torch.randint(self.num_classes, (n,), generator=gen)) for n in counts]
    self._gen = torch.Generator().manual_seed(seed + 2)
    self.criterion = nn.CrossEntropyLoss()
    self.last_client_order: list[int] = []
    self.last_perms: dict[int, torch.Tensor] = {}
    self.last_losses: list[float] = []
    self.last_cpu_seconds = 0.0   # process CPU time of the last round
    self._given_batches = None    # run_round(batches=...): this round's batches

  @property
  def samples_per_round(self) -> int:
    return sum(self.counts)

  def _opt(self, params):
    """A fresh optimizer: Adam (the official code's) or plain SGD."""
    if self.optimizer == "sgd":
      return torch.optim.SGD(params, lr=self.lr)
    return torch.optim.Adam(params, lr=self.lr)

  # -- helpers ---------------------------------------------------------------

  def _batches(self, k):
    """Client k's shuffled batches for this round (DataLoader(shuffle=True))."""
    x, y = self.data[k]
    if self._given_batches is not None:   # batches given to run_round
      rows = [torch.as_tensor(b, dtype=torch.long) for b in self._given_batches[k]]
      self.last_perms[k] = torch.cat(rows)
      for idx in rows:
        yield x[idx], y[idx]
      return
    perm = torch.randperm(len(y), generator=self._gen)
    self.last_perms[k] = perm
    for i in range(0, len(y), self.batch_size):
      idx = perm[i:i + self.batch_size]
      yield x[idx], y[idx]

  def _server_step(self, net_server, client_fx, y):
    """The official ``train_server`` body: a fresh Adam every batch."""
    net_server.train()
    optimizer_server = self._opt(net_server.parameters())
    optimizer_server.zero_grad()
    fx_server = net_server(client_fx)
    loss = self.criterion(fx_server, y)
    acc = _accuracy(fx_server, y)
    loss.backward()
    dfx_client = client_fx.grad.clone().detach()
    optimizer_server.step()
    self.last_losses.append(loss.item())
    acc.item()
    return dfx_client

  def _client_epoch(self, k, net, server_step):
    """The official ``Client.train``: Adam per client, split exchange per batch."""
    net.train()
    optimizer_client = self._opt(net.parameters())
    for images, labels in self._batches(k):
      optimizer_client.zero_grad()
      fx = net(images)
      client_fx = fx.clone().detach().requires_grad_(True)
      dfx = server_step(client_fx, labels)
      fx.backward(dfx)
      optimizer_client.step()
    return net

  # -- one round ----------------------------------------------------------------

  def run_round(self, order: Sequence[int] | None = None, batches=None) -> float:
    """Trains one round (one local epoch on every client); returns seconds.

    For cross-framework tests (default: the official code's randomness):
    ``order`` gives the clients' processing order (default: a random
    permutation), ``batches`` every client's batches (``batches[k]``: a list
    of index arrays into ``data[k]``; default: a fresh shuffle of the shard
    cut into ``batch_size`` slices).
    """
    if order is None:
      order = torch.randperm(len(self.counts), generator=self._gen).tolist()
    order = [int(k) for k in order]
    self._given_batches = batches
    self.last_client_order, self.last_perms, self.last_losses = order, {}, []
    c0, t0 = time.process_time(), time.perf_counter()
    getattr(self, "_round_" + self.algorithm)(order)
    t1, c1 = time.perf_counter(), time.process_time()
    self.last_cpu_seconds = c1 - c0
    return t1 - t0

  def _round_sflv1(self, order):
    n = self.samples_per_round
    avg_client, avg_server = _FedAvg(n), _FedAvg(n)
    for k in order:
      # The server keeps one replica per client, started from the global model.
      replica = [copy.deepcopy(self.server_model)]

      if self.official_server_copies:
        def server_step(client_fx, y):
          net_server = copy.deepcopy(replica[0])
          dfx = self._server_step(net_server, client_fx, y)
          replica[0] = copy.deepcopy(net_server)
          return dfx
      else:
        def server_step(client_fx, y):
          return self._server_step(replica[0], client_fx, y)

      net = self._client_epoch(k, copy.deepcopy(self.client_model), server_step)
      avg_client.add(net.state_dict(), self.counts[k])
      avg_server.add(replica[0].state_dict(), self.counts[k])
    self.client_model.load_state_dict(avg_client.result())
    self.server_model.load_state_dict(avg_server.result())

  def _shared_server_step(self, client_fx, y):
    return self._server_step(self.server_model, client_fx, y)

  def _round_sflv2(self, order):
    avg_client = _FedAvg(self.samples_per_round)
    for k in order:
      net = self._client_epoch(k, copy.deepcopy(self.client_model), self._shared_server_step)
      avg_client.add(net.state_dict(), self.counts[k])
    self.client_model.load_state_dict(avg_client.result())

  def _round_sl(self, order):
    for k in order:
      net = self._client_epoch(k, copy.deepcopy(self.client_model), self._shared_server_step)
      self.client_model.load_state_dict(net.state_dict())   # relay to the next client

  def _round_fl(self, order):
    avg = _FedAvg(self.samples_per_round)
    for k in order:
      net = copy.deepcopy(self.full_model)
      net.train()
      optimizer = self._opt(net.parameters())
      for images, labels in self._batches(k):
        optimizer.zero_grad()
        out = net(images)
        loss = self.criterion(out, labels)
        acc = _accuracy(out, labels)
        loss.backward()
        optimizer.step()
        self.last_losses.append(loss.item())
        acc.item()
      avg.add(net.state_dict(), self.counts[k])
    self.full_model.load_state_dict(avg.result())


def run_baseline(algorithm: str, model: str, clients: int,
                 samples_per_client: int | Sequence[int], batch_size: int,
                 rounds: int = 3, warmup: int = 1, *, budget: float | None = None,
                 cut: int | None = None, lr: float = 1e-3, seed: int = 0,
                 threads: int | None = None, input_shape: Sequence[int] | None = None,
                 num_classes: int | None = None, official_server_copies: bool = False) -> dict:
  """Times the official-shaped PyTorch loop of ``algorithm`` on ``model``.

  Args:
    algorithm: 'sflv1', 'sflv2', 'sl' or 'fl'.
    model: 'lenet' (28x28x1, 10 classes) or 'resnet18' (64x64x3, 7 classes).
    clients: number of clients K (all take part in every round).
    samples_per_client: training samples per client (an int, or one int per
      client); one round = one local epoch over all of them.
    batch_size: mini-batch size (the last batch of a client may be smaller).
    rounds: timed rounds (the median is reported).
    warmup: untimed rounds run first.
    budget: seconds; if the last warm-up round (or, without warm-up, the
      first timed round) took longer, only one timed round is done.
    cut: blocks on the client (default 2, sfljax's default cut).
    lr: Adam learning rate (both sides).
    seed: torch seed for the models, the synthetic data and the shuffling.
    threads: torch intra-op threads (default ``os.cpu_count()``).
    input_shape, num_classes: override the model's (C, H, W) / class count.
    official_server_copies: SFLV1 only: deep-copy the server replica twice per
      batch as the official script does (default: train it in place).

  Returns a dict with ``seconds_per_round`` (median over the timed rounds),
  ``samples_per_second`` (samples per round / that median),
  ``all_round_seconds``, ``warmup_round_seconds``, ``timed_rounds``,
  ``samples_per_round``, ``cpu_seconds_per_round`` / ``all_round_cpu_seconds``
  (process CPU time: with ``threads=1`` a load-independent cross-check of the
  wall time when other jobs share the cores), ``torch_version``, ``threads``,
  ``final_loss`` (mean batch loss of the last round) and the settings.

  Raises ImportError (with the install command) if PyTorch is missing.
  """
  _require_torch()
  if rounds < 1 or warmup < 0:
    raise ValueError("need rounds >= 1 and warmup >= 0")
  threads = int(threads or os.cpu_count() or 1)
  torch.set_num_threads(threads)
  run = BaselineRun(algorithm, model, clients, samples_per_client, batch_size, cut=cut, lr=lr,
                    seed=seed, input_shape=input_shape, num_classes=num_classes,
                    official_server_copies=official_server_copies)
  warm = [run.run_round() for _ in range(warmup)]
  times, cpu = [], []
  for i in range(rounds):
    times.append(run.run_round())
    cpu.append(run.last_cpu_seconds)
    probe = warm[-1] if warm else times[0]
    if i == 0 and budget is not None and probe > budget:
      break
  sec = statistics.median(times)
  losses = run.last_losses
  return {
      "framework": "pytorch", "algorithm": algorithm, "model": model, "clients": int(clients),
      "samples_per_client": (run.counts[0] if isinstance(samples_per_client, numbers.Integral)
                             else list(run.counts)),
      "batch_size": int(batch_size), "cut": run.cut, "lr": float(lr),
      "input_shape": list(run.input_shape), "num_classes": run.num_classes,
      "official_server_copies": bool(official_server_copies) and algorithm == "sflv1",
      "samples_per_round": run.samples_per_round,
      "seconds_per_round": sec, "samples_per_second": run.samples_per_round / sec,
      "timed_rounds": len(times), "all_round_seconds": times,
      "cpu_seconds_per_round": statistics.median(cpu), "all_round_cpu_seconds": cpu,
      "warmup_round_seconds": warm, "budget": budget,
      "final_loss": sum(losses) / len(losses) if losses else float("nan"),
      "torch_version": torch.__version__, "threads": torch.get_num_threads(),
  }


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------


def cpu_model() -> str:
  """The CPU's model name (from /proc/cpuinfo where there is one)."""
  try:
    with open("/proc/cpuinfo") as f:
      names = [l.split(":", 1)[1].strip() for l in f if l.startswith("model name")]
    return names[0] if names else platform.processor()
  except OSError:
    return platform.processor()


def _machine() -> dict:
  return {"python": platform.python_version(), "platform": platform.platform(),
          "cpu_count": os.cpu_count(), "torch_version": torch.__version__,
          "torch_threads": torch.get_num_threads(), "cpu_model": cpu_model()}


def _save_json(path: str, obj) -> None:
  """Writes ``obj`` to a temporary file next to ``path``, then renames it."""
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=".torch_baseline.", suffix=".tmp", dir=folder)
  try:
    with os.fdopen(fd, "w") as f:
      json.dump(obj, f, indent=2)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def main(argv=None) -> int:
  p = argparse.ArgumentParser(
      description="PyTorch baseline shaped like the official SplitFed code "
                  "(seconds per round of SFLV1/SFLV2/SL/FL on synthetic data).")
  p.add_argument("--algorithms", nargs="+", choices=ALGORITHMS, default=list(ALGORITHMS))
  p.add_argument("--model", nargs="+", choices=MODELS, default=["lenet"])
  p.add_argument("--clients", nargs="+", type=int, default=[100])
  p.add_argument("--samples-per-client", type=int, default=64)
  p.add_argument("--batch-size", type=int, default=32)
  p.add_argument("--repeats", type=int, default=3, help="timed rounds (median reported)")
  p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
  p.add_argument("--budget", type=float, default=None,
                 help="seconds: a configuration whose warm-up round takes longer is timed once")
  p.add_argument("--cut", type=int, default=None, help="blocks on the client (default 2)")
  p.add_argument("--lr", type=float, default=1e-3)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--threads", type=int, default=None, help="default: os.cpu_count()")
  p.add_argument("--official-server-copies", action="store_true",
                 help="SFLV1: deep-copy the server replica twice per batch (official script)")
  p.add_argument("--out", default=None, help="save the results as JSON")
  args = p.parse_args(argv)
  if torch is None:
    print(f"torch_baseline: {INSTALL_HINT}", file=sys.stderr)
    return 2

  rows = []
  print(f"{'model':9s} {'algorithm':9s} {'K':>4s} {'n/client':>8s} {'batch':>5s} "
        f"{'s/round':>9s} {'samples/s':>10s} {'cpu s/round':>11s}", flush=True)
  for model in args.model:
    for k in args.clients:
      for alg in args.algorithms:
        r = run_baseline(alg, model, k, args.samples_per_client, args.batch_size,
                         rounds=args.repeats, warmup=args.warmup, budget=args.budget,
                         cut=args.cut, lr=args.lr, seed=args.seed, threads=args.threads,
                         official_server_copies=args.official_server_copies)
        rows.append(r)
        note = "" if r["timed_rounds"] == args.repeats else "  (timed once: over budget)"
        print(f"{model:9s} {alg:9s} {k:4d} {args.samples_per_client:8d} {args.batch_size:5d} "
              f"{r['seconds_per_round']:9.3f} {r['samples_per_second']:10.0f} "
              f"{r['cpu_seconds_per_round']:11.3f}{note}", flush=True)
  if args.out:
    _save_json(args.out, {"machine": _machine(), "settings": vars(args), "results": rows,
                          "date": time.strftime("%Y-%m-%d %H:%M:%S")})
    print(f"saved {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
