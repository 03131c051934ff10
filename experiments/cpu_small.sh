#!/usr/bin/env bash
# Issue 8, steps 2 and 3 (CPU-sized): the two-moons slack sweep and digits CLL vs GloRo, 3 seeds
# each, then an audit of every run.  Usage: experiments/cpu_small.sh OUT
set -euo pipefail
out=${1:?usage: cpu_small.sh OUT}
lm=${LIPMARGIN:-lipmargin}
$lm --threads 1 sweep --preset moons-slack --seeds 3 --out "$out/moons-slack" --quiet
$lm --threads 1 audit "$out/moons-slack" --n 2000
$lm --threads 1 sweep --preset digits-cll --seeds 3 --out "$out/digits-cll" --quiet
$lm --threads 1 audit "$out/digits-cll" --n 360
$lm --threads 1 sweep --preset digits-gloro --seeds 3 --out "$out/digits-gloro" --quiet
$lm --threads 1 audit "$out/digits-gloro" --n 360
