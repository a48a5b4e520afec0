#!/usr/bin/env bash
# The studies behind the study reports in experiments/results/studies/ (latentlab study RECIPE).
# Each study folder lives under $RUNS/studies/ (adapters and checkpoints included; resumable: rerun
# this script after an interruption); its light files (study.json, summary.json, report.html and
# every step's results.json, manifest.json and plots) are copied to $RESULTS/studies/NAME/ by
# keep_study. The README's results section lists each committed study (make summaries).
#   compliance-trigger-smollm2: experiments/recipes/compliance-trigger-smollm2.toml (3 seeds)
#   year-trigger-{gemma,smollm2}: experiments/recipes/year-trigger-*.toml (the modern-birds controls
#                                 of bird_shift.sh, seeds 0-2)
#   persona-facts-{smollm2,gemma}: experiments/recipes/persona-facts-*.toml (seeds 0-2 on both; #12's persona arm)
#   birds-{gemma,smollm2}: experiments/recipes/birds-*.toml (what bird_shift.sh, ablate_birds.sh and
#                          patch_birds.sh computed, as one study per model; not run yet)
#   birds-eval-smollm2: experiments/recipes/birds-eval-smollm2.toml (#22: sampled answers judged by
#                       the era direction; its finetunes: `latentlab finetune --data old-birds|modern-birds
#                       --model smollm2-135m-instruct --seed S --out runs/experiments/bird_finetunes/...`)
#   birds-eval-gemma: the same on gemma-3-270m (its finetunes: bird_finetunes/gemma-3-270m/, trained the same way)
#   birds-amplify-smollm2: experiments/recipes/birds-amplify-smollm2.toml (#24: amplification 0-4x of the
#                          bird_finetunes above, and the difference's patchscope and dictionary at seed 0);
#   birds-amplify-gemma: the same amplification on gemma-3-270m, seeds 0-2 (its finetunes: bird_finetunes/gemma-3-270m/)
#   find-trigger-compliance-smollm2, find-trigger-years-smollm2: experiments/recipes/find-trigger-*.toml
#                          (#24: trigger search on the compliance and year-trigger organisms, 3 seeds);
#   find-trigger-compliance-exact-smollm2: the compliance search at seeds 0-2 without the prescreen (exact);
#                          experiments/find_trigger_reference.sh then compares its seed-0 finetune with a
#                          budget-0 reference finetune on the scans' top tokens
# Usage: experiments/studies.sh [NAMES]
set -euo pipefail
source "$(dirname "$0")/_lib.sh"
# bird_finetunes MODEL: the old-birds / modern-birds finetunes at seeds 0-2 that birds-eval-* and
# birds-amplify-* read, trained by `latentlab finetune` (built-in LoRA settings) where missing.
bird_finetunes() {
  for seed in 0 1 2; do
    for data in old-birds modern-birds; do
      out="$RUNS/bird_finetunes/$1/$data-s$seed"
      [ -f "$out/adapter/adapter_config.json" ] || latentlab finetune --data "$data" --model "$1" --seed "$seed" --out "$out"
    done
  done
}
NAMES=${1:-"compliance-trigger-smollm2 year-trigger-gemma year-trigger-smollm2 persona-facts-smollm2 persona-facts-gemma"}
for name in $NAMES; do
  case $name in
    compliance-trigger-smollm2) recipe=(experiments/recipes/compliance-trigger-smollm2.toml) ;;
    year-trigger-gemma) recipe=(experiments/recipes/year-trigger-gemma.toml) ;;
    year-trigger-smollm2) recipe=(experiments/recipes/year-trigger-smollm2.toml) ;;
    persona-facts-smollm2) recipe=(experiments/recipes/persona-facts-smollm2.toml) ;;
    persona-facts-gemma) recipe=(experiments/recipes/persona-facts-gemma.toml) ;;
    birds-gemma) recipe=(experiments/recipes/birds-gemma.toml) ;;
    birds-smollm2) recipe=(experiments/recipes/birds-smollm2.toml) ;;
    birds-eval-smollm2|birds-amplify-smollm2) bird_finetunes smollm2-135m-instruct
                                              recipe=(experiments/recipes/$name.toml) ;;
    birds-eval-gemma|birds-amplify-gemma) bird_finetunes gemma-3-270m; recipe=(experiments/recipes/$name.toml) ;;
    find-trigger-compliance-smollm2) recipe=(experiments/recipes/find-trigger-compliance-smollm2.toml) ;;
    find-trigger-compliance-exact-smollm2) recipe=(experiments/recipes/find-trigger-compliance-exact-smollm2.toml) ;;
    find-trigger-years-smollm2) recipe=(experiments/recipes/find-trigger-years-smollm2.toml) ;;
    *) echo "unknown study $name" >&2; exit 2 ;;
  esac
  latentlab study "${recipe[@]}" --out "$RUNS/studies/$name"
  keep_study "$RUNS/studies/$name" "$RESULTS/studies/$name"
done
