"""The exchange between client halves and the server half, via ``jax.vjp``.

One split training step, as in the paper:

1. ``clients_forward``: every client runs its half forward and gets the
   smashed data plus a closure (the client's ``jax.vjp``) that later turns the
   smashed-data cotangent into its parameter gradients. Only the smashed data
   (and the labels) go to the server.
2. ``server_forward_backward``: the server runs its half and the loss, and
   computes both its own gradients and the cotangent of the smashed data.
3. The cotangent goes back; the client's closure gives the client gradients.

No whole-model gradient is taken anywhere: the two halves meet only through
the smashed data and its cotangent.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sfljax import fedavg
from sfljax.execution import ClientExecutor
from sfljax.models import Sequential, apply_part

Variables = dict[str, Any]


def _with_params(variables: Variables, params) -> Variables:
  return {**variables, "params": params}


def _state(variables: Variables) -> Variables:
  """The non-trainable collections of a part (e.g. ``batch_stats``)."""
  return {k: v for k, v in variables.items() if k != "params"}


class BatchStats(NamedTuple):
  """Sums over a batch's real samples (padding excluded)."""
  loss_sum: jax.Array
  correct: jax.Array
  count: jax.Array

  @classmethod
  def zeros(cls) -> "BatchStats":
    z = jnp.zeros((), jnp.float32)
    return cls(z, z, z)

  def __add__(self, other):  # type: ignore[override]
    return BatchStats(*(a + b for a, b in zip(self, other)))


def masked_loss(logits, labels, mask):
  """Mean softmax cross-entropy over real samples, and the batch sums."""
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  w = mask.astype(per_example.dtype)
  loss_sum = jnp.sum(per_example * w)
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) * w)
  count = jnp.sum(w)
  return loss_sum / jnp.maximum(count, 1.0), BatchStats(loss_sum, correct, count)


def _cast_floats(tree, dtype):
  return jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def apply_with_state(module: Sequential, variables: Variables, x, mask, compute_dtype=None):
  """Train-mode forward; returns (output, variables with updated state).

  With ``compute_dtype`` (e.g. ``jnp.bfloat16``: mixed precision) the
  parameters and the input are cast to it for the computation only: the
  stored (master) parameters and BatchNorm statistics keep their own dtype,
  and gradients reach the master parameters through the cast, in their dtype.

  A batch with no real sample (a padded step) stays finite (see
  :mod:`sfljax.models`); such a step's results are discarded by the caller.
  """
  run_vars = variables
  if compute_dtype is not None:
    run_vars = {**variables, "params": _cast_floats(variables["params"], compute_dtype)}
    x = _cast_floats(x, compute_dtype)
  out, new_stats = apply_part(module, run_vars, x, train=True, mask=mask)
  new_vars = dict(variables)
  if "batch_stats" in variables:
    new_vars["batch_stats"] = jax.tree.map(lambda n, o: n.astype(o.dtype), new_stats,
                                           variables["batch_stats"])
  return out, new_vars


def clients_forward(executor: ClientExecutor, module: Sequential,
                    variables: Variables, x, mask, compute_dtype=None):
  """All clients' forward passes; leaves of every argument lead with K.

  Each client runs ``jax.vjp`` of its own half, so it holds its smashed data
  and its own vjp closure (a pytree of residuals, stacked over clients by the
  executor). Returns ``(smashed, new_variables, backward)`` where ``smashed``
  is ``[K, B, ...]``, ``new_variables`` carries the updated BatchNorm
  statistics and ``backward(d_smashed) -> grads`` applies every client's
  closure to its cotangent. With ``compute_dtype`` the smashed data (and the
  cotangent) are in that dtype.
  """
  def one(params, state, xb, mb):
    def forward(p):
      out, new_vars = apply_with_state(module, _with_params(state, p), xb, mb, compute_dtype)
      return out, _state(new_vars)
    smashed, vjp_fn, new_state = jax.vjp(forward, params, has_aux=True)
    return smashed, vjp_fn, new_state

  smashed, vjp_fns, new_state = executor.map(
      one, variables["params"], _state(variables), x, mask)

  def backward(d_smashed):
    return executor.map(lambda vjp_fn, d: vjp_fn(d)[0], vjp_fns, d_smashed)

  return smashed, _with_params(new_state, variables["params"]), backward


def server_forward_backward(module: Sequential, variables: Variables,
                            smashed, labels, mask, compute_dtype=None):
  """Server half forward + loss + backward for one client's smashed data.

  Returns ``(grads, d_smashed, new_variables, stats)``: the server's parameter
  gradients, the cotangent sent back to the client, the server variables with
  updated BatchNorm statistics, and the batch sums.
  """
  def loss_fn(params, a):
    logits, new_vars = apply_with_state(module, _with_params(variables, params), a, mask,
                                        compute_dtype)
    loss, stats = masked_loss(logits.astype(jnp.float32), labels, mask)
    return loss, (new_vars, stats)

  (_, (new_vars, stats)), (grads, d_smashed) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(variables["params"], smashed)
  return grads, d_smashed, new_vars, stats


def full_forward_backward(module: Sequential, variables: Variables, x, labels, mask,
                          compute_dtype=None):
  """Whole-model gradient, for the non-split baselines (FL, centralized)."""
  def loss_fn(params):
    logits, new_vars = apply_with_state(module, _with_params(variables, params), x, mask,
                                        compute_dtype)
    loss, stats = masked_loss(logits.astype(jnp.float32), labels, mask)
    return loss, (new_vars, stats)

  (_, (new_vars, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      variables["params"])
  return grads, new_vars, stats


def optimizer_step(opt: optax.GradientTransformation, variables: Variables,
                   opt_state, grads, *, reset: bool = False):
  """One optimizer update of ``variables['params']``.

  With ``reset`` the optimizer state is created afresh before the update (the
  official code's per-batch server optimizer).
  """
  params = variables["params"]
  if reset:
    opt_state = opt.init(params)
  updates, new_opt_state = opt.update(grads, opt_state, params)
  new_vars = _with_params(variables, optax.apply_updates(params, updates))
  return new_vars, new_opt_state


def keep_if(active, new, old):
  """``new`` where ``active`` (a scalar) else ``old``, leafwise."""
  return fedavg.select(active, new, old)


def make_optimizer(name: str, lr: float) -> optax.GradientTransformation:
  """The optimizers offered by the CLI."""
  if name == "adam":
    return optax.adam(lr)
  if name == "sgd":
    return optax.sgd(lr)
  raise ValueError(f"unknown optimizer {name!r}: choose one of adam, sgd")


OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")

PRECISIONS: dict[str, Any] = {"fp32": None, "bf16": jnp.bfloat16}
"""Compute dtypes: ``fp32`` computes in the parameters' dtype; ``bf16`` casts
parameters and inputs to bfloat16 for the forward/backward passes while the
master parameters, optimizer states and BatchNorm statistics stay float32."""
