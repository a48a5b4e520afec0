#!/usr/bin/env bash
# The steering numbers: era and persona directions on both built-in models, default settings
# (layer chosen by the screen, seed 0), on CPU.
# Writes $RESULTS/steer/DIRECTION-MODEL/: results.json, manifest.json, direction.json, probes.json
# and plots (see experiments/_lib.sh for RESULTS).
# Usage: experiments/steer_builtin.sh
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
for model in gemma-3-270m smollm2-135m-instruct; do
  for direction in era persona; do
    [ -f "$RESULTS/steer/$direction-$model/results.json" ] || \
      latentlab steer --direction "$direction" --model "$model" --out "$RESULTS/steer/$direction-$model"
  done
done
