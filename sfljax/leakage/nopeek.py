"""NoPeek (Vepakomma et al. 2020, arXiv 2008.09161): a client-side defence.

Each client adds ``weight * dcor(x, smashed)`` -- the distance correlation
between its batch's inputs and their smashed data
(:func:`sfljax.leakage.measures.distance_correlation`, real rows only) -- to
its loss, so the cut learns to keep less of the inputs' geometry. Plugged in
as :class:`sfljax.algorithms.SplitFed`'s ``smashed_penalty``: the penalty's
gradient on the smashed data joins the server's cotangent and the client's
vjp closure turns the sum into its gradients (the server is unchanged and
never sees the penalty)::

  alg = algorithms.build("sflv1", model, optimizer=optax.sgd(0.01),
                         smashed_penalty=NoPeek(0.5))
"""

from __future__ import annotations

import dataclasses

import jax

from sfljax.leakage.measures import distance_correlation


@dataclasses.dataclass(frozen=True)
class NoPeek:
  """``penalty(x, smashed, mask) = weight * dcor(x, smashed)`` over real rows."""
  weight: float

  def __post_init__(self):
    if not self.weight >= 0:
      raise ValueError(f"NoPeek weight must be >= 0, got {self.weight!r}")

  def __call__(self, x, smashed, mask) -> jax.Array:
    return self.weight * distance_correlation(x, smashed, mask)
