"""Loaders for datasets on disk: MNIST-format IDX files, TFDS and HAM10000.

Every loader returns a :class:`sfljax.data.Dataset` (NHWC float32 images,
int32 labels) and reports a malformed or missing input with a one-line
:class:`DatasetError` that names the file or folder, says what is wrong and,
where there is one, how to fix it.

* :func:`load_idx`: MNIST / Fashion-MNIST from the four IDX files (plain or
  ``.gz``), e.g. Debian's ``dataset-fashion-mnist`` package at
  ``/usr/share/datasets/fashion-mnist``. No TensorFlow, no network.
* :func:`load_tfds`: ``mnist``, ``fashion_mnist`` or ``cifar10`` through
  ``tfds.data_source`` from a data dir prepared once (preparing needs
  TensorFlow; reading does not).
* :func:`load_ham10000`: the HAM10000 skin-lesion images (7 classes) with the
  split and normalisation of the SplitFed paper's code, cached as ``.npz``
  after the first (slow) JPEG decoding; :func:`augment_ham10000` is its train
  augmentation in JAX.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import logging
import math
import os
import tempfile
import warnings
import zlib
from typing import Sequence

import numpy as np

from sfljax.data import Dataset

IDX_DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist")
TFDS_DATASETS: tuple[str, ...] = ("mnist", "fashion_mnist", "cifar10")

HAM10000_CLASSES: tuple[str, ...] = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


class DatasetError(ValueError):
  """One-line, user-facing: names the file/dir and what is wrong and how to fix it."""


# ----------------------------------------------------------------------------
# Shared helpers.


def _standardise(images: np.ndarray, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
  """Standardises uint8 [N, H, W, C] train images in place of a float32 copy.

  Returns the float32 images scaled to [0, 1] and standardised, plus the
  (mean, std) used (scalars, or [C] when ``per_channel``), computed in float64.
  """
  x = images.astype(np.float32)
  x *= np.float32(1.0 / 255.0)
  # Two float64 passes over chunks of images: ``x.std(dtype=np.float64)``
  # would hold a float64 copy of the whole set at once (Fashion-MNIST:
  # 376 MB, which set the peak memory of small-model runs).
  axes = (0, 1, 2) if per_channel else None
  n = x.size // (x.shape[-1] if per_channel else 1)
  chunks = [x[i:i + _STATS_CHUNK] for i in range(0, len(x), _STATS_CHUNK)]
  mean = sum(c.sum(axis=axes, dtype=np.float64) for c in chunks) / n
  var = sum(np.square(c - mean, dtype=np.float64).sum(axis=axes) for c in chunks) / n
  std = np.sqrt(var)
  std = np.where(std > 0, std, 1.0)
  return x, np.stack([mean, std]).astype(np.float32)


_STATS_CHUNK = 2048  # images per chunk of the float64 statistics


def _apply(images: np.ndarray, stats: np.ndarray) -> np.ndarray:
  x = images.astype(np.float32)
  x *= np.float32(1.0 / 255.0)
  x -= stats[0]
  x /= stats[1]
  return x


def _finish(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
            y_test: np.ndarray, num_classes: int, per_channel: bool) -> Dataset:
  """Scales uint8 images to [0, 1] and standardises with the train statistics."""
  xtr, stats = _standardise(x_train, per_channel)
  xtr -= stats[0]
  xtr /= stats[1]
  xte = _apply(x_test, stats)
  return Dataset(name, xtr, np.asarray(y_train, np.int32), xte,
                 np.asarray(y_test, np.int32), num_classes=num_classes)


# ----------------------------------------------------------------------------
# IDX (MNIST format).

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _idx_path(data_dir: str, base: str) -> str:
  candidates = (base, base + ".gz")
  for c in candidates:
    path = os.path.join(data_dir, c)
    if os.path.isfile(path):
      return path
  raise DatasetError(
      f"{os.path.join(data_dir, base)}: missing; looked for {' or '.join(candidates)} in "
      f"{data_dir} (the MNIST-format IDX files train-images-idx3-ubyte, "
      f"train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte, "
      f"plain or .gz)")


def _read_bytes(path: str) -> bytes:
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        return f.read()
    with open(path, "rb") as f:
      return f.read()
  except (OSError, EOFError, zlib.error) as e:
    if path.endswith(".gz"):
      raise DatasetError(f"{path}: unreadable gzip ({e}); re-download the file or "
                         f"gunzip a good copy next to it") from None
    raise DatasetError(f"{path}: cannot read ({e})") from None


def _parse_idx(path: str, magic: int) -> np.ndarray:
  """Parses one IDX file of unsigned bytes with the given magic number."""
  raw = _read_bytes(path)
  ndim = magic & 0xFF
  header = 4 + 4 * ndim
  if len(raw) < 4:
    raise DatasetError(f"{path}: truncated: expected a header of {header} bytes, got "
                       f"{len(raw)} bytes in all")
  got = int.from_bytes(raw[:4], "big")
  if got != magic:
    kind = "images: unsigned bytes, 3 dims" if ndim == 3 else "labels: unsigned bytes, 1 dim"
    raise DatasetError(f"{path}: wrong magic number: expected 0x{magic:08X} ({kind}), "
                       f"got 0x{got:08X}; is this the right file?")
  if len(raw) < header:
    raise DatasetError(f"{path}: truncated: expected a header of {header} bytes, got "
                       f"{len(raw)} bytes in all")
  dims = tuple(int(d) for d in np.frombuffer(raw, ">i4", count=ndim, offset=4))
  # A count of 0 is a readable (empty) file, refused by the caller; a size of 0
  # or a negative one (a set high bit) is a broken header.
  if dims[0] < 0 or any(d <= 0 for d in dims[1:]):
    what = "count, rows, columns" if ndim == 3 else "count"
    raise DatasetError(f"{path}: corrupt header: dimension sizes ({what}) {dims} must be "
                       f"positive; re-download the file")
  expected = math.prod(dims)  # A Python int: no overflow for a huge header.
  got_n = len(raw) - header
  if got_n < expected:
    raise DatasetError(f"{path}: truncated: expected {expected} bytes of data for shape "
                       f"{dims}, got {got_n}; re-download the file")
  if got_n > expected:
    raise DatasetError(f"{path}: {got_n - expected} trailing bytes: expected {expected} "
                       f"bytes of data for shape {dims}, got {got_n}")
  return np.frombuffer(raw, np.uint8, offset=header).reshape(dims)


def _load_idx_split(data_dir: str, split: str) -> tuple[np.ndarray, np.ndarray, str]:
  images_base, labels_base = _IDX_FILES[split]
  images_path = _idx_path(data_dir, images_base)
  labels_path = _idx_path(data_dir, labels_base)
  images = _parse_idx(images_path, _IDX_IMAGES_MAGIC)
  labels = _parse_idx(labels_path, _IDX_LABELS_MAGIC)
  if len(images) != len(labels):
    raise DatasetError(f"{images_path} has {len(images)} images but {labels_path} has "
                       f"{len(labels)} labels: the counts must match")
  if not len(images):
    raise DatasetError(f"{images_path}: holds no images; the {split} set needs at least one "
                       f"(re-download the file or give a folder with data)")
  if len(labels) and labels.max() > 9:
    bad = int(np.argmax(labels > 9))
    raise DatasetError(f"{labels_path}: label values must be in [0, 9], got "
                       f"{int(labels[bad])} at index {bad}")
  return images, labels, images_path


def load_idx(name: str, data_dir: str) -> Dataset:
  """MNIST or Fashion-MNIST from the four MNIST-format IDX files in ``data_dir``.

  Reads ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte`` (training
  set) and ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (test set),
  each plain or gzipped (``.gz``; the plain file wins when both exist).
  Images are scaled to [0, 1] and standardised with the training set's mean
  and std (one scalar each); shape ``[N, rows, cols, 1]`` (28x28 for MNIST).

  Raises:
    DatasetError: a file is missing, not gzip, has the wrong magic number, is
      truncated, or images and labels disagree in count, or a label is
      outside [0, 9].
  """
  if name not in IDX_DATASETS:
    raise DatasetError(f"unknown IDX dataset {name!r}: choose one of {', '.join(IDX_DATASETS)}")
  if not os.path.isdir(data_dir):
    raise DatasetError(f"{data_dir}: not a folder; pass the folder that holds "
                       f"train-images-idx3-ubyte[.gz] and the other IDX files")
  x_train, y_train, train_path = _load_idx_split(data_dir, "train")
  x_test, y_test, test_path = _load_idx_split(data_dir, "test")
  if x_train.shape[1:] != x_test.shape[1:]:
    raise DatasetError(f"{test_path}: images are {x_test.shape[1]}x{x_test.shape[2]} but "
                       f"{train_path} has {x_train.shape[1]}x{x_train.shape[2]}")
  return _finish(name, x_train[..., None], y_train, x_test[..., None], y_test,
                 num_classes=10, per_channel=False)


# ----------------------------------------------------------------------------
# TensorFlow Datasets.

_TFDS_CHUNK = 8192
# The loggers of TFDS and what it pulls in (absl, TensorFlow if installed).
_TFDS_LOGGERS = ("absl", "tensorflow", "tensorflow_datasets")


@contextlib.contextmanager
def _quiet_tfds():
  """Silences TFDS's chatter while it runs, and only then.

  TFDS logs warnings through absl (e.g. "Variant folder ... has no
  dataset_info.json" while looking for an unprepared dataset) and may import
  TensorFlow, which logs from C++; none of it says more than the one-line
  :class:`DatasetError` that follows. Log records below ERROR on those loggers
  and Python warnings are dropped; errors are still logged, and exceptions go
  through untouched. ``TF_CPP_MIN_LOG_LEVEL`` is set to 2 (TensorFlow's C++
  warnings off) unless the user set it.
  """
  loggers = [logging.getLogger(n) for n in _TFDS_LOGGERS]
  levels = [lg.level for lg in loggers]
  set_env = "TF_CPP_MIN_LOG_LEVEL" not in os.environ
  if set_env:
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
  try:
    for lg in loggers:
      lg.setLevel(logging.ERROR)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      yield
  finally:
    for lg, level in zip(loggers, levels):
      lg.setLevel(level)
    if set_env:
      os.environ.pop("TF_CPP_MIN_LOG_LEVEL", None)


def _tfds_not_ready(name: str, data_dir: str | None, err: Exception) -> DatasetError:
  """The DatasetError for a data_source that failed to open."""
  import tensorflow_datasets as tfds
  try:
    builder = tfds.builder(name, data_dir=data_dir)
    root = str(builder.data_path.parent.parent)
    prepared = builder.is_prepared()
    fmt = builder.info.file_format
  except Exception:  # pylint: disable=broad-except
    root, prepared, fmt = data_dir or "the default TFDS data dir", False, None
  how = (f"preparing needs TensorFlow and the network, once: pip install \"sfljax[tfds]\" "
         f"then `tfds build {name} --data_dir {root} --file_format array_record` (or "
         f"python -c \"import tensorflow_datasets as tfds; tfds.builder('{name}', "
         f"data_dir='{root}', file_format='array_record').download_and_prepare()\"); "
         f"both are one-off, reading needs neither TensorFlow nor the network")
  if not prepared:
    return DatasetError(f"TFDS dataset {name!r} is not prepared in {root}: {how}")
  fmt_name = getattr(fmt, "value", fmt)
  if fmt_name not in ("array_record", "parquet"):
    return DatasetError(f"TFDS dataset {name!r} is prepared in {root} as {fmt_name}, which "
                        f"cannot be read at random without TensorFlow: delete "
                        f"{builder.data_path} and prepare it again as array_record: {how}")
  detail = " ".join(str(err).split())
  return DatasetError(f"TFDS dataset {name!r} in {root} cannot be opened "
                      f"({type(err).__name__}: {detail})")


def _read_source(source, what: str = "the TFDS source") -> tuple[np.ndarray, np.ndarray]:
  """All records of a TFDS random-access source as (uint8 images, labels)."""
  n = len(source)
  first = source[0] if n else None
  if first is None:
    raise DatasetError(f"{what} has no records; prepare the dataset again")
  image0 = np.asarray(first["image"])
  images = np.empty((n,) + image0.shape, np.uint8)
  labels = np.empty((n,), np.int64)
  for start in range(0, n, _TFDS_CHUNK):
    keys = list(range(start, min(n, start + _TFDS_CHUNK)))
    # Batch reads are ~3x faster than one record at a time (ArrayRecord reads
    # the records with several threads).
    for i, rec in zip(keys, source.__getitems__(keys)):
      images[i] = rec["image"]
      labels[i] = rec["label"]
  return images, labels


def load_tfds(name: str, data_dir: str | None = None) -> Dataset:
  """``mnist``, ``fashion_mnist`` or ``cifar10`` from a prepared TFDS data dir.

  Reads with ``tfds.data_source(..., download=False)``, which needs neither
  TensorFlow nor the network but needs the dataset prepared once in the
  ``array_record`` (or ``parquet``) file format (see the error message for
  how). ``data_dir=None`` means TFDS's default (``~/tensorflow_datasets`` or
  ``$TFDS_DATA_DIR``). Splits ``train`` and ``test``; images scaled to [0, 1]
  and standardised with the training set's mean and std: one scalar for the
  greyscale datasets, per channel for cifar10 (``[N, 32, 32, 3]``).
  """
  if name not in TFDS_DATASETS:
    raise DatasetError(f"unknown TFDS dataset {name!r}: choose one of {', '.join(TFDS_DATASETS)}")
  with _quiet_tfds():
    try:
      import tensorflow_datasets as tfds  # Local import: keeps `import sfljax.loaders` light.
    except ImportError as e:
      raise DatasetError(f"reading {name} through TFDS needs tensorflow-datasets ({e}): pip "
                         f"install tensorflow-datasets") from None
    try:
      train, test = tfds.data_source(name, split=["train", "test"], data_dir=data_dir,
                                     download=False)
    except Exception as e:  # pylint: disable=broad-except
      # An unprepared dir gives e.g. NotImplementedError about TFRECORD, which
      # says nothing about the actual problem; work out what it is.
      raise _tfds_not_ready(name, data_dir, e) from e
    where = data_dir or "the default TFDS data dir"
    x_train, y_train = _read_source(train, f"TFDS dataset {name!r} in {where}: split 'train'")
    x_test, y_test = _read_source(test, f"TFDS dataset {name!r} in {where}: split 'test'")
  return _finish(name, x_train, y_train, x_test, y_test, num_classes=10,
                 per_channel=x_train.shape[-1] > 1)


# ----------------------------------------------------------------------------
# HAM10000.

_HAM_CSV = "HAM10000_metadata.csv"
_HAM_PARTS = ("HAM10000_images_part_1", "HAM10000_images_part_2")
_CACHE_DIR = ".sfljax-cache"
_HAM_SPLIT_STREAM = 7


def _read_ham_csv(csv_path: str) -> tuple[list[str], np.ndarray]:
  """Image ids and int labels (index into HAM10000_CLASSES) from the metadata csv."""
  if not os.path.isfile(csv_path):
    raise DatasetError(f"{csv_path}: missing; HAM10000 needs the metadata csv and the "
                       f"images ({'/, '.join(_HAM_PARTS)}/) in "
                       f"{os.path.dirname(csv_path)}: download them from the Harvard "
                       f"Dataverse (doi:10.7910/DVN/DBW86T) and unzip there")
  try:
    with open(csv_path, newline="", encoding="utf-8-sig") as f:
      reader = csv.DictReader(f)
      rows = list(reader)
      fields = reader.fieldnames or []
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise DatasetError(f"{csv_path}: cannot read the csv ({e})") from None
  missing = [c for c in ("image_id", "dx") if c not in fields]
  if not rows or missing:
    raise DatasetError(f"{csv_path}: expected a header with columns image_id and dx and at "
                       f"least one row; " + (f"missing {', '.join(missing)}" if rows else
                                             "found no rows"))
  ids, labels = [], []
  index = {c: i for i, c in enumerate(HAM10000_CLASSES)}
  for line, row in enumerate(rows, start=2):
    dx = (row["dx"] or "").strip()
    if dx not in index:
      raise DatasetError(f"{csv_path}: line {line}: unknown dx {dx!r}; expected one of "
                         f"{', '.join(HAM10000_CLASSES)}")
    ids.append((row["image_id"] or "").strip())
    labels.append(index[dx])
  return ids, np.asarray(labels, np.int32)


def _find_ham_images(data_dir: str, ids: Sequence[str]) -> list[str]:
  """Paths of ``<image_id>.jpg`` in the part folders, DIR, or DIR's subfolders."""
  subdirs = sorted(e.name for e in os.scandir(data_dir)
                   if e.is_dir() and e.name != _CACHE_DIR and e.name not in _HAM_PARTS)
  folders = [os.path.join(data_dir, p) for p in _HAM_PARTS] + [data_dir] + [
      os.path.join(data_dir, s) for s in subdirs]
  found: dict[str, str] = {}
  for folder in folders:
    if not os.path.isdir(folder):
      continue
    for entry in os.scandir(folder):
      stem, ext = os.path.splitext(entry.name)
      if ext.lower() in (".jpg", ".jpeg") and stem not in found:
        found[stem] = entry.path
  paths = []
  for image_id in ids:
    if image_id not in found:
      raise DatasetError(
          f"{os.path.join(data_dir, _HAM_PARTS[0], image_id + '.jpg')}: missing; image "
          f"{image_id!r} of {_HAM_CSV} is in none of {', '.join(_HAM_PARTS)}, {data_dir} "
          f"or its subfolders")
    paths.append(found[image_id])
  return paths


