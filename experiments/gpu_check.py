"""The Python side of the accelerator check (``experiments/gpu_check.sh`` drives it).

Made for a bare, offline accelerator machine: only the standard library at import
time; jax, torch and sfljax are imported inside the subcommands that need them, and
every part writes what it has to OUT before the next one starts.

  python experiments/gpu_check.py probe OUT        versions, missing optional packages,
      which test files can run (OUT/tests_plan.txt), whether sfljax imports anything
      optional eagerly, jax backend/devices, torch CUDA, fp32/bf16 matmul GFLOP/s
      -> OUT/probe.json
  python experiments/gpu_check.py bench OUT --deadline EPOCH [--smoke]
      the throughput grid, most important configuration first: benchmark.py's own
      worker (a fresh process per configuration) for sfljax, and the official-shaped
      PyTorch loop (torch_baseline.py) on the same device when torch sees one (the
      FLOPs per sample are measured once per model and reused);
      OUT/bench.json is rewritten after every configuration, so a cut run keeps its rows
  python experiments/gpu_check.py test-chunks OUT --jobs N   the collected test ids
      (OUT/tests/collected.txt) in N chunks for parallel pytest processes (0: per file)
  python experiments/gpu_check.py torch-worker SPEC_JSON     (internal) one PyTorch row
  python experiments/gpu_check.py report OUT       OUT/gpu_check.json + OUT/gpu_check.md
      from whatever the parts left (missing parts are reported as such)
"""

from __future__ import annotations

