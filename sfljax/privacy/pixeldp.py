"""The PixelDP noise layer and the weight projection that bounds its sensitivity.

PixelDP (Lecuyer et al., "Certified Robustness to Adversarial Examples with
Differential Privacy", S&P 2019) adds a noise layer after the first layers of a
network; SplitFed (Thapa et al. 2022) puts it in the client-side model after
the first convolution, so that the smashed data a client sends is noised.  If
the pre-noise part ``g`` has sensitivity ``Δ`` (``||g(x) - g(x')|| <= Δ ||x -
x'||`` in the mechanism's norm), the noise layer makes the network
``(ε′, δ)``-DP with respect to its input:

* ``"laplace"``: i.i.d. Laplace noise of scale ``b = Δ / ε′`` on every element
  (the ``(ε′, 0)`` Laplace mechanism for the L1 sensitivity ``Δ``);
* ``"gaussian"``: i.i.d. normal noise of ``σ = Δ sqrt(2 ln(1.25 / δ)) / ε′``
  (the classical Gaussian mechanism for the L2 sensitivity ``Δ``, valid for
  ``ε′ <= 1`` only, so larger ``ε′`` is refused).

``ε′ = inf`` makes the layer exactly the identity.

Sensitivity control (:func:`layer_bounds`, :func:`sensitivity_bound`,
:func:`project`).  The pre-noise blocks may be :class:`~sfljax.models.ConvBlock`
without a norm layer and :class:`~sfljax.models.DenseBlock` without dropout;
``Δ`` is bounded by the product of per-layer operator-norm bounds, because:

* a bias cancels in ``f(x) - f(x')``, so only the kernel matters;
* ReLU is 1-Lipschitz per element (``|relu(a) - relu(b)| <= |a - b|``), hence
  for the L1 and the L2 norm; flattening is an isometry;
* a 2x2 stride-2 max-pool uses disjoint windows and ``|max(a) - max(b)| <=
  max_i |a_i - b_i|``, which is at most the window's L1 or L2 norm of ``a -
  b``; summing (the p-th powers) over disjoint windows, and dropping an odd
  trailing row/column, can only lower the total: 1-Lipschitz for L1 and L2.

Per layer (``W``: a dense kernel ``(in, out)``, ``y = x W``; or a conv kernel
``(kh, kw, cin, cout)`` with any stride and zero padding):

* dense, L1→L1: ``max_i Σ_j |W_ij|``, exact (``||xW||_1 <= Σ_i |x_i| Σ_j
  |W_ij|``, with equality at the best ``x = e_i``);
* dense, L2→L2: the largest singular value of ``W``, exact;
* conv, L1→L1: ``max_cin Σ_{kh, kw, cout} |w|``.  For a fixed tap ``t``, the
  input position ``p`` is read by at most one output position (``o s + t -
  pad = p`` has at most one solution ``o``), so each input element reaches at
  most ``kh kw cout`` outputs, each through its own weight, and ``||y||_1 <=
  Σ_{p, cin} |x_{p, cin}| Σ_{t, cout} |w_{t, cin, cout}|``.  Exact when some
  input pixel is read by every tap (e.g. 'SAME' padding);
* conv, L2→L2: the minimum of two upper bounds.  (a) ``sqrt(kh kw) ||W_flat||_2``
  with ``W_flat`` the ``(kh kw cin, cout)`` reshape: ``y_o = P_o(x) W_flat`` with
  ``P_o(x)`` the patch read by output ``o``, so ``||y||² <= ||W_flat||² Σ_o
  ||P_o(x)||²``, and ``Σ_o ||P_o(x)||² = Σ_t Σ_o ||x_{o s + t - pad}||² <= kh
  kw ||x||²`` since for each tap every input position is read at most once.
  (b) ``Σ_t ||W_t||_2``: ``y = Σ_t G_t(x) W_t`` where ``G_t`` selects, per
  output position, the input read by tap ``t`` (each input at most once, so
  ``||G_t(x)||_F <= ||x||``), and the triangle inequality.  (a) is usually
  the tighter; PixelDP's code uses (a) (with ``ceil(k / stride)²`` for ``kh
  kw``).

:func:`project` scales each pre-noise kernel down (never up) so that its bound
is at most ``Δ^(1/L) (1 - margin)`` (``L`` pre-noise layers; PixelDP's "every
layer <= 1" for ``Δ = 1``).  The margin (default :data:`MARGIN` = 1e-5) absorbs
float32 rounding: float32 SVD underestimates ``||W||_2`` by up to ~1e-6
relative on 4096x512 matrices, and rounding ``params + updates`` in
:func:`projected` moves the bounds by a few 1e-7.

Randomness.  The layer draws from the ``'dropout'`` PRNG stream, which
:func:`~sfljax.models.apply_part` feeds in train mode (``rng=key``), so the
existing key plumbing drives the training noise; like dropout it folds in its
block path, so a model's parts draw the full model's noise for one key.  At
evaluation PixelDP adds noise too: with ``eval_noise=True`` (the default) an
eval-mode call needs the key as well, ``module.apply(variables, x,
train=False, rngs={'dropout': key})`` (:func:`noisy_apply`,
:func:`predict_with_draws`); ``apply_part`` passes no key in eval mode, so an
eval-mode ``apply_part`` (the Trainer's evaluation) raises ``ValueError``.
``eval_noise=False`` makes evaluation noise-free (the identity) instead.  At
``init`` the layer is the identity (it has no variables).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import flax.errors
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sfljax.models import ConvBlock, DenseBlock, SplitModel

__all__ = [
    "DEFAULT_DRAWS",
    "MARGIN",
    "MECHANISMS",
    "PixelDPNoise",
    "insert_noise_layer",
    "layer_bounds",
    "model_projection",
    "model_sensitivity",
    "noise_scale",
    "noisy_apply",
    "pre_noise_blocks",
    "predict_with_draws",
    "project",
    "projected",
    "sensitivity_bound",
]

MECHANISMS: tuple[str, ...] = ("laplace", "gaussian")
MARGIN = 1e-5
# PixelDP's evaluation code (github.com/columbia/pixeldp, experiments/
# cifar10_eval.py) estimates the expected softmax with n_draws_eval = 300
# noise draws (500 for its PGD runs).
DEFAULT_DRAWS = 300

_NORM_OF = {"laplace": 1, "gaussian": 2}


def _norm_p(p) -> int:
  """1 or 2 from ``p`` (1, 2, 'laplace' or 'gaussian')."""
  if isinstance(p, str) and p in _NORM_OF:
    return _NORM_OF[p]
  if not isinstance(p, bool) and p in (1, 2):
    return int(p)
  raise ValueError(f"norm {p!r}: use 1 (laplace, L1->L1) or 2 (gaussian, L2->L2)")


def noise_scale(epsilon, mechanism: str = "laplace", delta=None,
                sensitivity: float = 1.0) -> float:
  """The noise scale after checking the parameters: Laplace ``b = Δ / ε′``,
  Gaussian ``σ = Δ sqrt(2 ln(1.25 / δ)) / ε′``; 0.0 for ``ε′ = inf``.

  Raises ``ValueError`` for an unknown mechanism, ``ε′`` not > 0 (NaN
  included), ``Δ`` not finite > 0, a ``delta`` other than None/0 for Laplace
  (an ``(ε′, 0)`` mechanism), and for Gaussian a missing ``delta``, ``δ``
  outside (0, 1) or a finite ``ε′ > 1`` (the classical bound needs ``ε′ <=
  1``).
  """
  if mechanism not in MECHANISMS:
    raise ValueError(f"unknown mechanism {mechanism!r}: choose one of {', '.join(MECHANISMS)}")
  if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real) or not epsilon > 0:
    raise ValueError(f"the PixelDP budget epsilon must be a number > 0 (inf: no noise), "
                     f"got {epsilon!r}")
  if (isinstance(sensitivity, bool) or not isinstance(sensitivity, numbers.Real)
      or not 0 < sensitivity < math.inf):
    raise ValueError(f"sensitivity must be a finite number > 0, got {sensitivity!r}")
  if mechanism == "laplace":
    if delta not in (None, 0):
      raise ValueError(f"the laplace mechanism is (epsilon, 0)-DP: delta must be None, got "
                       f"{delta!r} (use mechanism='gaussian' for (epsilon, delta))")
    return 0.0 if math.isinf(epsilon) else float(sensitivity) / float(epsilon)
  if delta is None:
    raise ValueError("the gaussian mechanism needs delta: give delta in (0, 1), e.g. 1e-5")
  if isinstance(delta, bool) or not isinstance(delta, numbers.Real) or not 0 < delta < 1:
    raise ValueError(f"delta must be in (0, 1) for the gaussian mechanism, got {delta!r}")
  if math.isinf(epsilon):
    return 0.0
  if epsilon > 1:
    raise ValueError(f"the gaussian mechanism's bound sigma = sensitivity * sqrt(2 ln(1.25 / "
                     f"delta)) / epsilon holds for epsilon <= 1 only, got epsilon={epsilon!r}")
  return float(sensitivity) * math.sqrt(2.0 * math.log(1.25 / float(delta))) / float(epsilon)


class PixelDPNoise(nn.Module):
  """Adds PixelDP noise to its input (see the module docstring).

  Every element of every example gets its own draw from one
  ``'dropout'``-stream key per call (the same key gives the same noise).
  Train mode needs the key (a missing one raises flax's ``InvalidRngError``,
  which ``apply_part`` reports as a ``ValueError``); eval mode needs it when
  ``eval_noise`` is True and raises ``ValueError`` without it, otherwise it
  returns ``x``.  ``epsilon = inf`` returns ``x`` itself in every mode, as
  does ``init``.  The noise is drawn in float32 and cast to ``x.dtype``.
  """
  epsilon: float
  mechanism: str = "laplace"
  delta: float | None = None
  sensitivity: float = 1.0
  eval_noise: bool = True

  def __post_init__(self):
    noise_scale(self.epsilon, self.mechanism, self.delta, self.sensitivity)
    super().__post_init__()

  @nn.compact
  def __call__(self, x, *, train: bool, mask=None):
    del mask  # padding rows get noise too; their results are discarded anyway
    scale = noise_scale(self.epsilon, self.mechanism, self.delta, self.sensitivity)
    if scale == 0.0 or self.is_initializing() or not (train or self.eval_noise):
      return x
    if not self.has_rng("dropout"):
      if train:
        raise flax.errors.InvalidRngError(
            f"PixelDP noise layer {self.name!r} needs PRNG for \"dropout\"")
      raise ValueError(f"PixelDP noise layer {self.name!r} adds noise at evaluation too and "
                       f"needs a 'dropout' key: module.apply(variables, x, train=False, "
                       f"rngs={{'dropout': key}}) (noisy_apply / predict_with_draws); "
                       f"apply_part passes no key in eval mode.  Build the layer with "
                       f"eval_noise=False for noise-free evaluation")
    key = self.make_rng("dropout")
    draw = jax.random.laplace if self.mechanism == "laplace" else jax.random.normal
    return x + (scale * draw(key, x.shape, jnp.float32)).astype(x.dtype)


# ---------------------------------------------------------------------------
# Sensitivity bounds and projection
# ---------------------------------------------------------------------------


def _layer(name: str, block_params) -> tuple[str, Any]:
  """``(layer_name, kernel)`` of a pre-noise block's single conv / dense layer."""
  if isinstance(block_params, Mapping) and len(block_params) == 1:
    (layer, leaves), = block_params.items()
    ndim = {"conv": 4, "dense": 2}.get(layer)
    if (ndim is not None and isinstance(leaves, Mapping) and "kernel" in leaves
        and set(leaves) <= {"kernel", "bias"} and np.ndim(leaves["kernel"]) == ndim):
      return layer, leaves["kernel"]
  what = sorted(block_params) if isinstance(block_params, Mapping) else type(block_params)
  raise ValueError(f"block {name!r} has parameters {what}: the sensitivity bound covers "
                   f"blocks holding exactly one conv ('conv': HWIO kernel) or dense "
                   f"('dense': (in, out) kernel) layer plus a bias, i.e. ConvBlock with "
                   f"norm='none' and DenseBlock")


