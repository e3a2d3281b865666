#!/usr/bin/env bash
# #12's training goal: how long one full 30k-step splatfacto-portable run of the built-in scene takes on this
# machine, start-up included. Run it alone on the machine; it prints the wall time and the final Gaussian count.
# The arguments are ns-prune-compare's at --schedule-scale 1 (as scripts/experiments/full_schedule.sh passes them), with eval
# images off and one checkpoint at the end.
# Usage: bash benchmarks/training/time_full_run.sh OUT [THREADS] [SEED]
set -euo pipefail
OUT=$1 THREADS=${2:-2} SEED=${3:-42}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
[ -d "$OUT/scene" ] || "$ROOT/.venv/bin/python" -c "import sys; from pathlib import Path; from nerfstudio_pruning.data.default_scene import ensure_default_scene; ensure_default_scene(Path(sys.argv[1]))" "$OUT/scene"
start=$(date +%s)
OMP_NUM_THREADS=$THREADS "$ROOT/.venv/bin/ns-train" splatfacto-portable --vis tensorboard --output-dir "$OUT/runs" \
  --experiment-name timing --timestamp "s$SEED" --machine.seed "$SEED" --machine.device-type cpu \
  --pipeline.datamanager.train-cameras-sampling-seed "$SEED" --max-num-iterations 30000 --steps-per-save 30000 \
  --steps-per-eval-image 1000000000 --steps-per-eval-all-images 1000000000 --steps-per-eval-batch 0 \
  --optimizers.means.scheduler.max-steps 30000 --pipeline.model.warmup-length 500 --pipeline.model.refine-every 100 \
  --pipeline.model.resolution-schedule 3000 --pipeline.model.sh-degree-interval 1000 \
  --pipeline.model.stop-screen-size-at 4000 nsp-default-scene --data "$OUT/scene" > "$OUT/train.log" 2>&1
end=$(date +%s)
gaussians=$("$ROOT/.venv/bin/python" -c "import sys, torch; print(torch.load(sys.argv[1], map_location='cpu', weights_only=False)['pipeline']['_model.gauss_params.means'].shape[0])" "$OUT/runs/timing/splatfacto-portable/s$SEED/nerfstudio_models/step-000029999.ckpt")
echo "commit $(git -C "$ROOT" rev-parse --short HEAD); $THREADS threads; 30000 steps in $((end - start)) s ($(( (end - start) / 60 )) min $(( (end - start) % 60 )) s), start-up included; $gaussians Gaussians at the end; log $OUT/train.log"
