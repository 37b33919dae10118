"""Tests for sfljax.leakage.label_inference, each against an independent computation."""

from __future__ import annotations

import itertools

import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.metrics.pairwise import cosine_similarity

from sfljax.leakage import label_inference as L


def _softmax(logits: np.ndarray) -> np.ndarray:
  e = np.exp(logits - logits.max(axis=1, keepdims=True))
  return e / e.sum(axis=1, keepdims=True)


def _random_case(seed: int, n: int = 2000, classes: int = 10, dim: int = 64):
  """Gaussian gradient rows drawn independently of the labels."""
  rng = np.random.default_rng(seed)
  return rng.normal(size=(n, dim)), rng.integers(0, classes, n)


def _leaky_case(seed: int, n: int = 2000, classes: int = 10, dim: int = 64):
  """What a linear server layer W [C, D] returns under softmax cross-entropy."""
  rng = np.random.default_rng(seed)
  y = rng.integers(0, classes, n)
  p = _softmax(rng.normal(size=(n, classes)))
  w = rng.normal(size=(classes, dim))
  return (p - np.eye(classes)[y]) @ w, y


# --- auc ---------------------------------------------------------------------

def test_auc_matches_sklearn_on_random_scores():
  rng = np.random.default_rng(0)
  scores = rng.normal(size=500)
  positive = rng.random(500) < 0.3
  assert L.auc(scores, positive) == pytest.approx(roc_auc_score(positive, scores), abs=1e-12)


def test_auc_matches_sklearn_with_many_ties():
  rng = np.random.default_rng(1)
  scores = rng.integers(0, 4, 400)  # 4 values: almost every score is tied
  positive = rng.random(400) < 0.5 + 0.1 * (scores - 1.5)
  expected = roc_auc_score(positive, scores)
  assert L.auc(scores, positive) == pytest.approx(expected, abs=1e-12)
  assert L.auc(np.zeros(10), np.arange(10) < 3) == 0.5  # all tied: exactly chance


def test_auc_separated_and_reversed():
  positive = np.array([False] * 5 + [True] * 7)
  scores = np.arange(12.0)
  assert L.auc(scores, positive) == 1.0
  assert L.auc(-scores, positive) == 0.0
  assert L.auc(jnp.asarray(scores), jnp.asarray(positive)) == 1.0  # jax inputs


def test_auc_errors():
  with pytest.raises(ValueError, match="both classes"):
    L.auc(np.arange(4.0), np.ones(4, bool))
  with pytest.raises(ValueError, match="both classes"):
    L.auc(np.arange(4.0), np.zeros(4, bool))
  with pytest.raises(ValueError, match="NaN"):
    L.auc(np.array([0.1, np.nan, 0.3]), np.array([True, False, True]))


# --- scores ------------------------------------------------------------------

def test_norm_and_cosine_scores():
  rng = np.random.default_rng(2)
  g = rng.normal(size=(30, 2, 3)).astype(np.float32)
  g[4] = 0.0
  flat = g.reshape(30, -1).astype(np.float64)
  np.testing.assert_allclose(L.norm_scores(jnp.asarray(g)), np.sqrt((flat ** 2).sum(1)), rtol=1e-6)
  cos = L.cosine_scores(jnp.asarray(g), g[7])
  assert cos.dtype == np.float64 and cos.shape == (30,)
  np.testing.assert_allclose(cos, cosine_similarity(flat, flat[7:8])[:, 0], atol=1e-6)
  assert cos[4] == 0.0 and cos[7] == pytest.approx(1.0)
  np.testing.assert_array_equal(L.cosine_scores(g, np.zeros(6)), np.zeros(30))


# --- attacks against brute-force references ----------------------------------

def _direction_reference(g, y, seed, references):
  """Loop version of the documented rule, with sklearn for cosine and AUC."""
  classes = sorted(c for c in set(y.tolist()) if (y == c).sum() >= 2)
  rng = np.random.default_rng(seed)
  pairs = {}
  for a, b in itertools.combinations(classes, 2):
    values = []
    for ref_class in (a, b):
      own = np.flatnonzero(y == ref_class)
      refs = rng.choice(own, size=min(references, own.size - 1), replace=False)
      rest = [i for i in range(len(y)) if y[i] in (a, b) and i not in set(refs.tolist())]
      for r in refs:
        cos = cosine_similarity(g[rest], g[r:r + 1])[:, 0]
        values.append(roc_auc_score(y[rest] == ref_class, cos))
    pairs[(a, b)] = np.mean(values)
  return pairs


@pytest.mark.parametrize("references", [1, 4])
def test_direction_auc_matches_brute_force(references):
  rng = np.random.default_rng(3)
  g = rng.normal(size=(70, 5))
  y = rng.integers(2, 4, 70)
  y[:3] = [0, 0, 1]  # class 0: 2 examples (one reference at most); class 1: 1, no pair
  y[10] = 9  # another singleton class
  g[0] += 0.8 * g[20]  # make some directions informative
  expected = _direction_reference(g, y, seed=5, references=references)
  got = L.direction_auc(g, y, seed=5, references=references)
  assert set(got["pairs"]) == set(expected) == {(0, 2), (0, 3), (2, 3)}
  for k, v in expected.items():
    assert got["pairs"][k] == pytest.approx(v, abs=1e-12), k
  values = list(expected.values())
  assert got["auc"] == pytest.approx(np.mean(values), abs=1e-12)
  assert (got["min"], got["max"]) == (pytest.approx(min(values)), pytest.approx(max(values)))
  assert all(type(x) is int for pair in got["pairs"] for x in pair)


