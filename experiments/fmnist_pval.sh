#!/usr/bin/env bash
# Issue 8, step 1a: choose CLL's slack p on a validation split held out of the Fashion-MNIST
# training set (data.val_fraction 0.1: 54,000 train / 6,000 validation images; the test set is not
# touched).  Usage: experiments/fmnist_pval.sh OUT EPOCHS MILESTONES JOBS
set -euo pipefail
out=${1:?usage: fmnist_pval.sh OUT EPOCHS MILESTONES JOBS}
epochs=${2:-10}; milestones=${3:-[7,9]}; jobs=${4:-10}
lm=${LIPMARGIN:-lipmargin}
$lm sweep --preset fmnist-4c3f-cll --set data.val_fraction=0.1 --set train.epochs="$epochs" \
  --set optim.milestones="$milestones" --set eval.every=0 \
  --grid loss.eps=0.15,0.5 --grid loss.p=0.3,0.1,0.03,0.01,0.001 --seeds 1 --jobs "$jobs" --out "$out"
