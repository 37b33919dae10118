"""Optimizers and learning-rate schedules from names (the ``--optimizer`` and
``--lr-schedule`` flags).

>>> opt = make_optimizer("adamw", 1e-3, weight_decay=0.01, schedule="cosine", total_steps=500)
>>> state = opt.init(params)

``total_steps`` is the number of updates that this optimizer makes over the
whole run; the caller counts it per side (a client optimizer and a server
optimizer may step a different number of times).

Weight decay: ``adamw`` decays decoupled from the gradient statistics
(``optax.adamw``: the update is ``-lr_t * (adam_direction + weight_decay * p)``);
``adam`` and ``sgd`` use coupled L2 decay, ``weight_decay * p`` added to the
gradient before the optimizer (PyTorch's ``weight_decay`` of Adam and SGD).

:func:`reset` re-creates an optimizer state but keeps its learning-rate
schedule's position, for optimizers re-created every step or round (the
official code's behaviour, ``--optimizer-state reference``); :func:`compact`
keeps only what :func:`reset` reads, so that such a state need not be stored
in full between re-creations.
"""

from __future__ import annotations

import math
import numbers

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS: tuple[str, ...] = ("adam", "adamw", "sgd")
SCHEDULES: tuple[str, ...] = ("constant", "cosine", "step")
STEP_DECAY = 0.1
"""The ``step`` schedule multiplies the rate by this at 50% and again at 75% of the run."""


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_steps(schedule: str, total_steps) -> int:
  if (not isinstance(total_steps, numbers.Integral) or isinstance(total_steps, bool)
      or total_steps <= 0):
    raise ValueError(f"total_steps: the {schedule} schedule needs the number of updates "
                     f"of the run, a positive integer; got {total_steps!r}")
  return int(total_steps)


