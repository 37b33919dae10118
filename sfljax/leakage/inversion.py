"""Model inversion of smashed data by a curious server (He, Zhang & Lee, ACSAC 2019).

In split learning the server sees every client's *smashed data* (the
activations at the cut layer) but not the inputs. A curious server that also
holds an *auxiliary* set -- inputs together with their smashed data under the
current client model (e.g. public data it pushed through a copy of the client
part, or queried through the client) -- can train a *decoder* that maps smashed
data back to inputs, then apply it to the smashed data the clients send:

1. :func:`train_decoder` fits a :class:`Decoder` to the auxiliary pairs
   (smashed -> input) by minimising the mean squared error with Adam;
2. :func:`reconstruct` applies it to the clients' smashed data;
3. :func:`invert` does both.

How well the reconstructions match the clients' real inputs (e.g. the relative
MSE, ``mse / var(inputs)``) measures how much the cut layer leaks: an identity
cut (smashed == input) leaks everything (relative MSE ~ 0), an invertible
client part leaks nearly everything, and smashed data independent of the
inputs leak nothing (the decoder can only learn the mean, relative MSE ~ 1).

Inputs are NHWC float32 images (here standardised, not in ``[0, 1]``; the
decoder's output is linear so any range works). Smashed data are spatial
``[N, h, w, c]``, flat ``[N, d]``, or any other shape ``[N, ...]`` (flattened).

:func:`write_png` / :func:`save_grid` write an originals-vs-reconstructions
picture with the standard library only (no imaging dependency).
"""

from __future__ import annotations

import functools
import math
import os
import struct
import zlib
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from sfljax import rundir

Params = Any

MIN_CELL_PX = 28
""":func:`save_grid` upscales each image by an integer factor to at least this many pixels."""


_DIMS = ("NHWC", "HWIO", "NHWC")


