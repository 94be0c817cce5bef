#!/usr/bin/env bash
# One GPU session, prepared to run unattended on a bare CUDA machine that has torch:
#   1. CUDA correctness: `pytest -m gpu tests/test_gpu.py` (fp32 parity with the published outputs for every
#      attention kernel, bf16 auto precision, a real CUDA out-of-memory retry);
#   2. throughput: `benchmarks/bench.py --device cuda` (workload b, TF-Sapiens shape in bf16).
# Missing pure-Python packages (anndata and its dependencies, pooch) travel as wheels in .whl/ (see README).
set -u
OUT=${OUT:-benchmarks/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD/src || exit 1
else
  export PYTHONPATH=$PWD/src
fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; lscpu | grep "Model name";
  python3 -c "import sys, torch; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"; } 2>&1 | tee "$OUT/gpu_info.txt"
timeout "${TEST_TIMEOUT:-200}" python3 -m pytest -m gpu tests/test_gpu.py -q -rs -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.log"
timeout "${BENCH_TIMEOUT:-330}" python3 benchmarks/bench.py --device cuda --gpu-budget-s "${GPU_BUDGET:-280}" \
  --json "$OUT/gpu.json" 2>&1 | tee "$OUT/gpu_bench.log"
