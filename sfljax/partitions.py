"""Client data partitions: IID and label-skewed (non-IID) splits, and a plot.

A partition assigns every training sample index in ``range(len(labels))`` to
exactly one client; :func:`partition` returns one sorted int64 index array per
client. Each scheme draws from its own seeded stream
(``rng_for(seed, 1, <scheme tag>)``; ``iid`` keeps ``rng_for(seed, 1)``), so a
partition depends only on its arguments.

Schemes (:data:`PARTITIONS`):

``iid``
  A seeded permutation cut into ``num_clients`` shards whose sizes differ by at
  most one (bit-identical to the original ``sfljax.data.partition``).
``dirichlet``
  Label skew (Hsu et al. 2019; FedLab's ``hetero_dir``): for every class ``c``
  draw ``p_c ~ Dir(alpha * 1_K)`` and split the class's shuffled samples among
  the clients by those proportions. Small ``alpha`` gives clients dominated by
  few classes, large ``alpha`` approaches IID. ``min_client_size`` is enforced
  by a deterministic *repair* step, not by redrawing: while a client holds
  fewer than ``min_client_size`` samples, samples move to it from the currently
  largest client (that donor's most frequent class first). The repair never
  fails when ``len(labels) >= num_clients * min_client_size``, which is checked
  up front.
``shards``
  McMahan et al. 2017: indices sorted by label (ties broken by a seeded
  shuffle) are cut into ``num_clients * shards_per_client`` contiguous shards
  and every client gets ``shards_per_client`` random shards. When the shards
  cannot all be equal the larger (one sample longer) shards are spread over the
  clients so that client sizes differ by at most one, as with ``iid``.
``classes``
  Every client sees exactly ``classes_per_client`` distinct classes: the
  clients take consecutive windows of a seeded class permutation repeated
  round-robin (so every class is held by ``floor`` or ``ceil`` of
  ``K * classes_per_client / C`` clients), and each class's shuffled samples
  are split evenly among its holders. Since every sample must be assigned,
  ``num_clients * classes_per_client`` must be at least the number of classes
  present.

Invalid requests raise :class:`PartitionError` (a ``ValueError``) whose
one-line message names the command-line flag to change; its ``flag`` attribute
is that flag (``Config.client_partition`` reports the error under it).
"""

from __future__ import annotations

import operator
import os
from typing import Sequence

import numpy as np

PARTITIONS: tuple[str, ...] = ("iid", "dirichlet", "shards", "classes")

_PARTITION_STREAM = 1  # Same purpose tag as sfljax.data's partition stream.
# Nonzero: SeedSequence pads entropy with zeros, so rng_for(seed, 1, 0) == rng_for(seed, 1).
_SCHEME_TAGS = {"dirichlet": 1, "shards": 2, "classes": 3}


class PartitionError(ValueError):
  """A partition request that cannot be met; the message says which flag to change.

  ``flag`` is the command-line flag the message is about (``"--alpha"``), or
  None when no flag can fix it (e.g. labels of the wrong shape).
  """

  def __init__(self, message: str, flag: str | None = None):
    super().__init__(message)
    self.flag = flag

  def __reduce__(self):
    return type(self), (str(self), self.flag)


def _rng(seed: int, *path: int) -> np.random.Generator:
  # Imported here so that sfljax.data may import this module at its top.
  from sfljax.data import rng_for
  return rng_for(seed, *path)


def _as_int(value, flag: str | None, what: str) -> int:
  msg = f"{what} must be an integer, got {value!r}" + (f" ({flag})" if flag else "")
  if isinstance(value, (bool, np.bool_)):
    raise PartitionError(msg, flag)
  try:
    return operator.index(value)
  except TypeError:
    raise PartitionError(msg, flag) from None