def _conv_same(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """Stride-1 'SAME' convolution, NHWC input, HWIO kernel."""
  return jax.lax.conv_general_dilated(x, kernel, (1, 1), "SAME", dimension_numbers=_DIMS)


@jax.custom_vjp
def conv3x3(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """3x3 stride-1 'SAME' convolution (NHWC, HWIO) with a loop-friendly gradient.

  Same values and gradients as ``lax.conv_general_dilated``, but the backward
  pass avoids the transposed convolutions autodiff would emit: on XLA:CPU those
  run about ten times slower inside a while loop -- which
  :func:`train_decoder`'s ``lax.scan`` is -- than outside (jax-ml/jax#12868).
  Here the input gradient is a plain forward convolution of the cotangent with
  the flipped, in/out-swapped kernel, and the kernel gradient is nine matmuls
  of shifted input windows with the cotangent.
  """
  return _conv_same(x, kernel)


def _conv3x3_fwd(x: jax.Array, kernel: jax.Array):
  return _conv_same(x, kernel), (x, kernel)


def _conv3x3_bwd(res, g: jax.Array):
  x, kernel = res
  dx = _conv_same(g, jnp.flip(kernel, (0, 1)).swapaxes(2, 3))
  h, w = x.shape[1:3]
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  dk = jnp.stack([
      jnp.stack([jnp.einsum("bhwc,bhwf->cf", xp[:, i:i + h, j:j + w], g) for j in range(3)])
      for i in range(3)])
  return dx, dk.astype(kernel.dtype)


conv3x3.defvjp(_conv3x3_fwd, _conv3x3_bwd)


class Conv3x3(nn.Module):
  """3x3 convolution layer, stride 1, 'SAME' zero padding, with bias (:func:`conv3x3`).

  Parameters ``kernel`` ``[3, 3, Cin, features]`` and ``bias`` ``[features]``,
  laid out and initialised like ``nn.Conv(features, (3, 3))``.
  """
  features: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (3, 3, x.shape[-1], self.features))
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
    return conv3x3(x, kernel) + bias


class Decoder(nn.Module):
  """Smashed data ``[B, ...]`` -> reconstructed inputs ``[B, H, W, C]``.

  * Spatial smashed data (rank 4) are resized bilinearly to ``(H, W)``.
  * Any other rank is flattened to ``[B, d]`` and mapped by a Dense layer to
    ``H * W * min(features, 16)`` values, reshaped to ``[B, H, W, min(features, 16)]``.

  Then: 3x3 conv (``features``, relu) x2 and a final linear 3x3 conv to ``C``
  (:class:`Conv3x3`, 'SAME' padding).

  Residual (:meth:`has_skip`): when the smashed data are spatial and the
  resized map has exactly ``C`` channels, the resized map is added to the conv
  stack's output, so the decoder only learns a correction to it. An identity
  cut (smashed == input) is then learned at once: the conv stack only has to
  output ~0, and :func:`train_decoder` starts the last conv at zero in that
  case, so training starts from the exact identity. Flat smashed data have no
  skip (there is no pixel correspondence to rely on).
  """
  output_shape: tuple[int, int, int]
  features: int = 64

  def has_skip(self, smashed_shape: tuple[int, ...]) -> bool:
    """Whether smashed data of shape ``[B, ...]`` get the residual connection."""
    return len(smashed_shape) == 4 and smashed_shape[-1] == self.output_shape[-1]

  @nn.compact
  def __call__(self, smashed: jax.Array) -> jax.Array:
    h, w, c = self.output_shape
    x = jnp.asarray(smashed, jnp.float32)
    if x.ndim == 4:
      x = jax.image.resize(x, (x.shape[0], h, w, x.shape[-1]), method="bilinear")
    else:
      x = x.reshape(x.shape[0], -1)
      width = min(self.features, 16)
      x = nn.Dense(h * w * width, name="expand")(x).reshape(x.shape[0], h, w, width)
    y = nn.relu(Conv3x3(self.features, name="conv1")(x))
    y = nn.relu(Conv3x3(self.features, name="conv2")(y))
    y = Conv3x3(c, name="out")(y)
    return y + x if self.has_skip(jnp.shape(smashed)) else y


def _init_and_order(decoder: Decoder, smashed_shape: tuple[int, ...], key: jax.Array,
                    n: int, total: int) -> tuple[Params, jax.Array]:
  """Initial parameters and ``total`` minibatch indices from ONE normal draw.

  Parameters: every ``kernel`` ``N(0, 1 / fan_in)`` (LeCun normal, untruncated;
  ``fan_in`` = product of all but the last dimension), every ``bias`` zero,
  and the last conv's kernel zero when the decoder has the skip connection
  (it then starts as the resized smashed data). Indices: consecutive random
  permutations of ``range(n)`` (epochs), each the stable argsort of ``n``
  normals (they take ``4 * steps * batch_size`` bytes). One draw instead of
  flax's one per layer plus more for the order: each threefry expansion costs
  XLA:CPU up to a second or so of compile time.
  """
  shapes = jax.eval_shape(lambda: decoder.init(jax.random.key(0), jnp.zeros(
      (1,) + tuple(smashed_shape[1:]), jnp.float32)))["params"]
  flat = traverse_util.flatten_dict(shapes)
  names = sorted(flat)
  sizes = [math.prod(flat[name].shape) for name in names]
  epochs = -(-total // n)
  z = jax.random.normal(key, (sum(sizes) + epochs * n,), jnp.float32)
  leaves, offset = {}, 0
  for name, size in zip(names, sizes):
    shape = flat[name].shape
    value = z[offset:offset + size].reshape(shape) / math.sqrt(math.prod(shape[:-1]) or 1)
    if name[-1] == "bias" or (name[0] == "out" and decoder.has_skip(tuple(smashed_shape))):
      value = jnp.zeros(shape, jnp.float32)
    leaves[name] = value
    offset += size
  order = jnp.argsort(z[offset:].reshape(epochs, n), axis=-1, stable=True).reshape(-1)[:total]
  return traverse_util.unflatten_dict(leaves), order


def _fit(decoder: Decoder, steps: int, batch_size: int, smashed: jax.Array,
         targets: jax.Array, key: jax.Array, learning_rate: jax.Array) -> Params:
  """Initialisation, then all ``steps`` Adam steps as one ``lax.scan``."""
  params, order = _init_and_order(decoder, smashed.shape, key, targets.shape[0],
                                  steps * batch_size)
  tx = optax.adam(learning_rate)

  def loss_fn(p, xb, yb):
    return jnp.mean((decoder.apply({"params": p}, xb) - yb) ** 2)

  def step(carry, t):
    p, opt_state = carry
    idx = jax.lax.dynamic_slice_in_dim(order, t * batch_size, batch_size)
    grads = jax.grad(loss_fn)(p, smashed[idx], targets[idx])
    updates, opt_state = tx.update(grads, opt_state, p)
    return (optax.apply_updates(p, updates), opt_state), None

  (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jnp.arange(steps))
  return params


_fit_jit = jax.jit(_fit, static_argnums=(0, 1, 2))


@functools.partial(jax.jit, static_argnums=0)
def _apply(decoder: Decoder, params: Params, smashed: jax.Array) -> jax.Array:
  return decoder.apply({"params": params}, smashed)


def train_decoder(smashed: jax.Array, targets: jax.Array, key: jax.Array, *,
                  steps: int = 500, batch_size: int = 128, learning_rate: float = 1e-3,
                  features: int = 64) -> tuple[Decoder, Params, float]:
  """Fits a :class:`Decoder` from ``smashed`` ``[N, ...]`` to ``targets`` ``[N, H, W, C]``.

  Adam on the mean squared error, ``steps`` minibatches of
  ``min(batch_size, N)`` examples drawn without replacement within epochs
  (consecutive random permutations from ``key``; a batch may straddle two
  epochs). Initialisation and the whole training loop (one ``lax.scan`` over
  the steps) are one jitted program; a fixed ``key`` gives bit-identical
  parameters. Returns ``(decoder, params, final_loss)`` with ``final_loss``
  the MSE of the trained decoder on the whole auxiliary set (via
  :func:`reconstruct`).
  """
  smashed = jnp.asarray(smashed, jnp.float32)
  targets = jnp.asarray(targets, jnp.float32)
  if targets.ndim != 4:
    raise ValueError(f"targets must be [N, H, W, C], got shape {targets.shape}")
  n = targets.shape[0]
  if smashed.ndim < 2 or smashed.shape[0] != n or n == 0:
    raise ValueError(f"smashed {smashed.shape} and targets {targets.shape} need the same N > 0")
  if steps < 1 or batch_size < 1:
    raise ValueError(f"steps ({steps}) and batch_size ({batch_size}) must be >= 1")
  decoder = Decoder(output_shape=tuple(int(s) for s in targets.shape[1:]), features=features)
  params = _fit_jit(decoder, steps, min(batch_size, n), smashed, targets, key,
                    jnp.float32(learning_rate))
  final = jnp.mean((reconstruct(decoder, params, smashed) - targets) ** 2)
  return decoder, params, float(final)


def reconstruct(decoder: Decoder, params: Params, smashed: jax.Array,
                batch_size: int = 512) -> jax.Array:
  """``decoder`` on ``smashed`` ``[N, ...]`` -> ``[N, H, W, C]``, in chunks.

  Chunks of ``min(batch_size, N)`` rows (the last one zero-padded), so one
  compiled program serves every chunk, and every call with that chunk shape.
  """
  smashed = jnp.asarray(smashed, jnp.float32)
  n = smashed.shape[0]
  if n == 0:
    return jnp.zeros((0,) + tuple(decoder.output_shape), jnp.float32)
  chunk = max(1, min(batch_size, n))
  pad = -n % chunk
  x = jnp.pad(smashed, [(0, pad)] + [(0, 0)] * (smashed.ndim - 1))
  parts = [_apply(decoder, params, x[i:i + chunk]) for i in range(0, n + pad, chunk)]
  return jnp.concatenate(parts)[:n]


def invert(aux_smashed: jax.Array, aux_inputs: jax.Array, target_smashed: jax.Array,
           key: jax.Array, **train_kwargs: Any) -> tuple[jax.Array, float]:
  """Trains a decoder on the auxiliary pairs and reconstructs ``target_smashed``.

  ``train_kwargs`` go to :func:`train_decoder`. Returns
  ``(reconstructions, final_train_loss)``.
  """
  decoder, params, loss = train_decoder(aux_smashed, aux_inputs, key, **train_kwargs)
  return reconstruct(decoder, params, target_smashed), loss


# --- Pictures -----------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
  """One PNG chunk: length, type, data, CRC-32 of type + data."""
  return (struct.pack(">I", len(data)) + kind + data
          + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))


def write_png(path: str | os.PathLike, image: np.ndarray) -> None:
  """Writes a uint8 image ``[H, W]``/``[H, W, 1]`` (grayscale) or ``[H, W, 3]`` (RGB) as PNG.

  Standard library only: 8-bit samples, no interlace, filter type 0 (None)
  on every row, one zlib-compressed IDAT chunk. The write is atomic: the bytes
  go to a temporary file in the same directory, which is then renamed over
  ``path`` with ``os.replace`` (the file gets mode 0644).
  """
  a = np.asarray(image)
  if a.dtype != np.uint8:
    raise ValueError(f"image must be uint8, got {a.dtype}")
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim == 2:
    color_type = 0
  elif a.ndim == 3 and a.shape[-1] == 3:
    color_type = 2
  else:
    raise ValueError(f"image must be [H, W], [H, W, 1] or [H, W, 3], got {a.shape}")
  height, width = a.shape[:2]
  if height == 0 or width == 0:
    raise ValueError(f"empty image {a.shape}")
  a = np.ascontiguousarray(a)
  raw = b"".join(b"\x00" + a[r].tobytes() for r in range(height))
  ihdr = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
  png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
         + _png_chunk(b"IDAT", zlib.compress(raw, 9)) + _png_chunk(b"IEND", b""))
  rundir.write_file_atomic(path, lambda f: f.write(png))


