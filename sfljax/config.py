"""Run settings as data: :class:`Config`, its schema and :class:`ConfigError`.

The :class:`Config` dataclass is the single description of a run's settings:
each field carries its help text, its allowed values and its CLI flag in its
metadata, and from that schema come

* the ``sfljax train`` (and ``sfljax partition``) flags (:func:`options`,
  turned into argparse options by :mod:`sfljax.cli`),
* ``Config.__doc__`` (``help(Config)`` lists every field, its default and
  allowed values),
* :meth:`Config.from_dict` for JSON-style dicts (the experiment configs).

>>> cfg = Config(algorithm="sflv2", cut="conv1,fc2", optimizer="sgd", momentum=0.9)
>>> cfg.validate()                      # ConfigError naming the field, or cfg
>>> Config.from_dict(json.load(open(path))["config"]).validate()

Field metadata keys: ``help`` (text), ``choices`` (allowed values; ``None``
is allowed too when it is the default), ``flag`` (overrides the flag made
from the name, ``--field-name``, or ``--no-field-name`` for a bool that
defaults to True), ``cli`` (False: no flag), ``type`` (the CLI's parser of
the flag's text, instead of the annotated type) and ``metavar``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import re
import textwrap
import typing
from typing import Any, Callable, Iterable, Mapping, NamedTuple

import numpy as np

from sfljax import algorithms, data, execution, models, optimizers, partitions, split

WHOLE_MODEL_ALGORITHMS: tuple[str, ...] = ("centralized", "fl")
"""Algorithms that train whole models, so take no ``cut``."""

_INT_TEXT = re.compile(r"[+-]?\d+")

MAX_SEED: int = 2**31 - 1
"""The largest seed: the run uses ``jax.random.key(seed + 1)``, which must fit
in 32 bits whether or not JAX's 64-bit mode is on (a larger key is silently
truncated there, or overflows), so seeds are kept in ``[0, 2**31 - 1]``."""


class ConfigError(ValueError):
  """A bad setting, named both ways.

  ``flag`` is the CLI flag (``"--lr"``) and ``field`` the :class:`Config`
  field, i.e. the Python argument (``"lr"``; ``None`` for a CLI-only flag
  such as ``--coordinator-address``); :attr:`api_message` is ``"lr: message"``.

  ``ConfigError(name, message)`` takes either the flag or the field name;
  ``str(e)`` names both (``"lr (--lr): message"``) and :attr:`cli_message`
  is the CLI's line ``"--lr: message"``.
  """

  def __init__(self, name: str, message: str):
    self.flag, self.field = _names(name)
    self.message = message
    super().__init__(f"{self.field} ({self.flag}): {message}" if self.field
                     else f"{self.flag}: {message}")

  @property
  def cli_message(self) -> str:
    """The CLI's line: ``"--lr: message"``."""
    return f"{self.flag}: {self.message}"

  @property
  def api_message(self) -> str:
    """The message naming the Python argument: ``"lr: message"``."""
    return f"{self.field or self.flag}: {self.message}"

  def __reduce__(self):
    return type(self), (self.flag, self.message)


def _opt(default, help: str, *, choices: tuple | None = None, flag: str | None = None,
         cli: bool = True, type: Callable[[str], Any] | None = None,
         metavar: str | None = None):
  """A :class:`Config` field with its schema in ``metadata``."""
  meta = {"help": help, "cli": cli}
  for key, value in (("choices", choices), ("flag", flag), ("type", type),
                     ("metavar", metavar)):
    if value is not None:
      meta[key] = value
  return dataclasses.field(default=default, metadata=meta)


def parse_cut(text: str) -> int | str:
  """The ``--cut`` flag's value: an all-digit text as an int (``"2"`` -> 2),
  anything else as the stripped text (``"conv2"``, ``"1,4"``, ``"conv1,fc2"``;
  the items of a pair are stripped too). Only :meth:`Config.validate` and the
  model (``SplitModel.resolve_cuts``) judge it."""
  text = str(text).strip()
  if text.isdigit():
    return int(text)
  if "," in text:
    return ",".join(item.strip() for item in text.split(","))
  return text


