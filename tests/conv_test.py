"""Tests for sfljax.conv: every lowering against a float64 numpy reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfljax import conv

LOWERINGS = ["xla", "patches", "taps", "auto"]
MIXED = [("taps", "patches", "xla"), ("patches", "xla", "taps")]

# (name, batch, H, W, C_in, C_out, k, stride, padding): LeNet's and (shrunk)
# ResNet18's layer shapes plus odd sizes, asymmetric (explicit and SAME) and
# unused-row paddings.
SHAPES = [
    ("lenet_conv1", 2, 28, 28, 1, 6, 5, 1, "SAME"),
    ("lenet_conv2", 2, 14, 14, 6, 16, 5, 1, "VALID"),
    ("stem_k7s2", 2, 16, 16, 3, 8, 7, 2, ((3, 3), (3, 3))),
    ("k3s1", 2, 8, 8, 16, 16, 3, 1, ((1, 1), (1, 1))),
    ("k3s2", 2, 8, 8, 16, 32, 3, 2, ((1, 1), (1, 1))),
    ("k1s2", 2, 8, 8, 16, 32, 1, 2, "VALID"),
    ("2x2_k3", 3, 2, 2, 32, 32, 3, 1, ((1, 1), (1, 1))),
    ("4x4-2x2_k3s2", 2, 4, 4, 16, 32, 3, 2, ((1, 1), (1, 1))),
    ("cin1_same_s2_odd", 2, 7, 9, 1, 4, 3, 2, "SAME"),
    ("asym_pad", 2, 6, 5, 3, 2, 3, 2, ((0, 1), (2, 0))),
    ("valid_s2_unused_row", 2, 10, 10, 2, 3, 3, 2, "VALID"),
    ("k5s2_same_asym", 2, 10, 9, 4, 5, 5, 2, "SAME"),  # SAME pads H by (1, 2)
]


def _ref_pads(padding, in_hw, kernel_hw, strides):
  """Explicit ((lo, hi), (lo, hi)) padding, computed here independently of
  ``conv.normalize_padding`` (which every lowering uses): 'SAME' gives
  ceil(n / s) outputs with the odd pixel at the end, as XLA / TensorFlow."""
  if isinstance(padding, str):
    if padding == "VALID":
      return ((0, 0), (0, 0))
    assert padding == "SAME", padding
    pads = []
    for n, k, s in zip(in_hw, kernel_hw, strides):
      total = max((-(-n // s) - 1) * s + k - n, 0)
      pads.append((total // 2, total - total // 2))
    return tuple(pads)
  return tuple(tuple(p) for p in padding)


def _ref(x, w, g, strides, padding):
  """float64 numpy forward, and with a cotangent ``g`` the input and kernel
  gradients (else None, None)."""
  x, w = np.asarray(x, np.float64), np.asarray(w, np.float64)
  kh, kw, _, _ = w.shape
  s = (strides, strides) if isinstance(strides, int) else strides
  (t, b), (l, r) = _ref_pads(padding, x.shape[1:3], (kh, kw), s)
  xp = np.pad(x, ((0, 0), (t, b), (l, r), (0, 0)))
  ho = (xp.shape[1] - kh) // s[0] + 1
  wo = (xp.shape[2] - kw) // s[1] + 1
  y = np.zeros((x.shape[0], ho, wo, w.shape[3]))
  if g is not None:
    g = np.asarray(g, np.float64)
    assert g.shape == y.shape, (g.shape, y.shape)
  dxp = np.zeros_like(xp)
  dw = np.zeros_like(w)
  for i in range(kh):
    for j in range(kw):
      sl = (slice(None), slice(i, i + s[0] * (ho - 1) + 1, s[0]),
            slice(j, j + s[1] * (wo - 1) + 1, s[1]))
      y += np.einsum("nhwc,cd->nhwd", xp[sl], w[i, j])
      if g is not None:
        dxp[sl] += np.einsum("nhwd,cd->nhwc", g, w[i, j])
        dw[i, j] = np.einsum("nhwc,nhwd->cd", xp[sl], g)
  if g is None:
    return y, None, None
  dx = dxp[:, t:t + x.shape[1], l:l + x.shape[2]]
  return y, dx, dw


def _data(b, h, w_, cin, cout, k, dtype=np.float32, seed=0):
  rs = np.random.RandomState(seed)
  x = rs.standard_normal((b, h, w_, cin)).astype(dtype)
  w = (rs.standard_normal((k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(dtype)
  return x, w


def _case(shape):
  """Inputs, a cotangent and the float64 (forward, input grad, kernel grad) of a SHAPES row."""
  _, b, h, wd, cin, cout, k, s, pad = shape
  x, w = _data(b, h, wd, cin, cout, k)
  y_ref, _, _ = _ref(x, w, None, s, pad)
  g = np.random.RandomState(1).standard_normal(y_ref.shape).astype(np.float32)
  return x, w, g, s, pad, _ref(x, w, g, s, pad)


def _vjp_fn(strides, padding, lowering):
  def f(x, w, g):
    y, vjp = jax.vjp(lambda x, w: conv.conv2d(x, w, strides=strides, padding=padding,
                                              lowering=lowering), x, w)
    return (y,) + vjp(g)
  return jax.jit(f)


def _check(got, want, rtol=2e-5):
  got = np.asarray(got, np.float64)
  scale = max(1.0, float(np.abs(want).max()))
  np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale)


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_lowerings_match_float64_reference(shape):
  x, w, g, s, pad, (y_ref, dx_ref, dw_ref) = _case(shape)
  for lowering in LOWERINGS:
    y, dx, dw = _vjp_fn(s, pad, lowering)(x, w, g)
    assert y.shape == y_ref.shape and y.dtype == jnp.float32, lowering
    _check(y, y_ref)
    _check(dx, dx_ref)
    _check(dw, dw_ref)


@pytest.mark.parametrize("shape", SHAPES, ids=[s[0] for s in SHAPES])
def test_xla_input_gradient_inside_the_custom_vjp(shape):
  # The 'xla' input gradient builds the transposed convolution itself (not
  # through jax.vjp): every stride, padding and odd size against float64.
  x, w, g, s, pad, (_, dx_ref, _) = _case(shape)
  _, dx, _ = _vjp_fn(s, pad, ("patches", "xla", "patches"))(x, w, g)
  _check(dx, dx_ref)


def test_xla_input_gradient_kernel_is_hwio():
  # The input gradient's convolution takes its kernel as HWIO, transposed by
  # sfljax (jax's own transpose rule gives XLA an HWOI kernel, which XLA:CPU
  # runs ~4x slower inside loops: see conv._input_grad_xla).
  import re
  x, w = jnp.zeros((2, 8, 8, 16)), jnp.zeros((3, 3, 16, 16))
  f = jax.jit(jax.grad(lambda x, w: conv.conv2d(x, w, lowering=("patches", "xla", "patches"))
                       .sum()))
  kernels = re.findall(r"dim_numbers = \[b, 0, 1, f\]x\[([^\]]*)\]", f.lower(x, w).as_text())
  assert kernels == ["0, 1, i, o"], kernels


@pytest.mark.parametrize("shape", [SHAPES[4], SHAPES[6], SHAPES[9]],
                         ids=[SHAPES[i][0] for i in (4, 6, 9)])
def test_mixed_lowerings(shape):
  x, w, g, s, pad, (y_ref, dx_ref, dw_ref) = _case(shape)
  for lowering in MIXED:
    for got, want in zip(_vjp_fn(s, pad, lowering)(x, w, g), (y_ref, dx_ref, dw_ref)):
      _check(got, want)


@pytest.mark.parametrize("shape", [SHAPES[4], SHAPES[9]], ids=[SHAPES[i][0] for i in (4, 9)])
@pytest.mark.parametrize("lowering", ["patches", ("patches", "patches", "patches")])
def test_patches_batch_chunks_with_remainder(monkeypatch, lowering, shape):
  # Tiny chunks: 5 samples -> chunks of 2 plus a remainder of 1; 16 input
  # channels (im2col on the last axis) and 3 (the kernel gradient's taps
  # stacked on a leading axis).
  _, b, h, wd, cin, cout, k, s, pad = shape
  b = 5
  x, w = _data(b, h, wd, cin, cout, k)
  _, ho, wo, _ = _ref(x, w, None, s, pad)[0].shape
  monkeypatch.setattr(conv, "CHUNK_BYTES", 2 * ho * wo * k * k * cin * 4)
  g = np.random.RandomState(2).standard_normal((b, ho, wo, cout)).astype(np.float32)
  y_ref, dx_ref, dw_ref = _ref(x, w, g, s, pad)
  y, dx, dw = _vjp_fn(s, pad, lowering)(x, w, g)
  _check(y, y_ref)
  _check(dx, dx_ref)
  _check(dw, dw_ref)


@pytest.mark.parametrize("lowering", ["xla", "patches", "taps", "auto"])
def test_bfloat16_in_bfloat16_out(lowering):
  _, b, h, wd, cin, cout, k, s, pad = SHAPES[4]
  x, w = _data(b, h, wd, cin, cout, k)
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  g = jnp.asarray(np.random.RandomState(3).standard_normal((b, 4, 4, cout)), jnp.bfloat16)
  y, dx, dw = _vjp_fn(s, pad, lowering)(xb, wb, g)
  assert y.dtype == dx.dtype == dw.dtype == jnp.bfloat16
  y_ref, dx_ref, dw_ref = _ref(np.asarray(xb, np.float32), np.asarray(wb, np.float32),
                               np.asarray(g, np.float32), s, pad)
  _check(y, y_ref, rtol=3e-2)
  _check(dx, dx_ref, rtol=3e-2)
  _check(dw, dw_ref, rtol=3e-2)


@pytest.mark.parametrize("lowering", ["xla", "patches", "taps", "auto"])
def test_vmap_over_batched_kernels_matches_loop(lowering):
  # Per-client kernels, as the library vmaps the client half over clients.
  clients, b, h, cin, cout, k, s, pad = 3, 2, 6, 4, 5, 3, 2, "SAME"
  rs = np.random.RandomState(4)
  xs = rs.standard_normal((clients, b, h, h, cin)).astype(np.float32)
  ws = rs.standard_normal((clients, k, k, cin, cout)).astype(np.float32)
  gs = rs.standard_normal((clients, b, 3, 3, cout)).astype(np.float32)

  def one(x, w, g):
    y, vjp = jax.vjp(lambda x, w: conv.conv2d(x, w, strides=s, padding=pad,
                                              lowering=lowering), x, w)
    return (y,) + vjp(g)

  batched = jax.jit(jax.vmap(one))(xs, ws, gs)
  for c in range(clients):
    ref = _ref(xs[c], ws[c], gs[c], s, pad)
    for got, want in zip(batched, ref):
      _check(got[c], want)


def _ref_scan_grads(ws, x):
  """float64 numpy gradients of sum(h_L ** 2), h_l = tanh(conv(h_{l-1}, ws[l])), h_0 = x
  (SAME, stride 1), by backpropagation through :func:`_ref`: (d/dws, d/dx)."""
  hs = [np.asarray(x, np.float64)]
  for w in ws:
    hs.append(np.tanh(_ref(hs[-1], w, None, 1, "SAME")[0]))
  dh, dws = 2 * hs[-1], [None] * len(ws)
  for l in reversed(range(len(ws))):
    _, dh, dws[l] = _ref(hs[l], ws[l], dh * (1 - hs[l + 1] ** 2), 1, "SAME")
  return np.stack(dws), dh


def test_grad_under_scan_and_jit():
  rs = np.random.RandomState(5)
  x = rs.standard_normal((2, 4, 4, 8)).astype(np.float32)
  ws = (rs.standard_normal((3, 3, 3, 8, 8)) / 8).astype(np.float32)

  def loss(ws, x, lowering):
    def body(h, w):
      return jnp.tanh(conv.conv2d(h, w, strides=1, padding="SAME", lowering=lowering)), None
    h, _ = jax.lax.scan(body, x, ws)
    return jnp.sum(h ** 2)

  # Against an independent float64 reference, not against the 'xla' lowering:
  # on a GPU 'auto' *is* 'xla', and on CPU it is 'patches' here.
  ref = _ref_scan_grads(ws, x)
  for lowering in LOWERINGS:
    got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(ws, x, lowering)
    for a, r in zip(got, ref):
      _check(a, r, rtol=1e-4)


def test_auto_rule():
  auto = conv.auto_lowering
  assert auto((8, 4, 4, 256), (3, 3, 256, 512), (2, 2), backend="gpu") == ("xla",) * 3
  assert auto((8, 2, 2, 512), (3, 3, 512, 512), (1, 1), backend="gpu") == ("xla",) * 3
  for xs, ws, s in [((8, 2, 2, 512), (3, 3, 512, 512), (1, 1)),
                    ((8, 4, 4, 256), (3, 3, 256, 512), (2, 2)),
                    ((8, 28, 28, 1), (5, 5, 1, 6), (1, 1))]:
    methods = auto(xs, ws, s, backend="cpu")
    assert len(methods) == 3 and all(m in conv.METHODS for m in methods)
  # The pathological XLA:CPU cases are never left to XLA's input gradient.
  assert auto((8, 2, 2, 512), (3, 3, 512, 512), (1, 1), backend="cpu")[1] != "xla"
  assert auto((8, 4, 4, 256), (3, 3, 256, 512), (2, 2), backend="cpu")[1] != "xla"


def test_bad_arguments():
  x, w = _data(1, 4, 4, 2, 3, 3)
  with pytest.raises(ValueError, match="unknown lowering"):
    conv.conv2d(x, w, lowering="nope")
  with pytest.raises(ValueError, match="input channels"):
    conv.conv2d(x, np.zeros((3, 3, 5, 3), np.float32))
  with pytest.raises(ValueError, match="padding"):
    conv.conv2d(x, w, padding="CIRCULAR")


@pytest.mark.parametrize("kwargs", [
    dict(features=6, kernel_size=(5, 5), padding="SAME"),
    dict(features=8, kernel_size=(7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), use_bias=False),
    dict(features=4, kernel_size=(1, 1), strides=(2, 2), padding="VALID", use_bias=False),
    dict(features=5, kernel_size=(3, 3), padding="VALID"),
])
def test_conv_module_matches_flax(kwargs):
  x = jnp.asarray(np.random.RandomState(6).standard_normal((2, 9, 9, 3)), jnp.float32)
  ref_mod = nn.Conv(**kwargs)
  ref_vars = jax.jit(ref_mod.init)(jax.random.key(0), x)
  for lowering in ("auto", "patches"):
    mod = conv.Conv(**kwargs, lowering=lowering)
    vars_ = jax.jit(mod.init)(jax.random.key(0), x)
    assert (jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), vars_)
            == jax.tree_util.tree_map(lambda a: (a.shape, a.dtype), ref_vars))
    # Same initialisers with the same key -> identical parameters.
    for a, r in zip(jax.tree_util.tree_leaves(vars_), jax.tree_util.tree_leaves(ref_vars)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(r))
    np.testing.assert_allclose(np.asarray(jax.jit(mod.apply)(ref_vars, x)),
                               np.asarray(ref_mod.apply(ref_vars, x)), rtol=1e-5, atol=1e-5)
