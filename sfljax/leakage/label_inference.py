"""Label inference from cut-layer gradients (Li et al. 2021, arXiv 2102.08504).

In split learning, per-example gradients cross the cut: the cotangent of the
loss w.r.t. the smashed data, or, in a U-shaped split, the cotangent the
client's tail sends back for the server's output (which the server sees
without ever seeing a label). Li et al. ("Label Leakage and Protection in
Two-party Split Learning") show these gradients reveal the labels:

* **norm scoring** -- score each example by its gradient's L2 norm. For a
  softmax cross-entropy head the gradient w.r.t. the logits is ``p - onehot(y)``,
  whose norm grows as the probability of the true class falls; in an
  imbalanced binary task the rare (positive) class is predicted poorly, so its
  gradients are larger.
* **direction scoring** -- score each example by the cosine similarity of its
  gradient with the gradient of ONE example whose label the attacker knows.
  ``p - onehot(y)`` is dominated by ``-onehot(y)``, so examples of the same
  class point the same way (also after any linear map the server applies).

How to read the numbers: each attack is reported as a ROC AUC, the
probability that a random example of the target class scores above a random
example of the other class (ties count 1/2). 0.5 is chance, 1.0 means the
score separates the classes perfectly (labels fully recoverable by a
threshold), 0.0 means perfectly separated with the opposite orientation.

* :func:`norm_auc` is Li et al.'s norm attack as is, for one class against
  the rest, with no orientation flipping: below 0.5 means the class has the
  SMALLER norms.
* :func:`direction_auc` averages, over every pair of classes, the AUC of
  "same class as the reference" among the two classes' other examples; it
  needs one known label per reference and is about 0.5 when gradients carry no
  label information.
* :func:`pairwise_norm_auc` reports max(AUC, 1 - AUC) per pair (an attacker who
  knows which class has the larger norms). Because of the max, its chance
  level is ABOVE 0.5 on finite samples: with ``n_a``, ``n_b`` examples the
  null AUC has standard deviation ``s = sqrt((n_a + n_b + 1) / (12 n_a n_b))``
  and ``E[max(AUC, 1 - AUC)] ~= 0.5 + s sqrt(2 / pi)`` (about 0.52 for 200
  examples per class).

Scaling: a batch-mean loss scales every gradient of a batch by 1 / B; that
leaves cosines, and norm rankings within equally sized batches, unchanged.
These functions run on the host on gradients fetched from the device: inputs
may be JAX or NumPy arrays, computation is in NumPy float64, and results are
Python floats or NumPy arrays.
"""

from __future__ import annotations

import itertools
from typing import Any

import numpy as np

ArrayLike = Any


def _rows(grads: ArrayLike) -> np.ndarray:
  """``grads`` as a float64 [N, D] array (each example's gradient flattened).

  Raises ValueError on NaN (a zero-norm row would otherwise hide it).
  """
  g = np.asarray(grads, dtype=np.float64)
  if g.ndim == 0:
    raise ValueError("grads must have a leading example axis, got a scalar")
  g = g.reshape(g.shape[0], -1)
  bad = np.isnan(g).any(axis=1)
  if bad.any():
    raise ValueError(f"{int(bad.sum())} of {g.shape[0]} gradient rows contain NaN")
  return g


def _labels(labels: ArrayLike, n: int) -> np.ndarray:
  """``labels`` as a 1-D array of length ``n``."""
  y = np.asarray(labels)
  if y.ndim != 1 or y.shape[0] != n:
    raise ValueError(f"labels must have shape [{n}], got {y.shape}")
  return y


def _average_ranks(x: np.ndarray) -> np.ndarray:
  """1-based ranks of ``x``, tied values sharing the average of their ranks."""
  _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
  last = np.cumsum(counts)  # rank of the last member of each tie group
  return (last - (counts - 1) / 2.0)[inverse.reshape(-1)]


def auc(scores: ArrayLike, positive: ArrayLike) -> float:
  """ROC AUC of ``scores`` for the boolean mask ``positive``.

  Mann-Whitney U / (n_pos n_neg) with average ranks, so ties count 1/2.
  Raises ValueError if either class is empty or a score is NaN.
  """
  s = np.asarray(scores, dtype=np.float64).reshape(-1)
  pos = np.asarray(positive).reshape(-1).astype(bool)
  if s.shape != pos.shape:
    raise ValueError(f"scores and positive differ in length: {s.shape[0]} vs {pos.shape[0]}")
  if np.isnan(s).any():
    raise ValueError(f"auc: {int(np.isnan(s).sum())} of {s.size} scores are NaN "
                     "(non-finite gradients?)")
  n_pos = int(pos.sum())
  n_neg = s.size - n_pos
  if n_pos == 0 or n_neg == 0:
    raise ValueError(f"auc needs both classes, got {n_pos} positive and {n_neg} negative")
  ranks = _average_ranks(s)
  u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def norm_scores(grads: ArrayLike) -> np.ndarray:
  """[N] L2 norm of each example's (flattened) gradient."""
  return np.linalg.norm(_rows(grads), axis=1)


def _unit_rows(g: np.ndarray) -> np.ndarray:
  """Rows scaled to unit norm; zero rows stay zero."""
  norms = np.linalg.norm(g, axis=1, keepdims=True)
  return np.divide(g, norms, out=np.zeros_like(g), where=norms > 0)


