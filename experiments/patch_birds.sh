#!/usr/bin/env bash
# Patch an old-birds finetune into its base model, layer x position, with the era direction-only
# patch and a random-direction control. Needs bird_shift.sh's output (the seed-0 old-birds adapter
# in $RUNS/bird_shift and the era direction in $RESULTS/bird_shift).
# Writes $RESULTS/patch/MODEL-old-birds-s0/: results.json, manifest.json, heatmap and by_layer plots.
# Usage: experiments/patch_birds.sh [MODEL]
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
MODEL=${1:-smollm2-135m-instruct}
OUT="$RESULTS/patch/$MODEL-old-birds-s0"
[ -f "$OUT/results.json" ] || latentlab patch --base "$MODEL" --finetuned "$RUNS/bird_shift/$MODEL/old-birds-s0" \
  --battery era --direction "$RESULTS/bird_shift/$MODEL/era/direction.safetensors" --n-items 24 \
  --positions all,prompt,-1,-2 --out "$OUT"