def _kernel_bound(kernel, p: int, xp):
  """Operator-norm bound of one kernel (module docstring), with ``xp`` = jnp or np."""
  if kernel.ndim == 2:
    if p == 1:
      return xp.max(xp.sum(xp.abs(kernel), axis=1))
    return xp.max(xp.linalg.svd(kernel, compute_uv=False))
  kh, kw, cin, cout = kernel.shape
  if p == 1:
    return xp.max(xp.sum(xp.abs(kernel), axis=(0, 1, 3)))
  patches = math.sqrt(kh * kw) * xp.max(
      xp.linalg.svd(kernel.reshape(kh * kw * cin, cout), compute_uv=False))
  taps = xp.sum(xp.max(xp.linalg.svd(kernel.reshape(kh * kw, cin, cout), compute_uv=False),
                       axis=-1))
  return xp.minimum(patches, taps)


def _block_names(params, blocks) -> tuple[str, ...]:
  return tuple(params) if blocks is None else tuple(blocks)


def layer_bounds(params: Mapping[str, Any], p, *, blocks: Sequence[str] | None = None
                 ) -> dict[str, jax.Array]:
  """Per-block operator-norm bounds (jnp scalars, jittable) of the blocks
  ``blocks`` (default: every block of ``params``) for ``p`` = 1 / 'laplace'
  (L1→L1) or 2 / 'gaussian' (L2→L2); blocks absent from ``params`` are
  skipped."""
  p = _norm_p(p)
  return {n: _kernel_bound(jnp.asarray(_layer(n, params[n])[1]), p, jnp)
          for n in _block_names(params, blocks) if n in params}


