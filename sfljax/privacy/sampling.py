"""Poisson-sampled batch schedules in fixed-shape masked buffers (host side, NumPy).

Client-side DP-SGD is accounted as a Poisson-subsampled Gaussian mechanism
(:mod:`sfljax.privacy.accounting`): in every optimizer step of client k each
of its ``n_k`` examples is in the batch independently with probability
``q_k = min(1, B / n_k)`` (``B`` the configured batch size, so the expected
batch is ``B``). The batch size is therefore random, Binomial(n_k, q_k), while
a compiled program needs fixed shapes: a batch lives in a buffer of ``buffer``
slots (``buffer >= B``) with a boolean mask. A step whose draw selects more
than ``buffer`` examples is *dropped*, never truncated: it runs no update,
adds no noise and releases nothing; :func:`poisson_schedule` flags it in
``overflow``. :func:`buffer_size` picks a buffer for which that happens with
probability at most a given bound per step, and :func:`overflow_probability`
gives the exact per-step probability for a buffer (what the accounting adds
to delta, see :class:`sfljax.privacy.accounting.Ledger`).

The step layout is that of :func:`sfljax.data.batch_schedule`: ``T =
local_epochs * S`` steps, ``S = max_k ceil(n_k / B)`` (or ``steps``), and client
k runs the mechanism in the first ``ceil(n_k / B)`` steps of each epoch block.
The draws of client ``cid`` in round ``r`` come from
``sfljax.data.rng_for(seed, SAMPLING_STREAM, r, cid)`` alone, so they are the
same bit for bit for the same arguments and do not depend on which other
clients take part.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats

from sfljax.data import rng_for

SAMPLING_STREAM = 8
"""The purpose tag of the Poisson draws (:func:`sfljax.data.rng_for`).

data.py uses 0 to 4, faults.py 5, loaders.py 7 (the HAM10000 split) and
experiments/client_study.py 9. Not 7: ``SeedSequence`` pads its entropy with
zeros, so ``rng_for(seed, 7, 0, 0)`` (round 0, client 0) would be the very
generator of ``SeedSequence([seed, 7])``, the HAM10000 split.
"""


def _counts(counts) -> np.ndarray:
  """``counts`` as a 1-D int64 array of positive integers (ValueError otherwise)."""
  c = np.asarray(counts)
  if c.ndim != 1 or c.size == 0:
    raise ValueError(f"counts: expected a non-empty 1-D array of per-client example "
                     f"counts, got shape {c.shape}")
  if not (np.issubdtype(c.dtype, np.integer)
          or (np.issubdtype(c.dtype, np.floating) and np.all(c == np.round(c)))):
    raise ValueError(f"counts: expected integer example counts, got {c!r}")
  c = c.astype(np.int64)
  if np.any(c < 1):
    raise ValueError(f"counts: every client needs at least one example, got counts "
                     f"{c[c < 1].tolist()} (clients {np.flatnonzero(c < 1).tolist()})")
  return c


def _positive_int(value, name: str, minimum: int = 1) -> int:
  """``value`` as an int >= ``minimum`` (ValueError naming ``name`` otherwise)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise ValueError(f"{name}: expected an integer, got {value!r}")
  if value < minimum:
    raise ValueError(f"{name}: must be at least {minimum}, got {value}")
  return int(value)


def sampling_rates(counts, batch_size: int) -> np.ndarray:
  """[K] float64: the per-client Poisson rates ``q_k = min(1, batch_size / n_k)``."""
  c = _counts(counts)
  b = _positive_int(batch_size, "batch_size")
  return np.minimum(1.0, b / c.astype(np.float64))


