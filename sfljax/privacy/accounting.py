"""(epsilon, delta) of client-side DP-SGD with ``dp-accounting``, per client.

What is accounted: each client's own examples, separately (client k's
guarantee is about its ``n_k`` examples; clients do not share data), under
add-or-remove-one adjacency (``NeighboringRelation.ADD_OR_REMOVE_ONE``).
Every optimizer step of client k in which the mechanism runs is one
``PoissonSampledDpEvent(q_k, GaussianDpEvent(sigma))``: each example is in
the batch independently with probability ``q_k = min(1, B / n_k)``, the
per-example gradients of the batch are clipped to L2 norm C and summed and
``N(0, sigma^2 C^2)`` noise is added to the sum (``q_k = 1``: a plain Gaussian
event). A client's rounds compose: its guarantee after ``T_k`` steps is that
of ``SelfComposedDpEvent(event, T_k)``, computed with the RDP accountant
(``dp_accounting.rdp.RdpAccountant``, default orders) or the PLD accountant
(``dp_accounting.pld.PLDAccountant``, default discretization). ``q_k``, the
number of steps and sigma are treated as public.

Dropped steps (:mod:`sfljax.privacy.sampling`): a step whose Poisson draw
overflows the fixed buffer releases nothing. The run then equals the "ideal"
run in which every attempted step runs the mechanism, except on the event
that some step overflowed, of probability at most ``P = A_k * p_k`` (``A_k``
the attempted steps, executed plus dropped; ``p_k`` a per-step bound on the
overflow probability that holds on both data sets of a neighbouring pair:
:func:`sfljax.privacy.sampling.overflow_probability` with ``extra=1``). A
mechanism within total variation ``P`` of an (eps, delta)-DP one on every data
set is (eps, delta + (1 + e^eps) * P)-DP, so :class:`Ledger` reports eps of the
ideal run over its ``A_k`` steps and :meth:`Ledger.delta_total` that delta.

What is NOT accounted: the smashed data (cut-layer activations) and the
labels a client sends to the server, the gradients it receives back, and
anything on the server side (its model, its optimizer, its updates). Only
the client-side model updates produced by the mechanism above are covered.
"""

from __future__ import annotations

import contextlib
import logging

import math
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting import pld
from dp_accounting import rdp

ACCOUNTANTS: tuple[str, ...] = ("rdp", "pld")
"""The dp-accounting accountants: Renyi DP and privacy loss distributions."""

_NEIGHBOURS = dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
_MAX_BRACKET_STEPS = 64


def _check_accountant(accountant: str) -> str:
  if accountant not in ACCOUNTANTS:
    raise ValueError(f"accountant: unknown accountant {accountant!r}; choose one of "
                     f"{', '.join(ACCOUNTANTS)}")
  return accountant


def _check_q(q) -> float:
  q = float(q)
  if not 0.0 < q <= 1.0:
    raise ValueError(f"q: the sampling rate must be in (0, 1], got {q!r}")
  return q


def _check_steps(steps) -> int:
  if isinstance(steps, (bool, np.bool_)) or not isinstance(steps, (int, np.integer)):
    raise ValueError(f"steps: expected an integer number of steps, got {steps!r}")
  if steps < 0:
    raise ValueError(f"steps: must be non-negative, got {steps}")
  return int(steps)


def _check_sigma(noise_multiplier) -> float:
  sigma = float(noise_multiplier)
  if not (math.isfinite(sigma) and sigma >= 0.0):
    raise ValueError(f"noise_multiplier: must be finite and >= 0, got {noise_multiplier!r}")
  return sigma


def _check_delta(delta) -> float:
  d = float(delta)
  if not 0.0 < d < 1.0:
    raise ValueError(f"delta: must be in (0, 1), got {delta!r}")
  return d


def _fresh(accountant: str) -> dp_accounting.PrivacyAccountant:
  """A new, empty accountant of the named kind (add-or-remove-one adjacency)."""
  if accountant == "rdp":
    return rdp.RdpAccountant(neighboring_relation=_NEIGHBOURS)
  return pld.PLDAccountant(neighboring_relation=_NEIGHBOURS)


def dp_event(q: float, noise_multiplier: float, steps: int) -> dp_accounting.DpEvent:
  """``steps`` Poisson-sampled Gaussian steps as one dp_accounting event.

  ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(sigma)),
  steps)``; for ``q == 1`` (every example in every batch)
  ``SelfComposedDpEvent(GaussianDpEvent(sigma), steps)``.
  """
  q = _check_q(q)
  sigma = _check_sigma(noise_multiplier)
  steps = _check_steps(steps)
  step = dp_accounting.GaussianDpEvent(sigma)
  if q < 1.0:
    step = dp_accounting.PoissonSampledDpEvent(q, step)
  return dp_accounting.SelfComposedDpEvent(step, steps)