def cosine_scores(grads: ArrayLike, reference: ArrayLike) -> np.ndarray:
  """[N] cosine similarity of each example's gradient with one ``reference``.

  ``reference`` is one example's gradient (any shape with D elements). A zero
  row, or a zero reference, scores 0.
  """
  g = _rows(grads)
  r = np.asarray(reference, dtype=np.float64).reshape(1, -1)
  if r.shape[1] != g.shape[1]:
    raise ValueError(f"reference has {r.shape[1]} elements, gradient rows have {g.shape[1]}")
  return _unit_rows(g) @ _unit_rows(r)[0]


def norm_auc(grads: ArrayLike, labels: ArrayLike, positive_class: Any) -> float:
  """AUC of the norm score for ``labels == positive_class`` against the rest.

  Li et al.'s norm attack as is: no orientation flipping (below 0.5 means the
  class has the smaller norms).
  """
  scores = norm_scores(grads)
  y = _labels(labels, scores.shape[0])
  return auc(scores, y == positive_class)


def _summary(pairs: dict[tuple[Any, Any], float], what: str) -> dict[str, Any]:
  """{"auc": mean, "pairs": pairs, "min": ..., "max": ...}; ValueError if empty."""
  if not pairs:
    raise ValueError(f"{what}: no pair of classes has enough examples")
  values = np.array(list(pairs.values()))
  return {"auc": float(values.mean()), "pairs": pairs,
          "min": float(values.min()), "max": float(values.max())}


def _classes(y: np.ndarray, min_count: int) -> tuple[list[Any], dict[Any, np.ndarray]]:
  """Sorted classes with at least ``min_count`` examples and their indices."""
  values, inverse = np.unique(y, return_inverse=True)
  inverse = inverse.reshape(-1)
  index = {}
  for k, v in enumerate(values.tolist()):
    idx = np.flatnonzero(inverse == k)
    if idx.size >= min_count:
      index[v] = idx
  return list(index), index


def direction_auc(grads: ArrayLike, labels: ArrayLike, *, seed: int = 0,
                  references: int = 1) -> dict[str, Any]:
  """Li et al.'s direction (cosine) attack, per pair of classes.

  For every unordered pair (a, b) of classes with >= 2 examples each (sorted),
  and for each order (reference class a, then b): ``references`` reference
  examples of the reference class are drawn without replacement (at most all
  but one of the class) by ``rng.choice`` from one
  ``np.random.default_rng(seed)`` shared in that order; the other examples of a
  and b (references excluded) are scored by cosine with each reference, and
  the AUC is for "same class as the reference". The pair's AUC is the mean
  over references and both orders.

  Returns {"auc": mean over pairs, "pairs": {(a, b): auc}, "min", "max"}.
  """
  if references < 1:
    raise ValueError(f"references must be >= 1, got {references}")
  unit = _unit_rows(_rows(grads))
  y = _labels(labels, unit.shape[0])
  classes, index = _classes(y, 2)
  rng = np.random.default_rng(seed)
  pairs: dict[tuple[Any, Any], float] = {}
  for a, b in itertools.combinations(classes, 2):
    aucs = []
    for ref_class, other in ((a, b), (b, a)):
      own = index[ref_class]
      refs = rng.choice(own, size=min(references, own.size - 1), replace=False)
      candidates = np.concatenate([np.setdiff1d(own, refs), index[other]])
      same = y[candidates] == ref_class
      cos = unit[candidates] @ unit[refs].T  # [M, R]
      aucs.extend(auc(cos[:, r], same) for r in range(refs.size))
    pairs[(a, b)] = float(np.mean(aucs))
  return _summary(pairs, "direction_auc")


def pairwise_norm_auc(grads: ArrayLike, labels: ArrayLike) -> dict[str, Any]:
  """The norm attack per pair of classes, oriented by an informed attacker.

  For every unordered pair (a, b) of present classes (sorted), the AUC of the
  norm score for "is class a" among the examples of a and b, reported as
  max(AUC, 1 - AUC): the attacker knows which class has the larger norms.
  Because of the max, chance is slightly ABOVE 0.5 on finite samples (about
  0.5 + 0.8 sqrt((n_a + n_b + 1) / (12 n_a n_b))).

  Returns {"auc": mean over pairs, "pairs": {(a, b): auc}, "min", "max"}.
  """
  scores = norm_scores(grads)
  y = _labels(labels, scores.shape[0])
  classes, index = _classes(y, 1)
  pairs: dict[tuple[Any, Any], float] = {}
  for a, b in itertools.combinations(classes, 2):
    members = np.concatenate([index[a], index[b]])
    value = auc(scores[members], y[members] == a)
    pairs[(a, b)] = max(value, 1.0 - value)
  return _summary(pairs, "pairwise_norm_auc")


def label_leakage(grads: ArrayLike, labels: ArrayLike, *, seed: int = 0) -> dict[str, float]:
  """{"label_auc": direction attack mean AUC, "label_auc_norm": pairwise norm mean AUC}."""
  return {"label_auc": direction_auc(grads, labels, seed=seed)["auc"],
          "label_auc_norm": pairwise_norm_auc(grads, labels)["auc"]}