def test_pairwise_norm_auc_matches_sklearn():
  rng = np.random.default_rng(4)
  y = rng.integers(0, 4, 120)
  y[0] = 7  # a singleton class still has a norm AUC against every other class
  g = rng.normal(size=(120, 8)) * (1.0 + 0.3 * y[:, None])
  norms = np.linalg.norm(g, axis=1)
  got = L.pairwise_norm_auc(g, y)
  assert len(got["pairs"]) == 10
  for (a, b), v in got["pairs"].items():
    m = (y == a) | (y == b)
    ref = roc_auc_score(y[m] == a, norms[m])
    assert v == pytest.approx(max(ref, 1 - ref), abs=1e-12)
  assert got["auc"] == pytest.approx(np.mean(list(got["pairs"].values())))


# --- chance level on gradients independent of the labels ----------------------

def test_random_gradients_are_at_chance():
  g, y = _random_case(seed=100)
  # Over 20 seeds (data seed 100+s, reference seed s) the direction AUC was
  # 0.5008 +- 0.0029 (range 0.4965..0.5076): pairs of ~200 + 200 examples give a
  # per-AUC null sd of sqrt(401 / (12 * 200 * 200)) = 0.029 and 45 pairs x 2
  # orders average it down; 0.03 is ~10 sd. The pairwise norm AUC was
  # 0.5228 +- 0.0054 (range 0.514..0.538): max(AUC, 1 - AUC) biases chance up
  # by 0.029 * sqrt(2 / pi) = 0.023; 0.06 leaves ~7 sd above that.
  r = L.label_leakage(g, y, seed=0)
  assert type(r["label_auc"]) is float and type(r["label_auc_norm"]) is float
  assert abs(r["label_auc"] - 0.5) < 0.03
  assert abs(r["label_auc_norm"] - 0.5) < 0.06
  assert r["label_auc_norm"] > 0.5  # the oriented score never drops below chance


# --- leaky gradients ----------------------------------------------------------

def test_softmax_gradients_leak_direction():
  g, y = _leaky_case(seed=0)
  r = L.direction_auc(jnp.asarray(g, jnp.float32), jnp.asarray(y), seed=0)
  assert len(r["pairs"]) == 45
  assert r["auc"] > 0.95 and r["min"] > 0.9
  assert L.label_leakage(g, y)["label_auc"] > 0.95


def test_imbalanced_binary_leaks_norm():
  rng = np.random.default_rng(6)
  n = 2000
  y = (rng.random(n) < 0.05).astype(int)
  # A model fitted to 95% negatives predicts class 0: p(positive) is small, so
  # the rare class has a small p of its true class and a large p - onehot(y).
  p = _softmax(np.stack([3.0 + rng.normal(size=n), rng.normal(size=n)], axis=1))
  g = (p - np.eye(2)[y]) @ rng.normal(size=(2, 64))
  assert 50 < y.sum() < 150
  assert L.norm_auc(g, y, positive_class=1) > 0.9
  assert L.norm_auc(g, y, positive_class=0) < 0.1  # no orientation flipping
  np.testing.assert_allclose(L.norm_auc(g, y, 1), roc_auc_score(y, np.linalg.norm(g, axis=1)))
  assert L.pairwise_norm_auc(g, y)["auc"] == pytest.approx(L.norm_auc(g, y, 1))


# --- determinism and errors ---------------------------------------------------

def test_deterministic_for_a_seed():
  g, y = _random_case(seed=7, n=400)
  a = L.direction_auc(g, y, seed=3, references=2)
  assert a == L.direction_auc(g, y, seed=3, references=2)
  assert a["pairs"] != L.direction_auc(g, y, seed=4, references=2)["pairs"]
  assert L.label_leakage(g, y, seed=3) == L.label_leakage(g, y, seed=3)


def test_errors():
  g, y = _random_case(seed=8, n=40, classes=2)
  with pytest.raises(ValueError, match="both classes"):
    L.norm_auc(g, y, positive_class=5)  # empty class
  with pytest.raises(ValueError, match="no pair"):
    L.direction_auc(g[:3], np.array([0, 1, 2]))  # every class has one example
  with pytest.raises(ValueError, match="no pair"):
    L.pairwise_norm_auc(g, np.zeros(40, int))
  bad = g.copy()
  bad[3, 0] = np.nan
  with pytest.raises(ValueError, match="NaN"):
    L.direction_auc(bad, y)
  with pytest.raises(ValueError, match="NaN"):
    L.norm_auc(bad, y, positive_class=1)
  with pytest.raises(ValueError, match="shape"):
    L.norm_auc(g, y[:-1], positive_class=1)
  with pytest.raises(ValueError, match="references"):
    L.direction_auc(g, y, references=0)
