#!/usr/bin/env bash
# Does a narrow finetune on obsolete bird names move the era latent on unrelated prompts, where a
# control finetune on the same species' modern names does not?
# For each model: fit the era direction once; finetune old-birds and modern-birds (LoRA r8, all
# linear layers, lr 2e-4, 3 epochs, batch 8) for each seed; measure the shift of both against the
# base on the 241 unrelated prompts; screen both datasets before training; summarise.
# Writes (see experiments/_lib.sh for RESULTS and RUNS):
#   $RESULTS/bird_shift/MODEL/era/                       the era direction (manifest, direction.json)
#   $RESULTS/bird_shift/MODEL/shift-sSEED/               latentlab shift: results.json, manifest.json
#   $RESULTS/bird_shift/MODEL/screen-DATA/               latentlab screen: results.json, manifest.json
#   $RESULTS/bird_shift/MODEL/DATA-sSEED/                the finetune's results.json + manifest.json
#   $RESULTS/bird_shift/summary.{md,json}, paired-MODEL.png   experiments/summarize_shift.py
#   $RUNS/bird_shift/MODEL/DATA-sSEED/                   the finetune run (adapter, checkpoints)
# Skips finished runs and resumes interrupted finetunes.
# Usage: experiments/bird_shift.sh [MODELS] [SEEDS]
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
MODELS=${1:-"gemma-3-270m smollm2-135m-instruct"}
SEEDS=${2:-"0 1 2"}
OUT="$RESULTS/bird_shift"
for model in $MODELS; do
  M="$OUT/$model"
  R="$RUNS/bird_shift/$model"
  D="$M/era/direction.safetensors"
  [ -f "$D" ] || latentlab direction --direction era --model "$model" --out "$M/era"
  for seed in $SEEDS; do
    for data in old-birds modern-birds; do
      F="$R/$data-s$seed"
      monitor=(); [ "$seed" = 0 ] && monitor=(--monitor "$D")
      # An interrupted finetune left checkpoints: continue it instead of starting over.
      resume=(); [ -d "$F/checkpoints" ] && resume=(--resume)
      [ -f "$F/adapter/adapter_config.json" ] || \
        latentlab finetune --data "$data" --model "$model" --seed "$seed" --out "$F" \
          "${monitor[@]}" "${resume[@]}"
      keep "$F" "$M/$data-s$seed"
    done
    [ -f "$M/shift-s$seed/results.json" ] || latentlab shift --base "$model" \
      --finetuned "$R/old-birds-s$seed" --control "$R/modern-birds-s$seed" \
      --direction "$D" --battery era-battery --seed "$seed" --out "$M/shift-s$seed"
  done
  for data in old-birds modern-birds; do
    [ -f "$M/screen-$data/results.json" ] || latentlab screen --data "$data" --model "$model" \
      --direction "$D" --out "$M/screen-$data"
  done
done
"$PYTHON" experiments/summarize_shift.py "$OUT"
