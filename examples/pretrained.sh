#!/usr/bin/env bash
# Reproduce the pretrained cascade shipped in deeppose_cli/models/lspet-small (docs/model-card.md):
# the small network (131-pixel crops, width 0.25) trained on the LSPET development archive with
# the stage recipes, seed 0, on the CPU, then packed with its float32 weights (float16 moved
# 18 of the 11,200 val joints by more than 0.5 pixel: docs/model-card.md).
#
#   examples/pretrained.sh ARCHIVE [WORKDIR]     e.g. examples/pretrained.sh lspet_dataset_dev.zip
#
# ARCHIVE is lspet_dataset_dev.zip (LSPET images 1-8000); its checksum is checked first.
# WORKDIR (default runs/pretrained) holds the data, the runs and the packed model.
set -euo pipefail
ARCHIVE=${1:?usage: examples/pretrained.sh ARCHIVE [WORKDIR]}
WORK=${2:-runs/pretrained}
DEEPPOSE=${DEEPPOSE:-deeppose}
SHA256=3d45b42b3ac4e789d278f7cb2ff13e898a81cfaedf12e55293518b5bdbe49769
SMALL=(--input-size 131 --width 0.25 --seed 0)

echo "$SHA256  $ARCHIVE" | sha256sum --check --quiet -
mkdir -p "$WORK"
export DEEPPOSE_DATA="$WORK/data"
"$DEEPPOSE" fetch lspet --archive "$ARCHIVE" index lspet --seed 0
timed() { local start; start=$(date +%s); "$@"; echo "$(( $(date +%s) - start )) s: ${*:1:3}" | tee -a "$WORK/wall.txt"; }
timed "$DEEPPOSE" train-stage 1 --dataset lspet --framework pytorch "${SMALL[@]}" \
  --epochs 120 --val-every 10 --quiet --out "$WORK/stage1"
timed "$DEEPPOSE" train-stage 2 --dataset lspet --framework pytorch "${SMALL[@]}" \
  --previous "$WORK/stage1" --max-iterations 12000 --val-every 4 --quiet --out "$WORK/stage2"
timed "$DEEPPOSE" evaluate --model "$WORK/stage1" --json "$WORK/stage1-metrics.json"
timed "$DEEPPOSE" evaluate --model "$WORK/stage2" --json "$WORK/stage2-metrics.json"
"$DEEPPOSE" convert "$WORK/stage2" --to pytorch --out "$WORK/lspet-small"
# displacement.json (4.3 MB) only feeds `evaluate --on-crops`; the package stays under 16 MiB.
rm "$WORK/lspet-small/displacement.json"
# The package must not carry this machine's paths: record them relative to WORKDIR, and drop
# the manifest path (lspet's manifest is the package's own).
python3 - "$WORK" "$WORK/lspet-small" <<'PY'
import json, sys
from pathlib import Path
work, packed = str(Path(sys.argv[1]).resolve()), Path(sys.argv[2])
def relative(value):
    if isinstance(value, dict):
        return {k: relative(v) for k, v in value.items() if k != "manifest"}
    if isinstance(value, list):
        return [relative(v) for v in value]
    if isinstance(value, str) and value.startswith(work):
        return "WORKDIR" + value[len(work):]
    return value
for name in ("run.json", "recipe.json"):
    for path in packed.rglob(name):
        path.write_text(json.dumps(relative(json.loads(path.read_text())), indent=2) + "\n")
PY
echo "packed: $WORK/lspet-small (copy it to deeppose_cli/models/lspet-small)"
