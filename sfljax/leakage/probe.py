"""Leakage measured on a run: what the server sees at the cut, scored.

:class:`LeakageProbe` holds a fixed probe set (test inputs and labels) and
the server's auxiliary set (training inputs no client trains on). Given a
model's variables it computes what the main server sees for the probe set
and scores it:

* ``leak_dcor`` -- the distance correlation between the probe inputs and
  their smashed data (:func:`sfljax.leakage.measures.distance_correlation`;
  1: the smashed data are a rigid copy of the inputs' geometry, 0:
  independent);
* ``leak_label_auc`` / ``leak_label_auc_norm`` -- the label attack's AUC on
  the per-example gradients the server sees (:mod:`sfljax.leakage.label_inference`):
  in a two-part split the cotangent of the loss for the smashed data (which
  the server computes, holding the labels), in a U-shaped split the cotangent
  the client's tail sends back for the server's output (the server never
  sees labels or the loss, only this). 0.5: chance;
* ``leak_inversion_mse`` / ``_psnr`` / ``_ssim`` -- a decoder the server
  trains on the auxiliary set's (smashed data, input) pairs, applied to the
  probe's smashed data (:mod:`sfljax.leakage.inversion`); PSNR and SSIM use
  the probe inputs' range (max - min) as the data range.

The smashed data are the client part's eval-mode output (BatchNorm with its
running statistics, no dropout) with the PixelDP noise layer's fresh noise
when the model has one: what the server receives for these inputs from the
current client model. The gradients come from the run's loss on the whole
probe batch (a common scale for all rows, which neither the attack's
cosines nor its AUCs see).
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sfljax import split
from sfljax.leakage import inversion, label_inference, measures

_CHUNK = 512
"""Rows per forward pass when the auxiliary set's smashed data are computed."""

DECODER_FEATURES = 16
"""Channels of the inversion decoder's hidden convolutions
(:class:`sfljax.leakage.inversion.Decoder`)."""

DECODER_BATCH = 64
"""The inversion decoder's minibatch."""


@functools.partial(jax.jit, static_argnums=3)
def _scores(originals, reconstructions, data_range, with_ssim: bool) -> dict[str, jax.Array]:
  """Mean MSE, PSNR (and SSIM) over the probe set."""
  out = {"mse": jnp.mean(measures.mse(originals, reconstructions)),
         "psnr": jnp.mean(measures.psnr(originals, reconstructions, data_range))}
  if with_ssim:
    out["ssim"] = jnp.mean(measures.ssim(originals, reconstructions, data_range))
  return out


