"""The experiment driver (importable; the CLI is thin).

>>> cfg = Config(algorithm="sflv2", rounds=3)
>>> history = run(cfg)                      # list of per-round metric dicts
>>> exp = Experiment(cfg)                   # or step rounds yourself
>>> state = exp.init()
>>> for _ in range(cfg.rounds):
...   state, metrics = exp.step(state)

Objects instead of names: ``Experiment(cfg, model=SplitModel.from_modules(...),
client_optimizer=optax.adam(1e-3), server_optimizer=optax.adamw(schedule),
loss=my_loss, algorithm=composition_or_algorithm, dataset=..., parts=...)``;
whatever is not given is built from the config's names
(:meth:`Experiment.from_config`).

Metrics of a round (:data:`METRICS` documents every key).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import platform
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfljax import (algorithms, conv_autotune, data, distributed, execution, faults, hostmem,
                    models, optimizers, sides, split)
from sfljax.config import Config, ConfigError

METRICS: dict[str, str] = {
    "round": "rounds finished (1 after the first)",
    "train_loss": "mean training loss over every real sample the participants trained on "
                  "this round (each sample weighted equally)",
    "train_accuracy": "training accuracy over the same samples, taken during training",
    "client_train_loss": "list over all K clients: each client's mean training loss this "
                         "round (null for clients that did not take part)",
    "client_train_accuracy": "list over all K clients: each client's training accuracy "
                             "this round (null for clients that did not take part)",
    "test_loss": "mean test loss of the global model on the whole test set",
    "test_accuracy": "accuracy of the global model on the whole test set; when every client "
                     "keeps its own client part (sflv3) the global model is their n_k-weighted "
                     "average with the server part",
    "client_test_accuracy": "mean over clients of the accuracy on the client's own test shard "
                            "(the test set split iid into K shards): of the global model, or, "
                            "when clients keep their own client part, of the client's own "
                            "model (its client part with the server part)",
    "seconds": "wall-clock seconds of the round's training and evaluation (compilation "
               "excluded: see compile_seconds in summary.json)",
    "train_seconds": "the part of seconds spent training (the round's programs and the "
                     "metrics pull)",
    "eval_seconds": "the part of seconds spent evaluating the global model",
    "participants": "clients that took part in the round",
    "reported": "participants whose client-side result reached the fed server (the others "
                "failed, --dropout-rate, or had a non-finite step, --on-nonfinite skip); 0: "
                "nobody reported and the global model is the previous round's",
    "failed_clients": "ids of the participants that failed this round (--dropout-rate)",
    "nonfinite_clients": "ids of the participants whose update was dropped for a NaN/Inf "
                         "(--on-nonfinite skip)",
    "bytes_client_to_server": "bytes sent by all clients in the round (sum of the kinds below "
                              "that travel upwards)",
    "bytes_server_to_client": "bytes received by all clients in the round",
    "bytes_smashed": "smashed data (client head output), client to server",
    "bytes_smashed_grad": "its cotangent, server to client",
    "bytes_labels": "labels, client to server (0 in a U-shaped split)",
    "bytes_model_up": "client-side models (FL: whole models) uploaded to the fed server",
    "bytes_model_down": "the same, downloaded at the round's start",
    "bytes_server_out": "U-shaped: the server body's output, server to client",
    "bytes_server_out_grad": "U-shaped: its cotangent, client to server",
    "epsilon": "client-side DP-SGD (--dp-clip): the largest epsilon over clients at "
               "--dp-delta after this round (each client's own Poisson rate and steps so far; "
               "the accountant is --dp-accountant)",
    "client_epsilon": "DP-SGD: list over all K clients, each client's epsilon so far",
    "dp_overflow_steps": "DP-SGD: steps dropped this round because a Poisson draw exceeded "
                         "the batch buffer (counted in epsilon and delta; expected 0)",
    "leak_dcor": "--leakage: distance correlation between the probe's test inputs and their "
                 "smashed data (0: independent, 1: the inputs' geometry kept exactly; lower "
                 "leaks less)",
    "leak_label_auc": "--leakage: the label attack's AUC by direction scoring (cosine with one "
                      "known example's gradient, mean over class pairs) on the per-example "
                      "gradients the server sees: two-part, the smashed-data cotangent it "
                      "computes; U-shaped, the cotangent the client's tail sends it (0.5: "
                      "chance, 1: labels fully recovered)",
    "leak_label_auc_norm": "--leakage: the same attack by norm scoring (gradient norms, per "
                           "class pair, the better orientation: chance is slightly above 0.5)",
    "leak_inversion_mse": "--leakage, rounds with inversion: mean squared error between the "
                          "probe's inputs (standardised) and the server decoder's "
                          "reconstructions from their smashed data (lower leaks more)",
    "leak_inversion_psnr": "the same, as PSNR in dB over the inputs' range (higher leaks more)",
    "leak_inversion_ssim": "the same, as SSIM (skimage's definition; 1: perfect "
                           "reconstruction, higher leaks more)",
    "leakage_seconds": "--leakage: seconds the round's measures took, their compilation "
                       "included the first time (not part of seconds)",
}
"""Every key of a round's metrics, and how to read it."""

DP_METRICS: tuple[str, ...] = ("epsilon", "client_epsilon", "dp_overflow_steps")
"""The keys of :data:`METRICS` that only a run with client-side DP-SGD has."""

LEAKAGE_METRICS: tuple[str, ...] = (
    "leak_dcor", "leak_label_auc", "leak_label_auc_norm", "leak_inversion_mse",
    "leak_inversion_psnr", "leak_inversion_ssim", "leakage_seconds")
"""The keys of :data:`METRICS` that only a run with ``--leakage`` has (the
inversion's on the rounds it runs)."""


class NonFiniteError(RuntimeError):
  """A NaN/Inf in a round's losses or in the state after it (``--on-nonfinite stop``).

  ``round``: the round (1-based) that produced it; ``clients``: the clients
  whose training loss was non-finite (empty when unknown); ``str(e)`` is one
  line saying what and where. The state before that round is the last good one.
  """

  def __init__(self, round_index: int, what: str, clients=()):
    self.round, self.what, self.clients = round_index, what, tuple(int(c) for c in clients)
    where = f" (clients {', '.join(map(str, self.clients))})" if self.clients else ""
    super().__init__(f"round {round_index}: non-finite {what}{where}")


