"""Tests of sfljax.pooling.max_pool against flax's max_pool and a NumPy loop."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfljax.pooling import max_pool

CASES = [  # (shape, window, strides, padding)
    ((2, 9, 9, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),      # ResNet's stem pool, odd size
    ((2, 10, 11, 2), (3, 3), (2, 2), ((1, 1), (1, 1))),
    ((2, 8, 8, 2), (2, 2), (2, 2), "VALID"),
    ((1, 7, 6, 2), (3, 2), (1, 2), ((0, 1), (2, 0))),      # overlapping rows, odd padding
    ((1, 9, 8, 1), (3, 3), (3, 2), ((2, 0), (1, 1))),      # stride 3, uneven padding
]


def _reference_grad(x, g, window, strides, pads):
  """NumPy loops: each window's cotangent to its first maximum (row-major),
  padded positions counting as -inf."""
  x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
  (t, b), (l, r) = pads
  xp = np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)), constant_values=-np.inf)
  out = np.zeros_like(xp)
  kh, kw = window
  for n, i, j, c in np.ndindex(g.shape):
    win = xp[n, i * strides[0]:i * strides[0] + kh, j * strides[1]:j * strides[1] + kw, c]
    k = int(np.argmax(win.reshape(-1)))   # NumPy's argmax: the first maximum
    out[n, i * strides[0] + k // kw, j * strides[1] + k % kw, c] += g[n, i, j, c]
  return out[:, t:t + x.shape[1], l:l + x.shape[2]]


def _pads(padding):
  return ((0, 0), (0, 0)) if padding == "VALID" else padding


@pytest.mark.parametrize("shape,window,strides,padding", CASES)
def test_equals_flax_max_pool_and_numpy_loop_with_ties(shape, window, strides, padding):
  """Half-integer inputs (many ties, ReLU zeros) and integer cotangents, so
  every sum of routed cotangents is exact: value and gradient must equal
  nn.max_pool's and the NumPy loop's bit for bit."""
  x = jnp.maximum(jnp.round(jax.random.normal(jax.random.key(0), shape) * 2) / 2, 0.0)
  ref, ref_vjp = jax.vjp(lambda z: nn.max_pool(z, window, strides=strides, padding=padding), x)
  got, got_vjp = jax.vjp(lambda z: max_pool(z, window, strides, padding), x)
  g = jnp.round(jax.random.normal(jax.random.key(1), ref.shape) * 4)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  np.testing.assert_array_equal(np.asarray(got_vjp(g)[0]), np.asarray(ref_vjp(g)[0]))
  np.testing.assert_array_equal(np.asarray(got_vjp(g)[0]),
                                _reference_grad(x, g, window, strides, _pads(padding)))


def test_random_values_close_to_flax_under_jit_and_vmap():
  """Continuous inputs and cotangents, the stem's shape, jit + vmap."""
  x = jax.random.normal(jax.random.key(2), (3, 2, 12, 12, 4))
  f_ref = jax.vmap(lambda z: nn.max_pool(z, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1))))
  f_got = jax.jit(jax.vmap(lambda z: max_pool(z, (3, 3), (2, 2), ((1, 1), (1, 1)))))
  ref, ref_vjp = jax.vjp(f_ref, x)
  got, got_vjp = jax.vjp(f_got, x)
  g = jax.random.normal(jax.random.key(3), ref.shape)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  # Overlapping windows may add a shared maximum's cotangents in another order.
  np.testing.assert_allclose(np.asarray(got_vjp(g)[0]), np.asarray(ref_vjp(g)[0]),
                             rtol=1e-6, atol=1e-6)


def test_infinities_all_equal_windows_and_bfloat16():
  x = np.zeros((2, 7, 6, 3), np.float32)
  x[0, :3, :3, 0] = 1.0                      # a nine-way tie
  x[0, 2:5, :3, 1] = -np.inf                  # a window of -inf (ties the padding)
  x[1] = np.round(np.random.RandomState(0).standard_normal((7, 6, 3)))
  pads = ((1, 1), (1, 1))
  for dtype in (jnp.float32, jnp.bfloat16):
    xd = jnp.asarray(x, dtype)
    y, vjp = jax.vjp(lambda z: max_pool(z, 3, 2, pads), xd)
    ref = nn.max_pool(xd, (3, 3), strides=(2, 2), padding=pads)
    np.testing.assert_array_equal(np.asarray(y.astype(jnp.float32)),
                                  np.asarray(ref.astype(jnp.float32)))
    g = jnp.asarray(np.round(np.random.RandomState(1).standard_normal(y.shape)), dtype)
    got = vjp(g)[0]
    assert got.dtype == dtype
    np.testing.assert_array_equal(np.asarray(got.astype(jnp.float32)),
                                  _reference_grad(xd.astype(jnp.float32), g.astype(jnp.float32),
                                                  (3, 3), (2, 2), pads))


@pytest.mark.parametrize("kwargs,message", [
    (dict(window=0), "window must be"),
    (dict(window=(2, 2), padding="SAME"), "padding must be 'VALID'"),
    (dict(window=(2, 2), padding=((1, -1), (0, 0))), "two \\(lo, hi\\) pairs"),
    (dict(window=(12, 12)), "limited to 127"),
    (dict(window=(9, 2)), "larger than the padded input"),
])
def test_bad_arguments_are_refused(kwargs, message):
  with pytest.raises(ValueError, match=message):
    max_pool(jnp.zeros((1, 8, 8, 1)), **kwargs)