class LeakageProbe:
  """The leakage measures of one model split.

  Args:
    model: the :class:`sfljax.models.SplitModel` (with its noise layer, if any).
    cuts: the run's cuts (one: two-part; two: U-shaped).
    probe_x, probe_y: the probe set (inputs [N, ...], int labels [N]).
    aux_x: the server's auxiliary inputs (None: no inversion).
    seed: keys for the noise layer's draws and the decoder (per round).
    loss: ``loss(logits, labels, mask)`` -- the run's loss.
    decoder_steps: the inversion decoder's Adam steps.
  """

  def __init__(self, model, cuts: Sequence[int], probe_x, probe_y, aux_x=None, *, seed: int = 0,
               loss: split.Loss | None = None, decoder_steps: int = 1000):
    self.model, self.cuts = model, tuple(cuts)
    self.parts = model.parts(self.cuts)
    self.u_shaped = len(self.cuts) == 2
    self.probe_x = jnp.asarray(probe_x, jnp.float32)
    self.probe_y = np.asarray(probe_y, np.int32)
    self.aux_x = None if aux_x is None else np.asarray(aux_x, np.float32)
    self.seed, self.decoder_steps = int(seed), int(decoder_steps)
    self.loss = split.cross_entropy if loss is None else loss
    self.image = len(model.input_shape) == 3
    self._views = jax.jit(self._views_fn)
    self._smash = jax.jit(self._smashed_fn)

  # -- what the server sees --------------------------------------------------
  def _smashed_fn(self, head_vars, x, key):
    return self.parts[0].apply(head_vars, x, train=False, rngs={"dropout": key})

  def _views_fn(self, variables, x, y, key):
    """(smashed data, the per-example gradients the server sees, dcor)."""
    parts = self.model.split_variables(variables, self.cuts)
    k_head, k_server = jax.random.split(key)
    smashed = self._smashed_fn(parts[0], x, k_head)
    mask = jnp.ones(y.shape, bool)
    server = self.parts[1]

    def apply(module, v, a, k):
      return module.apply(v, a, train=False, rngs={"dropout": k})

    if self.u_shaped:
      out = apply(server, parts[1], smashed, k_server)
      tail = self.parts[2]
      grads = jax.grad(lambda o: self.loss(apply(tail, parts[2], o, k_server)
                                           .astype(jnp.float32), y, mask))(out)
    else:
      grads = jax.grad(lambda a: self.loss(apply(server, parts[1], a, k_server)
                                           .astype(jnp.float32), y, mask))(smashed)
    dcor = measures.distance_correlation(x, smashed)
    return smashed, grads, dcor

  def _key(self, round_index: int, purpose: int):
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(self.seed), round_index),
                              purpose)

  # -- the measures ----------------------------------------------------------
  def measure(self, variables, round_index: int, *, invert: bool = False
              ) -> tuple[dict[str, float], dict[str, Any] | None]:
    """The round's leakage metrics and, with ``invert``, the inversion's
    images (``{"originals", "reconstructions"}``, NumPy) else None."""
    smashed, grads, dcor = self._views(variables, self.probe_x, jnp.asarray(self.probe_y),
                                       self._key(round_index, 0))
    grads = np.asarray(jax.device_get(grads), np.float64).reshape(len(self.probe_y), -1)
    labels = label_inference.label_leakage(grads, self.probe_y, seed=self.seed)
    metrics = {"leak_dcor": float(dcor), "leak_label_auc": float(labels["label_auc"]),
               "leak_label_auc_norm": float(labels["label_auc_norm"])}
    if not invert or self.aux_x is None:
      return metrics, None
    head_vars = self.model.split_variables(variables, self.cuts)[0]
    aux_smashed = self.smashed(head_vars, self.aux_x, self._key(round_index, 1))
    recon, _ = inversion.invert(aux_smashed, jnp.asarray(self.aux_x), smashed,
                                self._key(round_index, 2), steps=self.decoder_steps,
                                batch_size=DECODER_BATCH, features=DECODER_FEATURES)
    orig = np.asarray(self.probe_x)
    scores = _scores(self.probe_x, recon, jnp.float32(measures.data_range(orig)),
                     self.image and min(orig.shape[1:3]) >= 7)
    for name, value in scores.items():
      metrics[f"leak_inversion_{name}"] = float(value)
    recon = np.asarray(jax.device_get(recon), np.float32)
    return metrics, {"originals": orig, "reconstructions": recon}

  def smashed(self, head_vars, x, key) -> jax.Array:
    """The client part's eval-mode output for ``x`` (in chunks of 512 rows;
    the noise layer's keys are ``fold_in(key, chunk)``)."""
    x = np.asarray(x, np.float32)
    out = []
    for i, start in enumerate(range(0, len(x), _CHUNK)):
      chunk = x[start:start + _CHUNK]
      n = len(chunk)
      if n < _CHUNK and len(x) > _CHUNK:   # One shape: the last chunk padded.
        chunk = np.concatenate([chunk, np.zeros((_CHUNK - n,) + chunk.shape[1:], chunk.dtype)])
      out.append(self._smash(head_vars, jnp.asarray(chunk), jax.random.fold_in(key, i))[:n])
    return jnp.concatenate(out)
