"""Partial participation (``client_fraction < 1``) with the clients sharded over a mesh.

On D devices each round's M participants are drawn stratified: M/D from each
device's own block of K/D clients (``data.sample_clients(..., strata=D)``),
and every device reads and writes back only its own participants' rows. The
4-device runs need fake CPU devices, set before JAX starts, so this file
also serves as its own worker: ``python tests/mesh_sampling_test.py --worker
OUT.npz`` (run in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``, like
tests/distributed_test.py) runs each algorithm sharded over 4 devices and on
one device with the same participants (``Experiment(..., strata=4)``) and
writes both. The rest runs in-process on the one CPU device.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from sfljax import data  # noqa: E402
from sfljax.config import ConfigError  # noqa: E402
from sfljax.train import Config, Experiment  # noqa: E402

HERE = os.path.abspath(__file__)
CLIENTS, FRACTION, DEVICES, ROUNDS = 8, 0.5, 4, 3
COUNTS = (16, 12, 16, 10, 16, 14, 8, 16)  # Unequal clients: padding and masked steps.
# algorithm:step_loop:strategy[:dropout|:dp]: both step loops, both strategies
# inside a device, one run with client faults (the `reported` input) and one
# with client-side DP-SGD (Poisson-sampled batches, per-client noise keys) and
# a PixelDP noise layer.
RUNS = ("sflv1:python:sequential", "sflv2:scan:vmap", "fl:scan:vmap", "sflv1:scan:vmap:dropout",
        "sflv1:scan:vmap:dp")
TIMEOUT = 600
METRIC_KEYS = ("train_loss", "train_accuracy", "test_loss", "test_accuracy",
               "client_test_accuracy")


def _problem():
  """Unequal shards of the embedded digits and a small test set."""
  ds = data.load_digits(0)
  starts = np.cumsum((0,) + COUNTS)
  parts = [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]
  return dataclasses.replace(ds, x_test=ds.x_test[:32], y_test=ds.y_test[:32]), parts


def _config(run: str, **changes) -> Config:
  name, step_loop, strategy, *extra = run.split(":")
  if "dp" in extra:
    changes = dict(dp_clip=1.0, dp_noise=1.0, dp_delta=1e-3, pixeldp_epsilon=4.0, **changes)
  return Config(algorithm=name, clients=CLIENTS, client_fraction=FRACTION, rounds=ROUNDS,
                batch_size=8, step_loop=step_loop, strategy=strategy, optimizer="adam",
                lr=1e-3, dropout_rate=0.3 if "dropout" in extra else 0.0, **changes)


def _env(devices: int) -> dict:
  env = dict(os.environ)
  # As in tests/distributed_test.py: optimization level 0 halves XLA:CPU compile
  # time; both sides of every comparison are compiled with the same flags.
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      "--xla_backend_optimization_level=0")
  env["JAX_PLATFORMS"] = "cpu"
  return env


# -- the 4-device worker (a subprocess) --------------------------------------

_COLLECTIVES = ("all-gather", "all-reduce", "all-to-all", "collective-permute",
                "reduce-scatter")
_OP = re.compile(r"=\s*(\(.*?\)|\S+)\s+(" + "|".join(_COLLECTIVES) + r")(?:-start)?\(")
_SHAPE = re.compile(r"\b[a-z]+[0-9]*\[([0-9,]*)\]")


def collective_shapes(hlo: str) -> list[tuple[str, tuple[int, ...]]]:
  """(op, result shape) of every cross-device collective in compiled HLO text."""
  found = []
  for line in hlo.splitlines():
    m = _OP.search(line)
    if m:
      found += [(m.group(2), tuple(int(d) for d in s.split(",") if d))
                for s in _SHAPE.findall(m.group(1))]
  return found


def _squeeze(shape) -> tuple[int, ...]:
  return tuple(d for d in shape if d != 1)


def per_client_collectives(exp, state, hlo: str) -> list[str]:
  """The collectives of ``hlo`` that move per-client rows: an array of K (all
  clients) or M (the participants) rows of a per-client state leaf or of the
  clients' data (size-1 axes ignored: a gather may add one)."""
  import jax
  from sfljax.state import per_client_mask
  tails = set()
  leaves = jax.tree.leaves(state.algo)
  for leaf, per in zip(leaves, jax.tree.leaves(per_client_mask(state.algo))):
    if per:
      tails.add(_squeeze(leaf.shape[1:]))
  tails |= {_squeeze(exp.client_data.x.shape[1:]), _squeeze(exp.client_data.y.shape[1:])}
  tails.discard(())
  rows = {exp.client_data.num_clients, exp.num_participants}
  return [f"{op} {shape}" for op, shape in collective_shapes(hlo)
          if shape and shape[0] in rows and _squeeze(shape[1:]) in tails]


