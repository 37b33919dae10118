"""The experiment tools: the Table 2 cost model and the Table 5 report."""

import json
import os
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "experiments"))

import block_speed  # noqa: E402
import cost_model  # noqa: E402
import per_sample_spread  # noqa: E402
import profile_step  # noqa: E402
import table5  # noqa: E402

F32 = 4
CLIENT_PARAMS = (5 * 5 * 1 * 6 + 6) + (5 * 5 * 6 * 16 + 16)
FULL_PARAMS = CLIENT_PARAMS + (400 * 120 + 120) + (120 * 84 + 84) + (84 * 10 + 10)


def test_cost_model_sizes_checks_and_predictions(tmp_path):
  pytest.importorskip("matplotlib")
  out = tmp_path / "cm"
  cost_model.main(["--clients", "1", "5", "--rates", "1e6", "--batch-size", "256",
                   "--out", str(out)])
  res = json.loads((out / "cost_model.json").read_text())
  assert res["sizes"] == {"W": FULL_PARAMS * F32, "betaW": CLIENT_PARAMS * F32,
                          "q": 16 * 5 * 5 * F32}
  p, w, bw, q = 1438, FULL_PARAMS * F32, CLIENT_PARAMS * F32, 400 * F32
  # The tool refuses to finish unless counted bytes equal the formula; check a few by hand.
  for c in res["byte_checks"]:
    k = c["clients"]
    expected = 2 * k * w if c["algorithm"] == "fl" else 2 * p * q + 2 * bw * k
    assert c["counted_bytes"] == expected
  t = res["times"]["T"]
  for row in res["predictions"]:
    k, r = row["clients"], row["rate"]
    tf = res["times"]["T_fedavg"][str(k)]
    assert row["sl"] == pytest.approx(t + 2 * p * q / r + 2 * bw * k / r)
    assert row["sflv1"] == pytest.approx(t + 2 * p * q / (k * r) + 2 * bw / r + tf)
    assert row["sflv2"] == pytest.approx(t + 2 * p * q / (k * r) + 2 * bw / r + tf / 2)
    assert row["fl"] == pytest.approx(t + 2 * w / r + tf)
  assert (out / "cost_model.png").read_bytes()[:4] == b"\x89PNG"