def _to_uint8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
  """``(x - lo) / (hi - lo) * 255``, clipped to [0, 255] and rounded (``hi <= lo``: span 1)."""
  span = hi - lo if hi > lo else 1.0
  return np.rint(np.clip((x - lo) / span * 255.0, 0.0, 255.0)).astype(np.uint8)


def save_grid(path: str | os.PathLike, originals: np.ndarray, reconstructions: np.ndarray,
              n: int = 16, data_range: tuple[float, float] | None = None) -> np.ndarray:
  """Writes a PNG of the first ``n`` originals (top row) over their reconstructions.

  ``originals`` and ``reconstructions``: ``[N, H, W, C]`` (or ``[N, H, W]``).
  Values are mapped to 0..255 by ``data_range = (lo, hi)``, by default the
  min/max of the originals shown, as ``rint(clip((x - lo) / (hi - lo) * 255, 0, 255))``
  (reconstructions outside the range are clipped). C == 1: grayscale;
  C == 3: RGB; any other C: the first channel, grayscale. Each image is
  upscaled by the integer factor ``s = ceil(28 / min(H, W))`` (at least 1;
  nearest neighbour) so a cell is at least 28 px. Cells are separated by
  1-pixel white (255) lines: with ``k = min(n, N)`` images the picture is
  ``(2 * H * s + 1)`` x ``(k * W * s + k - 1)`` pixels (height x width).
  Returns the uint8 picture that was written.
  """
  orig = np.asarray(originals, np.float32)
  rec = np.asarray(reconstructions, np.float32)
  if orig.ndim == 3:
    orig = orig[..., None]
  if rec.ndim == 3:
    rec = rec[..., None]
  if orig.ndim != 4 or orig.shape[1:] != rec.shape[1:]:
    raise ValueError(f"originals {orig.shape} and reconstructions {rec.shape} must be [N, H, W, C]")
  k = min(n, orig.shape[0], rec.shape[0])
  if k < 1:
    raise ValueError("nothing to show")
  orig, rec = orig[:k], rec[:k]
  if orig.shape[-1] != 3:
    orig, rec = orig[..., :1], rec[..., :1]
  lo, hi = (float(orig.min()), float(orig.max())) if data_range is None else map(float, data_range)
  h, w, c = orig.shape[1:]
  s = max(1, math.ceil(MIN_CELL_PX / min(h, w)))
  ch, cw = h * s, w * s
  grid = np.full((2 * ch + 1, k * cw + k - 1, c), 255, np.uint8)
  for row, images in enumerate((orig, rec)):
    cells = _to_uint8(images, lo, hi).repeat(s, axis=1).repeat(s, axis=2)
    for i in range(k):
      grid[row * (ch + 1):row * (ch + 1) + ch, i * (cw + 1):i * (cw + 1) + cw] = cells[i]
  if c == 1:
    grid = grid[..., 0]
  write_png(path, grid)
  return grid
