"""Tests of sfljax.loaders against independent facts and hand-made files."""

import csv
import gzip
import io
import json
import os
import struct

import jax
import numpy as np
import pytest
import scipy.ndimage

from sfljax import loaders
from sfljax.loaders import DatasetError

FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def _error(fn, *args, **kwargs) -> str:
  with pytest.raises(DatasetError) as info:
    fn(*args, **kwargs)
  msg = str(info.value)
  assert "\n" not in msg, msg  # One line.
  return msg


# ----------------------------------------------------------------------------
# Real Fashion-MNIST (Debian package dataset-fashion-mnist).


@pytest.fixture(scope="module")
def fashion():
  if not os.path.isdir(FASHION_DIR):
    pytest.skip(f"{FASHION_DIR} is absent (install the Debian package dataset-fashion-mnist)")
  return loaders.load_idx("fashion_mnist", FASHION_DIR)


def _raw_gz(name: str, offset: int) -> np.ndarray:
  with gzip.open(os.path.join(FASHION_DIR, name + ".gz"), "rb") as f:
    return np.frombuffer(f.read(), np.uint8, offset=offset)


def test_fashion_mnist_shapes_and_class_counts(fashion):
  assert fashion.name == "fashion_mnist" and fashion.num_classes == 10
  assert fashion.x_train.shape == (60000, 28, 28, 1) and fashion.x_train.dtype == np.float32
  assert fashion.x_test.shape == (10000, 28, 28, 1) and fashion.x_test.dtype == np.float32
  assert fashion.y_train.dtype == np.int32 and fashion.y_test.dtype == np.int32
  # Fashion-MNIST is balanced: 6,000 train and 1,000 test images per class.
  np.testing.assert_array_equal(np.bincount(fashion.y_train, minlength=10), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(fashion.y_test, minlength=10), [1000] * 10)


def test_fashion_mnist_matches_raw_bytes(fashion):
  # Hand-parsed: labels start at byte 8, images at byte 16 of the IDX files.
  raw_labels = _raw_gz("train-labels-idx1-ubyte", 8)
  assert raw_labels[0] == 9  # The first training image is an ankle boot.
  assert fashion.y_train[0] == 9
  np.testing.assert_array_equal(fashion.y_train, raw_labels)
  np.testing.assert_array_equal(fashion.y_test, _raw_gz("t10k-labels-idx1-ubyte", 8))
  train = _raw_gz("train-images-idx3-ubyte", 16).astype(np.float64) / 255
  mean, std = train.mean(), train.std()
  test = _raw_gz("t10k-images-idx3-ubyte", 16).reshape(10000, 28, 28, 1) / 255
  np.testing.assert_allclose(fashion.x_test, (test - mean) / std, atol=1e-5)
  np.testing.assert_allclose(fashion.x_train[:100].ravel(), (train[:100 * 784] - mean) / std,
                             atol=1e-5)
  assert abs(float(fashion.x_train.mean(dtype=np.float64))) < 1e-4
  assert abs(float(fashion.x_train.std(dtype=np.float64)) - 1) < 1e-4


# ----------------------------------------------------------------------------
# Generated IDX files.

_N_TRAIN, _N_TEST = 30, 12


def _write_idx(path, magic, dims, payload: bytes, header_dims=None):
  header = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *(header_dims or dims))
  data = header + payload
  if path.endswith(".gz"):
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    with open(path, "wb") as f:
      f.write(data)