def _normalize_cut(cut):
  """One spelling per cut: digit strings as ints, sequences as ``"a,b"``."""
  if isinstance(cut, str):
    return parse_cut(cut)
  if isinstance(cut, (list, tuple)) and all(
      isinstance(c, (str, numbers.Integral)) and not isinstance(c, bool) for c in cut):
    return parse_cut(",".join(str(c) for c in cut)) if cut else cut
  if isinstance(cut, np.integer):
    return int(cut)
  return cut


@dataclasses.dataclass(frozen=True)
class Config:
  # The docstring is generated from the fields' metadata: see _docstring.
  algorithm: str = _opt(
      "sflv1", "the training scheme: centralized (one model, pooled data), fl (FedAvg), sl "
      "(split learning, one client after another), sflv1 / sflv2 / sflv3 (SplitFed)",
      choices=algorithms.ALGORITHMS)
  client_aggregation: str | None = _opt(
      None, "override the split algorithm's client aggregation: fedavg (average the client "
      "models), relay (hand one model from client to client), none (every client keeps its "
      "own); unset = the algorithm's", choices=("fedavg", "relay", "none"))
  server_side: str | None = _opt(
      None, "override the split algorithm's server side: replicas (one per client, averaged "
      "each round) or shared (one model); unset = the algorithm's", choices=("replicas", "shared"))
  schedule: str | None = _opt(
      None, "override the split algorithm's schedule: synchronous (all clients step together) "
      "or client_major (one client's epoch after another); unset = the algorithm's "
      "(--sflv2-order for sflv2)", choices=("synchronous", "client_major"))
  model: str = _opt("lenet", "the network (the paper's models)", choices=models.MODELS)
  cut: int | str | None = _opt(
      None, "where the model is split: the number of client-side blocks (2), the last client "
      "block's name (conv2), or two cuts for a U-shaped split (1,4 or conv1,fc2: client head "
      "blocks [0, C1), server [C1, C2), client tail [C2, end)); unset = the model's paper cut",
      type=parse_cut, metavar="CUT")
  norm: str | None = _opt(
      None, "normalisation layers: batch, group or none (no normalisation); unset = the "
      "model's own", choices=models.NORMS)
  dropout: float = _opt(0.0, "dropout rate inside the paper models' classifier, in [0, 1)")
  conv_lowering: str = _opt(
      "auto", "how convolutions are computed on CPU (speed and float rounding only): auto "
      "(a fixed per-layer rule), autotune (each distinct convolution timed once per machine, "
      "choices cached in $SFLJAX_CONV_CACHE or ~/.cache/sfljax/conv_lowerings.json and written "
      "to summary.json), or one lowering for all: xla, patches, taps",
      choices=("auto", "autotune", "xla", "patches", "taps"))
  dataset: str = _opt("digits", "the dataset", choices=data.DATASETS)
  data_dir: str | None = _opt(None, "folder holding the dataset's files (digits ships with "
                                    "sfljax and takes none)", metavar="DIR")
  clients: int = _opt(5, "number of clients K")
  rounds: int = _opt(20, "global epochs")
  local_epochs: int = _opt(1, "passes over its data a client makes per round")
  batch_size: int = _opt(32, "samples per client batch")
  optimizer: str = _opt("adam", "the optimizer of every model", choices=optimizers.OPTIMIZERS)
  client_optimizer: str | None = _opt(
      None, "the client models' optimizer; unset = --optimizer", choices=optimizers.OPTIMIZERS)
  server_optimizer: str | None = _opt(
      None, "the server models' optimizer; unset = --optimizer", choices=optimizers.OPTIMIZERS)
  lr: float = _opt(1e-3, "learning rate (the schedule's initial value)")
  lr_schedule: str = _opt(
      "constant", "learning-rate schedule over the run: constant; cosine (decays to 0); "
      "step (x0.1 at 50% and again at 75% of the run)", choices=optimizers.SCHEDULES)
  momentum: float = _opt(0.0, "sgd's momentum, in [0, 1); adam and adamw take none")
  weight_decay: float = _opt(
      0.0, "weight decay >= 0: decoupled for adamw, coupled L2 for adam and sgd")
  loss: str = _opt("cross_entropy", "the training loss", choices=("cross_entropy",))
  label_smoothing: float = _opt(0.0, "label smoothing of the cross-entropy, in [0, 1)")
  optimizer_state: str = _opt(
      "persistent", "persistent: one optimizer state per model for the whole run; "
      "reference: re-created like the official code (schedules keep their position)",
      choices=tuple(algorithms.OPTIMIZER_POLICIES))
  sflv2_order: str = _opt(
      "paper", "paper: random client order per step; client: one client's epoch after "
      "another", choices=("paper", "client"))
  partition: str = _opt("iid", "how the training set splits among clients",
                        choices=data.PARTITIONS)
  alpha: float = _opt(0.5, "dirichlet partition: concentration, a finite number > 0 (small = "
                           "strong label skew)")
  shards_per_client: int = _opt(2, "shards partition: label-sorted shards per client")
  classes_per_client: int = _opt(2, "classes partition: labels per client")
  min_client_size: int = _opt(1, "smallest number of samples a client may hold")
  seed: int = _opt(0, "seed of the data split, partition, batches and initialisation, from 0 "
                      "to 2**31 - 1")
  augment: bool = _opt(True, "the dataset's train augmentation, if it has one (HAM10000); "
                             "--no-augment skips it")
  strategy: str = _opt("auto", "how the client axis runs: vmap, or sequential inside the "
                               "program", choices=execution.STRATEGIES)
  step_loop: str = _opt("auto", "scan: one compiled round; python: a loop over one compiled "
                                "step", choices=execution.STEP_LOOPS)
  eval_batch_size: int = _opt(512, "test samples per evaluation batch")
  client_fraction: float = _opt(
      1.0, "fraction of clients taking part in each round, in (0, 1] (seeded sampling of "
      "max(1, round(fraction * clients)); shapes stay fixed, so sampling never recompiles)")
  client_block: int | None = _opt(
      None, "at most this many clients in flight at once: a step runs block by block, each "
      "block's forward, server and backward before the next (bounds memory; same result; "
      "not with several devices)")
  precision: str = _opt("fp32", "bf16: bfloat16 compute with float32 master weights (for "
                                "accelerators)", choices=tuple(split.PRECISIONS))
  devices: int | None = _opt(
      None, "split the clients over this many devices (clients must divide evenly); unset = "
      "one device, or all devices of a multi-process run")
  dropout_rate: float = _opt(
      0.0, "client faults: the probability that a participant fails in a round (seeded per "
      "round); the round completes with the clients that reported, FedAvg re-weighted over "
      "them", metavar="P")
  dropout_point: str = _opt(
      "after_forward", "where a failing client stops: after_forward (mid-round: after the "
      "forward pass of a seeded step; the server keeps what it learned from the batches it "
      "received) or before_upload (trains the whole round, its model never reaches the fed "
      "server)", choices=("after_forward", "before_upload"))
  on_nonfinite: str = _opt(
      "stop", "a NaN/Inf in a loss, gradient or parameter: stop (end the run with one line, "
      "exit 3, the last good checkpoint kept) or skip (drop that client's update for the "
      "round, logged as nonfinite_clients)", choices=("stop", "skip"))

  dp_clip: float | None = _opt(
      None, "client-side DP-SGD: clip every example's client-side gradient (FL/centralized: "
      "whole-model gradient) to this L2 norm C; turns DP-SGD on (with --dp-noise or "
      "--dp-epsilon); batches are then Poisson-sampled with rate batch/n_k", metavar="C")
  dp_noise: float | None = _opt(
      None, "DP-SGD's noise multiplier sigma: N(0, (sigma C)^2) added to the sum of clipped "
      "gradients once per step (needs --dp-clip; or give --dp-epsilon instead)",
      metavar="SIGMA")
  dp_epsilon: float | None = _opt(
      None, "DP-SGD's target epsilon for the configured rounds: without --dp-noise the noise "
      "multiplier is calibrated before training (for the worst-off client: the largest "
      "sampling rate) and written to config.json as --dp-noise; with it, the run checks that "
      "the noise reaches the target (needs --dp-clip)", metavar="EPS")
  dp_delta: float = _opt(1e-5, "DP-SGD's delta: epsilon is reported at it; must be below "
                               "1/n_k for every client", metavar="DELTA")
  dp_accountant: str = _opt("rdp", "DP-SGD's accountant (dp-accounting): rdp (Renyi DP) or "
                                   "pld (privacy loss distributions, tighter, slower)",
                            choices=("rdp", "pld"))
  pixeldp_epsilon: float | None = _opt(
      None, "PixelDP noise layer in the client-side model with this budget epsilon' (noise "
      "scale sensitivity/epsilon'); unset = no noise layer", metavar="EPS")
  pixeldp_layer: int | str | None = _opt(
      None, "the PixelDP noise layer goes after this block (a count of blocks, 1 = after the "
      "first, or a block name); must be on the client side of the cut; default 1",
      type=parse_cut, metavar="BLOCK")
  pixeldp_mechanism: str = _opt("laplace", "PixelDP's noise: laplace (L1 sensitivity) or "
                                           "gaussian (L2 sensitivity, needs --pixeldp-delta)",
                                choices=("laplace", "gaussian"))
  pixeldp_delta: float | None = _opt(None, "PixelDP's delta for the gaussian mechanism",
                                     metavar="DELTA")
  pixeldp_draws: int | None = _opt(
      None, "PixelDP: noise draws averaged per test prediction; unset = PixelDP's default",
      metavar="N")

  leakage: bool = _opt(
      False, "measure what the server can learn from the cut (sfljax.leakage): every round the "
      "distance correlation between test inputs and their smashed data and a label attack on "
      "the cut gradients the server sees; model inversion by a decoder the server trains on "
      "held-out training data (the last round, or every --leakage-inversion-every rounds); "
      "metrics leak_*; split algorithms only")
  leakage_holdout: float = _opt(
      0.1, "with --leakage: the fraction of the training set no client trains on (the server's "
      "auxiliary data for inversion), drawn per seed", metavar="F")
  leakage_aux: int | None = _opt(
      None, "with --leakage: how many of the held-out samples the inversion decoder trains on; "
      "unset = all of them", metavar="N")
  leakage_probe: int | None = _opt(
      None, "with --leakage: test samples the measures run on (the first N of the test set); "
      "unset = 512, or the whole test set when it is smaller", metavar="N")
  leakage_inversion_every: int = _opt(
      0, "with --leakage: train the inversion decoder every N rounds; 0 = the last round only",
      metavar="N")
  leakage_decoder_steps: int = _opt(
      500, "with --leakage: the inversion decoder's Adam steps (batch 64)", metavar="N")
  nopeek_weight: float = _opt(
      0.0, "NoPeek defence: add this weight times the distance correlation between each client "
      "batch's inputs and smashed data to the client's loss (split algorithms; not with "
      "DP-SGD); 0 = off", metavar="W")

  def __post_init__(self):
    object.__setattr__(self, "cut", _normalize_cut(self.cut))

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "Config":
    """A Config from a JSON-style dict (e.g. an experiment file's ``"config"``);
    missing keys keep their defaults. An unknown key raises :class:`ConfigError`
    naming it. Like the constructor, it does not validate: call :meth:`validate`."""
    if not isinstance(values, Mapping):
      raise TypeError(f"Config.from_dict takes a dict, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    for key in values:
      if key not in known:
        raise ConfigError(str(key), f"unknown setting {key!r}: the settings are "
                                    f"{', '.join(f.name for f in dataclasses.fields(cls))}")
    return cls(**values)

  def to_dict(self) -> dict[str, Any]:
    """The fields as a JSON-ready dict; :meth:`from_dict` reads it back."""
    return dataclasses.asdict(self)

  def validate(self) -> "Config":
    """Returns the config, or raises :class:`ConfigError` naming the field
    (``.field``) and its flag (``.flag``) for a setting that cannot run."""
    for f in dataclasses.fields(self):
      choices = f.metadata.get("choices")
      value = getattr(self, f.name)
      if choices is not None and not (value is None and f.default is None) and (
          not isinstance(value, str) or value not in choices):
        raise ConfigError(f.name, f"unknown value {value!r}: choose one of {', '.join(choices)}")
    for name in ("clients", "rounds", "local_epochs", "batch_size", "eval_batch_size"):
      _positive_int(name, getattr(self, name))
    for name in ("client_block", "devices"):
      if getattr(self, name) is not None:
        _positive_int(name, getattr(self, name))
    for name in ("shards_per_client", "classes_per_client", "min_client_size", "seed"):
      if not _is_int(getattr(self, name)):
        raise ConfigError(name, f"must be an integer, got {getattr(self, name)!r}")
    if not 0 <= self.seed <= MAX_SEED:
      raise ConfigError("seed", f"must be an integer from 0 to {MAX_SEED} (2**31 - 1), "
                                f"got {self.seed}")
    if self.data_dir is not None:
      if not isinstance(self.data_dir, str):
        raise ConfigError("data_dir", f"must be a path, got {self.data_dir!r}")
      if not self.data_dir.strip():
        raise ConfigError("data_dir", "empty path: give the dataset's folder or drop "
                                      f"{_flag_of('data_dir')}")
      if self.dataset in data.EMBEDDED_DATASETS:
        raise ConfigError("data_dir", f"{self.dataset} ships with sfljax; drop "
                                      f"{_flag_of('data_dir')}")
    if not isinstance(self.augment, (bool, np.bool_)):
      raise ConfigError("augment", f"must be True or False, got {self.augment!r}")
    if not (_is_real(self.lr) and self.lr > 0):
      raise ConfigError("lr", f"must be a positive number, got {self.lr!r}")
    for name, low, high in (("momentum", 0, 1), ("label_smoothing", 0, 1), ("dropout", 0, 1)):
      value = getattr(self, name)
      if not (_is_real(value) and low <= value < high):
        raise ConfigError(name, f"must be in [{low}, {high}), got {value!r}")
    if not (_is_real(self.weight_decay) and self.weight_decay >= 0):
      raise ConfigError("weight_decay", f"must be a number >= 0, got {self.weight_decay!r}")
    # Checked whatever the partition: a bad alpha must not wait for --partition dirichlet.
    if not (_is_real(self.alpha) and self.alpha > 0):
      raise ConfigError("alpha", f"must be a positive finite number, got {self.alpha!r}")
    if not (_is_real(self.dropout_rate) and 0 <= self.dropout_rate <= 1):
      raise ConfigError("dropout_rate", f"must be in [0, 1], got {self.dropout_rate!r}")
    if not (_is_real(self.client_fraction) and 0 < self.client_fraction <= 1):
      raise ConfigError("client_fraction", f"must be in (0, 1], got {self.client_fraction!r}")
    if self.momentum:
      for side in ("client", "server"):
        name = getattr(self, f"{side}_optimizer") or self.optimizer
        if name != "sgd":
          given = f"{side}_optimizer" if getattr(self, f"{side}_optimizer") else "optimizer"
          raise ConfigError("momentum", f"only sgd takes a momentum, but the {side} optimizer "
                                        f"is {name} ({_flag_of(given)})")
    self._check_cut()
    overrides = [n for n in ("client_aggregation", "server_side", "schedule")
                 if getattr(self, n) is not None]
    if overrides and self.algorithm in WHOLE_MODEL_ALGORITHMS:
      raise ConfigError(overrides[0], f"{self.algorithm} is not a split algorithm: drop "
                                      f"{_flag_of(overrides[0])} or pick sl/sflv1/sflv2/sflv3")
    if self.client_block is not None and self.devices is not None and self.devices > 1:
      raise ConfigError("client_block", f"client blocks cannot be combined with "
                                        f"{self.devices} devices ({_flag_of('devices')}): "
                                        "drop one of them")
    if self.client_fraction < 1 and self.algorithm == "centralized":
      raise ConfigError("client_fraction", "centralized training has one client: use 1")
    self._check_privacy()
    self._check_leakage()
    return self

  @property
  def dp(self) -> bool:
    """Whether client-side DP-SGD is on (``dp_clip`` given)."""
    return self.dp_clip is not None

  def _check_privacy(self) -> None:
    """The DP-SGD and PixelDP settings on their own (the data's sizes: the experiment)."""
    if self.dp_clip is not None and not (_is_real(self.dp_clip) and self.dp_clip > 0):
      raise ConfigError("dp_clip", f"must be a positive number, got {self.dp_clip!r}")
    if self.dp_noise is not None and not (_is_real(self.dp_noise) and self.dp_noise >= 0):
      raise ConfigError("dp_noise", f"must be a number >= 0, got {self.dp_noise!r}")
    if self.dp_epsilon is not None and not (_is_real(self.dp_epsilon) and self.dp_epsilon > 0):
      raise ConfigError("dp_epsilon", f"must be a positive number, got {self.dp_epsilon!r}")
    if not (_is_real(self.dp_delta) and 0 < self.dp_delta < 1):
      raise ConfigError("dp_delta", f"must be in (0, 1), got {self.dp_delta!r}")
    given = [n for n in ("dp_noise", "dp_epsilon") if getattr(self, n) is not None]
    if self.dp_clip is None and given:
      raise ConfigError(given[0], f"DP-SGD needs a clipping norm: add {_flag_of('dp_clip')} C")
    if self.dp_clip is not None and not given:
      raise ConfigError("dp_clip", f"give the noise: {_flag_of('dp_noise')} SIGMA, or "
                                   f"{_flag_of('dp_epsilon')} EPS to calibrate it")
    if self.dp and self.norm == "batch":
      raise ConfigError("norm", "DP-SGD needs per-example gradients, which BatchNorm mixes "
                                "across the batch: use --norm group or none")
    if self.dp and self.on_nonfinite == "skip":
      raise ConfigError("on_nonfinite", "with DP-SGD a dropped step would depend on the data "
                                        "(not accounted): use --on-nonfinite stop")
    pix = [n for n in ("pixeldp_layer", "pixeldp_delta", "pixeldp_draws")
           if getattr(self, n) is not None]
    if self.pixeldp_epsilon is None:
      if pix or self.pixeldp_mechanism != "laplace":
        raise ConfigError(pix[0] if pix else "pixeldp_mechanism",
                          f"needs the noise layer's budget: add {_flag_of('pixeldp_epsilon')}")
      return
    if not (_is_real(self.pixeldp_epsilon) and self.pixeldp_epsilon > 0):
      raise ConfigError("pixeldp_epsilon", f"must be a positive number, got "
                                           f"{self.pixeldp_epsilon!r}")
    if self.pixeldp_mechanism == "gaussian":
      if self.pixeldp_delta is None:
        raise ConfigError("pixeldp_mechanism", f"gaussian needs {_flag_of('pixeldp_delta')}")
      if not (_is_real(self.pixeldp_delta) and 0 < self.pixeldp_delta < 1):
        raise ConfigError("pixeldp_delta", f"must be in (0, 1), got {self.pixeldp_delta!r}")
    if self.pixeldp_draws is not None:
      _positive_int("pixeldp_draws", self.pixeldp_draws)
    if self.pixeldp_layer is not None and _is_int(self.pixeldp_layer) and self.pixeldp_layer < 1:
      raise ConfigError("pixeldp_layer", f"must be a block count >= 1 or a block name, got "
                                         f"{self.pixeldp_layer!r}")
    if self.algorithm in WHOLE_MODEL_ALGORITHMS:
      raise ConfigError("pixeldp_epsilon", f"the noise layer protects the smashed data; "
                                           f"{self.algorithm} has no cut")

  def _check_leakage(self) -> None:
    """The leakage measures' and NoPeek's settings on their own (the data's sizes: the
    experiment)."""
    if not isinstance(self.leakage, (bool, np.bool_)):
      raise ConfigError("leakage", f"must be True or False, got {self.leakage!r}")
    if not (_is_real(self.nopeek_weight) and self.nopeek_weight >= 0):
      raise ConfigError("nopeek_weight", f"must be a number >= 0, got {self.nopeek_weight!r}")
    if self.nopeek_weight > 0:
      if self.algorithm in WHOLE_MODEL_ALGORITHMS:
        raise ConfigError("nopeek_weight", f"NoPeek decorrelates the smashed data; "
                                           f"{self.algorithm} has no cut")
      if self.dp:
        raise ConfigError("nopeek_weight", "NoPeek's loss mixes the examples of a batch, so "
                                           "DP-SGD's per-example clipping would not bound it: "
                                           "drop --nopeek-weight or --dp-clip")
    defaults = {f.name: f.default for f in dataclasses.fields(self)}
    tuned = [n for n in ("leakage_holdout", "leakage_aux", "leakage_probe",
                         "leakage_inversion_every", "leakage_decoder_steps")
             if getattr(self, n) != defaults[n]]
    if not self.leakage:
      if tuned:
        raise ConfigError(tuned[0], f"tunes the leakage measures: add {_flag_of('leakage')}")
      return
    if self.algorithm in WHOLE_MODEL_ALGORITHMS:
      raise ConfigError("leakage", f"the measures look at what crosses the cut; "
                                   f"{self.algorithm} has no cut: use a split algorithm")
    if not (_is_real(self.leakage_holdout) and 0 < self.leakage_holdout < 1):
      raise ConfigError("leakage_holdout", f"must be a fraction in (0, 1), got "
                                           f"{self.leakage_holdout!r}")
    if self.leakage_aux is not None:
      _positive_int("leakage_aux", self.leakage_aux)
    if self.leakage_probe is not None:
      _positive_int("leakage_probe", self.leakage_probe)
    _positive_int("leakage_decoder_steps", self.leakage_decoder_steps)
    if not _is_int(self.leakage_inversion_every) or self.leakage_inversion_every < 0:
      raise ConfigError("leakage_inversion_every", f"must be an integer >= 0, got "
                                                   f"{self.leakage_inversion_every!r}")

  def _check_cut(self) -> None:
    """The cut's syntax; the model resolves it (``SplitModel.resolve_cuts``)."""
    cut = self.cut
    if cut is None:
      return
    if self.algorithm in WHOLE_MODEL_ALGORITHMS:
      raise ConfigError("cut", f"{self.algorithm} has no cut")
    if _is_int(cut):
      if cut <= 0:
        raise ConfigError("cut", f"must be a positive integer, got {cut!r}")
      return
    if not isinstance(cut, str):
      raise ConfigError("cut", "must be an int, a block name or two comma-separated cuts, "
                               f"got {cut!r}")
    items = [item.strip() for item in cut.split(",")]
    if not cut.strip() or "" in items:
      raise ConfigError("cut", f"empty cut in {cut!r}: give an int, a block name, or two "
                               "separated by a comma")
    if len(items) > 2:
      raise ConfigError("cut", f"at most two cuts (client/server, or U-shaped), got "
                               f"{len(items)}: {cut}")
    ints = [int(item) for item in items if _INT_TEXT.fullmatch(item)]
    if any(i <= 0 for i in ints):
      raise ConfigError("cut", f"cuts must be positive, got {cut}")
    if len(ints) == 2 and ints[0] >= ints[1]:
      raise ConfigError("cut", f"cuts must increase, got {cut}")

  def client_partition(self, labels: np.ndarray) -> list[np.ndarray]:
    """The config's partition of ``labels``; a setting that cannot be met
    raises :class:`ConfigError` naming the flag to change (the flag the
    message is about, e.g. ``--min-client-size``, not always ``--partition``)."""
    try:
      return data.partition(labels, self.clients, self.partition, seed=self.seed,
                            alpha=self.alpha, shards_per_client=self.shards_per_client,
                            classes_per_client=self.classes_per_client,
                            min_client_size=self.min_client_size)
    except partitions.PartitionError as e:
      flag = e.flag or "--partition"
      msg = str(e)
      if msg.endswith(f" ({flag})"):  # The prefix names it already.
        msg = msg[:-len(f" ({flag})")]
      raise ConfigError(flag, msg) from None


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value) -> bool:
  return (isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
          and math.isfinite(value))


