#!/usr/bin/env bash
# PUP 3D-GS on the real capture (../shared/data/buddha_gray67), on CPU at low resolution with a shortened schedule:
#  1. splatfacto-portable, then pup-gs post-hoc (80% then 50%) with the Fisher score and with the baselines
#     (LightGaussian significance, opacity, random), same rounds: PSNR / SSIM / Gaussian count / timings;
#  2. the probe estimator's rank agreement with the exact Fisher scores (1, 4, 16 probes per view), and the time
#     per view of exact scoring against one training render (forward + backward).
# Usage: bash scripts/experiments/pup_buddha.sh [SCALE] [DOWNSCALE]   (defaults 1/30 and 8; results under outputs/)
set -euo pipefail
cd "$(dirname "$0")/../.."
SCALE=${1:-0.0333333}
DOWN=${2:-8}
DATA=$(cd ../shared/data/buddha_gray67 && pwd)
OUT=outputs/bench_pup_buddha
.venv/bin/ns-prune-compare --scene "$DATA" --downscale-factor "$DOWN" --schedule-scale "$SCALE" \
  --methods splatfacto-portable pup-gs --pup-scores fisher lightgaussian opacity random --output-dir "$OUT"
.venv/bin/python analysis/probe_estimator.py --threads 2 \
  --load-config "$OUT/runs/compare/splatfacto-portable/splatfacto-40k-s42/config.yml" --downscale 4 | tee "$OUT/probe.txt"
