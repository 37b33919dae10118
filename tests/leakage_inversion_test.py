"""Model inversion (sfljax.leakage.inversion): decoders on known cuts, PNG output."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from sfljax.leakage import inversion

# Small decoders so the file (compilation included) stays fast on a shared CPU.
FEATURES = 16


def _smooth_images(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
  """[n, size, size, 1] sums of three random 2-D sinusoids plus a little noise."""
  yy, xx = np.meshgrid(np.arange(size) / size, np.arange(size) / size, indexing="ij")
  out = np.zeros((n, size, size), np.float64)
  for _ in range(3):
    fy, fx = rng.uniform(-2.5, 2.5, (2, n, 1, 1))
    phase = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    amp = rng.uniform(0.5, 1.5, (n, 1, 1))
    out += amp * np.sin(2 * np.pi * (fy * yy + fx * xx) + phase)
  out += 0.05 * rng.standard_normal(out.shape)
  return out[..., None]


def _standardised_split(rng: np.random.Generator, n_train: int, n_test: int, size: int):
  """Train / held-out images, standardised by the TRAINING set's mean and std."""
  x = _smooth_images(rng, n_train + n_test, size)
  x = (x - x[:n_train].mean()) / x[:n_train].std()
  return x[:n_train].astype(np.float32), x[n_train:].astype(np.float32)


def _relative_mse(reconstructions, targets) -> float:
  """Independent NumPy check: mean squared error / variance of the targets."""
  r = np.asarray(reconstructions, np.float64)
  t = np.asarray(targets, np.float64)
  assert r.shape == t.shape
  return float(np.mean((r - t) ** 2) / np.var(t))


@pytest.mark.parametrize("n_train,size", [(512, 8), (256, 12)])
def test_identity_cut_is_reconstructed_on_held_out_images(n_train, size):
  """smashed == input: near-perfect reconstruction of images the decoder never saw."""
  x_train, x_test = _standardised_split(np.random.default_rng(size), n_train, n_train, size)
  decoder, params, loss = inversion.train_decoder(
      x_train, x_train, jax.random.key(0), steps=100, batch_size=32, features=FEATURES)
  assert decoder.output_shape == (size, size, 1)
  assert loss < 0.01 * float(np.var(x_train))
  rec = inversion.reconstruct(decoder, params, x_test)
  assert rec.shape == x_test.shape
  assert _relative_mse(rec, x_test) < 0.01


def _flat_problem(seed: int):
  """8x8 images; a linear invertible client: smashed = flatten(x) @ M, cond(M) <= 4."""
  rng = np.random.default_rng(seed)
  x_train, x_test = _standardised_split(rng, 512, 512, 8)
  q1, _ = np.linalg.qr(rng.standard_normal((64, 64)))
  q2, _ = np.linalg.qr(rng.standard_normal((64, 64)))
  m = (q1 * rng.uniform(0.5, 2.0, 64)) @ q2  # singular values in [0.5, 2]
  z_train = (x_train.reshape(512, -1) @ m).astype(np.float32)
  z_test = (x_test.reshape(512, -1) @ m).astype(np.float32)
  return x_train, x_test, z_train, z_test


# The flat decoder must learn a 64 -> 8*8*16 Dense map (no skip). With these settings the
# held-out relative MSE is ~0.04 (0.038-0.045 over 6 seeds), 2x below the bound, while 200 steps
# keep the run at a couple of seconds; the noise test shares the same compiled program.
FLAT_KW = dict(steps=200, batch_size=64, learning_rate=3e-3, features=FEATURES)


@pytest.fixture(scope="module")
def flat_run():
  x_train, x_test, z_train, z_test = _flat_problem(1)
  decoder, params, loss = inversion.train_decoder(z_train, x_train, jax.random.key(1), **FLAT_KW)
  return dict(x_test=x_test, z_train=z_train, x_train=x_train, z_test=z_test,
              decoder=decoder, params=params, loss=loss)


def test_flat_invertible_linear_cut_is_reconstructed(flat_run):
  rec = inversion.reconstruct(flat_run["decoder"], flat_run["params"], flat_run["z_test"])
  assert _relative_mse(rec, flat_run["x_test"]) < 0.1
  # Smaller chunks with a zero-padded last one (100 = 64 + 36) give the same rows.
  part = inversion.reconstruct(flat_run["decoder"], flat_run["params"], flat_run["z_test"][:100],
                               batch_size=64)
  np.testing.assert_allclose(part, rec[:100], rtol=1e-5, atol=1e-5)


def test_same_key_gives_bit_identical_params(flat_run):
  _, params, loss = inversion.train_decoder(
      flat_run["z_train"], flat_run["x_train"], jax.random.key(1), **FLAT_KW)
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)),
                      params, flat_run["params"])
  assert all(jax.tree.leaves(same))
  assert loss == flat_run["loss"]


def test_noise_cut_reveals_nothing_about_held_out_images():
  """smashed independent of the inputs: at best the mean is learned (relative MSE ~1; here
  ~1.8, the decoder overfits the noise)."""
  rng = np.random.default_rng(2)
  x_train, x_test = _standardised_split(rng, 512, 512, 8)
  z = rng.standard_normal((1024, 64)).astype(np.float32)
  rec, loss = inversion.invert(z[:512], x_train, z[512:], jax.random.key(2), **FLAT_KW)
  assert np.isfinite(loss)
  assert _relative_mse(rec, x_test) >= 0.8