def _decode_ham(path: str, size: int) -> np.ndarray:
  from PIL import Image  # Optional dependency (extra `ham10000`).
  try:
    with Image.open(path) as im:
      im = im.convert("RGB").resize((size, size), Image.BILINEAR)
      return np.asarray(im, np.uint8)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise DatasetError(f"{path}: unreadable image ({type(e).__name__}: "
                       f"{' '.join(str(e).split())})") from None


def _decode_all(paths: Sequence[str], size: int) -> np.ndarray:
  try:
    import PIL  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
  except ImportError:
    raise DatasetError("decoding the HAM10000 JPEGs needs Pillow: "
                       "pip install \"sfljax[ham10000]\" (or pip install pillow)") from None
  from concurrent.futures import ThreadPoolExecutor
  out = np.empty((len(paths), size, size, 3), np.uint8)
  # PIL releases the GIL while decoding and resizing, so threads scale.
  with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
    for i, img in enumerate(pool.map(lambda p: _decode_ham(p, size), paths)):
      out[i] = img
  return out


def _load_cache(cache_path: str, csv_path: str, ids: Sequence[str]):
  try:
    if os.path.getmtime(csv_path) > os.path.getmtime(cache_path):
      return None
    with np.load(cache_path) as f:
      if list(f["image_ids"]) != list(ids):
        return None
      return f["images"], f["labels"]
  except Exception:  # pylint: disable=broad-except
    return None  # Missing, stale or corrupt: rebuild.


