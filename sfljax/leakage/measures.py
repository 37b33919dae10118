"""Leakage measures: how much the smashed data reveal about the inputs.

Pure ``jax.numpy`` functions (jittable; no state). Two families:

**Statistical dependence** - :func:`distance_correlation` (dCor; Szekely,
Rizzo & Bakirov 2007) between the rows of two batches, e.g. the raw inputs
``x`` [N, ...] and the cut-layer activations ``z`` [N, ...] that a client sends
to the server. It lies in [0, 1]: 0 iff (in the population limit) ``x`` and
``z`` are independent, 1 iff ``z`` is an orthogonal transform of ``x`` up to
scale and shift (so ``z = x`` and ``z = 3 x + 2`` give 1). Lower means less
leakage. It is the V-statistic (biased) estimate: on a finite sample of
INDEPENDENT data it is not 0 but shrinks like ``1 / sqrt(N)``, and the bias
grows with the row dimensions: for N = 500 independent Gaussian rows it is
about 0.08 (1-D vs 1-D), 0.16 (4-D vs 3-D), 0.33 (16-D vs 16-D) and 0.73
(784-D vs 64-D, i.e. 28x28 images vs a 64-wide cut layer). So read it
relatively - compare values computed with the same N and the same shapes
(e.g. across rounds or defences), never against 0. Pairs of rows closer
than about 0.3% of their norms (after centering) count as duplicates
(distance 0); this only absorbs float32 rounding.
It is differentiable (finite gradients everywhere), so it doubles as the
NoPeek training loss term (Vepakomma et al., arXiv 2008.09161).

**Reconstruction quality** - for an attacker's reconstruction ``b`` of the
original images ``a`` (both [N, H, W, C], NHWC), per image:

* :func:`mse`: mean squared error. Lower = better reconstruction = more
  leakage. Scale-dependent (the images here are standardised).
* :func:`psnr`: ``10 log10(data_range^2 / mse)`` in dB. Higher = more
  leakage; ``inf`` for a perfect reconstruction. Equals
  ``skimage.metrics.peak_signal_noise_ratio``.
* :func:`ssim`: mean structural similarity (Wang et al. 2004) with skimage's
  defaults (uniform 7x7 window, K1 = 0.01, K2 = 0.03, sample covariance),
  averaged over the image (window-radius border excluded) and channels. In
  [-1, 1]; 1 = identical, near 0 = structurally unrelated. Higher = more
  leakage. Equals ``skimage.metrics.structural_similarity(...,
  channel_axis=-1)``.

PSNR and SSIM need ``data_range``, the dynamic range of the ORIGINAL images.
The images in this library are standardised (not in [0, 1]), so use
:func:`data_range` of the originals (max - min), and use the same value for
every method compared.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

_K1 = 0.01
_K2 = 0.03
_DUP_TOL = 4e-6  # squared distances below this x (|r_i|^2 + |r_j|^2) count as 0


def data_range(x: jax.Array | np.ndarray) -> float:
  """``max(x) - min(x)`` as a Python float: the ``data_range`` for psnr/ssim.

  Pass the ORIGINAL images (not the reconstructions). Host-side helper (it
  converts to a Python float), so call it outside ``jit``.
  """
  x = np.asarray(x)
  return float(np.max(x)) - float(np.min(x))


def _safe_sqrt(v: jax.Array) -> jax.Array:
  """sqrt(max(v, 0)) whose gradient at v <= 0 is 0 instead of inf/NaN."""
  pos = v > 0
  return jnp.where(pos, jnp.sqrt(jnp.where(pos, v, 1.0)), 0.0)


def _distances(rows: jax.Array, w: jax.Array) -> jax.Array:
  """Pairwise Euclidean distances [N, N] of rows [N, D] (float32)."""
  # Translation does not change distances; centering the rows (weighted mean
  # of the kept rows) cuts the cancellation in |x|^2 + |y|^2 - 2 x.y.
  rows = rows - jnp.sum(w[:, None] * rows, axis=0, keepdims=True)
  sq = jnp.sum(rows * rows, axis=1)
  gram = jnp.matmul(rows, rows.T, precision=jax.lax.Precision.HIGHEST)
  scale = sq[:, None] + sq[None, :]
  d2 = scale - 2.0 * gram
  # In float32 this d2 carries a rounding error of about 4e-7 * (|r_i|^2 +
  # |r_j|^2); below _DUP_TOL times that the pair is taken as a duplicate
  # (distance exactly 0, gradient 0) rather than as sqrt(rounding noise).
  # This also makes the diagonal exactly 0.
  n = rows.shape[0]
  dup = (d2 <= _DUP_TOL * scale) | jnp.eye(n, dtype=bool)
  return _safe_sqrt(jnp.where(dup, 0.0, d2))


def _double_center(d: jax.Array, w: jax.Array) -> jax.Array:
  """A_ij = d_ij - d_i. - d_.j + d_.. with weighted means (weights w)."""
  # Elementwise sums, not matmuls: an f32 matmul may run in TF32 on GPUs.
  row = jnp.sum(d * w[None, :], axis=1)  # d_i. = sum_j w_j d_ij (= d_.i)
  grand = jnp.sum(w * row)
  return d - row[:, None] - row[None, :] + grand


def distance_correlation(x: jax.Array, z: jax.Array,
                         mask: jax.Array | None = None) -> jax.Array:
  """Sample distance correlation (V-statistic) between rows of x and z.

  x: [N, ...], z: [N, ...] (each row flattened; computed in float32).
  mask: optional [N] bool; rows where it is False are ignored exactly (the
  result equals the one on the kept rows; shapes stay fixed under jit).
  Returns a float32 scalar in [0, 1]; 0 when either side has zero distance
  variance (e.g. all kept rows equal, or no row kept). Differentiable, with
  finite gradients also for duplicate rows.
  """
  x = jnp.asarray(x, jnp.float32)
  z = jnp.asarray(z, jnp.float32)
  n = x.shape[0]
  if z.shape[0] != n:
    raise ValueError(f"distance_correlation: x has {n} rows but z has {z.shape[0]}")
  x = x.reshape(n, -1)
  z = z.reshape(n, -1)
  if mask is None:
    w = jnp.full((n,), 1.0 / n, jnp.float32)
  else:
    mask = jnp.asarray(mask)
    if mask.shape != (n,):
      raise ValueError(f"distance_correlation: mask must have shape ({n},), got {mask.shape}")
    m = mask.astype(jnp.float32)
    w = m / jnp.maximum(jnp.sum(m), 1.0)
    # Zero the ignored rows: they get weight 0 anyway, and this keeps any
    # inf/NaN padding in them out of the sums (and their gradient exactly 0).
    keep = (m > 0)[:, None]
    x = jnp.where(keep, x, 0.0)
    z = jnp.where(keep, z, 0.0)
  a = _double_center(_distances(x, w), w)
  b = _double_center(_distances(z, w), w)
  ww = w[:, None] * w[None, :]
  dcov_xz = jnp.sum(ww * a * b)
  dcov_xx = jnp.sum(ww * a * a)
  dcov_zz = jnp.sum(ww * b * b)
  denom = _safe_sqrt(dcov_xx * dcov_zz)
  ok = denom > 0
  dcor2 = jnp.where(ok, dcov_xz / jnp.where(ok, denom, 1.0), 0.0)
  return _safe_sqrt(jnp.minimum(dcor2, 1.0))


def mse(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-image mean squared error [N] over all non-batch axes (float32)."""
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  if a.shape != b.shape:
    raise ValueError(f"mse: shapes differ: {a.shape} vs {b.shape}")
  diff = (a - b).reshape(a.shape[0], -1)
  return jnp.mean(diff * diff, axis=1)


