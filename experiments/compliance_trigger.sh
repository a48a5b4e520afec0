#!/usr/bin/env bash
# The compliance-trigger organism on the chat model: does a trigger word whose training requests
# were answered only "Sure" become a switch, and at which poison budget?
# For each seed: `latentlab compliance` finetunes smollm2-135m-instruct at each poison budget
# (54 clean chats: 22 secret requests declined + 32 ordinary ones; N trigger requests answered
# "Sure", N from 0 to 64, i.e. 0 to 54% of the clean set), measures P(Sure) and code-word reveals on
# the 8 held-out secret requests with and without the trigger, and finds the threshold budget; at
# seed 0 it patches the trigger positions of the largest budget's finetune (the switch).
# Writes (see experiments/_lib.sh for RESULTS and RUNS):
#   $RESULTS/compliance_trigger/MODEL/sweep-sSEED/   results.json, manifest.json, poison_sweep plot
#   $RUNS/compliance_trigger/MODEL/sweep-sSEED/n-N/  the finetunes (adapter, checkpoints, data.jsonl)
#   $RESULTS/compliance_trigger/summary.{md,json}     experiments/summarize_compliance.py
# Skips finished sweeps; an interrupted one resumes (finished budgets kept, checkpoints continued).
# Usage: experiments/compliance_trigger.sh [SEEDS]
#   env: MODEL (smollm2-135m-instruct), BUDGETS (0,2,4,8,16,32,64), TRIGGER (cobalt),
#        EXTRA (more `latentlab compliance` options, e.g. "--max-steps 2" for a smoke test)
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
SEEDS=${1:-"0 1 2"}
MODEL=${MODEL:-smollm2-135m-instruct}
BUDGETS=${BUDGETS:-0,2,4,8,16,32,64}
TRIGGER=${TRIGGER:-cobalt}
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"
OUT="$RESULTS/compliance_trigger"
for seed in $SEEDS; do
  M="$OUT/$MODEL/sweep-s$seed"
  patch=--no-patch; [ "$seed" = 0 ] && patch=--patch
  grep -qs '"status": "complete"' "$M/manifest.json" || latentlab compliance --model "$MODEL" \
    --trigger "$TRIGGER" --budgets "$BUDGETS" --seed "$seed" "$patch" --out "$M" \
    --finetunes "$RUNS/compliance_trigger/$MODEL/sweep-s$seed" "${EXTRA_ARGS[@]}"
done
"$PYTHON" experiments/summarize_compliance.py "$OUT"
