"""The accelerator check: the script parses, the report writer turns canned part outputs
into gpu_check.json / gpu_check.md with the right ratios (hand-computed values)."""

import importlib.util
import json
import os
import shutil
import subprocess
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "experiments", "gpu_check.sh")
WRITER = os.path.join(ROOT, "experiments", "gpu_check.py")


@pytest.fixture(scope="module")
def gc():
  if not os.path.exists(WRITER):
    pytest.skip("experiments/gpu_check.py is not in this checkout")
  spec = importlib.util.spec_from_file_location("gpu_check", WRITER)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def test_script_parses():
  bash = shutil.which("bash")
  if bash is None or not os.path.exists(SCRIPT):
    pytest.skip("needs bash and experiments/gpu_check.sh")
  p = subprocess.run([bash, "-n", SCRIPT], capture_output=True, text=True, timeout=30)
  assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 NVL", 835.0),
    ("NVIDIA H200", 989.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.0), ("NVIDIA L4", 121.0),
    ("Tesla T4", None), ("cpu", None), (None, None)])
def test_bf16_peak_by_card_name(gc, name, peak):
  assert gc.bf16_peak_tflops(name) == peak


def _row(model, k, strategy, precision, sps, spr, gflops=1.0, **kw):
  return {"engine": "sfljax", "model": model, "algorithm": "sflv1", "clients": k,
          "strategy": strategy, "precision": precision, "client_block": None,
          "compile_seconds": 2.0, "seconds_per_round": spr, "samples_per_second": sps,
          "gflops_per_second": gflops, "train_flops_per_sample": 3.0e8,
          "device_peak_bytes": 2**30, **kw}


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest"
 errors="0" failures="1" skipped="1" tests="5" time="12.5">
