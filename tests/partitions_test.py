"""Client data partitions (sfljax.partitions): invariants, skew statistics, errors, plot."""

import os
import struct
import sys

import numpy as np
import pytest

from sfljax import data
from sfljax import partitions as P
from sfljax.partitions import PartitionError, label_counts, partition, plot_partition

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _labels(n, num_classes, seed=0):
  """Labels with every class present (n >= num_classes), in shuffled index order."""
  return np.random.default_rng(seed).permutation(np.arange(n) % num_classes)


def _kwargs(scheme, k, num_classes):
  """Scheme options valid for k clients over num_classes balanced classes."""
  if scheme == "classes":
    return {"classes_per_client": max(2, -(-num_classes // k)) if num_classes >= 2 else 1}
  if scheme == "shards":
    return {"shards_per_client": 2}
  if scheme == "dirichlet":
    return {"alpha": 0.3}
  return {}


# (clients, samples, classes): K=1, n not divisible by K or by K * shards, K close to n.
COMBOS = [(1, 37, 4), (3, 100, 4), (7, 101, 5), (10, 1000, 10), (13, 257, 3),
          (50, 101, 2), (2, 5, 2), (4, 9, 3)]


@pytest.mark.parametrize("scheme", P.PARTITIONS)
@pytest.mark.parametrize("k,n,c", COMBOS)
def test_every_sample_exactly_once_and_seeded(scheme, k, n, c):
  labels = _labels(n, c, seed=n)
  kw = _kwargs(scheme, k, c)
  for seed in (0, 1, 12345):
    parts = partition(labels, k, scheme, seed=seed, **kw)
    assert isinstance(parts, list) and len(parts) == k
    for p in parts:
      assert p.ndim == 1 and np.issubdtype(p.dtype, np.integer)
      np.testing.assert_array_equal(p, np.sort(p))
    assert min(len(p) for p in parts) >= 1  # Default min_client_size=1.
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))
    again = partition(labels.copy(), k, scheme, seed=seed, **kw)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
  if k > 1:
    a = partition(labels, k, scheme, seed=0, **kw)
    b = partition(labels, k, scheme, seed=1, **kw)
    assert any(not np.array_equal(x, y) for x, y in zip(a, b))
  else:
    np.testing.assert_array_equal(partition(labels, 1, scheme, seed=5, **kw)[0], np.arange(n))


@pytest.mark.parametrize("scheme", ["iid", "shards"])
@pytest.mark.parametrize("k,n", [(7, 101), (3, 100), (10, 1000), (13, 257), (50, 101)])
def test_balanced_schemes_differ_by_at_most_one(scheme, k, n):
  sizes = [len(p) for p in partition(_labels(n, 4), k, scheme, seed=2)]
  assert max(sizes) - min(sizes) <= 1 and sum(sizes) == n


@pytest.mark.parametrize("seed", [0, 1, 7])
@pytest.mark.parametrize("k,n", [(1, 10), (5, 100), (7, 101), (100, 1438), (10, 10)])
def test_iid_matches_data_partition_and_an_independent_reference(seed, k, n):
  labels = _labels(n, 3)
  ours = partition(labels, k, "iid", seed=seed)
  theirs = data.partition(labels, k, "iid", seed=seed)
  # Independent of both modules: the documented stream is SeedSequence([seed, 1]).
  order = np.random.default_rng(np.random.SeedSequence([seed, 1])).permutation(n)
  ref = [np.sort(s) for s in np.array_split(order, k)]
  assert len(ours) == len(theirs) == len(ref) == k
  for a, b, r in zip(ours, theirs, ref):
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, r)


def _class_fractions(labels, parts, c):
  counts = label_counts(labels, parts, c).astype(float)
  return counts / counts.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dirichlet_small_alpha_is_skewed_and_large_alpha_is_uniform(seed):
  labels = _labels(10000, 10, seed)
  parts = partition(labels, 5, "dirichlet", seed=seed, alpha=0.05)
  skewed = label_counts(labels, parts, 10)
  fractions = _class_fractions(labels, parts, 10)
  uniform = _class_fractions(labels, partition(labels, 5, "dirichlet", seed=seed, alpha=1000.0),
                             10)
  iid = _class_fractions(labels, partition(labels, 5, "iid", seed=seed), 10)
  # Dir(0.05) hands each class almost whole to one client: the largest client
  # share of a class is ~0.9 on average (IID: ~0.2).
  assert (skewed / skewed.sum(axis=0)).max(axis=0).mean() > 0.7
  # With 5 clients and 10 classes a client then holds ~2 classes, so its
  # largest class fraction is ~0.55 on average (IID and alpha=1000: ~0.11).
  assert fractions.max(axis=1).mean() > 0.4
  assert iid.max(axis=1).mean() < 0.2 and uniform.max(axis=1).mean() < 0.2
  assert np.abs(uniform - 0.1).max() < 0.1
  assert np.abs(fractions - 0.1).max() > 0.3  # The check above does tell them apart.


