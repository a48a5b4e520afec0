#!/usr/bin/env bash
# Reproduces the steering numbers reported for issue 3: era and persona directions on both
# built-in models, default settings (layer chosen by the screen, seed 0), on CPU.
set -euo pipefail
OUT=${1:-runs/experiments/steer}
for model in gemma-3-270m smollm2-135m-instruct; do
  for direction in era persona; do
    latentlab steer --direction "$direction" --model "$model" --out "$OUT/$direction-$model"
  done
done