def _positive_int(name: str, value) -> None:
  if not _is_int(value) or value <= 0:
    raise ConfigError(name, f"must be a positive integer, got {value!r}")


def _field(name: str) -> dataclasses.Field | None:
  for f in dataclasses.fields(Config):
    if f.name == name:
      return f
  return None


def _flag_of(f: dataclasses.Field | str) -> str:
  """The CLI flag of a field (a Field or its name)."""
  f = _field(f) if isinstance(f, str) else f
  if "flag" in f.metadata:
    return f.metadata["flag"]
  negated = f.default is True
  return ("--no-" if negated else "--") + f.name.replace("_", "-")


def _names(name: str) -> tuple[str, str | None]:
  """(flag, field) from either spelling; field None for a CLI-only flag."""
  if name.startswith("--"):
    for f in dataclasses.fields(Config):
      if _flag_of(f) == name:
        return name, f.name
    return name, None
  return (_flag_of(name) if _field(name) else "--" + name.replace("_", "-")), name


def flag(name: str) -> str:
  """The CLI flag of the field ``name``: ``flag("lr") == "--lr"``,
  ``flag("augment") == "--no-augment"``."""
  if _field(name) is None:
    raise ValueError(f"name: {name!r} is not a Config field")
  return _flag_of(name)


class Option(NamedTuple):
  """A Config field as a command-line option.

  ``type`` is None for a bool field: its flag takes no value and sets the
  field to ``not default``."""
  field: str
  flag: str
  type: Callable[[str], Any] | None
  default: Any
  choices: tuple | None
  help: str
  metavar: str | None