class RunState(NamedTuple):
  """The algorithm's pytree state, the number of finished rounds and, with
  client-side DP-SGD, the privacy ledger (host side, saved with checkpoints)."""
  algo: Any
  round: int
  privacy: Any = None   # sfljax.privacy.accounting.Ledger


def environment() -> dict[str, Any]:
  """Package versions, backend and devices, for the record."""
  import flax
  return {"python": platform.python_version(), "jax": jax.__version__,
          "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
          "flax": flax.__version__, "optax": optax.__version__,
          "numpy": np.__version__, "backend": jax.default_backend(),
          "devices": [str(d) for d in jax.devices()],
          "machine": platform.machine(), "processor": platform.processor()}


def make_loss(config: Config) -> split.Loss:
  """The config's loss function of (logits, labels, mask)."""
  if config.label_smoothing:
    return split.label_smoothing_cross_entropy(config.label_smoothing)
  return split.cross_entropy


class Experiment:
  """A run: data on the device, the algorithm's compiled round, evaluation.

  Args:
    config: the run's settings (:class:`sfljax.config.Config`); the names in
      it build whatever is not given as an object below.
    dataset: a :class:`sfljax.data.Dataset` instead of ``config.dataset``.
    parts: one index array per client into ``dataset.x_train`` instead of
      the config's partition.
    model: a :class:`sfljax.models.SplitModel` (e.g.
      ``SplitModel.from_modules``) instead of ``config.model``.
    algorithm: a name, a :class:`sfljax.sides.Composition` (built with the
      model, cut, optimizers and loss here), or a ready
      :class:`sfljax.algorithms.Algorithm` object (used as it is).
    client_optimizer, server_optimizer: ``optax.GradientTransformation``s
      instead of the config's optimizer names (FL and centralized use the
      client optimizer).
    loss: ``loss(logits, labels, mask) -> scalar`` instead of the config's.
    strata: with ``client_fraction < 1``, draw each round's participants
      stratified over this many contiguous blocks of clients, the same number
      from each (:func:`sfljax.data.sample_clients`). Default: the number of
      devices the clients are split over (each device's participants are
      then its own clients), i.e. 1 -- the plain draw -- on one device. On
      one device ``strata=D`` draws the participants a D-device run draws.
    donate: the round consumes its input state: the state given to
      :meth:`step` / :meth:`train_round` (and :meth:`run`'s) is donated to
      the round's program, whose new state reuses its buffers, so one copy of
      the per-client state is alive instead of two (SFLV1 and FL at 1000
      LeNet clients with ``client_block=50``: ~0.4 GiB less). That state
      must not be used afterwards (JAX raises on a deleted array); copy it
      first (``jax.tree.map(jnp.copy, state)``) to keep it. The CLI
      donates. With ``step_loop='python'`` nothing is donated.
  """

  def __init__(self, config: Config | None = None, dataset: data.Dataset | None = None,
               parts: list[np.ndarray] | None = None, *, model: models.SplitModel | None = None,
               algorithm: Any = None, client_optimizer: optax.GradientTransformation | None = None,
               server_optimizer: optax.GradientTransformation | None = None,
               loss: split.Loss | None = None, strata: int | None = None,
               donate: bool = False):
    self.config = config = (Config() if config is None else config).validate()
    self._strata = strata
    self.donate = bool(donate)
    # The convolution lowering policy of a model built here (--conv-lowering).
    if config.conv_lowering == "autotune" and jax.process_count() > 1:
      raise ConfigError("--conv-lowering", "autotune measures in each process, so hosts could "
                                           "compile different programs: with several processes "
                                           "use auto or one lowering (xla, patches, taps)")
    self.conv_policy = conv_autotune.policy(config.conv_lowering)
    if dataset is None:
      try:
        dataset = data.load_dataset(config.dataset, seed=config.seed, data_dir=config.data_dir)
      except ConfigError:
        raise
      except ValueError as e:
        raise ConfigError("--data-dir", str(e)) from None
    else:
      _refuse_bad("dataset", data.check_dataset, dataset)
    self.dataset = ds = dataset
    held = None
    if parts is None:
      if config.leakage:   # The server's auxiliary data: no client trains on it.
        held, rest = _hold_out(config, len(ds.y_train))
        parts = [rest[p] for p in config.client_partition(ds.y_train[rest])]
      else:
        parts = config.client_partition(ds.y_train)
    else:
      parts = _refuse_bad("parts", data.check_parts, parts, len(ds.y_train))
      if len(parts) != config.clients:
        raise ConfigError("--clients", f"{len(parts)} parts given for {config.clients} clients "
                                       "(parts: one index array per client)")
      if config.leakage:   # What no part holds, in a seeded order.
        free = np.setdiff1d(np.arange(len(ds.y_train)), np.concatenate(parts))
        held = free[data.rng_for(config.seed, LEAKAGE_STREAM).permutation(len(free))]
    self.parts = parts

    if model is None:
      try:
        model = models.get_model(config.model, input_shape=ds.input_shape,
                                 num_classes=ds.num_classes, norm=config.norm,
                                 dropout=config.dropout, conv_lowering=self.conv_policy)
      except ValueError as e:
        raise ConfigError("--norm" if "norm" in str(e) else "--model", str(e)) from None
    elif tuple(model.input_shape) != tuple(ds.input_shape) or model.num_classes < ds.num_classes:
      raise ConfigError("--model", f"the model is built for inputs {tuple(model.input_shape)} and "
                                   f"{model.num_classes} classes, but the dataset has inputs "
                                   f"{tuple(ds.input_shape)} and {ds.num_classes} classes")
    self._noise_cuts = None
    if config.pixeldp_epsilon is not None:
      model, self._noise_cuts = _with_noise_layer(config, model)
    self.model = model
    self.mesh = None
    self.loss = make_loss(config) if loss is None else loss
    self.compute_dtype = split.PRECISIONS[config.precision]
    pooled = (isinstance(algorithm, algorithms.Centralized) or algorithm == "centralized"
              or (algorithm is None and config.algorithm == "centralized"))
    maker = data.ClientData.pooled if pooled else data.ClientData.from_partition
    self.client_data = maker(ds.x_train, ds.y_train, parts)
    # A batch larger than the largest client is that client's whole data: clamped,
    # so an oversized --batch-size costs no padding (memory, time).
    self.batch_size = int(min(config.batch_size, max(1, int(np.max(self.client_data.counts)))))
    self._steps = data.steps_per_epoch(self.client_data.counts, self.batch_size)
    slots = self.client_data.num_clients * config.local_epochs * self._steps * self.batch_size
    if slots > _MAX_SLOTS:   # The round's batch schedule alone would not fit in memory.
      raise ConfigError("--local-epochs" if config.local_epochs > 1 else "--clients",
                        f"a round would schedule {slots:,} sample slots ({config.clients} "
                        f"clients x {config.local_epochs} local epochs x {self._steps} steps x "
                        f"batch {self.batch_size}); at most {_MAX_SLOTS:,} fit: lower "
                        "--local-epochs or --clients")
    self.dp = self._plan_privacy()
    self.algorithm = self._algorithm(algorithm, client_optimizer, server_optimizer)
    self.cuts = getattr(self.algorithm, "cuts", ())
    self.leakage = None if not config.leakage else self._leakage_probe(held)
    self.inversion_images: dict[str, Any] | None = None   # the last inversion's, for a grid
    self._finish_init()

  @classmethod
  def from_config(cls, config: Config, **objects) -> "Experiment":
    """An experiment with everything built from the config's names (objects
    given as keyword arguments take their place)."""
    return cls(config, **objects)

  @property
  def cut(self):
    """The cut (one int), or the two cuts of a U-shaped split (a tuple); None without a split."""
    if not self.cuts:
      return None
    return self.cuts[0] if len(self.cuts) == 1 else tuple(self.cuts)

  # -- building --------------------------------------------------------------
  def _algorithm(self, algorithm, client_optimizer, server_optimizer):
    cfg = self.config
    if isinstance(algorithm, algorithms.Algorithm) and not isinstance(algorithm,
                                                                     sides.Composition):
      return algorithm
    name = cfg.algorithm if algorithm is None else algorithm
    if isinstance(name, str) and name not in algorithms.ALGORITHMS:
      raise ConfigError("--algorithm", f"unknown {name!r}: choose one of "
                                       f"{', '.join(algorithms.ALGORITHMS)}, or pass a "
                                       "Composition or an Algorithm object")
    split_alg = not (isinstance(name, str) and name in ("fl", "centralized"))
    cuts = ()
    if split_alg:
      try:
        cuts = self._noise_cuts or self.model.resolve_cuts(cfg.cut)
      except ValueError as e:
        raise ConfigError("--cut", str(e)) from None
    self.cuts = cuts
    self.mesh = self._mesh()
    try:
      self.executor = execution.resolve(cfg.strategy, step_loop=cfg.step_loop,
                                        block=cfg.client_block, mesh=self.mesh)
    except ValueError as e:   # Client blocks over a mesh of several devices.
      raise ConfigError("--client-block", str(e)) from None
    client_updates = cfg.rounds * cfg.local_epochs * self._steps
    participants = data.num_participants(self.client_data.num_clients, cfg.client_fraction)
    shared = False
    if split_alg:
      comp = (name if isinstance(name, sides.Composition)
              else algorithms.composition(name, num_cuts=len(cuts), sflv2_order=cfg.sflv2_order))
      name = comp = self._override(comp)
      shared = not comp.server.per_client
    server_updates = client_updates * (participants if shared else 1)

    def named(which, total):
      flag = f"--{which}-optimizer"
      opt_name = getattr(cfg, f"{which}_optimizer") or cfg.optimizer
      try:
        return optimizers.make_optimizer(opt_name, cfg.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay, schedule=cfg.lr_schedule,
                                         total_steps=total)
      except ValueError as e:
        raise ConfigError(flag, str(e)) from None

    copt = client_optimizer if client_optimizer is not None else named("client", client_updates)
    if cfg.pixeldp_epsilon is not None:   # The pre-noise layers' bound after every update.
      from sfljax.privacy import pixeldp
      copt = pixeldp.projected(copt, pixeldp.model_projection(self.model))
    sopt = server_optimizer if server_optimizer is not None else named("server", server_updates)
    try:
      return algorithms.build(
          name, self.model, cut=cuts or None, client_optimizer=copt, server_optimizer=sopt,
          executor=self.executor, policy=algorithms.OPTIMIZER_POLICIES[cfg.optimizer_state],
          sflv2_order=cfg.sflv2_order,
          augment=data.augmentation(cfg.dataset) if cfg.augment else None,
          compute_dtype=self.compute_dtype, loss=self.loss,
          skip_nonfinite=cfg.on_nonfinite == "skip",
          privacy=None if self.dp is None else self.dp.dpsgd(),
          smashed_penalty=self._nopeek() if split_alg else None)
    except sides.CompositionError as e:
      raise ConfigError("--algorithm", str(e)) from None
    except ValueError as e:
      raise ConfigError("--cut", str(e)) from None

  def _leakage_probe(self, held: np.ndarray):
    """The leakage measures (``--leakage``) on the first ``leakage_probe``
    test samples, the decoder on ``leakage_aux`` of the held-out ones."""
    from sfljax.leakage import probe
    cfg, ds = self.config, self.dataset
    if not self.cuts:
      raise ConfigError("--leakage", "the measures look at what crosses the cut; this "
                                     "algorithm has no cut: use a split algorithm")
    if len(self.model.input_shape) != 3:
      raise ConfigError("--leakage", f"model inversion needs image inputs [H, W, C], the model "
                                     f"takes {tuple(self.model.input_shape)}")
    aux = len(held) if cfg.leakage_aux is None else cfg.leakage_aux
    if aux > len(held) or aux < 1:
      raise ConfigError("--leakage-aux", f"{aux} auxiliary samples asked for, but "
                                         f"{len(held)} training samples are held out from the "
                                         "clients: lower --leakage-aux or raise "
                                         "--leakage-holdout")
    n = min(DEFAULT_PROBE, len(ds.y_test)) if cfg.leakage_probe is None else cfg.leakage_probe
    if n > len(ds.y_test):
      raise ConfigError("--leakage-probe", f"{n} probe samples asked for, but the test set has "
                                           f"{len(ds.y_test)}: lower it")
    return probe.LeakageProbe(self.model, self.cuts, ds.x_test[:n], ds.y_test[:n],
                              ds.x_train[held[:aux]], seed=cfg.seed + 3, loss=self.loss,
                              decoder_steps=cfg.leakage_decoder_steps)

  def measure_leakage(self, state: RunState, invert: bool = False) -> dict[str, float]:
    """The leakage metrics (``leak_*``) of ``state``'s model (the global one;
    with clients' own client parts, client 0's model); ``invert``: with the
    model inversion (its images go to :attr:`inversion_images`)."""
    own = self.client_models(state)
    variables = (self.global_variables(state) if own is None
                 else jax.tree.map(lambda a: a[0], own))
    metrics, images = self.leakage.measure(distributed.fetch(variables), state.round,
                                           invert=invert)
    if images is not None:
      self.inversion_images = {"round": state.round, **images}
    return metrics

  def _plan_privacy(self):
    """Client-side DP-SGD's plan (None without ``dp_clip``); the calibrated
    noise multiplier goes into :attr:`config` as ``dp_noise``."""
    cfg = self.config
    if not cfg.dp:
      return None
    from sfljax.privacy import client_dp
    if getattr(self.model, "has_batch_stats", False):
      raise ConfigError("--norm", "DP-SGD needs per-example gradients, which BatchNorm mixes "
                                  "across the batch: use --norm group or none")
    try:
      plan = client_dp.ClientDP.plan(
          self.client_data.counts, self.batch_size, clip=cfg.dp_clip,
          noise_multiplier=cfg.dp_noise, target_epsilon=cfg.dp_epsilon, delta=cfg.dp_delta,
          accountant=cfg.dp_accountant, rounds=cfg.rounds, local_epochs=cfg.local_epochs)
    except client_dp.PlanError as e:
      raise ConfigError(e.field, str(e)) from None
    if cfg.dp_noise is None:
      self.config = dataclasses.replace(cfg, dp_noise=plan.noise_multiplier)
    return plan

  def _nopeek(self):
    if not self.config.nopeek_weight:
      return None
    from sfljax.leakage import NoPeek
    return NoPeek(float(self.config.nopeek_weight))

  def _override(self, comp: sides.Composition) -> sides.Composition:
    """The config's --client-aggregation / --server-side / --schedule choices applied."""
    cfg = self.config
    choices = {"client_aggregation": ("aggregation", {"fedavg": sides.FEDAVG,
                                                      "relay": sides.RELAY, "none": sides.OWN}),
               "server_side": ("server", {"replicas": sides.REPLICAS, "shared": sides.SHARED}),
               "schedule": ("schedule", {"synchronous": sides.SYNCHRONOUS,
                                         "client_major": sides.CLIENT_MAJOR})}
    changes, last = {}, "algorithm"
    for field, (attr, table) in choices.items():
      if getattr(cfg, field) is not None:
        changes[attr], last = table[getattr(cfg, field)], field
    if not changes:
      return comp
    try:
      return dataclasses.replace(comp, **changes)
    except sides.CompositionError as e:
      raise ConfigError(last, f"{e} (the composition: {cfg.algorithm} with "
                              f"{', '.join(f'{k}={v.name}' for k, v in changes.items())})") from None

  def _finish_init(self):
    cfg, cd = self.config, self.client_data
    # The round's key, fold_in(key(seed + 1), round), compiled once: eager, its two
    # operations cost ~0.25 ms of host time per round (4 % of a one-client round).
    self._round_key = jax.jit(lambda r: jax.random.fold_in(jax.random.key(cfg.seed + 1), r))
    if not hasattr(self, "executor"):   # A ready Algorithm object: its own executor.
      self.executor = getattr(self.algorithm, "executor", execution.resolve("auto"))
    self.strata = self._sampling_strata()   # Checked before any data moves.
    self._rows = None
    if self.mesh is None:
      # The samples once, read through the clients' rows (no padded per-client
      # copy). On CPU the device arrays use the (aligned) host buffers, which
      # become read-only, as the device's are.
      images, labels = data.aligned(cd.images), data.aligned(cd.labels)
      self._x, self._y, self._rows = (jax.device_put(a) for a in (images, labels, cd.rows))
      for a in (images, labels, cd.rows):
        a.flags.writeable = False
    else:   # Each device holds its own clients' padded shards.
      self._x, self._y = self._place_clients(cd.x), self._place_clients(cd.y)
    self._weights = self._place_clients(cd.counts.astype(np.float32))
    self.trace_count = 0  # Tracings of the round's programs (tests: no recompilation).
    self.num_participants = data.num_participants(cd.num_clients, cfg.client_fraction)
    alg = self.algorithm
    sh = self._shardings = None
    if self.mesh is not None:  # Pinned layouts: round r + 1 takes round r's outputs as they are.
      sh = self._shardings = distributed.Shardings.of(
          alg, jax.eval_shape(self.model.init, jax.random.key(0)), self.round_inputs(0),
          self.mesh)

    def counted(fn, out, inp, donate=()):
      def traced(*args):
        self.trace_count += 1
        return fn(*args)
      if sh is None:
        return jax.jit(traced, donate_argnums=donate)
      return jax.jit(traced, donate_argnums=donate, in_shardings=inp(sh), out_shardings=out(sh))

    # On a mesh both ends are pinned: whatever a round's draw, the same layouts.
    if self.executor.step_loop == "scan":
      self._programs = {"round": counted(functools.partial(_round_keeping_state, alg),
                                         lambda s: (s.state, s.stats),
                                         lambda s: (s.state, s.inputs),
                                         donate=(0,) if self.donate else ())}
    else:  # The round's working state (carry) is internal: its buffers are donated.
      rep = None if sh is None else distributed.replicated_sharding(self.mesh)
      self._programs = {"begin": counted(alg.begin, lambda s: s.carry,
                                         lambda s: (s.state, s.inputs)),
                        "step": counted(alg.step, lambda s: s.carry,
                                        lambda s: (s.carry, s.inputs, rep), donate=(0,)),
                        "end": counted(alg.end, lambda s: (s.state, s.stats),
                                       lambda s: (s.carry, s.inputs))}
    self._eval = jax.jit(self._evaluate_arrays)
    self._eval_own = jax.jit(self._evaluate_own)
    self._global = jax.jit(lambda s, w: alg.global_variables(s, w))
    self._finite = jax.jit(_all_finite)
    self._local = None   # local_models' program, built when first asked for
    self._privacy_memo: dict = {}   # epsilons and one-step RDP curves, shared by the rounds' ledgers
    self._prepare_test_set()
    self.compile_seconds: float | None = None
    self.traffic = self.traffic_for(cd.counts)

  # -- pieces ----------------------------------------------------------------
  def _mesh(self):
    """The device mesh the clients are split over, or None (one device)."""
    cfg = self.config
    if cfg.devices is None and jax.process_count() == 1:
      return None
    try:
      mesh = distributed.client_mesh(cfg.devices)
      distributed.check_clients(self.client_data.num_clients, mesh)
    except ValueError as e:
      flag, _, msg = str(e).partition(": ")
      raise ConfigError(flag if flag.startswith("--") else "--devices", msg or str(e)) from None
    return mesh

  def _sampling_strata(self) -> int:
    """The blocks participants are drawn from (the ``strata`` argument; default:
    the mesh's devices, 1 without a mesh)."""
    cfg, devices = self.config, 1 if self.mesh is None else int(self.mesh.devices.size)
    strata = devices if self._strata is None else self._strata
    if isinstance(strata, bool) or not isinstance(strata, (int, np.integer)) or strata < 1:
      raise ValueError(f"strata: must be a positive integer, got {strata!r}")
    if strata % devices:
      raise ValueError(f"strata: {strata} blocks of clients do not split over the "
                       f"{devices} devices: use a multiple of {devices}")
    if cfg.client_fraction < 1 and strata > 1:
      try:
        data.check_strata(self.client_data.num_clients, cfg.client_fraction, int(strata),
                          "devices" if strata == devices else "strata")
      except ValueError as e:
        flag, _, msg = str(e).partition(": ")
        raise ConfigError(flag, msg) from None
    return int(strata)

  def _place_clients(self, tree):
    """On the device, or with the leading (client) axis split over the mesh."""
    if self.mesh is None:
      return jax.tree.map(jnp.asarray, tree)
    return distributed.shard_clients(tree, self.mesh)

  def _place(self, tree):
    """On the device, or whole on every device of the mesh."""
    return jax.tree.map(jnp.asarray, tree) if self.mesh is None else distributed.replicate(
        tree, self.mesh)

  def _batched(self, x, y):
    """[N, ...] -> [C, eb, ...] chunks of the eval batch size (zero-padded), and a mask."""
    n, eb = len(y), max(1, min(self.config.eval_batch_size, len(y)))
    c = -(-n // eb)
    pad = c * eb - n
    x = np.concatenate([x, np.zeros((pad,) + x.shape[1:], x.dtype)])
    y = np.concatenate([y, np.zeros((pad,), y.dtype)])
    m = np.arange(c * eb) < n
    return x.reshape((c, eb) + x.shape[1:]), y.reshape(c, eb), m.reshape(c, eb)

  def _prepare_test_set(self):
    ds = self.dataset
    n = len(ds.y_test)
    self._test = self._place(self._batched(ds.x_test, ds.y_test)[:2])
    self._n_test = n
    self._test_shards = data.partition(ds.y_test, min(self.client_data.num_clients, n), "iid",
                                       seed=self.config.seed + 1)
    self._own_test = None
    alg, k = self.algorithm, self.client_data.num_clients
    own = jax.eval_shape(lambda v: alg.client_variables(alg.init(v, k)),
                         jax.eval_shape(self.model.init, jax.random.key(0)))
    if own is not None:
      # Every client's own test shard, padded to the largest: [K, C, eb, ...].
      size = max(len(s) for s in self._test_shards)
      rows = []
      for s in self._test_shards:
        xs = np.concatenate([ds.x_test[s], np.zeros((size - len(s),) + ds.x_test.shape[1:],
                                                    ds.x_test.dtype)])
        ys = np.concatenate([ds.y_test[s], np.zeros((size - len(s),), ds.y_test.dtype)])
        xb, yb, mb = self._batched(xs, ys)
        mb = mb & (np.arange(mb.size).reshape(mb.shape) < len(s))
        rows.append((xb, yb, mb))
      self._own_test = tuple(np.stack(a) for a in zip(*rows))

  def _evaluate_arrays(self, variables, x, y):
    module = self.model.full()
    cfg = self.config
    if cfg.pixeldp_epsilon is not None:
      # PixelDP's prediction: the mean softmax over noise draws, keys from the seed.
      from sfljax.privacy import pixeldp
      draws = cfg.pixeldp_draws or pixeldp.DEFAULT_DRAWS
      base = jax.random.fold_in(jax.random.key(cfg.seed + 2), 0)

      def noisy(batch):
        xb, yb, i = batch
        probs = pixeldp.predict_with_draws(pixeldp.noisy_apply(module), variables, xb,
                                           jax.random.fold_in(base, i), draws)
        p_true = jnp.take_along_axis(probs, yb[:, None], axis=-1)[:, 0]
        loss = -jnp.log(jnp.maximum(p_true, jnp.finfo(jnp.float32).tiny))
        return loss, jnp.argmax(probs, -1) == yb

      loss, correct = jax.lax.map(noisy, (x, y, jnp.arange(x.shape[0])))
      return loss.reshape(-1), correct.reshape(-1)

    def one(batch):
      xb, yb = batch
      logits, _ = models.apply_part(module, variables, xb, train=False)
      loss = optax.softmax_cross_entropy_with_integer_labels(logits, yb)
      return loss, jnp.argmax(logits, -1) == yb

    loss, correct = jax.lax.map(one, (x, y))
    return loss.reshape(-1), correct.reshape(-1)

  def _evaluate_own(self, client_variables, x, y, m):
    """Every client's own model on its own test shard: correct counts and sizes [K]."""
    def one(args):
      v, xs, ys, ms = args
      _, correct = self._evaluate_arrays(v, xs, ys)
      return jnp.sum(correct * ms.reshape(-1)), jnp.sum(ms)
    return jax.lax.map(one, (client_variables, x, y, m))

  def traffic_for(self, counts):
    """Bytes moved in a round in which clients holding ``counts`` samples take part."""
    return self.algorithm.traffic(counts, self.config.local_epochs, self.dataset.input_shape,
                                  self.client_data.labels.dtype)

  def participants(self, round_index: int) -> np.ndarray | None:
    """The client ids taking part in a round (None: all of them), increasing;
    stratified over :attr:`strata` blocks of clients (see ``strata``)."""
    return data.sample_clients(self.client_data.num_clients, self.config.client_fraction,
                               seed=self.config.seed, round_index=round_index,
                               strata=self.strata)

  def _schedule(self, round_index: int):
    """The round's host-side plan: ``(ids, counts, idx, mask, active, overflow,
    reported)`` -- ``active``/``overflow`` [M, T] with DP-SGD's Poisson batches,
    else None."""
    cfg, cd = self.config, self.client_data
    ids = self.participants(round_index)
    counts = cd.counts if ids is None else cd.counts[ids]
    active = overflow = None
    # Steps come from all clients' counts, so every round has the same shapes.
    if self.dp is None:
      idx, mask = data.batch_schedule(counts, self.batch_size, seed=cfg.seed,
                                      round_index=round_index, local_epochs=cfg.local_epochs,
                                      client_ids=ids, steps=self._steps)
    else:
      from sfljax.privacy import sampling
      idx, mask, active, overflow = sampling.poisson_schedule(
          counts, self.batch_size, self.dp.buffer, seed=cfg.seed, round_index=round_index,
          local_epochs=cfg.local_epochs, client_ids=ids, steps=self._steps)
    reported = None
    if cfg.dropout_rate > 0:   # Client faults: a seeded draw per round (sfljax.faults).
      steps = mask if active is None else active[:, :, None]   # DP: empty draws are steps too
      drawn = faults.draw(cfg.seed, round_index, steps, cfg.dropout_rate, cfg.dropout_point)
      mask, reported = faults.apply(mask, drawn, cfg.dropout_point), drawn.reported
      if active is not None:
        active = faults.apply(active[:, :, None], drawn, cfg.dropout_point)[:, :, 0]
    return ids, counts, idx, mask, active, overflow, reported

  def round_inputs(self, round_index: int) -> algorithms.RoundInputs:
    """The round's batches and client orders, drawn from (seed, round)."""
    return self._inputs(round_index, self._schedule(round_index))

  def _inputs(self, round_index, schedule) -> algorithms.RoundInputs:
    cfg = self.config
    ids, counts, idx, mask, active, _, reported = schedule
    k, t = len(counts), idx.shape[1]
    rng = data.rng_for(cfg.seed, data._ORDER_STREAM, round_index)
    client_order = rng.permutation(k).astype(np.int32)
    step_orders = np.stack([rng.permutation(k) for _ in range(t)]).astype(np.int32)
    key = self._round_key(np.int32(round_index))
    # Per-participant rows sharded like the clients (on a mesh device d holds
    # its own participants: the stratified draw), orders and key replicated.
    per_client = self._place_clients((idx, mask))
    orders = self._place((step_orders, client_order, key))
    weights, clients = self._weights, None
    if ids is not None:
      weights, clients = self._place_clients((counts.astype(np.float32), ids))
    return algorithms.RoundInputs(self._x, self._y, *per_client, weights, *orders, clients,
                                  None if reported is None else self._place_clients(reported),
                                  None if active is None else self._place_clients(active),
                                  self._rows)

  @property
  def steps_per_round(self) -> int:
    """Events in a round: optimizer steps of each client (synchronous), or of
    all clients one after another (client-major schedules)."""
    m, t = self.num_participants, self._steps * self.config.local_epochs
    sched = getattr(getattr(self.algorithm, "composition", None), "schedule", None)
    return t if sched is None else sched.num_steps(m, t)

  # -- public API ------------------------------------------------------------
  def init(self) -> RunState:
    """Initial state: one full-model init from the seed, split into parts."""
    variables = jax.jit(self.model.init)(jax.random.key(self.config.seed))
    if self.config.pixeldp_epsilon is not None:   # The bound holds from the first step.
      from sfljax.privacy import pixeldp
      variables = {**variables,
                   "params": jax.jit(pixeldp.model_projection(self.model))(variables["params"])}
    if self.mesh is None:
      algo_init = jax.jit(self.algorithm.init, static_argnums=1)
    else:
      variables = distributed.replicate(distributed.fetch(variables), self.mesh)
      algo_init = jax.jit(self.algorithm.init, static_argnums=1,
                          out_shardings=self._shardings.state)
    return RunState(algo_init(variables, self.client_data.num_clients), 0,
                    None if self.dp is None else self.dp.ledger())

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
    variables = self._global(state.algo, self._weights)
    self._eval.lower(variables, *self._test).compile()
    if self._own_test is not None:
      self._eval_own.lower(self.algorithm.client_variables(state.algo),
                           *self._own_test).compile()
    hostmem.release()   # The compiler's freed working memory, before the round's buffers.
    self.compile_seconds = time.perf_counter() - t0
    return self.compile_seconds

  def train_round(self, state: RunState) -> tuple[RunState, dict[str, Any]]:
    """One global epoch without evaluation (its program compiles on the first call)."""
    schedule = self._schedule(state.round)
    ids = schedule[0]
    inputs = self._inputs(state.round, schedule)
    algo, stats = self._run_round(state.algo, inputs)
    stats = distributed.fetch(stats)   # Once per round (all processes take part).
    reported = (np.ones(len(stats.count), bool) if inputs.reported is None
                else np.asarray(distributed.fetch(inputs.reported), bool))
    count = max(float(np.sum(stats.count)), 1.0)
    k = self.client_data.num_clients
    rows = np.arange(k) if ids is None else ids
    loss = [None] * k
    acc = [None] * k
    for row, c in enumerate(rows):
      n = float(stats.count[row])
      if n > 0:
        loss[int(c)] = float(stats.loss_sum[row]) / n
        acc[int(c)] = float(stats.correct[row]) / n
    bad = (np.zeros(len(rows), bool) if getattr(stats, "nonfinite", None) is None
           else np.asarray(stats.nonfinite) > 0)
    if not np.any(reported & ~bad) and "round" not in self._programs:
      algo = state.algo   # Nobody reported: the round changes nothing (server side included;
      # the compiled round does this itself: _round_keeping_state).
    ledger, private = state.privacy, {}
    if self.dp is not None:   # Every step the mechanism ran (a failure's earlier steps too).
      from sfljax.privacy import accounting
      ledger = accounting.Ledger.from_dict(state.privacy.to_dict(), memo=self._privacy_memo)
      active, overflow = schedule[4], schedule[5]
      ledger.record(rows, active.sum(axis=1), overflow.sum(axis=1))
      private = {"epsilon": ledger.epsilon(),
                 "client_epsilon": [float(e) for e in ledger.epsilons()],
                 "dp_overflow_steps": int(overflow.sum())}
    return RunState(algo, state.round + 1, ledger), {**private,
        "train_loss": float(np.sum(stats.loss_sum)) / count,
        "train_accuracy": float(np.sum(stats.correct)) / count,
        "client_train_loss": loss, "client_train_accuracy": acc,
        "reported": int(np.sum(reported & ~bad)),
        "failed_clients": [int(c) for c in rows[~reported]],
        "nonfinite_clients": [int(c) for c in rows[bad]]}

  def evaluate(self, state, x=None, y=None) -> dict[str, float]:
    """The round's global model on the test set and on the clients' test shards.

    ``evaluate(variables, x, y)``: full-model ``variables`` (e.g.
    ``exp.global_variables(state)``) on your own arrays; returns
    ``{"loss", "accuracy"}``.
    """
    if x is not None or y is not None:
      if x is None or y is None:
        raise ValueError("x, y: give both the inputs and their labels")
      x, y = np.asarray(x, np.float32), np.asarray(y, np.int32)
      if x.shape[1:] != tuple(self.model.input_shape) or len(x) != len(y):
        raise ValueError(f"x: expected [N, {', '.join(map(str, self.model.input_shape))}] "
                         f"with N = len(y), got {x.shape} and {len(y)} labels")
      xb, yb, _ = self._batched(x, y)
      loss, correct = distributed.fetch(self._eval(state, jnp.asarray(xb), jnp.asarray(yb)))
      return {"loss": float(np.mean(loss[:len(y)])),
              "accuracy": float(np.mean(correct[:len(y)]))}
    variables = self._global(state.algo, self._weights)
    loss, correct = distributed.fetch(self._eval(variables, *self._test))
    loss, correct = loss[:self._n_test], correct[:self._n_test]
    if self._own_test is not None:
      own_correct, own_n = distributed.fetch(self._eval_own(
          self.algorithm.client_variables(state.algo), *self._own_test))
      per_client = own_correct / np.maximum(own_n, 1)
    else:
      per_client = [np.mean(correct[s]) for s in self._test_shards]
    return {"test_loss": float(np.mean(loss)),
            "test_accuracy": float(np.mean(correct)),
            "client_test_accuracy": float(np.mean(per_client))}

  def global_variables(self, state: RunState):
    """The full model to evaluate (see ``test_accuracy`` in :data:`METRICS`)."""
    return self._global(state.algo, self._weights)

  def client_models(self, state: RunState):
    """Every client's own full model ([K, ...] leaves) when clients keep their
    own client part (sflv3), else None: all clients hold the global model."""
    return self.algorithm.client_variables(state.algo)

  def local_models(self, state: RunState) -> dict[str, Any]:
    """Runs round ``state.round`` from ``state`` up to, not including, the
    aggregation, and returns what each participant trained: ``client`` (its
    client part, [M, ...]; one model for a relayed one), ``server`` (its
    server replica [M, ...], or the shared server), and ``clients`` (the
    participants' ids). The same computation as the round itself."""
    alg, inputs = self.algorithm, self.round_inputs(state.round)
    if self._local is None:  # Compiled on the first call only (the round's shapes never change).
      def working(s, inp):
        carry = alg.begin(s, inp)
        return algorithms.settle(
            jax.lax.fori_loop(0, alg.num_steps(inp), lambda t, c: alg.step(c, inp, t), carry))
      self._local = jax.jit(working)
    carry = self._local(state.algo, inputs)
    ids = self.participants(state.round)
    ids = np.arange(self.client_data.num_clients) if ids is None else ids
    if hasattr(carry, "models"):  # FL: whole models.
      return {"client": carry.models, "server": None, "clients": ids}
    return {"client": carry.client, "server": carry.server, "clients": ids}

  def step(self, state: RunState) -> tuple[RunState, dict[str, Any]]:
    """One round: train, evaluate, and the round's metrics (see :data:`METRICS`)."""
    if self.compile_seconds is None:
      self.compile(state)
    t0 = time.perf_counter()
    new, metrics = self.train_round(state)
    t1 = time.perf_counter()
    if self.config.on_nonfinite == "stop":
      self.check_finite(new, metrics)
    metrics.update(self.evaluate(new))
    if not np.isfinite(metrics["test_loss"]):   # No client update to drop: the model is broken.
      raise NonFiniteError(new.round, "test loss of the global model")
    state = new
    t2 = time.perf_counter()
    metrics["seconds"] = t2 - t0
    metrics["train_seconds"], metrics["eval_seconds"] = t1 - t0, t2 - t1
    ids = self.participants(state.round - 1)
    counts = self.client_data.counts if ids is None else self.client_data.counts[ids]
    metrics["participants"] = len(counts)
    metrics.update(self.traffic_for(counts).as_dict())
    if self.leakage is not None:   # Timed on its own: not part of seconds.
      every = self.config.leakage_inversion_every
      invert = state.round == self.config.rounds or bool(every and state.round % every == 0)
      metrics.update(self.measure_leakage(state, invert))
      metrics["leakage_seconds"] = time.perf_counter() - t2
    return state, {"round": state.round, **metrics}

  def check_finite(self, state: RunState, metrics: dict[str, Any] | None = None) -> None:
    """Raises :class:`NonFiniteError` if the round's training loss or any
    array of ``state`` holds a NaN/Inf (``metrics``: the round's, naming the
    clients whose loss went non-finite)."""
    bad = []
    if metrics is not None:
      bad = [k for k, v in enumerate(metrics.get("client_train_loss") or [])
             if v is not None and not np.isfinite(v)]
      if bad or not np.isfinite(metrics.get("train_loss", 0.0)):
        raise NonFiniteError(state.round, "training loss", bad)
    if not bool(distributed.fetch(self._finite(state.algo))):
      raise NonFiniteError(state.round, "parameters or optimizer state after the update")

  # -- checkpoints -----------------------------------------------------------
  def save(self, state: RunState, path: str, *, keep: int | None = None) -> str:
    """Saves ``state`` into the checkpoint directory ``path`` (one
    sub-directory per round, atomic; ``keep``: how many rounds to keep, None
    = all) with the global model for :func:`sfljax.checkpoint.load_model`.
    Returns the round's directory."""
    from sfljax import checkpoint
    ckpt = self._checkpoints(path, keep)
    meta = {"config": self.config.to_dict()}
    if state.privacy is not None:
      meta["privacy"] = state.privacy.to_dict()
    return ckpt.save(state.round, state.algo, self.global_variables(state), meta)

  def restore(self, path: str, round_index: int | None = None) -> RunState:
    """The state saved in the checkpoint directory ``path`` (default: its newest
    round), for this experiment (a checkpoint of another config or structure
    raises :class:`sfljax.checkpoint.CheckpointError`)."""
    from sfljax import checkpoint
    ckpt = self._checkpoints(path, None)
    stored = ckpt.meta(round_index).get("config", {})
    mine = self.config.to_dict()
    differ = [k for k in mine if k in stored and stored[k] != mine[k]
              and k not in _HARMLESS_FIELDS]
    if differ:
      raise checkpoint.CheckpointError(
          f"{path}: saved by a run with other settings: "
          + ", ".join(f"{k}={stored[k]!r} (here {mine[k]!r})" for k in differ[:4]))
    algo, meta = ckpt.restore(self.init().algo, round_index)
    ledger = None
    if self.dp is not None:
      from sfljax.privacy import accounting
      if "privacy" not in meta:
        raise checkpoint.CheckpointError(f"{path}: has no privacy ledger (saved by a run "
                                         "without DP-SGD)")
      ledger = accounting.Ledger.from_dict(meta["privacy"], memo=self._privacy_memo)
    return RunState(algo, int(meta["round"]), ledger)

  def _checkpoints(self, path, keep):
    from sfljax import checkpoint
    key = (os.path.abspath(path), keep)
    if getattr(self, "_ckpt", None) is None or self._ckpt[0] != key:
      self._ckpt = (key, checkpoint.Checkpoints(path, keep=keep))
    return self._ckpt[1]

  def run(self, rounds: int | None = None,
          callback: Callable[[dict[str, Any]], None] | None = None,
          state: RunState | None = None) -> list[dict[str, Any]]:
    """Runs from ``state`` (default: a fresh one) up to round ``rounds``
    (default: the config's); returns the history of the rounds run."""
    state = self.init() if state is None else state
    self.compile(state)
    history = []
    for _ in range(state.round, self.config.rounds if rounds is None else rounds):
      state, metrics = self.step(state)
      history.append(metrics)
      if callback is not None:
        callback(metrics)
    self.final_state = state  # The last round's state, for inspection after run().
    return history


_MAX_SLOTS = 2 ** 31
"""The most sample slots (clients x local epochs x steps x batch) a round may schedule."""

_HARMLESS_FIELDS = frozenset({"eval_batch_size"})
"""Config fields that may differ between a checkpoint and the run restoring it."""


def _with_noise_layer(config: Config, model: models.SplitModel):
  """``model`` with the PixelDP noise layer of ``config`` and the run's cuts
  (resolved on ``model``, shifted past the noise block); ConfigError when
  the layer is not on the client side."""
  from sfljax.privacy import pixeldp
  layer = 1 if config.pixeldp_layer is None else config.pixeldp_layer
  names = model.block_names
  if isinstance(layer, str) and not layer.isdigit():
    if layer not in names:
      raise ConfigError("--pixeldp-layer", f"unknown block {layer!r}: {model.name}'s blocks are "
                                           f"{', '.join(names)}")
    pos = names.index(layer) + 1
  else:
    pos = int(layer)
  try:
    cuts = model.resolve_cuts(config.cut)
  except ValueError as e:
    raise ConfigError("--cut", str(e)) from None
  if pos > cuts[0]:
    raise ConfigError("--pixeldp-layer", f"after block {pos} ({names[min(pos, len(names)) - 1]})"
                                         f" is past the cut (the client holds the first "
                                         f"{cuts[0]} blocks): the noise layer must be on the "
                                         f"client side; pick a block up to {names[cuts[0] - 1]}")
  try:
    pixeldp.noise_scale(config.pixeldp_epsilon, config.pixeldp_mechanism, config.pixeldp_delta)
  except ValueError as e:
    raise ConfigError("--pixeldp-epsilon", str(e)) from None
  try:
    noisy = pixeldp.insert_noise_layer(model, pos, config.pixeldp_epsilon,
                                       config.pixeldp_mechanism, config.pixeldp_delta)
  except ValueError as e:
    raise ConfigError("--pixeldp-layer", str(e)) from None
  return noisy, tuple(c + 1 for c in cuts)


DEFAULT_PROBE = 512
"""The leakage probe's size without ``leakage_probe`` (at most the test set)."""

LEAKAGE_STREAM = 9
"""The held-out (auxiliary) samples' draw: ``data.rng_for(seed, LEAKAGE_STREAM)``."""


def _hold_out(config: Config, n: int) -> tuple[np.ndarray, np.ndarray]:
  """(held-out indices in their seeded order, the rest sorted) of n training samples."""
  h = int(round(config.leakage_holdout * n))
  if h < 1 or h > n - config.clients:
    raise ConfigError("--leakage-holdout", f"holds out {h} of {n} training samples, which "
                                           f"leaves none for the server or too few for "
                                           f"{config.clients} clients: pick another fraction")
  perm = data.rng_for(config.seed, LEAKAGE_STREAM).permutation(n)
  return perm[:h], np.sort(perm[h:])


def _round_keeping_state(alg, state, inputs):
  """``alg.round``, except that a round in which nobody reported (every
  participant failed, or with skipped non-finite steps dropped every update)
  changes nothing, server side included: the new state is then the old one,
  chosen inside the program so that the old state's buffers can be donated."""
  new, stats = alg.round(state, inputs)
  nonfinite = getattr(stats, "nonfinite", None)
  if inputs.reported is None and nonfinite is None:
    return new, stats   # Everyone reports: nothing to choose.
  ok = jnp.ones(jnp.shape(stats.count), bool)
  if inputs.reported is not None:
    ok = ok & jnp.asarray(inputs.reported, bool)
  if nonfinite is not None:
    ok = ok & (nonfinite == 0)
  anyone = jnp.any(ok)
  return jax.tree.map(lambda n, o: jnp.where(anyone, n, o), new, state), stats


def _all_finite(tree) -> jax.Array:
  """True if every floating-point leaf of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)
            if jnp.issubdtype(a.dtype, jnp.floating)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _refuse_bad(argument: str, check, *args):
  """Runs a data check; its ValueError becomes a ConfigError naming the argument."""
  try:
    return check(*args)
  except ValueError as e:
    msg = str(e)
    raise ConfigError("--data-dir" if argument == "dataset" else "--partition",
                      msg if msg.startswith(argument) else f"{argument}: {msg}") from None


def run(config: Config, **kwargs) -> list[dict[str, Any]]:
  """Runs a config end to end; returns one metrics dict per round."""
  return Experiment(config).run(**kwargs)
