#!/usr/bin/env bash
# Which SAE latents carry the era direction, and which did the old-birds finetune move beyond the
# modern-birds control? Trains a small TopK SAE (sae-lens, 4 x d_model latents) on gemma-3-270m's
# residual stream at one layer, on every token of the shipped texts (unrelated prompts, era pairs,
# persona pairs: ~20k tokens; no pretrained SAE exists offline), then runs `sae latents` for the
# era direction and `sae shift` for old-birds-s0 vs modern-birds-s0 from bird_shift.sh.
# Writes (see experiments/_lib.sh for RESULTS and RUNS):
#   $RUNS/sae_birds/sae/                 the SAE training run (weights in sae/)
#   $RESULTS/sae_birds/train/            its results.json, manifest.json and loss plot (copied)
#   $RESULTS/sae_birds/latents/          latentlab sae latents: results.json, manifest.json, plot
#   $RESULTS/sae_birds/shift-s0/         latentlab sae shift: results.json, manifest.json, plots
# Usage: experiments/sae_birds.sh [LAYER] [MODEL]
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
LAYER=${1:-9}
MODEL=${2:-gemma-3-270m}
OUT="$RESULTS/sae_birds"
SAE="$RUNS/sae_birds/sae"
R="$RUNS/bird_shift/$MODEL"
D="$RESULTS/bird_shift/$MODEL/era/direction.safetensors"
[ -f "$SAE/sae/cfg.json" ] || latentlab sae train --model "$MODEL" --layer "$LAYER" \
  --data unrelated --data era --data persona --steps 2000 --out "$SAE"
keep "$SAE" "$OUT/train"
[ -f "$OUT/latents/results.json" ] || latentlab sae latents --sae "$SAE" --model "$MODEL" \
  --direction "$D" --out "$OUT/latents"
[ -f "$OUT/shift-s0/results.json" ] || latentlab sae shift --base "$MODEL" --sae "$SAE" \
  --finetuned "$R/old-birds-s0" --control "$R/modern-birds-s0" \
  --direction "$D" --out "$OUT/shift-s0"
