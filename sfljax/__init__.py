"""sfljax: SplitFed learning (SL, SFLV1, SFLV2, SFLV3, U-shaped splits, FL,
centralized) in JAX/Flax.

The curated public surface; the modules behind it are importable too.
"""

_EXPORTS: dict[str, str] = {
    "ALGORITHMS": "algorithms",
    "Algorithm": "algorithms",
    "CLIENT_LABELS": "sides",
    "CLIENT_MAJOR": "sides",
    "COMPOSITIONS": "algorithms",
    "Centralized": "algorithms",
    "ClientData": "data",
    "ClientExecutor": "execution",
    "Composition": "sides",
    "CompositionError": "sides",
    "Config": "config",
    "ConfigError": "config",
    "Dataset": "data",
    "Experiment": "train",
    "NonFiniteError": "train",
    "load_model": "checkpoint",
    "FEDAVG": "sides",
    "FLState": "state",
    "FedAvg": "algorithms",
    "METRICS": "train",
    "MODELS": "models",
    "OWN": "sides",
    "OptimizerPolicy": "algorithms",
    "PERSISTENT": "algorithms",
    "REFERENCE": "algorithms",
    "RELAY": "sides",
    "REPLICAS": "sides",
    "RoundInputs": "algorithms",
    "RunState": "train",
    "SERVER_LABELS": "sides",
    "SHARED": "sides",
    "SYNCHRONOUS": "sides",
    "SplitFed": "algorithms",
    "SplitModel": "models",
    "SplitState": "state",
    "Traffic": "comm",
    "apply_part": "models",
    "batch_schedule": "data",
    "build": "algorithms",
    "clients_forward": "split",
    "composition": "algorithms",
    "cross_entropy": "split",
    "get_model": "models",
    "label_smoothing_cross_entropy": "split",
    "load_dataset": "data",
    "make_optimizer": "optimizers",
    "partition": "data",
    "per_client_mask": "state",
    "run": "train",
    "server_forward_backward": "split",
    "weighted_average": "fedavg",
}
"""Public name -> the module defining it (imported on first use, so that
``import sfljax`` and the CLI start fast and Ctrl-C at start-up is clean)."""


_MODULES = frozenset({
    "algorithms", "checkpoint", "cli", "comm", "config", "conv", "data", "distributed",
    "execution", "faults", "fedavg", "loaders", "models", "optimizers", "partitions", "report",
    "rundir", "sides", "split", "state", "tensorboard", "train"})
"""Submodules reachable as attributes (``sfljax.checkpoint.load_model``)."""


def __getattr__(name: str):
  import importlib
  module = _EXPORTS.get(name)
  if module is None:
    if name in _MODULES:   # sfljax.checkpoint, sfljax.faults, ...: the submodule itself.
      value = importlib.import_module(f"sfljax.{name}")
      globals()[name] = value
      return value
    raise AttributeError(f"module 'sfljax' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"sfljax.{module}"), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.2.0"

__all__ = [
    "ALGORITHMS", "CLIENT_LABELS", "CLIENT_MAJOR", "COMPOSITIONS", "FEDAVG", "METRICS", "MODELS",
    "OWN", "PERSISTENT", "REFERENCE", "RELAY", "REPLICAS", "SERVER_LABELS", "SHARED",
    "SYNCHRONOUS", "Algorithm", "Centralized", "ClientData", "ClientExecutor", "Composition",
    "CompositionError", "Config", "ConfigError", "Dataset", "Experiment", "FLState", "FedAvg",
    "NonFiniteError", "OptimizerPolicy", "RoundInputs", "RunState", "SplitFed", "SplitModel", "SplitState",
    "Traffic", "apply_part", "batch_schedule", "build", "clients_forward", "composition",
    "cross_entropy", "get_model", "label_smoothing_cross_entropy", "load_dataset", "load_model",
    "make_optimizer", "partition", "per_client_mask", "run", "server_forward_backward",
    "weighted_average",
]
