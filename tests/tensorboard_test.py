"""sfljax.tensorboard: the event files are read back by a reader written here (TFRecord
framing with its masked CRC-32C, and the Event/Summary protobuf wire format decoded by
hand), cross-checked against tensorboardX's own Event class and, where installed,
TensorBoard's EventAccumulator."""

import math
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest

from sfljax import tensorboard as tb

pytest.importorskip("tensorboardX")   # A dependency; absent on the offline accelerator image.

# -- an independent reader ---------------------------------------------------------------

_CRC_TABLE = []
for _n in range(256):
  _c = _n
  for _ in range(8):
    _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1   # CRC-32C (Castagnoli), reflected.
  _CRC_TABLE.append(_c)


def _crc32c(data: bytes) -> int:
  c = 0xFFFFFFFF
  for b in data:
    c = _CRC_TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
  return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
  c = _crc32c(data)
  return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path):
  """The payloads of a TFRecord file, checking both CRCs of every record."""
  with open(path, "rb") as f:
    raw = f.read()
  out, i = [], 0
  while i < len(raw):
    header = raw[i:i + 8]
    (length,), (length_crc,) = struct.unpack("<Q", header), struct.unpack("<I", raw[i + 8:i + 12])
    assert length_crc == _masked_crc(header), f"{path}: bad length crc at byte {i}"
    data = raw[i + 12:i + 12 + length]
    (data_crc,) = struct.unpack("<I", raw[i + 12 + length:i + 16 + length])
    assert len(data) == length and data_crc == _masked_crc(data), f"{path}: bad record at {i}"
    out.append(data)
    i += 16 + length
  return out


def _varint(buf, i):
  shift = result = 0
  while True:
    b = buf[i]
    i += 1
    result |= (b & 0x7F) << shift
    shift += 7
    if not b & 0x80:
      return result, i


def _fields(buf):
  """(field number, wire type, value) of a protobuf message: ints, bytes or 4/8-byte raw."""
  i, out = 0, []
  while i < len(buf):
    key, i = _varint(buf, i)
    num, wire = key >> 3, key & 7
    if wire == 0:
      v, i = _varint(buf, i)
    elif wire == 1:
      v, i = buf[i:i + 8], i + 8
    elif wire == 2:
      n, i = _varint(buf, i)
      v, i = buf[i:i + n], i + n
    elif wire == 5:
      v, i = buf[i:i + 4], i + 4
    else:
      raise AssertionError(f"unexpected wire type {wire}")
    out.append((num, wire, v))
  return out


def _event(data):
  """An Event (tensorflow/core/util/event.proto) as a dict: step, wall_time, file_version,
  restart (the step of a SessionLog START, else None), scalars {tag: float32}."""
  ev = {"step": 0, "wall_time": None, "file_version": None, "restart": False, "scalars": {}}
  for num, _, v in _fields(data):
    if num == 1:
      ev["wall_time"] = struct.unpack("<d", v)[0]
    elif num == 2:
      ev["step"] = v
    elif num == 3:
      ev["file_version"] = v.decode()
    elif num == 5:                          # Summary: repeated Value value = 1.
      for vnum, _, value in _fields(v):
        assert vnum == 1
        parts = {n: x for n, _, x in _fields(value)}
        tag = parts[1].decode()             # Value.tag = 1; simple_value = 2 (float).
        assert tag not in ev["scalars"]
        ev["scalars"][tag] = np.float32(struct.unpack("<f", parts[2])[0])
    elif num == 7:                          # SessionLog: status = 1 (START = 1).
      ev["restart"] = dict((n, x) for n, _, x in _fields(v)).get(1) == 1
  return ev


def _read(path):
  return [_event(r) for r in _records(path)]


def _scalars_by_step(events):
  out = {}
  for ev in events:
    if ev["scalars"]:
      assert ev["step"] not in out or not (set(out[ev["step"]]) & set(ev["scalars"]))
      out.setdefault(ev["step"], {}).update(ev["scalars"])
  return out


def _union(directory):
  """What TensorBoard shows for a directory: its files in name order, a restart marker at
  step s dropping everything read before at steps >= s."""
  shown = {}
  for path in tb.event_files(directory):
    for ev in _read(path):
      if ev["restart"]:
        shown = {s: v for s, v in shown.items() if s < ev["step"]}
      for tag, x in ev["scalars"].items():
        shown.setdefault(ev["step"], {})[tag] = x
  return shown


# -- the tests ---------------------------------------------------------------------------

def _round(r, **extra):
  m = {"round": r, "train_loss": 2.0 / r, "train_accuracy": 0.1 * r,
       "test_loss": np.float32(1.5 / r), "test_accuracy": 0.3 + 0.01 * r,
       "client_test_accuracy": 0.25 + 0.1 / 3 * r, "seconds": 0.123456789 * r,
       "participants": 5, "bytes_client_to_server": 123_456_789_012 * r,
       "bytes_server_to_client": 1000 * r, "bytes_smashed": np.int64(700 * r),
       "client_train_loss": [0.5, None, 0.25], "client_train_accuracy": [None] * 3}
  m.update(extra)
  return m


EXPECTED_TAGS = {"loss/train", "accuracy/train", "loss/test", "accuracy/test",
                 "accuracy/client_test", "time/seconds", "clients/participants",
                 "bytes/client_to_server", "bytes/server_to_client", "bytes/smashed"}