def _make_idx(folder, gz=False, seed=0, n_train=_N_TRAIN, n_test=_N_TEST):
  """Writes the four IDX files; returns {split: (uint8 images, labels)}."""
  rng = np.random.default_rng(seed)
  ext = ".gz" if gz else ""
  out = {}
  for split, prefix, n in (("train", "train", n_train), ("test", "t10k", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, n, dtype=np.uint8)
    _write_idx(os.path.join(folder, f"{prefix}-images-idx3-ubyte{ext}"), 0x803, (n, 28, 28),
               images.tobytes())
    _write_idx(os.path.join(folder, f"{prefix}-labels-idx1-ubyte{ext}"), 0x801, (n,),
               labels.tobytes())
    out[split] = (images, labels)
  return out


def _check_round_trip(ds, raw):
  (xtr, ytr), (xte, yte) = raw["train"], raw["test"]
  assert ds.x_train.shape == (_N_TRAIN, 28, 28, 1) and ds.x_test.shape == (_N_TEST, 28, 28, 1)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert ds.num_classes == 10
  np.testing.assert_array_equal(ds.y_train, ytr)
  np.testing.assert_array_equal(ds.y_test, yte)
  mean, std = (xtr / 255).mean(), (xtr / 255).std()
  np.testing.assert_allclose(ds.x_train[..., 0], (xtr / 255 - mean) / std, atol=1e-5)
  np.testing.assert_allclose(ds.x_test[..., 0], (xte / 255 - mean) / std, atol=1e-5)


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
  raw = _make_idx(str(tmp_path), gz=gz)
  ds = loaders.load_idx("mnist", str(tmp_path))
  assert ds.name == "mnist"
  _check_round_trip(ds, raw)


def test_idx_prefers_plain_when_both_exist(tmp_path):
  raw = _make_idx(str(tmp_path), gz=False, seed=0)
  _make_idx(str(tmp_path), gz=True, seed=1)
  _check_round_trip(loaders.load_idx("mnist", str(tmp_path)), raw)


def test_idx_missing_file(tmp_path):
  _make_idx(str(tmp_path), gz=True)
  os.remove(tmp_path / "t10k-labels-idx1-ubyte.gz")
  msg = _error(loaders.load_idx, "mnist", str(tmp_path))
  assert "missing" in msg and str(tmp_path) in msg
  assert "t10k-labels-idx1-ubyte or t10k-labels-idx1-ubyte.gz" in msg
  msg = _error(loaders.load_idx, "mnist", str(tmp_path / "nowhere"))
  assert "not a folder" in msg


def test_idx_wrong_magic(tmp_path):
  _make_idx(str(tmp_path))
  path = str(tmp_path / "train-images-idx3-ubyte")
  _write_idx(path, 0x801, (_N_TRAIN, 28, 28), bytes(_N_TRAIN * 784))
  msg = _error(loaders.load_idx, "mnist", str(tmp_path))
  assert path in msg and "wrong magic number" in msg
  assert "expected 0x00000803" in msg and "got 0x00000801" in msg


def test_idx_truncated(tmp_path):
  _make_idx(str(tmp_path), gz=True)
  path = str(tmp_path / "t10k-images-idx3-ubyte.gz")
  _write_idx(path, 0x803, (_N_TEST - 1, 28, 28), bytes((_N_TEST - 1) * 784),
             header_dims=(_N_TEST, 28, 28))
  msg = _error(loaders.load_idx, "mnist", str(tmp_path))
  assert path in msg and "truncated" in msg
  assert f"expected {_N_TEST * 784} bytes of data" in msg and f"got {(_N_TEST - 1) * 784}" in msg
  # A header cut short.
  with open(tmp_path / "t10k-images-idx3-ubyte", "wb") as f:
    f.write(struct.pack(">II", 0x803, _N_TEST))
  msg = _error(loaders.load_idx, "mnist", str(tmp_path))
  assert "t10k-images-idx3-ubyte:" in msg and "truncated" in msg and "header of 16 bytes" in msg


def test_idx_count_mismatch(tmp_path):
  _make_idx(str(tmp_path))
  path = str(tmp_path / "train-labels-idx1-ubyte")
  _write_idx(path, 0x801, (_N_TRAIN - 1,), bytes(_N_TRAIN - 1))
  msg = _error(loaders.load_idx, "mnist", str(tmp_path))
  assert path in msg and "train-images-idx3-ubyte" in msg
  assert f"{_N_TRAIN} images" in msg and f"{_N_TRAIN - 1} labels" in msg


def test_idx_label_out_of_range(tmp_path):
  _make_idx(str(tmp_path))
  path = str(tmp_path / "t10k-labels-idx1-ubyte")
  labels = np.zeros(_N_TEST, np.uint8)
  labels[5] = 10
  _write_idx(path, 0x801, (_N_TEST,), labels.tobytes())
  msg = _error(loaders.load_idx, "mnist", str(tmp_path))
  assert path in msg and "[0, 9]" in msg and "got 10 at index 5" in msg


def test_idx_unreadable_gzip(tmp_path):
  _make_idx(str(tmp_path), gz=True)
  path = str(tmp_path / "train-labels-idx1-ubyte.gz")
  with open(path, "wb") as f:
    f.write(b"this is not gzip data at all")
  msg = _error(loaders.load_idx, "fashion_mnist", str(tmp_path))
  assert path in msg and "unreadable gzip" in msg
  # A gzip stream cut in the middle.
  path = str(tmp_path / "train-images-idx3-ubyte.gz")
  with open(path, "rb") as f:
    blob = f.read()
  with open(path, "wb") as f:
    f.write(blob[:len(blob) // 2])
  msg = _error(loaders.load_idx, "fashion_mnist", str(tmp_path))
  assert path in msg and "unreadable gzip" in msg


def test_idx_unknown_name(tmp_path):
  assert "unknown" in _error(loaders.load_idx, "cifar10", str(tmp_path))


# ----------------------------------------------------------------------------
# TFDS.


@pytest.fixture
def mock_tfds(monkeypatch):
  """tfds.testing.mock_data, with the batch read fixed.

  tensorflow-datasets 4.9.10's mock sets ``__getitems__`` on its MagicMock
  as an unbound function (calling it raises TypeError), so the batch read is
  replaced here by per-record reads, which the mock serves.
  """
  import tensorflow_datasets as tfds
  from tensorflow_datasets.core.data_sources import base
  monkeypatch.setattr(base.BaseDataSource, "__getitems__",
                      lambda self, keys: [self[k] for k in keys])
  return tfds


@pytest.mark.parametrize("name,shape", [("mnist", (28, 28, 1)), ("fashion_mnist", (28, 28, 1)),
                                        ("cifar10", (32, 32, 3))])
def test_tfds_mock_data(tmp_path, mock_tfds, name, shape):
  tfds = mock_tfds
  with tfds.testing.mock_data(num_examples=9):
    ds = loaders.load_tfds(name, str(tmp_path))
    train, test = tfds.data_source(name, split=["train", "test"], data_dir=str(tmp_path),
                                   download=False)
    raw_train = np.stack([np.asarray(train[i]["image"]) for i in range(len(train))])
    raw_test = np.stack([np.asarray(test[i]["image"]) for i in range(len(test))])
    labels = [int(train[i]["label"]) for i in range(len(train))]
  assert ds.name == name and ds.num_classes == 10
  assert ds.x_train.shape == (9,) + shape and ds.x_test.shape == (9,) + shape
  assert ds.x_train.dtype == np.float32 and ds.x_test.dtype == np.float32
  assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
  np.testing.assert_array_equal(ds.y_train, labels)
  axes = (0, 1, 2) if shape[-1] == 3 else None  # cifar10: per channel.
  mean, std = (raw_train / 255).mean(axis=axes), (raw_train / 255).std(axis=axes)
  np.testing.assert_allclose(ds.x_train, (raw_train / 255 - mean) / std, atol=1e-5)
  np.testing.assert_allclose(ds.x_test, (raw_test / 255 - mean) / std, atol=1e-5)


def _prepare_tiny_mnist(data_dir: str, n_train=12, n_test=5):
  """A real TFDS `mnist` dir in array_record format, written without TensorFlow.

  Returns {image bytes: label} of every generated example.
  """
  import tensorflow_datasets as tfds
  from PIL import Image

  def png(a):
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    buf.seek(0)
    return buf

  made = {}

  class Mnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.builder_cls("mnist").VERSION

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(28, 28, 1)),
          "label": tfds.features.ClassLabel(num_classes=10)}))

    def _split_generators(self, dl_manager):
      return {"train": self._generate_examples(n_train, 0),
              "test": self._generate_examples(n_test, 1)}

    def _generate_examples(self, n, seed):
      rng = np.random.default_rng(seed)
      for i in range(n):
        image = rng.integers(0, 256, (28, 28), dtype=np.uint8)
        made[(seed, image.tobytes())] = i % 10
        yield i, {"image": png(image), "label": i % 10}

  Mnist(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return made


def test_tfds_reads_prepared_array_record(tmp_path):
  made = _prepare_tiny_mnist(str(tmp_path))
  ds = loaders.load_tfds("mnist", str(tmp_path))
  assert ds.x_train.shape == (12, 28, 28, 1) and ds.x_test.shape == (5, 28, 28, 1)
  train = {k[1]: v for k, v in made.items() if k[0] == 0}
  test = {k[1]: v for k, v in made.items() if k[0] == 1}
  raw = np.stack([np.frombuffer(k, np.uint8) for k in train]) / 255
  mean, std = raw.mean(), raw.std()
  for x, y, table in ((ds.x_train, ds.y_train, train), (ds.x_test, ds.y_test, test)):
    pixels = np.round((x[..., 0] * std + mean) * 255).astype(np.uint8)
    # Every example comes back once (in TFDS's storage order) with its label.
    assert sorted(p.tobytes() for p in pixels) == sorted(table)
    assert [table[p.tobytes()] for p in pixels] == list(y)


def test_tfds_not_prepared(tmp_path):
  msg = _error(loaders.load_tfds, "fashion_mnist", str(tmp_path))
  assert "not prepared" in msg and str(tmp_path) in msg
  assert f"tfds build fashion_mnist --data_dir {tmp_path} --file_format array_record" in msg
  assert "TensorFlow" in msg and "one-off" in msg
  assert not os.listdir(tmp_path)  # Looking did not create anything.


def test_tfds_prepared_as_tfrecord(tmp_path):
  _prepare_tiny_mnist(str(tmp_path))
  info_path = tmp_path / "mnist" / "3.0.1" / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  msg = _error(loaders.load_tfds, "mnist", str(tmp_path))
  assert "prepared" in msg and "tfrecord" in msg and "--file_format array_record" in msg


def test_tfds_unknown_name():
  assert "unknown" in _error(loaders.load_tfds, "imagenet2012")


# ----------------------------------------------------------------------------
# HAM10000.

_DX = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]  # Alphabetical: label = index.


