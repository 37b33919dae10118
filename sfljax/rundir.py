"""A run's output directory: claimed atomically, never lost, resumable.

Layout of ``sfljax train --out DIR``::

  DIR/sfljax-run.json   the marker: only sfljax writes it (an sfljax run is
                        recognised by it, never by a file name a user may
                        also have, such as config.json)
  DIR/.lock             held (``flock``) by the process writing the run
  DIR/config.json       the config, what it resolved to, the environment
  DIR/metrics.jsonl     one strict-JSON line per finished round
  DIR/summary.json      best/final accuracy and times, when the run ends
  DIR/checkpoints/      orbax checkpoints (:mod:`sfljax.checkpoint`)
  DIR/events.out.tfevents.*   TensorBoard scalars (:mod:`sfljax.tensorboard`)

Rules: a directory is claimed before any file is written in it (exclusive
``mkdir`` for a new one, an exclusive lock for an existing empty one), so two
runs never write into one directory; the default name ``runs/<timestamp>`` gets
a ``-2``, ``-3``... suffix until an exclusive ``mkdir`` succeeds. An existing
run is replaced (``--overwrite``) only after the new run has been validated and
built: it is moved aside to ``DIR.replaced-<timestamp>``, and deleted once the
new run has finished its first round.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import math
import os
import shutil
from typing import Any, Callable, Iterable

MARKER = "sfljax-run.json"
LOCK = ".lock"
METRICS = "metrics.jsonl"


class RunDirError(Exception):
  """A run directory that cannot be used: one line saying why and what to do."""


def _why(e: OSError) -> str:
  return e.strerror or str(e)


def strict(value: Any) -> Any:
  """``value`` with every non-finite float replaced by None (strict JSON has no NaN)."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, dict):
    return {k: strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict(v) for v in value]
  return value


def dumps(obj: Any, **kwargs) -> str:
  """Strict JSON (``allow_nan=False``) of ``obj`` after :func:`strict`."""
  return json.dumps(strict(obj), allow_nan=False, sort_keys=True, **kwargs)


def write_file_atomic(path, write: Callable[[Any], None]) -> str:
  """Writes a file through ``write(binary_file)`` atomically: a temporary file
  in the same directory, flushed to disk, mode 0644, then renamed over
  ``path``; removed if anything fails, so ``path`` is whole or untouched.
  Returns ``path``."""
  import tempfile
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
  try:
    with os.fdopen(fd, "wb") as f:
      write(f)
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return path


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as strict JSON, atomically (temporary file, then rename)."""
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    f.write(dumps(obj, indent=2) + "\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def is_run(path: str) -> bool:
  """True if ``path`` is an sfljax run directory (it holds the marker)."""
  return os.path.isfile(os.path.join(path, MARKER))


def busy(path: str) -> bool:
  """True if a live sfljax process holds ``path``'s lock."""
  try:
    fd = os.open(os.path.join(path, LOCK), os.O_RDONLY)
  except OSError:
    return False
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    fcntl.flock(fd, fcntl.LOCK_UN)
    return False
  except OSError:
    return True
  finally:
    os.close(fd)


def check_new(out: str | None, overwrite: bool) -> None:
  """Refuses an ``--out`` that cannot be used, before any work or file is made."""
  if out is None:
    return
  if os.path.lexists(out) and not os.path.isdir(out):
    raise RunDirError(f"--out: {out} exists and is not a directory; choose another path")
  if os.path.isdir(out):
    entries = [e for e in os.listdir(out) if e != LOCK]
    if busy(out):
      raise RunDirError(f"--out: another sfljax process is writing to {out}; wait for it or "
                        "choose another directory")
    if entries:
      if not overwrite:
        raise RunDirError(f"--out: {out} is not empty; choose another directory, continue it "
                          f"with --resume {out}, or pass --overwrite to replace an sfljax run")
      if not is_run(out):
        raise RunDirError(f"--out: {out} holds files but is not an sfljax run (no {MARKER}); "
                          "refusing to replace it, choose another directory")
    if not os.access(out, os.W_OK | os.X_OK):
      raise RunDirError(f"--out: cannot write to {out}: permission denied")
    return
  parent = os.path.dirname(os.path.abspath(out))
  while not os.path.exists(parent):
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
    raise RunDirError(f"--out: cannot write to {out}: {parent} is not a writable directory")


