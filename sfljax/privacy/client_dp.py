"""A run's client-side DP-SGD plan: rates, buffer, noise, and its ledger.

:class:`ClientDP` resolves what a run with ``--dp-clip`` needs from the
clients' sizes: each client's Poisson rate q_k = min(1, B / n_k), the batch
buffer (a high quantile of the binomial, :func:`sfljax.privacy.sampling.buffer_size`),
the noise multiplier (given, or calibrated to a target epsilon for the
worst-off client over the configured rounds), and a fresh
:class:`sfljax.privacy.accounting.Ledger`.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sfljax.privacy import accounting, sampling
from sfljax.privacy.dpsgd import DPSGD

OVERFLOW_PROBABILITY = 1e-13
"""Per step, the probability that a client's Poisson draw exceeds the buffer
(for the data set and for it with one example added); such a step is dropped,
counted, and enters delta (:meth:`sfljax.privacy.accounting.Ledger.delta_total`)."""


class PlanError(ValueError):
  """A DP setting that cannot hold for these clients; ``field`` names the setting."""

  def __init__(self, field: str, message: str):
    super().__init__(message)
    self.field = field


@dataclasses.dataclass(frozen=True)
class ClientDP:
  clip: float
  noise_multiplier: float
  delta: float
  accountant: str
  batch_size: int
  q: np.ndarray                       # [K] Poisson rates
  buffer: int                         # batch slots per step
  overflow_probability: np.ndarray    # [K]
  steps_per_round: np.ndarray         # [K] mechanism runs per round a client takes part in

  @classmethod
  def plan(cls, counts, batch_size: int, *, clip: float, noise_multiplier: float | None,
           target_epsilon: float | None, delta: float, accountant: str, rounds: int,
           local_epochs: int) -> "ClientDP":
    """The plan for clients of sizes ``counts``; raises :class:`PlanError`.

    Without ``noise_multiplier`` it is calibrated so that every client's
    epsilon after ``rounds`` rounds (taking part in all of them: an upper
    bound under partial participation) is at most ``target_epsilon``; with
    both, the given noise must reach the target.
    """
    with accounting.quiet():
      return cls._plan(counts, batch_size, clip=clip, noise_multiplier=noise_multiplier,
                       target_epsilon=target_epsilon, delta=delta, accountant=accountant,
                       rounds=rounds, local_epochs=local_epochs)

  @classmethod
  def _plan(cls, counts, batch_size, *, clip, noise_multiplier, target_epsilon, delta,
            accountant, rounds, local_epochs) -> "ClientDP":
    counts = np.asarray(counts, np.int64)
    if delta >= 1.0 / counts.max():
      raise PlanError("dp_delta", f"{delta:g} is not below 1/n_k = {1 / counts.max():.3g} of "
                                  f"the largest client ({counts.max()} samples): lower it")
    q = sampling.sampling_rates(counts, batch_size)
    per_round = sampling.steps_per_round(counts, batch_size, local_epochs)
    total = per_round * rounds
    if noise_multiplier is None:
      noise_multiplier = _calibrate(q, total, target_epsilon, delta, accountant)
    elif target_epsilon is not None:
      worst = max(accounting.epsilon(float(a), noise_multiplier, int(b), delta, accountant)
                  for a, b in _pairs(q, total))
      if worst > target_epsilon * (1 + 1e-6):
        raise PlanError("dp_noise", f"noise {noise_multiplier:g} gives epsilon {worst:.4g} > "
                                    f"the target {target_epsilon:g} after {rounds} rounds: "
                                    "raise it, or drop --dp-noise to calibrate it")
    buffer = sampling.buffer_size(counts, batch_size, OVERFLOW_PROBABILITY, extra=1)
    over = sampling.overflow_probability(counts, batch_size, buffer, extra=1)
    return cls(float(clip), float(noise_multiplier), float(delta), accountant, int(batch_size),
               q, int(buffer), over, per_round)

  def dpsgd(self) -> DPSGD:
    """The algorithm's settings: clip, noise, the expected batch B."""
    return DPSGD(self.clip, self.noise_multiplier, self.batch_size)

  def ledger(self) -> accounting.Ledger:
    """A ledger with no steps recorded."""
    return accounting.Ledger(self.q, self.noise_multiplier, self.delta, self.accountant,
                             overflow_probability=self.overflow_probability)

  def describe(self) -> dict:
    """For ``config.json``'s resolved settings."""
    return {"noise_multiplier": self.noise_multiplier, "clip": self.clip, "delta": self.delta,
            "accountant": self.accountant, "expected_batch": self.batch_size,
            "buffer": self.buffer, "sampling_rate_max": float(self.q.max()),
            "sampling_rate_min": float(self.q.min()),
            "overflow_probability_max": float(self.overflow_probability.max())}


def _pairs(q, steps):
  """The distinct (q, steps) pairs (clients of equal size share one)."""
  return sorted(set(zip(np.asarray(q, float).tolist(), np.asarray(steps).tolist())))


def _calibrate(q, steps, target, delta, accountant) -> float:
  """The smallest noise meeting ``target`` for every client: calibrated for the
  client of the largest rate, then raised for any client still above it."""
  pairs = _pairs(q, steps)
  a, b = max(pairs, key=lambda p: (p[0], p[1]))
  sigma = accounting.calibrate_noise(target, a, int(b), delta, accountant)
  for a, b in pairs:
    if accounting.epsilon(a, sigma, int(b), delta, accountant) > target * (1 + 1e-6):
      sigma = max(sigma, accounting.calibrate_noise(target, a, int(b), delta, accountant))
  return sigma