def _save_cache(cache_path: str, images: np.ndarray, labels: np.ndarray,
                ids: Sequence[str]) -> None:
  tmp = None
  try:
    os.makedirs(os.path.dirname(cache_path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=os.path.dirname(cache_path))
    with os.fdopen(fd, "wb") as f:
      np.savez(f, images=images, labels=labels, image_ids=np.asarray(ids))
    os.replace(tmp, cache_path)
  except OSError:
    if tmp is not None and os.path.exists(tmp):
      try:
        os.remove(tmp)
      except OSError:
        pass  # Not writable: skip caching silently.


def load_ham10000(data_dir: str, *, seed: int = 0, image_size: int = 64,
                  cache: bool = True) -> Dataset:
  """HAM10000 (10,015 dermatoscopic images, 7 classes) as in the SplitFed paper.

  Expects ``data_dir/HAM10000_metadata.csv`` and the images
  ``<image_id>.jpg`` in ``HAM10000_images_part_1/``, ``HAM10000_images_part_2/``,
  ``data_dir`` itself or any immediate subfolder. Each image is resized to
  ``image_size`` x ``image_size`` (PIL bilinear), scaled to [0, 1] and
  normalised per channel with :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`;
  the label is the index of ``dx`` in :data:`HAM10000_CLASSES`. A seeded
  permutation splits the images 90/10 into train/test (9,013 / 1,002).

  With ``cache``, the decoded uint8 images are kept in
  ``data_dir/.sfljax-cache/ham10000-<image_size>.npz`` and reused until the
  csv changes; a read-only ``data_dir`` just skips caching. Needs Pillow
  (extra ``ham10000``) unless the cache is there.
  """
  csv_path = os.path.join(data_dir, _HAM_CSV)
  if not os.path.isdir(data_dir):
    raise DatasetError(f"{data_dir}: not a folder; pass the folder that holds {_HAM_CSV} and "
                       f"the HAM10000 images")
  ids, labels = _read_ham_csv(csv_path)
  if len(ids) * 9 // 10 == 0:  # The 90/10 split would leave the training set empty.
    raise DatasetError(f"{csv_path}: lists only {len(ids)} image; the 90/10 train/test "
                       f"split needs at least 2 rows")
  cache_path = os.path.join(data_dir, _CACHE_DIR, f"ham10000-{image_size}.npz")
  cached = _load_cache(cache_path, csv_path, ids) if cache else None
  if cached is not None:
    images, labels = cached
  else:
    images = _decode_all(_find_ham_images(data_dir, ids), image_size)
    if cache:
      _save_cache(cache_path, images, labels, ids)
  x = images.astype(np.float32)
  x *= np.float32(1.0 / 255.0)
  x -= np.asarray(IMAGENET_MEAN, np.float32)
  x /= np.asarray(IMAGENET_STD, np.float32)
  y = np.asarray(labels, np.int32)
  n = len(y)
  order = np.random.default_rng(np.random.SeedSequence([seed, _HAM_SPLIT_STREAM])).permutation(n)
  n_train = n * 9 // 10
  train, test = order[:n_train], order[n_train:]
  return Dataset("ham10000", x[train], y[train], x[test], y[test],
                 num_classes=len(HAM10000_CLASSES))


def _augment_params(key, n: int):
  """Per-sample augmentation draws: (hflip [n] bool, vflip [n] bool, angle [n] degrees)."""
  import jax
  k_h, k_v, k_a = jax.random.split(key, 3)
  hflip = jax.random.bernoulli(k_h, 0.5, (n,))
  vflip = jax.random.bernoulli(k_v, 0.5, (n,))
  angle = jax.random.uniform(k_a, (n,), minval=-10.0, maxval=10.0)
  return hflip, vflip, angle


def augment_ham10000(key, images, *, fill=0.0):
  """The HAM10000 train augmentation of the paper's code, in JAX.

  Per sample, independently: horizontal flip (p=0.5), vertical flip (p=0.5),
  then ``Pad(3)``, a bilinear rotation about the centre by an angle uniform
  in [-10, 10] degrees (counter-clockwise for positive angles, like
  torchvision) and a centre crop back to the input size, so the corners that
  rotate in are ``fill``. (The reference pads/fills black before normalising,
  i.e. ``fill = -mean / std`` per channel in normalised units; the default 0
  fills with the mean colour.) Jit- and vmap-compatible.

  Args:
    key: a PRNG key.
    images: [B, H, W, C] float32.
    fill: scalar or [C] value of the pixels rotated in from outside.

  Returns:
    [B, H, W, C] float32.
  """
  import jax
  import jax.numpy as jnp
  from jax.scipy.ndimage import map_coordinates

  images = jnp.asarray(images)
  b, h, w, c = images.shape
  hflip, vflip, angle = _augment_params(key, b)
  fill = jnp.broadcast_to(jnp.asarray(fill, images.dtype), (c,))
  pad = 3
  hp, wp = h + 2 * pad, w + 2 * pad
  cy, cx = (hp - 1) / 2.0, (wp - 1) / 2.0
  rows, cols = jnp.meshgrid(jnp.arange(pad, pad + h, dtype=jnp.float32),
                            jnp.arange(pad, pad + w, dtype=jnp.float32), indexing="ij")

  def one(img, hf, vf, deg):
    img = jnp.where(hf, img[:, ::-1], img)
    img = jnp.where(vf, img[::-1], img)
    padded = jnp.pad(img - fill, ((pad, pad), (pad, pad), (0, 0)))
    theta = jnp.deg2rad(deg)
    cos, sin = jnp.cos(theta), jnp.sin(theta)
    dy, dx = rows - cy, cols - cx
    # Inverse map of a counter-clockwise rotation (rows grow downwards).
    src = jnp.stack([cy + sin * dx + cos * dy, cx + cos * dx - sin * dy])
    rotate = lambda ch: map_coordinates(ch, src, order=1, mode="constant", cval=0.0)
    out = jax.vmap(rotate, in_axes=2, out_axes=2)(padded)
    return out + fill

  return jax.vmap(one)(images, hflip, vflip, angle)