def _hlo(exp, state) -> str:
  import jax
  inputs, p = exp.round_inputs(state.round), exp._programs
  if "round" in p:
    return p["round"].lower(state.algo, inputs).compile().as_text()
  carry = jax.eval_shape(p["begin"], state.algo, inputs)
  return "\n".join(p[k].lower(*a).compile().as_text() for k, a in (
      ("begin", (state.algo, inputs)), ("step", (carry, inputs, np.int32(0))),
      ("end", (carry, inputs))))


def _flat(prefix, tree) -> dict[str, np.ndarray]:
  import jax
  return {prefix + jax.tree_util.keystr(path): np.asarray(v)
          for path, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _history_row(metrics: dict) -> dict:
  keep = METRIC_KEYS + ("participants", "reported", "client_train_loss", "failed_clients",
                        "bytes_client_to_server", "epsilon", "client_epsilon",
                        "dp_overflow_steps")
  return {k: metrics[k] for k in keep if k in metrics}


def worker(out: str) -> None:
  """Every run of RUNS sharded over 4 devices and on one device with the
  same participants; writes the states, metrics, ids and checks to ``out``."""
  import jax
  from sfljax import distributed
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.dirname(out), "xla"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  assert len(jax.devices()) == DEVICES
  ds, parts = _problem()
  arrays, info = {}, {}
  for run in RUNS:
    mesh_exp = Experiment(_config(run, devices=DEVICES), dataset=ds, parts=parts)
    one = Experiment(_config(run), dataset=ds, parts=parts, strata=DEVICES)
    record = {"strata": [mesh_exp.strata, one.strata], "trace_counts": [],
              "ids": {"sharded": [], "reference": []},
              "history": {"sharded": [], "reference": []}}
    # Where each device's participant rows live: (mesh position, ids held).
    inputs = mesh_exp.round_inputs(0)
    devices = list(mesh_exp.mesh.devices.flat)
    record["shards"] = sorted((devices.index(s.device), np.asarray(s.data).tolist())
                              for s in inputs.clients.addressable_shards)
    record["specs"] = {f: list(getattr(inputs, f).sharding.spec) for f in
                       ("idx", "mask", "weights", "clients", "reported")
                       if getattr(inputs, f) is not None}
    for which, exp in (("sharded", mesh_exp), ("reference", one)):
      state = exp.init()
      for r in range(ROUNDS):
        record["ids"][which].append(exp.participants(r).tolist())
        state, metrics = exp.step(state)
        record["history"][which].append(_history_row(metrics))
        if which == "sharded":
          record["trace_counts"].append(exp.trace_count)
      arrays.update(_flat(f"{run}/{which}/state", distributed.fetch(state.algo)))
      arrays.update(_flat(f"{run}/{which}/global",
                          distributed.fetch(exp.global_variables(state))))
    record["programs"] = len(mesh_exp._programs)
    record["cache_sizes"] = [p._cache_size() for p in mesh_exp._programs.values()]
    hlo = _hlo(mesh_exp, state := mesh_exp.init())
    record["per_client_collectives"] = per_client_collectives(mesh_exp, state, hlo)
    record["collectives"] = sorted({f"{op} {shape}" for op, shape in collective_shapes(hlo)})
    info[run] = record
  np.savez(out, info=np.array(json.dumps(info)), **arrays)


# -- the tests: 4 devices (the worker's results) ------------------------------

@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  out = tmp_path_factory.mktemp("mesh_sampling") / "out.npz"
  proc = subprocess.run([sys.executable, HERE, "--worker", str(out)], env=_env(DEVICES),
                        capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  with np.load(out) as f:
    return {k: f[k] for k in f.files if k != "info"}, json.loads(str(f["info"]))


@pytest.mark.parametrize("run", RUNS)
def test_each_device_draws_its_own_clients(four_devices, run):
  """M/D participants from every device's block of K/D clients, and the
  participants' inputs sharded like the clients: device d holds the rows of
  its own clients."""
  _, info = four_devices
  rec = info[run]
  assert rec["strata"] == [DEVICES, DEVICES]
  block, per = CLIENTS // DEVICES, data.num_participants(CLIENTS, FRACTION) // DEVICES
  for ids in rec["ids"]["sharded"]:
    assert len(ids) == per * DEVICES and ids == sorted(set(ids))
    for d in range(DEVICES):
      assert [c // block for c in ids[d * per:(d + 1) * per]] == [d] * per
  assert len({tuple(ids) for ids in rec["ids"]["sharded"]}) > 1   # A fresh draw per round.
  assert rec["ids"]["reference"] == rec["ids"]["sharded"]
  assert [d for d, _ in rec["shards"]] == list(range(DEVICES))
  for d, held in rec["shards"]:
    assert len(held) == per and all(c // block == d for c in held), (d, held)
  assert all(spec == ["clients"] for spec in rec["specs"].values()), rec["specs"]
  assert ("reported" in rec["specs"]) == run.endswith(":dropout")


@pytest.mark.parametrize("run", RUNS)
def test_sharded_partial_participation_equals_one_device(four_devices, run):
  """The same participants on one device give the same metrics, global model
  and per-client states (optimizer rows of participants and of clients that
  sat out); only the order of the cross-device sums differs (the tolerance of
  tests/distributed_test.py: observed max |diff| ~4e-6 on loss sums ~20, ~2e-7
  on parameters)."""
  arrays, info = four_devices
  hist = info[run]["history"]
  for got, ref in zip(hist["sharded"], hist["reference"]):
    for key in METRIC_KEYS:
      assert got[key] == pytest.approx(ref[key], rel=1e-5, abs=1e-5), key
    for key in ("participants", "reported", "failed_clients", "bytes_client_to_server",
                "epsilon", "client_epsilon", "dp_overflow_steps"):
      assert got.get(key) == ref.get(key), key
    assert ("epsilon" in got) == run.endswith(":dp")
    assert [v is None for v in got["client_train_loss"]] == \
        [v is None for v in ref["client_train_loss"]]
    np.testing.assert_allclose(
        [np.nan if v is None else v for v in got["client_train_loss"]],
        [np.nan if v is None else v for v in ref["client_train_loss"]], rtol=1e-5, atol=1e-5)
  if run.endswith(":dropout"):   # The faults path did run: someone failed.
    assert any(row["failed_clients"] for row in hist["sharded"])
  keys = [k for k in arrays if k.startswith(f"{run}/sharded/")]
  assert any("/state" in k for k in keys) and any("/global" in k for k in keys)
  for key in keys:
    single = arrays[key.replace(f"{run}/sharded/", f"{run}/reference/")]
    assert arrays[key].shape == single.shape, key
    np.testing.assert_allclose(arrays[key], single, rtol=1e-5, atol=1e-5, err_msg=key)


@pytest.mark.parametrize("run", RUNS)
def test_sampling_on_a_mesh_never_recompiles(four_devices, run):
  _, info = four_devices
  rec = info[run]
  assert rec["trace_counts"] == [rec["programs"]] * ROUNDS
  assert rec["cache_sizes"] == [1] * rec["programs"]


@pytest.mark.parametrize("run", RUNS)
def test_no_per_client_rows_cross_devices(four_devices, run):
  """No collective of the compiled round moves K or M rows of a per-client
  state leaf or of the clients' data (a global gather would: XLA compiles
  ``state[ids]`` on sharded rows to a masked local gather plus an all-reduce,
  and the write-back to all-gathers). FedAvg's all-reduce is still there."""
  _, info = four_devices
  rec = info[run]
  assert rec["per_client_collectives"] == [], rec["collectives"]
  assert any(c.startswith("all-reduce") for c in rec["collectives"])


def test_cli_fraction_that_does_not_split_over_the_devices(tmp_path):
  """`sfljax train --devices 4 --clients 8 --client-fraction 0.75` (6
  participants): one line naming --client-fraction and the fractions that work."""
  proc = subprocess.run([sys.executable, "-m", "sfljax", "train", "--quiet", "--clients", "8",
                         "--devices", "4", "--client-fraction", "0.75",
                         "--out", str(tmp_path / "x")],
                        env=_env(DEVICES), capture_output=True, text=True, timeout=TIMEOUT,
                        cwd=os.path.dirname(os.path.dirname(HERE)))
  err = proc.stderr.strip()
  assert proc.returncode == 2 and "\n" not in err, err
  assert err.startswith("sfljax: error: --client-fraction: 0.75 of 8 clients gives 6 "), err
  assert "4 devices" in err and "0.5 (4 clients) or 1 (8 clients)" in err, err


# -- in-process: one device ----------------------------------------------------

def _today(num_clients, fraction, seed, round_index):
  """The one-device draw as it was before stratified sampling existed."""
  m = max(1, int(round(fraction * num_clients)))
  ids = data.rng_for(seed, 4, round_index).choice(num_clients, m, replace=False)
  return np.sort(ids).astype(np.int32)


def test_one_device_sampling_is_unchanged():
  ds, parts = _problem()
  for fraction, seed in ((0.5, 0), (0.3, 7), (0.75, 3)):
    exp = Experiment(Config(clients=CLIENTS, client_fraction=fraction, seed=seed), dataset=ds,
                     parts=parts)
    assert exp.strata == 1
    for r in range(6):
      want = _today(CLIENTS, fraction, seed, r)
      np.testing.assert_array_equal(exp.participants(r), want)
      np.testing.assert_array_equal(data.sample_clients(CLIENTS, fraction, seed=seed,
                                                        round_index=r), want)
      np.testing.assert_array_equal(np.asarray(exp.round_inputs(r).clients), want)
  assert data.sample_clients(1000, 0.1, seed=3, round_index=2).tolist() == \
      _today(1000, 0.1, 3, 2).tolist()


def test_stratified_draw():
  """M/S distinct ids from each of S contiguous blocks, increasing, seeded by
  (seed, round); a fresh draw every round."""
  draws = [data.sample_clients(1000, 0.1, seed=3, round_index=r, strata=4) for r in range(5)]
  for a in draws:
    assert len(a) == 100 and a.dtype == np.int32 and np.all(np.diff(a) > 0)
    assert np.bincount(a // 250, minlength=4).tolist() == [25] * 4
  assert len({tuple(a) for a in draws}) == 5
  again = data.sample_clients(1000, 0.1, seed=3, round_index=4, strata=4)
  np.testing.assert_array_equal(again, draws[4])
  assert not np.array_equal(data.sample_clients(1000, 0.1, seed=4, round_index=4, strata=4),
                            draws[4])
  assert data.sample_clients(8, 1.0, seed=0, round_index=0, strata=4) is None


@pytest.mark.parametrize("fraction,m,hint", [
    (0.3, 2, "0.5 (4 clients)"),                       # Only the multiple above fits.
    (0.75, 6, "0.5 (4 clients) or 1 (8 clients)"),
    (0.875, 7, "0.5 (4 clients) or 1 (8 clients)"),
])
def test_fraction_that_does_not_split_is_a_one_line_error(fraction, m, hint):
  ds, parts = _problem()
  with pytest.raises(ConfigError) as e:
    Experiment(Config(clients=CLIENTS, client_fraction=fraction), dataset=ds, parts=parts,
               strata=DEVICES)
  assert e.value.flag == "--client-fraction" and "\n" not in str(e.value)
  assert e.value.message.startswith(f"{fraction:g} of 8 clients gives {m} participants "
                                    "per round, which do not split evenly over 4 strata")
  assert e.value.message.endswith(f"e.g. {hint}"), e.value.message
  with pytest.raises(ValueError, match=r"--client-fraction: .* 1000 clients gives 100 .*"
                                       r"e\.g\. 0\.096 \(96 clients\) or 0\.104 \(104 clients\)"):
    data.sample_clients(1000, 0.1, seed=3, round_index=0, strata=8)
  with pytest.raises(ConfigError, match="--clients"):
    Experiment(Config(clients=CLIENTS, client_fraction=0.5), dataset=ds, parts=parts, strata=3)
  # Full participation: nothing to draw, any strata.
  assert Experiment(Config(clients=CLIENTS), dataset=ds, parts=parts, strata=4).strata == 4


if __name__ == "__main__":
  if sys.argv[1:2] != ["--worker"] or len(sys.argv) != 3:
    sys.exit("usage: mesh_sampling_test.py --worker OUT.npz (run by the tests)")
  worker(sys.argv[2])
