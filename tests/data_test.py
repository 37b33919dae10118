"""Datasets, partitions and batch schedules."""

import dataclasses

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


@pytest.mark.parametrize("shape,dtype", [((3, 5, 7), np.float32), ((0, 4), np.int32),
                                         ((11,), np.uint8), ((2, 3), np.float64)])
def test_aligned_zeros_are_zeros_on_a_64_byte_boundary(shape, dtype):
  for _ in range(5):   # Different allocations land at different offsets.
    a = data.aligned_zeros(shape, dtype)
    assert a.shape == shape and a.dtype == dtype and a.flags.c_contiguous
    assert a.size == 0 or a.ctypes.data % 64 == 0   # An empty array has no buffer.
    np.testing.assert_array_equal(a, np.zeros(shape, dtype))


def test_client_data_arrays_are_aligned_for_zero_copy_placement():
  x = np.random.RandomState(0).standard_normal((30, 3, 3, 1)).astype(np.float32)
  y = np.arange(30, dtype=np.int32)
  for _ in range(8):   # Different allocations land at different offsets.
    cd = data.ClientData.from_partition(x, y, [np.arange(0, 13), np.arange(13, 30)])
    assert cd.x.ctypes.data % 64 == 0 and cd.y.ctypes.data % 64 == 0
  np.testing.assert_array_equal(cd.x[0, :13], x[:13])
  np.testing.assert_array_equal(cd.x[1, :17], x[13:])
  np.testing.assert_array_equal(cd.x[0, 13:], 0)
  np.testing.assert_array_equal(cd.rows[0], list(range(13)) + [0] * 4)   # padding: sample 0
  assert cd.labels.dtype == np.int32 and cd.rows.ctypes.data % 64 == 0


def test_aligned_returns_aligned_arrays_and_copies_only_when_needed():
  raw = np.zeros(4 * 65 + 68, np.uint8)
  for off in range(0, 68, 4):   # every 4-byte offset of a float32 array
    a = raw[off:off + 4 * 65].view(np.float32)
    a[:] = np.arange(65)
    b = data.aligned(a)
    assert b.ctypes.data % 64 == 0
    np.testing.assert_array_equal(b, np.arange(65))
    assert (b is a) == (a.ctypes.data % 64 == 0)
  assert data.aligned(np.zeros((4, 4))[:, ::2]).flags.c_contiguous


def test_loaded_images_are_aligned_for_zero_copy_placement():
  ds = data.load_dataset("digits")
  assert ds.x_train.ctypes.data % 64 == 0 and ds.x_test.ctypes.data % 64 == 0


# ---------------------------------------------------------------------------
# check_dataset / check_parts: data that cannot train is refused
# ---------------------------------------------------------------------------


def _tiny_dataset(**changes) -> data.Dataset:
  """A valid 3-class dataset of 6 + 4 random 4x4x1 images, with ``changes`` applied."""
  rs = np.random.RandomState(0)
  fields = dict(name="tiny", x_train=rs.standard_normal((6, 4, 4, 1)).astype(np.float32),
                y_train=np.array([0, 1, 2, 0, 1, 2], np.int32),
                x_test=rs.standard_normal((4, 4, 4, 1)).astype(np.float32),
                y_test=np.array([2, 1, 0, 0], np.int32), num_classes=3)
  fields.update(changes)
  return data.Dataset(**fields)


def test_check_dataset_accepts_valid_data(digits):
  assert data.check_dataset(digits) is digits
  tiny = _tiny_dataset(y_train=np.array([0, 1, 2, 0, 1, 2], np.uint8))  # any integer dtype
  assert data.check_dataset(tiny) is tiny


def _nan_at(x, i):
  x = x.copy()
  x[i, 1, 2, 0] = np.nan
  return x


