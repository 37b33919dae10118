"""Datasets, partitions and batch schedules."""

import numpy as np
import pytest

from sfljax import data


def test_embedded_digits_equal_scikit_learn_copy():
  sklearn_datasets = pytest.importorskip("sklearn.datasets")
  ref = sklearn_datasets.load_digits()
  ds = data.load_digits(0, image_size=8)
  assert len(ds.y_train) + len(ds.y_test) == 1797 == len(ref.target)
  assert len(ds.y_test) == 359
  # Undo the split and standardisation, compare with scikit-learn's images.
  x = np.concatenate([ds.x_train, ds.x_test])[..., 0]
  y = np.concatenate([ds.y_train, ds.y_test])
  order = np.concatenate([data.rng_for(0, 0).permutation(1797)[359:],
                          data.rng_for(0, 0).permutation(1797)[:359]])
  raw = ref.images[order] / 16.0
  mean, std = raw[:len(ds.y_train)].mean(), raw[:len(ds.y_train)].std()
  np.testing.assert_allclose(x, (raw - mean) / std, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(y, ref.target[order])


def test_digits_resized_for_lenet_and_split_depends_on_seed():
  a, b = data.load_digits(0), data.load_digits(1)
  assert a.x_train.shape == (1438, 28, 28, 1) and a.x_train.dtype == np.float32
  assert abs(float(a.x_train.mean())) < 1e-4
  assert not np.array_equal(a.y_test, b.y_test)


@pytest.mark.parametrize("n,k", [(100, 1), (100, 7), (1438, 100), (10, 10)])
def test_iid_partition_assigns_every_sample_once(n, k):
  parts = data.partition(np.zeros(n), k, seed=3)
  allidx = np.concatenate(parts)
  assert len(parts) == k
  np.testing.assert_array_equal(np.sort(allidx), np.arange(n))
  sizes = [len(p) for p in parts]
  assert max(sizes) - min(sizes) <= 1


def test_partition_errors():
  with pytest.raises(ValueError, match="11 clients but only 10 training samples"):
    data.partition(np.zeros(10), 11)
  with pytest.raises(ValueError, match="unknown partition 'x': choose one of iid"):
    data.partition(np.zeros(10), 2, "x")


def test_client_data_padding_and_batch_schedule():
  x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1)
  y = np.arange(10, dtype=np.int32)
  parts = [np.array([0, 1, 2, 3, 4, 5, 6]), np.array([7, 8, 9])]
  cd = data.ClientData.from_partition(x, y, parts)
  assert cd.x.shape == (2, 7, 1, 1, 1)
  np.testing.assert_array_equal(cd.counts, [7, 3])
  np.testing.assert_array_equal(cd.y[1, :3], [7, 8, 9])
  idx, mask = data.batch_schedule(cd.counts, 3, seed=0, round_index=0, local_epochs=2)
  assert idx.shape == mask.shape == (2, 6, 3)   # ceil(7/3) = 3 steps per epoch
  for k, n in enumerate(cd.counts):
    for e in range(2):
      seen = idx[k, 3 * e:3 * e + 3][mask[k, 3 * e:3 * e + 3]]
      np.testing.assert_array_equal(np.sort(seen), np.arange(n))  # each sample once per epoch
  assert mask[1, 1:3].sum() == 0 and mask[1, 0].all()             # client 1: one step, then padding
  again = data.batch_schedule(cd.counts, 3, seed=0, round_index=0, local_epochs=2)
  np.testing.assert_array_equal(again[0], idx)
  other = data.batch_schedule(cd.counts, 3, seed=0, round_index=1, local_epochs=2)
  assert not np.array_equal(other[0], idx)
