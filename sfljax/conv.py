"""2-D convolution with CPU-friendly forward and gradient lowerings.

XLA:CPU lowers some convolution gradients very poorly (openxla/xla#34273,
jax#31662): e.g. the input gradient of ResNet18's 2x2 512->512 3x3 layer runs
at ~3 GFLOP/s on the 2-core development machine, where a plain matmul reaches
~180 GFLOP/s.  :func:`conv2d` computes the forward pass, the input gradient
and the kernel gradient each with its own formulation (a ``jax.custom_vjp``):

* ``xla``     : ``lax.conv_general_dilated`` and its transposes (the input
                gradient's built here with an HWIO kernel, see
                ``_input_grad_xla``);
* ``patches`` : im2col by shifted strided slices + one matmul (forward),
                cotangent @ kernel^T + col2im by a sum of (interior-)padded
                slices (input gradient), patches^T @ cotangent (kernel
                gradient);
* ``taps``    : per kernel tap (i, j) a shifted slice times ``kernel[i, j]``
                accumulated (forward; input gradient likewise; kernel
                gradient = one small contraction per tap).  No k*k-times
                larger patch matrix is materialised, good for tiny C_in.

A *lowering* is a triple ``(forward, input_grad, kernel_grad)`` of those
method names; ``lowering="auto"`` picks it per layer from static shapes with
:func:`auto_lowering` (a rule measured on CPU, see there); on non-CPU
backends ``auto`` always means plain XLA.  Layout: NHWC inputs, HWIO kernels.
:class:`Conv` is a drop-in for ``flax.linen.Conv`` (same parameter names and
shapes) that uses :func:`conv2d`.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

__all__ = ["METHODS", "LOWERINGS", "Conv", "auto_lowering", "conv2d", "normalize_padding"]

METHODS = ("xla", "patches", "taps")
# Named lowerings: (forward, input gradient, kernel gradient).
LOWERINGS: dict[str, tuple[str, str, str]] = {
    "xla": ("xla", "xla", "xla"),
    "patches": ("patches", "patches", "patches"),
    "taps": ("taps", "taps", "taps"),
}

_DN = ("NHWC", "HWIO", "NHWC")


# ---------------------------------------------------------------------------
# Static shape helpers
# ---------------------------------------------------------------------------


def _pair(v, what: str) -> tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  v = tuple(int(a) for a in v)
  if len(v) != 2:
    raise ValueError(f"{what} must be an int or a pair, got {v}")
  return v


def normalize_padding(padding, in_hw, kernel_hw, strides) -> tuple[tuple[int, int], tuple[int, int]]:
  """'SAME' / 'VALID' / int / ((lo, hi), (lo, hi)) -> explicit ((lo, hi), (lo, hi))."""
  if isinstance(padding, str):
    p = padding.upper()
    if p not in ("SAME", "VALID"):
      raise ValueError(f"unsupported padding {padding!r}: use 'SAME', 'VALID' or explicit pairs")
    pads = lax.padtype_to_pads(tuple(in_hw), tuple(kernel_hw), tuple(strides), p)
    return tuple((int(lo), int(hi)) for lo, hi in pads)
  if isinstance(padding, int):
    return ((padding, padding), (padding, padding))
  pads = tuple(padding)
  if len(pads) != 2:
    raise ValueError(f"padding must have one entry per spatial dim, got {padding!r}")
  out = []
  for p in pads:
    lo, hi = (p, p) if isinstance(p, int) else tuple(int(a) for a in p)
    if lo < 0 or hi < 0:
      raise ValueError(f"negative padding is not supported: {padding!r}")
    out.append((lo, hi))
  return tuple(out)


def _out_size(n: int, k: int, s: int, lo: int, hi: int) -> int:
  return (n + lo + hi - k) // s + 1


# ---------------------------------------------------------------------------
# Building blocks (all work for any leading batch shape handled by vmap)
# ---------------------------------------------------------------------------


def _dot(a, b, contract_a, contract_b, out_dtype):
  """dot_general accumulating in fp32 for low-precision inputs."""
  pet = jnp.float32 if a.dtype in (jnp.bfloat16, jnp.float16) else None
  y = lax.dot_general(a, b, ((contract_a, contract_b), ((), ())), preferred_element_type=pet)
  return y.astype(out_dtype)


def _pad_x(x, pads):
  (t, b), (l, r) = pads
  if t == b == l == r == 0:
    return x
  return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (t, b, 0), (l, r, 0), (0, 0, 0)))


def _tap(xp, i, j, s, ho, wo):
  """xp[:, i : i + s*(ho-1) + 1 : s, j : j + s*(wo-1) + 1 : s, :]."""
  n, _, _, c = xp.shape
  return lax.slice(xp, (0, i, j, 0), (n, i + s[0] * (ho - 1) + 1, j + s[1] * (wo - 1) + 1, c),
                   (1, s[0], s[1], 1))


def _untap(t, i, j, s, hp, wp):
  """Transpose of :func:`_tap`: places ``t`` (N, ho, wo, C) into zeros (N, hp, wp, C)."""
  _, ho, wo, _ = t.shape
  hi_h = hp - i - (s[0] * (ho - 1) + 1)
  hi_w = wp - j - (s[1] * (wo - 1) + 1)
  return lax.pad(t, jnp.zeros((), t.dtype),
                 ((0, 0, 0), (i, hi_h, s[0] - 1), (j, hi_w, s[1] - 1), (0, 0, 0)))


def _im2col(x, kh, kw, s, pads, ho, wo):
  xp = _pad_x(x, pads)
  cols = [_tap(xp, i, j, s, ho, wo) for i in range(kh) for j in range(kw)]
  return cols[0] if len(cols) == 1 else jnp.concatenate(cols, axis=-1)  # (N, ho, wo, kh*kw*C)


# Batch chunk size for 'patches': the im2col matrix of one chunk should stay
# in cache (one 256-sample, 151 MB patch matrix of a 16x16x64 3x3 layer costs
# more to write and read than XLA's whole conv; 4-sample chunks cut that
# layer's kernel gradient 572 -> 121 ms).
CHUNK_BYTES = 4 << 20


def _chunk_size(n: int, per_sample_bytes: int) -> int:
  return int(max(1, min(n, CHUNK_BYTES // max(1, per_sample_bytes))))


def _map_batch(f, cs, *xs):
  """f over batch chunks of size cs (leading axis), outputs concatenated."""
  n = xs[0].shape[0]
  nc, r = divmod(n, cs)
  if nc <= 1:
    return f(*xs)
  main = tuple(x[:nc * cs].reshape((nc, cs) + x.shape[1:]) for x in xs)
  out = lax.map(lambda a: f(*a), main)
  out = out.reshape((nc * cs,) + out.shape[2:])
  if r:
    out = jnp.concatenate([out, f(*(x[nc * cs:] for x in xs))])
  return out


def _sum_batch(f, cs, *xs):
  """Sum of f over batch chunks of size cs (leading axis)."""
  n = xs[0].shape[0]
  nc, r = divmod(n, cs)
  if nc <= 1:
    return f(*xs)
  main = tuple(x[:nc * cs].reshape((nc, cs) + x.shape[1:]) for x in xs)
  first = f(*(m[0] for m in main))
  out, _ = lax.scan(lambda acc, a: (acc + f(*a), None), first, tuple(m[1:] for m in main))
  if r:
    out = out + f(*(x[nc * cs:] for x in xs))
  return out


def _crop(dxp, pads, h, w):
  (t, _), (l, _) = pads
  n, _, _, c = dxp.shape
  return lax.slice(dxp, (0, t, l, 0), (n, t + h, l + w, c))


# ---------------------------------------------------------------------------
# Forward / input-gradient / kernel-gradient formulations
# ---------------------------------------------------------------------------


_TAPS_ELEMENTWISE_CIN = 4
_TAPS_PLANAR_COUT = 16   # 'taps' forward with few channels: per output channel over planes
_STACKED_COLS_CIN = 8   # 'patches' kernel gradient: taps stacked on a leading axis below this


def _fwd(method, x, w, s, pads):
  kh, kw, cin, cout = w.shape
  ho = _out_size(x.shape[1], kh, s[0], *pads[0])
  wo = _out_size(x.shape[2], kw, s[1], *pads[1])
  out_dtype = jnp.result_type(x.dtype, w.dtype)
  if method == "xla":
    pet = jnp.float32 if out_dtype in (jnp.bfloat16, jnp.float16) else None
    return lax.conv_general_dilated(x, w, s, pads, dimension_numbers=_DN,
                                    preferred_element_type=pet).astype(out_dtype)
  if method == "patches":
    w2 = w.reshape(kh * kw * cin, cout)
    cs = _chunk_size(x.shape[0], ho * wo * kh * kw * cin * 4)
    return _map_batch(lambda xc: _dot(_im2col(xc, kh, kw, s, pads, ho, wo), w2, (3,), (0,),
                                      out_dtype), cs, x)
  if method == "taps":
    xp = _pad_x(x, pads)
    if cin <= _TAPS_ELEMENTWISE_CIN and cout <= _TAPS_PLANAR_COUT:
      return _fwd_taps_planar(xp, w, s, ho, wo).astype(out_dtype)
    acc = None
    for i in range(kh):
      for j in range(kw):
        t = _tap(xp, i, j, s, ho, wo)
        if cin <= _TAPS_ELEMENTWISE_CIN:  # broadcast multiply-adds, one fused loop
          tf, wf = t.astype(jnp.float32), w[i, j].astype(jnp.float32)
          for c in range(cin):
            term = tf[..., c:c + 1] * wf[c]
            acc = term if acc is None else acc + term
          continue
        term = _dot(t, w[i, j], (3,), (0,), jnp.float32)
        acc = term if acc is None else acc + term
    return acc.astype(out_dtype)
  raise ValueError(f"unknown forward method {method!r}")


def _fwd_taps_planar(xp, w, s, ho, wo):
  """'taps' forward for few input and output channels, one output channel at a
  time over [N, H, W] planes (W innermost), stacked on the last axis at the
  end: the same products summed in the same order (i, j, input channel) as
  the channels-last broadcast, so bit for bit the same values. LeNet's conv1
  (1 -> 6 channels, 5x5) with its ReLU and pool, in a scanned step on the
  2-core Xeon: 62 -> 31 ms at batch 1024, 2.9 -> 1.6 ms at batch 32."""
  kh, kw, cin, cout = w.shape
  n = xp.shape[0]
  planes = [xp[..., c].astype(jnp.float32) for c in range(cin)]
  wf = w.astype(jnp.float32)
  chans = []
  for o in range(cout):
    acc = None
    for i in range(kh):
      for j in range(kw):
        for c in range(cin):
          t = lax.slice(planes[c], (0, i, j), (n, i + s[0] * (ho - 1) + 1, j + s[1] * (wo - 1) + 1),
                        (1, s[0], s[1]))
          term = t * wf[i, j, c, o]
          acc = term if acc is None else acc + term
    chans.append(acc)
  return jnp.stack(chans, axis=-1)


def _input_grad(method, g, x_shape, x_dtype, w, s, pads):
  kh, kw, cin, cout = w.shape
  n, h, wd, _ = x_shape
  hp, wp = h + sum(pads[0]), wd + sum(pads[1])
  if method == "xla":
    return _input_grad_xla(g, x_shape, x_dtype, w, s, pads)
  if method == "patches":
    w2 = w.reshape(kh * kw * cin, cout)
    _, ho, wo, _ = g.shape

    def col2im(gc):
      dcols = _dot(gc, w2, (3,), (1,), jnp.float32)
      if kh * kw == 1:
        return _crop(_untap(dcols, 0, 0, s, hp, wp), pads, h, wd).astype(x_dtype)
      dcols = dcols.reshape(dcols.shape[:3] + (kh * kw, cin))
      acc = None
      for t in range(kh * kw):
        term = _untap(dcols[:, :, :, t], t // kw, t % kw, s, hp, wp)
        acc = term if acc is None else acc + term
      return _crop(acc, pads, h, wd).astype(x_dtype)
    return _map_batch(col2im, _chunk_size(n, ho * wo * kh * kw * cin * 4), g)
  if method == "taps":
    acc = None
    for i in range(kh):
      for j in range(kw):
        if cout == 1:
          d = g.astype(jnp.float32) * w[i, j, :, 0].astype(jnp.float32)
        else:
          d = _dot(g, w[i, j], (3,), (1,), jnp.float32)
        term = _untap(d, i, j, s, hp, wp)
        acc = term if acc is None else acc + term
    return _crop(acc, pads, h, wd).astype(x_dtype)
  raise ValueError(f"unknown input-gradient method {method!r}")


def _dilated(n: int, d: int) -> int:
  return 0 if n == 0 else 1 + d * (n - 1)


def _input_grad_xla(g, x_shape, x_dtype, w, s, pads):
  """The input gradient as the convolution JAX's transpose rule builds (the
  cotangent, dilated by the strides, against the spatially flipped kernel),
  but with that kernel transposed to HWIO by us instead of the rule's
  swapped (HWOI) dimension labels. The same products; the kernel XLA picks
  may sum them in another order (last digits). Why: inside a
  loop (the rounds' scans over steps and clients) XLA:CPU left the rule's
  HWOI convolution to its generic convolution instead of its YNN matmul
  fusion. ResNet18's 16x16 64->64 input gradient at batch 256 in a scan over
  5 clients' kernels, 2-core AMD EPYC: 181 -> 46 ms per client; unscanned
  both took 46 ms (the same program)."""
  kh, kw, _, _ = w.shape
  _, h, wd, _ = x_shape
  _, ho, wo, _ = g.shape
  padding = []
  for n_in, k, st, (lo, _), n_out in ((h, kh, s[0], pads[0], ho), (wd, kw, s[1], pads[1], wo)):
    before = k - lo - 1
    padding.append((before, n_in + k - 1 - _dilated(n_out, st) - before))
  wt = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)   # (kh, kw, C_out, C_in): HWIO of the transpose
  pet = jnp.float32 if g.dtype in (jnp.bfloat16, jnp.float16) else None
  dx = lax.conv_general_dilated(g, wt, (1, 1), padding, lhs_dilation=s, dimension_numbers=_DN,
                                preferred_element_type=pet)
  return dx.astype(x_dtype)


def _kernel_grad(method, g, x, w_shape, w_dtype, s, pads):
  kh, kw, cin, cout = w_shape
  _, ho, wo, _ = g.shape
  if method == "xla":
    _, vjp = jax.vjp(lambda w_: _fwd("xla", x, w_, s, pads), jnp.zeros(w_shape, w_dtype))
    return vjp(g)[0]
  if method == "patches":
    if cin < _STACKED_COLS_CIN:
      # Few input channels: the taps stacked on a leading axis, [kh*kw, N, ho, wo, C]
      # (contiguous copies), instead of interleaved on the last one; the same
      # products and sums. Kernel gradient of LeNet's conv1 (1 channel) in a
      # scanned step, 2-core Xeon: 31 -> 21 ms at batch 1024, 0.83 -> 0.48 ms at
      # batch 32; conv2 (6 channels) at batch 32 1.05 -> 0.48 ms; ResNet18's
      # stem (3 channels, batch 256) 92 -> 84 ms; with 64 channels it was slower.
      def part(xc, gc):
        xp = _pad_x(xc, pads)
        cols = jnp.stack([_tap(xp, i, j, s, ho, wo) for i in range(kh) for j in range(kw)])
        return _dot(cols, gc, (1, 2, 3), (0, 1, 2), jnp.float32)   # (kh*kw, C, O)
    else:
      def part(xc, gc):
        return _dot(_im2col(xc, kh, kw, s, pads, ho, wo), gc, (0, 1, 2), (0, 1, 2), jnp.float32)
    dw = _sum_batch(part, _chunk_size(x.shape[0], ho * wo * kh * kw * cin * 4), x, g)
    return dw.reshape(w_shape).astype(w_dtype)
  if method == "taps":
    xp = _pad_x(x, pads)
    rows = [_dot(_tap(xp, i, j, s, ho, wo), g, (0, 1, 2), (0, 1, 2), jnp.float32)
            for i in range(kh) for j in range(kw)]
    return jnp.stack(rows).reshape(w_shape).astype(w_dtype)
  raise ValueError(f"unknown kernel-gradient method {method!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_custom(x, w, s, pads, methods):
  return _fwd(methods[0], x, w, s, pads)


def _conv_custom_fwd(x, w, s, pads, methods):
  return _fwd(methods[0], x, w, s, pads), (x, w)


def _conv_custom_bwd(s, pads, methods, res, g):
  x, w = res
  dx = _input_grad(methods[1], g, x.shape, x.dtype, w, s, pads)
  dw = _kernel_grad(methods[2], g, x, w.shape, w.dtype, s, pads)
  return dx, dw


_conv_custom.defvjp(_conv_custom_fwd, _conv_custom_bwd)


# ---------------------------------------------------------------------------
# Automatic choice
# ---------------------------------------------------------------------------


_SMALL_OUTPUT_ROWS = 65536   # batch x output pixels below which every part uses matmuls/taps


def auto_lowering(x_shape, w_shape, strides, padding="SAME", backend: str | None = None
                  ) -> tuple[str, str, str]:
  """The (forward, input_grad, kernel_grad) methods ``lowering='auto'`` uses.

  Measured on the 2-core AMD EPYC development machine (XLA:CPU, jax 0.10.2),
  see experiments/conv_bench.py and experiments/results/conv_bench_cpu.json.
  """
  backend = jax.default_backend() if backend is None else backend
  if backend != "cpu":
    return LOWERINGS["xla"]
  n, h, w, cin = x_shape
  kh, kw, _, cout = w_shape
  s = _pair(strides, "strides")
  pads = normalize_padding(padding, (h, w), (kh, kw), s)
  ho, wo = _out_size(h, kh, s[0], *pads[0]), _out_size(w, kw, s[1], *pads[1])
  # Component times in ms at batch 256 (interleaved medians, xla vs patches;
  # the machine was shared by other jobs (load 6-10 on 2 cores), so absolute
  # times are 2-4x inflated and single pairs vary between runs: the rule keeps
  # XLA where the two were within noise of each other in repeated runs, and
  # full fwd+bwd ResNet18 steps with patches instead of XLA for the 3x3
  # stride-1 forward/input gradient measured equal, 3607 vs 3635 ms):
  #   1x1 s2 16x16->8x8 64->128 : fwd 12 / 11, dx 11 / 9, dw 55 / 18
  #   3x3 16x16 64->64          : fwd 114 / 187, dx 107 / 149, dw 794 / 244
  #   3x3 s2 16x16->8x8 64->128 : fwd 61 / 80, dx 102 / 67, dw 158 / 91
  #   3x3 8x8 128->128          : fwd 105 / 121, dx 100 / 108, dw 157 / 152
  #   3x3 4x4 256->256          : fwd 114 / 121, dx 114 / 108, dw 157 / 142
  #   3x3 s2 4x4->2x2 256->512  : fwd 87 / 51, dx 2193 / 52, dw 75 / 59
  #   3x3 2x2 512->512          : fwd 8903 / 99, dx 8809 / 105, dw 95 / 116
  #   7x7 s2 stem 64x64 3->64   : fwd 222 / 420 (taps 7619), dw 407 / 395 (498 / 436)
  # LeNet on 32x32x3 at batch 1024, 5x5 3->6 VALID: fwd 273 / 258 / 76 (taps),
  #   dw 1056 / 554 / 840.
  # LeNet at batch 1024 (xla / patches / taps):
  #   5x5 28x28 1->6 SAME       : fwd 216 / 121 / 12, dw 94 / 120 / 284
  #   5x5 14x14 6->16 VALID     : fwd 39 / 39 / 266, dx 104 / 48 / 156, dw 132 / 95 / 144
  #   (at batch 32 the same conv2: dw 0.6 / 1.8 / 1.4 ms)
  if kh == kw == 1:  # a (strided) matmul
    return LOWERINGS["patches"]
  if n * ho * wo < _SMALL_OUTPUT_ROWS:
    # Small (per-client) batches: XLA's convolutions cost more in overhead than
    # the matmuls. LeNet, 100 clients x batch 32, SFLV1 round with sequential
    # clients (experiments/benchmark.py worker, same session): this rule 7,480
    # samples/s; the batch-1024 rule below 2,972; plain XLA 1,709.
    return ("taps" if cin <= _TAPS_ELEMENTWISE_CIN and cout <= 16 else "patches",
            "patches", "patches")
  tiny = ho * wo <= 4  # XLA's conv and its input gradient collapse to ~1-3 GFLOP/s
  if cin <= _TAPS_ELEMENTWISE_CIN and cout <= 16:
    fwd = "taps"
  elif tiny:
    fwd = "patches"
  else:
    fwd = "xla"
  dx = "xla" if s == (1, 1) and not tiny and cin >= 64 else "patches"
  # Not XLA for a single input channel (LeNet's conv1 at batch 1024): alone
  # that kernel gradient measured 69 ms with XLA and 56 with patches, but
  # inside the paper's SFLV1 round program XLA's took 440 ms per call (26 of
  # the round's ~30 s; jax.profiler trace, 2026-11-26); with patches the
  # round took 2.7x less. Component timings alone do not settle a choice:
  # check the whole round (experiments/benchmark.py --suite).
  dw = "xla" if tiny or n * ho * wo < 4096 else "patches"
  return (fwd, dx, dw)


def _resolve(lowering, x_shape, w_shape, s, pads, dtype) -> tuple[str, str, str]:
  if callable(lowering):   # a policy, e.g. sfljax.conv_autotune.Autotune()
    methods = tuple(lowering(tuple(x_shape), tuple(w_shape), s, pads, dtype))
    if len(methods) != 3 or any(m not in METHODS for m in methods):
      raise ValueError(f"the lowering policy {lowering!r} returned {methods!r}, not three of "
                       f"{METHODS}")
    return methods
  if isinstance(lowering, str):
    if lowering == "auto":
      return auto_lowering(x_shape, w_shape, s, pads)
    if lowering not in LOWERINGS:
      raise ValueError(f"unknown lowering {lowering!r}: choose 'auto' or one of {list(LOWERINGS)}")
    return LOWERINGS[lowering]
  methods = tuple(lowering)
  if len(methods) != 3 or any(m not in METHODS for m in methods):
    raise ValueError(f"a lowering triple must name three of {METHODS}, got {lowering!r}")
  return methods


def conv2d(x, kernel, *, strides=1, padding="SAME", lowering="auto"):
  """2-D convolution, NHWC input ``x`` and HWIO ``kernel`` (no bias).

  Args:
    x: (N, H, W, C_in) float32 or bfloat16.
    kernel: (kh, kw, C_in, C_out).
    strides: int or pair.
    padding: 'SAME', 'VALID', an int or explicit ((lo, hi), (lo, hi)).
    lowering: 'auto' (per-layer choice, :func:`auto_lowering`), a name in
      :data:`LOWERINGS`, a (forward, input_grad, kernel_grad) triple of
      :data:`METHODS`, or a policy: a callable (x_shape, kernel_shape,
      strides, pads, dtype) -> such a triple, called while tracing (e.g.
      :class:`sfljax.conv_autotune.Autotune`, which measures).

  Returns (N, H_out, W_out, C_out) in ``result_type(x, kernel)``; low-precision
  products are accumulated in float32.
  """
  if x.ndim != 4 or kernel.ndim != 4:
    raise ValueError(f"conv2d wants NHWC x and HWIO kernel, got {x.shape} and {kernel.shape}")
  if x.shape[-1] != kernel.shape[2]:
    raise ValueError(f"input channels {x.shape[-1]} != kernel in-channels {kernel.shape[2]}")
  s = _pair(strides, "strides")
  pads = normalize_padding(padding, x.shape[1:3], kernel.shape[:2], s)
  dtype = jnp.result_type(x.dtype, kernel.dtype)
  methods = _resolve(lowering, x.shape, kernel.shape, s, pads, dtype)
  if methods == LOWERINGS["xla"]:
    return _fwd("xla", x, kernel, s, pads)  # plain autodiff
  return _conv_custom(x.astype(dtype), kernel.astype(dtype), s, pads, methods)


# ---------------------------------------------------------------------------
# Flax module
# ---------------------------------------------------------------------------


class Conv(nn.Module):
  """Drop-in for ``flax.linen.Conv`` (2-D, NHWC) using :func:`conv2d`.

  Parameters are ``kernel`` (kh, kw, C_in, features) and ``bias``
  (features,), named and shaped exactly like ``nn.Conv``'s.
  """
  features: int
  kernel_size: int | Sequence[int] = (3, 3)
  strides: int | Sequence[int] = 1
  padding: Any = "SAME"
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  kernel_init: Callable[..., Any] = nn.linear.default_kernel_init
  bias_init: Callable[..., Any] = nn.initializers.zeros_init()
  lowering: Any = "auto"

  @nn.compact
  def __call__(self, x):
    kh, kw = _pair(self.kernel_size, "kernel_size")
    kernel = self.param("kernel", self.kernel_init, (kh, kw, x.shape[-1], self.features),
                        self.param_dtype)
    bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            if self.use_bias else None)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = conv2d(x, kernel, strides=self.strides, padding=self.padding, lowering=self.lowering)
    if bias is not None:
      y = y + bias
    return y