def test_dirichlet_small_alpha_with_more_clients_than_classes():
  # 20 clients over 10 classes: mostly one dominant class per client.
  means = []
  for seed in range(5):
    labels = _labels(10000, 10, seed)
    parts = partition(labels, 20, "dirichlet", seed=seed, alpha=0.05)
    means.append(_class_fractions(labels, parts, 10).max(axis=1).mean())
  assert np.mean(means) > 0.7


def test_dirichlet_min_client_size_is_repaired_deterministically():
  labels = _labels(1000, 10)
  raw = partition(labels, 10, "dirichlet", seed=0, alpha=0.05)
  assert min(len(p) for p in raw) < 80  # The repair has work to do.
  fixed = partition(labels, 10, "dirichlet", seed=0, alpha=0.05, min_client_size=80)
  assert min(len(p) for p in fixed) >= 80
  np.testing.assert_array_equal(np.sort(np.concatenate(fixed)), np.arange(1000))
  again = partition(labels, 10, "dirichlet", seed=0, alpha=0.05, min_client_size=80)
  assert all(np.array_equal(a, b) for a, b in zip(fixed, again))
  # The tightest minimum (n = K * m) forces equal clients.
  tight = partition(labels, 10, "dirichlet", seed=0, alpha=0.05, min_client_size=100)
  assert [len(p) for p in tight] == [100] * 10