def sensitivity_bound(params: Mapping[str, Any], p, *, blocks: Sequence[str] | None = None
                      ) -> float:
  """``Δ``: the product of the per-layer bounds of the blocks ``blocks``
  (default: all of ``params``, in any order), computed in float64 with NumPy;
  1.0 for no block.  Every named block must be in ``params``."""
  p = _norm_p(p)
  names = _block_names(params, blocks)
  missing = [n for n in names if n not in params]
  if missing:
    raise ValueError(f"params lack the pre-noise block(s) {', '.join(map(repr, missing))}: "
                     f"the sensitivity bound needs all of them")
  bound = 1.0
  for n in names:
    kernel = np.asarray(_layer(n, params[n])[1], np.float64)
    bound *= float(_kernel_bound(kernel, p, np))
  return bound


def project(params: Mapping[str, Any], p, bound: float = 1.0, *,
            blocks: Sequence[str] | None = None, margin: float = MARGIN) -> dict:
  """``params`` with each kernel of ``blocks`` (default: every block) scaled
  by ``min(1, t / bound_i)``, ``t = bound^(1/len(blocks)) (1 - margin)``, so
  the product of the bounds is at most ``bound (1 - margin)``.  Biases and
  the other blocks are returned as they are (the same objects).  Blocks of
  ``blocks`` absent from ``params`` are skipped (each layer is projected on
  its own, so the parts of a split model can be projected separately), but
  at least one must be present.  No block: ``params`` unchanged, which needs
  ``bound >= 1`` (the identity's norm).  Jittable.
  """
  p = _norm_p(p)
  names = _block_names(params, blocks)
  if not 0 < bound < math.inf or not 0 <= margin < 1:
    raise ValueError(f"need a finite bound > 0 and 0 <= margin < 1, got {bound!r}, {margin!r}")
  if not names:
    if bound < 1:
      raise ValueError(f"no layer before the noise: the sensitivity is 1 (the identity), "
                       f"above the bound {bound}")
    return dict(params)
  if not any(n in params for n in names):
    raise ValueError(f"params hold none of the pre-noise blocks {', '.join(names)} (got "
                     f"{', '.join(map(str, params)) or 'no block'})")
  target = bound ** (1.0 / len(names)) * (1.0 - margin)
  out = dict(params)
  for n in names:
    if n not in params:
      continue
    layer, kernel = _layer(n, params[n])
    scale = jnp.minimum(1.0, target / _kernel_bound(kernel, p, jnp))
    out[n] = {**params[n], layer: {**params[n][layer],
                                   "kernel": (kernel * scale).astype(kernel.dtype)}}
  return out


