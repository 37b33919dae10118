"""Communication accounting from the actual arrays' shapes and dtypes.

Per round and client k (n_k samples, E local epochs), a split algorithm
sends the server ``E * n_k`` smashed-data rows and labels and receives as
many smashed-data gradients, and the client-side model travels once each
way (download at the round's start, upload at its end). FL moves the whole
model both ways. This is the paper's Table 2: per client (2p/K)q + 2|W^C| for
SL/SFL and 2|W| for FL, with q the smashed size of one sample.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import numpy as np


def tree_bytes(tree) -> int:
  """Bytes of all leaves (arrays or ShapeDtypeStructs)."""
  return int(sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                 for x in jax.tree.leaves(tree)))


@dataclasses.dataclass(frozen=True)
class Traffic:
  """Bytes moved in one round, summed over clients, by kind."""
  smashed: int = 0
  smashed_grad: int = 0
  labels: int = 0
  model_up: int = 0
  model_down: int = 0

  @property
  def client_to_server(self) -> int:
    return self.smashed + self.labels + self.model_up

  @property
  def server_to_client(self) -> int:
    return self.smashed_grad + self.model_down

  def as_dict(self) -> dict[str, int]:
    return {"bytes_client_to_server": self.client_to_server,
            "bytes_server_to_client": self.server_to_client,
            "bytes_smashed": self.smashed,
            "bytes_smashed_grad": self.smashed_grad,
            "bytes_labels": self.labels,
            "bytes_model_up": self.model_up,
            "bytes_model_down": self.model_down}


def split_traffic(counts, local_epochs: int, smashed_bytes_per_sample: int,
                  label_bytes_per_sample: int, client_model_bytes: int) -> Traffic:
  """SL / SFLV1 / SFLV2: smashed data and its gradient per sample, client model once each way."""
  samples = int(np.sum(counts)) * local_epochs
  k = len(counts)
  return Traffic(smashed=samples * smashed_bytes_per_sample,
                 smashed_grad=samples * smashed_bytes_per_sample,
                 labels=samples * label_bytes_per_sample,
                 model_up=k * client_model_bytes,
                 model_down=k * client_model_bytes)


def fl_traffic(num_clients: int, model_bytes: int) -> Traffic:
  """FL: the whole model down and up once per client and round."""
  return Traffic(model_up=num_clients * model_bytes,
                 model_down=num_clients * model_bytes)