def steps_per_round(counts, batch_size: int, local_epochs: int = 1) -> np.ndarray:
  """[K] int64: the mechanism runs (active steps) per round, ``local_epochs * ceil(n_k / B)``."""
  c = _counts(counts)
  b = _positive_int(batch_size, "batch_size")
  e = _positive_int(local_epochs, "local_epochs")
  return e * (-(-c // b))


def overflow_probability(counts, batch_size: int, buffer: int, *,
                         extra: int = 0) -> np.ndarray:
  """[K] float64: per client, the probability that one step's draw overflows the buffer.

  That is ``P(Binomial(n_k + extra, q_k) > buffer)`` with ``q_k = min(1,
  batch_size / n_k)`` from the client's own ``n_k`` (``scipy.stats.binom.sf``),
  and exactly 0 when ``buffer >= n_k + extra``. ``extra=1`` is the draw on the
  add-one neighbour of the client's data (one more example, the same rate):
  the bound the delta of :class:`sfljax.privacy.accounting.Ledger` needs to
  hold for both data sets of a neighbouring pair.
  """
  c = _counts(counts)
  b = _positive_int(batch_size, "batch_size")
  buf = _positive_int(buffer, "buffer")
  ex = _positive_int(extra, "extra", minimum=0)
  if buf < b:
    raise ValueError(f"buffer: must be at least batch_size={b}, got {buf}")
  n = c + ex
  q = np.minimum(1.0, b / c.astype(np.float64))
  p = np.asarray(stats.binom.sf(buf, n, q), np.float64)
  return np.where(buf >= n, 0.0, np.clip(p, 0.0, 1.0))


def buffer_size(counts, batch_size: int, overflow_probability: float = 1e-9, *,
                extra: int = 0) -> int:
  """The smallest buffer ``b >= batch_size`` with, for every client,
  ``P(Binomial(n_k + extra, q_k) > b) <= overflow_probability``.

  ``q_k = min(1, batch_size / n_k)``. Per client the smallest such b is found
  with ``scipy.stats.binom.isf`` and then checked and corrected with
  ``scipy.stats.binom.sf`` (so it is exact for scipy's sf); the result is the
  largest of them, or ``batch_size`` if that is larger. It never exceeds
  ``max(batch_size, max(counts) + extra)`` (a buffer of ``n_k + extra`` slots
  cannot overflow). ``extra=1``: the bound also holds on every client's add-one
  neighbouring data set (see :func:`overflow_probability`).
  """
  c = _counts(counts)
  b = _positive_int(batch_size, "batch_size")
  ex = _positive_int(extra, "extra", minimum=0)
  p = float(overflow_probability)
  if not 0.0 < p < 1.0:
    raise ValueError(f"overflow_probability: must be in (0, 1), got {overflow_probability!r}")
  best = b
  for n_k in np.unique(c):
    n = int(n_k) + ex
    q = min(1.0, b / float(n_k))
    guess = stats.binom.isf(p, n, q)
    k = int(min(n, max(0, guess))) if np.isfinite(guess) else n
    while k < n and stats.binom.sf(k, n, q) > p:    # Too small: the tail is too heavy.
      k += 1
    while k > 0 and stats.binom.sf(k - 1, n, q) <= p:   # Too large: a smaller one works.
      k -= 1
    best = max(best, k)
  return int(best)


def poisson_schedule(counts, batch_size: int, buffer: int, *, seed: int,
                     round_index: int, local_epochs: int = 1,
                     client_ids: Sequence[int] | None = None,
                     steps: int | None = None
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """One round's Poisson-sampled batches for the clients whose ``counts`` are given.

  Returns ``(idx, mask, active, overflow)``: ``idx`` int32 and ``mask`` bool of
  shape ``[K, T, buffer]``, ``active`` and ``overflow`` bool ``[K, T]``, with
  ``T = local_epochs * S``, ``S = max_k ceil(n_k / batch_size)`` or ``S = steps``
  if given (it must be at least that, as in
  :func:`sfljax.data.batch_schedule`). ``client_ids`` names the clients whose
  counts are given (default ``range(K)``).

  Client k's steps ``e * S + s`` for ``s < ceil(n_k / batch_size)`` in each
  local epoch e are its mechanism runs: in each, every one of its ``n_k``
  examples is selected independently with probability ``q_k = min(1,
  batch_size / n_k)``. The selected indices, increasing, fill the first slots
  of ``idx`` with ``mask`` True there (the rest of ``idx`` is 0, of ``mask``
  False); such a step is ``active`` even when nothing is selected. A step
  that selects more than ``buffer`` examples is dropped: ``overflow`` True,
  ``active`` False and its mask all False. All other steps are inactive with
  all-False masks.

  The selections are drawn as a Bernoulli(q_k) process over the indices
  ``0, 1, ...``: the gaps between consecutive selected indices are i.i.d.
  Geometric(q_k) (``Generator.geometric``), the selected indices of a step
  the running sums minus one that are below ``n_k``. This is the same
  distribution as independent Bernoulli(q_k) draws for the ``n_k`` examples,
  at a cost of ``min(buffer + 1, n_k)`` draws per step: ``min(buffer + 1,
  n_k)`` gaps decide the step (the ``buffer + 1``-th selection, if below
  ``n_k``, is an overflow). Client ``cid`` draws one ``[its active steps,
  min(buffer + 1, n_k)]`` array of gaps from ``rng_for(seed, SAMPLING_STREAM,
  round_index, cid)``; the result depends on nothing else but ``n_k``,
  ``batch_size``, ``buffer`` and ``local_epochs`` (not on ``steps`` beyond the
  placement, nor on the other clients).
  """
  c = _counts(counts)
  b = _positive_int(batch_size, "batch_size")
  buf = _positive_int(buffer, "buffer")
  if buf < b:
    raise ValueError(f"buffer: must be at least batch_size={b} (the expected batch), "
                     f"got {buf}")
  epochs = _positive_int(local_epochs, "local_epochs")
  seed = _positive_int(seed, "seed", minimum=0)
  round_index = _positive_int(round_index, "round_index", minimum=0)
  k_total = len(c)
  if client_ids is None:
    ids = np.arange(k_total, dtype=np.int64)
  else:
    ids = np.asarray(client_ids)
    if ids.shape != (k_total,) or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(f"client_ids: expected {k_total} integer client ids (one per "
                       f"count), got {client_ids!r}")
    if np.any(ids < 0):
      raise ValueError(f"client_ids: must be non-negative, got {ids[ids < 0].tolist()}")
  spe = -(-c // b)                       # Mechanism runs per local epoch.
  s = int(spe.max())
  if steps is not None:
    steps = _positive_int(steps, "steps")
    if steps < s:
      raise ValueError(f"steps={steps} is fewer than the {s} the largest client needs")
    s = steps
  t_total = epochs * s
  idx = np.zeros((k_total, t_total, buf), np.int32)
  mask = np.zeros((k_total, t_total, buf), bool)
  active = np.zeros((k_total, t_total), bool)
  overflow = np.zeros((k_total, t_total), bool)
  q = np.minimum(1.0, b / c.astype(np.float64))
  for k in range(k_total):
    n, m = int(c[k]), int(spe[k])
    rows = (np.arange(epochs)[:, None] * s + np.arange(m)[None, :]).reshape(-1)
    width = min(buf + 1, n)
    gaps = rng_for(seed, SAMPLING_STREAM, round_index, int(ids[k])).geometric(
        q[k], size=(len(rows), width))
    pos = np.cumsum(gaps, axis=1) - 1    # Selected indices, increasing, per step.
    chosen = pos < n
    over = chosen[:, buf] if width > buf else np.zeros(len(rows), bool)
    fill = min(buf, width)
    keep = chosen[:, :fill] & ~over[:, None]
    idx[k, rows, :fill] = np.where(keep, pos[:, :fill], 0)
    mask[k, rows, :fill] = keep
    active[k, rows] = ~over
    overflow[k, rows] = over
  return idx, mask, active, overflow
