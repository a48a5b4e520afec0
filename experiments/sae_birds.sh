#!/usr/bin/env bash
# Which SAE latents carry the era direction, and which did the old-birds finetune move beyond the
# modern-birds control? Trains a small TopK SAE (sae-lens, 4 x d_model latents) on gemma-3-270m's
# residual stream at one layer, on every token of the shipped texts (unrelated prompts, era pairs,
# persona pairs: ~20k tokens; no pretrained SAE exists offline), then runs `sae latents` for the
# era direction and `sae shift` for old-birds-s0 vs modern-birds-s0 from bird_shift.sh.
# Usage: experiments/sae_birds.sh [OUT] [BIRD_SHIFT_OUT] [LAYER] [MODEL]
set -euo pipefail
OUT=${1:-runs/experiments/sae_birds}
BIRDS=${2:-runs/experiments/bird_shift}
LAYER=${3:-9}
MODEL=${4:-gemma-3-270m}
M="$BIRDS/$MODEL"
[ -f "$OUT/sae/sae/cfg.json" ] || latentlab sae train --model "$MODEL" --layer "$LAYER" \
  --data unrelated --data era --data persona --steps 2000 --out "$OUT/sae"
[ -f "$OUT/latents/results.json" ] || latentlab sae latents --sae "$OUT/sae" --model "$MODEL" \
  --direction "$M/era/direction.safetensors" --out "$OUT/latents"
[ -f "$OUT/shift-s0/results.json" ] || latentlab sae shift --base "$MODEL" --sae "$OUT/sae" \
  --finetuned "$M/old-birds-s0" --control "$M/modern-birds-s0" \
  --direction "$M/era/direction.safetensors" --out "$OUT/shift-s0"
