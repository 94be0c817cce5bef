#!/usr/bin/env bash
# One unattended GPU session (issue 12, section 4): run from the repository root on a CUDA machine whose python3
# has torch, with the wheels of benchmarks/prepare_gpu_wheels.sh carried in benchmarks/out/wheels:
#
#   run(command="bash benchmarks/gpu_session.sh", carry=["benchmarks/out/wheels"], timeout_s=600)
#
# Steps, each under its own timeout inside a global budget (BUDGET_S, default 540 s of wall time; a step is
# skipped when less than its minimum is left), results written as they come:
#   0. machine facts (nvidia-smi, CPU, python, torch)                                      -> gpu_info.txt
#   1. install the carried wheels: ours -> /tmp/tf-ours (anndata, pooch, ...),
#      published 0.6.1 and its pins -> /tmp/tf-published (used only by the published runs)
#   2. CUDA correctness: pytest -m gpu tests/test_gpu.py                                    -> tests.log
#   3. bf16 matmul rate of the card (8192^3), the reference for "% of matmul"
#   4. TF-Sapiens shape: random checkpoint + 2,048 synthetic cells (first 1,024 also as their own file);
#      ours in bf16 on 2,048 cells (cold, warm, fp32 check on 256) and, same process, on the 1,024; the published CLI
#      (bf16-mixed, batch 8, its defaults otherwise) on the same 1,024; agreement
#   5. TF-Metazoa-shaped vocabulary (V = 247,389, gene head 512 wide): checkpoint (~5.7 GB), ours and the
#      published CLI on the first 256 of the same cells
#   6. summary                                                                               -> summary.txt
# Everything goes to $OUT (default $OUT of the device tool, else benchmarks/out/gpu-session): results.json
# (one section per step), session.log (all output), steps.txt (timeline), tests.log, gpu_info.txt, summary.txt.
#
# SMOKE=1 runs every step at tiny sizes on whatever device there is (the CPU here), to check the script.
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-benchmarks/out/gpu-session}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
BUDGET=${BUDGET_S:-540}
WHEELS=${WHEELS:-benchmarks/out/wheels}
WORK=${WORK:-/tmp/tf-gpu-work}
PY=${PYTHON:-python3}
SMOKE=${SMOKE:-0}
T0=$(date +%s)
export PYTHONUNBUFFERED=1
exec > >(tee -a "$OUT/session.log") 2>&1
mkdir -p "$WORK"
RES="$OUT/results.json"
SM=""; CELLS=2048; SUB=1024; META_CELLS=256; FP32=256
if [ "$SMOKE" = 1 ]; then SM="--smoke"; CELLS=24; SUB=16; META_CELLS=8; FP32=8; fi

left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
# step NAME MIN_SECONDS MAX_SECONDS command...: run under timeout min(MAX, time left); skip if < MIN left
step() {
  local name=$1 min=$2 max=$3; shift 3
  local l; l=$(left)
  if [ "$l" -lt "$min" ]; then
    echo "$name skipped: ${l}s left of ${BUDGET}s" | tee -a "$OUT/steps.txt"; return 99
  fi
  [ "$max" -gt "$l" ] && max=$l
  local s; s=$(date +%s)
  echo "=== $name (limit ${max}s, at $((s - T0))s)"
  if declare -F "$1" > /dev/null; then  # a shell function: timeout runs programs only
    export -f "$1"; timeout --kill-after=10 "$max" bash -c '"$@"' _ "$@"
  else
    timeout --kill-after=10 "$max" "$@"
  fi
  local rc=$?
  echo "$name rc=$rc $(( $(date +%s) - s ))s (ends at $(( $(date +%s) - T0 ))s)" | tee -a "$OUT/steps.txt"
  return $rc
}