import argparse
import ast
import glob
import importlib.util
import json
import os
import re
import statistics
import subprocess
import sys
import time
import xml.etree.ElementTree as ET

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Test files that matter on an accelerator (split exchange vs whole-model references,
# unequal clients, participation/blocks/bf16, strategy equivalence, conv lowerings).
TEST_FILES = ("tests/algorithms_test.py", "tests/participation_test.py",
              "tests/conv_test.py", "tests/compositions_test.py")

# Optional packages: import name -> (distribution, what is lost without it).
OPTIONAL = {
    "tensorflow_datasets": ("tensorflow-datasets", "datasets other than the embedded digits "
                            "(and Fashion-MNIST IDX files); tests that load them"),
    "tensorboardX": ("tensorboardX", "`sfljax train` writes no TensorBoard event files "
                     "(it says so and goes on); tests/tensorboard_test.py"),
    "sklearn": ("scikit-learn", "tests that import scikit-learn"),
    "matplotlib": ("matplotlib", "plots (`sfljax plot`, `sfljax partition --plot`); tests "
                   "that draw them"),
    "PIL": ("pillow", "the HAM10000 loader; tests that need it"),
    "tensorflow": ("tensorflow", "the tfds extra"),
    "torch": ("torch", "the PyTorch baseline (experiments/torch_baseline.py) and its tests"),
}
VERSIONED = ("jax", "jaxlib", "jax-cuda12-plugin", "jax-cuda12-pjrt", "jax-cuda13-plugin",
             "jax-cuda13-pjrt", "flax", "optax", "chex", "orbax-checkpoint", "numpy", "scipy",
             "pytest", "torch", "protobuf", "tensorboardX", "tensorflow-datasets",
             "scikit-learn", "matplotlib", "pillow")

# Dense (no sparsity) bfloat16 tensor-core peaks, TFLOP/s, from the vendors' datasheets.
# Most specific names first: "H100" alone is taken to be the SXM part (nvidia-smi calls it
# "NVIDIA H100 80GB HBM3"); the PCIe and NVL parts are clocked lower.
BF16_PEAK_TFLOPS = (
    ("H200 NVL", 835.0), ("H200", 989.0), ("GH200", 989.0),
    ("H100 NVL", 835.0), ("H100 PCIE", 756.0), ("H100", 989.0),
    ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
)


def bf16_peak_tflops(card: str | None) -> float | None:
  """The card's dense bf16 peak in TFLOP/s, or None ("unknown") for other names."""
  if not card:
    return None
  name = card.upper()
  for key, peak in BF16_PEAK_TFLOPS:
    if re.search(r"(?<![A-Z0-9])" + re.escape(key) + r"(?![0-9])", name):
      return peak
  return None


def save_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w") as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(path + ".tmp", path)


def load_json(path: str):
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


# ---------------------------------------------------------------------------
# probe
# ---------------------------------------------------------------------------


def available(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except (ImportError, ValueError):
    return False


def dist_versions() -> dict:
  from importlib import metadata
  out = {}
  for name in VERSIONED:
    try:
      out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return out


def _imported(node) -> set:
  if isinstance(node, ast.Import):
    return {a.name.split(".")[0] for a in node.names}
  if isinstance(node, ast.ImportFrom) and node.module and not node.level:
    return {node.module.split(".")[0]}
  return set()


def test_requirements(path: str) -> tuple[set, set, set]:
  """Top-level modules a test file imports: at module level, through
  ``pytest.importorskip``, and inside functions (those fail rather than skip)."""
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  eager, optional, inner = set(), set(), set()
  for node in tree.body:
    eager |= _imported(node)
  for node in ast.walk(tree):
    inner |= _imported(node)
    if (isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "importorskip"
        and node.args and isinstance(node.args[0], ast.Constant)):
      optional.add(str(node.args[0].value).split(".")[0])
  return eager, optional, inner - eager


def tests_plan(root: str = ROOT) -> dict:
  """Per test file of the suite: the optional packages it needs that are missing.

  A file of TEST_FILES runs unless it imports a missing package at module level;
  ``importorskip`` ones run and skip those tests themselves."""
  local = {os.path.splitext(os.path.basename(p))[0] for p in glob.glob(
      os.path.join(root, "tests", "*.py"))} | {"sfljax", "conftest"}
  plan = {}
  for path in sorted(glob.glob(os.path.join(root, "tests", "*_test.py"))):
    rel = os.path.relpath(path, root)
    try:
      eager, optional, inner = test_requirements(path)
    except (OSError, SyntaxError) as e:
      plan[rel] = {"selected": rel in TEST_FILES, "run": False, "reason": f"unreadable: {e}"}
      continue
    missing = sorted(m for m in eager - local if not available(m))
    skips = sorted(m for m in optional if not available(m))
    inside = sorted(m for m in inner - local - optional if not available(m))
    entry = {"selected": rel in TEST_FILES, "run": rel in TEST_FILES and not missing,
             "missing_imports": missing, "importorskip_missing": skips,
             "missing_inside_tests": inside}
    if missing:
      entry["reason"] = "needs " + ", ".join(OPTIONAL.get(m, (m,))[0] for m in missing)
    plan[rel] = entry
  return plan


def sfljax_import_check() -> dict:
  """Imports what the check runs (package, config, train, CLI parser, digits) and
  lists the optional heavy modules that came in with them (should be none)."""
  watch = ("tensorflow_datasets", "tensorflow", "tensorboardX", "sklearn", "matplotlib", "PIL",
           "torch")
  before = {m for m in watch if m in sys.modules}
  out = {}
  try:
    import sfljax
    from sfljax import cli, config, data, train  # noqa: F401
    ds = data.load_digits(0)
    out.update(ok=True, sfljax_file=os.path.abspath(sfljax.__file__),
               digits_train=int(len(ds.y_train)))
    if hasattr(cli, "_parser"):
      cli._parser()                              # Builds every subcommand's flags.
  except Exception as e:  # noqa: BLE001 - reported, not raised
    out.update(ok=False, error=f"{type(e).__name__}: {e}")
  out["eager_optional_imports"] = sorted(m for m in watch if m in sys.modules and
                                         m not in before)
  return out


def nvidia_smi() -> dict | None:
  try:
    p = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,"
                        "power.limit,clocks.max.sm", "--format=csv,noheader"],
                       capture_output=True, text=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return None
  lines = [l for l in p.stdout.splitlines() if l.strip()]
  if p.returncode or not lines:
    return None
  keys = ("name", "memory_total", "driver_version", "power_limit", "max_sm_clock")
  gpus = [dict(zip(keys, (v.strip() for v in l.split(",")))) for l in lines]
  return {**gpus[0], "count": len(gpus)}


def probe(out_dir: str) -> int:
  t0 = time.time()
  info: dict = {"python": sys.version.split()[0], "executable": sys.executable,
                "versions": dist_versions(), "nvidia_smi": nvidia_smi(),
                "env": {k: os.environ.get(k) for k in (
                    "XLA_PYTHON_CLIENT_PREALLOCATE", "XLA_FLAGS", "JAX_PLATFORMS",
                    "PYTHONPATH", "PIP_NO_INDEX", "CUDA_VISIBLE_DEVICES")
                    if os.environ.get(k) is not None}}
  plan = tests_plan()
  info["tests_plan"] = plan
  info["missing_optional"] = {}
  for m, (d, why) in OPTIONAL.items():
    if available(m):
      continue
    uses = {how: [rel for rel, e in plan.items() if m in e.get(key, [])]
            for how, key in (("file skipped", "missing_imports"),
                             ("tests skip (importorskip)", "importorskip_missing"),
                             ("imported inside test functions (those may fail)", "missing_inside_tests"))}
    info["missing_optional"][m] = {"package": d, "effect": why,
                                   "test_files": {k: v for k, v in uses.items() if v}}
  with open(os.path.join(out_dir, "tests_plan.txt"), "w") as f:
    for rel in TEST_FILES:
      e = plan.get(rel, {"run": False, "reason": "file not found"})
      f.write(f"{rel}\t{'run' if e['run'] else 'skip: ' + e.get('reason', '?')}\n")
  save_json(os.path.join(out_dir, "probe.json"), info)   # Something, even if jax fails.
  info["sfljax_import"] = sfljax_import_check()
  try:
    import jax
    devs = jax.devices()
    info["jax"] = {"backend": jax.default_backend(), "devices": [str(d) for d in devs],
                   "device_kind": devs[0].device_kind, "device_count": len(devs),
                   "default_matmul_precision": jax.config.jax_default_matmul_precision}
    try:
      stats = devs[0].memory_stats() or {}
      info["jax"]["bytes_limit"] = stats.get("bytes_limit")
    except Exception:  # noqa: BLE001 - not every backend reports
      pass
    gpu = jax.default_backend() != "cpu"
    sys.path.insert(0, HERE)
    import benchmark
    info["matmul_gflops"] = {"fp32_2048": benchmark.matmul_peak()}
    n = 8192 if gpu else 1024
    info["matmul_gflops"][f"bf16_{n}"] = benchmark.matmul_peak(n, 7 if gpu else 3, "bfloat16")
  except Exception as e:  # noqa: BLE001 - reported, not raised
    info["jax_error"] = f"{type(e).__name__}: {e}"
  save_json(os.path.join(out_dir, "probe.json"), info)
  if available("torch"):
    try:
      import torch
      t = {"version": torch.__version__, "cuda_available": torch.cuda.is_available(),
           "cuda": torch.version.cuda}
      if t["cuda_available"]:
        t.update(device_name=torch.cuda.get_device_name(0),
                 cudnn=torch.backends.cudnn.version(),
                 matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
                 cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
      info["torch"] = t
    except Exception as e:  # noqa: BLE001
      info["torch"] = {"error": f"{type(e).__name__}: {e}"}
  info["seconds"] = time.time() - t0
  save_json(os.path.join(out_dir, "probe.json"), info)
  j = info.get("jax", {})
  print(f"python {info['python']}; jax {info['versions'].get('jax')}, backend "
        f"{j.get('backend', '?')}: {j.get('devices', info.get('jax_error'))}")
  print(f"card: {(info['nvidia_smi'] or {}).get('name', 'no nvidia-smi')}; torch: "
        f"{info.get('torch', 'not installed')}")
  print(f"matmul GFLOP/s: {info.get('matmul_gflops')}")
  for m, v in info["missing_optional"].items():
    print(f"missing {v['package']}: {v['effect']}"
          + "".join(f"; {how}: {', '.join(fs)}" for how, fs in v["test_files"].items()))
  imp = info["sfljax_import"]
  print(f"sfljax import: ok={imp.get('ok')} from {imp.get('sfljax_file')}, eager optional "
        f"imports: {imp['eager_optional_imports'] or 'none'} {imp.get('error', '')}")
  for rel in TEST_FILES:
    e = plan.get(rel, {"run": False, "reason": "file not found"})
    print(f"tests: {rel}: {'runs' if e['run'] else 'skipped, ' + e.get('reason', '?')}"
          + (f" (tests skip without: {', '.join(e['importorskip_missing'])})"
             if e.get("importorskip_missing") else ""))
  return 0


# ---------------------------------------------------------------------------
# bench
# ---------------------------------------------------------------------------


def bench_plan(smoke: bool) -> list[dict]:
  """The configurations, most important first (a cut run keeps the first ones)."""
  def sfl(model, k, strategy="vmap", precision="fp32", **kw):
    return {"engine": "sfljax", "model": model, "algorithm": "sflv1", "clients": k,
            "strategy": strategy, "precision": precision, **kw}

  def pt(model, k):
    return {"engine": "torch", "model": model, "algorithm": "sflv1", "clients": k}

  if smoke:   # CPU-sized: proves every path, numbers mean nothing.
    small = {"samples_per_client": 8, "batch_size": 8}
    return [sfl("lenet", 4), pt("lenet", 4), sfl("lenet", 4, "sequential"),
            sfl("lenet", 4, precision="bf16"), sfl("lenet", 2),
            sfl("resnet18", 2, **small), pt("resnet18", 2) | small,
            sfl("resnet18", 2, precision="bf16", **small)]
  return [
      sfl("lenet", 100), pt("lenet", 100),
      sfl("lenet", 100, "sequential"), sfl("lenet", 100, precision="bf16"),
      sfl("resnet18", 5), pt("resnet18", 5), sfl("resnet18", 5, precision="bf16"),
      sfl("resnet18", 100, precision="bf16"),
      sfl("lenet", 1000), sfl("lenet", 1000, "sequential"),
      sfl("lenet", 5), sfl("lenet", 5, "sequential"), pt("lenet", 5),
      sfl("resnet18", 100),
      sfl("lenet", 1000, precision="bf16"), sfl("lenet", 5, precision="bf16"),
      sfl("resnet18", 20), sfl("resnet18", 20, precision="bf16"),
      sfl("resnet18", 5, "sequential"),
  ]


def _run_json(cmd: list[str], timeout: float) -> dict:
  """Runs a worker command; its last JSON line, or why there is none."""
  try:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
  except subprocess.TimeoutExpired:
    return {"error": f"timed out after {timeout:.0f} s"}
  lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
  if proc.returncode or not lines:
    err = proc.stderr.strip().splitlines()
    keys = [l for l in err if re.search(r"(Error|RESOURCE_EXHAUSTED|out of memory)", l)]
    return {"error": f"exit {proc.returncode}: {(keys or err or ['no output'])[-1][:400]}"}
  return json.loads(lines[-1])


def _oom(row: dict) -> bool:
  return bool(re.search(r"RESOURCE_EXHAUSTED|out of memory|OOM", row.get("error", ""), re.I))


def bench(out_dir: str, deadline: float, smoke: bool, repeats: int, budget: float) -> int:
  sys.path.insert(0, HERE)
  import benchmark
  path = os.path.join(out_dir, "bench.json")
  result = {"rows": [], "torch_rows": [], "smoke": smoke, "repeats": repeats, "budget": budget,
            "deadline": deadline, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
  # Seconds a configuration is given at most, and at least needed to be worth starting.
  cap = {"lenet": 90.0, "resnet18": 120.0}
  need = {"lenet": 15.0, "resnet18": 40.0} if not smoke else {"lenet": 10.0, "resnet18": 30.0}
  walls: dict[tuple, float] = {}       # (engine, model) -> last wall seconds
  seen: dict[tuple, tuple] = {}        # sfljax (model, strategy, precision) -> (K, s/round)
  flops: dict[str, float] = {}         # model -> forward+backward FLOPs per sample
  queue = bench_plan(smoke)
  while queue:
    item = queue.pop(0)
    model, engine = item["model"], item["engine"]
    w = benchmark.WORKLOADS[model]
    spec = {"samples_per_client": w["samples_per_client"], "batch_size": w["batch_size"],
            "step_loop": "auto", "client_block": None, "repeats": repeats, "budget": budget,
            **item}
    label = (f"{engine:6s} {model:8s} K={spec['clients']:<5d} "
             f"{spec.get('strategy', 'loop'):10s} {spec.get('precision', 'fp32')}"
             f"{' block ' + str(spec['client_block']) if spec['client_block'] else ''}")
    rows = result["rows"] if engine == "sfljax" else result["torch_rows"]
    left = deadline - time.time()
    want = max(need[model], 1.2 * walls.get((engine, model), 0.0))
    if left < want:
      rows.append({**spec, "skipped": f"not started: {left:.0f} s left, about {want:.0f} s "
                                      f"needed (time budget of the check)"})
      print(f"{label}  skipped: {left:.0f} s left", flush=True)
      save_json(path, result)
      continue
    key = (model, spec.get("strategy"), spec.get("precision"))
    if engine == "sfljax" and key in seen:
      k0, s0 = seen[key]
      predicted = s0 * spec["clients"] / k0
      if predicted > budget:
        rows.append({**spec, "skipped": f"predicted {predicted:.0f} s per round > budget "
                                        f"{budget:.0f} s"})
        print(f"{label}  skipped: predicted {predicted:.0f} s/round", flush=True)
        save_json(path, result)
        continue
    timeout = min(cap[model], left)
    t0 = time.time()
    if engine == "sfljax" and model in flops:   # Known: skip the cost-analysis compile.
      spec["known_train_flops_per_sample"] = flops[model]
    r = _run_json([sys.executable, os.path.abspath(__file__), engine + "-worker",
                   json.dumps(spec)], timeout)
    wall = time.time() - t0
    walls[(engine, model)] = wall
    r = {**spec, **r, "worker_wall_seconds": wall}
    rows.append(r)
    if "error" in r:
      print(f"{label}  failed after {wall:.0f} s: {r['error']}", flush=True)
      if engine == "sfljax" and _oom(r) and not spec["client_block"]:
        queue.append({**item, "client_block": 20})   # Retry later, 20 clients at a time.
    else:
      if engine == "sfljax":
        seen[key] = (spec["clients"], r["seconds_per_round"])
        flops.setdefault(model, r.get("train_flops_per_sample"))
      extra = (f"compile {r['compile_seconds']:.1f} s, {r['gflops_per_second']:.0f} GFLOP/s"
               if engine == "sfljax" else f"device {r.get('device')}")
      print(f"{label}  {r['seconds_per_round']:.4f} s/round, {r['samples_per_second']:,.0f} "
            f"samples/s ({extra}; worker {wall:.0f} s)", flush=True)
    save_json(path, result)
  result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
  save_json(path, result)
  return 0


def sfljax_worker(spec: dict) -> int:
  """benchmark.py's worker for one sfljax configuration; with
  ``known_train_flops_per_sample`` in the spec (the same model measured before: the
  count depends on the model only) it skips that cost-analysis compile (~10-20 s for
  ResNet18 on a GPU)."""
  sys.path.insert(0, HERE)
  import benchmark
  known = spec.pop("known_train_flops_per_sample", None)
  if known:
    benchmark.train_flops_per_sample = lambda exp, batch_size: float(known)
  r = benchmark.worker(spec)
  r["flops_reused"] = bool(known)
  print(json.dumps(r))
  return 0


def _device_run_class(base, torch, device: str):
  """torch_baseline.BaselineRun with its models and data on ``device`` and a
  synchronize before each round's clock stops (the loop itself is unchanged: it
  already syncs on every batch's ``loss.item()``)."""

  class DeviceRun(base):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      self.client_model.to(device)       # In place: full_model holds these two.
      self.server_model.to(device)
      self.data = [(x.to(device), y.to(device)) for x, y in self.data]

    def run_round(self, order=None, batches=None) -> float:
      t0 = time.perf_counter()
      super().run_round(order, batches)
      if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)
      return time.perf_counter() - t0

  return DeviceRun


def torch_worker(spec: dict) -> int:
  sys.path.insert(0, HERE)
  import torch
  import torch_baseline
  import benchmark
  device = "cuda" if torch.cuda.is_available() else "cpu"
  if device != "cpu":
    torch_baseline.BaselineRun = _device_run_class(torch_baseline.BaselineRun, torch, device)
  r = benchmark.worker({**spec, "engine": "torch"})
  r["device"] = device
  if device != "cpu":
    r.update(device_name=torch.cuda.get_device_name(0),
             device_peak_bytes=int(torch.cuda.max_memory_allocated()),
             matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32,
             cudnn_allow_tf32=torch.backends.cudnn.allow_tf32)
  print(json.dumps(r))
  return 0


# ---------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------


def parse_parts(path: str) -> list[dict]:
  parts = []
  try:
    with open(path) as f:
      for line in f:
        cols = line.rstrip("\n").split("\t")
        if len(cols) >= 4:
          parts.append({"name": cols[0], "status": cols[1], "seconds": float(cols[2] or 0),
                        "limit": float(cols[3] or 0), "note": cols[4] if len(cols) > 4 else ""})
  except OSError:
    pass
  return parts


def collected_ids(out_dir: str) -> list[str]:
  """The node ids ``pytest --collect-only -q`` listed in OUT/tests/collected.txt."""
  try:
    with open(os.path.join(out_dir, "tests", "collected.txt")) as f:
      return [l.strip() for l in f if "::" in l and not l.startswith(("ERROR", "FAILED", "=="))]
  except OSError:
    return []


def test_chunks(out_dir: str, jobs: int) -> int:
  """Writes OUT/tests/<chunk>.ids (one node id a line) and prints ``chunk PATH`` lines:
  jobs 0: one chunk per file; jobs N: N chunks, the ids dealt round-robin."""
  ids = collected_ids(out_dir)
  if not ids:
    print("gpu_check: no test collected (see tests/collected.txt)", file=sys.stderr)
    return 1
  if jobs <= 0:
    chunks: dict[str, list[str]] = {}
    for i in ids:
      chunks.setdefault(os.path.splitext(os.path.basename(i.split("::")[0]))[0], []).append(i)
  else:
    n = min(jobs, len(ids))
    chunks = {f"chunk_{c + 1:02d}": ids[c::n] for c in range(n)}
  for name, members in chunks.items():
    path = os.path.join(out_dir, "tests", name + ".ids")
    with open(path, "w") as f:
      f.write("\n".join(members) + "\n")
    print(f"chunk {path}")
  return 0


def parse_junit(path: str) -> list[dict] | None:
  """One dict per test case of a junit XML file: file, name, outcome, message."""
  try:
    root = ET.parse(path).getroot()
  except (OSError, ET.ParseError):
    return None
  cases = []
  for case in root.iter("testcase"):
    if not case.get("name"):   # pytest interrupted mid-test leaves an empty <testcase/>.
      continue
    cls = case.get("classname") or ""
    outcome, msg = "passed", ""
    for tag in ("failure", "error", "skipped"):
      el = case.find(tag)
      if el is not None:
        outcome = {"failure": "failed", "error": "errors", "skipped": "skipped"}[tag]
        lines = (el.get("message") or "").strip().splitlines()
        msg = lines[0][:200] if lines else ""
        break
    cases.append({"classname": cls,
                  "name": case.get("name"), "outcome": outcome, "message": msg,
                  "seconds": float(case.get("time") or 0)})
  return cases


def parse_pytest_text(path: str) -> dict | None:
  """Counts from pytest -q's progress characters (for a run cut before its summary)."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return None
  prog = "".join(l.split(" [")[0].strip() for l in text.splitlines()
                 if re.fullmatch(r"[.FEsxX]+\s*(\[\s*\d+%\])?", l.strip()))
  return {"passed": prog.count(".") + prog.count("X"), "failed": prog.count("F"),
          "errors": prog.count("E"), "skipped": prog.count("s") + prog.count("x")}


COUNTS = ("passed", "failed", "errors", "skipped")


def _file_of(classname: str, files: list[str]) -> str:
  """The test file of a junit classname ("tests.conv_test" or "tests.conv_test.TestX")."""
  for rel in sorted(files, key=len, reverse=True):
    dotted = os.path.splitext(rel)[0].replace("/", ".")
    if classname == dotted or classname.startswith(dotted + "."):
      return rel
  return classname.replace(".", "/") + ".py" if classname else "?"


def collect_tests(out_dir: str, parts: list[dict]) -> dict:
  """Per test file: status, counts, failures; from the plan, the collected ids, every
  chunk's junit XML (or, for a chunk that left none, its progress characters)."""
  planned = []
  try:
    with open(os.path.join(out_dir, "tests_plan.txt")) as f:
      planned = [l.rstrip("\n").split("\t", 1) for l in f if l.strip()]
  except OSError:
    pass
  expected: dict[str, int] = {}
  for i in collected_ids(out_dir):
    expected[i.split("::")[0]] = expected.get(i.split("::")[0], 0) + 1
  tests: dict[str, dict] = {}
  for rel, what in planned or [(t, "run") for t in TEST_FILES]:
    if what != "run":
      tests[rel] = {"status": "skipped", "reason": what.replace("skip: ", "", 1)}
    else:
      tests[rel] = {**{k: 0 for k in COUNTS}, "collected": expected.get(rel, 0),
                    "failures": [], "seconds": 0.0}
  chunk_parts = {p["name"][len("test:"):]: p for p in parts if p["name"].startswith("test:")}
  cut, unattributed = [], {k: 0 for k in COUNTS}
  for name, p in sorted(chunk_parts.items()):
    if p["status"] not in ("ok", "rc=1"):
      cut.append(f"{name}: {p['status']}" + (f" ({p['note']})" if p["note"] else ""))
    cases = parse_junit(os.path.join(out_dir, "tests", name + ".xml"))
    if cases is None:
      for k, v in (parse_pytest_text(os.path.join(out_dir, "tests", name + ".txt")) or {}).items():
        unattributed[k] += v
      continue
    for c in cases:
      rel = _file_of(c["classname"], list(tests) + list(expected))
      t = tests.setdefault(rel, {**{k: 0 for k in COUNTS}, "collected": 0,
                                       "failures": [], "seconds": 0.0})
      if "failures" not in t:
        continue
      t[c["outcome"]] += 1
      t["seconds"] += c["seconds"]
      if c["outcome"] in ("failed", "errors"):
        t["failures"].append(f"{c['name']}: {c['message']}")
  for rel, t in tests.items():
    if t.get("status") == "skipped":
      continue
    ran = sum(t[k] for k in COUNTS)
    t["not_run"] = max(0, t["collected"] - ran)
    if t["failed"] or t["errors"]:
      t["status"] = "failed"
    elif not t["collected"]:
      t["status"] = "not collected (see tests/collected.txt)"
    elif t["not_run"]:
      t["status"] = f"incomplete: {t['not_run']} not run"
    else:
      t["status"] = "passed"
  return {"files": tests, "cut_chunks": cut, "unattributed": unattributed}


def comparisons(rows: list[dict], torch_rows: list[dict], card: str | None,
                torch_same_device: bool) -> dict:
  ok = [r for r in rows if "seconds_per_round" in r]
  by = {(r["model"], r["algorithm"], r["clients"], r["strategy"], r["precision"],
         r.get("client_block")): r for r in ok}
  out: dict = {"vmap_vs_sequential": [], "bf16_vs_fp32": [], "sfljax_vs_pytorch": [],
               "bf16_peak_fraction": []}
  for (m, a, k, s, p, b), r in sorted(by.items(), key=lambda x: str(x[0])):
    if s == "vmap" and p == "fp32" and (m, a, k, "sequential", p, b) in by:
      q = by[(m, a, k, "sequential", p, b)]
      out["vmap_vs_sequential"].append({
          "model": m, "algorithm": a, "clients": k, "vmap_s_per_round": r["seconds_per_round"],
          "sequential_s_per_round": q["seconds_per_round"],
          "vmap_speedup": q["seconds_per_round"] / r["seconds_per_round"]})
    if p == "bf16" and (m, a, k, s, "fp32", b) in by:
      q = by[(m, a, k, s, "fp32", b)]
      out["bf16_vs_fp32"].append({
          "model": m, "algorithm": a, "clients": k, "strategy": s,
          "fp32_s_per_round": q["seconds_per_round"], "bf16_s_per_round": r["seconds_per_round"],
          "bf16_speedup": q["seconds_per_round"] / r["seconds_per_round"]})
  for t in torch_rows:
    if "samples_per_second" not in t:
      continue
    for r in ok:
      if (r["model"], r["algorithm"], r["clients"]) == (t["model"], t["algorithm"], t["clients"]):
        out["sfljax_vs_pytorch"].append({
            "model": r["model"], "algorithm": r["algorithm"], "clients": r["clients"],
            "strategy": r["strategy"], "precision": r["precision"],
            "sfljax_samples_per_second": r["samples_per_second"],
            "pytorch_samples_per_second": t["samples_per_second"],
            "pytorch_device": t.get("device"), "same_device": torch_same_device,
            "ratio": r["samples_per_second"] / t["samples_per_second"]})
  peak = bf16_peak_tflops(card)
  for r in ok:
    if r["precision"] == "bf16" and r.get("gflops_per_second"):
      out["bf16_peak_fraction"].append({
          "model": r["model"], "algorithm": r["algorithm"], "clients": r["clients"],
          "strategy": r["strategy"], "train_flops_per_sample": r.get("train_flops_per_sample"),
          "achieved_tflops": r["gflops_per_second"] / 1e3, "peak_tflops": peak,
          "fraction_of_peak": r["gflops_per_second"] / 1e3 / peak if peak else None})
  return out


def _metrics(out_dir: str, folder: str) -> tuple[list[dict], list[str]] | None:
  """A `sfljax train` part's rounds (metrics.jsonl) and the last lines of its stderr."""
  try:
    with open(os.path.join(out_dir, folder, "metrics.jsonl")) as f:
      m = [json.loads(l) for l in f if l.strip()]
  except (OSError, ValueError):
    return None
  if not m:
    return None
  try:
    with open(os.path.join(out_dir, folder, "stderr.txt")) as f:
      messages = [l.strip() for l in f if l.strip()][-5:]
  except OSError:
    messages = []
  return m, messages


def _median(xs: list) -> float | None:
  xs = [x for x in xs if x is not None]
  return statistics.median(xs) if xs else None


def collect_train(out_dir: str) -> dict | None:
  got = _metrics(out_dir, "train_u_sflv1")
  if got is None:
    return None
  m, messages = got
  secs = [r.get("seconds") for r in m]
  return {"rounds": len(m), "seconds_per_round": secs, "stderr": messages,
          "median_seconds_per_round": _median(secs),
          "final_test_accuracy": m[-1].get("test_accuracy"),
          "best_test_accuracy": max(r.get("test_accuracy") or 0 for r in m)}


LEAK_KEYS = ("leak_dcor", "leak_label_auc", "leak_inversion_mse", "leak_inversion_psnr",
             "leak_inversion_ssim")


def collect_leakage(out_dir: str) -> dict | None:
  """The leakage part: the measures' seconds per round beside the round's training seconds.

  The first round's measures include their compilation; the steady cost is the median of
  the later rounds (every round trains the inversion decoder in this part)."""
  got = _metrics(out_dir, "leakage_sflv1")
  if got is None:
    return None
  m, messages = got
  leak = [r.get("leakage_seconds") for r in m]
  train = [r.get("train_seconds", r.get("seconds")) for r in m]
  later, later_train = leak[1:], train[1:]    # Empty after one round: no steady cost.
  cfg = (load_json(os.path.join(out_dir, "leakage_sflv1", "config.json")) or {}).get("config", {})
  return {"clients": cfg.get("clients"), "dataset": cfg.get("dataset"),
          "rounds": len(m), "leakage_seconds_per_round": leak,
          "train_seconds_per_round": train, "stderr": messages,
          "first_round_leakage_seconds": leak[0],
          "median_leakage_seconds_after_first": _median(later),
          "median_train_seconds_after_first": _median(later_train),
          "last": {k: m[-1].get(k) for k in LEAK_KEYS + ("test_accuracy",)}}


def build_report(out_dir: str) -> dict:
  probe_info = load_json(os.path.join(out_dir, "probe.json")) or {}
  bench_info = load_json(os.path.join(out_dir, "bench.json")) or {}
  parts = parse_parts(os.path.join(out_dir, "parts.tsv"))
  j = probe_info.get("jax", {})
  smi = probe_info.get("nvidia_smi") or {}
  backend = j.get("backend")
  card = smi.get("name") or (j.get("device_kind") if backend not in (None, "cpu") else None)
  torch_info = probe_info.get("torch") or {}
  torch_rows = bench_info.get("torch_rows", [])
  devs = {t.get("device") for t in torch_rows if "device" in t}
  torch_same = bool(devs) and devs == {"cuda" if backend == "gpu" else "cpu"}
  rows = bench_info.get("rows", [])
  # Parts that were not started, were cut or failed (a test process's rc=1 is a test
  # failure: the Tests section has it).
  skipped_parts = [{"part": p["name"], "reason": p["note"] or p["status"]}
                   for p in parts if p["status"] != "ok"
                   and not (p["name"].startswith("test:") and p["status"] == "rc=1")]
  for m, v in (probe_info.get("missing_optional") or {}).items():
    files = "".join(f"; {how}: {', '.join(fs)}" for how, fs in (v.get("test_files") or {}).items())
    skipped_parts.append({"part": f"needs {v['package']}", "reason": v["effect"] + files})
  report = {
      "kind": "GPU" if backend == "gpu" else (backend or "unknown").upper(),
      "smoke": bool(bench_info.get("smoke")), "card": card, "nvidia_smi": smi or None,
      "backend": backend, "devices": j.get("devices"), "python": probe_info.get("python"),
      "versions": probe_info.get("versions"), "torch": torch_info or None,
      "missing_optional": probe_info.get("missing_optional"),
      "sfljax_import": probe_info.get("sfljax_import"),
      "matmul_gflops": probe_info.get("matmul_gflops"), "env": probe_info.get("env"),
      "bf16_peak_tflops": bf16_peak_tflops(card),
      "parts": parts, "skipped": skipped_parts,
      "tests": collect_tests(out_dir, parts),
      "benchmark": {"rows": rows, "torch_rows": torch_rows,
                    "repeats": bench_info.get("repeats"), "budget": bench_info.get("budget")},
      "comparisons": comparisons(rows, torch_rows, card, torch_same),
      "train_u_sflv1": collect_train(out_dir),
      "leakage_sflv1": collect_leakage(out_dir),
      "date": time.strftime("%Y-%m-%d %H:%M:%S"),
  }
  t = list(report["tests"]["files"].values()) + [report["tests"]["unattributed"]]
  report["tests_total"] = {k: sum(int(x.get(k) or 0) for x in t) for k in COUNTS}
  return report


def _f(x, fmt="{:.3f}", none="-"):
  return none if x is None else fmt.format(x)


def markdown(rep: dict) -> str:
  L = []
  kind = rep["kind"] + (" (SMOKE: tiny sizes, numbers mean nothing)" if rep["smoke"] else "")
  L += [f"# Accelerator check: {kind}", ""]
  if rep["kind"] != "GPU":
    L += [f"**No GPU backend: everything below ran on {rep['backend'] or 'an unknown backend'}.**",
          ""]
  v = rep.get("versions") or {}
  L += [f"- card: {rep['card'] or 'none'}"
        + (f" ({rep['nvidia_smi'].get('memory_total')}, driver "
           f"{rep['nvidia_smi'].get('driver_version')})" if rep.get("nvidia_smi") else ""),
        f"- jax backend: {rep['backend']}; devices: {rep['devices']}",
        "- versions: " + ", ".join(f"{k} {v[k]}" for k in sorted(v)),
        f"- torch: {_torch_line(rep.get('torch'))}"]
  mm = rep.get("matmul_gflops") or {}
  if mm:
    L.append("- matmul GFLOP/s: " + ", ".join(f"{k} {x:,.0f}" for k, x in mm.items()))
  env = rep.get("env") or {}
  if env:
    L.append("- environment: " + ", ".join(f"{k}={v}" for k, v in env.items()))
  imp = rep.get("sfljax_import") or {}
  if imp:
    L.append(f"- sfljax import ({imp.get('sfljax_file')}): "
             f"{'ok' if imp.get('ok') else 'FAILED ' + str(imp.get('error'))}; optional modules "
             f"imported eagerly: {', '.join(imp.get('eager_optional_imports') or []) or 'none'}")
  L += ["", "## Skipped or cut", ""]
  L += [f"- {s['part']}: {s['reason']}" for s in rep["skipped"]] or ["- nothing"]
  L += ["", "## Tests", "", "| file | status | passed | failed | errors | skipped | s |",
        "| --- | --- | --- | --- | --- | --- | --- |"]
  for rel, t in rep["tests"]["files"].items():
    L.append(f"| {rel} | {t['status']}{': ' + t['reason'] if t.get('reason') else ''} "
             f"| {t.get('passed', '')} | {t.get('failed', '')} | {t.get('errors', '')} "
             f"| {t.get('skipped', '')} | {_f(t.get('seconds'), '{:.0f}', '')} |")
  tt, un = rep["tests_total"], rep["tests"]["unattributed"]
  L += ["", f"Total: {tt['passed']} passed, {tt['failed']} failed, {tt['errors']} errors, "
            f"{tt['skipped']} skipped (-x: a process stops at its first failure)."]
  if any(un.values()):
    L.append(f"Counted from the output of processes that left no XML: {un}.")
  for c in rep["tests"]["cut_chunks"]:
    L.append(f"- test process {c}")
  for rel, t in rep["tests"]["files"].items():
    for fail in t.get("failures", []):
      L.append(f"- FAILED {rel}::{fail}")
  c = rep["comparisons"]
  L += ["", "## Headline", ""]
  h = [x for x in c["sfljax_vs_pytorch"] if x["model"] == "lenet" and x["clients"] == 100]
  for x in h:
    L.append(f"- LeNet, {x['clients']} clients, {x['algorithm']}, sfljax {x['strategy']} "
             f"{x['precision']}: {x['sfljax_samples_per_second']:,.0f} samples/s vs PyTorch "
             f"({x['pytorch_device']}) {x['pytorch_samples_per_second']:,.0f}: "
             f"**{x['ratio']:.2f}x**{'' if x['same_device'] else ' (NOT the same device)'}")
  if not h:
    L.append("- LeNet 100 clients vs PyTorch: no pair of rows (see below)")
  for x in c["bf16_peak_fraction"]:
    if x["model"] == "resnet18":
      L.append(f"- ResNet18 64x64 bf16, {x['clients']} clients {x['strategy']}: "
               f"{x['achieved_tflops']:.3g} TFLOP/s "
               f"({(x['train_flops_per_sample'] or 0) / 1e9:.3g} GFLOP per sample fwd+bwd) = "
               + (f"**{100 * x['fraction_of_peak']:.1f}%** of the card's dense bf16 peak "
                  f"({x['peak_tflops']:.0f} TFLOP/s)" if x["fraction_of_peak"] is not None
                  else "fraction of peak unknown (card not in the table)"))
  L += ["", "## Benchmark (sfljax)", "",
        f"repeats {rep['benchmark'].get('repeats')}, budget {rep['benchmark'].get('budget')} s "
        "per round; samples/s = training samples per round / median s per round; GFLOP/s from "
        "XLA's cost analysis of the whole model's forward+backward.", "",
        "| model | K | strategy | precision | compile s | s/round | samples/s | GFLOP/s "
        "| device peak |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
  for r in rep["benchmark"]["rows"]:
    strat = r.get("strategy", "") + (f" (block {r['client_block']})"
                                     if r.get("client_block") else "")
    if "seconds_per_round" not in r:
      L.append(f"| {r['model']} | {r['clients']} | {strat} | {r.get('precision')} "
               f"| {r.get('skipped') or r.get('error')} | | | | |")
      continue
    pb = r.get("device_peak_bytes")
    L.append(f"| {r['model']} | {r['clients']} | {strat} | {r['precision']} "
             f"| {r['compile_seconds']:.1f} | {r['seconds_per_round']:.4f} "
             f"| {r['samples_per_second']:,.0f} | {r['gflops_per_second']:,.0f} "
             f"| {_f(pb and pb / 2**30, '{:.2f} GiB')} |")
  L += ["", "## PyTorch loop (official-shaped, experiments/torch_baseline.py)", "",
        "| model | K | device | s/round | samples/s |", "| --- | --- | --- | --- | --- |"]
  for t in rep["benchmark"]["torch_rows"]:
    if "seconds_per_round" not in t:
      L.append(f"| {t['model']} | {t['clients']} | | {t.get('skipped') or t.get('error')} | |")
    else:
      L.append(f"| {t['model']} | {t['clients']} | {t.get('device')} "
               f"| {t['seconds_per_round']:.4f} | {t['samples_per_second']:,.0f} |")
  L += ["", "## Ratios", "", "sfljax / PyTorch (samples/s; same samples per round):", ""]
  L += [f"- {x['model']} K={x['clients']} {x['algorithm']} sfljax {x['strategy']} "
        f"{x['precision']}: {x['ratio']:.2f}x (PyTorch on {x['pytorch_device']}"
        f"{'' if x['same_device'] else ', not the same device'})"
        for x in c["sfljax_vs_pytorch"]] or ["- none"]
  L += ["", "vmap vs sequential (fp32; sequential s/round / vmap s/round):", ""]
  L += [f"- {x['model']} K={x['clients']}: {x['vmap_speedup']:.2f}x"
        for x in c["vmap_vs_sequential"]] or ["- none"]
  L += ["", "bf16 vs fp32 (fp32 s/round / bf16 s/round):", ""]
  L += [f"- {x['model']} K={x['clients']} {x['strategy']}: {x['bf16_speedup']:.2f}x"
        for x in c["bf16_vs_fp32"]] or ["- none"]
  tr = rep.get("train_u_sflv1")
  L += ["", "## U-shaped SFLV1 (cut 1,4: labels on the clients), vmap, `sfljax train`", ""]
  if tr:
    L.append(f"- {tr['rounds']} rounds, median {tr['median_seconds_per_round']:.3f} s/round, "
             f"final test accuracy {tr['final_test_accuracy']:.4f} "
             f"(best {tr['best_test_accuracy']:.4f})")
    L += [f"- stderr: {m}" for m in tr.get("stderr") or []]
  else:
    L.append("- no result (see the parts table)")
  lk = rep.get("leakage_sflv1")
  L += ["", "## Leakage measures (`--leakage`, decoder every round), two-part SFLV1, vmap, "
        "`sfljax train`", ""]
  if lk:
    last = lk["last"]
    later = (f"median **{_f(lk['median_leakage_seconds_after_first'], '{:.2f}')} s** per "
             f"later round, against {_f(lk['median_train_seconds_after_first'], '{:.3f}')} s "
             "of training" if lk["rounds"] > 1 else "no later round (see the parts table)")
    L.append(f"- {lk['clients'] or '?'} clients, {lk['dataset'] or '?'}, {lk['rounds']} "
             f"round(s); measures {_f(lk['first_round_leakage_seconds'], '{:.2f}')} s in "
             f"round 1 (with their compilation); {later}")
    L.append("- last round: " + ", ".join(f"{k} {_f(last.get(k), '{:.3f}')}"
                                          for k in LEAK_KEYS + ("test_accuracy",)))
    L += [f"- stderr: {m}" for m in lk.get("stderr") or []]
  else:
    L.append("- no result (see the parts table)")
  L += ["", "## Parts", "", "| part | status | s | limit s | note |", "| --- | --- | --- | --- | --- |"]
  L += [f"| {p['name']} | {p['status']} | {p['seconds']:.0f} | {p['limit']:.0f} | {p['note']} |"
        for p in rep["parts"]]
  return "\n".join(L) + "\n"


def _torch_line(t) -> str:
  if not t:
    return "not installed (PyTorch baseline skipped)"
  if "error" in t:
    return t["error"]
  dev = t.get("device_name") if t.get("cuda_available") else "CPU only"
  return f"{t.get('version')} (CUDA {t.get('cuda')}), {dev}"


def report(out_dir: str) -> int:
  rep = build_report(out_dir)
  save_json(os.path.join(out_dir, "gpu_check.json"), rep)
  md = markdown(rep)
  with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
    f.write(md)
  print(md)
  return 0


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="command", required=True)
  sub.add_parser("probe").add_argument("out")
  b = sub.add_parser("bench")
  b.add_argument("out")
  b.add_argument("--deadline", type=float, required=True, help="epoch seconds: start nothing "
                 "that would end after it")
  b.add_argument("--smoke", action="store_true")
  b.add_argument("--repeats", type=int, default=3)
  b.add_argument("--budget", type=float, default=10.0, help="benchmark.py's --budget")
  sub.add_parser("torch-worker").add_argument("spec")
  sub.add_parser("sfljax-worker").add_argument("spec")
  sub.add_parser("report").add_argument("out")
  c = sub.add_parser("test-chunks")
  c.add_argument("out")
  c.add_argument("--jobs", type=int, default=0, help="0: one chunk per test file")
  args = p.parse_args(argv)
  if args.command == "probe":
    return probe(args.out)
  if args.command == "bench":
    return bench(args.out, args.deadline, args.smoke, args.repeats, args.budget)
  if args.command == "torch-worker":
    return torch_worker(json.loads(args.spec))
  if args.command == "sfljax-worker":
    return sfljax_worker(json.loads(args.spec))
  if args.command == "test-chunks":
    return test_chunks(args.out, args.jobs)
  return report(args.out)


if __name__ == "__main__":
  sys.exit(main())
