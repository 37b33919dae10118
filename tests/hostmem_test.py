"""sfljax.hostmem: the C heap's free memory handed back after compiling."""

import ctypes
import platform

import numpy as np
import pytest

from sfljax import hostmem


def _rss_kib() -> int:
  for line in open("/proc/self/status"):
    if line.startswith("VmRSS"):
      return int(line.split()[1])
  raise AssertionError("no VmRSS")


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                    reason="malloc_trim is glibc's")
def test_release_returns_freed_heap_memory_to_the_os():
  """200 MB of small C-heap blocks (below glibc's mmap threshold, so they live
  in the heap), all freed but the last: the heap cannot shrink past the live
  block at its top, so the freed memory stays resident until release()."""
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  libc.free.argtypes = [ctypes.c_void_p]
  blocks = []
  for _ in range(200 * 16):
    p = libc.malloc(64 * 1024)
    ctypes.memset(p, 1, 64 * 1024)   # Touched: resident.
    blocks.append(p)
  keep = blocks.pop()
  for p in blocks:
    libc.free(p)
  before = _rss_kib()
  assert hostmem.release() is True
  after = _rss_kib()
  libc.free(keep)
  assert before - after > 100 * 1024, (before, after)   # > 100 of the 200 MB returned


def test_experiment_compile_releases_host_memory(monkeypatch):
  from conftest import small_digits
  from sfljax.config import Config
  from sfljax.train import Experiment
  calls = []
  monkeypatch.setattr(hostmem, "release", lambda: calls.append(1) or True)
  ds = small_digits(24, 12)
  exp = Experiment(Config(algorithm="sflv1", clients=2, rounds=1, batch_size=8), dataset=ds,
                   parts=[np.arange(12), np.arange(12, 24)])
  exp.compile(exp.init())
  assert calls == [1]