_DATASET_ERRORS = [
    ("label_too_large", dict(y_train=np.array([0, 3, 1, 3, 3, 2], np.int32)),
     r"dataset\.y_train: label 3 is outside \[0, 3\) for 3 samples; relabel to "
     r"0\.\.num_classes-1 or raise num_classes$"),
    ("label_negative_in_test", dict(y_test=np.array([2, -1, 0, 0], np.int32)),
     r"dataset\.y_test: label -1 is outside \[0, 3\) for 1 sample;"),
    ("labels_one_based", dict(y_train=np.array([1, 2, 3, 1, 2, 3], np.int64)),
     r"dataset\.y_train: label 3 is outside \[0, 3\) for 2 samples;"),
    ("several_bad_labels", dict(y_train=np.array([7, 9, 9, 0, -2, 1], np.int32)),
     r"dataset\.y_train: label 9 is outside \[0, 3\) for 2 samples \(4 samples in all carry "
     r"3 out-of-range labels from -2 to 9\);"),
    ("float_labels", dict(y_train=np.array([0, 1, 2, 0, 1, 2], np.float32)),
     r"dataset\.y_train: labels have dtype float32, not an integer dtype;"),
    ("bool_labels", dict(y_test=np.array([True, False, True, True])),
     r"dataset\.y_test: labels have dtype bool, not an integer dtype;"),
    ("onehot_labels", dict(y_train=np.eye(3, dtype=np.int32)[[0, 1, 2, 0, 1, 2]]),
     r"dataset\.y_train: labels must be a 1-D array \[N\] of class ids, got shape \(6, 3\);"),
    ("more_labels_than_images", dict(y_train=np.array([0, 1, 2, 0, 1, 2, 0], np.int32)),
     r"dataset\.y_train: 7 labels for 6 images in dataset\.x_train; give exactly one label"),
    ("fewer_labels_than_images", dict(y_test=np.array([0, 1, 2], np.int32)),
     r"dataset\.y_test: 3 labels for 4 images in dataset\.x_test;"),
    ("test_shape_differs", dict(x_test=np.zeros((4, 4, 4, 3), np.float32)),
     r"dataset\.x_test: test images have shape \(H, W, C\) = \(4, 4, 3\) but train images "
     r"\(4, 4, 1\); resize both splits"),
    ("nan_image", dict(x_train=_nan_at(_tiny_dataset().x_train, 4)),
     r"dataset\.x_train: NaN or inf values in 1 image \(first: sample 4\); drop or repair"),
    ("inf_image", dict(x_test=np.full((4, 4, 4, 1), np.inf, np.float32)),
     r"dataset\.x_test: NaN or inf values in 4 images \(first: sample 0\);"),
    ("empty_train", dict(x_train=np.zeros((0, 4, 4, 1), np.float32),
                         y_train=np.zeros((0,), np.int32)),
     r"dataset\.x_train: the train set is empty;"),
    ("empty_test", dict(x_test=np.zeros((0, 4, 4, 1), np.float32),
                        y_test=np.zeros((0,), np.int32)),
     r"dataset\.x_test: the test set is empty;"),
    ("one_class", dict(num_classes=1, y_train=np.zeros(6, np.int32),
                       y_test=np.zeros(4, np.int32)),
     r"dataset\.num_classes: 1 is fewer than 2;"),
    ("float_num_classes", dict(num_classes=3.0),
     r"dataset\.num_classes: 3\.0 is not an integer;"),
    ("no_channel_axis", dict(x_train=np.zeros((6, 4, 4), np.float32)),
     r"dataset\.x_train: images must be rank-4 NHWC \[N, H, W, C\] with nonzero H, W, C, "
     r"got shape \(6, 4, 4\) \(add a channel axis"),
    ("flat_test_images", dict(x_test=np.zeros((4, 16), np.float32)),
     r"dataset\.x_test: images must be rank-4 NHWC"),
]


@pytest.mark.parametrize("changes,message", [c[1:] for c in _DATASET_ERRORS],
                         ids=[c[0] for c in _DATASET_ERRORS])
def test_check_dataset_refuses(changes, message):
  with pytest.raises(ValueError, match=message) as info:
    data.check_dataset(_tiny_dataset(**changes))
  assert "\n" not in str(info.value)


def test_check_dataset_refuses_bad_digits_labels(digits):
  # The silent-NaN case: a real dataset with some labels past num_classes.
  y = digits.y_train.copy()
  y[[3, 50, 700]] = 12
  with pytest.raises(ValueError, match=r"^dataset\.y_train: label 12 is outside \[0, 10\) "
                     r"for 3 samples; relabel to 0\.\.num_classes-1 or raise num_classes$"):
    data.check_dataset(dataclasses.replace(digits, y_train=y))


def test_check_parts_accepts_valid_partitions():
  parts = data.partition(np.zeros(50), 4, seed=1)
  out = data.check_parts(parts, 50)
  assert len(out) == 4 and all(p.dtype == np.int64 and p.ndim == 1 for p in out)
  for a, b in zip(out, parts):
    np.testing.assert_array_equal(a, b)
  # Lists, small integer dtypes and samples left to no client are fine.
  out = data.check_parts([[4, 0], np.array([2], np.uint8)], 5)
  assert [p.tolist() for p in out] == [[4, 0], [2]] and out[1].dtype == np.int64


_PARTS_ERRORS = [
    ("index_too_large", [np.arange(0, 5), np.array([5, 10, 11])],
     r"parts: client 1 has index 10 outside \[0, 10\) \(2 such indices\);"),
    ("negative_index", [np.array([0, -1]), np.arange(2, 10)],
     r"parts: client 0 has index -1 outside \[0, 10\) \(1 such index\);"),
    ("shared_index", [np.arange(0, 4), np.arange(4, 7), np.array([9, 6, 5])],
     r"parts: sample 5 is in both client 1 and client 2 \(2 shared samples in all\); "
     r"assign every sample to one client only$"),
    ("duplicate_in_part", [np.array([0, 3, 1, 3]), np.arange(4, 10)],
     r"parts: client 0 lists sample 3 more than once \(1 repeated sample\);"),
    ("empty_part", [np.arange(10), np.array([], np.int64), np.array([])],
     r"parts: client 1 has no samples; give every client at least one sample"),
    ("float_part", [np.arange(5), np.arange(5, 10, dtype=np.float64)],
     r"parts: client 1's indices have dtype float64, not an integer dtype;"),
    ("bool_mask", [np.arange(10) < 5],
     r"parts: client 0's indices have dtype bool, not an integer dtype \(a boolean mask\? "
     r"use np\.flatnonzero\(mask\)\)"),
    ("2d_part", [np.arange(10).reshape(2, 5)],
     r"parts: client 0's part has shape \(2, 5\); each part must be a 1-D array"),
    ("no_clients", [], r"parts: no clients;"),
]


@pytest.mark.parametrize("parts,message", [c[1:] for c in _PARTS_ERRORS],
                         ids=[c[0] for c in _PARTS_ERRORS])
def test_check_parts_refuses(parts, message):
  with pytest.raises(ValueError, match="^" + message) as info:
    data.check_parts(parts, 10)
  assert "\n" not in str(info.value)
