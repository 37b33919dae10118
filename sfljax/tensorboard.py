"""TensorBoard event files beside ``metrics.jsonl``: one scalar per metric per round.

>>> with ScalarLog(out_dir) as tb:          # doctest: +SKIP
...   exp.run(callback=tb.write)

then ``tensorboard --logdir runs/``: every run directory is one run in TensorBoard.

Written with `tensorboardX <https://github.com/lanpa/tensorboardX>`_, which needs only
numpy, packaging and protobuf. ``flax.metrics.tensorboard`` was not used because it
imports TensorFlow, far too heavy a dependency for writing a few scalars (and
``tensorboard`` itself is needed only to *view* the files, not here). tensorboardX is
imported when a :class:`ScalarLog` is made, never by ``import sfljax``, and without
PyTorch (see :func:`_summary_writer`).

Tags (:func:`tag_for`), with a round's metrics (``sfljax.train.METRICS``) as input:

===============================  ===============================
metric key                       TensorBoard tag
===============================  ===============================
``round``                        not a scalar: the step of every value
``<name>_loss``                  ``loss/<name>``  (loss/train, loss/test)
``<name>_accuracy``              ``accuracy/<name>``  (accuracy/train, accuracy/test,
                                 accuracy/client_test)
``bytes_<kind>``                 ``bytes/<kind>``  (bytes/client_to_server,
                                 bytes/server_to_client, bytes/smashed, ...)
``seconds``, ``<name>_seconds``  ``time/<key>``  (time/seconds: the round's wall
                                 clock; time/train_seconds, time/eval_seconds)
``participants``, ``reported``   ``clients/participants``, ``clients/reported``
``epsilon``                      ``privacy/epsilon``
``leak_<name>``                   ``leakage/<name>``  (leakage/dcor, leakage/label_auc,
                                 leakage/inversion_ssim, ...)
anything else                    ``other/<key>``
===============================  ===============================

Only finite real numbers are written (Python or NumPy ints and floats, 0-d arrays);
lists (``client_train_loss``...), ``None``, bools, strings and NaN/inf are skipped.
Values are stored as float32 (TensorBoard's ``simple_value``).

Resuming: each :class:`ScalarLog` adds a *new* event file to the directory (names
never collide, even within one second) and never touches older ones; TensorBoard
shows the union of all event files in a directory as one run. Pass
``after_round=<the checkpoint's round>`` to the resumed run's log: it writes only
rounds after that one, so rounds up to the checkpoint come from the older file(s)
and later ones from the new file. Rounds past the checkpoint that the interrupted
run had logged before it died are superseded, not doubled: the new file starts with
a "session restarted at step after_round + 1" marker (SessionLog START; only when
``after_round`` > 0, never in a fresh run's file), on which
TensorBoard's Python loader drops older values from that step on; TensorBoard's Rust
data server (``--load_fast``) keeps the newest value when a series' steps go back.
The curves then show each round once.
"""

from __future__ import annotations

import glob
import math
import numbers
import os
import time
from typing import Any, Mapping

EVENT_FILE_GLOB = "events.out.tfevents.*"
"""The names of TensorBoard event files (e.g. to remove them with ``--overwrite``)."""

_SPECIAL_TAGS = {"participants": "clients/participants", "reported": "clients/reported",
                 "failed_clients": "clients/failed", "nonfinite_clients": "clients/nonfinite",
                 "epsilon": "privacy/epsilon", "client_epsilon": "privacy/client_epsilon",
                 "dp_overflow_steps": "privacy/dp_overflow_steps"}


def tag_for(key: str) -> str | None:
  """The TensorBoard tag of a metric key (None for ``round``, which is the step)."""
  if key == "round":
    return None
  if key in _SPECIAL_TAGS:
    return _SPECIAL_TAGS[key]
  if key == "seconds" or key.endswith("_seconds"):
    return "time/" + key
  if key.startswith("bytes_") and len(key) > len("bytes_"):
    return "bytes/" + key[len("bytes_"):]
  if key.startswith("leak_") and len(key) > len("leak_"):
    return "leakage/" + key[len("leak_"):]
  for suffix, group in (("_loss", "loss"), ("_accuracy", "accuracy")):
    if key.endswith(suffix) and len(key) > len(suffix):
      return f"{group}/{key[:-len(suffix)]}"
  return "other/" + key


