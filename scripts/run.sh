#!/usr/bin/env bash
# One entry point for a fresh machine: sets up .venv (once), then runs the demo or the tests.
#   bash scripts/run.sh demo   train splatfacto, pup-gs and vedal-gs on the built-in scene and compare them
#   bash scripts/run.sh test   run the test suite
# Without an NVIDIA GPU it installs the CPU build of torch (no CUDA download) and arms the torchvision fix.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV=${NSP_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
STAMP=$VENV/.nsp-installed

have_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }

setup() {
  # open3d (ns-export, the .ply reader of nerfstudio-data) needs libusb at import time.
  if ! ldconfig -p 2>/dev/null | grep -q libusb-1.0.so.0; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
      echo "[setup] installing libusb-1.0-0 (needed by open3d)"
      (apt-get update -qq && apt-get install -y -qq libusb-1.0-0) >/dev/null || echo "[setup] warning: could not install libusb-1.0-0"
    else
      echo "[setup] warning: libusb-1.0-0 is missing; install it (apt-get install libusb-1.0-0) for ns-export"
    fi
  fi
  if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then return; fi
  [ -x "$PY" ] || python3 -m venv "$VENV"
  local log=$VENV/pip-install.log
  echo "[setup] installing nerfstudio-pruning into $VENV (a few minutes the first time; log: $log)"
  "$PY" -m pip install -q --upgrade pip >"$log" 2>&1 || true
  if have_gpu; then
    "$PY" -m pip install -e ".[dev]" >>"$log" 2>&1 || { tail -30 "$log"; exit 1; }
  else
    # Pinning the exact CPU build is what keeps pip from resolving the multi-GB CUDA torch.
    "$PY" -m pip install -c constraints-cpu.txt "torch==$(sed -n 's/^torch==//p' constraints-cpu.txt)" -e ".[dev]" >>"$log" 2>&1 \
      || { grep -v '^WARNING: Location' "$log" | tail -30; exit 1; }
    "$PY" -m nerfstudio_pruning.torchvision_fix install
  fi
  touch "$STAMP"
}

cmd=${1:-demo}
shift || true
setup
# The CPU path's numba kernels compiled once into their cache before the demo's or the tests' processes start side by
# side, each of which would otherwise compile them all (about a minute of a core) on a fresh checkout.
if [ "$cmd" = test ] || { [ "$cmd" = demo ] && ! have_gpu; }; then
  "$PY" -m nerfstudio_pruning.kernel_cache || echo "[kernel cache] failed (above); each process compiles what it needs"
fi
case "$cmd" in
  demo)
    # On a CPU the comparison runs at 1/30 of the schedule, where pup-gs's 167 + 167 refinement steps cannot refill
    # the paper's 90% cut (docs/compare.md), so the demo's pup-gs keeps half; a GPU runs the paper's schedule and 10%.
    if have_gpu; then exec "$VENV/bin/ns-prune-compare" --scene default "$@"; fi
    exec "$VENV/bin/ns-prune-compare" --scene default --pup-target-fraction 0.5 "$@" ;;
  test)
    # One pytest-xdist worker per core (at most 4), each on one numba/OpenMP thread: two processes with a
    # multi-threaded pool each slow each other several-fold. NSP_TEST_WORKERS=0 runs in one process.
    workers=${NSP_TEST_WORKERS:-$(n=$(nproc 2>/dev/null || echo 1); echo $((n < 4 ? n : 4)))}
    if [ "$workers" -gt 1 ]; then export NUMBA_NUM_THREADS=${NUMBA_NUM_THREADS:-1} OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}; fi
    # --no-loadscope-reorder: the groups in the order conftest.py sorts them (the long ones first), not by size.
    exec "$PY" -m pytest -p no:dash -p no:cacheprovider -n "$workers" --dist loadgroup --no-loadscope-reorder "$@" ;;
  setup) ;;
  *) echo "usage: bash scripts/run.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