def test_decoder_shapes_and_skip():
  """Output shapes for spatial (resized), flat and other-rank smashed data (shapes only)."""
  for smashed_shape, skip in [((2, 4, 4, 8), False), ((2, 4, 4, 3), True), ((2, 10), False),
                              ((2, 3, 5), False), ((2, 16, 16, 3), True)]:
    dec = inversion.Decoder(output_shape=(8, 8, 3), features=8)
    x = jax.ShapeDtypeStruct(smashed_shape, jnp.float32)
    variables = jax.eval_shape(dec.init, jax.random.key(0), x)
    out = jax.eval_shape(dec.apply, variables, x)
    assert out.shape == (2, 8, 8, 3)
    assert dec.has_skip(smashed_shape) == skip
    assert ("expand" in variables["params"]) == (len(smashed_shape) != 4)


def test_conv3x3_matches_lax_conv_values_and_gradients():
  """The custom VJP equals autodiff of lax.conv_general_dilated ('SAME', NHWC/HWIO)."""
  rng = np.random.default_rng(3)
  x, k, g = (rng.normal(size=s).astype(np.float32)
             for s in [(2, 5, 6, 3), (3, 3, 3, 4), (2, 5, 6, 4)])
  lax_conv = lambda a, b: jax.lax.conv_general_dilated(
      a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

  @jax.jit
  def both(x, k, g):
    (y, vjp), (y_ref, vjp_ref) = jax.vjp(inversion.conv3x3, x, k), jax.vjp(lax_conv, x, k)
    return y, y_ref, vjp(g), vjp_ref(g)

  y, y_ref, (gx, gk), (gx_ref, gk_ref) = both(x, k, g)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gk, gk_ref, rtol=1e-5, atol=1e-4)


# --- PNG ---------------------------------------------------------------------------------


@pytest.mark.parametrize("shape,mode", [((5, 7), "L"), ((5, 7, 1), "L"), ((4, 6, 3), "RGB")])
def test_write_png_round_trips_through_pillow(tmp_path, shape, mode):
  img = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
  path = tmp_path / "img.png"
  inversion.write_png(path, img)
  with Image.open(path) as f:
    assert f.format == "PNG" and f.mode == mode
    got = np.asarray(f)
  np.testing.assert_array_equal(got, img.reshape(got.shape))


def test_write_png_is_atomic_and_replaces(tmp_path):
  path = tmp_path / "out.png"
  path.write_bytes(b"old")
  inversion.write_png(str(path), np.zeros((3, 3), np.uint8))
  assert os.listdir(tmp_path) == ["out.png"]  # no temporary file left behind
  with Image.open(path) as f:
    assert f.size == (3, 3)
  with pytest.raises(ValueError):
    inversion.write_png(path, np.zeros((3, 3), np.float32))
  with pytest.raises(ValueError):
    inversion.write_png(path, np.zeros((3, 3, 2), np.uint8))
  assert os.listdir(tmp_path) == ["out.png"]


def _expected_grid(orig, rec, n, lo, hi, rgb):
  """Independent reference: pixel by pixel, cells of side H*s, white 1-px separators."""
  k = min(n, len(orig))
  h, w = orig.shape[1:3]
  s = -(-28 // min(h, w))
  chans = [0, 1, 2] if rgb else [0]
  grid = np.full((2 * h * s + 1, k * w * s + k - 1, len(chans)), 255, np.uint8)
  for row, imgs in enumerate((orig, rec)):
    for i in range(k):
      q = np.clip(np.round((imgs[i][..., chans] - lo) / (hi - lo) * 255.0), 0, 255)
      cell = np.kron(q, np.ones((s, s, 1))).astype(np.uint8)
      top, left = row * (h * s + 1), i * (w * s + 1)
      grid[top:top + h * s, left:left + w * s] = cell
  return grid if rgb else grid[..., 0]


@pytest.mark.parametrize("shape,n,rgb,data_range", [
    ((5, 8, 8, 1), 3, False, None),     # digits-sized: x4 -> 32-px cells
    ((4, 10, 10, 3), 16, True, None),   # n > N: all 4 shown; x3 -> 30-px cells
    ((3, 28, 28, 2), 2, False, None),   # C == 2: first channel, x1
    ((2, 8, 8, 1), 16, False, (-1.0, 1.0))])
def test_save_grid_pixels(tmp_path, shape, n, rgb, data_range):
  rng = np.random.default_rng(5)
  orig = rng.normal(size=shape).astype(np.float32)
  rec = (orig + 0.7 * rng.normal(size=shape)).astype(np.float32)  # some outside the range
  k = min(n, shape[0])
  if data_range is None:
    shown = orig[:k] if rgb else orig[:k, ..., :1]
    lo, hi = float(shown.min()), float(shown.max())
  else:
    lo, hi = data_range
  path = tmp_path / "grid.png"
  returned = inversion.save_grid(path, orig, rec, n=n, data_range=data_range)
  expected = _expected_grid(orig, rec, n, lo, hi, rgb)
  s = -(-28 // min(shape[1:3]))
  assert expected.shape[:2] == (2 * shape[1] * s + 1, k * shape[2] * s + k - 1)
  assert min(shape[1:3]) * s >= 28
  with Image.open(path) as f:
    assert f.mode == ("RGB" if rgb else "L")
    got = np.asarray(f)
  np.testing.assert_array_equal(got, expected)
  np.testing.assert_array_equal(returned, expected)
  assert os.listdir(tmp_path) == ["grid.png"]