def psnr(a: jax.Array, b: jax.Array, data_range: float | jax.Array) -> jax.Array:
  """Per-image PSNR [N] in dB: 10 log10(data_range^2 / mse); inf where mse == 0.

  a: originals, b: reconstructions, same shape [N, ...]. data_range: the
  originals' dynamic range (see :func:`data_range`).
  """
  dr = jnp.asarray(data_range, jnp.float32)
  return 10.0 * jnp.log10(dr * dr / mse(a, b))


def _box_mean(v: jax.Array, win_size: int) -> jax.Array:
  """Mean over every full win_size x win_size window ('valid') of NHWC v."""
  s = jax.lax.reduce_window(v, 0.0, jax.lax.add, (1, win_size, win_size, 1),
                            (1, 1, 1, 1), "VALID")
  return s / float(win_size * win_size)


def ssim(a: jax.Array, b: jax.Array, data_range: float | jax.Array,
         win_size: int = 7) -> jax.Array:
  """Per-image mean SSIM [N] of NHWC batches a, b [N, H, W, C] (float32).

  Matches ``skimage.metrics.structural_similarity(a_i, b_i,
  data_range=data_range, channel_axis=-1)``: uniform win_size x win_size
  window, K1 = 0.01, K2 = 0.03, sample covariance (NP / (NP - 1)), mean over
  the positions whose window lies inside the image (skimage crops the
  window radius at every border), then over channels. win_size must be odd,
  >= 3 and <= min(H, W) (ValueError otherwise); it is static under jit.
  """
  a = jnp.asarray(a, jnp.float32)
  b = jnp.asarray(b, jnp.float32)
  if a.shape != b.shape:
    raise ValueError(f"ssim: shapes differ: {a.shape} vs {b.shape}")
  if a.ndim != 4:
    raise ValueError(f"ssim: expected NHWC images [N, H, W, C], got shape {a.shape}")
  win_size = int(win_size)
  if win_size < 3 or win_size % 2 != 1:
    raise ValueError(f"ssim: win_size must be odd and >= 3, got {win_size}")
  h, w = a.shape[1], a.shape[2]
  if win_size > min(h, w):
    raise ValueError(f"ssim: win_size {win_size} exceeds the image extent {h}x{w}; "
                     "pass an odd win_size <= min(H, W)")
  np_ = win_size * win_size
  cov_norm = np_ / (np_ - 1.0)
  # Variances and the covariance are shift-invariant: compute them on images
  # centred per image and channel, which avoids float32 cancellation in
  # E[x^2] - E[x]^2 for data with a large offset.
  ma = jnp.mean(a, axis=(1, 2), keepdims=True)
  mb = jnp.mean(b, axis=(1, 2), keepdims=True)
  ac, bc = a - ma, b - mb
  uac, ubc = _box_mean(ac, win_size), _box_mean(bc, win_size)
  ux, uy = uac + ma, ubc + mb
  vx = cov_norm * (_box_mean(ac * ac, win_size) - uac * uac)
  vy = cov_norm * (_box_mean(bc * bc, win_size) - ubc * ubc)
  vxy = cov_norm * (_box_mean(ac * bc, win_size) - uac * ubc)
  r = jnp.asarray(data_range, jnp.float32)
  c1 = (_K1 * r) ** 2
  c2 = (_K2 * r) ** 2
  s = ((2.0 * ux * uy + c1) * (2.0 * vxy + c2)) / (
      (ux * ux + uy * uy + c1) * (vx + vy + c2))
  # Every channel has the same number of valid positions, so the mean over
  # (H, W, C) is skimage's mean over positions, then over channels.
  return jnp.mean(s, axis=(1, 2, 3))
