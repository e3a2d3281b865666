#!/usr/bin/env bash
# Download, on a machine with a package registry, the wheels the GPU machine lacks (it has Python 3.12, torch
# with CUDA, nvcc and ninja, and no registry). Into benchmarks/gpu/wheels/ (ignored by git: carry it to the GPU
# machine, e.g. with the device tool's carry=["benchmarks/gpu/wheels"]).
#
#   bash benchmarks/gpu/fetch_wheels.sh               # cp312 manylinux x86_64 + pure-Python wheels: 25 wheels, 40.5 MiB,
#                                                     # split in two: wheels/ (what the GPU image lacks, ~7 MiB, and
#                                                     # this checkout's own wheel) and wheels-on-image/ (what it has)
#   bash benchmarks/gpu/fetch_wheels.sh --python 3.11 # the same versions for cp311, into cache/wheels-cp311/
#                                                     # (this machine's python: the CPU dry run and the test)
#   bash benchmarks/gpu/fetch_wheels.sh --with-numba  # also numba + llvmlite for the compiled CPU kernel (over
#                                                     # the device tool's 64 MiB carry limit with the rest)
#
# What the kit runs: its scripts (gsplat, numpy, tqdm, rich) and, for the `methods` stage, ns-train pup-gs /
# vedal-gs (and splatfacto-portable), ns-eval and ns-export gaussian-splat of this plugin on the built-in scene.
# The set below is what those import, found by installing exactly these into a clean venv next to a CPU torch
# (`pip install --no-index --no-deps`) and importing until nothing failed (see README.md). Packages nerfstudio
# imports at module level only for features the kit does not use (viewer, mesh export, NeRF ray marching, ...)
# are not carried: benchmarks/gpu/shims/ stands in for them (shims/README.md says what and why).
#
# --no-deps: only what is listed, never torch or CUDA packages. run_all.sh installs each wheel only if its
# package is not importable there already. Versions: those of this project's CPU environment (.venv, pip freeze),
# which work together.
set -euo pipefail
cd "$(dirname "$0")"
PY_VERSION=3.12
WHEELS=wheels
NUMBA=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) PY_VERSION="$2"; shift 2 ;;
    --with-numba) NUMBA=1; shift ;;
    *) echo "usage: $0 [--python 3.12|3.11] [--with-numba]" >&2; exit 2 ;;
  esac
done
TAG="cp${PY_VERSION/./}"
[[ "$PY_VERSION" != 3.12 ]] && WHEELS="cache/wheels-$TAG"
mkdir -p "$WHEELS"
# The checkout's venv when there is one: building this checkout's wheel without build isolation needs its
# setuptools and wheel, which a bare system python3 may lack ("invalid command 'bdist_wheel'").
VENV_PY="$(cd ../.. && pwd)/.venv/bin/python"
if [[ -x "$VENV_PY" ]]; then PIP="${PIP:-$VENV_PY -m pip}"; else PIP="${PIP:-python3 -m pip}"; fi

PACKAGES=(
  # The kit's scripts: gsplat 1.4.0 imports numpy and typing_extensions (from torch) at import, rich when it
  # loads its CUDA extension; the scoring loop imports tqdm. numpy is installed only where missing.
  "gsplat==1.4.0"            # 6.2 MiB, pure Python with its CUDA sources (built on the machine)
  "numpy==1.26.4"            # 17.1 MiB
  "tqdm==4.70.1"
  "rich==15.0.0" "markdown-it-py==4.3.0" "mdurl==0.1.2" "pygments==2.21.0"
  # nerfstudio itself (its ~45 declared dependencies are not installed) and its CLI
  "nerfstudio==1.1.5"
  "tyro==1.0.17" "docstring-parser==0.18.0" "typeguard==4.6.1"
  # imported on the path of ns-train / ns-eval / ns-export gaussian-splat with splatfacto:
  "jaxtyping==0.3.11" "wadler-lindig==0.1.8"   # type annotations everywhere
  "pillow==13.0.0"           # 6.8 MiB: images of every dataparser (and the built-in scene's generator)
  "plyfile==1.1.3"           # the built-in scene's seed points.ply
  "pyyaml==6.0.4"            # config.yml
  "tensorboard==2.20.0" "protobuf==3.20.3" "absl-py==2.5.1"  # 5.6 MiB: --vis tensorboard (nerfstudio's writer)
  "torchmetrics==1.9.0" "lightning-utilities==0.15.3" "packaging==26.4"  # splatfacto's PSNR
  "pytorch-msssim==1.0.0"    # splatfacto's SSIM (loss and metric)
  "imageio==2.38.1"          # blender/dycheck dataparsers (imported with every dataparser)
  "appdirs==1.4.4"           # colmap_utils (imported with the colmap dataparser)
)
# Installed on the GPU image ('cuda', /work/.library/device/KINDS.md; the H200 and H100 runs installed none of
# them): for cp312 their wheels go to wheels-on-image/, carried only to a machine without them (run_all.sh installs
# from there too when present). wheels/ then holds the ~7 MiB the image lacks, leaving room in the device tool's
# 64 MiB for the evidence stage's data and gsplat's carried build.
ON_IMAGE=(numpy tqdm rich markdown-it-py mdurl pygments jaxtyping wadler-lindig pillow pyyaml tensorboard protobuf
          absl-py torchmetrics lightning-utilities packaging imageio)
if [[ $NUMBA == 1 ]]; then
  PACKAGES+=("numba==0.68.1" "llvmlite==0.50.0")
fi

$PIP download --no-deps --only-binary=:all: --python-version "$PY_VERSION" --implementation cp --abi "$TAG" \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_27_x86_64 --platform any --dest "$WHEELS" "${PACKAGES[@]}"
if [[ "$PY_VERSION" == 3.12 ]]; then
  mkdir -p wheels-on-image
  for name in "${ON_IMAGE[@]}"; do
    norm="$(echo "$name" | tr - _)"
    for wheel in "$WHEELS"/*.whl; do
      dist="$(basename "$wheel" | cut -d- -f1 | tr '[:upper:]' '[:lower:]')"
      [[ "$dist" == "$norm" ]] && mv -f "$wheel" wheels-on-image/
    done
  done
  # This checkout as a wheel: run_all.sh's `install` stage installs it on the GPU machine and checks that torch
  # is untouched (issue 32). Built from the checkout's files without build isolation (no registry needed).
  rm -f "$WHEELS"/nerfstudio_pruning-*.whl
  BUILD="$(mktemp -d)"
  (cd ../.. && git ls-files -z 2>/dev/null | tar --null -T - -cf - 2>/dev/null || tar -cf - pyproject.toml README.md nerfstudio_pruning) \
    | tar -xf - -C "$BUILD"
  $PIP wheel --quiet --no-deps --no-build-isolation --no-index -w "$WHEELS" "$BUILD"
  rm -rf "$BUILD"
  ls -l wheels-on-image
  du -sh wheels-on-image
fi
ls -l "$WHEELS"
du -sh "$WHEELS"
