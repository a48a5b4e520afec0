# Shared by the experiment scripts (source it). Two roots:
#   RESULTS (default experiments/results): every analysis run folder (results.json + manifest.json
#            + plots) that a summary or a reported number reads. Committed.
#   RUNS    (default runs/experiments): the heavy run folders: LoRA adapters, checkpoints, SAE
#            weights. Not committed; their results.json and manifest.json are copied into RESULTS
#            by `keep`, so every committed number keeps its provenance.
RESULTS=${RESULTS:-experiments/results}
RUNS=${RUNS:-runs/experiments}
PYTHON=${PYTHON:-python}

# keep SRC DST: copy a heavy run folder's results.json, manifest.json and PNG plots into DST.
keep() {
  mkdir -p "$2"
  for f in "$1"/results.json "$1"/manifest.json "$1"/*.png; do
    [ -f "$f" ] && cp "$f" "$2"/
  done
  return 0
}

# keep_study SRC DST: copy a study folder's light files (no adapters, checkpoints or activations)
# into DST, keeping its layout, so report.html's data-src links resolve in the copy. The sampled
# answers and their judgments (samples.jsonl, judgments.jsonl of [eval]) are data and are kept too.
keep_study() {
  mkdir -p "$2"
  (cd "$1" && find . -path ./finetunes -prune -o -type f \( -name '*.json' -o -name '*.png' -o -name '*.jsonl' \
      -o -name 'direction*.safetensors' -o -path ./report.html \) -print) | while read -r f; do
    mkdir -p "$2/$(dirname "$f")" && cp "$1/$f" "$2/$f"
  done
  # the finetunes' own manifests and results (provenance), without their weights
  if [ -d "$1/finetunes" ]; then
    (cd "$1" && find finetunes -maxdepth 3 -type f \( -name '*.json' -o -name 'loss.png' \) -print) |
      while read -r f; do mkdir -p "$2/$(dirname "$f")" && cp "$1/$f" "$2/$f"; done
  fi
  return 0
}