def projected(optimizer: optax.GradientTransformation,
              project_fn: Callable[[Any], Any]) -> optax.GradientTransformationExtraArgs:
  """``optimizer`` followed by a projection: the update becomes
  ``project_fn(params + updates) - params``, so ``optax.apply_updates`` lands
  on projected params (up to the rounding of that sum, which the projection
  margin absorbs).  Leaves that ``project_fn`` returns as the very object it
  got keep the optimizer's update exactly.  ``update`` needs ``params``
  (``ValueError`` otherwise); extra arguments go to ``optimizer``.
  """
  inner = optax.with_extra_args_support(optimizer)

  def update_fn(updates, state, params=None, **extra):
    if params is None:
      raise ValueError("projected(...) needs the params: call update(grads, state, params)")
    updates, state = inner.update(updates, state, params, **extra)
    stepped = optax.apply_updates(params, updates)
    proj = project_fn(stepped)
    if jax.tree.structure(proj) != jax.tree.structure(params):
      raise ValueError("project_fn must return params of the same tree structure")
    leaves_s, leaves_q = jax.tree.leaves(stepped), jax.tree.leaves(proj)
    leaves_p, leaves_u = jax.tree.leaves(params), jax.tree.leaves(updates)
    new = [u if q is s else (q - prm).astype(u.dtype)
           for s, q, prm, u in zip(leaves_s, leaves_q, leaves_p, leaves_u)]
    return jax.tree.unflatten(jax.tree.structure(updates), new), state

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)


