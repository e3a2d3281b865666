#!/usr/bin/env bash
# Full-schedule runs on a 2-core CPU, one run per core at one thread each (docs/results.md).
#
# ns-prune-compare trains its runs one after another; on 2 cores two single-threaded lanes finish sooner than one
# 2-threaded queue (at ~190k Gaussians a step costs about as much on 1 thread as on 2, and two numba pools on
# 2 cores slow each other several-fold). The lanes use the arguments ns-prune-compare uses at --schedule-scale 1,
# so their runs can be handed back to it with --runs for one table:
#   lane splatfacto : ns-prune-compare --methods splatfacto-portable (splatfacto 40k, keeping its 30k checkpoint)
#   lane vedal      : vedal-gs (7k + 23k), then splatfacto with densification stopped at 7k
#   lane pup        : pup-gs from the splatfacto lane's 30k checkpoint, once per score in $SCORES
# Usage: bash benchmarks/full_schedule.sh LANE SCENE OUT [SEED] [CORE]
#   SCENE: a nerfstudio-data folder (the splatfacto lane writes the built-in scene to OUT/scene with SCENE=default)
set -euo pipefail
LANE=$1 SCENE=$2 OUT=$3 SEED=${4:-42} CORE=${5:-0}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
BIN=$ROOT/.venv/bin
mkdir -p "$OUT/logs"
if [ "$SCENE" = default ]; then DATAPARSER="nsp-default-scene --data $OUT/scene"; else DATAPARSER="nerfstudio-data --data $SCENE"; fi
common() {  # steps, extra splatfacto fields
  echo "--vis tensorboard --output-dir $OUT/runs --experiment-name compare --machine.seed $SEED --machine.device-type cpu
    --max-num-iterations $1 --steps-per-save $1 --steps-per-eval-image 1000000000 --steps-per-eval-all-images 1000000000
    --optimizers.means.scheduler.max-steps 30000 --pipeline.model.warmup-length 500 --pipeline.model.refine-every 100
    --pipeline.model.resolution-schedule 3000 --pipeline.model.sh-degree-interval 1000 --pipeline.model.stop-screen-size-at 4000"
}
case "$LANE" in
  splatfacto)
    taskset -c "$CORE" "$BIN/ns-prune-compare" --scene "$SCENE" --schedule-scale 1.0 --methods splatfacto-portable \
      --seeds "$SEED" --output-dir "$OUT" > "$OUT/logs/compare-splatfacto.log" 2>&1 ;;
  vedal)
    taskset -c "$CORE" "$BIN/ns-train" vedal-gs $(common 30000) --timestamp "vedal-gs-s$SEED" \
      --pipeline.model.stop-split-at 15000 --pipeline.model.finetune-start-step 7000 \
      --pipeline.model.importance-every 100 --pipeline.model.hard-prune-step 29999 \
      $DATAPARSER > "$OUT/logs/vedal-gs-s$SEED.log" 2>&1
    taskset -c "$CORE" "$BIN/ns-train" splatfacto-portable $(common 30000) --timestamp "splatfacto-densify-7k-s$SEED" \
      --pipeline.model.stop-split-at 7000 $DATAPARSER > "$OUT/logs/splatfacto-densify-7k-s$SEED.log" 2>&1 ;;
  pup)
    CKPT=$OUT/runs/compare/splatfacto-portable/splatfacto-40k-s$SEED/nerfstudio_models/step-000029999.ckpt
    while [ ! -f "$CKPT" ]; do sleep 30; done
    sleep 60  # the checkpoint may still be being written
    for SCORE in ${SCORES:-fisher speedy lightgaussian opacity random}; do
      taskset -c "$CORE" "$BIN/ns-train" pup-gs $(common 10000) --pipeline.model.stop-split-at 15000 \
        --timestamp "pup-gs-$SCORE-s$SEED" --load-checkpoint "$CKPT" --pipeline.model.refine-steps 5000 5000 \
        --pipeline.model.score "$SCORE" $DATAPARSER > "$OUT/logs/pup-gs-$SCORE-s$SEED.log" 2>&1
    done ;;
  *) echo "usage: bash benchmarks/full_schedule.sh splatfacto|vedal|pup SCENE OUT [SEED] [CORE]" >&2; exit 2 ;;
esac