class RunDir:
  """A claimed run directory (hold it for the run's whole life; :meth:`release` at the end)."""

  def __init__(self, path: str, lock_fd: int, aside: str | None = None):
    self.path, self._lock, self.aside = path, lock_fd, aside

  def file(self, name: str) -> str:
    return os.path.join(self.path, name)

  # -- claiming ------------------------------------------------------------------
  @classmethod
  def claim(cls, out: str | None, overwrite: bool = False) -> "RunDir":
    """Claims a directory for a new run (see the module docstring)."""
    if out is None:
      return cls._claim_default()
    check_new(out, overwrite)
    aside = None
    if os.path.isdir(out) and [e for e in os.listdir(out) if e != LOCK]:
      old = cls._lock(out)     # Nobody may be writing the run we replace.
      stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
      aside = f"{out.rstrip(os.sep)}.replaced-{stamp}"
      n = 1
      while os.path.lexists(aside):
        n += 1
        aside = f"{out.rstrip(os.sep)}.replaced-{stamp}-{n}"
      try:
        os.rename(out, aside)
      except OSError as e:
        raise RunDirError(f"--out: cannot move the old run {out} aside: {_why(e)}") from None
      finally:
        os.close(old)
    try:
      os.makedirs(out)
    except FileExistsError:
      pass   # An existing empty directory: the lock below decides.
    except OSError as e:
      raise RunDirError(f"--out: cannot create {out}: {_why(e)}") from None
    fd = cls._lock(out)
    if [e for e in os.listdir(out) if e != LOCK]:   # Another run got here first.
      os.close(fd)
      raise RunDirError(f"--out: {out} was claimed by another run meanwhile; choose another "
                        "directory")
    run = cls(out, fd, aside)
    run._mark()
    return run

  @classmethod
  def _claim_default(cls) -> "RunDir":
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
      os.makedirs("runs", exist_ok=True)
    except OSError as e:
      raise RunDirError(f"--out: cannot create runs/: {_why(e)}; pass --out") from None
    n = 1
    while True:
      path = os.path.join("runs", stamp if n == 1 else f"{stamp}-{n}")
      try:
        os.mkdir(path)           # Exclusive: exactly one run gets each name.
        break
      except FileExistsError:
        n += 1
      except OSError as e:
        raise RunDirError(f"--out: cannot create {path}: {_why(e)}; pass --out") from None
    run = cls(path, cls._lock(path))
    run._mark()
    return run

  @classmethod
  def resume(cls, path: str) -> "RunDir":
    """Opens an existing run to continue it (locked against other writers)."""
    if not os.path.isdir(path):
      raise RunDirError(f"--resume: {path} is not a directory")
    if not is_run(path):
      raise RunDirError(f"--resume: {path} is not an sfljax run (no {MARKER} in it)")
    if not os.path.isfile(os.path.join(path, "config.json")):
      raise RunDirError(f"--resume: {path}/config.json is missing; the run cannot be resumed")
    return cls(path, cls._lock(path, flag="--resume"))

  @staticmethod
  def _lock(path: str, flag: str = "--out") -> int:
    try:
      fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise RunDirError(f"{flag}: cannot write to {path}: {_why(e)}") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        raise RunDirError(f"{flag}: another sfljax process is writing to {path}; wait for it "
                          "or choose another directory") from None
      raise RunDirError(f"{flag}: cannot lock {path}: {_why(e)}") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd

  def _mark(self) -> None:
    try:
      write_json(self.file(MARKER), {"format": 1, "created": datetime.datetime.now().isoformat(
          timespec="seconds"), "pid": os.getpid()})
    except OSError as e:
      raise RunDirError(f"--out: cannot write to {self.path}: {_why(e)}") from None

  def started(self) -> None:
    """The new run has finished a round: the run it replaced is deleted."""
    if self.aside is not None:
      shutil.rmtree(self.aside, ignore_errors=True)
      self.aside = None

  def release(self) -> None:
    if self._lock is not None:
      os.close(self._lock)
      self._lock = None

  # -- metrics.jsonl -----------------------------------------------------------------
  def read_metrics(self, upto: int | None = None) -> list[dict[str, Any]]:
    """The rounds in metrics.jsonl, rewritten (atomically) to hold exactly
    rounds 1..``upto``: lines past it are dropped, a torn last line (a write
    cut short) is removed. A line that is not a round's JSON, or rounds that
    do not count 1, 2, 3..., mean the file was edited: :class:`RunDirError`."""
    path = self.file(METRICS)
    if not os.path.exists(path):
      return []
    with open(path, "rb") as f:
      raw = f.read()
    lines = raw.split(b"\n")
    torn = lines[-1] != b""           # The last write did not end its line.
    if not torn:
      lines = lines[:-1]
    rows = []
    for i, line in enumerate(lines, 1):
      try:
        row = json.loads(line)
        ok = isinstance(row, dict) and row.get("round") == len(rows) + 1
      except ValueError:
        row, ok = None, False
      if ok:
        rows.append(row)
        continue
      if i == len(lines) and torn:
        break                          # Repaired: the torn line is dropped.
      raise RunDirError(f"--resume: {path} line {i} is not round {len(rows) + 1}'s metrics "
                        "(the file was edited or damaged); restore it or start a new run")
    if upto is not None:
      if len(rows) < upto:
        raise RunDirError(f"--resume: {path} holds {len(rows)} rounds but the checkpoint is of "
                          f"round {upto} (the file was edited or truncated); restore it or "
                          "start a new run")
      rows = rows[:upto]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
      for row in rows:
        f.write(dumps(row) + "\n")
    os.replace(tmp, path)
    return rows

  def append_metrics(self, f, row: dict[str, Any]) -> None:
    """One round's line, written whole and flushed to disk."""
    f.write(dumps(row) + "\n")
    f.flush()
    os.fsync(f.fileno())