def test_cost_model_stragglers_against_hand_computation():
  s, p, rate, t, tf = {"W": 1000, "betaW": 100, "q": 40}, 600, 1e4, 2.0, 0.3
  compute, link = [1.0, 2.0, 0.5], [1.0, 1.5, 4.0]
  got = cost_model.predict(s, p, 3, rate, t, tf, compute, link)
  # Synchronous: the slowest client's time. Client-major: the clients' turns added.
  fl = [c * t + 2 * 1000 * lk / rate for c, lk in zip(compute, link)]
  sync = [c * t + 2 * p * 40 * lk / (3 * rate) + 2 * 100 * lk / rate
          for c, lk in zip(compute, link)]
  turns = [c * t / 3 + 2 * (p / 3) * 40 * lk / rate for c, lk in zip(compute, link)]
  assert got["fl"] == pytest.approx(max(fl) + tf)
  slow = cost_model.predict(s, p, 3, 100.0, t, tf, compute, link)["fl"]   # link-bound
  assert slow == pytest.approx(max(c * t + 2 * 1000 * lk / 100.0 for c, lk in zip(compute, link))
                               + tf)
  assert got["sflv1"] == pytest.approx(max(sync) + tf)
  assert got["sflv2"] == pytest.approx(max(sync) + tf / 2)
  assert got["sl"] == pytest.approx(sum(turns) + sum(2 * 100 * lk / rate for lk in link))
  assert got["sflv2_client"] == pytest.approx(sum(turns) + max(2 * 100 * lk / rate
                                                               for lk in link) + tf / 2)
  # Here the slowest client is client 2 (its link), not client 1 (its compute).
  assert got["sflv1"] == pytest.approx(sync[2] + tf) and sync[2] > sync[1]
  # Spread 0: identical clients and Table 2's formulas, exactly.
  c0, l0 = cost_model.stragglers(5, 0.0, seed=3)
  assert (c0 == 1).all() and (l0 == 1).all()
  w, bw, q, k = 1000, 100, 40, 5
  for pred in (cost_model.predict(s, p, k, rate, t, tf),
               cost_model.predict(s, p, k, rate, t, tf, c0, l0)):
    assert pred == {"fl": t + 2 * w / rate + tf,
                    "sl": t + 2 * p * q / rate + 2 * bw * k / rate,
                    "sflv1": t + 2 * p * q / (k * rate) + 2 * bw / rate + tf,
                    "sflv2": t + 2 * p * q / (k * rate) + 2 * bw / rate + tf / 2,
                    "sflv2_client": t + 2 * p * q / rate + 2 * bw / rate + tf / 2}
  # Seeded, per client: the first clients are the same whatever K; spread widens them.
  c5, l5 = cost_model.stragglers(5, 0.5, seed=3)
  c3, l3 = cost_model.stragglers(3, 0.5, seed=3)
  assert (c5[:3] == c3).all() and (l5[:3] == l3).all() and (c5 == cost_model.stragglers(
      5, 0.5, seed=3)[0]).all()
  assert not (c5 == cost_model.stragglers(5, 0.5, seed=4)[0]).any()
  assert not (c5 == l5).any()                  # compute and link drawn apart
  wide = cost_model.stragglers(5, 1.0, seed=3)[0]
  np.testing.assert_allclose(np.log(wide), 2 * np.log(c5))
  assert cost_model.predict(s, p, 5, rate, t, tf, c5, l5)["sflv1"] > cost_model.predict(
      s, p, 5, rate, t, tf)["sflv1"] or max(c5) <= 1


def test_table5_report_best_and_final(tmp_path):
  spec = {"description": "test row; x", "schemes": ["fl", "sl"],
          "paper_accuracy": {"fl": 91.9, "sl": 90.4}}
  accs = {"fl": [0.5, 0.9, 0.8], "sl": [0.7, 0.75, 0.95]}
  for scheme, values in accs.items():
    os.makedirs(tmp_path / scheme)
    with open(tmp_path / scheme / "metrics.jsonl", "w") as f:
      for i, a in enumerate(values):
        f.write(json.dumps({"round": i + 1, "client_test_accuracy": a, "test_accuracy": a - 0.01,
                            "seconds": 2.0}) + "\n")
  table5.report(spec, str(tmp_path))
  text = (tmp_path / "results.md").read_text()
  assert "| fl | 3 | 90.00 (2) | 80.00 | 89.00 | 91.9 | -1.90 | 2.00 |" in text
  assert "| sl | 3 | 95.00 (3) | 95.00 | 94.00 | 90.4 | +4.60 | 2.00 |" in text


