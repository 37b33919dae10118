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
* Every built-in block is called as ``block(x, train=..., mask=...)``.
  ``mask`` is an optional ``[B]`` array (1 = real sample, 0 = padding).  Batch
  norm computes its batch statistics over the masked-in samples only.  If a
  batch holds no real sample at all, batch norm falls back to all samples so
  that outputs stay finite, and :func:`apply_part` then leaves the running
  statistics unchanged.
* A block may also be any linen module or plain callable (see
  :meth:`SplitModel.from_modules`): :class:`Sequential` passes it only the
  mode arguments its ``__call__`` declares (``train`` / ``training``,
  ``deterministic``, ``use_running_average``, ``mask``).
* Batch-norm running statistics live in the ``'batch_stats'`` collection and
  are returned functionally by :func:`apply_part` (momentum 0.9, eps 1e-5,
  i.e. PyTorch's defaults).  Group norm (``norm="group"``) has no state.
* Dropout (``get_model(..., dropout=rate)`` or a user block) is active in
  train mode only and draws from the ``'dropout'`` PRNG stream:
  ``apply_part(..., train=True, rng=key)``.  Each dropout layer folds in its
  block path, so the parts of a split draw the same masks as the full model
  given the same key.  With rate 0 (the default) the built-in models have no
  dropout layer at all and need no key.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import numbers
import re
from collections.abc import Iterable, Mapping
from typing import Any, Callable, Sequence

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp

from sfljax.conv import Conv
from sfljax.pooling import max_pool

__all__ = [
    "MODELS",
    "NORMS",
    "Sequential",
    "SplitModel",
    "apply_part",
    "get_model",
    "subset",
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
  lowering: Any = "auto"   # sfljax.conv.conv2d's lowering (a name, triple or policy)

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    # A bias right before batch norm is cancelled by its mean subtraction: its
    # gradient is pure rounding noise, which Adam would turn into steps.
    x = Conv(self.features, (self.kernel, self.kernel), padding=self.padding,
             use_bias=self.norm != "batch", kernel_init=self.kernel_init,
             lowering=self.lowering, name="conv")(x)
    x = nn.relu(_norm(self.norm, x, train=train, mask=mask, name="norm"))
    if self.pool:
      x = max_pool_2x2(x)
    return x


class DenseBlock(nn.Module):
  """Flatten (if needed) -> Dense -> optional ReLU -> optional dropout.

  The dropout layer exists only when ``dropout > 0`` (it has no variables).
  """
  features: int
  relu: bool = True
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    del mask
    x = jnp.reshape(x, (x.shape[0], -1))
    x = nn.Dense(self.features, name="dense")(x)
    x = nn.relu(x) if self.relu else x
    if self.dropout > 0:
      x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
    return x


class ResNetStem(nn.Module):
  """7x7 stride-2 conv (no bias) -> norm -> ReLU -> 3x3 stride-2 max-pool (pad 1)."""
  features: int = 64
  norm: str = "batch"
  lowering: Any = "auto"

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    x = Conv(self.features, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
             use_bias=False, kernel_init=_he_fan_out, lowering=self.lowering, name="conv")(x)
    x = nn.relu(_norm(self.norm, x, train=train, mask=mask, name="norm"))
    return max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))


class BasicBlock(nn.Module):
  """ResNet basic residual unit: two 3x3 convs (no bias) with norm and ReLU.

  A 1x1 conv + norm projection shortcut is used when the stride or the number
  of channels changes; otherwise the shortcut is the identity.
  """
  features: int
  stride: int = 1
  norm: str = "batch"
  lowering: Any = "auto"

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    conv = functools.partial(Conv, use_bias=False, kernel_init=_he_fan_out,
                             lowering=self.lowering)
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
  """Global average pooling -> optional dropout -> Dense(num_classes)."""
  num_classes: int
  dropout: float = 0.0

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    del mask
    x = jnp.mean(x, axis=(1, 2))
    if self.dropout > 0:
      x = nn.Dropout(self.dropout, deterministic=not train, name="dropout")(x)
    return nn.Dense(self.num_classes, name="fc")(x)


