"""Client failures ("dropout"), drawn on the host in NumPy.

Every round each participant fails independently with probability ``rate``.
A failed participant's client-side result never reaches the fed server:
:attr:`sfljax.algorithms.RoundInputs.reported` carries :attr:`Faults.reported`
into the round (what each side then does is documented there and in
:mod:`sfljax.algorithms`). Where in its round it fails is the ``point``:

* ``"before_upload"``: it runs its whole round (every batch reaches the
  server) and fails just before uploading its client part; the batch mask is
  unchanged. ``fail_step`` is its last real step.
* ``"after_forward"``: it fails at a step drawn uniformly over its real steps
  (those with at least one real sample): it completes that step's forward
  pass -- the server receives the smashed data (and labels) and takes its
  step -- but never receives the gradient and trains no further.
  :func:`apply` masks out its batches after ``fail_step``. (Its own client
  step of ``fail_step`` is computed but, as it does not report, discarded
  with the rest of its client-side result.)

Only the server side can keep something of a failed participant: a shared
server (SFLV2, SL) keeps the updates it made from the failed participant's
batches that reached it; server replicas, client parts and optimizer states
of a failed participant are not kept.

The draw depends only on ``(seed, round_index)`` and the participants' real
steps (from the batch mask), from its own seeded stream
(:data:`FAULT_STREAM`), so it is the same bit for bit on every run and for
every algorithm; the set of failing participants grows with ``rate`` (a
participant that fails at rate r fails at any rate above r).

>>> idx, mask = data.batch_schedule(counts, 32, seed=0, round_index=r, local_epochs=2)
>>> f = faults.draw(0, r, mask, 0.1, "after_forward")
>>> mask = faults.apply(mask, f, "after_forward")   # then RoundInputs(..., reported=f.reported)
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from sfljax.data import rng_for

FAULT_STREAM = 5
"""The purpose tag of the failure draws (:func:`sfljax.data.rng_for`; data.py uses 0 to 4)."""

POINTS: tuple[str, ...] = ("after_forward", "before_upload")
"""Where in its round a failed participant fails (see the module docstring)."""


class Faults(NamedTuple):
  """One round's failures, one entry per participant (row order of the batch mask).

  reported: [M] bool, False for a participant that failed.
  fail_step: [M] int64, the step (index along the mask's step axis T) at which
    a failed participant fails: for ``after_forward`` one of its real steps,
    drawn uniformly; for ``before_upload`` its last real step. -1 for a
    participant that reports, and for a failed one with no real step.
  """
  reported: np.ndarray
  fail_step: np.ndarray


def real_steps(mask: np.ndarray) -> np.ndarray:
  """[M, T] bool: the steps in which each participant has at least one real sample.

  With ``local_epochs`` E a participant's real steps span the E epochs (the
  first ``ceil(n_k / B)`` steps of every epoch block of the mask, see
  :func:`sfljax.data.batch_schedule`); ``real_steps(mask).sum(-1)`` counts them.
  """
  mask = np.asarray(mask)
  if mask.ndim != 3:
    raise ValueError(f"mask: expected the round's batch mask [M, T, B], got shape {mask.shape}")
  return mask.astype(bool).any(-1)


def _check(rate: float, point: str) -> None:
  if point not in POINTS:
    raise ValueError(f"point: unknown failure point {point!r}; choose one of "
                     f"{', '.join(POINTS)}")
  if not 0.0 <= float(rate) <= 1.0:
    raise ValueError(f"rate: the failure probability must be in [0, 1], got {rate!r}")


def draw(seed: int, round_index: int, mask: np.ndarray, rate: float, point: str) -> Faults:
  """Round ``round_index``'s failures for the participants of the batch mask.

  ``mask``: the round's batch mask [M, T, B] (:func:`sfljax.data.batch_schedule`,
  before :func:`apply`), from which every participant's real steps are read.
  Each participant fails independently with probability ``rate``; for
  ``after_forward`` its failing step is uniform over its real steps, for
  ``before_upload`` it is its last real step. Deterministic in ``(seed,
  round_index)``; rate 0: everyone reports; rate 1: nobody does.
  """
  _check(rate, point)
  real = real_steps(mask)
  m = real.shape[0]
  rng = rng_for(seed, FAULT_STREAM, round_index)
  u = rng.random(m)         # Drawn whatever the rate and point: fixed streams.
  v = rng.random(m)
  failed = u < float(rate)
  fail_step = np.full(m, -1, np.int64)
  for k in np.flatnonzero(failed):
    steps = np.flatnonzero(real[k])
    if len(steps) == 0:
      continue
    j = len(steps) - 1 if point == "before_upload" else min(int(v[k] * len(steps)),
                                                             len(steps) - 1)
    fail_step[k] = steps[j]
  return Faults(~failed, fail_step)


def apply(mask: np.ndarray, faults: Faults, point: str) -> np.ndarray:
  """The batch mask with every failed participant's batches after its
  ``fail_step`` masked out (``after_forward``); unchanged for ``before_upload``.

  Returns a new array (the input is not modified) for ``after_forward``, the
  input itself for ``before_upload``.
  """
  _check(0.0, point)
  mask = np.asarray(mask)
  if point == "before_upload":
    return mask
  if mask.ndim != 3 or mask.shape[0] != len(faults.reported):
    raise ValueError(f"mask: expected [M, T, B] with M = {len(faults.reported)} "
                     f"participants, got shape {mask.shape}")
  steps = np.arange(mask.shape[1])
  cut = (~np.asarray(faults.reported, bool))[:, None] & (steps[None, :]
                                                         > np.asarray(faults.fail_step)[:, None])
  return mask & ~cut[:, :, None]