def _make_ham(folder, n=40, seed=0):
  """A small HAM10000 folder in the real layout; returns [(image_id, dx, path)]."""
  from PIL import Image
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    image_id = f"ISIC_{24306 + 3 * i:07d}"
    dx = _DX[i % 7] if i < 14 else _DX[int(rng.integers(7))]
    if i % 10 == 9:
      sub = ""  # Directly in the folder.
    elif i % 10 == 8:
      sub = "extra"  # Any other immediate subfolder.
    else:
      sub = "HAM10000_images_part_1" if i % 2 else "HAM10000_images_part_2"
    os.makedirs(os.path.join(folder, sub), exist_ok=True)
    path = os.path.join(folder, sub, image_id + ".jpg")
    w, h = int(rng.integers(40, 130)), int(rng.integers(30, 100))
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path, quality=90)
    rows.append((image_id, dx, path))
  with open(os.path.join(folder, "HAM10000_metadata.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"])
    for i, (image_id, dx, _) in enumerate(rows):
      writer.writerow([f"HAM_{i // 2:07d}", image_id, dx, "histo", 45.0, "male", "back"])
  return rows


def _pil_pixels(path, size=64):
  from PIL import Image
  with Image.open(path) as im:
    return np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), np.float64)


def _unnormalise(x):
  return (x * np.array([0.229, 0.224, 0.225]) + np.array([0.485, 0.456, 0.406])) * 255


