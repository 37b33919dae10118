"""Poisson-sampled batch schedules (:mod:`sfljax.privacy.sampling`).

Every statistical check has a fixed seed (the draws are deterministic) and a
tolerance of several standard deviations of the exact binomial law, computed
here from ``q = min(1, B / n)`` and ``scipy.stats.binom``, not from the module.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import stats

from sfljax.privacy import sampling


def _rounds(counts, batch, buffer, rounds, **kw):
  """The schedules of ``rounds`` consecutive rounds (seed 0), stacked on a new axis 0."""
  outs = [sampling.poisson_schedule(counts, batch, buffer, seed=0, round_index=r, **kw)
          for r in range(rounds)]
  return [np.stack(x) for x in zip(*outs)]


def _batch_sizes(mask, active, k):
  """Client k's batch sizes at its active steps, over all rounds."""
  return mask[:, k].sum(-1)[active[:, k]]


def test_inclusion_rate_per_example_is_q():
  counts, batch = np.array([200, 7, 50, 12]), 10
  idx, mask, active, overflow = _rounds(counts, batch, 200, rounds=400)
  assert not overflow.any()
  for k, n in enumerate(counts):
    q = min(1.0, batch / n)
    steps = int(active[:, k].sum())
    assert steps == 400 * -(-n // batch)
    hits = np.zeros(n, np.int64)
    np.add.at(hits, idx[:, k][mask[:, k]], 1)
    if q == 1.0:
      np.testing.assert_array_equal(hits, steps)       # Every example in every batch.
      continue
    mean, sd = steps * q, np.sqrt(steps * q * (1 - q))
    assert np.all(np.abs(hits - mean) < 5 * sd), (k, hits.min(), hits.max(), mean, sd)
    # The pooled rate over all examples, much tighter.
    total_sd = np.sqrt(n * steps * q * (1 - q))
    assert abs(hits.sum() - n * steps * q) < 5 * total_sd


def test_batch_size_distribution_is_binomial():
  n, batch = 300, 30
  q = batch / n
  _, mask, active, _ = _rounds([n], batch, n, rounds=500)     # Buffer n: never overflows.
  sizes = _batch_sizes(mask, active, 0)
  m = len(sizes)
  assert m == 500 * 10
  mean, var = n * q, n * q * (1 - q)
  assert abs(sizes.mean() - mean) < 4 * np.sqrt(var / m)
  # Sample variance: its standard deviation is about var * sqrt(2 / m) (near-normal law).
  assert abs(sizes.var(ddof=1) - var) < 4 * var * np.sqrt(2 / m)
  # Chi-square against the exact pmf, the tails pooled so every bin expects >= 10.
  lo, hi = int(stats.binom.ppf(0.005, n, q)), int(stats.binom.isf(0.005, n, q))
  observed = np.array([(sizes <= lo).sum()] + [(sizes == s).sum() for s in range(lo + 1, hi)]
                      + [(sizes >= hi).sum()])
  probs = np.array([stats.binom.cdf(lo, n, q)]
                   + [stats.binom.pmf(s, n, q) for s in range(lo + 1, hi)]
                   + [stats.binom.sf(hi - 1, n, q)])
  assert abs(probs.sum() - 1) < 1e-12 and (m * probs).min() >= 10
  assert stats.chisquare(observed, m * probs).pvalue > 1e-3


def test_active_steps_of_unequal_clients():
  counts, batch, epochs = np.array([5, 23, 64, 1, 17]), 8, 2
  for steps in (None, 10):
    idx, mask, active, overflow = sampling.poisson_schedule(
        counts, batch, 64, seed=3, round_index=1, local_epochs=epochs, steps=steps)
    s = 8 if steps is None else steps                  # ceil(64 / 8) = 8.
    assert idx.shape == mask.shape == (5, epochs * s, 64)
    assert active.shape == overflow.shape == (5, epochs * s)
    assert idx.dtype == np.int32 and mask.dtype == bool
    assert active.dtype == bool and overflow.dtype == bool
    assert not overflow.any()                          # Buffer 64 >= every n_k.
    for k, n in enumerate(counts):
      per_epoch = -(-int(n) // batch)
      expected = np.zeros(epochs * s, bool)
      for e in range(epochs):
        expected[e * s:e * s + per_epoch] = True
      np.testing.assert_array_equal(active[k], expected)
      assert active[k].sum() == per_epoch * epochs
      assert not mask[k][~expected].any() and not idx[k][~expected].any()
  # The q = 1 clients (n <= B) have their whole data in their one step per epoch.
  np.testing.assert_array_equal(mask[0, 0, :5], True)
  np.testing.assert_array_equal(idx[0, 0, :5], np.arange(5))
  np.testing.assert_array_equal(mask[3, s, :2], [True, False])


def test_indices_in_range_unique_sorted_and_packed():
  counts, batch = np.array([1000, 37, 300]), 16
  buffer = sampling.buffer_size(counts, batch)
  idx, mask, active, _ = _rounds(counts, batch, buffer, rounds=20)
  for k, n in enumerate(counts):
    for r, t in zip(*np.nonzero(active[:, k])):
      m = mask[r, k, t]
      size = int(m.sum())
      assert m[:size].all() and not m[size:].any()    # The selected fill the first slots.
      sel = idx[r, k, t, :size]
      assert np.all(sel >= 0) and np.all(sel < n)
      assert np.all(np.diff(sel) > 0)                  # Increasing: no duplicates.
      assert not idx[r, k, t, size:].any()


def test_deterministic_and_independent_of_other_clients():
  counts, ids = np.array([40, 90, 13]), [3, 7, 11]
  kw = dict(seed=5, round_index=2, local_epochs=2, client_ids=ids)
  a = sampling.poisson_schedule(counts, 8, 24, **kw)
  b = sampling.poisson_schedule(counts, 8, 24, **kw)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x, y)
  # Client 7 alone, among other participants, and with more steps per epoch.
  for sub_counts, sub_ids, row, steps in (([90], [7], 0, None), ([90], [7], 0, 20),
                                          ([13, 90], [11, 7], 1, None),
                                          ([90, 500], [7, 2], 0, None)):
    alone = sampling.poisson_schedule(np.array(sub_counts), 8, 24,
                                      **dict(kw, client_ids=sub_ids, steps=steps))
    s_all, s_sub = a[0].shape[1] // 2, alone[0].shape[1] // 2
    assert s_all == 12 and s_sub >= 12
    for x, y in zip(a, alone):
      for e in range(2):                               # The same steps in each epoch block.
        np.testing.assert_array_equal(x[1, e * s_all:(e + 1) * s_all],
                                      y[row, e * s_sub:e * s_sub + s_all])
        assert not y[row, e * s_sub + s_all:(e + 1) * s_sub].any()
  # Other rounds, seeds and client ids draw other batches.
  for other in (dict(kw, round_index=3), dict(kw, seed=6), dict(kw, client_ids=[4, 7, 11])):
    c = sampling.poisson_schedule(counts, 8, 24, **other)
    assert not np.array_equal(a[1][0], c[1][0])


def test_overflowing_steps_are_dropped_not_truncated():
  n, batch, buffer = 100, 20, 22
  q = batch / n
  idx, mask, active, overflow = _rounds([n], batch, buffer, rounds=300)
  attempted = 300 * 5
  assert not (active & overflow).any()
  assert (active | overflow).sum() == attempted        # Every step is run or dropped.
  assert not mask[overflow].any() and not idx[overflow].any()
  # The overflow rate is P(Binomial(n, q) > buffer).
  p = stats.binom.sf(buffer, n, q)
  assert abs(overflow.sum() - attempted * p) < 5 * np.sqrt(attempted * p * (1 - p))
  # The run steps have the binomial law conditioned on fitting: a full buffer
  # is no likelier than P(X = buffer | X <= buffer) (truncation would pile the
  # overflowing draws up there).
  sizes = _batch_sizes(mask, active, 0)
  assert sizes.max() <= buffer
  runs = len(sizes)
  p_full = stats.binom.pmf(buffer, n, q) / stats.binom.cdf(buffer, n, q)
  full = (sizes == buffer).sum()
  assert abs(full - runs * p_full) < 5 * np.sqrt(runs * p_full * (1 - p_full))


def test_buffer_size_matches_direct_binomial_tails():
  counts, batch = np.array([37, 100, 1000, 5, 64]), 16
  for p in (1e-3, 1e-9, 1e-15):
    for extra in (0, 1):
      want = batch
      for n in counts:
        q = min(1.0, batch / n)
        b = next(b for b in range(n + extra + 1) if stats.binom.sf(b, n + extra, q) <= p)
        want = max(want, b)
      got = sampling.buffer_size(counts, batch, p, extra=extra)
      assert got == want, (p, extra, got, want)
      probs = sampling.overflow_probability(counts, batch, got, extra=extra)
      assert np.all(probs <= p)
      if got > batch:                                   # One slot fewer is not enough.
        assert np.any(sampling.overflow_probability(counts, batch, got - 1, extra=extra) > p)
  # Never more than max(batch, max(counts) + extra); exactly B when every client fits in B.
  assert sampling.buffer_size([3, 9], 16, 1e-12) == 16
  assert sampling.buffer_size([40], 39, 1e-300) == 40
  # q = 1: the add-one neighbour of a client of B examples has a batch of B + 1.
  assert sampling.buffer_size([16], 16, 1e-9) == 16
  assert sampling.buffer_size([16], 16, 1e-9, extra=1) == 17


@pytest.mark.parametrize("guess", ["zero", "n", "nan"])
def test_buffer_size_corrects_a_wrong_isf_guess(monkeypatch, guess):
  counts, batch, p = np.array([37, 100, 1000]), 16, 1e-9
  want = sampling.buffer_size(counts, batch, p)
  wrong = {"zero": lambda p, n, q: 0.0, "n": lambda p, n, q: float(n),
           "nan": lambda p, n, q: np.nan}[guess]
  monkeypatch.setattr(sampling.stats.binom, "isf", wrong)
  assert sampling.buffer_size(counts, batch, p) == want


def test_overflow_probability_is_the_binomial_tail():
  counts, batch, buffer = np.array([10, 100, 1000, 30]), 20, 30
  got = sampling.overflow_probability(counts, batch, buffer)
  want = [0.0 if n <= buffer else stats.binom.sf(buffer, n, min(1.0, batch / n))
          for n in counts]
  np.testing.assert_allclose(got, want, rtol=1e-12, atol=0)
  assert got[0] == 0.0 and got[3] == 0.0                # n <= buffer cannot overflow.
  # extra=1: one more example at the same rate; n + 1 = 31 > 30 at q = 2/3 now can.
  got1 = sampling.overflow_probability(counts, batch, buffer, extra=1)
  assert got1[3] == pytest.approx((2 / 3) ** 31, rel=1e-12)
  assert np.all(got1 >= got)


def test_rounds_are_fast():
  rng = np.random.default_rng(0)
  counts = rng.integers(200, 400, 1000)                 # ~ 1000 clients x 20 steps, B = 16.
  buffer = sampling.buffer_size(counts, 16)
  sampling.poisson_schedule(counts, 16, buffer, seed=0, round_index=0)
  start = time.perf_counter()
  sampling.poisson_schedule(counts, 16, buffer, seed=0, round_index=1)
  big = time.perf_counter()
  sampling.poisson_schedule([60000], 64, sampling.buffer_size([60000], 64), seed=0,
                            round_index=0)
  end = time.perf_counter()
  assert big - start < 2.0 and end - big < 2.0, (big - start, end - big)


@pytest.mark.parametrize("call, match", [
    (lambda: sampling.poisson_schedule([10], 0, 8, seed=0, round_index=0), "batch_size"),
    (lambda: sampling.poisson_schedule([10], 8, 7, seed=0, round_index=0), "buffer"),
    (lambda: sampling.poisson_schedule([10, 0], 8, 8, seed=0, round_index=0), "counts"),
    (lambda: sampling.poisson_schedule([], 8, 8, seed=0, round_index=0), "counts"),
    (lambda: sampling.poisson_schedule([[10]], 8, 8, seed=0, round_index=0), "counts"),
    (lambda: sampling.poisson_schedule([10.5], 8, 8, seed=0, round_index=0), "counts"),
    (lambda: sampling.poisson_schedule([20], 8, 8, seed=0, round_index=0, steps=2), "steps"),
    (lambda: sampling.poisson_schedule([20], 8, 8, seed=0, round_index=0, local_epochs=0),
     "local_epochs"),
    (lambda: sampling.poisson_schedule([20], 8, 8, seed=-1, round_index=0), "seed"),
    (lambda: sampling.poisson_schedule([20], 8, 8, seed=0, round_index=-1), "round_index"),
    (lambda: sampling.poisson_schedule([20, 3], 8, 8, seed=0, round_index=0, client_ids=[1]),
     "client_ids"),
    (lambda: sampling.buffer_size([10], 8, 0.0), "overflow_probability"),
    (lambda: sampling.buffer_size([10], 8, 1.0), "overflow_probability"),
    (lambda: sampling.buffer_size([10], 0), "batch_size"),
    (lambda: sampling.overflow_probability([10], 8, 4), "buffer"),
])
def test_bad_arguments(call, match):
  with pytest.raises(ValueError, match=match):
    call()
