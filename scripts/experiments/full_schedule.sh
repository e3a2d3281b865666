#!/usr/bin/env bash
# Full-schedule runs on a 2-core CPU, one run per core at one thread each (docs/results.md).
#
# ns-prune-compare trains its runs one after another; on 2 cores two single-threaded lanes finish sooner than one
# 2-threaded queue (at ~190k Gaussians a step costs about as much on 1 thread as on 2, and two numba pools on
# 2 cores slow each other several-fold). The lanes use the arguments ns-prune-compare uses at --schedule-scale 1,
# so their runs can be handed back to it with --runs for one table:
#   lane splatfacto : splatfacto 40k (ns-prune-compare's splatfacto-40k run, keeping its step-29999 checkpoint;
#                     ONLY_30K=1 stops at that checkpoint, for more pup-gs scores when the 40k row exists)
#   lane vedal      : vedal-gs (7k + 23k), then splatfacto with densification stopped at 7k (not with WITH_DENSIFY=0);
#                     the removal gap is measured on the way (below)
#   lane vedal-target : vedal-gs once per target in $TARGETS (fractions such as "0.2 0.1 0.05", or counts), each with
#                     its removal gap; BRANCH works as for vedal-kl (a target acts only from fine-tuning's start);
#                     TAG=pat VEDAL_ARGS="--pipeline.model.prior-at-target True" adds options to every run, whose
#                     names then carry the tag (vedal-gs-pat-t0.1-s42)
#   lane pup-target : pup-gs (fisher) from the splatfacto lane's step-29999 checkpoint once per fraction in $TARGETS
#   lane pup        : pup-gs from the splatfacto lane's step-29999 checkpoint, once per score in $SCORES
#                     (BASE_SEED=42 with another SEED: only the refinement repeated, from seed 42's checkpoint)
#   lane densify    : only the densify-to-7k baseline (to balance the cores; the vedal lane skips it once done)
#   lane vedal-early-removal : vedal-gs with the hard removal at step 26999 of 30000 (3k steps train the survivors)
#   lane vedal-kl   : vedal-gs once per weight in $KL_WEIGHTS (ns-prune-compare's --kl-weights rows)
#   lane vedal-no-gate : vedal-gs without the gate (ns-prune-compare's --gate-ablation row)
#   lane vedal-cap  : vedal-gs once per gate cap in $CAPS (ns-prune-compare's --eligible-caps rows)
#                     With BRANCH=a checkpoint of the default vedal-gs run from before step 7000, these variants
#                     start there: until fine-tuning starts at 7000 vedal-gs trains as splatfacto does, and neither
#                     kl_weight nor the gate acts on anything (the kept copy must be named step-N.ckpt, N < 7000)
#   lane vedal-branch : that checkpoint made on purpose: vedal-gs's default run stopped at step 6999, so that every
#                     variant's 23k fine-tuning steps start from one model (BRANCH=<its run>/nerfstudio_models/step-000006999.ckpt)
#                     A cap acts only from the first gate refresh at which the eligible fraction would pass the
#                     default cap (0.85; about step 15k on buddha at 1/4), so the vedal-cap lane also takes a later
#                     BRANCH from a default-weight run (the vedal-kl lane's kl 1), taken before that refresh: check
#                     it with analysis/plot_gate_history.py (every eligible fraction up to it under 0.85)
# Removal gap: every vedal-gs run of the vedal and vedal-target lanes stops at step 29998, measures
# analysis/vedal_removal_gap.py there (logs/NAME.gap29998.txt), runs the removal step 29999 and measures after it
# (logs/NAME.gap29999.txt): issue 31's "the removal costs at most 0.1 dB", the difference of the two files' rows.
# Every run saves a checkpoint each $SAVE_EVERY steps (default 1000) and a lane started again continues each
# unfinished run from its latest checkpoint (resume is exact), so a lane can be stopped and restarted at will.
# Usage: bash scripts/experiments/full_schedule.sh LANE SCENE OUT [SEED] [CORE]
#   SCENE: a nerfstudio-data folder, or `default` for the built-in scene (written once to OUT/scene)
set -euo pipefail
LANE=$1 SCENE=$2 OUT=$3 SEED=${4:-42} CORE=${5:-0}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
export NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
BIN=${BIN:-$ROOT/.venv/bin}  # a stand-in folder to dry-run the lanes
mkdir -p "$OUT/logs"
# A dataset folder is read as ns-prune-compare reads it: nerfstudio-data-cached keeps downscaled copies out of the
# dataset. DATA_ARGS: more of its options, e.g. DATA_ARGS="--downscale-factor 4" for buddha_gray67 at 1/4.
if [ "$SCENE" = default ]; then DATAPARSER="nsp-default-scene --data $OUT/scene"; else DATAPARSER="nerfstudio-data-cached --data $SCENE ${DATA_ARGS:-}"; fi
SAVE_EVERY=${SAVE_EVERY:-1000}
if [ "$SCENE" = default ] && [ ! -d "$OUT/scene" ]; then
  "$BIN/python" -c "import sys; from pathlib import Path; from nerfstudio_pruning.data.default_scene import ensure_default_scene; ensure_default_scene(Path(sys.argv[1]))" "$OUT/scene"