<testcase classname="tests.algorithms_test" name="test_a" time="1"/>
<testcase classname="tests.algorithms_test" name="test_b" time="2.5">
<failure message="AssertionError: not close&#10;more">trace</failure></testcase>
<testcase classname="tests.algorithms_test" name="test_c" time="1">
<skipped message="needs torch">skip</skipped></testcase>
<testcase classname="tests.conv_test" name="test_0" time="1"/>
<testcase classname="tests.conv_test.TestGroup" name="test_1" time="1"/>
<testcase time="0.000" />
</testsuite></testsuites>"""


def _canned(out):
  """What the parts of a GPU run leave in OUT (numbers chosen for hand arithmetic)."""
  os.makedirs(os.path.join(out, "tests"))
  os.makedirs(os.path.join(out, "train_u_sflv1"))
  probe = {"python": "3.11.7", "versions": {"jax": "0.11.2", "flax": "0.12.8"},
           "nvidia_smi": {"name": "NVIDIA H100 80GB HBM3", "memory_total": "81559 MiB",
                          "driver_version": "580.0"},
           "jax": {"backend": "gpu", "devices": ["cuda:0"], "device_kind": "NVIDIA H100 80GB HBM3"},
           "torch": {"version": "2.13.0", "cuda_available": True, "cuda": "12.8",
                     "device_name": "NVIDIA H100 80GB HBM3"},
           "missing_optional": {"sklearn": {"package": "scikit-learn", "effect": "tests"}},
           "sfljax_import": {"ok": True, "sfljax_file": "/repo/sfljax/__init__.py",
                             "eager_optional_imports": []},
           "matmul_gflops": {"fp32_2048": 50000.0}}
  rows = [
      _row("lenet", 100, "vmap", "fp32", 64000.0, 0.1),
      _row("lenet", 100, "sequential", "fp32", 6400.0, 1.0),
      _row("lenet", 100, "vmap", "bf16", 128000.0, 0.05),
      _row("resnet18", 100, "vmap", "bf16", 800000.0, 0.032, gflops=247250.0),
      _row("resnet18", 100, "vmap", "fp32", 400000.0, 0.064, gflops=123625.0),
      {"engine": "sfljax", "model": "resnet18", "algorithm": "sflv1", "clients": 20,
       "strategy": "vmap", "precision": "fp32", "client_block": None,
       "skipped": "not started: 12 s left"},
  ]
  torch_rows = [
      {"engine": "torch", "model": "lenet", "algorithm": "sflv1", "clients": 100,
       "device": "cuda", "seconds_per_round": 2.0, "samples_per_second": 3200.0},
      {"engine": "torch", "model": "resnet18", "algorithm": "sflv1", "clients": 5,
       "error": "timed out after 90 s"},
  ]
  with open(os.path.join(out, "probe.json"), "w") as f:
    json.dump(probe, f)
  with open(os.path.join(out, "bench.json"), "w") as f:
    json.dump({"rows": rows, "torch_rows": torch_rows, "smoke": False, "repeats": 3,
               "budget": 10.0}, f)
  with open(os.path.join(out, "tests_plan.txt"), "w") as f:
    f.write("tests/algorithms_test.py\trun\ntests/conv_test.py\trun\n"
            "tests/participation_test.py\tskip: needs scikit-learn\n")
  with open(os.path.join(out, "tests", "collected.txt"), "w") as f:
    f.write("".join(f"tests/algorithms_test.py::test_{c}\n" for c in "abcdefg")
            + "".join(f"tests/conv_test.py::test_{i}\n" for i in range(3))
            + "\n10 tests collected in 3.1s\n")
  with open(os.path.join(out, "tests", "chunk_01.xml"), "w") as f:
    f.write(JUNIT)
  with open(os.path.join(out, "tests", "chunk_02.txt"), "w") as f:   # Killed: no XML.
    f.write("........s..F\n")
  with open(os.path.join(out, "parts.tsv"), "w") as f:
    f.write("probe\tok\t12\t90\t\ntest:chunk_01\trc=1\t40\t150\t\n"
            "test:chunk_02\ttimed out\t150\t150\t\ntest:chunk_03\tok\t30\t150\t\n"
            "bench\tok\t300\t320\t\ntrain\tskipped\t0\t0\tnot started: 5 s left\n")
  with open(os.path.join(out, "train_u_sflv1", "metrics.jsonl"), "w") as f:
    for i, (s, a) in enumerate([(3.0, 0.5), (0.2, 0.8), (0.4, 0.7)], 1):
      f.write(json.dumps({"round": i, "seconds": s, "test_accuracy": a}) + "\n")
  os.makedirs(os.path.join(out, "leakage_sflv1"))
  with open(os.path.join(out, "leakage_sflv1", "config.json"), "w") as f:
    # The layout `sfljax train` writes (its run folder's config.json).
    json.dump({"config": {"algorithm": "sflv1", "clients": 100, "dataset": "digits",
                          "leakage": True}}, f)
  with open(os.path.join(out, "leakage_sflv1", "metrics.jsonl"), "w") as f:
    for i, (t, l) in enumerate([(9.0, 30.0), (0.25, 1.5), (0.35, 2.5)], 1):
      f.write(json.dumps({"round": i, "seconds": t + 0.1, "train_seconds": t,
                          "leakage_seconds": l, "leak_dcor": 0.9 + i / 100,
                          "leak_label_auc": 0.97, "leak_inversion_ssim": 0.5,
                          "test_accuracy": 0.6}) + "\n")


def test_report_from_canned_parts(gc, tmp_path, capsys):
  out = str(tmp_path)
  _canned(out)
  assert gc.report(out) == 0
  capsys.readouterr()
  rep = json.load(open(os.path.join(out, "gpu_check.json")))
  md = open(os.path.join(out, "gpu_check.md")).read()

  assert rep["kind"] == "GPU" and rep["card"] == "NVIDIA H100 80GB HBM3"
  assert rep["bf16_peak_tflops"] == 989.0
  c = rep["comparisons"]
  ratios = {(x["strategy"], x["precision"]): x["ratio"] for x in c["sfljax_vs_pytorch"]}
  assert ratios == pytest.approx({("vmap", "fp32"): 20.0, ("sequential", "fp32"): 2.0,
                                  ("vmap", "bf16"): 40.0})
  assert all(x["same_device"] and x["clients"] == 100 for x in c["sfljax_vs_pytorch"])
  (vs,) = c["vmap_vs_sequential"]
  assert vs["vmap_speedup"] == pytest.approx(10.0)
  bf = {x["model"]: x["bf16_speedup"] for x in c["bf16_vs_fp32"]}
  assert bf == pytest.approx({"lenet": 2.0, "resnet18": 2.0})
  peak = {x["model"]: x["fraction_of_peak"] for x in c["bf16_peak_fraction"]}
  assert peak["resnet18"] == pytest.approx(0.25)    # 247.25 / 989
  assert peak["lenet"] == pytest.approx(1.0 / 1e3 / 989)

  t = rep["tests"]["files"]
  alg, conv = t["tests/algorithms_test.py"], t["tests/conv_test.py"]
  assert alg["status"] == "failed" and alg["collected"] == 7 and alg["not_run"] == 4
  assert (alg["passed"], alg["failed"], alg["skipped"], alg["seconds"]) == (1, 1, 1, 4.5)
  assert alg["failures"] == ["test_b: AssertionError: not close"]
  assert conv["status"] == "incomplete: 1 not run" and conv["passed"] == 2
  assert t["tests/participation_test.py"] == {"status": "skipped",
                                              "reason": "needs scikit-learn"}
  assert rep["tests"]["unattributed"] == {"passed": 10, "failed": 1, "errors": 0,
                                          "skipped": 1}
  assert rep["tests"]["cut_chunks"] == ["chunk_02: timed out"]
  assert rep["tests_total"] == {"passed": 13, "failed": 2, "errors": 0, "skipped": 2}
  assert rep["train_u_sflv1"]["median_seconds_per_round"] == 0.4
  assert rep["train_u_sflv1"]["best_test_accuracy"] == 0.8
  lk = rep["leakage_sflv1"]
  assert lk["first_round_leakage_seconds"] == 30.0
  assert lk["median_leakage_seconds_after_first"] == pytest.approx(2.0)    # (1.5 + 2.5) / 2
  assert lk["median_train_seconds_after_first"] == pytest.approx(0.3)     # (0.25 + 0.35) / 2
  assert lk["last"]["leak_dcor"] == pytest.approx(0.93) and lk["last"]["leak_inversion_mse"] is None
  assert {s["part"] for s in rep["skipped"]} == {"train", "test:chunk_02",
                                                 "needs scikit-learn"}

  assert md.startswith("# Accelerator check: GPU\n")
  for heading in ("## Tests", "## Headline", "## Benchmark (sfljax)", "## PyTorch loop",
                  "## Ratios", "## Leakage measures", "## Parts"):
    assert heading in md
  assert "**20.00x**" in md and "**25.0%** of the card's dense bf16 peak (989 TFLOP/s)" in md
  assert "not started: 12 s left" in md and "timed out after 90 s" in md
  assert "FAILED tests/algorithms_test.py::test_b" in md
  assert "test process chunk_02: timed out" in md
  assert "- 100 clients, digits, 3 round(s); measures 30.00 s in round 1" in md
  assert "median **2.00 s** per later round, against 0.300 s of training" in md
  assert "leak_dcor 0.930, leak_label_auc 0.970" in md


def test_report_of_a_cpu_run_with_nothing_left(gc, tmp_path, capsys):
  out = str(tmp_path)
  with open(os.path.join(out, "probe.json"), "w") as f:
    json.dump({"jax": {"backend": "cpu", "devices": ["TFRT_CPU_0"]}}, f)
  with open(os.path.join(out, "bench.json"), "w") as f:
    json.dump({"rows": [_row("lenet", 100, "vmap", "fp32", 900.0, 7.0)],
               "torch_rows": [{"model": "lenet", "algorithm": "sflv1", "clients": 100,
                               "device": "cpu", "seconds_per_round": 9.0,
                               "samples_per_second": 600.0}], "smoke": True}, f)
  assert gc.report(out) == 0
  capsys.readouterr()
  rep = json.load(open(os.path.join(out, "gpu_check.json")))
  md = open(os.path.join(out, "gpu_check.md")).read()
  assert rep["kind"] == "CPU" and rep["card"] is None and rep["bf16_peak_tflops"] is None
  (x,) = rep["comparisons"]["sfljax_vs_pytorch"]
  assert x["ratio"] == pytest.approx(1.5) and x["same_device"]
  assert "No GPU backend" in md and "SMOKE" in md
  assert rep["tests_total"]["passed"] == 0 and rep["train_u_sflv1"] is None
  assert rep["leakage_sflv1"] is None
  assert all(t["status"].startswith("not collected") for t in rep["tests"]["files"].values())


def test_leakage_part_cut_after_one_round_claims_no_steady_cost(gc, tmp_path, capsys):
  out = str(tmp_path)
  os.makedirs(os.path.join(out, "leakage_sflv1"))
  with open(os.path.join(out, "leakage_sflv1", "metrics.jsonl"), "w") as f:
    f.write(json.dumps({"round": 1, "seconds": 0.5, "train_seconds": 0.4,
                        "leakage_seconds": 42.0, "leak_dcor": 0.95}) + "\n")
  assert gc.report(out) == 0
  capsys.readouterr()
  lk = json.load(open(os.path.join(out, "gpu_check.json")))["leakage_sflv1"]
  assert lk["first_round_leakage_seconds"] == 42.0
  assert lk["median_leakage_seconds_after_first"] is None
  md = open(os.path.join(out, "gpu_check.md")).read()
  assert "- ? clients, ?, 1 round(s); measures 42.00 s in round 1" in md   # No config.json.
  assert "no later round" in md


def test_bench_past_its_deadline_starts_nothing_and_saves(gc, tmp_path, capsys):
  out = str(tmp_path)
  assert gc.bench(out, deadline=time.time() - 1, smoke=False, repeats=1, budget=5.0) == 0
  capsys.readouterr()
  res = json.load(open(os.path.join(out, "bench.json")))
  rows = res["rows"] + res["torch_rows"]
  assert len(rows) == len(gc.bench_plan(False)) and all("not started" in r["skipped"]
                                                         for r in rows)
  first = res["rows"][0]
  assert (first["model"], first["clients"], first["strategy"], first["precision"]) == (
      "lenet", 100, "vmap", "fp32")
  assert {(r["model"], r["clients"]) for r in res["torch_rows"]} == {
      ("lenet", 100), ("lenet", 5), ("resnet18", 5)}


@pytest.mark.parametrize("jobs,expect", [
    (0, {"algorithms_test": 3, "conv_test": 2}), (2, {"chunk_01": 3, "chunk_02": 2})])
def test_test_chunks(gc, tmp_path, capsys, jobs, expect):
  os.makedirs(tmp_path / "tests")
  ids = ["tests/algorithms_test.py::a[x-1]", "tests/conv_test.py::b", "tests/algorithms_test.py::c",
         "tests/conv_test.py::d", "tests/algorithms_test.py::e"]
  (tmp_path / "tests" / "collected.txt").write_text("\n".join(ids) + "\n\n5 tests collected\n")
  assert gc.test_chunks(str(tmp_path), jobs) == 0
  lines = capsys.readouterr().out.split()
  got = {os.path.basename(p)[:-4]: open(p).read().split() for p in lines[1::2]}
  assert {k: len(v) for k, v in got.items()} == expect
  assert sorted(sum(got.values(), [])) == sorted(ids)
  if jobs:
    assert got["chunk_01"] == [ids[0], ids[2], ids[4]]


def test_tests_plan_selects_the_four_files(gc):
  plan = gc.tests_plan()
  for rel in gc.TEST_FILES:
    assert plan[rel]["selected"]
    assert plan[rel]["run"] == (not plan[rel]["missing_imports"])


def test_torch_loop_moved_to_a_device_runs(gc, monkeypatch):
  """The PyTorch loop with models and data moved by the check's subclass (to "cpu" here;
  "cuda" on a GPU machine) trains and times a round like the original."""
  torch = pytest.importorskip("torch")
  monkeypatch.syspath_prepend(os.path.join(ROOT, "experiments"))
  import torch_baseline
  cls = gc._device_run_class(torch_baseline.BaselineRun, torch, "cpu")
  monkeypatch.setattr(torch_baseline, "BaselineRun", cls)
  r = torch_baseline.run_baseline("sflv1", "lenet", 2, 8, 8, rounds=1, warmup=0, threads=1)
  assert r["samples_per_round"] == 16 and r["seconds_per_round"] > 0
  run = cls("sflv1", "lenet", 2, 8, 8)
  assert all(x.device.type == "cpu" for x, _ in run.data)
  assert isinstance(run.run_round(), float)