# ---------------------------------------------------------------------------
# Models with a noise layer
# ---------------------------------------------------------------------------


def _check_pre_noise(names, factories) -> None:
  """``ValueError`` unless every block is a ConvBlock without norm or a
  DenseBlock without dropout (the blocks the bounds cover)."""
  for name, factory in zip(names, factories):
    block = factory(name=name)
    if isinstance(block, ConvBlock):
      if block.norm != "none":
        kind = "BatchNorm" if block.norm == "batch" else f"norm {block.norm!r}"
        raise ValueError(
            f"block {name!r} before the PixelDP noise layer has {kind} (norm="
            f"{block.norm!r}): a norm layer divides by statistics of its input, which is not "
            f"Lipschitz-bounded, so no sensitivity bound holds (group norm neither); build "
            f"the model with norm='none' or put the noise layer before that block")
    elif isinstance(block, DenseBlock):
      if block.dropout > 0:
        raise ValueError(
            f"block {name!r} before the PixelDP noise layer has dropout {block.dropout}: it "
            f"scales kept units by 1/(1 - rate), beyond the sensitivity bound; use dropout=0 "
            f"there or put the noise layer before that block")
    else:
      raise ValueError(
          f"block {name!r} ({type(block).__name__}) cannot come before the PixelDP noise "
          f"layer: its sensitivity is bounded for ConvBlock (norm='none') and DenseBlock "
          f"(dropout=0) only")


def _noise_block(model: SplitModel) -> tuple[int, PixelDPNoise]:
  """Index and instance of the model's single PixelDPNoise block."""
  found = [(i, b) for i, b in ((i, f(name=n)) for i, (n, f)
                               in enumerate(zip(model.block_names, model.factories)))
           if isinstance(b, PixelDPNoise)]
  if len(found) != 1:
    raise ValueError(f"{model.name} has {len(found)} PixelDP noise layers: expected exactly one "
                     f"(see insert_noise_layer)")
  return found[0]


def pre_noise_blocks(model: SplitModel) -> tuple[str, ...]:
  """Names of the blocks before the model's noise layer, checked as in
  :func:`insert_noise_layer`."""
  i, _ = _noise_block(model)
  _check_pre_noise(model.block_names[:i], model.factories[:i])
  return model.block_names[:i]


def model_projection(model: SplitModel, *, margin: float = MARGIN
                     ) -> Callable[[Mapping[str, Any]], dict]:
  """The projection of ``model``'s pre-noise blocks: ``params -> params``
  (:func:`project` with the noise layer's norm and sensitivity) for any
  params dict keyed by block names (the full model's or a part's 'params');
  other blocks pass through untouched."""
  _, layer = _noise_block(model)
  names = pre_noise_blocks(model)
  return functools.partial(project, p=layer.mechanism, bound=layer.sensitivity, blocks=names,
                           margin=margin)


def model_sensitivity(model: SplitModel, params: Mapping[str, Any]) -> float:
  """:func:`sensitivity_bound` of ``model``'s pre-noise blocks in its noise
  layer's norm (``params``: the 'params' collection holding those blocks)."""
  _, layer = _noise_block(model)
  return sensitivity_bound(params, layer.mechanism, blocks=pre_noise_blocks(model))


