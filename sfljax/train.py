"""Configs as data and the experiment driver (importable; the CLI is thin).

>>> cfg = Config(algorithm="sflv2", rounds=3)
>>> history = run(cfg)                      # list of per-round metric dicts
>>> exp = Experiment(cfg)                   # or step rounds yourself
>>> state = exp.init()
>>> for _ in range(cfg.rounds):
...   state, metrics = exp.step(state)
"""

from __future__ import annotations

import dataclasses
import platform
import re
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfljax import algorithms, comm, data, distributed, execution, models, split


class ConfigError(ValueError):
  """A bad setting; ``flag`` names the CLI flag it came from."""

  def __init__(self, flag: str, message: str):
    super().__init__(f"{flag}: {message}")
    self.flag = flag


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything that determines a run. Same config + same machine -> same numbers."""
  algorithm: str = "sflv1"
  model: str = "lenet"
  cut: int | None = None            # client-side blocks; None = the paper's cut
  norm: str | None = None           # batch | group | none; None = model default
  dataset: str = "digits"
  data_dir: str | None = None
  clients: int = 5
  rounds: int = 20
  local_epochs: int = 1
  batch_size: int = 32
  optimizer: str = "adam"
  lr: float = 1e-3
  optimizer_state: str = "persistent"   # persistent | reference
  sflv2_order: str = "paper"            # paper | client
  partition: str = "iid"
  alpha: float = 0.5                    # dirichlet concentration
  shards_per_client: int = 2
  classes_per_client: int = 2
  min_client_size: int = 1
  seed: int = 0
  augment: bool = True                  # the dataset's train augmentation, if it has one
  strategy: str = "auto"
  step_loop: str = "auto"
  eval_batch_size: int = 512
  client_fraction: float = 1.0          # participants per round: max(1, round(fraction * clients))
  client_block: int | None = None       # clients computed at once inside the program (memory bound)
  precision: str = "fp32"               # fp32 | bf16 (bf16 compute, float32 master weights)
  devices: int | None = None            # split the clients over this many devices (a mesh)

  def validate(self) -> "Config":
    """Raises :class:`ConfigError` for a setting that cannot run."""
    def choice(flag, value, allowed):
      if value not in allowed:
        raise ConfigError(flag, f"unknown value {value!r}: choose one of {', '.join(allowed)}")
    choice("--algorithm", self.algorithm, algorithms.ALGORITHMS)
    choice("--model", self.model, models.MODELS)
    choice("--dataset", self.dataset, data.DATASETS)
    choice("--optimizer", self.optimizer, split.OPTIMIZERS)
    choice("--strategy", self.strategy, execution.STRATEGIES)
    choice("--step-loop", self.step_loop, execution.STEP_LOOPS)
    choice("--partition", self.partition, data.PARTITIONS)
    choice("--optimizer-state", self.optimizer_state, tuple(algorithms.OPTIMIZER_POLICIES))
    choice("--sflv2-order", self.sflv2_order, ("paper", "client"))
    choice("--precision", self.precision, tuple(split.PRECISIONS))
    if self.norm is not None:
      choice("--norm", self.norm, ("batch", "group", "none"))
    for flag, value in (("--clients", self.clients), ("--rounds", self.rounds),
                        ("--local-epochs", self.local_epochs),
                        ("--batch-size", self.batch_size),
                        ("--eval-batch-size", self.eval_batch_size)):
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ConfigError(flag, f"must be a positive integer, got {value!r}")
    if not (self.lr > 0 and np.isfinite(self.lr)):
      raise ConfigError("--lr", f"must be a positive number, got {self.lr!r}")
    if self.cut is not None and (not isinstance(self.cut, (int, np.integer)) or self.cut <= 0):
      raise ConfigError("--cut", f"must be a positive integer, got {self.cut!r}")
    if self.client_block is not None and (
        not isinstance(self.client_block, (int, np.integer)) or self.client_block <= 0):
      raise ConfigError("--client-block", f"must be a positive integer, got {self.client_block!r}")
    if not (isinstance(self.client_fraction, (int, float)) and 0 < self.client_fraction <= 1):
      raise ConfigError("--client-fraction",
                        f"must be in (0, 1], got {self.client_fraction!r}")
    if self.devices is not None and (
        not isinstance(self.devices, (int, np.integer)) or self.devices <= 0):
      raise ConfigError("--devices", f"must be a positive integer, got {self.devices!r}")
    if self.client_fraction < 1 and self.algorithm == "centralized":
      raise ConfigError("--client-fraction", "centralized training has one client: use 1")
    return self

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def client_partition(self, labels: np.ndarray) -> list[np.ndarray]:
    """The config's partition of ``labels``; a setting that cannot be met
    raises :class:`ConfigError` naming the flag to change."""
    try:
      return data.partition(labels, self.clients, self.partition, seed=self.seed,
                            alpha=self.alpha, shards_per_client=self.shards_per_client,
                            classes_per_client=self.classes_per_client,
                            min_client_size=self.min_client_size)
    except ValueError as e:  # The message ends with the flag to change, e.g. "(--alpha)".
      msg = str(e)
      found = re.search(r"\((--[a-z-]+)\)$", msg)
      flag = found.group(1) if found else "--partition"
      raise ConfigError(flag, msg[:found.start()].rstrip() if found else msg) from None


class RunState(NamedTuple):
  """The algorithm's pytree state and the number of finished rounds."""
  algo: Any
  round: int


