"""experiments/conv_layer_table.py: the per-layer table of lowerings against PyTorch."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

import conv_layer_table as clt  # noqa: E402


def _canned():
  # Hand-made times (ms). conv2: the rule picks patches for all three parts.
  conv2 = {"layer": "lenet_conv2_b1024", "batch": 1024, "skipped": [],
           "rule": ["patches", "patches", "patches"],
           "parts": {"fwd": {"xla": 7.0, "patches": 8.0, "taps": 30.0},
                     "dx": {"xla": 40.0, "patches": 18.0, "taps": 33.0},
                     "dw": {"xla": 50.0, "patches": 12.0, "taps": 60.0}},
           "torch": {"fwd": 10.0, "dx": 27.0, "dw": 6.0}}
  # A first layer (no input gradient) whose XLA convolution was not timed.
  tiny = {"layer": "r18_2x2_512-512_k3", "batch": 256, "skipped": ["xla"],
          "rule": ["patches", "patches", "taps"],
          "parts": {"fwd": {"patches": 4.0, "taps": 5.0}, "dw": {"patches": 2.0, "taps": 3.0}},
          "torch": None}
  return [conv2, tiny]


def _result(rows):
  return {"machine": {"cpu_model": "Test CPU", "cpu_count": 2, "jax": "0.0"},
          "torch_version": "2.x", "date": "2026-11-28 10:00", "load_before": 0.5,
          "load_after": 1.5, "repeats": 3, "command": "python experiments/conv_layer_table.py",
          "rows": rows}


def test_summary_sums_the_rules_parts_against_pytorchs():
  conv2, tiny = clt.summarize(_canned())
  assert conv2["rule_ms"] == 8.0 + 18.0 + 12.0          # the rule's methods, not the fastest
  assert conv2["torch_ms"] == 10.0 + 27.0 + 6.0
  assert conv2["torch_over_rule"] == pytest.approx(43.0 / 38.0)
  assert tiny["rule_ms"] == 4.0 + 3.0                    # no input gradient for a first layer
  assert tiny["torch_ms"] is None and tiny["torch_over_rule"] is None


def test_xla_is_skipped_only_on_outputs_of_at_most_2x2():
  import conv_bench
  layers = {l[0]: l for l in conv_bench.LAYERS}
  skip = lambda name: clt.skipped_methods(*clt.layer_shapes(layers[name]))
  assert skip("r18_2x2_512-512_k3") == ("xla",)            # 2x2 -> 2x2
  assert skip("r18_4x4-2x2_256-512_k3s2") == ("xla",)      # 4x4 -> 2x2, strided
  assert skip("r18_4x4_256-256_k3") == ()                  # 4x4 outputs: 16 > 4
  assert skip("lenet_conv2_b32") == ()


def test_markdown_marks_the_rule_and_what_was_not_timed():
  md = clt.markdown(_result(_canned()))
  lines = md.splitlines()
  fwd = next(l for l in lines if l.startswith("| `lenet_conv2_b1024` | forward"))
  assert fwd == "| `lenet_conv2_b1024` | forward | 7.00 | **8.00** | 30.00 | patches | 10.00 | 1.25 |"
  dw = next(l for l in lines if l.startswith("| `lenet_conv2_b1024` | kernel gradient"))
  assert dw.endswith("| patches | 6.00 | 0.50 |")       # 6 / 12: PyTorch twice as fast
  tiny = [l for l in lines if l.startswith("| `r18_2x2_512-512_k3` |")]
  assert [l.split(" | ")[1] for l in tiny[:2]] == ["forward", "kernel gradient"]
  assert all("not timed" in l for l in tiny[:2])
  assert "| `r18_2x2_512-512_k3` | 7.00 | — | — |" in lines
  assert "load 0.50 before and 1.50 after" in md


def test_a_real_layer_is_timed_with_every_method(tmp_path, capsys):
  out = tmp_path / "table"
  assert clt.main(["--out", str(out), "--layers", "lenet_conv2_b32", "--repeats", "1"]) == 0
  res = json.loads((out / "conv_layers.json").read_text())
  (row,) = res["rows"]
  assert row["x"] == [32, 14, 14, 6] and row["kernel"] == [5, 5, 6, 16]
  assert set(row["parts"]) == {"fwd", "dx", "dw"}
  assert all(set(t) == {"xla", "patches", "taps"} and min(t.values()) > 0
             for t in row["parts"].values())
  try:
    import torch  # noqa: F401
    assert set(row["torch"]) == {"fwd", "dx", "dw"}
  except ImportError:
    assert row["torch"] is None
  assert (out / "conv_layers.md").read_text().startswith("# Convolutions per layer")
  assert not (tmp_path / "table.partial").exists()
  # A first layer: no input-gradient row.
  out1 = tmp_path / "first"
  assert clt.main(["--out", str(out1), "--layers", "lenet_conv1_b32", "--repeats", "1"]) == 0
  (row1,) = json.loads((out1 / "conv_layers.json").read_text())["rows"]
  assert set(row1["parts"]) == {"fwd", "dw"}


def test_rule_only_rows_mark_the_untimed_methods():
  conv2 = _canned()[0]
  conv2["parts"] = {p: {"patches": t["patches"]} for p, t in conv2["parts"].items()}
  md = clt.markdown(_result([conv2]))
  assert "| `lenet_conv2_b1024` | forward | — | **8.00** | — | patches | 10.00 | 1.25 |" in md
  assert "`--methods rule` times only the rule's method" in md
  assert "not timed: XLA" not in md
  assert clt.summarize([conv2])[0]["rule_ms"] == 8.0 + 18.0 + 12.0


def test_rule_only_times_the_rules_method_per_part(tmp_path, capsys):
  from sfljax import conv
  out = tmp_path / "rule"
  assert clt.main(["--out", str(out), "--layers", "lenet_conv1_b32", "--repeats", "1",
                   "--methods", "rule"]) == 0
  (row,) = json.loads((out / "conv_layers.json").read_text())["rows"]
  rule = conv.auto_lowering((32, 28, 28, 1), (5, 5, 1, 6), (1, 1), ((2, 2), (2, 2)))
  assert row["rule"] == list(rule)
  assert {p: list(t) for p, t in row["parts"].items()} == {"fwd": [rule[0]], "dw": [rule[2]]}
  assert "—" in (out / "conv_layers.md").read_text()


def test_bad_input_is_refused_without_touching_results(tmp_path, capsys):
  out = tmp_path / "exists"
  out.mkdir()
  (out / "keep.txt").write_text("old")
  assert clt.main(["--out", str(out), "--layers", "lenet_conv2_b32"]) == 2
  assert (out / "keep.txt").read_text() == "old"
  assert clt.main(["--out", str(tmp_path / "n"), "--layers", "no_such_layer"]) == 2
  assert clt.main(["--out", str(tmp_path / "r"), "--repeats", "0"]) == 2
  err = capsys.readouterr().err
  assert "exists" in err and "no layer matches" in err and "--repeats" in err
  assert not (tmp_path / "n").exists() and not (tmp_path / "r").exists()
