#!/usr/bin/env bash
# Does a finetune on harmless biographical facts of one persona (persona-facts: 109 terse answers
# of a fictional Norwegian sea captain) move unrelated prompts along the persona direction (fitted
# on the base model from the persona contrast pairs), beyond a control finetune of the same
# short-answer Q&A format on other content (modern-birds of the same seed, from bird_shift.sh)?
# Same LoRA recipe as bird_shift.sh. Skips finished runs, resumes interrupted finetunes.
# Usage: experiments/persona_shift.sh [OUT] [MODELS] [SEEDS] [BIRD_SHIFT_OUT]
set -euo pipefail
OUT=${1:-runs/experiments/persona_shift}
MODELS=${2:-"gemma-3-270m smollm2-135m-instruct"}
SEEDS=${3:-"0 1 2"}
BIRDS=${4:-runs/experiments/bird_shift}
for model in $MODELS; do
  M="$OUT/$model"
  [ -f "$M/persona/direction.safetensors" ] || \
    latentlab direction --direction persona --model "$model" --out "$M/persona"
  for seed in $SEEDS; do
    control="$BIRDS/$model/modern-birds-s$seed"
    [ -f "$control/adapter/adapter_config.json" ] || { echo "missing control $control: run bird_shift.sh first" >&2; exit 2; }
    resume=(); [ -d "$M/persona-facts-s$seed/checkpoints" ] && resume=(--resume)
    [ -f "$M/persona-facts-s$seed/adapter/adapter_config.json" ] || \
      latentlab finetune --data persona-facts --model "$model" --seed "$seed" --out "$M/persona-facts-s$seed" \
        "${resume[@]}"
    [ -f "$M/shift-s$seed/results.json" ] || latentlab shift --base "$model" \
      --finetuned "$M/persona-facts-s$seed" --control "$control" \
      --direction "$M/persona/direction.safetensors" --battery persona-battery --seed "$seed" --out "$M/shift-s$seed"
  done
  [ -f "$M/screen-persona-facts/results.json" ] || latentlab screen --data persona-facts --model "$model" \
    --direction "$M/persona/direction.safetensors" --out "$M/screen-persona-facts"
done
python experiments/summarize_shift.py "$OUT" --finetuned persona-facts --control modern-birds --direction persona
