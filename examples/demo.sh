#!/usr/bin/env bash
# Offline demo on the synthetic dataset (a few minutes on 2 CPU cores): fetch, index, train
# stage 1 and a refinement stage 2 with a small AlexNet, evaluate against the mean pose, and
# draw a prediction. Everything is written under $DEMO_DIR (default: demo/).
set -euo pipefail
cd "$(dirname "$0")/.."
DEEPPOSE=${DEEPPOSE:-.venv/bin/deeppose}
DEMO_DIR=${DEMO_DIR:-demo}
export DEEPPOSE_DATA="$DEMO_DIR/data"
RUNS="$DEMO_DIR/runs"
# Small network settings so the demo trains in about a minute on a CPU; everything else
# (optimizer, schedule, augmentation, refinement) comes from the stage recipes (stages/*.toml).
SMALL=(--input-size 131 --width 0.125 --batch-size 8 --seed 0 --quiet)

"$DEEPPOSE" \
  fetch synthetic \
  index synthetic \
  train-stage 1 --framework pytorch "${SMALL[@]}" --epochs 40 --out "$RUNS/stage1-pytorch" \
  evaluate \
  train-stage 2 --framework pytorch "${SMALL[@]}" --epochs 1 --sigma 1.0 --out "$RUNS/stage2-pytorch" \
  evaluate

"$DEEPPOSE" predict "$DEEPPOSE_DATA/synthetic/images/im00005.jpg" \
  --model "$RUNS/stage2-pytorch" --draw --out "$DEMO_DIR/predictions"

cat <<EOT

Demo outputs:
  dataset and index files   $DEEPPOSE_DATA/synthetic/ (index/train.jsonl, index/val.jsonl)
  stage-1 run               $RUNS/stage1-pytorch/ (model.pt, log.jsonl, loss.png, eval/)
  stage-2 run (cascade)     $RUNS/stage2-pytorch/ (model.pt, chain/stage1/, displacement.json)
  evaluation                $RUNS/stage2-pytorch/eval/metrics.json and pdj.png
  drawn prediction          $DEMO_DIR/predictions/im00005_pose.png

Predict with the demo's cascade (synthetic figures; on real photos use the pretrained
lspet-small, predict's default when there is no run under runs/):
  deeppose predict IMAGE --model $RUNS/stage2-pytorch --draw
EOT