def environment() -> dict[str, Any]:
  """Package versions, backend and devices, for the record."""
  import flax
  import optax
  return {"python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
          "flax": flax.__version__, "optax": optax.__version__,
          "numpy": np.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()],
          "machine": platform.machine(), "processor": platform.processor()}


class Experiment:
  """A configured run: data on the device, a compiled round, evaluation."""

  def __init__(self, config: Config, dataset: data.Dataset | None = None,
               parts: list[np.ndarray] | None = None):
    """``dataset`` and ``parts`` (one index array per client) override the
    config's dataset and partition, e.g. for a custom split."""
    self.config = config = config.validate()
    if dataset is None:
      try:
        dataset = data.load_dataset(config.dataset, seed=config.seed, data_dir=config.data_dir)
      except ValueError as e:
        raise ConfigError("--data-dir", str(e)) from None
    self.dataset = dataset
    ds = self.dataset
    if parts is None:
      parts = config.client_partition(ds.y_train)
    elif len(parts) != config.clients:
      raise ConfigError("--clients", f"{len(parts)} parts given for {config.clients} clients")
    maker = data.ClientData.pooled if config.algorithm == "centralized" else data.ClientData.from_partition
    self.client_data = maker(ds.x_train, ds.y_train, parts)

    try:
      self.model = models.get_model(config.model, input_shape=ds.input_shape,
                                    num_classes=ds.num_classes, norm=config.norm)
    except ValueError as e:
      raise ConfigError("--norm" if "norm" in str(e) else "--model", str(e)) from None
    try:
      cut = config.cut if config.cut is not None else self.model.default_cut
      (self.cut,) = self.model.check_cut(cut)
    except ValueError as e:
      raise ConfigError("--cut", str(e)) from None
    self.mesh = self._mesh()
    self.executor = execution.resolve(config.strategy, step_loop=config.step_loop,
                                      block=config.client_block, mesh=self.mesh)
    self.compute_dtype = split.PRECISIONS[config.precision]
    self.algorithm = algorithms.build(
        config.algorithm, self.model, cut=self.cut,
        optimizer=split.make_optimizer(config.optimizer, config.lr),
        executor=self.executor,
        policy=algorithms.OPTIMIZER_POLICIES[config.optimizer_state],
        sflv2_order=config.sflv2_order,
        augment=data.augmentation(config.dataset) if config.augment else None,
        compute_dtype=self.compute_dtype)

    cd = self.client_data
    self._x, self._y = self._place_clients(cd.x), self._place_clients(cd.y)
    self._weights = self._place_clients(cd.counts.astype(np.float32))
    self.trace_count = 0  # Tracings of the round's programs (tests: no recompilation).

    self.num_participants = data.num_participants(cd.num_clients, config.client_fraction)
    self._steps = data.steps_per_epoch(cd.counts, config.batch_size)
    alg = self.algorithm
    sh = self._shardings = None
    if self.mesh is not None:  # Pinned layouts: round r + 1 takes round r's outputs as they are.
      sh = self._shardings = distributed.Shardings.of(
          alg, jax.eval_shape(self.model.init, jax.random.key(0)), self.round_inputs(0),
          self.mesh)

    def counted(fn, out=None, donate=()):
      def traced(*args):
        self.trace_count += 1
        return fn(*args)
      return jax.jit(traced, donate_argnums=donate,
                     out_shardings=None if sh is None else out(sh))

    if self.executor.step_loop == "scan":
      self._programs = {"round": counted(alg.round, lambda s: (s.state, s.stats))}
    else:  # The round's working state (carry) is internal: its buffers are donated.
      self._programs = {"begin": counted(alg.begin, lambda s: s.carry),
                        "step": counted(alg.step, lambda s: s.carry, donate=(0,)),
                        "end": counted(alg.end, lambda s: (s.state, s.stats))}
    self._eval = jax.jit(self._evaluate_arrays)
    self._prepare_test_set()
    self._traffic_sizes = self._sizes()
    self.traffic = self.traffic_for(cd.counts)
    self.compile_seconds: float | None = None

  # -- pieces ----------------------------------------------------------------
  def _mesh(self):
    """The device mesh the clients are split over, or None (one device)."""
    cfg = self.config
    if cfg.devices is None and jax.process_count() == 1:
      return None
    if cfg.client_fraction < 1:
      raise ConfigError("--client-fraction", "partial participation runs on one device for "
                                             "now: use 1, or drop --devices")
    try:
      mesh = distributed.client_mesh(cfg.devices)
      distributed.check_clients(self.client_data.num_clients, mesh)
    except ValueError as e:
      flag, _, msg = str(e).partition(": ")
      raise ConfigError(flag if flag.startswith("--") else "--devices", msg or str(e)) from None
    return mesh

  def _place_clients(self, tree):
    """On the device, or with the leading (client) axis split over the mesh."""
    if self.mesh is None:
      return jax.tree.map(jnp.asarray, tree)
    return distributed.shard_clients(tree, self.mesh)

  def _place(self, tree):
    """On the device, or whole on every device of the mesh."""
    return jax.tree.map(jnp.asarray, tree) if self.mesh is None else distributed.replicate(
        tree, self.mesh)

  def _prepare_test_set(self):
    ds, eb = self.dataset, self.config.eval_batch_size
    n = len(ds.y_test)
    eb = min(eb, n)
    m = -(-n // eb)
    pad = m * eb - n
    x = np.concatenate([ds.x_test, np.zeros((pad,) + ds.x_test.shape[1:], ds.x_test.dtype)])
    y = np.concatenate([ds.y_test, np.zeros((pad,), ds.y_test.dtype)])
    self._test = self._place((x.reshape((m, eb) + x.shape[1:]), y.reshape(m, eb)))
    self._n_test = n
    test_parts = data.partition(ds.y_test, min(self.config.clients, n), "iid",
                                seed=self.config.seed + 1)
    self._test_shards = test_parts

  def _evaluate_arrays(self, variables, x, y):
    module = self.model.full()

    def one(batch):
      xb, yb = batch
      logits, _ = models.apply_part(module, variables, xb, train=False)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      return loss, jnp.argmax(logits, -1) == yb

    loss, correct = jax.lax.map(one, (x, y))
    return loss.reshape(-1), correct.reshape(-1)

  def _sizes(self) -> dict[str, int]:
    """Bytes of the things that travel: whole model, client model, one smashed row, one label."""
    shapes = jax.eval_shape(self.model.init, jax.random.key(0))
    client_vars, _ = self.model.split_variables(shapes, (self.cut,))
    client_mod, _ = self.model.parts((self.cut,))
    x1 = jax.ShapeDtypeStruct((1,) + self.dataset.input_shape, jnp.float32)
    smashed = jax.eval_shape(
        lambda v, x: split.apply_with_state(client_mod, v, x, None, self.compute_dtype)[0],
        client_vars, x1)
    return {"model": comm.tree_bytes(shapes), "client_model": comm.tree_bytes(client_vars),
            "smashed": comm.tree_bytes(smashed),
            "label": np.dtype(self.client_data.y.dtype).itemsize}

  def traffic_for(self, counts) -> comm.Traffic:
    """Bytes moved in a round in which clients holding ``counts`` samples take part."""
    cfg, size = self.config, self._traffic_sizes
    if cfg.algorithm == "centralized":
      return comm.Traffic()
    if cfg.algorithm == "fl":
      return comm.fl_traffic(len(counts), size["model"])
    return comm.split_traffic(counts, cfg.local_epochs, size["smashed"], size["label"],
                              size["client_model"])

  def participants(self, round_index: int) -> np.ndarray | None:
    """The client ids taking part in a round (None: all of them)."""
    return data.sample_clients(self.client_data.num_clients, self.config.client_fraction,
                               seed=self.config.seed, round_index=round_index)

  def round_inputs(self, round_index: int) -> algorithms.RoundInputs:
    """The round's batches and client orders, drawn from (seed, round)."""
    cfg, cd = self.config, self.client_data
    ids = self.participants(round_index)
    counts = cd.counts if ids is None else cd.counts[ids]
    # Steps come from all clients' counts, so every round has the same shapes.
    idx, mask = data.batch_schedule(counts, cfg.batch_size, seed=cfg.seed,
                                    round_index=round_index, local_epochs=cfg.local_epochs,
                                    client_ids=ids, steps=self._steps)
    k, t = len(counts), idx.shape[1]
    rng = data.rng_for(cfg.seed, data._ORDER_STREAM, round_index)
    client_order = rng.permutation(k).astype(np.int32)
    step_orders = np.stack([rng.permutation(k) for _ in range(t)]).astype(np.int32)
    key = jax.random.fold_in(jax.random.key(cfg.seed + 1), round_index)
    if ids is not None:
      return algorithms.RoundInputs(self._x, self._y, jnp.asarray(idx), jnp.asarray(mask),
                                    jnp.asarray(counts, jnp.float32), jnp.asarray(step_orders),
                                    jnp.asarray(client_order), key, jnp.asarray(ids))
    per_client = self._place_clients((idx, mask))
    orders = self._place((step_orders, client_order, key))
    return algorithms.RoundInputs(self._x, self._y, *per_client, self._weights, *orders)

  # -- public API ------------------------------------------------------------
  def init(self) -> RunState:
    """Initial state: one full-model init from the seed, split into halves."""
    variables = jax.jit(self.model.init)(jax.random.key(self.config.seed))
    if self.mesh is None:
      algo_init = jax.jit(self.algorithm.init, static_argnums=1)
    else:
      variables = distributed.replicate(distributed.fetch(variables), self.mesh)
      algo_init = jax.jit(self.algorithm.init, static_argnums=1,
                          out_shardings=self._shardings.state)
    return RunState(algo_init(variables, self.client_data.num_clients), 0)

  def _run_round(self, algo, inputs):
    p = self._programs
    if "round" in p:
      return p["round"](algo, inputs)
    carry = p["begin"](algo, inputs)
    for t in range(self.algorithm.num_steps(inputs)):
      carry = p["step"](carry, inputs, np.int32(t))
    return p["end"](carry, inputs)

  def compile(self, state: RunState) -> float:
    """Compiles the round's programs; returns (and records) the seconds taken."""
    t0 = time.perf_counter()
    inputs = self.round_inputs(state.round)
    p = self._programs
    if "round" in p:
      p["round"].lower(state.algo, inputs).compile()
    else:
      carry = jax.eval_shape(p["begin"], state.algo, inputs)
      p["begin"].lower(state.algo, inputs).compile()
      p["step"].lower(carry, inputs, np.int32(0)).compile()
      p["end"].lower(carry, inputs).compile()
    self._eval.lower(self.algorithm.global_variables(state.algo), *self._test).compile()
    self.compile_seconds = time.perf_counter() - t0
    return self.compile_seconds

  def train_round(self, state: RunState) -> tuple[RunState, dict[str, float]]:
    """One global epoch without evaluation."""
    algo, stats = self._run_round(state.algo, self.round_inputs(state.round))
    stats = distributed.fetch(stats)   # Once per round (all processes take part).
    count = max(float(np.sum(stats.count)), 1.0)
    return RunState(algo, state.round + 1), {
        "train_loss": float(np.sum(stats.loss_sum)) / count,
        "train_accuracy": float(np.sum(stats.correct)) / count}

  def evaluate(self, state: RunState) -> dict[str, float]:
    """The round's global model on the full test set and on the clients' test shards."""
    loss, correct = distributed.fetch(self._eval(self.global_variables(state), *self._test))
    loss, correct = loss[:self._n_test], correct[:self._n_test]
    return {"test_loss": float(np.mean(loss)),
            "test_accuracy": float(np.mean(correct)),
            "client_test_accuracy": float(np.mean([np.mean(correct[s]) for s in self._test_shards]))}

  def global_variables(self, state: RunState):
    return self.algorithm.global_variables(state.algo)

  def step(self, state: RunState) -> tuple[RunState, dict[str, Any]]:
    """One round: train, evaluate, and the round's metrics."""
    t0 = time.perf_counter()
    state, metrics = self.train_round(state)
    metrics.update(self.evaluate(state))
    metrics["seconds"] = time.perf_counter() - t0
    ids = self.participants(state.round - 1)
    counts = self.client_data.counts if ids is None else self.client_data.counts[ids]
    metrics["participants"] = len(counts)
    metrics.update(self.traffic_for(counts).as_dict())
    return state, {"round": state.round, **metrics}

  def run(self, rounds: int | None = None,
          callback: Callable[[dict[str, Any]], None] | None = None) -> list[dict[str, Any]]:
    """Runs ``rounds`` (default: the config's) from a fresh state; returns the history."""
    state = self.init()
    self.compile(state)
    history = []
    for _ in range(self.config.rounds if rounds is None else rounds):
      state, metrics = self.step(state)
      history.append(metrics)
      if callback is not None:
        callback(metrics)
    self.final_state = state  # The last round's state, for inspection after run().
    return history


def run(config: Config, **kwargs) -> list[dict[str, Any]]:
  """Runs a config end to end; returns one metrics dict per round."""
  return Experiment(config).run(**kwargs)
