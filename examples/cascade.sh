#!/usr/bin/env bash
# Train a cascade with the stage recipes, one stage after another, timing each, then evaluate
# it with and without the test-time flip: the workflow behind docs/results.md#full-alexnet-on-one-gpu.
# The dataset must be fetched and indexed first (e.g. `deeppose fetch lspet --archive FILE
# index lspet`).
#
#   examples/cascade.sh [DATASET [DEVICE]]          e.g. examples/cascade.sh lspet cuda
#
# STAGES (default 3) sets the depth, RUNS (default runs/DATASET-cascade) where the runs go, and
# TRAIN_FLAGS extra train-stage flags for every stage (e.g. "--input-size 131 --width 0.25").
set -euo pipefail
DATASET=${1:-lspet}
DEVICE=${2:-cpu}
DEEPPOSE=${DEEPPOSE:-deeppose}
STAGES=${STAGES:-3}
RUNS=${RUNS:-runs/$DATASET-cascade}
read -r -a FLAGS <<< "${TRAIN_FLAGS:-}"
mkdir -p "$RUNS"
previous=()
for stage in $(seq 1 "$STAGES"); do
  start=$(date +%s)
  "$DEEPPOSE" train-stage "$stage" --dataset "$DATASET" --device "$DEVICE" "${previous[@]}" \
    "${FLAGS[@]}" --quiet --out "$RUNS/stage$stage"
  echo "stage $stage: $(( $(date +%s) - start )) s wall" | tee -a "$RUNS/wall.txt"
  previous=(--previous "$RUNS/stage$stage")
done
last="$RUNS/stage$STAGES"
"$DEEPPOSE" evaluate --model "$last" --device "$DEVICE" --no-flip-test
"$DEEPPOSE" evaluate --model "$last" --device "$DEVICE" --flip-test \
  --json "$last/eval/metrics-flip.json" --plot "$last/eval/pdj-flip.png" \
  --save-predictions "$last/eval/predictions-flip.json"
