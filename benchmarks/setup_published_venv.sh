#!/usr/bin/env bash
# Build a separate venv with the published transcriptformer 0.6.1 (PyPI), for bench.py --published-cli.
# See PUBLISHED.md for why each step is needed. Usage: bash benchmarks/setup_published_venv.sh [VENV_DIR]
set -euo pipefail
VENV="${1:-$(dirname "$0")/out/published-venv}"
DL="$(dirname "$VENV")/published-dl"
PY="${PYTHON:-python3}"            # a Python 3.11 (the wheel needs >= 3.11; torch 2.13.0 CPU is on disk for 3.11)
"$PY" -m venv "$VENV"
"$VENV/bin/pip" install -q torch==2.13.0          # the CPU build (0.6.1 pins torch==2.5.1, which is not installable here)
mkdir -p "$DL"
"$VENV/bin/pip" download -q --no-deps -d "$DL" transcriptformer==0.6.1
"$VENV/bin/pip" install -q --no-deps "$DL"/transcriptformer-0.6.1-py3-none-any.whl
# the wheel's pins, minus torch (above), psutil (5.9 has no wheel for this Python; any version works),
# and what inference never imports: boto3, cellxgene-census, pynvml, pytest
"$VENV/bin/pip" install -q "anndata==0.11.4" "h5py==3.14" "hydra-core==1.3.2" "numpy==2.2.6" "pandas==2.2.2" \
    "pytorch-lightning==2.5.1" "requests==2.32.3" "scanpy==1.11.2" "scipy==1.15.3" "timeout-decorator==0.5" psutil
"$VENV/bin/transcriptformer" inference --help > /dev/null && echo "published CLI ready: $VENV/bin/python"