def test_ham10000_load(tmp_path):
  rows = _make_ham(str(tmp_path))
  ds = loaders.load_ham10000(str(tmp_path), seed=3)
  assert loaders.HAM10000_CLASSES == tuple(_DX)
  assert ds.name == "ham10000" and ds.num_classes == 7
  assert ds.x_train.shape == (36, 64, 64, 3) and ds.x_test.shape == (4, 64, 64, 3)
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  # The split is a permutation of the csv rows: 90% train then 10% test.
  order = np.random.default_rng(np.random.SeedSequence([3, 7])).permutation(40)
  expected_labels = np.array([_DX.index(dx) for _, dx, _ in rows])
  np.testing.assert_array_equal(ds.y_train, expected_labels[order[:36]])
  np.testing.assert_array_equal(ds.y_test, expected_labels[order[36:]])
  assert sorted(np.bincount(np.concatenate([ds.y_train, ds.y_test]), minlength=7)) == sorted(
      np.bincount(expected_labels, minlength=7))
  # Specific images: ImageNet normalisation undone gives PIL's bilinear resize.
  for j in (0, 17, 35):
    np.testing.assert_allclose(_unnormalise(ds.x_train[j]), _pil_pixels(rows[order[j]][2]),
                               atol=1e-3)
  np.testing.assert_allclose(_unnormalise(ds.x_test[2]), _pil_pixels(rows[order[38]][2]),
                             atol=1e-3)
  other = loaders.load_ham10000(str(tmp_path), seed=4)
  assert other.x_train.shape == ds.x_train.shape and not np.array_equal(other.y_train, ds.y_train)