def scalar_value(value: Any) -> float | None:
  """The value as a finite float, or None if it is not a finite real number (lists,
  None, bools, strings, NaN and inf give None)."""
  kind = getattr(getattr(value, "dtype", None), "kind", None)   # NumPy and jax values.
  if isinstance(value, bool) or kind == "b":
    return None
  if not isinstance(value, numbers.Real) and (getattr(value, "shape", None) != ()
                                              or kind not in ("i", "u", "f")):
    return None   # Neither a real number nor a 0-d numeric array.
  try:
    x = float(value)
  except (TypeError, ValueError, OverflowError):
    return None
  return x if math.isfinite(x) else None


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
  """The ``{tag: value}`` that :meth:`ScalarLog.write` writes for one round's metrics."""
  out = {}
  for key in sorted(metrics):
    tag, x = tag_for(key), scalar_value(metrics[key])
    if tag is not None and x is not None:
      out[tag] = x
  return out


def event_files(directory: str) -> list[str]:
  """The event files in ``directory``, oldest first (the order TensorBoard reads them)."""
  return sorted(glob.glob(os.path.join(glob.escape(directory), EVENT_FILE_GLOB)))


def _summary_writer():
  """tensorboardX's SummaryWriter, imported without PyTorch.

  tensorboardX imports torch when it is installed (only to accept torch
  tensors, which sfljax never passes), which costs seconds at every run's
  start; a ``None`` entry in ``sys.modules`` for the duration of the import
  makes its ``try: import torch`` fall back to numpy. A torch already
  imported is left alone, and the entry is removed right after, so importing
  torch later works as usual.
  """
  import sys
  blocked = "torch" not in sys.modules
  if blocked:
    sys.modules["torch"] = None   # type: ignore[assignment]
  try:
    from tensorboardX import SummaryWriter
  finally:
    if blocked and sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter


class ScalarLog:
  """Writes each round's scalar metrics to a new TensorBoard event file in ``directory``.

  Args:
    directory: where the event file goes (created if missing); normally the run's
      directory, beside ``metrics.jsonl``.
    after_round: the round a resumed run starts from (its checkpoint's round; 0, the
      default, for a fresh run). :meth:`write` skips rounds ``<= after_round``, and
      when it is above 0 the file starts with a restart marker at step
      ``after_round + 1`` so TensorBoard discards the steps from there on that older
      files in the directory hold. (A fresh run writes no marker: a resumed run that
      forgot ``after_round`` cannot hide the rounds logged before it.)

  :meth:`write` flushes the file after every round, so a killed run's event file holds
  every round that ``metrics.jsonl`` does. Use it as a context manager, or call
  :meth:`close`.
  """

  def __init__(self, directory: str | os.PathLike, *, after_round: int = 0):
    if isinstance(after_round, bool) or not isinstance(after_round, numbers.Integral) \
        or after_round < 0:
      raise ValueError(f"after_round must be an int >= 0, got {after_round!r}")
    SummaryWriter = _summary_writer()
    self.directory = os.fspath(directory)
    self.after_round = int(after_round)
    os.makedirs(self.directory, exist_ok=True)
    before = set(event_files(self.directory))
    # tensorboardX names the file events.out.tfevents.<seconds>.<host><suffix> and opens
    # it with "wb": the nanosecond suffix keeps two logs started within one second (a
    # quick resume) from overwriting each other, and sorts them in the order made.
    purge_step = self.after_round + 1 if self.after_round else None
    self._writer = SummaryWriter(logdir=self.directory, purge_step=purge_step, flush_secs=30,
                                 filename_suffix=f".{time.time_ns()}.{os.getpid()}")
    self._writer.flush()   # The file and its restart marker are on disk from here on.
    self._closed = False
    new = sorted(set(event_files(self.directory)) - before)
    self.path: str | None = new[-1] if new else None
    """The event file this log writes."""

  def write(self, metrics: Mapping[str, Any]) -> bool:
    """Writes one round's scalars at step ``metrics["round"]`` (see :func:`scalars`);
    returns False, writing nothing, for a round ``<= after_round``."""
    if self._closed:
      raise ValueError("ScalarLog.write: the log is closed")
    step = metrics.get("round")
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
      raise ValueError(f"ScalarLog.write: metrics need an int 'round' >= 0 as the step, "
                       f"got {step!r}")
    if step <= self.after_round:
      return False
    wall = time.time()
    for tag, x in scalars(metrics).items():
      self._writer.add_scalar(tag, x, global_step=int(step), walltime=wall)
    self._writer.flush()
    return True

  __call__ = write   # So the log itself can be Experiment.run's callback.

  def flush(self) -> None:
    if not self._closed:
      self._writer.flush()

  def close(self) -> None:
    """Flushes and closes the file; closing twice is harmless."""
    if not self._closed:
      self._closed = True
      self._writer.close()

  def __enter__(self) -> "ScalarLog":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
