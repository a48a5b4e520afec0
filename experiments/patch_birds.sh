#!/usr/bin/env bash
# Issue 5's measurement: patch an old-birds finetune into its base model, layer x position, with the
# era direction-only patch and a random-direction control. Needs experiments/bird_shift.sh's output.
set -euo pipefail
RUNS=${1:-runs/experiments/bird_shift}
MODEL=${2:-smollm2-135m-instruct}
latentlab patch --base "$MODEL" --finetuned "$RUNS/$MODEL/old-birds-s0" --battery era \
  --direction "$RUNS/$MODEL/era/direction.safetensors" --n-items 24 --positions all,prompt,-1,-2 \
  --out "${3:-runs/experiments/patch-$MODEL}"