def test_ham10000_cache(tmp_path):
  rows = _make_ham(str(tmp_path))
  small = loaders.load_ham10000(str(tmp_path), image_size=32, cache=False)
  assert small.x_train.shape == (36, 32, 32, 3)
  assert not (tmp_path / ".sfljax-cache").exists()
  first = loaders.load_ham10000(str(tmp_path))
  cache = tmp_path / ".sfljax-cache" / "ham10000-64.npz"
  assert cache.is_file()
  for _, _, path in rows:
    os.remove(path)
  second = loaders.load_ham10000(str(tmp_path))  # No JPEG is needed any more.
  for a, b in ((first.x_train, second.x_train), (first.y_train, second.y_train),
               (first.x_test, second.x_test), (first.y_test, second.y_test)):
    np.testing.assert_array_equal(a, b)
  # A csv newer than the cache forces a rebuild (which now lacks the images).
  stamp = os.path.getmtime(cache) + 10
  os.utime(tmp_path / "HAM10000_metadata.csv", (stamp, stamp))
  assert "missing" in _error(loaders.load_ham10000, str(tmp_path))


def test_ham10000_unwritable_cache_dir_is_skipped(tmp_path):
  _make_ham(str(tmp_path), n=10)
  (tmp_path / ".sfljax-cache").write_text("a file where the cache folder would go")
  ds = loaders.load_ham10000(str(tmp_path))
  assert ds.x_train.shape == (9, 64, 64, 3) and ds.x_test.shape == (1, 64, 64, 3)


def test_ham10000_errors(tmp_path):
  rows = _make_ham(str(tmp_path), n=14)
  csv_path = str(tmp_path / "HAM10000_metadata.csv")
  image_id, _, path = rows[5]
  with open(path, "wb") as f:
    f.write(b"not a jpeg")
  msg = _error(loaders.load_ham10000, str(tmp_path), cache=False)
  assert path in msg and "unreadable image" in msg
  os.remove(path)
  msg = _error(loaders.load_ham10000, str(tmp_path), cache=False)
  assert f"{image_id}.jpg" in msg and "missing" in msg
  with open(csv_path) as f:
    text = f.read()
  with open(csv_path, "w") as f:
    f.write(text.replace(f"{rows[3][0]},{rows[3][1]}", f"{rows[3][0]},melanoma"))
  msg = _error(loaders.load_ham10000, str(tmp_path), cache=False)
  assert csv_path in msg and "unknown dx 'melanoma'" in msg and "line 5" in msg
  os.remove(csv_path)
  msg = _error(loaders.load_ham10000, str(tmp_path))
  assert csv_path in msg and "missing" in msg