def epsilon(q: float, noise_multiplier: float, steps: int, delta: float,
            accountant: str = "rdp") -> float:
  """Epsilon at ``delta`` of :func:`dp_event` ``(q, noise_multiplier, steps)``.

  Computed by a fresh ``rdp.RdpAccountant()`` (default orders) or
  ``pld.PLDAccountant()`` (default discretization), add-or-remove-one
  adjacency. 0.0 for ``steps == 0``; ``math.inf`` for ``noise_multiplier == 0``
  with ``steps > 0``.
  """
  _check_accountant(accountant)
  delta = _check_delta(delta)
  event = dp_event(q, noise_multiplier, steps)
  if event.count == 0:
    return 0.0
  if float(noise_multiplier) == 0.0:
    return math.inf
  with quiet():
    return float(_fresh(accountant).compose(event).get_epsilon(delta))


def _step_rdp(q: float, noise_multiplier: float, memo: dict):
  """(orders, RDP of one step) of :func:`dp_event` ``(q, sigma, 1)`` from a
  fresh RDP accountant, memoised in ``memo``; None if the accountant keeps
  them elsewhere (another dp-accounting layout: callers fall back to
  :func:`epsilon`)."""
  key = ("rdp-step", q, noise_multiplier)
  if key not in memo:
    with quiet():
      acc = _fresh("rdp").compose(dp_event(q, noise_multiplier, 1))
    orders, rdp1 = getattr(acc, "_orders", None), getattr(acc, "_rdp", None)
    memo[key] = (None if orders is None or rdp1 is None
                 else (np.array(orders, np.float64), np.array(rdp1, np.float64)))
  return memo[key]


def _rdp_epsilon(q: float, noise_multiplier: float, steps: int, delta: float,
                 memo: dict) -> float:
  """:func:`epsilon` with the RDP accountant, computing one step's RDP once
  per (q, sigma): RDP adds up over steps, and the accountant composes
  ``steps`` steps as ``steps * rdp1`` (so the result is the same float)."""
  if steps == 0 or noise_multiplier == 0.0:
    return epsilon(q, noise_multiplier, steps, delta, "rdp")
  curve = _step_rdp(q, noise_multiplier, memo)
  if curve is None:
    return epsilon(q, noise_multiplier, steps, delta, "rdp")
  orders, rdp1 = curve
  with quiet():
    return float(rdp.rdp_privacy_accountant.compute_epsilon(orders, steps * rdp1, delta)[0])


@contextlib.contextmanager
def quiet():
  """dp-accounting logs a warning (absl) for every Renyi order it cannot
  evaluate at a small noise and leaves that order out, correctly; those lines
  say nothing to the user, so they are held back while it computes."""
  log = logging.getLogger("absl")
  level = log.level
  log.setLevel(logging.ERROR)
  try:
    yield
  finally:
    log.setLevel(level)


def _bracket(gap, start: float, shrink: float) -> tuple[float, float]:
  """An interval ``(lo, hi)`` with ``gap(lo) > 0 >= gap(hi)``, from ``start``.

  ``gap`` must decrease in sigma. Doubles ``start`` until ``gap <= 0`` or
  multiplies it by ``shrink`` until ``gap > 0``.
  """
  if gap(start) > 0:
    lo, hi = start, 2.0 * start
    for _ in range(_MAX_BRACKET_STEPS):
      if gap(hi) <= 0:
        return lo, hi
      lo, hi = hi, 2.0 * hi
    raise ValueError(f"calibrate_noise: no noise multiplier up to {lo:g} reaches the "
                     f"target epsilon")
  lo, hi = shrink * start, start
  for _ in range(_MAX_BRACKET_STEPS):
    if gap(lo) > 0:
      return lo, hi
    lo, hi = shrink * lo, lo
  raise ValueError(f"calibrate_noise: even noise multiplier {hi:g} meets the target "
                   f"epsilon; it is too large to calibrate")


