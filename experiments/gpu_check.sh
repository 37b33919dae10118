#!/usr/bin/env bash
# One prepared accelerator check, for a bare OFFLINE GPU machine (nothing is installed:
# the project runs in place with PYTHONPATH; jax/flax/optax/chex/orbax/numpy/scipy/pytest
# and, optionally, torch must already be there):
#   bash experiments/gpu_check.sh OUT_DIR          # ~8 minutes on one H100
#   SMOKE=1 bash experiments/gpu_check.sh OUT_DIR  # tiny sizes (CPU proof of the script)
# Parts, each with its own time limit inside one overall deadline; a part that fails or
# is cut is logged and the script goes on:
#   probe   card (nvidia-smi), versions, missing optional packages, jax backend/devices,
#           torch CUDA, matmul GFLOP/s, which test files can run without the missing ones
#   tests   tests/{algorithms,participation,conv,compositions}_test.py (-x -q): on a GPU
#           machine the collected tests are dealt to up to 12 pytest processes running side
#           by side; on CPU one process per file, one after another
#   bench   vmap vs sequential, fp32 vs bf16, LeNet 5/100/1000 and ResNet18 64x64 5/20/100
#           clients (benchmark.py's worker), and the official-shaped PyTorch loop on the
#           same device (LeNet 100 and 5, ResNet18 5), most important first
#   train   U-shaped SFLV1 (cut 1,4), 100 vmapped clients, `python -m sfljax train`
#   leakage the leakage measures (`--leakage`, inversion decoder every round) on two-part
#           SFLV1 with 100 vmapped clients, timed per round (leakage_seconds)
#   report  OUT_DIR/gpu_check.json and OUT_DIR/gpu_check.md (always written)
# Without a GPU backend everything runs on CPU and the report says CPU.
# Environment: PYTHON (default python3), SMOKE=1, GPU_CHECK_PARTS (default "tests bench
# train leakage"; probe and report always run), GPU_CHECK_SECONDS (overall budget,
# default 470; the device machine's per-command limit is 600), GPU_CHECK_TEST_JOBS
# (parallel pytest processes; default 3/4 of the cores, at most 12, on a GPU; 0 = per file).
# Budget on an H100 (limits; most parts should end well before them):
#   probe <=90 s | test collection <=60 s | tests <=120 s | bench: until 155 s before the
#   end (each configuration <=90 s LeNet / 120 s ResNet18, none started without time to
#   finish) | train <=60 s | leakage <=75 s | report <=60 s (reserve 20 s)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT/tests"
OUT="$(cd "$OUT" && pwd)"
exec > >(tee "$OUT/gpu_check.log") 2>&1

PY="${PYTHON:-python3}"
SMOKE="${SMOKE:-0}"
PARTS=" ${GPU_CHECK_PARTS:-tests bench train leakage} "
want() { [[ "$PARTS" == *" $1 "* ]]; }
START=$(date +%s)
TOTAL="${GPU_CHECK_SECONDS:-470}"            # The machine's per-command limit is 600 s.
END=$((START + TOTAL))
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"   # The project in place: no install.
export PIP_NO_INDEX=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
# Several processes share the GPU (parallel test files; the bench driver and its workers):
# allocate on demand instead of taking 75% of the memory in the first process.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
: > "$OUT/parts.tsv"

# record NAME STATUS SECONDS LIMIT [NOTE]  -> one line of OUT/parts.tsv
record() { printf '%s\t%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" "${5:-}" >> "$OUT/parts.tsv"; }
left() { echo $((END - $(date +%s))); }
# limit CAP [RESERVE]: seconds a part may take (CAP, or what is left before RESERVE s
# before the end), 0 if under 10 s.
limit() {
  local l=$(( $(left) - ${2:-0} )); (( l > $1 )) && l=$1; (( l < 10 )) && l=0; echo "$l"
}
status_of() { case "$1" in 0) echo ok ;; 124|137) echo "timed out" ;; *) echo "rc=$1" ;; esac; }
# part NAME CAP RESERVE cmd...: runs cmd under `timeout`, logs and records it.
part() {
  local name=$1 cap=$2 reserve=$3; shift 3
  local t; t=$(limit "$cap" "$reserve")
  if (( t == 0 )); then
    echo "== $name: skipped, $(left) s left"; record "$name" skipped 0 0 "not started: $(left) s left"
    return 0
  fi
  echo "== $name (limit ${t} s, $(left) s left) $(date +%T)"
  local s=$(date +%s) rc
  timeout -k 10 "$t" "$@"; rc=$?
  local st; st=$(status_of $rc)
  echo "== $name: $st after $(( $(date +%s) - s )) s"
  record "$name" "$st" $(( $(date +%s) - s )) "$t"
  return 0
}