def step_boundaries(total_steps: int) -> dict[int, float]:
  """The ``step`` schedule's ``{update index: scale}``: update ``t`` (0-based) runs
  at ``lr * 0.1`` once ``t >= 0.5 * total_steps`` and at ``lr * 0.01`` once
  ``t >= 0.75 * total_steps`` (boundaries rounded up; equal ones multiply)."""
  total_steps = _check_steps("step", total_steps)
  scales: dict[int, float] = {}
  for num, den in ((1, 2), (3, 4)):
    boundary = -(-num * total_steps // den)       # ceil(num / den * total_steps), exactly
    scales[boundary] = scales.get(boundary, 1.0) * STEP_DECAY
  return scales


def learning_rate(lr: float, schedule: str = "constant",
                  total_steps: int | None = None) -> float | optax.Schedule:
  """The learning rate ``lr`` under ``schedule``: a float for ``constant``, else
  an ``optax.Schedule`` of the update count.

  ``cosine`` decays from ``lr`` to 0 over ``total_steps`` updates
  (``lr * (1 + cos(pi * t / total_steps)) / 2``); ``step`` is ``lr``, times 0.1
  from 50% of ``total_steps`` on and times 0.1 again from 75% on (see
  :func:`step_boundaries`). ``total_steps`` counts this optimizer's updates
  over the whole run; ``constant`` ignores it.
  """
  if not _is_number(lr) or lr <= 0:
    raise ValueError(f"lr: must be a positive number, got {lr!r}")
  if schedule not in SCHEDULES:
    raise ValueError(f"schedule: unknown schedule {schedule!r}: choose one of "
                     f"{', '.join(SCHEDULES)}")
  if schedule == "constant":
    return float(lr)
  if schedule == "cosine":
    return optax.cosine_decay_schedule(float(lr), _check_steps(schedule, total_steps))
  return optax.piecewise_constant_schedule(float(lr), step_boundaries(total_steps))


def make_optimizer(name: str, lr: float, *, momentum: float = 0.0, weight_decay: float = 0.0,
                   schedule: str = "constant",
                   total_steps: int | None = None) -> optax.GradientTransformation:
  """The optimizer ``name`` (one of :data:`OPTIMIZERS`) with rate ``lr`` under
  ``schedule`` (see :func:`learning_rate`).

  ``momentum`` is SGD's heavy-ball momentum (0 = none; in [0, 1)); Adam and
  AdamW take none. ``weight_decay`` >= 0 is decoupled for ``adamw`` and
  coupled L2 (``optax.add_decayed_weights`` before the optimizer) for ``adam``
  and ``sgd``. A bad argument raises ``ValueError`` whose message starts with
  the argument's name, e.g. ``"momentum: ..."``.
  """
  if name not in OPTIMIZERS:
    raise ValueError(f"name: unknown optimizer {name!r}: choose one of {', '.join(OPTIMIZERS)}")
  if not _is_number(momentum) or not 0 <= momentum < 1:
    raise ValueError(f"momentum: must be in [0, 1), got {momentum!r}")
  if momentum and name != "sgd":
    raise ValueError(f"momentum: only sgd takes a momentum, got {momentum!r} with {name}")
  if not _is_number(weight_decay) or weight_decay < 0:
    raise ValueError(f"weight_decay: must be a number >= 0, got {weight_decay!r}")
  rate = learning_rate(lr, schedule, total_steps)
  if name == "adamw":
    return optax.adamw(rate, weight_decay=float(weight_decay))
  opt = optax.adam(rate) if name == "adam" else optax.sgd(rate, momentum=float(momentum) or None)
  if weight_decay:
    return optax.chain(optax.add_decayed_weights(float(weight_decay)), opt)
  return opt


_COUNTED = tuple(t for t in (optax.ScaleByScheduleState,
                             getattr(optax, "InjectHyperparamsState", None),
                             getattr(optax, "InjectStatefulHyperparamsState", None))
                 if t is not None)


def _carry_counts(new, old):
  """``new`` with the schedule counters of ``old`` (same structure)."""
  def carry(n, o):
    if isinstance(n, optax.ScaleByScheduleState):
      return n._replace(count=o.count)
    if isinstance(n, _COUNTED):  # inject_hyperparams: its schedules read ``count``.
      return n._replace(count=o.count, inner_state=_carry_counts(n.inner_state, o.inner_state))
    return n
  return jax.tree.map(carry, new, old, is_leaf=lambda x: isinstance(x, _COUNTED))


def reset(opt: optax.GradientTransformation, params, old_state):
  """A fresh ``opt.init(params)`` state, except that every learning-rate
  schedule keeps its position: the ``count`` of each ``optax.ScaleByScheduleState``
  (and of ``optax.inject_hyperparams`` states) is taken from ``old_state``.

  So an optimizer re-created every step or round (moments and momentum back
  to zero, as in the official code) still follows its schedule over the run
  instead of restarting it at update 0. Pure tree operations: works under
  ``jit`` and ``vmap`` (call it per model). ``old_state`` must come from the
  same ``opt`` and parameter structure.
  """
  new = opt.init(params)
  try:
    return _carry_counts(new, old_state)
  except ValueError as e:  # jax.tree.map: the two states differ in structure.
    raise ValueError(f"old_state: not a state of this optimizer for these params ({e})") from None


def compact(state, batch_dims: int = 0):
  """``state`` with only what :func:`reset` reads: the schedule counters (and
  ``inject_hyperparams``' hyperparameters) stay, every other leaf (moments,
  momentum, Adam's own step count) becomes an empty array of shape
  ``leaf.shape[:batch_dims] + (0,)``.

  ``reset(opt, params, compact(state))`` equals ``reset(opt, params, state)``,
  so an optimizer that is re-created before every use can be stored in this
  form: 1000 clients' Adam states of a 59,134-parameter model take 451 MiB in
  full and nothing compacted. ``batch_dims`` leading axes are kept (e.g. 1 for
  a per-client state [K, ...]). Pure tree operations: works under ``jit``.
  """
  def empty(leaf):
    leaf = jnp.asarray(leaf)
    return jnp.zeros(leaf.shape[:batch_dims] + (0,), leaf.dtype)

  def one(n):
    if isinstance(n, optax.ScaleByScheduleState):
      return n
    if isinstance(n, _COUNTED):
      return n._replace(inner_state=compact(n.inner_state, batch_dims))
    return empty(n)
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, _COUNTED))
