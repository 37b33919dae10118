"""Client-side DP-SGD (Abadi et al. 2016), as separate pieces.

Per-example gradients in (a pytree whose leaves lead with the batch axis B),
one private gradient out::

  norms = per_example_norms(grads)                  # [B], over the whole pytree
  total = clipped_sum(grads, mask, clip)            # sum of g_i * min(1, C / |g_i|), real rows
  noisy = add_noise(total, key, noise_multiplier * clip)   # + N(0, (sigma C)^2) once, on the sum
  grad  = noisy / expected_batch                    # the expected (not the drawn) batch size

:func:`privatize` is the four in one, and :class:`DPSGD` carries the settings
an algorithm needs (:class:`sfljax.algorithms.SplitFed` and
:class:`sfljax.algorithms.FedAvg` take one as ``privacy``).

Padded rows (``mask`` False) contribute exactly zero. Dividing by the
expected batch size B (Poisson sampling with rate q = B / n, see
:mod:`sfljax.privacy.sampling`) rather than the drawn one keeps the
sensitivity of the released gradient at C / B whatever the draw; a step with
an empty draw still releases noise (skipping it would reveal the draw).
The noise key is the caller's: sfljax derives it from (seed, round, step,
client), so runs are reproducible bit for bit and no two clients or steps
share noise.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class DPSGD:
  """DP-SGD settings: clip norm C, noise multiplier sigma (the noise on the sum
  has std sigma * C), and the expected batch size the sum is divided by."""
  clip: float
  noise_multiplier: float
  expected_batch: int

  def __post_init__(self):
    if not self.clip > 0:
      raise ValueError(f"clip: must be > 0, got {self.clip}")
    if not self.noise_multiplier >= 0:
      raise ValueError(f"noise_multiplier: must be >= 0, got {self.noise_multiplier}")
    if int(self.expected_batch) < 1:
      raise ValueError(f"expected_batch: must be >= 1, got {self.expected_batch}")

  def privatize(self, grads, mask, key):
    """:func:`privatize` with these settings."""
    return privatize(grads, mask, key, clip=self.clip, noise_multiplier=self.noise_multiplier,
                     expected_batch=self.expected_batch)


def per_example_norms(grads) -> jax.Array:
  """[B]: each example's gradient L2 norm over all leaves (computed in float32)."""
  leaves = jax.tree.leaves(grads)
  sq = [jnp.sum(jnp.square(g.astype(jnp.float32)).reshape(g.shape[0], -1), axis=1)
        for g in leaves]
  return jnp.sqrt(sum(sq))


def clip_factors(norms, clip) -> jax.Array:
  """[B]: ``min(1, C / norm)`` (1 for a zero gradient)."""
  return jnp.minimum(1.0, clip / jnp.maximum(norms, jnp.finfo(jnp.float32).tiny))


def clip(grads, clip_norm):
  """Every example's gradient scaled to L2 norm at most ``clip_norm``."""
  f = clip_factors(per_example_norms(grads), clip_norm)
  return jax.tree.map(lambda g: g * f.reshape((-1,) + (1,) * (g.ndim - 1)).astype(g.dtype),
                      grads)


def clipped_sum(grads, mask, clip_norm):
  """The sum over real rows (``mask`` [B] True) of the clipped per-example gradients."""
  f = clip_factors(per_example_norms(grads), clip_norm) * jnp.asarray(mask, jnp.float32)
  return jax.tree.map(lambda g: jnp.tensordot(f.astype(g.dtype), g, axes=1), grads)


def add_noise(tree, key, stddev):
  """``tree`` plus independent N(0, stddev^2) on every element (one subkey per leaf)."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(key, len(leaves))
  noisy = [x + stddev * jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
           for x, k in zip(leaves, keys)]
  return jax.tree.unflatten(treedef, noisy)


def privatize(grads, mask, key, *, clip, noise_multiplier, expected_batch):
  """(sum of clipped real rows + N(0, (sigma C)^2)) / expected batch: one DP-SGD gradient."""
  total = clipped_sum(grads, mask, clip)
  if noise_multiplier:
    total = add_noise(total, key, noise_multiplier * clip)
  return jax.tree.map(lambda g: g / expected_batch, total)
