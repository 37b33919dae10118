"""The client axis sharded over devices and processes = the single-device run.

The multi-device runs need fake CPU devices, which must be set before JAX
starts, so they run ``tests/multihost_worker.py`` in subprocesses: 4 devices
in one process, and 2 processes x 2 devices joined by
``jax.distributed.initialize`` on 127.0.0.1. The rest runs in-process on the
one CPU device.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

import multihost_worker as w
from sfljax import algorithms, distributed, execution

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
# Step loop and client strategy per algorithm: every path of the executor is
# used (python / scan loops; vmap and a sequential scan inside each device,
# 8 clients = 2 per device; client-major groups of one).
# SL (client-major, a relayed client model: groups of one client, nothing to
# average) gains nothing from sharding and its compile is the slowest; it runs
# with SFLJAX_TEST_ALL=1 (it passes with the same tolerance).
RUNS = ("sflv1:python:sequential", "sflv2:scan:vmap", "fl:scan:vmap") + (
    ("sl:scan:vmap",) if os.environ.get("SFLJAX_TEST_ALL") else ())
TIMEOUT = 300


def _env(devices_per_process: int) -> dict:
  env = dict(os.environ)
  # Optimization level 0 halves XLA:CPU compile time; both sides of every
  # comparison are compiled with the same flags.
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices_per_process} "
                      "--xla_backend_optimization_level=0")
  env["JAX_PLATFORMS"] = "cpu"
  return env


def _load(path) -> tuple[dict, dict]:
  with np.load(path) as f:
    arrays = {k: f[k] for k in f.files if k != "info"}
    return arrays, json.loads(str(f["info"]))


def _pairs(arrays: dict, run: str, other: dict | None = None, other_tag="reference"):
  """(name, sharded, other) for every array of ``run``."""
  other = arrays if other is None else other
  prefix = f"{run}/sharded"
  keys = [k for k in arrays if k.startswith(prefix)]
  assert keys
  return [(k, arrays[k], other[k.replace(prefix, f"{run}/{other_tag}")]) for k in keys]


@pytest.fixture(scope="module")
def four_devices(tmp_path_factory):
  """Every run of RUNS sharded over 4 devices and on one device, one process."""
  out = tmp_path_factory.mktemp("four") / "out.npz"
  proc = subprocess.run(
      [sys.executable, WORKER, "--runs", ",".join(RUNS), "--devices", "4", "--clients", "8",
       "--reference", "--out", str(out)],
      env=_env(4), capture_output=True, text=True, timeout=TIMEOUT)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return _load(out)


@pytest.mark.parametrize("run", RUNS)
def test_sharded_over_four_devices_equals_one_device(four_devices, run):
  """Same global model and per-client statistics; only the order of the
  cross-device sums differs (observed max |diff| ~4e-6 on loss sums ~20,
  ~2e-7 on parameters)."""
  arrays, info = four_devices
  assert info["global_devices"] == 4 and info["process_count"] == 1
  for name, sharded, single in _pairs(arrays, run):
    assert sharded.shape == single.shape, name
    np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("run", [r for r in RUNS if not r.startswith("sl:")])
def test_fedavg_compiles_to_a_cross_device_all_reduce(four_devices, run):
  """The weighted average over the sharded client axis is an all-reduce
  (SL relays its client model: nothing to average)."""
  _, info = four_devices
  assert info["all_reduce"][run] is True


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(command) -> None:
  """Runs ``command(i)`` + the coordinator flags as processes 0 and 1 (2 CPU
  devices each) on 127.0.0.1; asserts both exit 0."""
  address = f"127.0.0.1:{_free_port()}"
  procs = [subprocess.Popen(
      command(i) + ["--coordinator-address", address, "--num-processes", "2",
                    "--process-id", str(i)],
      env=_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  logs = []
  try:
    for p in procs:
      stdout, stderr = p.communicate(timeout=TIMEOUT)
      logs.append(stdout[-2000:] + stderr[-4000:])
  finally:
    for p in procs:  # One failed process leaves the other waiting on a collective.
      if p.poll() is None:
        p.kill()
        p.communicate()
  assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(logs)


def test_two_processes_equal_one_process(four_devices, tmp_path):
  """2 processes x 2 CPU devices (gloo collectives) = one process on one device."""
  run = RUNS[0]
  out = tmp_path / "multi.npz"
  _two_processes(lambda i: [sys.executable, WORKER, "--runs", run, "--devices", "4",
                            "--clients", "8", "--out", str(out)])
  multi, info = _load(out)
  assert info["process_count"] == 2 and info["global_devices"] == 4
  assert info["local_devices"] == 2 and info["all_reduce"][run] is True
  single, _ = four_devices
  for name, sharded, reference in _pairs(multi, run, single):
    np.testing.assert_allclose(sharded, reference, rtol=1e-5, atol=1e-5, err_msg=name)


# -- in-process: one CPU device ---------------------------------------------

def test_initialize_single_process_is_a_no_op():
  assert distributed.initialize() is False
  assert distributed.initialize(None, 1, 0) is False
  assert distributed.initialize(None, 1) is False


@pytest.mark.parametrize("kwargs,flag", [
    (dict(num_processes=2, process_id=0), "--coordinator-address"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2), "--process-id"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=2), "--process-id"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=2, process_id=-1), "--process-id"),
    (dict(coordinator_address="10.0.0.1", num_processes=2, process_id=0), "--coordinator-address"),
    (dict(coordinator_address="10.0.0.1:1234", num_processes=0, process_id=0), "--num-processes"),
    (dict(coordinator_address="10.0.0.1:1234"), "--num-processes"),
    (dict(process_id=1), "--process-id"),
    (dict(num_processes=1, process_id=3), "--process-id"),
])
def test_initialize_rejects_inconsistent_arguments(kwargs, flag):
  with pytest.raises(ValueError, match=flag):
    distributed.initialize(**kwargs)


def test_initialize_auto_detect_takes_no_explicit_arguments():
  with pytest.raises(ValueError, match="auto-detection"):
    distributed.initialize("10.0.0.1:1234", auto_detect=True)


def test_client_mesh_and_bad_device_counts():
  mesh = distributed.client_mesh()
  assert mesh.axis_names == ("clients",) and mesh.devices.size == len(jax.devices())
  for bad in (0, -1, len(jax.devices()) + 1):
    with pytest.raises(ValueError, match="--devices"):
      distributed.client_mesh(bad)


def test_clients_must_divide_over_devices():
  mesh = AbstractMesh((4,), ("clients",))
  distributed.check_clients(8, mesh)
  with pytest.raises(ValueError, match=r"--clients: 6 clients cannot be split evenly over 4 "
                                       r"devices: .*divisible by 4 or change --devices"):
    distributed.check_clients(6, mesh)
  executor = execution.ClientExecutor("vmap", mesh=mesh)
  with pytest.raises(ValueError, match="divisible by 4 or change --devices"):
    executor.map(lambda a: a, jnp.zeros((6, 2)))
  assert executor.map(lambda a: a + 1, jnp.zeros((1, 2))).shape == (1, 2)  # groups of one


def test_executor_mesh_needs_a_clients_axis():
  with pytest.raises(ValueError, match="'clients'"):
    execution.ClientExecutor("vmap", mesh=AbstractMesh((2,), ("data",)))


def test_executor_with_a_mesh_is_hashable_and_resolvable():
  mesh = distributed.client_mesh(1)
  ex = execution.resolve("auto", mesh=mesh)
  assert ex.mesh is mesh and ex.num_devices == 1
  assert hash(ex) == hash(execution.resolve("auto", mesh=mesh))
  assert ex == execution.resolve("auto", mesh=mesh) != execution.resolve("auto")
  x = jnp.arange(12.0).reshape(4, 3)
  for strategy in ("vmap", "sequential"):
    for e in (execution.resolve(strategy, mesh=mesh), execution.resolve(strategy)):
      np.testing.assert_array_equal(e.map(lambda a: a * 2, x), x * 2)
      np.testing.assert_array_equal(e.vmap(lambda a: a.sum(), x), x.sum(1))


def test_place_and_fetch_round_trip():
  mesh = distributed.client_mesh(1)
  tree = {"x": np.arange(8.0).reshape(4, 2), "k": jax.random.key(3)}
  sharded = distributed.shard_clients({"x": tree["x"]}, mesh)
  assert sharded["x"].sharding == NamedSharding(mesh, PartitionSpec("clients"))
  rep = distributed.replicate(tree, mesh)
  assert rep["k"].sharding == NamedSharding(mesh, PartitionSpec())
  back = distributed.fetch(rep)
  np.testing.assert_array_equal(back["x"], tree["x"])
  np.testing.assert_array_equal(back["k"], jax.random.key_data(tree["k"]))
  with pytest.raises(ValueError, match="scalar"):
    distributed.shard_clients(np.float32(1.0), mesh)


@pytest.mark.parametrize("name,per_client", [
    ("sflv1", {"client_opt", "server_opt"}),
    ("sflv2", {"client_opt"}),
    ("sl", {"client_opt"}),
])
def test_shardings_follow_the_client_axis(name, per_client):
  """Per-client leaves sharded, global models and shared server replicated."""
  mesh = distributed.client_mesh(1)
  cd, model = w.problem(4, "none")
  alg = algorithms.build(name, model, cut=model.default_cut, optimizer=optax.adam(1e-3),
                         executor=execution.resolve("vmap", mesh=mesh))
  variables = jax.eval_shape(model.init, jax.random.key(0))
  sh = distributed.Shardings.of(alg, variables, w.round_inputs(cd, 0), mesh)
  clients, rep = NamedSharding(mesh, PartitionSpec("clients")), NamedSharding(mesh, PartitionSpec())

  def kinds(tree):  # The typed state's data fields (sfljax.state).
    fields = ("client", "server", "client_opt", "server_opt", "stats")
    return {k: {s.spec for s in jax.tree.leaves(getattr(tree, k))} for k in fields
            if hasattr(tree, k)}
  assert kinds(sh.state) == {k: {clients.spec if k in per_client else rep.spec}
                             for k in ("client", "server", "client_opt", "server_opt")}
  carry_clients = set(per_client) | {"stats"} | ({"client"} if name != "sl" else set())
  carry_clients |= {"server"} if name == "sflv1" else set()
  assert kinds(sh.carry) == {k: {clients.spec if k in carry_clients else rep.spec}
                             for k in ("client", "server", "client_opt", "server_opt", "stats")}
  assert {s.spec for s in jax.tree.leaves(sh.stats)} == {clients.spec}
  assert sh.inputs.x == clients and sh.inputs.step_orders == rep and sh.inputs.key == rep


# -- the CLI: sfljax train --num-processes / --devices ------------------------

def _cli_metrics(out):
  with open(out / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def test_cli_two_processes_and_four_devices_equal_one_device(tmp_path):
  """`sfljax train` as 2 processes x 2 CPU devices, and as one process with
  --devices 4, logs the losses and accuracies of the plain one-device run."""
  flags = ["train", "--quiet", "--clients", "4", "--rounds", "2", "--batch-size", "16"]
  cli = [sys.executable, "-m", "sfljax"]
  single = subprocess.run(cli + flags + ["--out", str(tmp_path / "one")], env=_env(1),
                          capture_output=True, text=True, timeout=TIMEOUT)
  assert single.returncode == 0, single.stderr[-3000:]
  four = subprocess.run(cli + flags + ["--devices", "4", "--out", str(tmp_path / "four")],
                        env=_env(4), capture_output=True, text=True, timeout=TIMEOUT)
  assert four.returncode == 0, four.stderr[-3000:]
  _two_processes(lambda i: cli + flags + ["--out", str(tmp_path / f"multi{i}")])
  assert not (tmp_path / "multi1").exists()          # Only process 0 writes.
  reference = _cli_metrics(tmp_path / "one")
  for run in ("four", "multi0"):
    got = _cli_metrics(tmp_path / run)
    assert len(got) == len(reference) == 2
    for g, r in zip(got, reference):
      for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy"):
        assert g[key] == pytest.approx(r[key], rel=1e-5, abs=1e-6), (run, key)


def test_cli_device_errors_are_one_line(tmp_path):
  for flags, needle in ((["--clients", "3", "--devices", "2"], "--devices"),
                        (["--num-processes", "2"], "--coordinator-address"),
                        (["--process-id", "1"], "--process-id")):
    proc = subprocess.run([sys.executable, "-m", "sfljax", "train", "--quiet",
                           "--out", str(tmp_path / "x")] + flags,
                          env=_env(2), capture_output=True, text=True, timeout=TIMEOUT)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "\n" not in err and needle in err, (flags, err)