# ----------------------------------------------------------------------------
# HAM10000 augmentation.


def _reference_augment(image, hflip, vflip, angle, fill=None):
  """Flips, Pad(3), rotation about the centre, centre crop: NumPy/SciPy."""
  img = np.asarray(image, np.float64)
  if hflip:
    img = img[:, ::-1]
  if vflip:
    img = img[::-1]
  fill = np.zeros(img.shape[-1]) if fill is None else np.asarray(fill, np.float64)
  out = np.empty_like(img)
  for ch in range(img.shape[-1]):
    padded = np.pad(img[..., ch], 3, constant_values=fill[ch])
    rotated = scipy.ndimage.rotate(padded, float(angle), reshape=False, order=1,
                                   mode="constant", cval=fill[ch])
    out[..., ch] = rotated[3:-3, 3:-3]
  return out


def test_reference_rotation_is_counter_clockwise():
  # Pins the convention of the reference (torchvision rotates counter-clockwise).
  a = np.zeros((5, 5))
  a[2, 4] = 1  # Right of the centre...
  assert scipy.ndimage.rotate(a, 90, reshape=False, order=1)[0, 2] == pytest.approx(1)  # ...to above.


def test_augment_matches_reference():
  images = np.random.default_rng(0).normal(size=(8, 64, 64, 3)).astype(np.float32)
  key = jax.random.key(42)
  out = np.asarray(jax.jit(loaders.augment_ham10000)(key, images))
  assert out.shape == images.shape and out.dtype == np.float32
  hflip, vflip, angle = map(np.asarray, loaders._augment_params(key, 8))
  assert hflip.any() and not hflip.all() and vflip.any() and not vflip.all()
  for i in range(8):
    np.testing.assert_allclose(out[i], _reference_augment(images[i], hflip[i], vflip[i], angle[i]),
                               atol=1e-4, err_msg=f"sample {i}")
  # Eager and jit agree.
  np.testing.assert_allclose(np.asarray(loaders.augment_ham10000(key, images)), out, atol=1e-4)


def test_augment_fill_and_vmap():
  images = np.random.default_rng(1).uniform(size=(4, 20, 24, 3)).astype(np.float32)
  fill = (-2.1, -2.0, -1.8)  # Black after ImageNet normalisation.
  keys = jax.random.split(jax.random.key(7), 3)
  out = jax.vmap(lambda k: loaders.augment_ham10000(k, images, fill=fill))(keys)
  assert out.shape == (3, 4, 20, 24, 3)
  for k in range(3):
    hflip, vflip, angle = map(np.asarray, loaders._augment_params(keys[k], 4))
    for i in range(4):
      np.testing.assert_allclose(
          np.asarray(out[k, i]),
          _reference_augment(images[i], hflip[i], vflip[i], angle[i], fill), atol=1e-4)


def test_augment_params_distribution_and_corners():
  hflip, vflip, angle = map(np.asarray, loaders._augment_params(jax.random.key(0), 4000))
  assert 0.45 < hflip.mean() < 0.55 and 0.45 < vflip.mean() < 0.55
  assert 0.2 < (hflip & vflip).mean() < 0.3  # Independent draws.
  assert angle.min() >= -10 and angle.max() <= 10
  assert angle.min() < -9.5 and angle.max() > 9.5 and abs(angle.std() - 20 / 12 ** 0.5) < 0.3
  # A white image: flips change nothing, rotation brings zeros into the corners.
  key = jax.random.key(3)
  out = np.asarray(loaders.augment_ham10000(key, np.ones((16, 64, 64, 1), np.float32)))
  _, _, angle = map(np.asarray, loaders._augment_params(key, 16))
  np.testing.assert_allclose(out[:, 16:48, 16:48], 1, atol=1e-5)
  corners = out[:, [0, 0, -1, -1], [0, -1, 0, -1], 0]
  for i in range(16):
    if abs(angle[i]) > 2:
      assert corners[i].min() < 0.5, (angle[i], corners[i])
  # Samples of one batch get different draws.
  assert len(set(np.round(angle, 4))) == 16
