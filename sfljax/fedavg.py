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


def reported_average(stacked, weights, reported, fallback):
  """FedAvg over the participants that reported: weights ``n_k * reported_k``,
  normalised over the reporters.

  ``reported``: [K] bool. A non-reporter's rows do not enter the sum at all
  (a NaN there does not reach the average). When no participant reports
  (the weights sum to 0) the result is ``fallback`` (a tree shaped like one
  client's: the model the round started from), never 0/0. With every
  participant reporting it equals :func:`weighted_average` bit for bit.
  """
  reported = jnp.asarray(reported, bool)
  w = jnp.asarray(weights, jnp.float32) * reported.astype(jnp.float32)
  total = jnp.sum(w)
  anyone = total > 0
  w = w / jnp.where(anyone, total, 1.0)

  def avg(x, keep):
    rows = jnp.where(jnp.reshape(reported, reported.shape + (1,) * (x.ndim - 1)), x,
                     jnp.zeros_like(x))
    return jnp.where(anyone, jnp.tensordot(w.astype(x.dtype), rows, axes=1), keep)

  return jax.tree.map(avg, stacked, fallback)


def keep_rows(ok, new, old):
  """Row k of every leaf from ``new`` where ``ok[k]`` ([K] bool), else from ``old``."""
  def pick(a, b):
    return jnp.where(jnp.reshape(ok, ok.shape + (1,) * (a.ndim - 1)), a, b)
  return jax.tree.map(pick, new, old)


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
