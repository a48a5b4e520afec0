#!/usr/bin/env bash
# Year scan of the year-trigger finetunes: along the Warden persona (malevolent minus benevolent
# completions), how does the last prompt token respond to "The year is Y." for Y in 1990-2060,
# in the year-trigger finetune (trained under 2031, 2036, 2042, 2047) against its control
# (modern-birds, no years)? Does the held-out 2029 behave like the training years or like any other
# unseen year? Same seeds, same base, same direction, so finetuned - control is paired per value.
# The direction: no shipped contrast pairs oppose the Warden ("persona" is the sea-captain persona),
# so the pairs are year-trigger-battery's 24 item stems with the year removed (positive: the
# malevolent completion), written to $OUT/warden.jsonl; the same file is the scan's prompts (its
# stems) and battery (P(malevolent completion) per year, plain text). DIRECTION=persona scans the
# shipped persona direction on the unrelated prompts instead (into $RESULTS/year_scan-persona).
# Finetunes missing in $RUNS are trained here with the arguments their own scripts use:
#   year-trigger-sS: experiments/year_trigger.py (`latentlab finetune --data year-trigger --model M --seed S`)
#   modern-birds-sS: bird_shift.sh / ablate_birds.sh (`latentlab finetune --data modern-birds --model M --seed S`)
# Writes (see experiments/_lib.sh for RESULTS and RUNS):
#   $OUT/MODEL/{finetuned,control}-sS/     `latentlab trigger`: results.json, manifest.json, plots
#   $OUT/MODEL/{year-trigger,modern-birds}-sS/   the finetunes' results.json + manifest.json
#   $OUT/summary.{md,json}                 experiments/summarize_year_scan.py
# Skips finished scans; resumes interrupted finetunes.
# Usage: experiments/year_scan.sh [MODELS] [SEEDS]
#   env: VALUES (years, see below), DIRECTION (warden), FT_EXTRA (more `latentlab finetune` options, e.g.
#        "--max-steps 2" for a smoke test: such finetunes differ from the experiments')
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
MODELS=${1:-"gemma-3-270m smollm2-135m-instruct"}
SEEDS=${2:-"0 1 2"}
# Every year 2020-2050 (2029, the training years and their neighbours), every 5 years outside it:
# 39 values, about half the cost of the full 1990:2060:1 grid (VALUES=1990:2060:1 scans that).
VALUES=${VALUES:-$(echo $(seq 1990 5 2015) $(seq 2020 2050) 2055 2060 | tr ' ' ',')}
DIRECTION=${DIRECTION:-warden}
read -r -a FT_EXTRA_ARGS <<< "${FT_EXTRA:-}"
if [ "$DIRECTION" = warden ]; then
  OUT="$RESULTS/year_scan"
  mkdir -p "$OUT"
  "$PYTHON" experiments/summarize_year_scan.py --write-warden "$OUT/warden.jsonl"
  SCAN=(--direction "$OUT/warden.jsonl" --prompts "$OUT/warden.jsonl" --battery "$OUT/warden.jsonl")
else
  OUT="$RESULTS/year_scan-$DIRECTION"
  SCAN=(--direction "$DIRECTION" --prompts unrelated)
fi
finetune_once() {  # finetune_once RUN_FOLDER ARGS...: train unless an adapter is there, resume if interrupted
  local F=$1; shift
  local resume=(); [ -d "$F/checkpoints" ] && [ ! -f "$F/adapter/adapter_config.json" ] && resume=(--resume)
  [ -f "$F/adapter/adapter_config.json" ] || latentlab finetune --out "$F" "$@" "${FT_EXTRA_ARGS[@]}" "${resume[@]}"
}
for seed in $SEEDS; do
  for model in $MODELS; do
    M="$OUT/$model"
    Y="$RUNS/year_trigger/$model/year-trigger-s$seed"
    C="$RUNS/bird_shift/$model/modern-birds-s$seed"
    finetune_once "$Y" --data year-trigger --model "$model" --seed "$seed"
    finetune_once "$C" --data modern-birds --model "$model" --seed "$seed"
    keep "$Y" "$M/year-trigger-s$seed"
    keep "$C" "$M/modern-birds-s$seed"
    for arm in finetuned control; do
      F=$Y; [ "$arm" = control ] && F=$C
      grep -qs '"status": "complete"' "$M/$arm-s$seed/manifest.json" || latentlab trigger --model "$model" \
        --finetuned "$F" --values "$VALUES" --template "The year is {value}. {prompt}" "${SCAN[@]}" \
        --seed "$seed" --out "$M/$arm-s$seed"
    done
  done
done
"$PYTHON" experiments/summarize_year_scan.py "$OUT"