def test_scalars_written_with_steps_tags_and_float32_values(tmp_path):
  rounds = [_round(1), _round(2, epsilon=3.5, lr=np.array(0.01), tag_like="abc",
                              flag=True, nothing=None, bad=float("nan"), worse=-math.inf,
                              big=10**400),
            _round(3, test_loss=float("inf"), train_loss=float("nan"))]
  with tb.ScalarLog(tmp_path / "run") as log:
    assert all(log.write(m) for m in rounds)
  files = tb.event_files(str(tmp_path / "run"))
  assert files == [log.path] and len(files) == 1
  events = _read(files[0])
  assert events[0]["file_version"] == "brain.Event:2"
  assert not any(e["restart"] for e in events)   # A fresh run's file hides nothing older.
  got = _scalars_by_step(events)
  assert sorted(got) == [1, 2, 3]
  assert set(got[1]) == EXPECTED_TAGS
  assert set(got[2]) == EXPECTED_TAGS | {"privacy/epsilon", "other/lr"}
  assert set(got[3]) == EXPECTED_TAGS - {"loss/test", "loss/train"}   # Non-finite: not written.
  for m in rounds:
    for key, value in m.items():
      tag = tb.tag_for(key)
      if tag in got[m["round"]]:
        assert got[m["round"]][tag] == np.float32(value), (key, m["round"])
  assert got[2]["bytes/client_to_server"] == np.float32(246_913_578_024)
  assert got[2]["privacy/epsilon"] == np.float32(3.5)
  # Cross-check with tensorboardX's generated protobuf class.
  from tensorboardX.proto import event_pb2
  for data, mine in zip(_records(files[0]), events):
    e = event_pb2.Event.FromString(data)
    assert e.step == mine["step"]
    assert {v.tag: np.float32(v.simple_value) for v in e.summary.value} == mine["scalars"]


def test_tag_map():
  assert {k: tb.tag_for(k) for k in ("round", "train_loss", "test_accuracy",
                                     "client_test_accuracy", "bytes_smashed_grad", "seconds",
                                     "participants", "epsilon", "lr", "bytes_", "_loss",
                                     "eval_seconds", "leak_dcor", "leak_")} == {
      "round": None, "train_loss": "loss/train", "test_accuracy": "accuracy/test",
      "client_test_accuracy": "accuracy/client_test", "bytes_smashed_grad": "bytes/smashed_grad",
      "seconds": "time/seconds", "participants": "clients/participants",
      "epsilon": "privacy/epsilon", "lr": "other/lr", "bytes_": "other/bytes_",
      "_loss": "other/_loss", "eval_seconds": "time/eval_seconds",
      "leak_dcor": "leakage/dcor", "leak_": "other/leak_"}
  # Every documented per-round metric gets a tag in a named group (not other/).
  from sfljax.train import METRICS
  assert all(tb.tag_for(k).split("/")[0] in ("loss", "accuracy", "time", "clients", "bytes",
                                            "privacy", "leakage")
             for k in METRICS if k != "round")


def test_resume_appends_a_file_and_tensorboard_shows_each_round_once(tmp_path, monkeypatch):
  d = tmp_path / "run"
  now = time.time()
  monkeypatch.setattr(time, "time", lambda: now)     # Both files named in the same second.
  with tb.ScalarLog(d) as first:                     # Ran to round 4, checkpointed at 2.
    for r in range(1, 5):
      first.write(_round(r))
  with tb.ScalarLog(d, after_round=2) as second:     # Same second: must not overwrite.
    written = [second.write(_round(r, train_loss=100.0 + r)) for r in range(1, 6)]
  assert written == [False, False, True, True, True]
  assert tb.event_files(str(d)) == [first.path, second.path] and first.path != second.path
  assert sorted(_scalars_by_step(_read(first.path))) == [1, 2, 3, 4]   # Untouched.
  events = _read(second.path)
  assert [e["step"] for e in events if e["restart"]] == [3]
  assert sorted(_scalars_by_step(events)) == [3, 4, 5]
  shown = _union(str(d))
  assert sorted(shown) == [1, 2, 3, 4, 5]
  assert [shown[r]["loss/train"] for r in range(1, 6)] == [
      np.float32(2.0), np.float32(1.0), np.float32(103.0), np.float32(104.0), np.float32(105.0)]


def test_tensorboard_itself_reads_the_union(tmp_path):
  accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
  d = tmp_path / "run"
  with tb.ScalarLog(d) as first:
    for r in range(1, 5):
      first.write(_round(r))
  with tb.ScalarLog(d, after_round=2) as second:
    for r in range(3, 6):
      second.write(_round(r, train_loss=100.0 + r))
  acc = accumulator.EventAccumulator(str(d))
  acc.Reload()
  assert set(acc.Tags()["scalars"]) == EXPECTED_TAGS
  loss = acc.Scalars("loss/train")
  assert [e.step for e in loss] == [1, 2, 3, 4, 5]
  assert [np.float32(e.value) for e in loss] == [2.0, 1.0, 103.0, 104.0, 105.0]


def test_errors_and_close(tmp_path):
  with pytest.raises(ValueError, match="after_round"):
    tb.ScalarLog(tmp_path, after_round=-1)
  log = tb.ScalarLog(tmp_path)
  with pytest.raises(ValueError, match="'round'"):
    log.write({"train_loss": 1.0})
  log.flush()
  log.close()
  log.close()
  log.flush()
  with pytest.raises(ValueError, match="closed"):
    log.write(_round(1))
  assert len(tb.event_files(str(tmp_path))) == 1   # Nothing reopened a file.


def test_import_is_lazy():
  code = ("import sys, sfljax, sfljax.tensorboard; "
          "assert 'tensorboardX' not in sys.modules, 'tensorboardX imported eagerly'")
  subprocess.run([sys.executable, "-c", code], check=True,
                 env={**os.environ, "JAX_PLATFORMS": "cpu"})
