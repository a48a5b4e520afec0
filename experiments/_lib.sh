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
