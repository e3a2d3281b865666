#!/usr/bin/env bash
# The GPU kit, on a machine with Python 3.12, torch + CUDA, nvcc and ninja, and no nerfstudio and no registry.
# From the repository root:
#
#   bash benchmarks/gpu/run_all.sh                      # every stage: setup parity scores memory pairs methods
#   bash benchmarks/gpu/run_all.sh setup quick          # or some of them, in the order given
#
# Before any stage, the carried wheels (benchmarks/gpu/wheels, made by fetch_wheels.sh; KIT_WHEELS=DIR for another
# folder) whose package is missing are installed into benchmarks/gpu/cache/site-pyX.Y (nothing outside the
# checkout changes).
#   setup   the machine (GPU, driver, nvcc), that nerfstudio and the plugin import (ns_kit.py imports), then
#           gsplat's CUDA extension: built once per machine (minutes) into benchmarks/gpu/cache, or loaded from
#           benchmarks/gpu/cache/gsplat_cuda when a build for this torch, CUDA and GPU is there (every script
#           also builds it on first use)
#   quick   every script with --quick, and run_methods.py --quick (30 steps each): that the kit works here at all
#   parity  (a) check_rasterizer_parity.py          scores  (b) check_scores.py
#   memory  (c) bench_pair_memory.py, bench_scoring_memory.py
#   pairs   (d) check_pairs_and_layers.py
#   fused   (f) bench_fused_scoring.py: the Triton scoring kernels against float64 CPU references, and per view
#           against gsplat's forward + backward (FUSED_ARGS: extra arguments, e.g. "--quick")
#   methods (e) run_methods.py: ns-train pup-gs and vedal-gs on the built-in scene (ns-prune-compare's schedule
#           scaled by METHODS_SCALE, default 0.01: 300 steps), ns-eval and ns-export gaussian-splat of each
#   install install_check.py: the plugin's wheel installed from the carried wheels leaves torch, its CUDA build,
#           triton and nvidia-* as they were before this command installed anything; `ns-train pup-gs --help`
#   evidence[:SCENE[-PART]]  run_evidence.py: ns-prune-compare on a carried capture (benchmarks/gpu/evidence_data,
#           made by prepare_evidence_data.py): SCENE bonsai (default) or buddha_gray67, PART pup or vedal (default
#           both); schedule EVIDENCE_SCALE, default the largest that fits what is left of KIT_BUDGET
#
# KIT_DEVICE=cpu runs every script on CPU (a dry run where there is no GPU, e.g. with PYTHON=a clean venv's python
# and KIT_WHEELS=benchmarks/gpu/cache/wheels-cp311 from `fetch_wheels.sh --python 3.11`).
#
# Results: benchmarks/gpu/results/gpu_kit: one JSON per script, a log per stage, summary.md, and after a build
# gsplat_cuda/ (the extension and its stamp: copy it to benchmarks/gpu/cache/gsplat_cuda/ and carry it next time
# to skip the build). The device tool brings back at most 8 files from $OUT, so where $OUT is set the results are
# packed there as gsplat_kit.tgz, with summary.md and the extension (gsplat_cuda.so, stamp.json) beside it. A
# failing stage does not stop the next. Each script runs under `timeout $STAGE_TIMEOUT` (default 540 s), so what
# it wrote is packed even if a script runs out of time. Set KIT_BUDGET (seconds for the whole command, below the
# call's limit) and scripts are cut in time to pack; keep an outer `timeout` a little above it as a backstop.
set -uo pipefail
KIT="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$KIT/../.." && pwd)"
PY="${PYTHON:-python3}"
CACHE="$KIT/cache"
KIT_WHEELS="${KIT_WHEELS:-$KIT/wheels}"
SITE="$CACHE/site-py$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
RESULTS="${KIT_RESULTS:-$KIT/results/gpu_kit}"  # KIT_RESULTS: another folder (the CPU dry run in the tests)
STAGE_TIMEOUT="${STAGE_TIMEOUT:-540}"
# KIT_BUDGET: seconds for the whole command. Scripts are cut so that PACK_RESERVE seconds are left to pack the
# results: an outer `timeout` alone ends the call before packing, and the device tool then brings back nothing.
PACK_RESERVE="${PACK_RESERVE:-20}"
mkdir -p "$SITE" "$RESULTS"
export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
export TORCH_EXTENSIONS_DIR="$CACHE/torch_extensions"
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export PYTHONUNBUFFERED=1
DEVICE_ARGS=()
[[ -n "${KIT_DEVICE:-}" ]] && DEVICE_ARGS=(--device "$KIT_DEVICE")