echo "gpu_check: $(date), repo $PWD, python $(command -v "$PY"), SMOKE=$SMOKE, budget ${TOTAL} s"
nvidia-smi 2>/dev/null | head -20 || echo "no nvidia-smi"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null > "$OUT/card.csv"

# -- probe ------------------------------------------------------------------------------------
part probe 90 0 "$PY" experiments/gpu_check.py probe "$OUT"
BACKEND=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['jax']['backend'])" \
  "$OUT/probe.json" 2>/dev/null || echo unknown)
echo "jax backend: $BACKEND"

# -- tests ------------------------------------------------------------------------------------
FILES=()
if [[ -s "$OUT/tests_plan.txt" ]]; then
  while IFS=$'\t' read -r f what; do
    if [[ "$what" == run ]]; then FILES+=("$f"); else echo "== test:$f $what"; fi
  done < "$OUT/tests_plan.txt"
else   # The probe died: try them all.
  FILES=(tests/algorithms_test.py tests/participation_test.py tests/conv_test.py
         tests/compositions_test.py)
fi
KOPT=()
# Smoke: a few quick tests per file (proves the files import and run; the whole four take
# ~18 minutes in one process on the shared 2-core development machine).
[[ "$SMOKE" == 1 ]] && KOPT=(-k "auto_rule or bad_arguments or sample_clients or refused or same_seed")
# run_chunk NAME LIMIT NODEIDS...: one pytest process; SIGINT at the limit, so pytest still
# writes its junit XML with the tests it finished.
run_chunk() {
  local name=$1 t=$2; shift 2
  local s=$(date +%s) rc
  SFLJAX_TEST_COMPILATION_CACHE="$WORK/xla_cache_$name" timeout -s INT -k 15 "$t" \
    "$PY" -m pytest -p no:cacheprovider -x -q --junitxml="$OUT/tests/$name.xml" "$@" \
    > "$OUT/tests/$name.txt" 2>&1; rc=$?
  record "test:$name" "$(status_of $rc)" $(( $(date +%s) - s )) "$t"
  echo "== test:$name: $(status_of $rc) after $(( $(date +%s) - s )) s: $(tail -1 "$OUT/tests/$name.txt")"
}
# The test files are compile-bound (one CPU core each): on a GPU machine their tests are
# dealt round-robin to JOBS processes that run side by side (-x stops only its own chunk);
# on CPU, one process per file, one after another.
if [[ "$BACKEND" == cpu || "$BACKEND" == unknown ]]; then JOBS=0
else JOBS=$(( $(nproc 2>/dev/null || echo 2) * 3 / 4 )); (( JOBS > 12 )) && JOBS=12; (( JOBS < 1 )) && JOBS=1; fi
JOBS="${GPU_CHECK_TEST_JOBS:-$JOBS}"
TEST_CAP=120
want tests || FILES=()
if (( ${#FILES[@]} )); then
  part test-collect 60 300 "$PY" -m pytest -p no:cacheprovider --collect-only -q "${KOPT[@]}" \
    "${FILES[@]}" > "$OUT/tests/collected.txt" 2>&1
  echo "== test-collect: $(grep -E 'collected|error' "$OUT/tests/collected.txt" | tail -1)"
  "$PY" experiments/gpu_check.py test-chunks "$OUT" --jobs "$JOBS" > "$WORK/chunks.txt" \
    || printf '%s\n' "${FILES[@]}" | sed 's/^/file /' > "$WORK/chunks.txt"
  mapfile -t CHUNKS < "$WORK/chunks.txt"
  echo "== tests: ${#CHUNKS[@]} chunk(s), jobs=$JOBS, $(left) s left"
  PIDS=()
  for c in "${CHUNKS[@]}"; do
    read -r kind arg <<< "$c"
    if [[ "$kind" == file ]]; then name=$(basename "$arg" .py); IDS=("${KOPT[@]}" "$arg")
    else name=$(basename "$arg" .ids); mapfile -t IDS < "$arg"; fi
    T=$(limit "$TEST_CAP" 240)
    if (( T == 0 )); then record "test:$name" skipped 0 0 "not started: $(left) s left"; continue; fi
    if (( JOBS > 0 )); then run_chunk "$name" "$T" "${IDS[@]}" & PIDS+=($!)
    else run_chunk "$name" "$T" "${IDS[@]}"; fi
  done
  (( ${#PIDS[@]} )) && wait "${PIDS[@]}"
fi

# -- benchmark --------------------------------------------------------------------------------
# The driver starts nothing it cannot finish before its deadline (the end less the train,
# leakage and report reserve) and saves OUT/bench.json after every configuration.
RESERVE=$([[ "$SMOKE" == 1 ]] && echo 120 || echo 155)
DEADLINE=$((END - RESERVE))
BENCH_ARGS=(--deadline "$DEADLINE" --repeats 3 --budget 10)
[[ "$SMOKE" == 1 ]] && BENCH_ARGS=(--deadline "$DEADLINE" --smoke --repeats 1 --budget 5)
want bench && part bench $((DEADLINE - $(date +%s) + 20)) $((RESERVE - 20)) \
  "$PY" experiments/gpu_check.py bench "$OUT" "${BENCH_ARGS[@]}"

# -- U-shaped SFLV1 via the CLI ---------------------------------------------------------------
# Without tensorboardX `sfljax train` says so on stderr and writes no event files (cli.py).
K=$([[ "$SMOKE" == 1 ]] && echo 5 || echo 100); R=$([[ "$SMOKE" == 1 ]] && echo 2 || echo 5)
if want train; then
  mkdir -p "$OUT/train_u_sflv1"
  part train 60 95 "$PY" -m sfljax train --algorithm sflv1 --cut 1,4 --clients "$K" \
    --strategy vmap --rounds "$R" --checkpoint-every 0 --quiet --overwrite \
    --out "$WORK/u_sflv1" 2> "$OUT/train_u_sflv1/stderr.txt"
  tail -5 "$OUT/train_u_sflv1/stderr.txt"
  cp "$WORK"/u_sflv1/{config.json,metrics.jsonl,summary.json} "$OUT/train_u_sflv1/" 2>/dev/null
fi

# -- the leakage measures at K clients -------------------------------------------------------
# Two-part SFLV1 (the server computes the loss, so the label attack has gradients to score);
# the inversion decoder trains every round, so every round after the first (which compiles)
# times all the measures. leakage_seconds per round is in metrics.jsonl, apart from seconds.
# Smoke: 2 rounds and a 50-step decoder (one CPU round of the full measures takes ~40 s).
LEAK_ARGS=(--rounds 3)
[[ "$SMOKE" == 1 ]] && LEAK_ARGS=(--rounds 2 --leakage-decoder-steps 50)
if want leakage; then
  mkdir -p "$OUT/leakage_sflv1"
  part leakage 75 20 "$PY" -m sfljax train --algorithm sflv1 --clients "$K" --strategy vmap \
    "${LEAK_ARGS[@]}" --leakage --leakage-inversion-every 1 --checkpoint-every 0 --quiet \
    --overwrite --out "$WORK/leak_sflv1" 2> "$OUT/leakage_sflv1/stderr.txt"
  tail -5 "$OUT/leakage_sflv1/stderr.txt"
  cp "$WORK"/leak_sflv1/{config.json,metrics.jsonl,summary.json} "$OUT/leakage_sflv1/" 2>/dev/null
fi

# -- report -----------------------------------------------------------------------------------
echo "== report ($(left) s left)"
timeout -k 5 60 "$PY" experiments/gpu_check.py report "$OUT" > "$WORK/report.txt" 2>&1
rc=$?
if (( rc )); then   # Never leave without a report.
  echo "report writer failed (rc=$rc):"; tail -20 "$WORK/report.txt"
  { echo "# Accelerator check: report writer failed (rc=$rc)"; echo; echo '```'
    tail -40 "$WORK/report.txt"; echo '```'; echo; echo "## parts"; echo '```'
    cat "$OUT/parts.tsv"; echo '```'; } > "$OUT/gpu_check.md"
  printf '{"error": "report writer failed (rc=%s)", "parts_tsv": "parts.tsv"}\n' "$rc" \
    > "$OUT/gpu_check.json"
else
  cat "$WORK/report.txt"
fi
rm -rf "$WORK"
echo "gpu_check: done in $(( $(date +%s) - START )) s; $OUT/gpu_check.md, $OUT/gpu_check.json"
exit 0
