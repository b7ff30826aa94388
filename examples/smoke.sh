#!/usr/bin/env bash
# End-to-end smoke test of an installed deeppose (about a minute on 2 CPU cores): info, fetch
# and index the synthetic dataset, a few training iterations of a tiny network per framework,
# and a prediction with each run. Everything goes to a temporary directory removed on exit;
# any failing step fails the script. Used by `make smoke` (any VENV/PYTHON) and .ci/run.
set -euo pipefail
DEEPPOSE=${DEEPPOSE:-.venv/bin/deeppose}
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
export DEEPPOSE_DATA="$TMP/data"
TINY=(--dataset synthetic --input-size 67 --width 0.0625 --batch-size 4 --max-iterations 3 --workers 0 --seed 0 --quiet)

"$DEEPPOSE" info
"$DEEPPOSE" fetch synthetic index synthetic
IMAGES=("$DEEPPOSE_DATA"/synthetic/images/*.jpg)
for framework in chainer pytorch; do
  "$DEEPPOSE" train-stage 1 --framework "$framework" "${TINY[@]}" --out "$TMP/runs/$framework"
  "$DEEPPOSE" predict "${IMAGES[0]}" --model "$TMP/runs/$framework" --draw --out "$TMP/drawn-$framework"
  test -s "$TMP/drawn-$framework/$(basename "${IMAGES[0]}" .jpg)_pose.png"
done
echo "smoke: OK"