stages=("$@")
[[ ${#stages[@]} -eq 0 ]] && stages=(setup parity scores memory pairs methods)

install_wheels() {
  shopt -s nullglob
  local wheels=("$KIT_WHEELS"/*.whl)
  if [[ ${#wheels[@]} -eq 0 ]]; then
    echo "no wheels in $KIT_WHEELS: run benchmarks/gpu/fetch_wheels.sh where there is a registry, and carry the folder"
  fi
  # wheels-on-image/ (fetch_wheels.sh): what the GPU image has, carried only to a machine without it
  wheels+=("${KIT_WHEELS%/}-on-image"/*.whl)
  for wheel in "${wheels[@]}"; do
    local name check
    name="$(basename "$wheel" | cut -d- -f1)"
    case "$name" in
      nerfstudio_pruning) continue ;;  # this checkout, from the working tree; the `install` stage installs the wheel
      markdown_it_py) check="import markdown_it" ;;
      pillow) check="import PIL" ;;
      pyyaml) check="import yaml" ;;
      absl_py) check="import absl" ;;
      protobuf) check="import google.protobuf" ;;
      # render/pairs.py is written against gsplat 1.4.0's kernels: another installed version does not count.
      gsplat) check="import gsplat; assert gsplat.__version__ == '1.4.0'" ;;
      nerfstudio) check="from importlib.metadata import version; assert version('nerfstudio') == '1.1.5'" ;;
      *) check="import $name" ;;
    esac
    if ! "$PY" -c "$check" 2>/dev/null; then
      # (pip warns when a wheel's bin/ or __pycache__/ is already there from another: harmless, not shown)
      if PIP_ROOT_USER_ACTION=ignore "$PY" -m pip install --no-index --no-deps --quiet --target "$SITE" "$wheel" \
          2> >(grep -v "^WARNING: Target directory" >&2); then
        echo "installed $(basename "$wheel")"
      else
        echo "FAILED to install $(basename "$wheel")"
      fi
    fi
  done
}

setup() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
  command -v nvcc >/dev/null && nvcc --version | tail -1
  command -v ninja >/dev/null && echo "ninja $(ninja --version)"
  "$PY" -c "import gsplat, numpy, tqdm, rich; print('gsplat', gsplat.__version__, 'numpy', numpy.__version__)"
  "$PY" -c "import triton; print('triton', triton.__version__)" || echo "no triton: CUDA scores take the per-pair path"
  "$PY" "$KIT/ns_kit.py" imports || return 1
  [[ "${KIT_DEVICE:-}" == cpu ]] && return 0  # a CPU dry run builds nothing
  "$PY" - "$KIT" <<'EOF'
import sys, time
sys.path.insert(0, sys.argv[1])
import torch
if not torch.cuda.is_available():
    sys.exit("no CUDA device: nothing to build")
from kit_common import load_gsplat_cuda
start = time.time()
print("gsplat CUDA extension:", load_gsplat_cuda(), f"({time.time() - start:.0f} s)")
EOF
}

stage_limit() {  # seconds a script may run: STAGE_TIMEOUT, less where KIT_BUDGET leaves less (0: none left)
  local limit="$STAGE_TIMEOUT"
  if [[ -n "${KIT_BUDGET:-}" ]]; then
    local left=$((KIT_BUDGET - SECONDS - PACK_RESERVE))
    (( left < limit )) && limit=$left
    (( limit < 0 )) && limit=0
  fi
  echo "$limit"
}

run_script() {  # script [args...]
  local limit
  limit="$(stage_limit)"
  if (( limit < 10 )); then
    echo "[SKIP] $1: KIT_BUDGET=$KIT_BUDGET s is spent (kept $PACK_RESERVE s to pack the results)"
    return 1
  fi
  KIT_STAGE_LIMIT="$limit" timeout "$limit" "$PY" "$KIT/$1.py" "${DEVICE_ARGS[@]}" "${@:2}"
}

run_stage() {
  local stage="$1" status=0
  case "$stage" in
    setup) setup || status=1 ;;
    parity) run_script check_rasterizer_parity --out "$RESULTS" || status=1 ;;
    scores) run_script check_scores --out "$RESULTS" || status=1 ;;
    memory)
      run_script bench_pair_memory --out "$RESULTS" || status=1
      run_script bench_scoring_memory --out "$RESULTS" || status=1 ;;
    pairs) run_script check_pairs_and_layers --out "$RESULTS" || status=1 ;;
    fused) run_script bench_fused_scoring --out "$RESULTS" ${FUSED_ARGS:-} || status=1 ;;
    methods) run_script run_methods --out "$RESULTS" ${METHODS_SCALE:+--scale "$METHODS_SCALE"} || status=1 ;;
    install) KIT_SITE="$SITE" run_script install_check check --before "$RESULTS/torch_before.json" --out "$RESULTS" || status=1 ;;
    evidence|evidence:*)
      local what="${stage#evidence}" parts=(pup vedal)
      what="${what#:}"; what="${what:-bonsai}"
      [[ "$what" == *-pup || "$what" == *-vedal ]] && parts=("${what##*-}") && what="${what%-*}"
      run_script run_evidence --out "$RESULTS" --scene "$what" --parts "${parts[@]}" \
        ${EVIDENCE_SCALE:+--scale "$EVIDENCE_SCALE"} ${EVIDENCE_DATA:+--data "$EVIDENCE_DATA"} || status=1 ;;
    quick)
      for script in check_rasterizer_parity check_scores bench_pair_memory bench_scoring_memory check_pairs_and_layers run_methods; do
        run_script "$script" --quick --out "$RESULTS/quick" || status=1
      done ;;
    *) echo "unknown stage $stage (setup quick parity scores memory pairs fused methods install evidence[:SCENE[-PART]])"; status=2 ;;
  esac
  if [[ -f "$CACHE/gsplat_cuda/gsplat_cuda.so" && ! -d "$RESULTS/gsplat_cuda" ]]; then
    mkdir -p "$RESULTS/gsplat_cuda" && cp "$CACHE/gsplat_cuda/"* "$RESULTS/gsplat_cuda/"
  fi
  return $status
}

cd "$REPO"
# torch as the machine has it, before anything is installed (the `install` stage compares against it)
[[ " ${stages[*]} " == *" install "* ]] && "$PY" "$KIT/install_check.py" fingerprint --out "$RESULTS/torch_before.json"
install_wheels 2>&1 | tee "$RESULTS/wheels.log"
overall=0
for stage in "${stages[@]}"; do
  echo "=== $stage ($(date +%T))"
  start=$SECONDS
  run_stage "$stage" > >(tee "$RESULTS/$stage.log") 2>&1
  status=$?
  echo "=== $stage: exit $status after $((SECONDS - start)) s" | tee -a "$RESULTS/$stage.log"
  [[ $status -ne 0 ]] && overall=1
done
"$PY" "$KIT/summarize.py" "$RESULTS" > /dev/null && echo "summary: $RESULTS/summary.md"
if [[ -n "${OUT:-}" ]]; then
  tar czf "$OUT/gpu_kit.tgz" --exclude=gsplat_cuda.so -C "$(dirname "$RESULTS")" "$(basename "$RESULTS")"
  cp "$RESULTS/summary.md" "$OUT/" 2>/dev/null
  [[ -d "$RESULTS/gsplat_cuda" ]] && cp "$RESULTS/gsplat_cuda/"* "$OUT/"
  echo "packed: $OUT/gpu_kit.tgz"
fi
exit $overall
