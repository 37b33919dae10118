"""Communication accounting from the actual arrays' shapes and dtypes.

Per round and client k (n_k samples, E local epochs), a split algorithm
sends the server ``E * n_k`` smashed-data rows and labels and receives as
many smashed-data gradients, and the client-side model travels once each
way (download at the round's start, upload at its end). FL moves the whole
model both ways. This is the paper's Table 2: per client (2p/K)q + 2|W^C| for
SL/SFL and 2|W| for FL, with q the smashed size of one sample.

A U-shaped split sends no labels; instead the server body's output goes back
to the client's tail and its cotangent comes up again: per client
(2p/K)(q1 + q2) + 2|W^C|, with q1 the head's output per sample, q2 the
body's, and |W^C| the head and tail together.
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
  server_out: int = 0        # U-shaped: the server body's output, to the client's tail
  server_out_grad: int = 0   # U-shaped: its cotangent, back to the server

  @property
  def client_to_server(self) -> int:
    return self.smashed + self.labels + self.model_up + self.server_out_grad

  @property
  def server_to_client(self) -> int:
    return self.smashed_grad + self.model_down + self.server_out

  def as_dict(self) -> dict[str, int]:
    return {"bytes_client_to_server": self.client_to_server,
            "bytes_server_to_client": self.server_to_client,
            "bytes_smashed": self.smashed,
            "bytes_smashed_grad": self.smashed_grad,
            "bytes_labels": self.labels,
            "bytes_model_up": self.model_up,
            "bytes_model_down": self.model_down,
            "bytes_server_out": self.server_out,
            "bytes_server_out_grad": self.server_out_grad}


def split_traffic(counts, local_epochs: int, smashed_bytes_per_sample: int,
                  label_bytes_per_sample: int, client_model_bytes: int, *,
                  server_out_bytes_per_sample: int = 0) -> Traffic:
  """Split algorithms: smashed data and its gradient per sample, client model
  once each way; U-shaped: also the body's output and its gradient per sample."""
  samples = int(np.sum(counts)) * local_epochs
  k = len(counts)
  return Traffic(smashed=samples * smashed_bytes_per_sample,
                 smashed_grad=samples * smashed_bytes_per_sample,
                 labels=samples * label_bytes_per_sample,
                 model_up=k * client_model_bytes,
                 model_down=k * client_model_bytes,
                 server_out=samples * server_out_bytes_per_sample,
                 server_out_grad=samples * server_out_bytes_per_sample)


def fl_traffic(num_clients: int, model_bytes: int) -> Traffic:
  """FL: the whole model down and up once per client and round."""
  return Traffic(model_up=num_clients * model_bytes,
                 model_down=num_clients * model_bytes)
