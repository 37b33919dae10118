"""sfljax: SplitFed learning (SL, SFLV1, SFLV2, FL, centralized) in JAX/Flax.

The curated public surface; the modules behind it are importable too.
"""

from sfljax.algorithms import (ALGORITHMS, PERSISTENT, REFERENCE, FedAvg, OptimizerPolicy,
                               RoundInputs, SplitFed)
from sfljax.comm import Traffic
from sfljax.data import ClientData, Dataset, batch_schedule, load_dataset, partition
from sfljax.execution import ClientExecutor
from sfljax.fedavg import weighted_average
from sfljax.models import MODELS, SplitModel, apply_part, get_model
from sfljax.split import clients_forward, server_forward_backward
from sfljax.train import Config, ConfigError, Experiment, RunState, run

__version__ = "0.1.0"

__all__ = [
    "ALGORITHMS", "MODELS", "PERSISTENT", "REFERENCE", "ClientData", "ClientExecutor", "Config",
    "ConfigError", "Dataset", "Experiment", "FedAvg", "OptimizerPolicy", "RoundInputs",
    "RunState", "SplitFed", "SplitModel", "Traffic", "apply_part", "batch_schedule",
    "clients_forward", "get_model", "load_dataset", "partition", "run",
    "server_forward_backward", "weighted_average",
]