# ---------------------------------------------------------------------------
# Block adapter
# ---------------------------------------------------------------------------

# Mode arguments a block's ``__call__`` may declare, each with whether it gets
# ``not train`` (True) rather than ``train`` (False).
_MODE_ARGS = (("train", False), ("training", False), ("deterministic", True),
              ("use_running_average", True))


def _first_line(err: BaseException) -> str:
  """``'TypeName: first non-empty line of the message'``."""
  lines = [line.strip() for line in str(err).splitlines() if line.strip()]
  return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


def _from_flax(block) -> bool:
  """Whether ``block`` (a module or a function) is defined by Flax itself."""
  if isinstance(block, nn.Module):
    mod = type(block).__module__
  else:
    mod = getattr(block, "__module__", None)
  return isinstance(mod, str) and (mod == "flax" or mod.startswith("flax."))


def _call_block(block, x, *, train: bool, mask=None):
  """Calls ``block(x, ...)`` with the mode arguments its signature declares.

  * ``train`` / ``training`` get ``train``;
  * ``deterministic`` / ``use_running_average`` get ``not train``, unless the
    block is a module that already sets that attribute (Flax forbids setting
    both, e.g. ``nn.Dropout(0.5, deterministic=True)``);
  * ``mask`` (the ``[B]`` padding mask) goes to every block that declares it,
    except Flax's own layers: ``nn.BatchNorm`` gets it reshaped to ``[B, 1,
    ..., 1]`` (statistics over the real samples), the others (attention,
    per-sample norms) do not get it, as their ``mask`` means something else.

  A callable whose signature cannot be inspected is called as ``block(x)``.
  """
  try:
    params = inspect.signature(block).parameters
  except (TypeError, ValueError):
    return block(x)
  named = {n for n, p in params.items()
           if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)}
  kwargs = {}
  for arg, negate in _MODE_ARGS:
    if arg not in named:
      continue
    if negate and isinstance(block, nn.Module) and getattr(block, arg, None) is not None:
      continue
    kwargs[arg] = (not train) if negate else train
  if "mask" in named:
    if not _from_flax(block):
      kwargs["mask"] = mask
    elif isinstance(block, nn.BatchNorm) and mask is not None:
      kwargs["mask"] = jnp.reshape(mask, mask.shape + (1,) * (x.ndim - mask.ndim))
  return block(x, **kwargs)


@dataclasses.dataclass(frozen=True, eq=False)
class _Adopt:
  """Block factory of a user module instance.

  ``_Adopt(m)(name=n)`` is a copy of ``m`` named ``n`` whose parent is the
  module under construction (the :class:`Sequential`), so that its variables
  live directly under the block name.
  """
  module: nn.Module

  def __call__(self, *, name: str) -> nn.Module:
    return self.module.copy(name=name)


class _FnBlock(nn.Module):
  """A block made of a plain callable (``nn.relu``, a flatten function, ...).

  Linen modules that ``fn`` creates inline (``lambda x: nn.Dense(8)(x)``)
  become submodules of the block, as in any compact method.
  """
  fn: Callable[..., Any]

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    return _call_block(self.fn, x, train=train, mask=mask)


# ---------------------------------------------------------------------------
# Sequential / SplitModel
# ---------------------------------------------------------------------------


