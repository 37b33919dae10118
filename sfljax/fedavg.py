"""Federated averaging and small pytree helpers over a leading client axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_average(stacked, weights):
  """FedAvg: ``sum_k (n_k / n) * tree_k`` over the leading client axis.

  ``stacked`` is any pytree whose leaves carry a leading axis of K clients
  (parameters, BatchNorm statistics, ...); ``weights`` holds the K sample
  counts n_k (or any non-negative weights). Each leaf keeps its dtype.
  """
  w = jnp.asarray(weights, jnp.float32)
  w = w / jnp.sum(w)

  def avg(x):
    return jnp.tensordot(w.astype(x.dtype), x, axes=1)

  return jax.tree.map(avg, stacked)


def broadcast(tree, num_clients: int):
  """Stacks K copies of ``tree`` along a new leading client axis."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num_clients,) + x.shape), tree)


def select(pred, on_true, on_false):
  """Leafwise ``where(pred, a, b)`` for a scalar predicate."""
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), on_true, on_false)


def index(tree, i):
  """Client ``i`` (may be traced) of a stacked pytree."""
  return jax.tree.map(lambda x: x[i], tree)


def update_index(tree, i, value):
  """Writes ``value`` as client ``i`` of a stacked pytree."""
  return jax.tree.map(lambda x, v: x.at[i].set(v), tree, value)