def insert_noise_layer(model: SplitModel, after_block: int | str, epsilon,
                       mechanism: str = "laplace", delta=None, sensitivity: float = 1.0, *,
                       eval_noise: bool = True, name: str = "pixeldp") -> SplitModel:
  """``model`` with a :class:`PixelDPNoise` block ``name`` after block ``after_block``.

  ``after_block`` is the number ``L`` of blocks before the noise (0: noise
  on the input, up to ``num_blocks - 1``) or a block name (not the last
  block's).  The pre-noise blocks are checked (:func:`pre_noise_blocks`:
  ConvBlock without norm, DenseBlock without dropout; ``ValueError``
  otherwise); with ``L = 0`` the sensitivity is 1, so ``sensitivity >= 1``
  is required.  The default cut ``c`` becomes ``c + 1`` when ``L <= c``, so
  the client keeps the same original blocks and the noise stays with the
  block it follows (on the client when ``L = c``); otherwise it stays ``c``.
  Cuts given later by number count the noise block, and a cut named after
  block ``L`` falls before the noise (name the cut ``name`` to keep it on
  the client).  The result's ``needs_rng`` is True for a finite ``epsilon``
  (the model's own otherwise); variables are those of ``model``.
  """
  noise_scale(epsilon, mechanism, delta, sensitivity)
  names = model.block_names
  if isinstance(after_block, str) and after_block.strip().isdigit():
    after_block = int(after_block)
  if isinstance(after_block, str):
    if after_block not in names:
      raise ValueError(f"unknown block {after_block!r} for {model.name}: blocks are "
                       f"{', '.join(names)}")
    pos = names.index(after_block) + 1
  elif isinstance(after_block, numbers.Integral) and not isinstance(after_block, bool):
    pos = int(after_block)
  else:
    raise ValueError(f"after_block must be a block count or a block name, got {after_block!r}")
  if not 0 <= pos < model.num_blocks:
    raise ValueError(f"after_block {after_block!r}: the noise layer goes after 0.."
                     f"{model.num_blocks - 1} blocks of {model.name} (not after the last block, "
                     f"which would noise the logits)")
  if not isinstance(name, str) or not name or name.isdigit() or "," in name or name in names:
    raise ValueError(f"invalid or taken noise block name {name!r} for {model.name}")
  if any(isinstance(f(name=n), PixelDPNoise) for n, f in zip(names, model.factories)):
    raise ValueError(f"{model.name} already has a PixelDP noise layer")
  _check_pre_noise(names[:pos], model.factories[:pos])
  if pos == 0 and sensitivity < 1:
    raise ValueError(f"with no layer before the noise the sensitivity is 1, above "
                     f"sensitivity={sensitivity}")
  factory = functools.partial(PixelDPNoise, epsilon=float(epsilon), mechanism=mechanism,
                              delta=None if delta is None else float(delta),
                              sensitivity=float(sensitivity), eval_noise=bool(eval_noise))
  cut = model.default_cut + 1 if pos <= model.default_cut else model.default_cut
  return dataclasses.replace(
      model, block_names=names[:pos] + (name,) + names[pos:],
      factories=model.factories[:pos] + (factory,) + model.factories[pos:], default_cut=cut,
      uses_batch_stats=model.has_batch_stats,
      uses_rng=model.needs_rng or not math.isinf(epsilon))


# ---------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------


def noisy_apply(module: nn.Module) -> Callable[[Any, Any, jax.Array], jax.Array]:
  """``apply_fn(variables, x, key)``: ``module`` (e.g. ``model.full()``) in
  eval mode with ``key`` on the 'dropout' stream, for :func:`predict_with_draws`."""
  def apply_fn(variables, x, key):
    return module.apply(variables, x, train=False, rngs={"dropout": key})
  return apply_fn


def predict_with_draws(apply_fn: Callable[[Any, Any, jax.Array], jax.Array], variables, x,
                       key: jax.Array, draws: int = DEFAULT_DRAWS) -> jax.Array:
  """PixelDP's prediction: the mean over ``draws`` noise draws of
  ``softmax(apply_fn(variables, x, k))`` (float32, ``[B, classes]``), with
  the keys ``jax.random.split(key, draws)``, evaluated one draw at a time
  (``lax.scan``) to keep memory flat.  Jittable for a static ``draws``."""
  if isinstance(draws, bool) or not isinstance(draws, numbers.Integral) or draws < 1:
    raise ValueError(f"draws must be an int >= 1, got {draws!r}")
  keys = jax.random.split(key, int(draws))
  out = jax.eval_shape(apply_fn, variables, x, keys[0])

  def body(total, k):
    return total + jax.nn.softmax(apply_fn(variables, x, k).astype(jnp.float32), axis=-1), None

  total, _ = jax.lax.scan(body, jnp.zeros(out.shape, jnp.float32), keys)
  return total / draws
