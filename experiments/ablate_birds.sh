#!/usr/bin/env bash
# Does the era direction carry the old-birds finetune's behaviour?
# For each model and seed, with the bird_shift.sh finetunes (old-birds, modern-birds control; they
# are trained here if missing):
#   1. ablation: project the era direction out of the residual stream (all positions) at the layers
#      where the shift lives, at the layer of the largest mean shift alone ("peak"), and at all
#      layers, in base, finetune and control; the fraction of the old-birds battery gain over the
#      control that it removes, against 10 random directions;
#   2. prevention: finetune old-birds again with the era direction projected out at those layers
#      during training only (--ablate), then its shift and battery against the normal finetune;
#   3. diff: logit lens of the old-birds shift and per-token KL on unrelated prompts (seed 0).
# Writes $RESULTS/ablate_birds/MODEL/{ablate-shift-sS,ablate-peak-sS,ablate-all-sS,prevent-sS,diff-s0,old-birds-ablated-sS}/
# and $RESULTS/ablate_birds/summary.{md,json} (experiments/summarize_ablation.py).
# Skips finished runs and resumes interrupted finetunes.
# Usage: experiments/ablate_birds.sh [MODELS] [SEEDS]
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
MODELS=${1:-"gemma-3-270m smollm2-135m-instruct"}
SEEDS=${2:-"0 1 2"}
OUT="$RESULTS/ablate_birds"
declare -A SHIFT_LAYERS=([gemma-3-270m]=8-17 [smollm2-135m-instruct]=14-29)  # from bird_shift/summary.md
declare -A PEAK_LAYER=([gemma-3-270m]=17 [smollm2-135m-instruct]=29)  # its largest mean shift, likewise
finetune_once() {  # finetune_once RUN_FOLDER ARGS...: train unless an adapter is there, resume if interrupted
  local F=$1; shift
  local resume=(); [ -d "$F/checkpoints" ] && [ ! -f "$F/adapter/adapter_config.json" ] && resume=(--resume)
  [ -f "$F/adapter/adapter_config.json" ] || latentlab finetune --out "$F" "$@" "${resume[@]}"
}
for seed in $SEEDS; do
  for model in $MODELS; do
    M="$OUT/$model"
    R="$RUNS/bird_shift/$model"
    L=${SHIFT_LAYERS[$model]}
    D="$RESULTS/bird_shift/$model/era/direction.safetensors"
    [ -f "$D" ] || latentlab direction --direction era --model "$model" --out "$RESULTS/bird_shift/$model/era" --overwrite
    for data in old-birds modern-birds; do
      finetune_once "$R/$data-s$seed" --data "$data" --model "$model" --seed "$seed"
    done
    P="$RUNS/ablate_birds/$model/old-birds-ablated-s$seed"
    finetune_once "$P" --data old-birds --model "$model" --seed "$seed" --ablate "$D@$L"
    keep "$P" "$M/old-birds-ablated-s$seed"
    for what in shift peak all; do
      case $what in shift) layers=$L ;; peak) layers=${PEAK_LAYER[$model]} ;; all) layers=all ;; esac
      [ -f "$M/ablate-$what-s$seed/results.json" ] || latentlab ablate --base "$model" \
        --finetuned "$R/old-birds-s$seed" --control "$R/modern-birds-s$seed" --direction "$D" \
        --layers "$layers" --n-random 10 --battery era-battery --seed "$seed" --out "$M/ablate-$what-s$seed"
    done
    [ -f "$M/prevent-s$seed/results.json" ] || latentlab shift --base "$model" \
      --finetuned "$R/old-birds-s$seed" --finetuned "$P" --control "$R/modern-birds-s$seed" \
      --direction "$D" --battery era-battery --seed "$seed" --out "$M/prevent-s$seed"
    if [ "$seed" = 0 ]; then
      [ -f "$M/diff-s0/results.json" ] || latentlab diff --base "$model" --finetuned "$R/old-birds-s0" \
        --control "$R/modern-birds-s0" --out "$M/diff-s0"
    fi
  done
done
"$PYTHON" experiments/summarize_ablation.py "$OUT"
