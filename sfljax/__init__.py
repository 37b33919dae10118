"""sfljax: SplitFed learning (SL, SFLV1, SFLV2, SFLV3, U-shaped splits, FL,
centralized) in JAX/Flax.

The curated public surface; the modules behind it are importable too.
"""

from sfljax.algorithms import (ALGORITHMS, COMPOSITIONS, PERSISTENT, REFERENCE, Algorithm,
                               Centralized, FedAvg, OptimizerPolicy, RoundInputs, SplitFed,
                               build, composition)
from sfljax.comm import Traffic
from sfljax.config import Config, ConfigError
from sfljax.data import ClientData, Dataset, batch_schedule, load_dataset, partition
from sfljax.execution import ClientExecutor
from sfljax.fedavg import weighted_average
from sfljax.models import MODELS, SplitModel, apply_part, get_model
from sfljax.optimizers import make_optimizer
from sfljax.sides import (CLIENT_LABELS, CLIENT_MAJOR, FEDAVG, OWN, RELAY, REPLICAS,
                          SERVER_LABELS, SHARED, SYNCHRONOUS, Composition, CompositionError)
from sfljax.split import (clients_forward, cross_entropy, label_smoothing_cross_entropy,
                          server_forward_backward)
from sfljax.state import FLState, SplitState, per_client_mask
from sfljax.train import METRICS, Experiment, RunState, run

__version__ = "0.2.0"

__all__ = [
    "ALGORITHMS", "CLIENT_LABELS", "CLIENT_MAJOR", "COMPOSITIONS", "FEDAVG", "METRICS", "MODELS",
    "OWN", "PERSISTENT", "REFERENCE", "RELAY", "REPLICAS", "SERVER_LABELS", "SHARED",
    "SYNCHRONOUS", "Algorithm", "Centralized", "ClientData", "ClientExecutor", "Composition",
    "CompositionError", "Config", "ConfigError", "Dataset", "Experiment", "FLState", "FedAvg",
    "OptimizerPolicy", "RoundInputs", "RunState", "SplitFed", "SplitModel", "SplitState",
    "Traffic", "apply_part", "batch_schedule", "build", "clients_forward", "composition",
    "cross_entropy", "get_model", "label_smoothing_cross_entropy", "load_dataset",
    "make_optimizer", "partition", "per_client_mask", "run", "server_forward_backward",
    "weighted_average",
]
