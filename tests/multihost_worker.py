"""A small SplitFed driver for the distributed tests (run as a script).

Trains tiny LeNet problems on the embedded digits, once on one device
(no mesh) and/or with the clients sharded over a ``"clients"`` mesh, and
writes the final global parameters, the per-round statistics and whether the
compiled programs hold a cross-device all-reduce to an ``.npz``.

  python tests/multihost_worker.py --runs sflv1:python:sequential --devices 4 \\
      --reference --out out.npz [--coordinator-address 127.0.0.1:PORT \\
      --num-processes 2 --process-id 0]

Not a test module (pytest collects ``*_test.py``); tests/distributed_test.py
launches it in subprocesses with fake CPU devices.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

from sfljax import algorithms, data, distributed, execution, models  # noqa: E402

COUNTS = (16, 12, 16, 10, 16, 14, 8, 16)  # Unequal clients: padding and masked steps.


def problem(num_clients: int, norm: str = "batch"):
  """Client data (unequal shards of the digits) and the model."""
  ds = data.load_digits(0)
  counts = COUNTS[:num_clients]
  starts = np.cumsum((0,) + counts)
  parts = [np.arange(a, b) for a, b in zip(starts[:-1], starts[1:])]
  cd = data.ClientData.from_partition(ds.x_train, ds.y_train, parts)
  model = models.get_model("lenet", input_shape=ds.input_shape, num_classes=ds.num_classes,
                           norm=norm)
  return cd, model


_VARIABLES: dict = {}


def initial_variables(model, seed: int):
  """The model's initial variables as NumPy (compiled once per process)."""
  if (model, seed) not in _VARIABLES:
    _VARIABLES[model, seed] = distributed.fetch(jax.jit(model.init)(jax.random.key(seed)))
  return _VARIABLES[model, seed]


def round_inputs(cd: data.ClientData, round_index: int, *, batch_size: int = 8,
                 seed: int = 0) -> algorithms.RoundInputs:
  """As ``Experiment.round_inputs``, on the host (NumPy; the key as raw data)."""
  idx, mask = data.batch_schedule(cd.counts, batch_size, seed=seed, round_index=round_index)
  k, t = cd.num_clients, idx.shape[1]
  rng = data.rng_for(seed, 3, round_index)
  client_order = rng.permutation(k).astype(np.int32)
  step_orders = np.stack([rng.permutation(k) for _ in range(t)]).astype(np.int32)
  key = jax.random.fold_in(jax.random.key(seed + 1), round_index)
  return algorithms.RoundInputs(cd.x, cd.y, idx, mask, cd.counts.astype(np.float32),
                                step_orders, client_order, key)


def _has_all_reduce(compiled) -> bool:
  return "all-reduce" in compiled.as_text()


def train(name: str, *, num_clients: int, rounds: int, mesh=None, strategy="sequential",
          step_loop="python", norm: str = "batch", seed: int = 0):
  """Returns (global variables as NumPy, stats [rounds, 3, K], all-reduce found)."""
  cd, model = problem(num_clients, norm)
  executor = execution.resolve(strategy, step_loop=step_loop, mesh=mesh)
  alg = algorithms.build(name, model, cut=model.default_cut,
                         optimizer=optax.adam(1e-3), executor=executor)
  variables = initial_variables(model, seed)
  if mesh is None:
    sh = None
    init = jax.jit(alg.init, static_argnums=1)
    programs = {"round": jax.jit(alg.round), "begin": jax.jit(alg.begin),
                "step": jax.jit(alg.step), "end": jax.jit(alg.end)}
    place_inputs = lambda inp: inp  # noqa: E731
  else:
    sh = distributed.Shardings.of(alg, variables, round_inputs(cd, 0), mesh)
    variables = distributed.replicate(variables, mesh)
    init = jax.jit(alg.init, static_argnums=1, out_shardings=sh.state)
    programs = {"round": jax.jit(alg.round, out_shardings=(sh.state, sh.stats)),
                "begin": jax.jit(alg.begin, out_shardings=sh.carry),
                "step": jax.jit(alg.step, out_shardings=sh.carry),
                "end": jax.jit(alg.end, out_shardings=(sh.state, sh.stats))}
    place_inputs = lambda inp: distributed.place(inp, sh.inputs)  # noqa: E731
  state = init(variables, num_clients)
  compiled: dict = {}

  def call(name, *args):  # Compile once (ahead of time, to read the HLO), then reuse.
    if name not in compiled:
      compiled[name] = programs[name].lower(*args).compile()
    return compiled[name](*args)

  all_stats = []
  for r in range(rounds):
    inp = place_inputs(round_inputs(cd, r))
    if step_loop == "scan":
      state, stats = call("round", state, inp)
    else:
      carry = call("begin", state, inp)
      for t in range(alg.num_steps(inp)):
        carry = call("step", carry, inp, np.int32(t))
      state, stats = call("end", carry, inp)
    all_stats.append(np.stack(distributed.fetch(tuple(stats))))
  all_reduce = _has_all_reduce(compiled["round" if step_loop == "scan" else "end"])
  return distributed.fetch(alg.global_variables(state)), np.stack(all_stats), all_reduce


def _flat(prefix: str, tree) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {prefix + jax.tree_util.keystr(path): np.asarray(v) for path, v in leaves}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--runs", required=True,
                  help="comma-separated algorithm:step_loop:strategy, e.g. sflv1:python:sequential")
  ap.add_argument("--clients", type=int, default=8)
  ap.add_argument("--rounds", type=int, default=2)
  ap.add_argument("--devices", type=int, default=None)
  ap.add_argument("--norm", default="batch")
  ap.add_argument("--reference", action="store_true", help="also run each on one device")
  ap.add_argument("--out", required=True)
  ap.add_argument("--coordinator-address")
  ap.add_argument("--num-processes", type=int)
  ap.add_argument("--process-id", type=int)
  args = ap.parse_args(argv)
  distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  mesh = distributed.client_mesh(args.devices)
  out, info = {}, {"process_count": jax.process_count(), "global_devices": len(jax.devices()),
                   "local_devices": len(jax.local_devices()), "seconds": {}, "all_reduce": {}}
  for run in args.runs.split(","):
    name, step_loop, strategy = run.split(":")
    t0 = time.perf_counter()
    params, stats, all_reduce = train(name, num_clients=args.clients, rounds=args.rounds,
                                      mesh=mesh, strategy=strategy, step_loop=step_loop, norm=args.norm)
    info["seconds"][run] = time.perf_counter() - t0
    info["all_reduce"][run] = all_reduce
    out.update(_flat(f"{run}/sharded", params))
    out[f"{run}/sharded/stats"] = stats
    if args.reference:
      t0 = time.perf_counter()
      params, stats, _ = train(name, num_clients=args.clients, rounds=args.rounds,
                               strategy=strategy, step_loop=step_loop, norm=args.norm)
      info["seconds"][run + "/reference"] = time.perf_counter() - t0
      out.update(_flat(f"{run}/reference", params))
      out[f"{run}/reference/stats"] = stats
  if distributed.is_main_process():
    np.savez(args.out, info=np.array(json.dumps(info)), **out)
  print(json.dumps(info), flush=True)


if __name__ == "__main__":
  main()