# 0. facts
{ date -u; nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1
  lscpu 2>/dev/null | grep -E "Model name|^CPU\(s\)"; nproc
  "$PY" -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.is_available())"
  "$PY" -m pip list 2>/dev/null | grep -i -E "^(numpy|pandas|scipy|h5py|anndata|scanpy|torch|pytorch-lightning|triton) "
} > "$OUT/gpu_info.txt" 2>&1
cat "$OUT/gpu_info.txt"

# 1. wheels (no network there): two separate targets, so that the published pins never meet our code
install_wheels() {
  rm -rf /tmp/tf-ours /tmp/tf-published
  if ls "$WHEELS"/ours/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/tf-ours "$WHEELS"/ours/*.whl || return 1
  fi
  if ls "$WHEELS"/published/*.whl > /dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/tf-published "$WHEELS"/published/*.whl || return 1
  fi
}
export PY WHEELS
step wheels 20 120 install_wheels
export PYTHONPATH="$ROOT/src:$ROOT/benchmarks:/tmp/tf-ours"
PUB_OK=0
pub_check() {
  PYTHONPATH=/tmp/tf-published timeout 120 "$PY" -c "import numpy, pandas, transcriptformer.cli, anndata, scanpy, pytorch_lightning; print('published importable: numpy', numpy.__version__, 'pandas', pandas.__version__, 'anndata', anndata.__version__, 'scanpy', scanpy.__version__, 'lightning', pytorch_lightning.__version__)"
}
if [ -d /tmp/tf-published/transcriptformer ]; then
  if pub_check; then
    PUB_OK=1
  else  # the pinned numpy 2.2.6 / pandas 2.2.2 do not fit the image's compiled packages: use the image's
    echo "published: the pinned numpy/pandas do not import here; trying the image's" | tee -a "$OUT/steps.txt"
    rm -rf /tmp/tf-published/numpy /tmp/tf-published/numpy-* /tmp/tf-published/numpy.libs \
      /tmp/tf-published/pandas /tmp/tf-published/pandas-*
    pub_check && PUB_OK=1
  fi
fi
echo "published tool usable: $PUB_OK" | tee -a "$OUT/steps.txt"

# 2. correctness
step tests 60 180 "$PY" -m pytest -m gpu -q -rs -p no:cacheprovider tests/test_gpu.py > "$OUT/tests.log" 2>&1
tail -5 "$OUT/tests.log"

G="$PY benchmarks/gpu_compare.py --json $RES --work $WORK $SM"
# 3. matmul reference
step matmul 20 60 $G matmul
# 4. TF-Sapiens shape
if step prepare_sapiens 60 120 $G prepare --preset sapiens --cells $CELLS --subset $SUB; then
  step ours_sapiens 60 180 $G ours --preset sapiens --data "$WORK/cells_$CELLS.h5ad" "$WORK/cells_$SUB.h5ad" \
    --tag sapiens_$CELLS sapiens_$SUB --fp32-cells $FP32
  if [ "$PUB_OK" = 1 ]; then
    step published_sapiens 60 200 $G published --preset sapiens --data "$WORK/cells_$SUB.h5ad" --tag sapiens_$SUB \
      --site /tmp/tf-published --python "$PY"
  fi
fi
# 5. TF-Metazoa-shaped vocabulary, on the first META_CELLS of the same cells
if step prepare_metazoa 90 150 $G prepare --preset metazoa --cells $CELLS --subset $META_CELLS; then
  step ours_metazoa 40 180 $G ours --preset metazoa --data "$WORK/cells_$META_CELLS.h5ad" --tag metazoa_$META_CELLS --fp32-cells 0
  if [ "$PUB_OK" = 1 ]; then
    step published_metazoa 40 180 $G published --preset metazoa --data "$WORK/cells_$META_CELLS.h5ad" \
      --tag metazoa_$META_CELLS --site /tmp/tf-published --python "$PY"
  fi
fi
# 6. summary
$G summary | tee "$OUT/summary.txt"
echo "session: $(( $(date +%s) - T0 ))s of ${BUDGET}s" | tee -a "$OUT/steps.txt"
