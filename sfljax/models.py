"""Splittable image-classification models for SplitFed learning.

Every model is an ordered chain of named *blocks* (``conv1``, ``conv2``,
``fc1``, ...).  A :class:`SplitModel` can be cut at any block boundary into
consecutive parts (client head / server / optionally client tail); each part
is a :class:`Sequential` of a contiguous run of blocks and is a pure Flax linen
module.  Because variable collections are keyed by block name, the variables
of the full model split into per-part subsets by name and merge back by a
plain dictionary union (:meth:`SplitModel.split_variables` /
:meth:`SplitModel.merge_variables`).

Conventions:

* Inputs are NHWC float32 images, outputs are float32 logits.
* Every block is called as ``block(x, train=..., mask=...)``.  ``mask`` is an
  optional ``[B]`` array (1 = real sample, 0 = padding).  Batch norm computes
  its batch statistics over the masked-in samples only.  If a batch holds no
  real sample at all, batch norm falls back to all samples so that outputs
  stay finite, and :func:`apply_part` then leaves the running statistics
  unchanged.
* Batch-norm running statistics live in the ``'batch_stats'`` collection and
  are returned functionally by :func:`apply_part` (momentum 0.9, eps 1e-5,
  i.e. PyTorch's defaults).  Group norm (``norm="group"``) has no state.
* There is no dropout anywhere: models are deterministic given their
  variables and inputs, so no dropout RNG is ever needed.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from sfljax.conv import Conv

__all__ = [
    "MODELS",
    "NORMS",
    "Sequential",
    "SplitModel",
    "apply_part",
    "get_model",
]

MODELS: tuple[str, ...] = ("lenet", "alexnet", "vgg16", "resnet18")
NORMS: tuple[str, ...] = ("batch", "group", "none")

# He initialisation as in the official SplitFed ResNet code:
# normal(0, sqrt(2 / (k * k * out_channels))).
_he_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


# ---------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------


def _group_count(channels: int, max_groups: int = 32) -> int:
  """Largest divisor of ``channels`` that is at most ``max_groups``."""
  return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)


def _norm(kind: str, x, *, train: bool, mask, name: str):
  """Applies the normalisation ``kind`` ('batch', 'group' or 'none') to ``x``."""
  if kind == "none":
    return x
  if kind == "group":
    return nn.GroupNorm(num_groups=_group_count(x.shape[-1]), epsilon=1e-5, name=name)(x)
  if kind == "batch":
    if mask is not None:
      mask = jnp.reshape(mask, mask.shape + (1,) * (x.ndim - mask.ndim))
    return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                        name=name)(x, mask=mask)
  raise ValueError(f"unknown norm {kind!r}: choose one of {', '.join(NORMS)}")


def _windows_2x2(x):
  """[B, H, W, C] (H, W even) -> [B, H/2, W/2, C, 4], window order row-major."""
  b, h, w, c = x.shape
  x = x.reshape(b, h // 2, 2, w // 2, 2, c)
  return jnp.transpose(x, (0, 1, 3, 5, 2, 4)).reshape(b, h // 2, w // 2, c, 4)


def _unwindows_2x2(y):
  b, h2, w2, c, _ = y.shape
  y = jnp.transpose(y.reshape(b, h2, w2, c, 2, 2), (0, 1, 4, 2, 5, 3))
  return y.reshape(b, 2 * h2, 2 * w2, c)


@jax.custom_vjp
def _max_pool_2x2_even(x):
  return jnp.max(_windows_2x2(x), axis=-1)


def _max_pool_fwd(x):
  win = _windows_2x2(x)
  return jnp.max(win, axis=-1), jnp.argmax(win, axis=-1)


def _max_pool_bwd(first, g):
  onehot = first[..., None] == jnp.arange(4, dtype=first.dtype)
  return (_unwindows_2x2(jnp.where(onehot, g[..., None], jnp.zeros((), g.dtype))),)


_max_pool_2x2_even.defvjp(_max_pool_fwd, _max_pool_bwd)


def max_pool_2x2(x):
  """2x2 max-pool with stride 2 (odd trailing rows/columns dropped), equal to
  ``nn.max_pool(x, (2, 2), strides=(2, 2))`` in value and gradient (the
  gradient goes to the first maximum of each window), but with an
  elementwise gradient: XLA:CPU runs ``nn.max_pool``'s ``select_and_scatter``
  gradient 2-5x slower (LeNet's first pool over 100 clients x 32 samples:
  270 vs 115 ms forward+backward).
  """
  _, h, w, _ = x.shape
  return _max_pool_2x2_even(x[:, :h - h % 2, :w - w % 2])


class ConvBlock(nn.Module):
  """Conv -> optional norm -> ReLU -> optional 2x2 max-pool (stride 2)."""
  features: int
  kernel: int = 3
  padding: Any = "SAME"
  norm: str = "none"
  pool: bool = False
  kernel_init: Callable[..., Any] = nn.linear.default_kernel_init

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    # A bias right before batch norm is cancelled by its mean subtraction: its
    # gradient is pure rounding noise, which Adam would turn into steps.
    x = Conv(self.features, (self.kernel, self.kernel), padding=self.padding,
             use_bias=self.norm != "batch", kernel_init=self.kernel_init, name="conv")(x)
    x = nn.relu(_norm(self.norm, x, train=train, mask=mask, name="norm"))
    if self.pool:
      x = max_pool_2x2(x)
    return x


class DenseBlock(nn.Module):
  """Flatten (if needed) -> Dense -> optional ReLU."""
  features: int
  relu: bool = True

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    del train, mask
    x = jnp.reshape(x, (x.shape[0], -1))
    x = nn.Dense(self.features, name="dense")(x)
    return nn.relu(x) if self.relu else x


class ResNetStem(nn.Module):
  """7x7 stride-2 conv (no bias) -> norm -> ReLU -> 3x3 stride-2 max-pool (pad 1)."""
  features: int = 64
  norm: str = "batch"

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    x = Conv(self.features, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
             use_bias=False, kernel_init=_he_fan_out, name="conv")(x)
    x = nn.relu(_norm(self.norm, x, train=train, mask=mask, name="norm"))
    return nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class BasicBlock(nn.Module):
  """ResNet basic residual unit: two 3x3 convs (no bias) with norm and ReLU.

  A 1x1 conv + norm projection shortcut is used when the stride or the number
  of channels changes; otherwise the shortcut is the identity.
  """
  features: int
  stride: int = 1
  norm: str = "batch"

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    conv = functools.partial(Conv, use_bias=False, kernel_init=_he_fan_out)
    norm = functools.partial(_norm, self.norm, train=train, mask=mask)
    s = (self.stride, self.stride)
    y = conv(self.features, (3, 3), strides=s, padding=((1, 1), (1, 1)), name="conv1")(x)
    y = nn.relu(norm(y, name="norm1"))
    y = conv(self.features, (3, 3), padding=((1, 1), (1, 1)), name="conv2")(y)
    y = norm(y, name="norm2")
    if self.stride != 1 or x.shape[-1] != self.features:
      x = conv(self.features, (1, 1), strides=s, padding="VALID", name="shortcut_conv")(x)
      x = norm(x, name="shortcut_norm")
    return nn.relu(y + x)


class ResNetHead(nn.Module):
  """Global average pooling -> Dense(num_classes)."""
  num_classes: int

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    del train, mask
    return nn.Dense(self.num_classes, name="fc")(jnp.mean(x, axis=(1, 2)))


# ---------------------------------------------------------------------------
# Sequential / SplitModel
# ---------------------------------------------------------------------------


class Sequential(nn.Module):
  """A chain of named blocks.

  Attributes:
    names: block names, used as the keys of every variable collection.
    factories: one callable per block; ``factory(name=block_name)`` must
      return a linen module called as ``block(x, train=..., mask=...)``.
  """
  names: tuple[str, ...]
  factories: tuple[Callable[..., nn.Module], ...]

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    if len(self.names) != len(self.factories):
      raise ValueError("Sequential needs exactly one factory per block name")
    if mask is not None:
      mask = jnp.asarray(mask).astype(bool)
      # An all-padding batch falls back to every sample (finite outputs);
      # apply_part then discards the resulting statistics update.
      mask = jnp.where(jnp.any(mask), mask, True)
    for name, factory in zip(self.names, self.factories):
      x = factory(name=name)(x, train=train, mask=mask)
    return x


def _subset(variables: dict, names: Sequence[str]) -> dict:
  """Restricts every collection of ``variables`` to the blocks ``names``."""
  out = {col: {n: tree[n] for n in names if n in tree} for col, tree in variables.items()}
  out.setdefault("params", {})
  return out


@dataclasses.dataclass(frozen=True)
class SplitModel:
  """A model as an ordered chain of named blocks, splittable at block boundaries.

  ``norm`` records the normalisation the blocks were built with ('batch',
  'group' or 'none'); only 'batch' creates a 'batch_stats' collection.

  A *cut* ``k`` (1 <= k < num_blocks) puts the first ``k`` blocks before the
  boundary.  ``parts(cuts)`` with strictly increasing cuts returns
  ``len(cuts) + 1`` consecutive parts.
  """
  name: str
  block_names: tuple[str, ...]
  factories: tuple[Callable[..., nn.Module], ...]
  input_shape: tuple[int, int, int]
  num_classes: int
  default_cut: int
  norm: str = "none"

  @property
  def num_blocks(self) -> int:
    return len(self.block_names)

  @property
  def has_batch_stats(self) -> bool:
    """Whether the model has batch norm (a 'batch_stats' collection)."""
    return self.norm == "batch"

  def full(self) -> Sequential:
    """The unsplit model."""
    return Sequential(names=self.block_names, factories=self.factories)

  def _valid_cuts_text(self) -> str:
    desc = ", ".join(f"{k}=after {self.block_names[k - 1]}" for k in range(1, self.num_blocks))
    return f"valid cuts are 1..{self.num_blocks - 1} ({desc})"

  def check_cut(self, cuts: int | Sequence[int]) -> tuple[int, ...]:
    """Validates one cut or a sequence of cuts and returns them as a tuple.

    An empty sequence is valid (no split: one part, the full model).
    """
    if isinstance(cuts, numbers.Integral):
      seq = (cuts,)
    elif isinstance(cuts, Sequence) and not isinstance(cuts, str):
      seq = tuple(cuts)
    else:
      raise ValueError(f"cuts {cuts!r} for {self.name} must be an int or a sequence of ints: "
                       f"{self._valid_cuts_text()}")
    for c in seq:
      if isinstance(c, bool) or not isinstance(c, numbers.Integral):
        raise ValueError(f"cut {c!r} is not an integer for {self.name}: {self._valid_cuts_text()}")
      if not 1 <= c < self.num_blocks:
        raise ValueError(f"cut {c} is out of range for {self.name}: {self._valid_cuts_text()}")
    seq = tuple(int(c) for c in seq)
    if any(b <= a for a, b in zip(seq, seq[1:])):
      raise ValueError(f"cuts {seq} for {self.name} are not strictly increasing: "
                       f"{self._valid_cuts_text()}")
    return seq

  def _bounds(self, cuts) -> list[tuple[int, int]]:
    edges = (0,) + self.check_cut(cuts) + (self.num_blocks,)
    return list(zip(edges[:-1], edges[1:]))

  def parts(self, cuts: int | Sequence[int]) -> tuple[Sequential, ...]:
    """The consecutive parts of the model at ``cuts`` (len(cuts) + 1 modules)."""
    return tuple(Sequential(names=self.block_names[a:b], factories=self.factories[a:b])
                 for a, b in self._bounds(cuts))

  def init(self, rng, batch_size: int = 1) -> dict:
    """Variables of the full model: {'params': ..., ['batch_stats': ...]}."""
    x = jnp.zeros((batch_size,) + tuple(self.input_shape), jnp.float32)
    variables = self.full().init(rng, x, train=False)
    return {col: dict(tree) for col, tree in variables.items()}

  def split_variables(self, variables: dict, cuts: int | Sequence[int]) -> tuple[dict, ...]:
    """Per-part subsets of the full ``variables`` (every part has 'params')."""
    return tuple(_subset(variables, self.block_names[a:b]) for a, b in self._bounds(cuts))

  def merge_variables(self, parts: Sequence[dict]) -> dict:
    """Inverse of :meth:`split_variables`."""
    merged: dict[str, dict] = {}
    for part in parts:
      for col, tree in part.items():
        dst = merged.setdefault(col, {})
        for k, v in tree.items():
          if k not in self.block_names:
            raise ValueError(f"unknown block {k!r} for {self.name} in {col!r}")
          if k in dst:
            raise ValueError(f"block {k!r} appears in more than one part of {col!r}")
          dst[k] = v
    merged.setdefault("params", {})
    return {col: {n: tree[n] for n in self.block_names if n in tree}
            for col, tree in merged.items()}


def apply_part(module: Sequential, variables: dict, x, *, train: bool,
               mask=None) -> tuple[jax.Array, dict]:
  """Pure apply of a model part.

  Returns ``(output, new_batch_stats)``.  In train mode ``new_batch_stats`` is
  the updated 'batch_stats' collection (same structure as
  ``variables.get('batch_stats', {})``; unchanged if ``mask`` has no real
  sample); in eval mode it is ``variables.get('batch_stats', {})`` itself.
  Works under ``jax.vmap`` (leading client axis) and ``jax.vjp``.
  """
  stats = variables.get("batch_stats", {})
  if not train or not jax.tree_util.tree_leaves(stats):
    return module.apply(variables, x, train=train, mask=mask), stats
  y, updates = module.apply(variables, x, train=True, mask=mask, mutable=["batch_stats"])
  new_stats = {k: updates["batch_stats"][k] for k in stats}
  if mask is not None:
    real = jnp.any(jnp.asarray(mask).astype(bool))
    new_stats = jax.tree_util.tree_map(lambda n, o: jnp.where(real, n, o), new_stats, stats)
  return y, new_stats


# ---------------------------------------------------------------------------
# Model builders
# ---------------------------------------------------------------------------


def _lenet(input_shape, num_classes, norm):
  """LeNet-5 (~60k params, 5 layers).

  Blocks: conv1 (6 ch 5x5, SAME for inputs smaller than 32 else VALID, ReLU,
  2x2 max-pool), conv2 (16 ch 5x5 VALID, ReLU, 2x2 max-pool), fc1 (flatten,
  120, ReLU), fc2 (84, ReLU), fc3 (num_classes).  With norm 'batch'/'group' a
  norm layer follows each conv, before the ReLU.  Paper cut: after conv2.
  """
  pad1 = "SAME" if input_shape[0] < 32 else "VALID"
  blocks = (
      ("conv1", functools.partial(ConvBlock, 6, 5, pad1, norm, True)),
      ("conv2", functools.partial(ConvBlock, 16, 5, "VALID", norm, True)),
      ("fc1", functools.partial(DenseBlock, 120)),
      ("fc2", functools.partial(DenseBlock, 84)),
      ("fc3", functools.partial(DenseBlock, num_classes, relu=False)),
  )
  return blocks, 2


def _conv_stack(spec, input_shape, norm, name_fn):
  """Conv blocks from a VGG-style spec (ints = channels, 'M' = 2x2 max-pool).

  Pools are attached to the preceding conv block and skipped when the spatial
  size would drop below 1.
  """
  blocks, size = [], min(input_shape[:2])
  for i, c in enumerate(spec):
    if c == "M":
      continue
    pool = i + 1 < len(spec) and spec[i + 1] == "M" and size >= 2
    if pool:
      size //= 2
    blocks.append((name_fn(len(blocks)),
                   functools.partial(ConvBlock, c, 3, "SAME", norm, pool,
                                     kernel_init=_he_fan_out)))
  return blocks


def _classifier(num_classes, hidden=512):
  return (("fc1", functools.partial(DenseBlock, hidden)),
          ("fc2", functools.partial(DenseBlock, hidden)),
          ("fc3", functools.partial(DenseBlock, num_classes, relu=False)))


def _alexnet(input_shape, num_classes, norm):
  """AlexNet adapted to small inputs (28x28, 32x32, 64x64).

  Blocks: conv1 (64), conv2 (192), conv3 (384), conv4 (256), conv5 (256), all
  3x3 SAME convs + norm + ReLU, with a 2x2 max-pool after conv1, conv2 and
  conv5 while the spatial size allows; fc1 (flatten, 512, ReLU), fc2 (512,
  ReLU), fc3 (num_classes).  Paper cut: after conv2.
  """
  spec = (64, "M", 192, "M", 384, 256, 256, "M")
  blocks = _conv_stack(spec, input_shape, norm, lambda i: f"conv{i + 1}")
  return tuple(blocks) + _classifier(num_classes), 2


def _vgg16(input_shape, num_classes, norm):
  """VGG16 with one block per conv layer.

  Blocks: conv1_1, conv1_2, conv2_1, conv2_2, conv3_1..conv3_3,
  conv4_1..conv4_3, conv5_1..conv5_3 (64,64,M,128,128,M,256x3,M,512x3,M,512x3,M;
  3x3 SAME conv + norm + ReLU; each 2x2 max-pool belongs to the preceding conv
  block and is skipped when the spatial size would drop below 1); fc1 (flatten,
  512, ReLU), fc2 (512, ReLU), fc3 (num_classes).  Paper cut: after conv2_2.
  """
  spec = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
          512, 512, 512, "M", 512, 512, 512, "M")
  per_stage = (2, 2, 3, 3, 3)
  names = [f"conv{s + 1}_{j + 1}" for s, n in enumerate(per_stage) for j in range(n)]
  blocks = _conv_stack(spec, input_shape, norm, lambda i: names[i])
  return tuple(blocks) + _classifier(num_classes), 4


def _resnet18(input_shape, num_classes, norm):
  """ResNet18 as in the official SplitFed code.

  Blocks: stem (7x7 stride-2 conv 64, no bias, norm, ReLU, 3x3 stride-2
  max-pool with padding 1), layer1_0, layer1_1 (64), layer2_0, layer2_1 (128),
  layer3_0, layer3_1 (256), layer4_0, layer4_1 (512) basic residual blocks
  (stride 2 at layer2_0/layer3_0/layer4_0, 1x1 conv + norm projection
  shortcuts), head (global average pooling + Dense(num_classes)).  The
  official code's ``avg_pool2d(7)`` fails for 64x64 inputs (2x2 final maps);
  global average pooling is used instead.  Convs use He normal (fan-out)
  init, batch norm scale 1 / bias 0.  Official client side: stem + layer1_0.
  """
  del input_shape
  blocks = [("stem", functools.partial(ResNetStem, 64, norm=norm))]
  for stage, ch in enumerate((64, 128, 256, 512), start=1):
    for j in range(2):
      stride = 2 if stage > 1 and j == 0 else 1
      blocks.append((f"layer{stage}_{j}",
                     functools.partial(BasicBlock, ch, stride, norm=norm)))
  blocks.append(("head", functools.partial(ResNetHead, num_classes)))
  return tuple(blocks), 2


_BUILDERS = {"lenet": (_lenet, "none"), "alexnet": (_alexnet, "batch"),
             "vgg16": (_vgg16, "batch"), "resnet18": (_resnet18, "batch")}


def get_model(name: str, *, input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10,
              norm: str | None = None) -> SplitModel:
  """Builds the :class:`SplitModel` ``name`` (one of :data:`MODELS`).

  ``norm`` is 'batch', 'group' or 'none'; ``None`` picks the model's default
  (lenet: 'none', alexnet/vgg16/resnet18: 'batch').
  """
  if name not in _BUILDERS:
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
  builder, default_norm = _BUILDERS[name]
  norm = default_norm if norm is None else norm
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}: choose one of {', '.join(NORMS)}")
  input_shape = tuple(int(d) for d in input_shape)
  if len(input_shape) != 3:
    raise ValueError(f"input_shape must be (H, W, C), got {input_shape}")
  blocks, default_cut = builder(input_shape, int(num_classes), norm)
  names, factories = zip(*blocks)
  return SplitModel(name=name, block_names=tuple(names), factories=tuple(factories),
                    input_shape=input_shape, num_classes=int(num_classes),
                    default_cut=default_cut, norm=norm)
