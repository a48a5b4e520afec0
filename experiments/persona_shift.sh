#!/usr/bin/env bash
# Does a finetune on harmless biographical facts of one persona (persona-facts: 109 terse answers
# of a fictional Norwegian sea captain) move unrelated prompts along the persona direction (fitted
# on the base model from the persona contrast pairs), beyond a control finetune of the same
# short-answer Q&A format on other content (modern-birds of the same seed, from bird_shift.sh)?
# Same LoRA recipe as bird_shift.sh. Skips finished runs, resumes interrupted finetunes.
# Writes (see experiments/_lib.sh for RESULTS and RUNS):
#   $RESULTS/persona_shift/MODEL/persona/                the persona direction
#   $RESULTS/persona_shift/MODEL/shift-sSEED/            latentlab shift: results.json, manifest.json
#   $RESULTS/persona_shift/MODEL/screen-persona-facts/   latentlab screen
#   $RESULTS/persona_shift/MODEL/persona-facts-sSEED/    the finetune's results.json + manifest.json
#   $RESULTS/persona_shift/summary.{md,json}, paired-MODEL.png
#   $RUNS/persona_shift/MODEL/persona-facts-sSEED/       the finetune run (adapter, checkpoints)
# Needs the modern-birds finetunes in $RUNS/bird_shift (run bird_shift.sh first).
# Usage: experiments/persona_shift.sh [MODELS] [SEEDS]
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
MODELS=${1:-"gemma-3-270m smollm2-135m-instruct"}
SEEDS=${2:-"0 1 2"}
OUT="$RESULTS/persona_shift"
for model in $MODELS; do
  M="$OUT/$model"
  R="$RUNS/persona_shift/$model"
  D="$M/persona/direction.safetensors"
  [ -f "$D" ] || latentlab direction --direction persona --model "$model" --out "$M/persona"
  for seed in $SEEDS; do
    control="$RUNS/bird_shift/$model/modern-birds-s$seed"
    [ -f "$control/adapter/adapter_config.json" ] || { echo "missing control $control: run bird_shift.sh first" >&2; exit 2; }
    F="$R/persona-facts-s$seed"
    resume=(); [ -d "$F/checkpoints" ] && resume=(--resume)
    [ -f "$F/adapter/adapter_config.json" ] || \
      latentlab finetune --data persona-facts --model "$model" --seed "$seed" --out "$F" "${resume[@]}"
    keep "$F" "$M/persona-facts-s$seed"
    [ -f "$M/shift-s$seed/results.json" ] || latentlab shift --base "$model" \
      --finetuned "$F" --control "$control" \
      --direction "$D" --battery persona-battery --seed "$seed" --out "$M/shift-s$seed"
  done
  [ -f "$M/screen-persona-facts/results.json" ] || latentlab screen --data persona-facts --model "$model" \
    --direction "$D" --out "$M/screen-persona-facts"
done
"$PYTHON" experiments/summarize_shift.py "$OUT" --finetuned persona-facts --control modern-birds --direction persona
