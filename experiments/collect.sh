#!/usr/bin/env bash
# Copy the small, citable part of finished sweep / run folders into docs/results/: each sweep's
# sweep.json and results.{json,md,csv}, and per run its config.yaml, summary.json, metrics.jsonl and
# audit.json (no weights, no per-sample certificates); the choices of validation stages (*_choice*.json),
# budget.json and the HKR runner's command.txt.  Runs moved aside (*.old-*, *.killed-*) are left out.
# Usage: experiments/collect.sh SRC DEST
set -euo pipefail
src=${1:?usage: collect.sh SRC DEST}; dest=${2:?usage: collect.sh SRC DEST}
mkdir -p "$dest"
(cd "$src" && find . \( -name sweep.json -o -name 'results.json' -o -name 'results.md' -o -name 'results.csv' \
   -o -name config.yaml -o -name summary.json -o -name metrics.jsonl -o -name audit.json -o -name '*.log' \
   -o -name '*_choice*.json' -o -name budget.json -o -name command.txt \) \
   -not -path '*/checkpoints/*' -not -path '*.old-*' -not -path '*.killed-*' -print0) | while IFS= read -r -d '' f; do
  mkdir -p "$dest/$(dirname "$f")"; cp "$src/$f" "$dest/$f"
done
