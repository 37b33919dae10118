"""The exchange between client and server parts, via ``jax.vjp`` closures.

Two-part split (labels on the server), as in the paper:

1. :func:`clients_forward`: every client runs its head forward and keeps a
   closure (its ``jax.vjp``) that later turns the smashed-data cotangent into
   its parameter gradients. Only the smashed data (and the labels) go to the
   server.
2. :func:`server_forward_backward`: the server runs its part and the loss and
   computes its own gradients and the cotangent of the smashed data.
3. The cotangent goes back; the client's closure gives the client gradients.

U-shaped split (labels never leave the client): one step is two exchanges.

1. :func:`clients_forward` of the client head, as above.
2. :func:`server_body_forward`: the server body's forward under ``jax.vjp``
   (no labels, no loss); its output goes back to the client.
3. :func:`client_tail_forward_backward`: the client's tail, the loss and its
   backward: tail gradients and the cotangent of the server body's output,
   which goes to the server.
4. :func:`server_body_backward`: the server's closure gives its gradients and
   the smashed-data cotangent, which goes to the client head's closure.

No whole-model gradient is taken anywhere in the split algorithms: the parts
meet only through activations and their cotangents.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from sfljax import fedavg, optimizers
from sfljax.execution import ClientExecutor
from sfljax.models import Sequential, apply_part

Variables = dict[str, Any]
Loss = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]
"""A loss ``loss(logits, labels, mask) -> scalar``: the mean over the batch's
real samples (``mask`` 1) of a per-sample loss; padded rows must not count."""


def _with_params(variables: Variables, params) -> Variables:
  return {**variables, "params": params}


def _state(variables: Variables) -> Variables:
  """The non-trainable collections of a part (e.g. ``batch_stats``)."""
  return {k: v for k, v in variables.items() if k != "params"}


class BatchStats(NamedTuple):
  """Sums over a batch's real samples (padding excluded).

  ``nonfinite``: int32, how many of a participant's steps were dropped for
  non-finite values (``skip_nonfinite``, see :mod:`sfljax.algorithms`); a
  dropped step's loss, correct count and sample count are not summed. Inside
  a round it may be None (not tracked: skipping is off); a round's stats
  always carry it ([M], zeros when skipping is off).
  """
  loss_sum: jax.Array
  correct: jax.Array
  count: jax.Array
  nonfinite: jax.Array | None = None

  @classmethod
  def zeros(cls, shape=(), nonfinite: bool = True) -> "BatchStats":
    """All zeros; ``nonfinite=False`` leaves the counter out (None)."""
    z = jnp.zeros(shape, jnp.float32)
    return cls(z, z, z, jnp.zeros(shape, jnp.int32) if nonfinite else None)

  def __add__(self, other):  # type: ignore[override]
    return BatchStats(*(b if a is None else a if b is None else a + b
                        for a, b in zip(self, other)))

  def with_nonfinite(self) -> "BatchStats":
    """These stats with a zero ``nonfinite`` counter if they have none."""
    if self.nonfinite is not None:
      return self
    return self._replace(nonfinite=jnp.zeros(jnp.shape(self.count), jnp.int32))

  def dropped(self, ok, active) -> "BatchStats":
    """A step's stats where ``ok`` ([G] or scalar bool: its values were finite)
    is False: sums zeroed, and ``nonfinite`` 1 where it had real samples
    (``active``)."""
    zero = lambda a: jnp.where(ok, a, jnp.zeros_like(a))  # noqa: E731
    return BatchStats(zero(self.loss_sum), zero(self.correct), zero(self.count),
                      (active & ~ok).astype(jnp.int32))


def all_finite(*trees) -> jax.Array:
  """Whether every floating-point leaf of ``trees`` is finite (a scalar bool)."""
  checks = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(trees)
            if jnp.issubdtype(jnp.result_type(a), jnp.inexact)]
  return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def cross_entropy(logits, labels, mask):
  """Mean softmax cross-entropy over the real samples (the default loss)."""
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  w = mask.astype(per_example.dtype)
  return jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), 1.0)


def label_smoothing_cross_entropy(smoothing: float) -> Loss:
  """Cross-entropy against labels smoothed by ``smoothing`` (uniform mass)."""
  if not 0.0 <= smoothing < 1.0:
    raise ValueError(f"smoothing: must be in [0, 1), got {smoothing!r}")

  def loss(logits, labels, mask):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), smoothing)
    per_example = optax.softmax_cross_entropy(logits, targets)
    w = mask.astype(per_example.dtype)
    return jnp.sum(per_example * w) / jnp.maximum(jnp.sum(w), 1.0)

  return loss


def masked_loss(logits, labels, mask, loss: Loss | None = None):
  """``loss`` (default cross-entropy) over real samples, and the batch sums."""
  loss = cross_entropy if loss is None else loss
  value = loss(logits, labels, mask)
  w = mask.astype(jnp.float32)
  count = jnp.sum(w)
  correct = jnp.sum((jnp.argmax(logits, -1) == labels) * w)
  return value, BatchStats(value * count, correct, count)


def merge_parts(*parts: Variables) -> Variables:
  """The union of variables of disjoint blocks, collection by collection."""
  out: dict[str, Any] = {}
  for part in parts:
    for col, tree in part.items():
      out[col] = {**out.get(col, {}), **tree}
  return out


def _cast_floats(tree, dtype):
  return jax.tree.map(
      lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def apply_with_state(module: Sequential, variables: Variables, x, mask, compute_dtype=None,
                     rng=None):
  """Train-mode forward; returns (output, variables with updated state).

  With ``compute_dtype`` (e.g. ``jnp.bfloat16``: mixed precision) the
  parameters and the input are cast to it for the computation only: the
  stored (master) parameters and BatchNorm statistics keep their own dtype,
  and gradients reach the master parameters through the cast, in their dtype.
  ``rng`` is the part's dropout key for this batch (unused by models without
  dropout).

  A batch with no real sample (a padded step) stays finite (see
  :mod:`sfljax.models`); such a step's results are discarded by the caller.
  """
  run_vars = variables
  if compute_dtype is not None:
    run_vars = {**variables, "params": _cast_floats(variables["params"], compute_dtype)}
    x = _cast_floats(x, compute_dtype)
  out, new_stats = apply_part(module, run_vars, x, train=True, mask=mask, rng=rng)
  new_vars = dict(variables)
  if "batch_stats" in variables:
    new_vars["batch_stats"] = jax.tree.map(lambda n, o: n.astype(o.dtype), new_stats,
                                           variables["batch_stats"])
  return out, new_vars


def clients_forward(executor: ClientExecutor, module: Sequential,
                    variables: Variables, x, mask, compute_dtype=None, keys=None):
  """All clients' forward passes; leaves of every argument lead with K.

  Each client runs ``jax.vjp`` of its own part, so it holds its smashed data
  and its own vjp closure (a pytree of residuals, stacked over clients by the
  executor). Returns ``(smashed, new_variables, backward)`` where ``smashed``
  is ``[K, B, ...]``, ``new_variables`` carries the updated BatchNorm
  statistics and ``backward(d_smashed) -> grads`` applies every client's
  closure to its cotangent. ``keys`` ([K] PRNG keys or None) are the clients'
  dropout keys. With ``compute_dtype`` the smashed data (and the cotangent)
  are in that dtype.
  """
  def one(params, state, xb, mb, key):
    def forward(p):
      out, new_vars = apply_with_state(module, _with_params(state, p), xb, mb, compute_dtype,
                                       key)
      return out, _state(new_vars)
    smashed, vjp_fn, new_state = jax.vjp(forward, params, has_aux=True)
    return smashed, vjp_fn, new_state

  if keys is None:
    smashed, vjp_fns, new_state = executor.map(
        lambda p, s, xb, mb: one(p, s, xb, mb, None), variables["params"], _state(variables),
        x, mask)
  else:
    smashed, vjp_fns, new_state = executor.map(
        one, variables["params"], _state(variables), x, mask, keys)

  def backward(d_smashed):
    return executor.map(lambda vjp_fn, d: vjp_fn(d)[0], vjp_fns, d_smashed)

  return smashed, _with_params(new_state, variables["params"]), backward


def _example_key(key, i):
  return None if key is None else jax.random.fold_in(key, i)


def clients_forward_per_example(executor: ClientExecutor, module: Sequential,
                                variables: Variables, x, mask, compute_dtype=None, keys=None):
  """:func:`clients_forward` with one ``jax.vjp`` per example (client-side DP-SGD).

  Every client runs its part on each example alone (``jax.vmap`` over the
  batch inside the client's map), so its closure turns the smashed-data
  cotangent into per-example gradients. Returns ``(smashed, new_variables,
  backward)``; ``backward(d_smashed, scale)`` gives every client's gradients
  ``[K, B, ...]``, example i's from row i of the cotangent times ``scale``
  ([K]). Row i depends on example i alone when nothing on the server side
  mixes examples (no BatchNorm); a mean loss over the batch's real samples
  sends ``d loss_i / count``, so ``scale = count`` gives each example's own
  loss gradient. Example i's random draws (dropout, a noise layer) use
  ``fold_in(key, i)``. Models with BatchNorm statistics are not supported
  (they mix examples): their statistics are left unchanged.
  """
  def one(params, state, xb, mb, key):
    def example(xi, mi, i):
      def forward(p):
        out, _ = apply_with_state(module, _with_params(state, p), xi[None], mi[None],
                                  compute_dtype, _example_key(key, i))
        return out[0]
      return jax.vjp(forward, params)

    smashed, vjp_fns = jax.vmap(example)(xb, mb, jnp.arange(xb.shape[0]))
    return smashed, vjp_fns

  if keys is None:
    smashed, vjp_fns = executor.map(lambda p, s, xb, mb: one(p, s, xb, mb, None),
                                    variables["params"], _state(variables), x, mask)
  else:
    smashed, vjp_fns = executor.map(one, variables["params"], _state(variables), x, mask, keys)

  def backward(d_smashed, scale):
    def client(vjp_fns, d, c):
      d = d * c.astype(d.dtype)
      return jax.vmap(lambda f, di: f(di)[0])(vjp_fns, d)
    return executor.map(client, vjp_fns, d_smashed, scale)

  return smashed, variables, backward


def _per_example_loss_grads(module, variables, inputs, labels, mask, compute_dtype, loss, rng,
                            wrt_input: bool):
  """Per-example ``(grads [B, ...], d_inputs [B, ...] or None, logits [B, C])``
  of each example's own loss (a padded example's are zero)."""
  loss = cross_entropy if loss is None else loss
  argnums = (0, 1) if wrt_input else 0

  def example(a, y, m, i):
    def loss_fn(params, a):
      logits, _ = apply_with_state(module, _with_params(variables, params), a[None], m[None],
                                   compute_dtype, _example_key(rng, i))
      logits = logits.astype(jnp.float32)
      return loss(logits, y[None], m[None]), logits[0]
    (_, logits), g = jax.value_and_grad(loss_fn, argnums=argnums, has_aux=True)(
        variables["params"], a)
    return (*g, logits) if wrt_input else (g, None, logits)

  return jax.vmap(example)(inputs, labels, mask, jnp.arange(mask.shape[0]))


def tail_forward_backward_per_example(module: Sequential, variables: Variables, body_out, labels,
                                      mask, compute_dtype=None, loss: Loss | None = None,
                                      rng=None):
  """U-shaped split, client side, for client-side DP-SGD: the tail's per-example
  gradients (``[B, ...]``, each of that example's own loss) and the batch's
  cotangent of the body output (the mean loss's, as
  :func:`client_tail_forward_backward` sends). Returns ``(per_example_grads,
  d_body_out, variables, stats)``. Example i's random draws use
  ``fold_in(rng, i)``; BatchNorm is not supported (see
  :func:`clients_forward_per_example`).
  """
  grads, d_out, logits = _per_example_loss_grads(module, variables, body_out, labels, mask,
                                                 compute_dtype, loss, rng, True)
  _, stats = masked_loss(logits, labels, mask, loss)
  count = jnp.maximum(stats.count, 1.0)
  return grads, (d_out / count).astype(d_out.dtype), variables, stats


def full_forward_backward_per_example(module: Sequential, variables: Variables, x, labels, mask,
                                      compute_dtype=None, loss: Loss | None = None, rng=None):
  """Whole-model per-example gradients (FL and centralized with DP-SGD):
  ``(per_example_grads [B, ...], variables, stats)``."""
  grads, _, logits = _per_example_loss_grads(module, variables, x, labels, mask, compute_dtype,
                                             loss, rng, False)
  _, stats = masked_loss(logits, labels, mask, loss)
  return grads, variables, stats


def server_forward_backward(module: Sequential, variables: Variables,
                            smashed, labels, mask, compute_dtype=None, loss: Loss | None = None,
                            rng=None):
  """Server part forward + loss + backward for one client's smashed data.

  Returns ``(grads, d_smashed, new_variables, stats)``: the server's parameter
  gradients, the cotangent sent back to the client, the server variables with
  updated BatchNorm statistics, and the batch sums.
  """
  def loss_fn(params, a):
    logits, new_vars = apply_with_state(module, _with_params(variables, params), a, mask,
                                        compute_dtype, rng)
    value, stats = masked_loss(logits.astype(jnp.float32), labels, mask, loss)
    return value, (new_vars, stats)

  (_, (new_vars, stats)), (grads, d_smashed) = jax.value_and_grad(
      loss_fn, argnums=(0, 1), has_aux=True)(variables["params"], smashed)
  return grads, d_smashed, new_vars, stats


def server_body_forward(module: Sequential, variables: Variables, smashed, mask,
                        compute_dtype=None, rng=None):
  """U-shaped split, server side: the body's forward under ``jax.vjp``.

  Takes no labels and computes no loss. Returns ``(out, backward,
  new_variables)``: the activations sent back to the client's tail, the
  server's closure for :func:`server_body_backward`, and the variables with
  updated BatchNorm statistics.
  """
  def forward(params, a):
    out, new_vars = apply_with_state(module, _with_params(variables, params), a, mask,
                                     compute_dtype, rng)
    return out, new_vars

  out, vjp_fn, new_vars = jax.vjp(forward, variables["params"], smashed, has_aux=True)
  return out, vjp_fn, new_vars


def server_body_backward(vjp_fn, d_out):
  """U-shaped split, server side: ``(grads, d_smashed)`` from the cotangent of
  the body's output that the client's tail sent back."""
  grads, d_smashed = vjp_fn(d_out)
  return grads, d_smashed


def client_tail_forward_backward(module: Sequential, variables: Variables, body_out, labels,
                                 mask, compute_dtype=None, loss: Loss | None = None, rng=None):
  """U-shaped split, client side: tail forward + loss + backward.

  Returns ``(grads, d_body_out, new_variables, stats)``; ``d_body_out`` is
  what the client sends to the server (labels and loss stay here).
  """
  return server_forward_backward(module, variables, body_out, labels, mask, compute_dtype,
                                 loss, rng)


def full_forward_backward(module: Sequential, variables: Variables, x, labels, mask,
                          compute_dtype=None, loss: Loss | None = None, rng=None):
  """Whole-model gradient, for the non-split baselines (FL, centralized)."""
  def loss_fn(params):
    logits, new_vars = apply_with_state(module, _with_params(variables, params), x, mask,
                                        compute_dtype, rng)
    value, stats = masked_loss(logits.astype(jnp.float32), labels, mask, loss)
    return value, (new_vars, stats)

  (_, (new_vars, stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      variables["params"])
  return grads, new_vars, stats


def optimizer_step(opt: optax.GradientTransformation, variables: Variables,
                   opt_state, grads, *, reset: bool = False):
  """One optimizer update of ``variables['params']``.

  With ``reset`` the optimizer state is created afresh before the update (the
  official code's per-batch server optimizer), except that learning-rate
  schedules keep counting (:func:`sfljax.optimizers.reset`).
  """
  params = variables["params"]
  if reset:
    opt_state = optimizers.reset(opt, params, opt_state)
  updates, new_opt_state = opt.update(grads, opt_state, params)
  new_vars = _with_params(variables, optax.apply_updates(params, updates))
  return new_vars, new_opt_state


def keep_if(active, new, old):
  """``new`` where ``active`` (a scalar) else ``old``, leafwise."""
  return fedavg.select(active, new, old)


PRECISIONS: dict[str, Any] = {"fp32": None, "bf16": jnp.bfloat16}
"""Compute dtypes: ``fp32`` computes in the parameters' dtype; ``bf16`` casts
parameters and inputs to bfloat16 for the forward/backward passes while the
master parameters, optimizer states and BatchNorm statistics stay float32."""