fi
common() {  # steps: the splatfacto fields ns-prune-compare sets at schedule scale 1
  echo "--vis tensorboard --output-dir $OUT/runs --experiment-name compare --machine.seed $SEED --machine.device-type cpu
    --pipeline.datamanager.train-cameras-sampling-seed $SEED
    --max-num-iterations $1 --steps-per-save $SAVE_EVERY --steps-per-eval-image 1000000000 --steps-per-eval-all-images 1000000000
    --optimizers.means.scheduler.max-steps 30000 --pipeline.model.warmup-length 500 --pipeline.model.refine-every 100
    --pipeline.model.resolution-schedule 3000 --pipeline.model.sh-degree-interval 1000 --pipeline.model.stop-screen-size-at 4000"
}
checkpoint_steps() {  # the step N of each step-N.ckpt name read on stdin
  sed -n 's/^step-0*\([0-9][0-9]*\)\.ckpt$/\1/p'
}
train() {  # METHOD NAME END ARGS...: train run NAME up to step END-1, from its latest checkpoint when it has one
  local method=$1 name=$2 end=$3; shift 3
  local ckpts=$OUT/runs/compare/$method/$name/nerfstudio_models last resume=()
  last=$(ls "$ckpts" 2>/dev/null | checkpoint_steps | sort -n | tail -1 || true)
  if [ -n "$last" ]; then
    if [ $((last + 1)) -ge "$end" ]; then echo "$name: trained to step $last already"; return 0; fi
    # nerfstudio prefers --load-dir to --load-checkpoint and counts --max-num-iterations from the loaded step.
    resume=(--load-dir "$ckpts" --max-num-iterations $((end - last - 1)))
  fi
  echo "$(date -u +%FT%TZ) $name: ${last:+from step $last }to step $((end - 1))" >> "$OUT/logs/lanes.log"
  taskset -c "$CORE" "$BIN/ns-train" "$method" "$@" --timestamp "$name" "${resume[@]}" $DATAPARSER >> "$OUT/logs/$name.log" 2>&1
  echo "$(date -u +%FT%TZ) $name: exit $?" >> "$OUT/logs/lanes.log"
}
vedal_schedule() {  # HARD_PRUNE_STEP: vedal-gs's fields at schedule scale 1 (fine-tuning from 7k)
  echo "--pipeline.model.stop-split-at 15000 --pipeline.model.finetune-start-step 7000
    --pipeline.model.importance-every 100 --pipeline.model.hard-prune-step $1"
}
densify_baseline() {  # splatfacto with densification stopped where vedal-gs stops it
  train splatfacto-portable "splatfacto-densify-7k-s$SEED" 30000 $(common 30000) --pipeline.model.stop-split-at 7000
}
vedal_variant() {  # NAME ARGS...: vedal-gs with ARGS to step ${END:-30000}-1, from $BRANCH when given (vedal-kl lane)
  local name=$1 end=${END:-30000}; shift
  if [ -z "${BRANCH:-}" ]; then
    train vedal-gs "$name" "$end" $(common "$end") $(vedal_schedule 29999) "$@"; return
  fi
  local from limit=${BRANCH_BEFORE:-7000}
  from=$(basename "$BRANCH" | checkpoint_steps)
  if [ -z "$from" ] || [ "$from" -ge "$limit" ]; then echo "BRANCH must be a step-N.ckpt with N < $limit: $BRANCH" >&2; exit 2; fi
  train vedal-gs "$name" "$end" $(common $((end - from - 1))) $(vedal_schedule 29999) "$@" --load-checkpoint "$BRANCH"
}
removal_gap() {  # NAME STEP ARGS...: analysis/vedal_removal_gap.py on run NAME's checkpoint of STEP, once
  local name=$1 step=$2; shift 2
  local out=$OUT/logs/$name.gap$step.txt
  [ -s "$out" ] && return 0
  # Not fatal: a run trained to the end before this existed has no step-29998 checkpoint left.
  if "$BIN/python" "$ROOT/analysis/vedal_removal_gap.py" "$OUT/runs/compare/vedal-gs/$name/config.yml" --step "$step" "$@" > "$out.part" 2>&1; then
    mv "$out.part" "$out"
  else
    echo "$(date -u +%FT%TZ) $name: no removal gap at step $step (see $out.part)" >> "$OUT/logs/lanes.log"
  fi
}
vedal_with_gap() {  # NAME ARGS...: vedal_variant to step 29998, the gap there, the removal step, the gap after it
  local name=$1; shift
  if [ ! -s "$OUT/logs/$name.gap29999.txt" ]; then
    END=29999 vedal_variant "$name" "$@"
    removal_gap "$name" 29998
    END=30000 vedal_variant "$name" "$@"
    removal_gap "$name" 29999 --after-removal
  fi
}
splatfacto_30k_checkpoint() {  # SEED: the splatfacto lane's step-29999 checkpoint, once written (printed)
  local ckpt=$OUT/runs/compare/splatfacto-portable/splatfacto-40k-s$1/nerfstudio_models/step-000029999.ckpt
  while [ ! -f "$ckpt" ]; do sleep 30; done
  sleep "${CHECKPOINT_SETTLE_S:-60}"  # the checkpoint may still be being written
  echo "$ckpt"
}
case "$LANE" in
  splatfacto)
    # Two legs: the first keeps only its latest checkpoint and ends at step 29999 (pup-gs starts there), the
    # second keeps all of its own, so the step-29999 checkpoint stays.
    train splatfacto-portable "splatfacto-40k-s$SEED" 30000 $(common 30000) --save-only-latest-checkpoint True
    # ONLY_30K=1: stop at the checkpoint the pup lane starts from (the 40k row measured already)
    [ "${ONLY_30K:-0}" = 0 ] || exit 0
    train splatfacto-portable "splatfacto-40k-s$SEED" 40000 $(common 10000) --save-only-latest-checkpoint False ;;
  vedal)
    BRANCH="" vedal_with_gap "vedal-gs-s$SEED"
    # WITH_DENSIFY=0: the baseline is left to a `densify` lane (a queue that hands it to whichever core is free)
    [ "${WITH_DENSIFY:-1}" = 0 ] || densify_baseline ;;
  vedal-early-removal)
    # The same 30k steps with the hard removal 3,000 steps before the end, so that the survivors train on after it.
    train vedal-gs "vedal-gs-removal27k-s$SEED" 30000 $(common 30000) $(vedal_schedule 26999) ;;
  densify)
    densify_baseline ;;
  vedal-kl)
    for W in ${KL_WEIGHTS:?KL_WEIGHTS: the kl_weight values, e.g. KL_WEIGHTS="0.25 0.5 2 4"}; do
      vedal_variant "vedal-gs-kl$W-s$SEED" --pipeline.model.kl-weight "$W"
    done ;;
  vedal-target)
    # A fraction (with a dot) is of the Gaussians at fine-tuning's start; a whole number is a count, e.g. the densify
    # baseline's count / 5 for exactly 5x fewer than it (0.2 of fine-tuning's start is 4.97x on the built-in scene).
    for F in ${TARGETS:?TARGETS: the target fractions or counts, e.g. TARGETS="0.2 0.1 0.05" or TARGETS=33935}; do
      # VEDAL_ARGS is split into words on purpose: it holds several options.
      if [[ "$F" == *.* ]]; then
        vedal_with_gap "vedal-gs${TAG:+-$TAG}-t$F-s$SEED" --pipeline.model.target-fraction "$F" ${VEDAL_ARGS:-}
      else
        vedal_with_gap "vedal-gs${TAG:+-$TAG}-n$F-s$SEED" --pipeline.model.target-gaussians "$F" ${VEDAL_ARGS:-}
      fi
    done ;;
  vedal-branch)
    train vedal-gs "vedal-gs-branch-s$SEED" 7000 $(common 7000) $(vedal_schedule 29999) ;;
  vedal-no-gate)
    vedal_variant "vedal-gs-no-gate-s$SEED" --pipeline.model.use-gate False ;;
  vedal-cap)
    for CAP in ${CAPS:?CAPS: the gate caps (max_eligible_fraction), e.g. CAPS="0.95"}; do
      BRANCH_BEFORE=30000 vedal_variant "vedal-gs-cap$CAP-s$SEED" --pipeline.model.gate.max-eligible-fraction "$CAP"
    done ;;
  pup)
    # BASE_SEED: the splatfacto run to start from (default: SEED). Another seed from the same checkpoint repeats
    # only the refinement, the noise that matters when scores are compared on one trained model.
    BASE=${BASE_SEED:-$SEED}
    CKPT=$(splatfacto_30k_checkpoint "$BASE")
    SUFFIX=s$SEED; [ "$BASE" = "$SEED" ] || SUFFIX=s$SEED-base$BASE
    for SCORE in ${SCORES:-fisher speedy lightgaussian opacity random}; do
      train pup-gs "pup-gs-$SCORE-$SUFFIX" 40000 $(common 10000) --pipeline.model.stop-split-at 15000 \
        --load-checkpoint "$CKPT" --pipeline.model.refine-steps 5000 5000 --pipeline.model.score "$SCORE"
    done ;;
  pup-target)
    CKPT=$(splatfacto_30k_checkpoint "$SEED")
    for F in ${TARGETS:?TARGETS: the target fractions, e.g. TARGETS="0.2 0.1 0.05"}; do
      train pup-gs "pup-gs-t$F-s$SEED" 40000 $(common 10000) --pipeline.model.stop-split-at 15000 \
        --load-checkpoint "$CKPT" --pipeline.model.refine-steps 5000 5000 --pipeline.model.target-fraction "$F"
    done ;;
  *) echo "usage: bash scripts/experiments/full_schedule.sh splatfacto|vedal|vedal-target|vedal-early-removal|vedal-branch|vedal-kl|vedal-no-gate|vedal-cap|densify|pup|pup-target SCENE OUT [SEED] [CORE]" >&2; exit 2 ;;
esac