class Sequential(nn.Module):
  """A chain of named blocks.

  Attributes:
    names: block names, used as the keys of every variable collection.
    factories: one callable per block; ``factory(name=block_name)`` must
      return a linen module.  It is called as ``block(x, ...)`` with the mode
      arguments its ``__call__`` declares (see :meth:`SplitModel.from_modules`);
      the built-in blocks take ``train`` and ``mask``.
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
      x = _call_block(factory(name=name), x, train=train, mask=mask)
    return x


def subset(variables: dict, names: Sequence[str]) -> dict:
  """Restricts every collection of ``variables`` to the blocks ``names``.

  Blocks absent from a collection (no batch norm) are skipped; the result
  always has 'params'.  :meth:`SplitModel.subset` also checks the names.
  """
  out = {col: {n: tree[n] for n in names if n in tree} for col, tree in variables.items()}
  out.setdefault("params", {})
  return out


_subset = subset  # the former private name


def _named_blocks(blocks) -> list[tuple[str, Any]]:
  """``(name, block)`` pairs from a mapping, pairs, or bare blocks."""
  if isinstance(blocks, Mapping):
    return list(blocks.items())
  if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Iterable):
    raise ValueError(f"blocks must be a sequence of modules/callables, of (name, module) "
                     f"pairs, or a dict name -> module; got {type(blocks).__name__}")
  items = list(blocks)

  def is_pair(b):
    return isinstance(b, tuple) and len(b) == 2 and isinstance(b[0], str)

  if items and all(is_pair(b) for b in items):
    return items
  if any(is_pair(b) for b in items):
    raise ValueError("blocks mixes (name, module) pairs with bare modules: name all or none")
  return [(b.name if isinstance(b, nn.Module) and b.name is not None else f"block{i}", b)
          for i, b in enumerate(items)]


def _block_factory(name: str, block) -> Callable[..., nn.Module]:
  """The :class:`Sequential` factory of a user block (module or callable)."""
  if isinstance(block, nn.Module):
    return _Adopt(block)
  if isinstance(block, type) or not callable(block):
    what = f"the class {block.__name__}" if isinstance(block, type) else repr(block)
    raise ValueError(f"block {name!r} is {what}: give a linen module instance or a callable")
  return functools.partial(_FnBlock, block)


def _trace_train(part: Sequential, variables, x, mask, key):
  """Output shape of ``part`` in train mode (``key``: dropout key or None)."""
  def run(v, a, m, k):
    rngs = None if k is None else {"dropout": k}
    return part.apply(v, a, train=True, mask=m, rngs=rngs, mutable=["batch_stats"])[0]
  return jax.eval_shape(run, variables, x, mask, key)


def _probe_blocks(names, factories, input_shape, num_classes) -> tuple[bool, bool]:
  """Traces the chain block by block on shapes only (``jax.eval_shape``).

  Each block is initialised (eval mode) on the previous block's output, then
  traced in train mode with a ``[1]`` mask, first without and, if a PRNG
  stream is missing, with a ``'dropout'`` key.  Raises a one-line
  ``ValueError`` naming the block that fails.  Returns ``(has_batch_stats,
  needs_rng)``.
  """
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  mask = jax.ShapeDtypeStruct((1,), jnp.float32)
  key = jax.random.key(0)
  has_stats = needs_rng = False
  prev = None
  for name, factory in zip(names, factories):
    part = Sequential(names=(name,), factories=(factory,))
    where = ("the input" if prev is None else f"the output of block {prev!r}") + \
        f" (shape {tuple(x.shape)})"
    try:
      y, variables = jax.eval_shape(functools.partial(part.init_with_output, train=False),
                                    key, x)
    except Exception as e:  # any failure is reported on one line, naming the block
      raise ValueError(f"block {name!r} cannot take {where}: {_first_line(e)}") from e
    if not isinstance(y, jax.ShapeDtypeStruct):
      raise ValueError(f"block {name!r} must return one array, got {type(y).__name__} "
                       f"on {where}")
    extra = sorted(set(variables) - {"params", "batch_stats"})
    if extra:
      raise ValueError(f"block {name!r} creates the variable collection(s) "
                       f"{', '.join(map(repr, extra))}: only 'params' and 'batch_stats' "
                       f"are supported")
    has_stats = has_stats or bool(jax.tree_util.tree_leaves(variables.get("batch_stats", {})))
    try:
      try:
        y_train = _trace_train(part, variables, x, mask, None)
      except flax.errors.InvalidRngError:
        needs_rng = True
        y_train = _trace_train(part, variables, x, mask, key)
    except Exception as e:  # any failure is reported on one line, naming the block
      raise ValueError(f"block {name!r} fails in train mode on {where}: "
                       f"{_first_line(e)}") from e
    if (not isinstance(y_train, jax.ShapeDtypeStruct) or y_train.shape != y.shape
        or y_train.dtype != y.dtype):
      raise ValueError(f"block {name!r} returns {getattr(y_train, 'shape', y_train)} in train "
                       f"mode but {tuple(y.shape)} in eval mode on {where}")
    prev, x = name, y
  if tuple(x.shape) != (1, num_classes):
    raise ValueError(f"the last block {prev!r} outputs shape {tuple(x.shape)} for an input of "
                     f"shape {(1,) + tuple(input_shape)}: expected (1, {num_classes}) "
                     f"(num_classes={num_classes})")
  return has_stats, needs_rng


@dataclasses.dataclass(frozen=True)
class SplitModel:
  """A model as an ordered chain of named blocks, splittable at block boundaries.

  ``norm`` records the normalisation the blocks were built with ('batch',
  'group' or 'none'; 'custom' for :meth:`from_modules`); only 'batch' creates
  a 'batch_stats' collection.  ``dropout`` is the classifier dropout rate of
  the built-in models (0: no dropout layer).  ``uses_batch_stats`` and
  ``uses_rng`` are what :meth:`from_modules` detected; ``None`` (built-in
  models) derives them from ``norm`` and ``dropout``.

  A *cut* ``k`` (1 <= k < num_blocks) puts the first ``k`` blocks before the
  boundary.  ``parts(cuts)`` with strictly increasing cuts returns
  ``len(cuts) + 1`` consecutive parts.
  """
  name: str
  block_names: tuple[str, ...]
  factories: tuple[Callable[..., nn.Module], ...]
  input_shape: tuple[int, ...]
  num_classes: int
  default_cut: int
  norm: str = "none"
  dropout: float = 0.0
  uses_batch_stats: bool | None = None
  uses_rng: bool | None = None

  @classmethod
  def from_modules(cls, blocks, *, input_shape: Sequence[int], num_classes: int,
                   name: str = "custom", default_cut: int | None = None) -> SplitModel:
    """A :class:`SplitModel` made of the user's own Flax blocks.

    Args:
      blocks: the chain, in order, as a sequence of blocks, a sequence of
        ``(name, block)`` pairs, or a dict name -> block.  Bare blocks are
        named by their module ``name`` if set, else ``block<i>`` (``i``: the
        position).  A block is a linen module instance or a plain callable
        (``nn.relu``, ``lambda x: x.reshape(x.shape[0], -1)``).  Each is called
        with only the mode arguments its ``__call__`` declares: ``train`` and
        ``training`` get ``train``; ``deterministic`` and
        ``use_running_average`` get ``not train`` (unless the module sets them
        as attributes); ``mask``, the ``[B]`` padding mask (1 = real sample),
        goes to user blocks that declare it and, reshaped to ``[B, 1, ...]``,
        to a bare ``nn.BatchNorm``, not to Flax's other layers.  A module
        block is copied under the block name, so its variables are exactly
        those of ``module.init`` placed at ``params[block_name]`` (e.g.
        ``params['fc1']['kernel']`` for an ``nn.Dense`` block, or
        ``params['enc']['Conv_0']`` for a user module with an inline
        ``nn.Conv``); callables that create modules inline get them one level
        down (``params['block3']['Dense_0']``).  Instances are not shared: a
        module given twice becomes two blocks with their own variables.
      input_shape: one input sample's shape (e.g. ``(28, 28, 1)``).
      num_classes: the number of logits the last block must output.
      name: the model's name (used in messages).
      default_cut: the cut :meth:`resolve_cuts` returns for ``None``;
        ``None`` picks the middle boundary, ``num_blocks // 2``.

    Only the 'params' and 'batch_stats' variable collections are supported
    ('batch_stats' is updated by :func:`apply_part` in train mode, over the
    samples selected by ``mask`` only if the block passes the mask on to its
    batch norm).  The only PRNG stream fed in train mode is 'dropout'.

    The chain is checked when built: it is traced block by block with
    ``jax.eval_shape`` on a ``(1, *input_shape)`` float32 input, in eval and
    train mode; a block that cannot take the previous block's output, a
    non-array output, a last output other than ``(1, num_classes)``,
    duplicate or invalid names (all digits, or holding ',', which
    :meth:`resolve_cuts` would misread) raise a one-line ``ValueError``.
    The trace also detects :attr:`has_batch_stats` and :attr:`needs_rng`.
    """
    pairs = _named_blocks(blocks)
    if len(pairs) < 2:
      raise ValueError(f"{name} needs at least 2 blocks to be split, got {len(pairs)}")
    names = []
    for block_name, _ in pairs:
      if (not isinstance(block_name, str) or not block_name or block_name.isdigit()
          or "," in block_name or block_name.strip() != block_name):
        raise ValueError(f"invalid block name {block_name!r} for {name}: names must be "
                         f"non-empty strings, not all digits, without ',' or surrounding "
                         f"spaces")
      if block_name in names:
        raise ValueError(f"duplicate block name {block_name!r} for {name}: block names "
                         f"must be unique")
      names.append(block_name)
    factories = tuple(_block_factory(n, b) for n, b in pairs)
    input_shape = tuple(input_shape)
    if not input_shape or any(isinstance(d, bool) or not isinstance(d, numbers.Integral)
                              or d < 1 for d in input_shape):
      raise ValueError(f"input_shape must be a non-empty tuple of positive ints, got "
                       f"{input_shape}")
    if (isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral)
        or num_classes < 1):
      raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    model = cls(name=name, block_names=tuple(names), factories=factories,
                input_shape=tuple(int(d) for d in input_shape), num_classes=int(num_classes),
                default_cut=len(names) // 2 if default_cut is None else default_cut,
                norm="custom", uses_batch_stats=False, uses_rng=False)
    (cut,) = model.check_cut(model.default_cut)
    stats, rng = _probe_blocks(model.block_names, factories, model.input_shape,
                               model.num_classes)
    return dataclasses.replace(model, default_cut=cut, uses_batch_stats=stats, uses_rng=rng)

  @property
  def num_blocks(self) -> int:
    return len(self.block_names)

  @property
  def has_batch_stats(self) -> bool:
    """Whether the model has batch norm (a 'batch_stats' collection)."""
    if self.uses_batch_stats is not None:
      return self.uses_batch_stats
    return self.norm == "batch"

  @property
  def needs_rng(self) -> bool:
    """Whether some block draws from the 'dropout' PRNG stream in train mode,
    i.e. train-mode :func:`apply_part` needs ``rng`` for some part."""
    if self.uses_rng is not None:
      return self.uses_rng
    return self.dropout > 0

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

  def resolve_cuts(self, spec: int | str | Sequence[int | str] | None = None
                   ) -> tuple[int, ...]:
    """One cut (client / server) or two (U-shaped) from a user-facing spec.

    ``spec`` is ``None`` (the default cut), an int, a block name (the cut
    right after that block: the block is the last one before the cut), a
    digit string (``"2"``), a comma-separated pair (``"1,4"``,
    ``"conv1,fc2"``), or a sequence of ints / names / digit strings.  Returns
    1 or 2 strictly increasing valid cuts; anything else (unknown name, the
    last block's name, out of range, not increasing, more than two cuts)
    raises a one-line ``ValueError`` listing the valid cuts.
    """
    def fail(reason):
      raise ValueError(f"cut spec {spec!r} for {self.name}: {reason}; give 1 or 2 cuts as "
                       f"ints or block names (the last block before the cut): "
                       f"{self._valid_cuts_text()}")

    if spec is None:
      return self.check_cut(self.default_cut)
    if isinstance(spec, str):
      items = [item.strip() for item in spec.split(",")]
    elif isinstance(spec, numbers.Integral) and not isinstance(spec, bool):
      items = [spec]
    elif isinstance(spec, Iterable) and not isinstance(spec, (bytes, Mapping)):
      items = list(spec)
    else:
      fail("not an int, a string or a sequence")
    if not 1 <= len(items) <= 2:
      fail(f"{len(items)} cuts (one cut: client/server; two: U-shaped)")
    cuts = []
    for item in items:
      if isinstance(item, bool):
        fail(f"{item!r} is not a cut")
      elif isinstance(item, numbers.Integral):
        cuts.append(int(item))
      elif isinstance(item, str) and re.fullmatch(r"[+-]?\d+", item.strip()):
        cuts.append(int(item))
      elif isinstance(item, str) and item.strip() in self.block_names:
        k = self.block_names.index(item.strip()) + 1
        if k == self.num_blocks:
          fail(f"{item.strip()!r} is the last block: a cut after it leaves nothing after it")
        cuts.append(k)
      elif isinstance(item, str):
        fail(f"unknown block {item.strip()!r}" if item.strip() else "empty cut")
      else:
        fail(f"{item!r} is not a cut")
    try:
      return self.check_cut(tuple(cuts))
    except ValueError as e:
      raise ValueError(f"cut spec {spec!r}: {e}") from None

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

  def subset(self, variables: dict, names: str | Sequence[str]) -> dict:
    """Restricts every collection of ``variables`` to the blocks ``names``.

    Blocks absent from a collection (no batch norm) are skipped; the result
    always has 'params'.  Unknown block names raise ``ValueError``.
    """
    names = (names,) if isinstance(names, str) else tuple(names)
    unknown = [n for n in names if n not in self.block_names]
    if unknown:
      raise ValueError(f"unknown block(s) {', '.join(map(repr, unknown))} for {self.name}: "
                       f"blocks are {', '.join(self.block_names)}")
    return subset(variables, names)

  def split_variables(self, variables: dict, cuts: int | Sequence[int]) -> tuple[dict, ...]:
    """Per-part subsets of the full ``variables`` (every part has 'params')."""
    return tuple(subset(variables, self.block_names[a:b]) for a, b in self._bounds(cuts))

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
               mask=None, rng=None) -> tuple[jax.Array, dict]:
  """Pure apply of a model part.

  Returns ``(output, new_batch_stats)``.  In train mode ``new_batch_stats`` is
  the updated 'batch_stats' collection (same structure as
  ``variables.get('batch_stats', {})``; unchanged if ``mask`` has no real
  sample); in eval mode it is ``variables.get('batch_stats', {})`` itself.
  ``rng`` (a PRNG key) feeds the 'dropout' stream in train mode and is
  ignored in eval mode; a part with active dropout in train mode raises
  ``ValueError`` without it.  Dropout masks depend on the key and the block
  path only, so a model's parts draw the full model's masks given one key.
  Works under ``jax.vmap`` (leading client axis) and ``jax.vjp``.
  """
  rngs = {"dropout": rng} if train and rng is not None else None
  stats = variables.get("batch_stats", {})
  try:
    if not train or not jax.tree_util.tree_leaves(stats):
      return module.apply(variables, x, train=train, mask=mask, rngs=rngs), stats
    y, updates = module.apply(variables, x, train=True, mask=mask, rngs=rngs,
                              mutable=["batch_stats"])
  except flax.errors.InvalidRngError as e:
    raise ValueError(f"this part draws random numbers (dropout): pass rng=<PRNG key> to "
                     f"apply_part in train mode ({_first_line(e)})") from e
  new_stats = {k: updates["batch_stats"][k] for k in stats}
  if mask is not None:
    real = jnp.any(jnp.asarray(mask).astype(bool))
    new_stats = jax.tree_util.tree_map(lambda n, o: jnp.where(real, n, o), new_stats, stats)
  return y, new_stats


# ---------------------------------------------------------------------------
# Model builders
# ---------------------------------------------------------------------------


def _lenet(input_shape, num_classes, norm, dropout):
  """LeNet-5 (~60k params, 5 layers).

  Blocks: conv1 (6 ch 5x5, SAME for inputs smaller than 32 else VALID, ReLU,
  2x2 max-pool), conv2 (16 ch 5x5 VALID, ReLU, 2x2 max-pool), fc1 (flatten,
  120, ReLU), fc2 (84, ReLU), fc3 (num_classes).  With norm 'batch'/'group' a
  norm layer follows each conv, before the ReLU.  Dropout (rate > 0) ends fc1
  and fc2, i.e. comes before fc2 and fc3.  Paper cut: after conv2.
  """
  pad1 = "SAME" if input_shape[0] < 32 else "VALID"
  blocks = (
      ("conv1", functools.partial(ConvBlock, 6, 5, pad1, norm, True)),
      ("conv2", functools.partial(ConvBlock, 16, 5, "VALID", norm, True)),
      ("fc1", functools.partial(DenseBlock, 120, dropout=dropout)),
      ("fc2", functools.partial(DenseBlock, 84, dropout=dropout)),
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


def _classifier(num_classes, dropout, hidden=512):
  """fc1 (flatten, hidden, ReLU, dropout), fc2 (hidden, ReLU, dropout), fc3."""
  return (("fc1", functools.partial(DenseBlock, hidden, dropout=dropout)),
          ("fc2", functools.partial(DenseBlock, hidden, dropout=dropout)),
          ("fc3", functools.partial(DenseBlock, num_classes, relu=False)))


def _alexnet(input_shape, num_classes, norm, dropout):
  """AlexNet adapted to small inputs (28x28, 32x32, 64x64).

  Blocks: conv1 (64), conv2 (192), conv3 (384), conv4 (256), conv5 (256), all
  3x3 SAME convs + norm + ReLU, with a 2x2 max-pool after conv1, conv2 and
  conv5 while the spatial size allows; fc1 (flatten, 512, ReLU), fc2 (512,
  ReLU), fc3 (num_classes).  Dropout (rate > 0) follows fc1 and fc2, as in
  the original.  Paper cut: after conv2.
  """
  spec = (64, "M", 192, "M", 384, 256, 256, "M")
  blocks = _conv_stack(spec, input_shape, norm, lambda i: f"conv{i + 1}")
  return tuple(blocks) + _classifier(num_classes, dropout), 2


def _vgg16(input_shape, num_classes, norm, dropout):
  """VGG16 with one block per conv layer.

  Blocks: conv1_1, conv1_2, conv2_1, conv2_2, conv3_1..conv3_3,
  conv4_1..conv4_3, conv5_1..conv5_3 (64,64,M,128,128,M,256x3,M,512x3,M,512x3,M;
  3x3 SAME conv + norm + ReLU; each 2x2 max-pool belongs to the preceding conv
  block and is skipped when the spatial size would drop below 1); fc1 (flatten,
  512, ReLU), fc2 (512, ReLU), fc3 (num_classes).  Dropout (rate > 0) follows
  fc1 and fc2, as in the original.  Paper cut: after conv2_2.
  """
  spec = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M",
          512, 512, 512, "M", 512, 512, 512, "M")
  per_stage = (2, 2, 3, 3, 3)
  names = [f"conv{s + 1}_{j + 1}" for s, n in enumerate(per_stage) for j in range(n)]
  blocks = _conv_stack(spec, input_shape, norm, lambda i: names[i])
  return tuple(blocks) + _classifier(num_classes, dropout), 4


def _resnet18(input_shape, num_classes, norm, dropout):
  """ResNet18 as in the official SplitFed code.

  Blocks: stem (7x7 stride-2 conv 64, no bias, norm, ReLU, 3x3 stride-2
  max-pool with padding 1), layer1_0, layer1_1 (64), layer2_0, layer2_1 (128),
  layer3_0, layer3_1 (256), layer4_0, layer4_1 (512) basic residual blocks
  (stride 2 at layer2_0/layer3_0/layer4_0, 1x1 conv + norm projection
  shortcuts), head (global average pooling, dropout if rate > 0,
  Dense(num_classes)).  The
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
  blocks.append(("head", functools.partial(ResNetHead, num_classes, dropout=dropout)))
  return tuple(blocks), 2


_BUILDERS = {"lenet": (_lenet, "none"), "alexnet": (_alexnet, "batch"),
             "vgg16": (_vgg16, "batch"), "resnet18": (_resnet18, "batch")}


def _check_lenet_size(input_shape) -> None:
  """LeNet's two 5x5 convs and pools need a large enough image.

  Below 32 pixels high conv1 is SAME: h, w -> h//2 after the pool, conv2
  (VALID) leaves h//2 - 4 and its pool (h//2 - 4)//2 >= 1, so h, w >= 12.
  From 32 up conv1 is VALID (4 pixels fewer): w >= 16. Smaller images would
  flatten to nothing or fail inside conv2, so they are refused up front.
  """
  h, w = input_shape[:2]
  min_h, min_w = (12, 12) if h < 32 else (32, 16)
  if h < min_h or w < min_w:
    raise ValueError(f"images of {h}x{w} pixels are too small for lenet: it takes at least "
                     f"12x12 (at least 16 wide from 32 high up); use alexnet, vgg16 or "
                     f"resnet18, which take any size, or larger images")


_SIZE_CHECKS = {"lenet": _check_lenet_size}  # The other models take any size >= 1x1.


def _has_convs(factory) -> bool:
  return (isinstance(factory, functools.partial) and isinstance(factory.func, type)
          and issubclass(factory.func, (ConvBlock, ResNetStem, BasicBlock)))


def get_model(name: str, *, input_shape: Sequence[int] = (28, 28, 1), num_classes: int = 10,
              norm: str | None = None, dropout: float = 0.0,
              conv_lowering: Any = "auto") -> SplitModel:
  """Builds the :class:`SplitModel` ``name`` (one of :data:`MODELS`).

  ``norm`` is 'batch', 'group' or 'none'; ``None`` picks the model's default
  (lenet: 'none', alexnet/vgg16/resnet18: 'batch').  ``dropout`` (0 <= rate
  < 1) adds dropout to the classifier: after the ReLU of fc1 and fc2 (lenet,
  alexnet, vgg16) or before the head's Dense (resnet18).  Rate 0 adds no
  layer: the same variables and outputs as without the argument.  With rate
  > 0, train-mode :func:`apply_part` needs ``rng``.  ``conv_lowering`` goes to
  every convolution (:func:`sfljax.conv.conv2d`'s ``lowering``: 'auto' = the
  fixed per-layer rule, a lowering name, or a policy such as
  :class:`sfljax.conv_autotune.Autotune`); it changes speed and float
  rounding, never the variables.

  Raises ``ValueError`` for an ``input_shape`` the model cannot take (lenet:
  smaller than 12x12, see :func:`_check_lenet_size`; the others take any size).
  """
  if name not in _BUILDERS:
    raise ValueError(f"unknown model {name!r}: choose one of {', '.join(MODELS)}")
  builder, default_norm = _BUILDERS[name]
  norm = default_norm if norm is None else norm
  if norm not in NORMS:
    raise ValueError(f"unknown norm {norm!r}: choose one of {', '.join(NORMS)}")
  input_shape = tuple(int(d) for d in input_shape)
  if len(input_shape) != 3 or min(input_shape) < 1:
    raise ValueError(f"input_shape must be (H, W, C) of positive sizes, got {input_shape}")
  if name in _SIZE_CHECKS:
    _SIZE_CHECKS[name](input_shape)
  if (isinstance(dropout, bool) or not isinstance(dropout, numbers.Real)
      or not 0 <= dropout < 1):
    raise ValueError(f"dropout must be a rate in [0, 1), got {dropout!r}")
  dropout = float(dropout)
  blocks, default_cut = builder(input_shape, int(num_classes), norm, dropout)
  if not (isinstance(conv_lowering, str) and conv_lowering == "auto"):
    blocks = tuple((n, functools.partial(f, lowering=conv_lowering) if _has_convs(f) else f)
                   for n, f in blocks)
  names, factories = zip(*blocks)
  return SplitModel(name=name, block_names=tuple(names), factories=tuple(factories),
                    input_shape=input_shape, num_classes=int(num_classes),
                    default_cut=default_cut, norm=norm, dropout=dropout)