def test_dirichlet_repair_never_fails_when_n_allows_it():
  rng = np.random.default_rng(0)
  for trial in range(150):
    k = int(rng.integers(1, 12))
    n = int(rng.integers(k, 200))
    c = int(rng.integers(1, 8))
    m = int(rng.integers(1, n // k + 1))
    alpha = float(rng.choice([0.01, 0.1, 1.0, 10.0]))
    labels = rng.integers(0, c, n)
    parts = partition(labels, k, "dirichlet", seed=trial, alpha=alpha, min_client_size=m)
    assert min(len(p) for p in parts) >= m, (k, n, c, m, alpha)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@pytest.mark.parametrize("k,spc", [(10, 2), (30, 2), (5, 4), (15, 4)])
def test_shards_from_sorted_labels_hold_at_most_spc_classes(k, spc):
  # 10 classes of 60 samples; shard size 600 / (k * spc) divides 60, so no shard
  # straddles two classes.
  labels = _labels(600, 10, seed=k)
  assert 60 % (600 // (k * spc)) == 0
  for seed in range(3):
    parts = partition(labels, k, "shards", seed=seed, shards_per_client=spc)
    for p in parts:
      assert len(p) == 600 // k
      assert len(np.unique(labels[p])) <= spc
    # Some client gets shards of two different classes (not sorted by client).
    assert max(len(np.unique(labels[p])) for p in parts) == min(spc, 10)


def test_one_shard_per_client_is_one_whole_class():
  labels = _labels(600, 10, seed=3)
  parts = partition(labels, 10, "shards", seed=4, shards_per_client=1)
  held = sorted(int(labels[p][0]) for p in parts)
  assert held == list(range(10))
  for p in parts:
    np.testing.assert_array_equal(p, np.flatnonzero(labels == labels[p[0]]))


@pytest.mark.parametrize("k,cpc,c", [(5, 2, 10), (7, 3, 10), (3, 4, 10), (10, 10, 10),
                                     (1, 6, 6), (20, 1, 10), (4, 2, 3)])
def test_classes_gives_each_client_exactly_cpc_classes(k, cpc, c):
  labels = _labels(1000, c, seed=k)
  for seed in range(3):
    parts = partition(labels, k, "classes", seed=seed, classes_per_client=cpc)
    counts = label_counts(labels, parts, c)
    assert ((counts > 0).sum(axis=1) == cpc).all()
    assert (counts.sum(axis=0) == np.bincount(labels, minlength=c)).all()
    assert ((counts > 0).sum(axis=0) >= 1).all()  # Every class used.
    for col in counts.T:  # Each class is split evenly among its holders.
      held = col[col > 0]
      assert held.max() - held.min() <= 1


def test_classes_uses_the_labels_present_not_a_range():
  labels = np.random.default_rng(0).choice(np.array([3, 7, 42]), 90)
  parts = partition(labels, 3, "classes", seed=0, classes_per_client=2)
  assert [len(np.unique(labels[p])) for p in parts] == [2, 2, 2]
  assert set(np.unique(labels[np.concatenate(parts)])) == {3, 7, 42}


def _error_cases():
  ten = _labels(10, 2)
  skewed = np.array([0] * 2 + [1] * 100)
  return [
      # (labels, clients, scheme, kwargs, flag, extra text)
      (ten, 0, "iid", {}, "--clients", "positive"),
      (ten, -3, "dirichlet", {}, "--clients", "positive"),
      (ten, 2.5, "iid", {}, "--clients", "integer"),
      (ten, 11, "iid", {}, "--clients", "11 clients but only 10 training samples: "
                                        "use at most 10 clients"),
      (ten, 11, "shards", {}, "--clients", "use at most 10 clients"),
      (ten, 2, "x", {}, "--partition", "unknown partition 'x': choose one of "
                                       "iid, dirichlet, shards, classes"),
      (ten, 2, "iid", {"min_client_size": 0}, "--min-client-size", "at least 1"),
      (ten, 3, "iid", {"min_client_size": 4}, "--min-client-size", "at most 3"),
      (ten, 3, "dirichlet", {"min_client_size": 4}, "--min-client-size", "12"),
      (ten, 2, "dirichlet", {"alpha": 0.0}, "--alpha", "positive"),
      (ten, 2, "dirichlet", {"alpha": -1.0}, "--alpha", "positive"),
      (ten, 2, "dirichlet", {"alpha": float("nan")}, "--alpha", "positive"),
      (ten, 2, "dirichlet", {"alpha": float("inf")}, "--alpha", "finite"),
      (ten, 2, "shards", {"shards_per_client": 0}, "--shards-per-client", "at least 1"),
      (ten, 3, "shards", {"shards_per_client": 4}, "--shards-per-client", "12 shards"),
      (ten, 2, "classes", {"classes_per_client": 0}, "--classes-per-client", "at least 1"),
      (ten, 2, "classes", {"classes_per_client": 3}, "--classes-per-client", "only 2 classes"),
      (_labels(20, 5), 2, "classes", {"classes_per_client": 2}, "--classes-per-client",
       "cannot cover all 5 classes"),
      (np.array([0] + [1] * 9), 4, "classes", {"classes_per_client": 2},
       "--classes-per-client", "1 samples but 4 clients"),
      (skewed, 2, "classes", {"classes_per_client": 1, "min_client_size": 10},
       "--min-client-size", "only 2 samples"),
  ]


@pytest.mark.parametrize("labels,k,scheme,kw,flag,text", _error_cases())
def test_errors_name_the_flag(labels, k, scheme, kw, flag, text):
  with pytest.raises(PartitionError) as info:
    partition(labels, k, scheme, seed=0, **kw)
  msg = str(info.value)
  assert flag in msg and text in msg, msg
  assert "\n" not in msg
  assert isinstance(info.value, ValueError)


def test_classes_min_client_size_met_passes():
  labels = np.array([0] * 2 + [1] * 100)
  parts = partition(labels, 2, "classes", seed=0, classes_per_client=1, min_client_size=2)
  assert sorted(len(p) for p in parts) == [2, 100]


def test_label_counts_equal_a_hand_count():
  labels = np.array([0, 1, 1, 2, 2, 2])
  parts = [np.array([0, 3]), np.array([1, 2, 4, 5])]
  np.testing.assert_array_equal(label_counts(labels, parts, 3), [[1, 0, 1], [0, 2, 2]])
  np.testing.assert_array_equal(label_counts(labels, parts, 4), [[1, 0, 1, 0], [0, 2, 2, 0]])
  labels = _labels(500, 7, seed=1)
  parts = partition(labels, 6, "dirichlet", seed=1)
  counts = label_counts(labels, parts, 7)
  assert counts.shape == (6, 7)
  for k, p in enumerate(parts):
    np.testing.assert_array_equal(counts[k], np.bincount(labels[p], minlength=7))
  with pytest.raises(PartitionError, match=r"\[0, 5\)"):
    label_counts(labels, parts, 5)


def _png_size(path):
  with open(path, "rb") as f:
    head = f.read(24)
  assert head[:8] == PNG_SIGNATURE and head[12:16] == b"IHDR"
  return struct.unpack(">II", head[16:24])


@pytest.mark.parametrize("k", [5, 100])
def test_plot_partition_writes_png_atomically(tmp_path, k):
  pytest.importorskip("matplotlib")
  import matplotlib
  had_pyplot = "matplotlib.pyplot" in sys.modules
  get_backend = getattr(matplotlib.rcParams, "_get_backend_or_none", None)
  backend = get_backend() if get_backend else None
  labels = _labels(2000, 10)
  parts = partition(labels, k, "dirichlet", seed=0, alpha=0.5)
  path = tmp_path / "out" / "partition.png"
  returned = plot_partition(labels, parts, path, title=f"{k} clients")
  assert os.fspath(returned) == os.fspath(path)
  assert os.path.getsize(path) > 1000
  _, height = _png_size(path)
  if k == 100:
    assert height < 1500  # A heatmap, not 100 stacked bars.
  assert os.listdir(path.parent) == ["partition.png"]  # No temporary file left.
  # Overwriting an existing file works too.
  plot_partition(labels, parts, path, num_classes=12)
  assert _png_size(path)[0] > 0 and os.listdir(path.parent) == ["partition.png"]
  # No global matplotlib state was changed.
  assert had_pyplot or "matplotlib.pyplot" not in sys.modules
  if get_backend:
    assert get_backend() == backend


def test_plot_partition_without_matplotlib(tmp_path, monkeypatch):
  for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends",
               "matplotlib.backends.backend_agg"):
    monkeypatch.setitem(sys.modules, name, None)
  labels = _labels(100, 3)
  with pytest.raises(PartitionError, match=r'pip install "sfljax\[plot\]"'):
    plot_partition(labels, partition(labels, 3), tmp_path / "p.png")
  assert not os.listdir(tmp_path)