def test_profile_step_attributes_operations_to_layers_and_phases(tmp_path):
  # The parsers on hand-written HLO lines and op_names.
  hlo = ("  %fusion.3 = f32[8,28,28,6]{3,2,1,0} fusion(%p0, %p1), kind=kLoop, calls=%f, "
         'metadata={op_name="jit(step)/jvp(Sequential)/conv1/conv/add"}\n'
         "  ROOT %dot.1 = f32[8,10]{1,0} dot(%a, %b), lhs_contracting_dims={1}, "
         'metadata={op_name="jit(step)/transpose(jvp(Sequential))/fc3/dense/dot_general"}\n'
         "  %ynn_fusion = f32[1,5,5,6]{3,2,1,0} fusion(%a, %b), kind=kCustom, calls=%g, "
         'backend_config={"fusion_config":{"kind":"__ynn_fusion"}}\n')
  assert profile_step.hlo_index(hlo) == {
      "fusion.3": ("fusion:kLoop", "jit(step)/jvp(Sequential)/conv1/conv/add"),
      "dot.1": ("dot", "jit(step)/transpose(jvp(Sequential))/fc3/dense/dot_general"),
      "ynn_fusion": ("fusion:kCustom(ynn/xnn)", "")}
  assert profile_step.classify("jit(step)/jvp(Sequential)/conv2/conv/slice") == ("forward", "conv2")
  assert profile_step.classify("jit(step)/transpose(jvp(Sequential))/conv1/select_n") == (
      "backward", "conv1")
  assert profile_step.classify("jit(step)/add") == ("optimizer", "adam")
  assert profile_step.classify("") == ("other", "?")
  # A real (tiny) run: LeNet's layers show up in both phases, the report is written.
  out = tmp_path / "prof"
  assert profile_step.main(["--model", "lenet", "--batch", "8", "--steps", "1",
                            "--trace-steps", "1", "--out", str(out)]) == 0
  rep = json.loads((out / "profile.json").read_text())
  seen = {(r["layer"], r["phase"]) for r in rep["by_layer_phase"]}
  assert {("conv1", "forward"), ("conv1", "backward"), ("conv2", "backward"),
          ("fc1", "forward")} <= seen, seen
  assert rep["traced_ms_per_step"] > 0 and rep["step_ms_median"] > 0
  assert (out / "profile.md").read_text().startswith("# lenet train step, batch 8")
  with pytest.raises(SystemExit) as e:   # never writes into a used folder
    profile_step.main(["--model", "lenet", "--batch", "8", "--out", str(out)])
  assert e.value.code == 2
  with pytest.raises(SystemExit) as e:   # no PyTorch AlexNet to compare with
    profile_step.main(["--model", "alexnet", "--torch", "--out", str(tmp_path / "new")])
  assert e.value.code == 2 and not (tmp_path / "new").exists()


def test_block_speed_compares_block_sizes_on_equal_states(tmp_path):
  """Small: 6 digits clients of 64 samples; blocks of 4 (one full, one of 2)
  must end in the unblocked state bit for bit."""
  out = tmp_path / "rows.json"
  assert block_speed.main(["small_100", "sflv1", "--blocks", "-", "4", "--rounds", "2",
                           "--clients", "6", "--out", str(out)]) == 0
  rows = json.loads(out.read_text())
  assert [r["client_block"] for r in rows] == [None, 4]
  assert all(r["state_equal_to_first"] for r in rows)
  assert rows[0]["ratio_to_first"] == 1.0 and len(rows[1]["round_seconds"]) == 2


def test_per_sample_spread_interleaves_and_recomputes(tmp_path):
  """Two K values in one process, two passes: every pass times every K, and the
  reported medians and spreads follow from the per-pass costs (recomputed here);
  an existing --out is refused, not overwritten."""
  out = tmp_path / "spread.json"
  assert per_sample_spread.main(["--algorithms", "sflv1", "--clients", "1", "3",
                                 "--passes", "2", "--slice", "0.01", "--warmup", "1",
                                 "--out", str(out)]) == 0
  row = json.loads(out.read_text())["rows"][0]
  passes = [{int(k): v for k, v in p.items()} for p in row["seconds_per_sample_per_pass"]]
  assert len(passes) == 2 and all(sorted(p) == [1, 3] and min(p.values()) > 0 for p in passes)
  med = {k: float(np.median([p[k] for p in passes])) for k in (1, 3)}
  assert {int(k): v for k, v in row["seconds_per_sample_median"].items()} == pytest.approx(med)
  assert row["spread_of_medians"] == pytest.approx(max(med.values()) / min(med.values()))
  spreads = sorted(max(p.values()) / min(p.values()) for p in passes)
  assert row["spread_per_pass_range"] == pytest.approx(spreads)
  before = out.read_text()
  assert per_sample_spread.main(["--clients", "1", "--out", str(out)]) == 2
  assert out.read_text() == before
