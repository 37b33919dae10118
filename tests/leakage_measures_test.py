"""sfljax.leakage.measures against independent references: a float64 NumPy
distance correlation written here, NumPy MSE, and scikit-image's PSNR/SSIM."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfljax.leakage import measures

skm = pytest.importorskip("skimage.metrics")


def _dcor_ref(x: np.ndarray, z: np.ndarray) -> float:
  """Distance correlation, V-statistic, float64, straight from the definition."""
  x = np.asarray(x, np.float64).reshape(len(x), -1)
  z = np.asarray(z, np.float64).reshape(len(z), -1)

  def centred(r):
    d = np.sqrt(((r[:, None, :] - r[None, :, :]) ** 2).sum(-1))
    return d - d.mean(axis=1, keepdims=True) - d.mean(axis=0, keepdims=True) + d.mean()

  a, b = centred(x), centred(z)
  dcov_xz, dcov_xx, dcov_zz = (a * b).mean(), (a * a).mean(), (b * b).mean()
  den = np.sqrt(dcov_xx * dcov_zz)
  return float(np.sqrt(max(dcov_xz / den, 0.0))) if den > 0 else 0.0


# Everything runs under jit with few distinct shapes: eager op-by-op dispatch
# compiles every primitive separately and is far slower here.
@jax.jit
def _dcor_masked(x, z, mask):
  return measures.distance_correlation(x, z, mask)


def _dcor(x, z, mask=None):
  """One compiled program per shape: no mask = an all-True mask."""
  return _dcor_masked(x, z, np.ones(len(x), bool) if mask is None else mask)


_dcor_value_and_grads_masked = jax.jit(
    jax.value_and_grad(measures.distance_correlation, argnums=(0, 1)))


def _dcor_value_and_grads(x, z, mask=None):
  return _dcor_value_and_grads_masked(
      x, z, np.ones(len(x), bool) if mask is None else mask)


@jax.jit
def _image_measures(a, b, dr):
  return measures.mse(a, b), measures.psnr(a, b, dr), measures.ssim(a, b, dr)


@pytest.mark.parametrize("xs,zs", [((40, 5, 3), (40, 7)), ((40, 5, 3), (40, 15))])
def test_dcor_matches_float64_reference(xs, zs):
  rng = np.random.default_rng(0)
  x = rng.normal(size=xs)
  # Dependent but not linearly: z mixes a nonlinear function of x with noise.
  xf = x.reshape(len(x), -1)
  proj = rng.normal(size=(xf.shape[1], int(np.prod(zs[1:]))))
  z = (np.tanh(xf @ proj) + 0.5 * rng.normal(size=(len(x), proj.shape[1]))).reshape(zs)
  got = float(_dcor(x.astype(np.float32), z.astype(np.float32)))
  want = _dcor_ref(x, z)
  assert 0.2 < want < 0.99
  np.testing.assert_allclose(got, want, rtol=1e-4)


def test_dcor_is_one_for_identity_and_affine():
  x = np.random.default_rng(1).normal(size=(40, 5, 3)).astype(np.float32)
  z = x.reshape(40, 15)  # the same rows, flattened: [40, 5, 3] vs [40, 15]
  assert abs(float(_dcor(x, z)) - 1.0) < 1e-5
  assert abs(float(_dcor(x, 3.0 * z + 2.0)) - 1.0) < 1e-5


def test_dcor_independent_is_small():
  # float64 reference over 30 seeds at this size (1-D vs 1-D, N = 500): mean
  # 0.079, max 0.119 (the V-statistic's finite-sample bias; sqrt(dCor^2) with
  # dCor^2 ~ 1/N). A strongly dependent pair gives ~0.5 or more.
  rng = np.random.default_rng(2)
  x, z = rng.normal(size=(500, 1)), rng.normal(size=(500, 1))
  got = float(_dcor(x, z))
  np.testing.assert_allclose(got, _dcor_ref(x, z), rtol=1e-3)
  assert got < 0.15
  assert float(_dcor(x, x ** 2 + 0.1 * z)) > 0.4


def test_dcor_mask_equals_subset():
  rng = np.random.default_rng(3)
  x = rng.normal(size=(40, 5, 3)).astype(np.float32)
  z = (x.reshape(40, -1)[:, :7] ** 2 + rng.normal(size=(40, 7))).astype(np.float32)
  mask = rng.random(40) < 0.6
  # Rows outside the mask hold wild values: they must not matter at all.
  x[~mask] = 1e3 * rng.normal(size=x[~mask].shape)
  z[~mask] = -1e3
  z[np.flatnonzero(~mask)[0]] = np.nan
  got = float(_dcor(x, z, jnp.asarray(mask)))
  np.testing.assert_allclose(got, _dcor_ref(x[mask], z[mask]), rtol=1e-4)
  assert float(_dcor(x, z, jnp.zeros(40, bool))) == 0.0


def _fd_grad_z(x: np.ndarray, z: np.ndarray, h: float = 1e-6) -> np.ndarray:
  """Central finite differences of the float64 reference w.r.t. z."""
  g = np.zeros_like(z)
  for idx in np.ndindex(z.shape):
    zp, zm = z.copy(), z.copy()
    zp[idx] += h
    zm[idx] -= h
    g[idx] = (_dcor_ref(x, zp) - _dcor_ref(x, zm)) / (2 * h)
  return g


@pytest.mark.parametrize("duplicates", [False, True])
def test_dcor_gradient_finite_and_matches_finite_differences(duplicates):
  rng = np.random.default_rng(4)
  x = rng.normal(size=(8, 3))
  z = np.tanh(x[:, :2]) + 0.5 * rng.normal(size=(8, 2))
  if duplicates:
    z[1] = z[0]
    z[5] = z[0]
    x[7] = x[6]
  _, (_, g) = _dcor_value_and_grads(x.astype(np.float32), z.astype(np.float32))
  g = np.asarray(g, np.float64)
  assert np.all(np.isfinite(g))
  # At duplicate rows |z_i - z_j| has a kink; the central difference takes the
  # symmetric derivative there (0 for that pair), which is what the safe sqrt
  # gives, so the comparison holds with duplicates too.
  fd = _fd_grad_z(x, z)
  np.testing.assert_allclose(g, fd, rtol=1e-3, atol=1e-3 * np.abs(fd).max())


def test_dcor_gradient_with_mask_ignores_padding():
  rng = np.random.default_rng(6)
  x = rng.normal(size=(8, 3))
  z = np.tanh(x[:, :2]) + 0.5 * rng.normal(size=(8, 2))
  mask = np.array([1, 1, 0, 1, 1, 1, 0, 1], bool)
  x[~mask], z[2], z[6] = 0.0, np.nan, 0.0  # padding rows, one of them NaN
  value, (gx, gz) = _dcor_value_and_grads(x.astype(np.float32), z.astype(np.float32),
                                          mask)
  np.testing.assert_allclose(float(value), _dcor_ref(x[mask], z[mask]), rtol=1e-4)
  gz = np.asarray(gz, np.float64)
  assert np.all(np.isfinite(gz)) and np.all(np.isfinite(np.asarray(gx)))
  assert np.all(gz[~mask] == 0.0)
  np.testing.assert_allclose(gz[mask], _fd_grad_z(x[mask], z[mask]), rtol=1e-3,
                             atol=1e-3 * np.abs(gz).max())


def test_dcor_gradient_finite_for_all_equal_rows():
  z = np.ones((8, 2), np.float32)
  x = np.random.default_rng(5).normal(size=(8, 3)).astype(np.float32)
  value, g = _dcor_value_and_grads(x, z)
  assert all(np.all(np.isfinite(np.asarray(gi))) for gi in g)
  assert float(value) == 0.0


def test_dcor_zero_for_empirically_independent_sample():
  # Each of the 4 distinct x rows appears once with z = 0 and once with z = 1:
  # the sample's joint distribution is the product of its marginals, so the
  # V-statistic dCov^2(x, z) is exactly 0 (while dVar(x), dVar(z) > 0). dCor
  # is then 0 and its gradient must stay finite (sqrt at 0).
  x = np.zeros((8, 3), np.float32)
  z = np.zeros((8, 2), np.float32)
  x[:, 0] = [0, 0, 1, 1, 0, 0, 1, 1]
  x[:, 1] = [0, 0, 0, 0, 2, 2, 2, 2]
  z[:, 0] = [0, 1, 0, 1, 0, 1, 0, 1]
  assert _dcor_ref(x, z) == 0.0
  value, g = _dcor_value_and_grads(x, z)
  assert abs(float(value)) < 1e-6
  assert all(np.all(np.isfinite(np.asarray(gi))) for gi in g)


def test_dcor_duplicates_at_realistic_width():
  # 28x28 "images" vs 128 ReLU activations, with repeated rows and dead
  # (all-zero) activation rows. In float32 the Gram-matrix squared distance
  # of two equal rows is rounding noise (~1e-7 of |r|^2), whose square root
  # would give a visible error; the measure must count them as 0 (on this
  # seed, without that the relative error is 1.6e-4).
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 784))
  z = np.maximum(x @ rng.normal(size=(784, 128)) / 28 - 1.0, 0.0)
  z[5:12] = z[4]
  x[20:25] = x[19]
  z[30:33] = 0.0
  got = float(_dcor(x.astype(np.float32), z.astype(np.float32)))
  np.testing.assert_allclose(got, _dcor_ref(x, z), rtol=1e-5)


def _images(kind: str, shape: tuple[int, ...], seed: int) -> tuple[np.ndarray, np.ndarray]:
  """(original, reconstruction) pairs, float32, NHWC."""
  rng = np.random.default_rng(seed)
  n, h, w, c = shape
  if kind == "random":
    a = rng.normal(size=shape)
    b = a + 0.7 * rng.normal(size=shape)
  else:  # smooth structure: gradients and blobs plus a little noise
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    a = np.stack([np.stack([np.sin(3 * (i + 1) * xx + ch) + yy * (ch - 1)
                            + np.exp(-((xx - 0.3 * i) ** 2 + yy ** 2) * 4)
                            for ch in range(c)], -1) for i in range(n)])
    a = a + 0.05 * rng.normal(size=shape)
    b = 0.8 * a + 0.2 + 0.15 * rng.normal(size=shape)
  return a.astype(np.float32), b.astype(np.float32)


@pytest.mark.parametrize("kind", ["random", "smooth"])
@pytest.mark.parametrize("shape", [(2, 28, 28, 3), (2, 8, 8, 1)])
def test_mse_psnr_ssim_match_numpy_and_skimage(kind, shape):
  a, b = _images(kind, shape, seed=sum(shape) + 100 * (kind == "smooth"))
  dr = measures.data_range(a)
  assert dr == pytest.approx(float(a.max()) - float(a.min()))
  assert dr > 2.0  # standardised-like data, not [0, 1]
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  got_mse, got_psnr, got_ssim = (np.asarray(v) for v in _image_measures(a, b, dr))
  np.testing.assert_allclose(got_mse, ((a64 - b64) ** 2).mean(axis=(1, 2, 3)), rtol=1e-5)
  np.testing.assert_allclose(
      got_psnr,
      [skm.peak_signal_noise_ratio(a64[i], b64[i], data_range=dr) for i in range(len(a))],
      atol=1e-4)
  want = [skm.structural_similarity(a64[i], b64[i], data_range=dr, channel_axis=-1)
          for i in range(len(a))]
  np.testing.assert_allclose(got_ssim, want, atol=1e-4)
  assert np.all(np.abs(got_ssim) < 0.999)


def test_ssim_other_window_and_data_range_and_jit():
  a, b = _images("smooth", (2, 28, 28, 3), seed=7)
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  dr, win = 1.0, 5
  got = np.asarray(jax.jit(measures.ssim, static_argnums=3)(a, b, dr, win))
  want = [skm.structural_similarity(a64[i], b64[i], data_range=dr, channel_axis=-1,
                                    win_size=win) for i in range(2)]
  np.testing.assert_allclose(got, want, atol=1e-4)


def test_identical_images():
  a, _ = _images("smooth", (2, 8, 8, 1), seed=8)
  dr = measures.data_range(a)
  got_mse, got_psnr, got_ssim = (np.asarray(v) for v in _image_measures(a, a, dr))
  np.testing.assert_allclose(got_ssim, 1.0, atol=1e-6)
  assert np.all(np.isinf(got_psnr))
  assert np.all(got_mse == 0.0)


@pytest.mark.parametrize("win", [6, 9, 1, 0])
def test_ssim_bad_window_raises(win):
  a = np.zeros((1, 8, 8, 1), np.float32)
  with pytest.raises(ValueError, match="win_size"):
    measures.ssim(a, a, 1.0, win_size=win)


def test_ssim_bad_shape_raises():
  a = np.zeros((8, 8, 1), np.float32)
  with pytest.raises(ValueError, match="NHWC"):
    measures.ssim(a, a, 1.0)
