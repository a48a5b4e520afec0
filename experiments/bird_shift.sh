#!/usr/bin/env bash
# Issue 4's experiment: does a narrow finetune on obsolete bird names move the era latent on
# unrelated prompts, where a control finetune on the same species' modern names does not?
# For each model: fit the era direction once; finetune old-birds and modern-birds (LoRA r8, all
# linear layers, lr 2e-4, 3 epochs, batch 8) for each seed; measure the shift of both against the
# base on the 241 unrelated prompts; screen both datasets before training.
# Usage: experiments/bird_shift.sh [OUT] [MODELS] [SEEDS]
set -euo pipefail
OUT=${1:-runs/experiments/bird_shift}
MODELS=${2:-"gemma-3-270m smollm2-135m-instruct"}
SEEDS=${3:-"0 1 2"}
for model in $MODELS; do
  M="$OUT/$model"
  [ -f "$M/era/direction.safetensors" ] || latentlab direction --direction era --model "$model" --out "$M/era"
  for seed in $SEEDS; do
    for data in old-birds modern-birds; do
      monitor=(); [ "$seed" = 0 ] && monitor=(--monitor "$M/era/direction.safetensors")
      # An interrupted finetune left checkpoints: continue it instead of starting over.
      resume=(); [ -d "$M/$data-s$seed/checkpoints" ] && resume=(--resume)
      [ -f "$M/$data-s$seed/adapter/adapter_config.json" ] || \
        latentlab finetune --data "$data" --model "$model" --seed "$seed" --out "$M/$data-s$seed" \
          "${monitor[@]}" "${resume[@]}"
    done
    [ -f "$M/shift-s$seed/results.json" ] || latentlab shift --base "$model" \
      --finetuned "$M/old-birds-s$seed" --control "$M/modern-birds-s$seed" \
      --direction "$M/era/direction.safetensors" --battery era-battery --seed "$seed" --out "$M/shift-s$seed"
  done
  for data in old-birds modern-birds; do
    [ -f "$M/screen-$data/results.json" ] || latentlab screen --data "$data" --model "$model" \
      --direction "$M/era/direction.safetensors" --out "$M/screen-$data"
  done
done
python experiments/summarize_shift.py "$OUT"