def calibrate_noise(target_epsilon: float, q: float, steps: int, delta: float,
                    accountant: str = "rdp") -> float:
  """The smallest noise multiplier sigma with :func:`epsilon` ``<= target_epsilon``.

  Found with ``dp_accounting.calibrate_dp_mechanism`` (default tolerance
  1e-6 in sigma; its result always satisfies the target) on an
  ``ExplicitBracketInterval``. The bracket: for ``"rdp"``, from sigma = 1
  doubling or halving; for ``"pld"``, from the RDP-calibrated sigma (RDP is
  looser than PLD, so that is usually at or a little above the PLD answer),
  doubling or shrinking by 0.8 (PLD at small sigma is slow and memory hungry).
  0.0 for ``steps == 0``.
  """
  _check_accountant(accountant)
  target = float(target_epsilon)
  if not (math.isfinite(target) and target > 0.0):
    raise ValueError(f"target_epsilon: must be a finite number > 0, got {target_epsilon!r}")
  delta = _check_delta(delta)
  q = _check_q(q)
  steps = _check_steps(steps)
  if steps == 0:
    return 0.0

  def gap(sigma: float) -> float:
    return epsilon(q, sigma, steps, delta, accountant) - target

  if accountant == "rdp":
    lo, hi = _bracket(gap, 1.0, 0.5)
  else:
    lo, hi = _bracket(gap, calibrate_noise(target, q, steps, delta, "rdp"), 0.8)
  sigma = dp_accounting.calibrate_dp_mechanism(
      lambda: _fresh(accountant), lambda s: dp_event(q, s, steps), target, delta,
      dp_accounting.ExplicitBracketInterval(lo, hi))
  return float(sigma)


