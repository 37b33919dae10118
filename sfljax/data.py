"""Datasets, client partitions and per-round batch schedules.

Everything here runs on the host in NumPy. A dataset is a frozen :class:`Dataset`
of NHWC float32 images and int32 labels. A partition assigns every training
sample to exactly one client. :class:`ClientData` stacks the clients' shards
into fixed-shape padded arrays (``[K, N_max, ...]``) so that all clients of a
round run in one compiled program; ``counts`` holds the true ``n_k``.

:func:`batch_schedule` draws, for one round, the order in which every client
visits its samples. It depends only on ``(seed, round, client, epoch)`` and
the client's sample count, so two algorithms with the same seed and the same
client data see the same batches in the same order.

:func:`check_dataset` and :func:`check_parts` refuse user-supplied data or
partitions that cannot train (labels out of range, clients sharing samples,
...) with a one-line :class:`ValueError`.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Sequence

import numpy as np

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion_mnist", "cifar10", "ham10000")
EMBEDDED_DATASETS: tuple[str, ...] = ("digits",)
"""The datasets that ship with sfljax: they read no ``data_dir``."""
PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "shards", "classes")

# Purpose tags that keep the seeded random streams of different jobs apart.
_SPLIT_STREAM = 0
_PARTITION_STREAM = 1
_BATCH_STREAM = 2
_ORDER_STREAM = 3         # client orders (sfljax.train)
_PARTICIPATION_STREAM = 4


def rng_for(seed: int, *path: int) -> np.random.Generator:
  """A NumPy generator for one purpose, derived from the run seed and a path."""
  return np.random.default_rng(np.random.SeedSequence([int(seed), *map(int, path)]))


@dataclasses.dataclass(frozen=True)
class Dataset:
  """Train and test images (NHWC float32, normalised) and int32 labels."""
  name: str
  x_train: np.ndarray
  y_train: np.ndarray
  x_test: np.ndarray
  y_test: np.ndarray
  num_classes: int

  @property
  def input_shape(self) -> tuple[int, int, int]:
    return tuple(self.x_train.shape[1:])


def _count(n: int, what: str, plural: str | None = None) -> str:
  """'1 sample', '3 samples'."""
  return f"{n} " + (what if n == 1 else plural or what + "s")


def check_dataset(ds: Dataset) -> Dataset:
  """Refuses a dataset that cannot train; returns it unchanged if it can.

  Checks that ``num_classes`` is an integer of at least 2; that each split's
  images are rank-4 NHWC with nonzero H, W, C and its labels a 1-D integer
  array of one label per image; that neither split is empty; that every label
  lies in ``[0, num_classes)``; that train and test images have the same
  ``(H, W, C)``; and that every image value is finite. A failure raises
  :class:`ValueError` with a one-line message that names the offending
  attribute (``dataset.y_train`` ...) and how to fix it, e.g.
  ``dataset.y_train: label 12 is outside [0, 10) for 3 samples; relabel to
  0..num_classes-1 or raise num_classes``. Meant for user-supplied data: a
  label outside the range would otherwise train to NaN without a word.
  """
  c = ds.num_classes
  if isinstance(c, (bool, np.bool_)) or not isinstance(c, (int, np.integer)):
    raise ValueError(f"dataset.num_classes: {c!r} is not an integer; give the number "
                     "of classes as an int")
  c = int(c)
  if c < 2:
    raise ValueError(f"dataset.num_classes: {c} is fewer than 2; a classifier needs at "
                     "least two classes")
  for split in ("train", "test"):
    x = np.asarray(getattr(ds, f"x_{split}"))
    y = np.asarray(getattr(ds, f"y_{split}"))
    if x.ndim != 4 or 0 in x.shape[1:]:
      hint = " (add a channel axis: x[..., None])" if x.ndim == 3 else ""
      raise ValueError(f"dataset.x_{split}: images must be rank-4 NHWC [N, H, W, C] with "
                       f"nonzero H, W, C, got shape {x.shape}{hint}")
    if y.ndim != 1:
      raise ValueError(f"dataset.y_{split}: labels must be a 1-D array [N] of class ids, "
                       f"got shape {y.shape}; for one-hot labels pass y.argmax(-1)")
    if len(y) != len(x):
      raise ValueError(f"dataset.y_{split}: {_count(len(y), 'label')} for "
                       f"{_count(len(x), 'image')} in dataset.x_{split}; give exactly one "
                       "label per image")
    if len(x) == 0:
      raise ValueError(f"dataset.x_{split}: the {split} set is empty; it needs at least "
                       "one sample")
    if not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"dataset.y_{split}: labels have dtype {y.dtype}, not an integer "
                       "dtype; pass class ids 0..num_classes-1 as integers "
                       "(e.g. y.astype(np.int32))")
    bad = (y < 0) | (y >= c)
    if bad.any():
      values, counts = np.unique(y[bad], return_counts=True)
      i = int(np.argmax(counts))
      more = (f" ({_count(int(bad.sum()), 'sample')} in all carry {len(values)} "
              f"out-of-range labels from {values[0]} to {values[-1]})" if len(values) > 1 else "")
      raise ValueError(f"dataset.y_{split}: label {values[i]} is outside [0, {c}) for "
                       f"{_count(int(counts[i]), 'sample')}{more}; relabel to "
                       "0..num_classes-1 or raise num_classes")
  train_shape, test_shape = np.shape(ds.x_train)[1:], np.shape(ds.x_test)[1:]
  if train_shape != test_shape:
    raise ValueError(f"dataset.x_test: test images have shape (H, W, C) = {test_shape} but "
                     f"train images {train_shape}; resize both splits to the same shape")
  for split in ("train", "test"):
    x = np.asarray(getattr(ds, f"x_{split}"))
    if not np.issubdtype(x.dtype, np.number) or np.issubdtype(x.dtype, np.complexfloating):
      raise ValueError(f"dataset.x_{split}: images have dtype {x.dtype}, not a real number "
                       "dtype; pass float32 pixel values")
    finite = np.isfinite(x)
    if not finite.all():
      per_sample = (~finite).reshape(len(x), -1).any(axis=1)
      raise ValueError(f"dataset.x_{split}: NaN or inf values in "
                       f"{_count(int(per_sample.sum()), 'image')} (first: sample "
                       f"{int(np.argmax(per_sample))}); drop or repair those samples")
  return ds


def check_parts(parts: Sequence[np.ndarray], num_samples: int) -> list[np.ndarray]:
  """Refuses a client partition that cannot train; returns it as int64 arrays.

  Each part (one per client, client ``k`` = ``parts[k]``) must be a non-empty
  1-D integer array of training-sample indices in ``[0, num_samples)`` with no
  repeats, and no index may belong to two clients. Samples left out of every
  part are allowed (they are simply not trained on). A failure raises
  :class:`ValueError` with a one-line message that starts with ``parts: ``,
  names the client(s) and an offending index, and says how to fix it.
  """
  num_samples = int(num_samples)
  parts = [np.asarray(p) for p in parts]
  if not parts:
    raise ValueError("parts: no clients; give at least one index array")
  for k, p in enumerate(parts):
    if p.ndim != 1:
      raise ValueError(f"parts: client {k}'s part has shape {p.shape}; each part must be a "
                       "1-D array of sample indices")
    if p.size == 0:
      raise ValueError(f"parts: client {k} has no samples; give every client at least one "
                       "sample or use fewer clients")
    if not np.issubdtype(p.dtype, np.integer):
      hint = " (a boolean mask? use np.flatnonzero(mask))" if p.dtype == bool else ""
      raise ValueError(f"parts: client {k}'s indices have dtype {p.dtype}, not an integer "
                       f"dtype{hint}; pass sample indices as integers")
    out = (p < 0) | (p >= num_samples)
    if out.any():
      raise ValueError(f"parts: client {k} has index {p[out][0]} outside [0, {num_samples}) "
                       f"({_count(int(out.sum()), 'such index', 'such indices')}); "
                       "indices must be positions in the training set")
    values, counts = np.unique(p, return_counts=True)
    if (counts > 1).any():
      rep = counts > 1
      raise ValueError(f"parts: client {k} lists sample {values[rep][0]} more than once "
                       f"({_count(int(rep.sum()), 'repeated sample')}); each sample may "
                       "appear once per client")
  parts = [p.astype(np.int64) for p in parts]
  idx = np.concatenate(parts)
  owner = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
  order = np.argsort(idx, kind="stable")
  idx, owner = idx[order], owner[order]
  shared = idx[1:] == idx[:-1]   # within-part repeats are refused above
  if shared.any():
    i = int(np.argmax(shared))
    n_shared = len(np.unique(idx[1:][shared]))
    raise ValueError(f"parts: sample {idx[i]} is in both client {owner[i]} and client "
                     f"{owner[i + 1]} ({_count(n_shared, 'shared sample')} in all); "
                     "assign every sample to one client only")
  return parts


def _resize(images: np.ndarray, size: int) -> np.ndarray:
  """Bilinear resize of [N, h, w] images to [N, size, size] (antialiased)."""
  import jax  # Local import: keeps `import sfljax.data` light.
  n = images.shape[0]
  out = jax.image.resize(images.astype(np.float32), (n, size, size), "bilinear")
  return np.asarray(out, np.float32)


def load_digits(seed: int = 0, *, image_size: int = 28,
                test_fraction: float = 0.2) -> Dataset:
  """scikit-learn's handwritten digits (1,797 images of 8x8, 10 classes).

  The data ship with sfljax (``sfljax/data/digits.npz``, a copy of the UCI
  optical-digits test set as bundled by scikit-learn), so no download is
  needed. Images are scaled to [0, 1], resized to ``image_size`` (28 by
  default so the paper's LeNet applies unchanged), standardised with the
  training set's mean and std, and split train/test with the seed (80/20:
  1,438 / 359 samples).
  """
  path = os.path.join(os.path.dirname(__file__), "data", "digits.npz")
  with np.load(path) as f:
    images = f["images"].astype(np.float32) / 16.0
    labels = f["labels"].astype(np.int32)
  if image_size != images.shape[1]:
    images = _resize(images, image_size)
  images = images[..., None]
  order = rng_for(seed, _SPLIT_STREAM).permutation(len(labels))
  n_test = int(round(test_fraction * len(labels)))
  test, train = order[:n_test], order[n_test:]
  mean, std = images[train].mean(), images[train].std()
  images = (images - mean) / std
  return Dataset("digits", images[train], labels[train], images[test],
                 labels[test], num_classes=10)


def _has_idx(data_dir: str | None) -> bool:
  return bool(data_dir) and any(
      os.path.exists(os.path.join(data_dir, "train-images-idx3-ubyte" + ext)) for ext in ("", ".gz"))


def load_dataset(name: str, *, seed: int = 0, data_dir: str | None = None,
                 image_size: int | None = None) -> Dataset:
  """Loads a dataset by name (see :data:`DATASETS`).

  * ``digits``: embedded, no ``data_dir`` needed.
  * ``mnist`` / ``fashion_mnist``: the IDX files in ``data_dir`` if it holds
    them (e.g. Debian's ``/usr/share/datasets/fashion-mnist``), else TFDS.
  * ``cifar10``: TFDS (``data_dir`` = the TFDS data dir, default TFDS's own).
  * ``ham10000``: the metadata csv and JPEG folders in ``data_dir``.

  Problems raise :class:`sfljax.loaders.DatasetError` with a one-line message;
  a ``data_dir`` given for an embedded dataset (:data:`EMBEDDED_DATASETS`) is
  refused rather than ignored.

  The images come 64-byte aligned (:func:`aligned`), so that on CPU the
  device reads them where they are (:class:`ClientData`).
  """
  ds = _load(name, seed=seed, data_dir=data_dir, image_size=image_size)
  return dataclasses.replace(ds, x_train=aligned(ds.x_train), x_test=aligned(ds.x_test))


def _load(name, *, seed, data_dir, image_size) -> Dataset:
  if name in EMBEDDED_DATASETS and data_dir is not None:
    from sfljax import loaders
    raise loaders.DatasetError(f"{name} ships with sfljax and reads no folder; drop "
                               f"data_dir (--data-dir)")
  if name == "digits":
    return load_digits(seed, image_size=image_size or 28)
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
  from sfljax import loaders
  if name == "ham10000":
    if not data_dir:
      raise loaders.DatasetError("ham10000 needs --data-dir: the folder with "
                                 "HAM10000_metadata.csv and the image folders")
    return loaders.load_ham10000(data_dir, seed=seed, image_size=image_size or 64)
  if name in loaders.IDX_DATASETS and _has_idx(data_dir):
    return loaders.load_idx(name, data_dir)
  return loaders.load_tfds(name, data_dir)


def augmentation(name: str):
  """The training augmentation ``fn(key, images) -> images`` of a dataset, or None."""
  if name == "ham10000":
    from sfljax import loaders
    return loaders.augment_ham10000
  return None


def partition(labels: np.ndarray, num_clients: int, scheme: str = "iid",
              *, seed: int = 0, **options) -> list[np.ndarray]:
  """Splits sample indices among clients; every sample goes to exactly one.

  ``iid`` cuts a seeded permutation into shards whose sizes differ by at most
  one; ``dirichlet``, ``shards`` and ``classes`` skew the labels (options
  ``alpha``, ``shards_per_client``, ``classes_per_client``,
  ``min_client_size``): see :mod:`sfljax.partitions`.
  """
  from sfljax import partitions
  return partitions.partition(labels, num_clients, scheme, seed=seed, **options)


HOST_ALIGNMENT = 64
"""Byte alignment of the host arrays the device reads (the loaded images, the
clients' padded arrays): on CPU ``jax.device_put`` takes a 64-byte-aligned
NumPy array without copying it (the device array uses the host buffer), so
the samples exist once in memory, not twice."""


def aligned_zeros(shape, dtype, alignment: int = HOST_ALIGNMENT) -> np.ndarray:
  """``np.zeros(shape, dtype)`` whose buffer starts on an ``alignment``-byte
  boundary (NumPy itself guarantees 16)."""
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  raw = np.zeros(nbytes + alignment, np.uint8)
  start = (-raw.ctypes.data) % alignment
  return raw[start:start + nbytes].view(dtype).reshape(shape)


def aligned(a: np.ndarray, alignment: int = HOST_ALIGNMENT) -> np.ndarray:
  """``a`` itself if it is C-contiguous and starts on an ``alignment``-byte
  boundary, else an aligned copy."""
  a = np.asarray(a)
  if a.flags.c_contiguous and a.ctypes.data % alignment == 0:
    return a
  out = aligned_zeros(a.shape, a.dtype, alignment)
  out[...] = a
  return out


@dataclasses.dataclass(frozen=True)
class ClientData:
  """Clients' shards, as rows of one set of samples.

  images: [N, H, W, C], the samples the clients draw from (e.g. the whole
  training set, not copied), and labels: [N] int32 (a copy); rows: [K, N_max] int32,
  client k's r-th sample is ``images[rows[k, r]]``; counts: [K] true sample
  counts n_k. Rows at or beyond ``counts[k]`` are padding (they point at
  sample 0) and never enter a batch.

  ``x`` [K, N_max, H, W, C] and ``y`` [K, N_max]: the shards padded to a
  common length (zeros past ``counts[k]``), 64-byte aligned
  (:func:`aligned_zeros`); a copy of the samples, made on first use (a
  device mesh shards it by client; one device reads ``images`` through
  ``rows`` and never makes it).
  """
  images: np.ndarray
  labels: np.ndarray
  rows: np.ndarray
  counts: np.ndarray

  @property
  def num_clients(self) -> int:
    return int(self.counts.shape[0])

  @functools.cached_property
  def x(self) -> np.ndarray:
    return self._padded(self.images)

  @functools.cached_property
  def y(self) -> np.ndarray:
    return self._padded(self.labels)

  def _padded(self, a: np.ndarray) -> np.ndarray:
    out = aligned_zeros(self.rows.shape + a.shape[1:], a.dtype)
    for k, n in enumerate(self.counts):
      out[k, :n] = a[self.rows[k, :n]]
    return out

  @classmethod
  def from_partition(cls, x: np.ndarray, y: np.ndarray,
                     parts: Sequence[np.ndarray]) -> "ClientData":
    counts = np.array([len(p) for p in parts], np.int32)
    rows = aligned_zeros((len(parts), int(counts.max())), np.int32)
    for k, p in enumerate(parts):
      rows[k, :len(p)] = p
    labels = aligned_zeros(len(y), np.int32)   # Our own copy (small): y stays the caller's.
    labels[:] = y
    return cls(x, labels, rows, counts)

  @classmethod
  def pooled(cls, x: np.ndarray, y: np.ndarray,
             parts: Sequence[np.ndarray]) -> "ClientData":
    """All clients' data as one client (centralized training), in shard order."""
    return cls.from_partition(x, y, [np.concatenate(list(parts))])


def steps_per_epoch(counts: np.ndarray, batch_size: int) -> int:
  """Steps every client takes per local epoch (the largest client's count)."""
  return int(-(-int(np.max(counts)) // batch_size))


def batch_schedule(counts: np.ndarray, batch_size: int, *, seed: int,
                   round_index: int, local_epochs: int = 1,
                   client_ids: Sequence[int] | None = None,
                   steps: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Per-client sample order for one round.

  Returns ``idx`` and ``mask``, both ``[K, local_epochs * S, batch_size]``
  with ``S = ceil(max_k n_k / batch_size)``, or ``S = steps`` if given (at
  least that: with partial participation ``steps`` comes from all clients so
  that every round has the same shapes). ``client_ids`` names the clients
  whose ``counts`` are given (default ``range(K)``). Client k's epoch e visits a
  permutation of ``range(n_k)`` drawn from ``(seed, round, client id, e)``, in
  consecutive batches (the last one partial); steps past its data are fully
  masked and must leave its model unchanged.
  """
  counts = np.asarray(counts)
  k_total = len(counts)
  ids = range(k_total) if client_ids is None else client_ids
  s = steps_per_epoch(counts, batch_size)
  if steps is not None:
    if steps < s:
      raise ValueError(f"steps={steps} is fewer than the {s} the largest client needs")
    s = steps
  idx = np.zeros((k_total, local_epochs * s * batch_size), np.int32)
  mask = np.zeros((k_total, local_epochs * s * batch_size), bool)
  for k, cid in enumerate(ids):
    n = int(counts[k])
    for e in range(local_epochs):
      perm = rng_for(seed, _BATCH_STREAM, round_index, cid, e).permutation(n)
      start = e * s * batch_size
      idx[k, start:start + n] = perm
      mask[k, start:start + n] = True
  shape = (k_total, local_epochs * s, batch_size)
  return idx.reshape(shape), mask.reshape(shape)


def sample_clients(num_clients: int, fraction: float, *, seed: int,
                   round_index: int, strata: int = 1) -> np.ndarray | None:
  """The round's participants: ``M = max(1, round(fraction * K))`` distinct
  client ids in increasing order, drawn from ``(seed, round)`` alone (so a
  resumed run draws the same ones); None when every client takes part.

  ``strata`` S > 1 (the clients sharded over S devices): stratified, the K
  clients are S contiguous blocks of K/S (block d = the clients of device d)
  and M/S participants are drawn from every block, without replacement, one
  block after another from one generator of ``(seed, round, S)``. K and M
  must be divisible by S (:func:`check_strata`). ``strata=1`` is the plain
  draw above.
  """
  if fraction >= 1.0:
    return None
  m = num_participants(num_clients, fraction)
  if strata == 1:
    ids = rng_for(seed, _PARTICIPATION_STREAM, round_index).choice(num_clients, m, replace=False)
    return np.sort(ids).astype(np.int32)
  check_strata(num_clients, fraction, strata)
  block, per = num_clients // strata, m // strata
  rng = rng_for(seed, _PARTICIPATION_STREAM, round_index, strata)
  ids = [d * block + np.sort(rng.choice(block, per, replace=False)) for d in range(strata)]
  return np.concatenate(ids).astype(np.int32)


def num_participants(num_clients: int, fraction: float) -> int:
  """Clients per round for a participation fraction (at least one)."""
  return num_clients if fraction >= 1.0 else max(1, int(round(fraction * num_clients)))


def check_strata(num_clients: int, fraction: float, strata: int, what: str = "strata") -> None:
  """Raises a one-line ValueError (starting ``--client-fraction: ``) unless the
  round's participants split evenly into ``strata`` groups (``what``: how the
  message names them, e.g. "devices"), naming the fractions nearest to
  ``fraction`` that do. The K clients themselves must split too (else a
  ValueError starting ``--clients: ``)."""
  if (isinstance(strata, bool) or not isinstance(strata, (int, np.integer))
      or strata < 1):
    raise ValueError(f"strata: must be a positive integer, got {strata!r}")
  if num_clients % strata:
    raise ValueError(f"--clients: {num_clients} clients cannot be split evenly over "
                     f"{strata} {what}: use a number of clients divisible by {strata}")
  m = num_participants(num_clients, fraction)
  if m % strata == 0:
    return
  below, above = m // strata * strata, -(-m // strata) * strata
  near = [v for v in (below, above) if strata <= v <= num_clients]
  hint = " or ".join(f"{v / num_clients:.6g} ({v} clients)" for v in near)
  raise ValueError(f"--client-fraction: {fraction:g} of {num_clients} clients gives {m} "
                   f"participants per round, which do not split evenly over {strata} {what} "
                   f"(each draws the same number from its own {num_clients // strata} "
                   f"clients): use a fraction giving a multiple of {strata} participants, "
                   f"e.g. {hint}")
