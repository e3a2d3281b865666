#!/usr/bin/env bash
# Download, on a machine with a package registry, the wheels the GPU machine lacks (it has Python 3.12, torch
# with CUDA, nvcc and ninja, and no registry). Into benchmarks/gpu/wheels/ (ignored by git: carry it to the GPU
# machine, e.g. with the device tool's carry=["benchmarks/gpu/wheels"]).
#
#   bash benchmarks/gpu/fetch_wheels.sh               # gsplat 1.4.0 (6.5 MB, CUDA sources inside), the pure-Python
#                                                     # packages it and the scoring code import (1.8 MB), numpy
#                                                     # (18 MB, installed only where missing): 25 MB in all
#   bash benchmarks/gpu/fetch_wheels.sh --with-numba  # also numba + llvmlite for the compiled CPU kernel (more than
#                                                     # the device tool's 64 MiB carry limit with the rest: check)
#
# --no-deps: only what is listed, never torch or CUDA packages. run_all.sh installs each wheel only if its
# package is not importable there already.
set -euo pipefail
cd "$(dirname "$0")"
WHEELS=wheels
mkdir -p "$WHEELS"
PIP="${PIP:-python3 -m pip}"

# gsplat 1.4.0 imports numpy and typing_extensions at import, rich when it loads its CUDA extension; the
# scoring loop imports tqdm. jaxtyping and ninja (gsplat's declared dependencies) are not imported; the GPU
# machine has the ninja binary, and typing_extensions comes with torch.
# Versions: those of this project's CPU environment (.venv), which work together.
PACKAGES=(
  "gsplat==1.4.0"
  "tqdm==4.70.1"
  "rich==15.0.0"
  "markdown-it-py==4.3.0"
  "mdurl==0.1.2"
  "pygments==2.21.0"
  "numpy==1.26.4"
)
if [[ "${1:-}" == "--with-numba" ]]; then
  PACKAGES+=("numba==0.68.1" "llvmlite==0.50.0")
fi

$PIP download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
  --dest "$WHEELS" "${PACKAGES[@]}"
ls -l "$WHEELS"
du -sh "$WHEELS"