class Ledger:
  """The per-client privacy ledger of a run (host side, plain Python).

  ``q``: [K] the clients' Poisson rates (:func:`sfljax.privacy.sampling.sampling_rates`);
  ``noise_multiplier`` sigma; ``delta`` the target delta of the epsilons;
  ``accountant`` one of :data:`ACCOUNTANTS`; ``overflow_probability``: [K] a
  per-step bound on the probability that a step of client k is dropped for
  overflowing its buffer, on its data and on its add-one neighbour
  (:func:`sfljax.privacy.sampling.overflow_probability` with ``extra=1``);
  default zeros (no buffer limit).

  ``steps`` [K] int64 counts each client's mechanism runs, ``overflowed``
  [K] int64 its dropped steps. :meth:`epsilons` is the epsilon of the ideal
  run of ``steps + overflowed`` mechanism runs (see the module docstring);
  :meth:`delta_total` the delta that goes with it.
  """

  def __init__(self, q, noise_multiplier: float, delta: float, accountant: str = "rdp",
               overflow_probability=None, *, memo: dict | None = None):
    q = np.array(q, np.float64)
    if q.ndim != 1 or q.size == 0:
      raise ValueError(f"q: expected a non-empty 1-D array of per-client rates, got "
                       f"shape {q.shape}")
    if not np.all((q > 0.0) & (q <= 1.0)):
      raise ValueError(f"q: every rate must be in (0, 1], got {q[~((q > 0) & (q <= 1))].tolist()}")
    if overflow_probability is None:
      p = np.zeros_like(q)
    else:
      p = np.array(overflow_probability, np.float64)
      if p.shape != q.shape:
        raise ValueError(f"overflow_probability: expected shape {q.shape} (one per client), "
                         f"got {p.shape}")
      if not np.all((p >= 0.0) & (p <= 1.0)):
        raise ValueError(f"overflow_probability: must be in [0, 1], got "
                         f"{p[~((p >= 0) & (p <= 1))].tolist()}")
    q.flags.writeable = False
    p.flags.writeable = False
    self.q = q
    self.overflow_probability = p
    self.noise_multiplier = _check_sigma(noise_multiplier)
    self.delta = _check_delta(delta)
    self.accountant = _check_accountant(accountant)
    self.steps = np.zeros(q.shape, np.int64)
    self.overflowed = np.zeros(q.shape, np.int64)
    # Epsilons and one-step RDP curves already computed; keys hold every
    # parameter, so ledgers of one run may share it (``memo=``).
    self._cache: dict = {} if memo is None else memo

  @property
  def num_clients(self) -> int:
    return len(self.q)

  def _ids(self, client_ids) -> np.ndarray:
    ids = np.asarray(client_ids)
    if ids.ndim != 1 or not (np.issubdtype(ids.dtype, np.integer) or ids.size == 0):
      raise ValueError(f"client_ids: expected a 1-D array of integer client ids, got "
                       f"{client_ids!r}")
    ids = ids.astype(np.int64)
    bad = (ids < 0) | (ids >= self.num_clients)
    if np.any(bad):
      raise ValueError(f"client_ids: {ids[bad].tolist()} out of range for "
                       f"{self.num_clients} clients")
    return ids

  def _counts(self, values, name: str, n: int) -> np.ndarray:
    v = np.asarray(values)
    if v.shape != (n,):
      raise ValueError(f"{name}: expected {n} counts (one per client id), got shape {v.shape}")
    if v.size and not np.issubdtype(v.dtype, np.integer):
      raise ValueError(f"{name}: expected integer counts, got dtype {v.dtype}")
    v = v.astype(np.int64)
    if np.any(v < 0):
      raise ValueError(f"{name}: counts must be non-negative, got {v[v < 0].tolist()}")
    return v

  def record(self, client_ids, steps_taken, overflowed=None) -> None:
    """Adds one round: client ``client_ids[i]`` ran the mechanism ``steps_taken[i]``
    times and had ``overflowed[i]`` steps dropped (default none).

    The three arrays have equal length; a client listed twice is added twice.
    """
    ids = self._ids(client_ids)
    taken = self._counts(steps_taken, "steps_taken", len(ids))
    over = (np.zeros(len(ids), np.int64) if overflowed is None
            else self._counts(overflowed, "overflowed", len(ids)))
    np.add.at(self.steps, ids, taken)
    np.add.at(self.overflowed, ids, over)

  def _epsilon(self, q: float, steps: int) -> float:
    key = ("epsilon", self.accountant, q, self.noise_multiplier, steps, self.delta)
    if key not in self._cache:
      self._cache[key] = (
          _rdp_epsilon(q, self.noise_multiplier, steps, self.delta, self._cache)
          if self.accountant == "rdp"
          else epsilon(q, self.noise_multiplier, steps, self.delta, self.accountant))
    return self._cache[key]

  def epsilons(self) -> np.ndarray:
    """[K] float64: each client's epsilon at ``delta`` for its ``q_k`` and its
    ``steps_k + overflowed_k`` attempted steps (one computation per distinct pair,
    cached in this ledger)."""
    attempted = self.steps + self.overflowed
    return np.array([self._epsilon(float(q), int(t)) for q, t in zip(self.q, attempted)],
                    np.float64)

  def epsilon(self) -> float:
    """The largest of :meth:`epsilons` (the run's guarantee for every client)."""
    return float(np.max(self.epsilons()))

  def delta_total(self) -> np.ndarray:
    """[K] float64: ``min(1, delta + (1 + exp(eps_k)) * A_k * p_k)``, the delta
    that goes with :meth:`epsilons`.

    ``A_k = steps_k + overflowed_k`` attempted steps, ``p_k`` the
    ``overflow_probability``: ``A_k * p_k`` bounds (union bound) the probability
    that any of them overflowed; the factor ``1 + e^eps`` turns that total
    variation into delta (module docstring). The term is 0 where ``A_k * p_k`` is 0.
    """
    eps = self.epsilons()
    risk = (self.steps + self.overflowed) * self.overflow_probability
    with np.errstate(over="ignore", invalid="ignore"):
      extra = np.where(risk > 0, (1.0 + np.exp(eps)) * risk, 0.0)
    return np.minimum(1.0, self.delta + extra)

  def to_dict(self) -> dict[str, Any]:
    """A JSON-serialisable dict (lists of Python floats and ints) of the whole ledger."""
    return {"q": self.q.tolist(), "noise_multiplier": self.noise_multiplier,
            "delta": self.delta, "accountant": self.accountant,
            "overflow_probability": self.overflow_probability.tolist(),
            "steps": self.steps.tolist(), "overflowed": self.overflowed.tolist()}

  @classmethod
  def from_dict(cls, d: dict[str, Any], *, memo: dict | None = None) -> "Ledger":
    """The ledger of :meth:`to_dict`'s output (exactly: ``from_dict(d).to_dict() == d``);
    ``memo``: a dict to share computed epsilons with other ledgers of the run."""
    missing = {"q", "noise_multiplier", "delta", "accountant", "overflow_probability",
               "steps", "overflowed"} - set(d)
    if missing:
      raise ValueError(f"Ledger.from_dict: missing keys {sorted(missing)}")
    ledger = cls(d["q"], d["noise_multiplier"], d["delta"], d["accountant"],
                 d["overflow_probability"], memo=memo)
    k = ledger.num_clients
    ledger.steps[:] = ledger._counts(np.asarray(d["steps"], np.int64), "steps", k)
    ledger.overflowed[:] = ledger._counts(np.asarray(d["overflowed"], np.int64),
                                          "overflowed", k)
    return ledger

  def __eq__(self, other: object) -> bool:
    if not isinstance(other, Ledger):
      return NotImplemented
    return self.to_dict() == other.to_dict()

  __hash__ = None  # Mutable (record), so not hashable.

  def __repr__(self) -> str:
    return (f"Ledger(clients={self.num_clients}, noise_multiplier={self.noise_multiplier}, "
            f"delta={self.delta}, accountant={self.accountant!r}, "
            f"steps={int(self.steps.sum())}, overflowed={int(self.overflowed.sum())})")
