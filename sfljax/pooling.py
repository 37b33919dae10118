"""Max-pooling with elementwise gradients.

``flax.linen.max_pool``'s gradient is XLA's ``select_and_scatter``. XLA:CPU
runs it slowly, and for a padded window it rewrites it into a variadic
``reduce_window`` that materialises one int32 iota per window dimension:
ResNet18's stem pool (3x3, stride 2, padding 1) at batch 256 spent about
410 ms of a 2.8 s train step there (``jax.profiler`` trace, 2026-11-27).

:func:`max_pool` takes the maximum over the window's shifted, strided views
and keeps an int8 index of the first maximum (row-major window order) as its
only residual. Its gradient routes the cotangent to that index, view by view,
so it equals ``nn.max_pool``'s in value and gradient, ties included (XLA's
``select_and_scatter`` with ``>=`` also keeps the first maximum); no
arithmetic is done on the cotangent, only routing and sums of values that
land on the same input (overlapping windows), in a fixed order.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["max_pool"]


def _pair(v, what: str) -> tuple[int, int]:
  v = (v, v) if isinstance(v, int) else tuple(v)
  if len(v) != 2 or not all(isinstance(a, int) and a > 0 for a in v):
    raise ValueError(f"{what} must be a positive int or a pair of them, got {v!r}")
  return v


def _view(xp, i, j, s, ho, wo):
  """xp[:, i : i + s0*(ho-1) + 1 : s0, j : ... : s1, :]."""
  n, _, _, c = xp.shape
  return lax.slice(xp, (0, i, j, 0), (n, i + s[0] * (ho - 1) + 1, j + s[1] * (wo - 1) + 1, c),
                   (1, s[0], s[1], 1))


def _fwd_impl(x, window, strides, pads):
  kh, kw = window
  (t, b), (l, r) = pads
  n, h, w, c = x.shape
  ho = (h + t + b - kh) // strides[0] + 1
  wo = (w + l + r - kw) // strides[1] + 1
  xp = lax.pad(x, jnp.array(-jnp.inf, x.dtype), ((0, 0, 0), (t, b, 0), (l, r, 0), (0, 0, 0)))
  y = best = idx = None
  for k in range(kh * kw):
    v = _view(xp, k // kw, k % kw, strides, ho, wo)
    if k == 0:
      y, best, idx = v, v, jnp.zeros(v.shape, jnp.int8)
      continue
    y = lax.max(y, v)                 # propagates NaN like nn.max_pool's value
    take = v > best                   # strict: ties keep the first maximum
    best = jnp.where(take, v, best)
    idx = jnp.where(take, jnp.int8(k), idx)
  return y, idx


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def _max_pool(x, window, strides, pads, in_hw):
  return _fwd_impl(x, window, strides, pads)[0]


def _max_pool_fwd(x, window, strides, pads, in_hw):
  y, idx = _fwd_impl(x, window, strides, pads)
  return y, idx


def _max_pool_bwd(window, strides, pads, in_hw, idx, g):
  n, _, _, c = g.shape
  h, w = in_hw
  kh, kw = window
  s0, s1 = strides
  (t, b), (l, r) = pads
  hp, wp = h + t + b, w + l + r
  ho, wo = g.shape[1:3]
  zero = jnp.zeros((), g.dtype)
  # Input row p*s0 + a (phase a in [0, s0)) receives from window row i = a + s0*d
  # at output row p - d: per phase, a sum of shifted (not strided) placements.
  hq, wq = -(-hp // s0), -(-wp // s1)   # rows / columns per phase (padded up)
  phases = []
  for a in range(s0):
    row = []
    for bb in range(s1):
      acc = None
      for i in range(a, kh, s0):
        for j in range(bb, kw, s1):
          k = i * kw + j
          part = jnp.where(idx == k, g, zero)          # (n, ho, wo, c)
          di, dj = (i - a) // s0, (j - bb) // s1       # output p lands on phase row p + di
          part = lax.pad(part, zero, ((0, 0, 0), (di, hq - ho - di, 0),
                                      (dj, wq - wo - dj, 0), (0, 0, 0)))
          acc = part if acc is None else acc + part
      if acc is None:
        acc = jnp.zeros((n, hq, wq, c), g.dtype)
      row.append(acc)
    phases.append(jnp.stack(row, axis=3))             # (n, hq, wq, s1, c)
  full = jnp.stack(phases, axis=2)                    # (n, hq, s0, wq, s1, c)
  full = full.reshape(n, hq * s0, wq * s1, c)
  return (lax.slice(full, (0, t, l, 0), (n, t + h, l + w, c)),)


_max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool(x, window: int | Sequence[int], strides: int | Sequence[int] | None = None,
             padding: str | Sequence[tuple[int, int]] = "VALID"):
  """Max-pool over NHWC ``x``, equal to ``flax.linen.max_pool`` in value and
  gradient (the cotangent goes to each window's first maximum, row-major).

  Args:
    x: (N, H, W, C) array.
    window: window size, an int or (kh, kw).
    strides: an int or pair; defaults to 1 (as ``nn.max_pool``).
    padding: 'VALID' or explicit ((top, bottom), (left, right)); padded
      positions hold -inf and never receive gradient.
  """
  if x.ndim != 4:
    raise ValueError(f"max_pool wants NHWC input, got shape {x.shape}")
  window = _pair(window, "window")
  strides = _pair(1 if strides is None else strides, "strides")
  if isinstance(padding, str):
    if padding != "VALID":
      raise ValueError(f"max_pool padding must be 'VALID' or explicit pairs, got {padding!r}")
    pads = ((0, 0), (0, 0))
  else:
    pads = tuple(tuple(int(v) for v in p) for p in padding)
    if len(pads) != 2 or any(len(p) != 2 or min(p) < 0 for p in pads):
      raise ValueError(f"max_pool padding must be two (lo, hi) pairs >= 0, got {padding!r}")
  if window[0] * window[1] > 127:
    raise ValueError(f"max_pool windows are limited to 127 positions, got {window}")
  if (x.shape[1] + sum(pads[0]) < window[0]) or (x.shape[2] + sum(pads[1]) < window[1]):
    raise ValueError(f"max_pool window {window} is larger than the padded input {x.shape[1:3]}")
  return _max_pool(x, window, strides, pads, tuple(x.shape[1:3]))