def _value_type(f: dataclasses.Field) -> Callable[[str], Any] | None:
  if "type" in f.metadata:
    return f.metadata["type"]
  hint = typing.get_type_hints(Config)[f.name]
  kinds = [t for t in typing.get_args(hint) or (hint,) if t is not type(None)]
  if kinds == [bool]:
    return None
  if len(kinds) != 1 or kinds[0] not in (int, float, str):
    raise TypeError(f"Config.{f.name}: give its CLI parser as metadata 'type'")
  return kinds[0]


def options(names: Iterable[str] | None = None) -> tuple[Option, ...]:
  """The command-line options of the Config fields ``names`` (default: every
  field with a flag), in field order."""
  fields = [f for f in dataclasses.fields(Config) if f.metadata.get("cli", True)]
  if names is not None:
    wanted = set(names)
    unknown = wanted - {f.name for f in fields}
    if unknown:
      raise ValueError(f"names: not Config fields with a flag: {', '.join(sorted(unknown))}")
    fields = [f for f in fields if f.name in wanted]
  return tuple(Option(f.name, _flag_of(f), _value_type(f), f.default,
                      f.metadata.get("choices"), f.metadata["help"], f.metadata.get("metavar"))
               for f in fields)


def _docstring() -> str:
  lines = ["Everything that determines a run. Same config + same machine -> same numbers.",
           "",
           "Build one with keyword arguments, :meth:`from_dict` (a JSON-style dict) or the",
           "``sfljax train`` flags; :meth:`validate` raises :class:`ConfigError` naming the",
           "field. Each field: ``name: type = default``, its CLI flag and allowed values.",
           ""]
  for f in dataclasses.fields(Config):
    choices = f.metadata.get("choices")
    allowed = f"; one of {', '.join(choices)}" if choices else ""
    if choices and f.default is None:
      allowed += ", or None"
    where = _flag_of(f) if f.metadata.get("cli", True) else "no CLI flag"
    lines.append(f"  {f.name}: {f.type} = {f.default!r}")
    lines.append(textwrap.fill(f"{f.metadata['help']} [{where}{allowed}]", width=88,
                               initial_indent=" " * 6, subsequent_indent=" " * 6,
                               break_on_hyphens=False))
  return "\n".join(lines) + "\n"


Config.__doc__ = _docstring()
