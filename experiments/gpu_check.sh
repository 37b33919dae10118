#!/usr/bin/env bash
# One prepared accelerator check (GPU/TPU), to run when a device machine is lent:
#   bash experiments/gpu_check.sh [OUT_DIR]
# 1. installs the project with the CUDA build of jax (skipped if jax already sees a GPU),
# 2. runs the correctness tests that matter on the accelerator (split exchange vs whole-model
#    references, unequal clients, participation/blocks/bf16, strategy equivalence),
# 3. runs the throughput benchmark with vmap vs sequential clients, fp32 and bf16,
#    LeNet at 5/100/1000 clients and ResNet18 64x64 at 5/20/100 clients,
# 4. trains U-shaped SFLV1 (cut 1,4: labels on the clients) with 100 vmapped clients,
# 5. writes everything (with nvidia-smi's description of the card) to OUT_DIR.
# Sized to finish in about 8 minutes on one H100; each part has its own time limit.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu_check.log") 2>&1

date
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$OUT/card.csv"
if ! python3 -c "import jax, sys; sys.exit(jax.default_backend() == 'cpu')" 2>/dev/null; then
  echo "== installing jax[cuda13] and the project"
  timeout 240 python3 -m pip install --quiet "jax[cuda13]" || timeout 240 python3 -m pip install --quiet "jax[cuda12]"
fi
timeout 120 python3 -m pip install --quiet -e ".[test]"
python3 -c "import jax; print('backend', jax.default_backend(), jax.devices())" | tee "$OUT/backend.txt"

echo "== correctness on the accelerator"
timeout 240 python3 -m pytest -q -x \
  tests/algorithms_test.py tests/participation_test.py tests/conv_test.py \
  2>&1 | tail -15 | tee "$OUT/tests.txt"

echo "== throughput: vmap vs sequential, fp32 and bf16"
for strategy in vmap sequential; do
  timeout 150 python3 experiments/benchmark.py --models lenet --clients 5 100 1000 \
    --algorithms sflv1 sflv2 fl --strategy "$strategy" --repeats 3 --budget 20 \
    --out "$OUT/benchmark_gpu_lenet_$strategy.json"
done
timeout 100 python3 experiments/benchmark.py --models lenet --clients 100 1000 \
  --algorithms sflv1 --strategy vmap --precision bf16 --repeats 3 --budget 20 \
  --out "$OUT/benchmark_gpu_lenet_vmap_bf16.json"
timeout 150 python3 experiments/benchmark.py --models resnet18 --clients 5 20 100 \
  --algorithms sflv1 fl --strategy vmap --repeats 3 --budget 20 \
  --out "$OUT/benchmark_gpu_resnet18_vmap.json"
echo "== U-shaped SFLV1, vmap, 100 clients (digits, LeNet cut 1,4)"
timeout 120 python3 -m sfljax train --algorithm sflv1 --cut 1,4 --clients 100 --strategy vmap \
  --rounds 5 --quiet --overwrite --out "$OUT/u_sflv1_vmap_100" \
  && python3 -c "import json, sys; m = [json.loads(l) for l in open(sys.argv[1])]; \
print('s/round', [round(r['seconds'], 3) for r in m], 'acc', m[-1]['test_accuracy'])" \
  "$OUT/u_sflv1_vmap_100/metrics.jsonl" | tee "$OUT/u_sflv1_vmap_100.txt"
date