def _class_ids(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Labels as dense class ids 0..C-1 (int64), and the C distinct labels present, sorted."""
  if labels.ndim != 1:
    raise PartitionError(f"labels must be a 1-D array, got shape {labels.shape}")
  classes, ids = np.unique(labels, return_inverse=True)
  return ids.reshape(-1).astype(np.int64), classes


def _by_class(ids: np.ndarray, num_classes: int) -> list[np.ndarray]:
  """Sample indices of each class id, increasing."""
  order = np.argsort(ids, kind="stable")
  return np.split(order, np.cumsum(np.bincount(ids, minlength=num_classes))[:-1])


def partition(labels: np.ndarray, num_clients: int, scheme: str = "iid", *, seed: int = 0,
              alpha: float = 0.5, shards_per_client: int = 2, classes_per_client: int = 2,
              min_client_size: int = 1) -> list[np.ndarray]:
  """Splits sample indices among clients; every sample goes to exactly one.

  Args:
    labels: the training labels, one per sample (any sortable values; only
      ``len(labels)`` matters for ``iid``).
    num_clients: K, the number of clients (``--clients``).
    scheme: one of :data:`PARTITIONS` (``--partition``); see the module doc.
    seed: the run seed; the result is a deterministic function of the arguments.
    alpha: Dirichlet concentration for ``dirichlet`` (``--alpha``), > 0.
    shards_per_client: shards per client for ``shards`` (``--shards-per-client``).
    classes_per_client: distinct classes per client for ``classes``
      (``--classes-per-client``).
    min_client_size: the fewest samples any client may hold
      (``--min-client-size``). ``iid`` and ``shards`` always meet it once
      ``K * min_client_size <= n``; ``dirichlet`` repairs to meet it;
      ``classes`` raises if its split falls short.

  Returns:
    K sorted int64 index arrays whose concatenation is a permutation of
    ``range(len(labels))``.

  Raises:
    PartitionError: the request cannot be met; the message names the flag.
  """
  labels = np.asarray(labels)
  n = len(labels)
  k = _as_int(num_clients, "--clients", "number of clients")
  if k < 1:
    raise PartitionError(f"number of clients must be positive, got {k} (--clients)", "--clients")
  if k > n:
    raise PartitionError(f"{k} clients but only {n} training samples: "
                         f"use at most {n} clients (--clients)", "--clients")
  if scheme not in PARTITIONS:
    raise PartitionError(f"unknown partition {scheme!r}: choose one of "
                         f"{', '.join(PARTITIONS)} (--partition)", "--partition")
  m = _as_int(min_client_size, "--min-client-size", "minimum client size")
  if m < 1:
    raise PartitionError(f"minimum client size must be at least 1, got {m} (--min-client-size)",
                         "--min-client-size")
  if k * m > n:
    raise PartitionError(f"{k} clients of at least {m} samples need {k * m} samples but there "
                         f"are only {n}: lower --min-client-size to at most {n // k} "
                         f"or use fewer --clients", "--min-client-size")

  if scheme == "iid":
    order = _rng(seed, _PARTITION_STREAM).permutation(n)
    return [np.sort(s) for s in np.array_split(order, k)]

  rng = _rng(seed, _PARTITION_STREAM, _SCHEME_TAGS[scheme])
  ids, classes = _class_ids(labels)
  if scheme == "dirichlet":
    owner = _dirichlet(ids, len(classes), k, alpha, m, rng)
  elif scheme == "shards":
    owner = _shards(ids, k, shards_per_client, rng)
  else:
    owner = _classes(ids, classes, k, classes_per_client, m, rng)
  # owner[i] is sample i's client; a stable sort keeps each client's indices increasing.
  order = np.argsort(owner, kind="stable")
  bounds = np.cumsum(np.bincount(owner, minlength=k))[:-1]
  return [p.astype(np.int64) for p in np.split(order, bounds)]


def _dirichlet(ids: np.ndarray, num_classes: int, k: int, alpha, m: int,
               rng: np.random.Generator) -> np.ndarray:
  try:
    a = float(alpha)
  except (TypeError, ValueError):
    raise PartitionError(f"alpha must be a positive number, got {alpha!r} (--alpha)",
                         "--alpha") from None
  if not (np.isfinite(a) and a > 0):
    raise PartitionError(f"alpha must be a positive finite number, got {alpha!r} (--alpha)",
                         "--alpha")
  n = len(ids)
  owner = np.empty(n, np.int64)
  pos = np.empty(n, np.int64)  # Position in the class's shuffled order.
  for idx in _by_class(ids, num_classes):
    idx = rng.permutation(idx)
    p = rng.dirichlet(np.full(k, a))
    p = np.nan_to_num(p, nan=0.0, posinf=0.0, neginf=0.0)
    if p.sum() <= 0:  # Numerical underflow for tiny alpha: one client takes the class.
      p = np.eye(k)[rng.integers(k)]
    cuts = (np.cumsum(p / p.sum()) * len(idx)).astype(np.int64)[:-1]
    cuts = np.clip(cuts, 0, len(idx))
    counts = np.diff(np.concatenate([[0], cuts, [len(idx)]]))
    owner[idx] = np.repeat(np.arange(k), counts)
    pos[idx] = np.arange(len(idx))
  _repair(owner, ids, pos, k, m)
  return owner


def _repair(owner: np.ndarray, ids: np.ndarray, pos: np.ndarray, k: int, m: int) -> None:
  """Moves samples, in place, from the largest clients to those below ``m``.

  Deterministic. Terminates with every client at ``>= m`` whenever
  ``len(owner) >= k * m``: the largest client then always holds more than ``m``
  samples while some client is short.
  """
  sizes = np.bincount(owner, minlength=k)
  for r in range(k):
    while sizes[r] < m:
      donor = int(np.argmax(sizes))  # Lowest index among ties.
      t = int(min(m - sizes[r], sizes[donor] - m))
      assert t > 0, "unreachable when n >= K * min_client_size"
      mine = np.flatnonzero(owner == donor)
      class_count = np.bincount(ids[mine])
      # The donor's most frequent class first, the tail of its shuffled order first.
      take = mine[np.lexsort((-pos[mine], -class_count[ids[mine]]))[:t]]
      owner[take] = r
      sizes[donor] -= t
      sizes[r] += t


def _shards(ids: np.ndarray, k: int, shards_per_client, rng: np.random.Generator) -> np.ndarray:
  s = _as_int(shards_per_client, "--shards-per-client", "shards per client")
  n = len(ids)
  if s < 1:
    raise PartitionError(f"shards per client must be at least 1, got {s} (--shards-per-client)",
                         "--shards-per-client")
  total = k * s
  if total > n:
    raise PartitionError(f"{k} clients x {s} shards = {total} shards but only {n} samples: "
                         f"lower --shards-per-client to at most {n // k} or use fewer --clients",
                         "--shards-per-client")
  shuffled = rng.permutation(n)
  by_label = shuffled[np.argsort(ids[shuffled], kind="stable")]
  # Shard j (in label order) belongs to client slot_owner[j].
  slot_owner = np.empty(total, np.int64)
  slot_owner[rng.permutation(total)] = np.repeat(np.arange(k), s)
  # Sizes q or q + 1; client c's first e_c shards (in label order) are the longer
  # ones, with e_c in {r // k, ceil(r / k)} <= s, so client sizes differ by <= 1.
  q, r = divmod(n, total)
  extra = r // k + (np.arange(k) < r % k)
  rank = np.empty(total, np.int64)  # Rank of shard j among its client's s shards.
  rank[np.argsort(slot_owner, kind="stable")] = np.arange(total) % s
  sizes = q + (rank < extra[slot_owner])
  owner = np.empty(n, np.int64)
  owner[by_label] = np.repeat(slot_owner, sizes)
  return owner


def _classes(ids: np.ndarray, classes: np.ndarray, k: int, classes_per_client, m: int,
             rng: np.random.Generator) -> np.ndarray:
  num_classes = len(classes)
  cpc = _as_int(classes_per_client, "--classes-per-client", "classes per client")
  if cpc < 1:
    raise PartitionError(f"classes per client must be at least 1, got {cpc} "
                         f"(--classes-per-client)", "--classes-per-client")
  if cpc > num_classes:
    raise PartitionError(f"{cpc} classes per client but the labels hold only {num_classes} "
                         f"classes: lower --classes-per-client to at most {num_classes}",
                         "--classes-per-client")
  if k * cpc < num_classes:
    need = -(-num_classes // cpc)
    raise PartitionError(f"{k} clients x {cpc} classes cannot cover all {num_classes} classes, "
                         f"so some samples would have no client: raise --classes-per-client "
                         f"to at least {-(-num_classes // k)} or use at least {need} --clients",
                         "--classes-per-client")
  perm = rng.permutation(num_classes)
  # Client c holds perm[(c * cpc + i) % C] for i < cpc: distinct because cpc <= C.
  held = perm[(np.arange(k)[:, None] * cpc + np.arange(cpc)[None, :]) % num_classes]
  owner = np.empty(len(ids), np.int64)
  for c, idx in enumerate(_by_class(ids, num_classes)):
    holders = np.flatnonzero((held == c).any(axis=1))
    if len(idx) < len(holders):
      raise PartitionError(f"class {classes[c].item()!r} has {len(idx)} samples but "
                           f"{len(holders)} clients hold it: lower --classes-per-client or "
                           f"use fewer --clients", "--classes-per-client")
    pieces = np.array_split(rng.permutation(idx), len(holders))
    for h, piece in zip(holders, pieces):
      owner[piece] = h
  smallest = int(np.bincount(owner, minlength=k).min())
  if smallest < m:
    raise PartitionError(f"the classes partition gives a client only {smallest} samples, "
                         f"fewer than {m}: lower --min-client-size, use fewer --clients or "
                         f"more --classes-per-client", "--min-client-size")
  return owner


def label_counts(labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int) -> np.ndarray:
  """``[K, num_classes]`` int64 matrix: how many samples of each class each client holds.

  ``labels`` must be integers in ``[0, num_classes)``.
  """
  labels = np.asarray(labels)
  c = _as_int(num_classes, None, "number of classes")
  if labels.size and not np.array_equal(labels, np.round(labels)):
    raise PartitionError("labels must be integers for label counts")
  labels = labels.astype(np.int64)
  if labels.size and (labels.min() < 0 or labels.max() >= c):
    raise PartitionError(f"labels must lie in [0, {c}), got [{labels.min()}, {labels.max()}]")
  out = np.zeros((len(parts), c), np.int64)
  for k, p in enumerate(parts):
    out[k] = np.bincount(labels[np.asarray(p, np.int64)], minlength=c)
  return out


def plot_partition(labels: np.ndarray, parts: Sequence[np.ndarray], path, *,
                   num_classes: int | None = None, title: str | None = None) -> str:
  """Saves a PNG of each client's label distribution; returns the path.

  Up to 50 clients: a stacked horizontal bar per client, one coloured segment
  per class, with a legend. More clients: a client x class heatmap of counts.
  Uses matplotlib's object API with the Agg canvas (no pyplot, no global
  backend change). The file is written to a temporary file in the target
  directory (created if missing) and moved into place with ``os.replace``.
  """
  try:
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
  except ImportError:
    raise PartitionError('plotting needs matplotlib: pip install "sfljax[plot]"') from None
  labels = np.asarray(labels)
  if num_classes is None:
    num_classes = int(labels.max()) + 1 if labels.size else 1
  counts = label_counts(labels, parts, num_classes)
  k, c = counts.shape
  title = title or f"Label distribution over {k} clients"

  if k <= 50:
    fig = Figure(figsize=(8, max(2.5, 0.3 * k + 1.5)))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    cmap = matplotlib.colormaps["tab10" if c <= 10 else "tab20" if c <= 20 else "viridis"]
    colors = [cmap(i) for i in range(c)] if c <= 20 else [cmap(i / max(c - 1, 1))
                                                          for i in range(c)]
    left = np.zeros(k)
    rows = np.arange(k)
    for j in range(c):
      ax.barh(rows, counts[:, j], left=left, color=colors[j], label=str(j), height=0.8)
      left += counts[:, j]
    ax.set_yticks(rows)
    ax.set_yticklabels([str(i) for i in rows])
    ax.invert_yaxis()
    ax.set_xlabel("samples")
    ax.set_ylabel("client")
    ax.legend(title="class", loc="upper left", bbox_to_anchor=(1.01, 1.0),
              ncol=max(1, -(-c // 25)), fontsize="small")
  else:
    fig = Figure(figsize=(max(6.0, min(20.0, 0.08 * k + 2)), max(3.0, min(12.0, 0.3 * c + 1.5))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(counts.T, aspect="auto", interpolation="nearest", cmap="viridis",
                   origin="lower")
    fig.colorbar(im, ax=ax, label="samples")
    if c <= 20:
      ax.set_yticks(np.arange(c))
    ax.set_xlabel("client")
    ax.set_ylabel("class")
  ax.set_title(title)

  from sfljax import rundir
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  return rundir.write_file_atomic(
      path, lambda f: fig.savefig(f, format="png", dpi=100, bbox_inches="tight"))
