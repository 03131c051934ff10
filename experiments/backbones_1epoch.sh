#!/usr/bin/env bash
# Issue 5 acceptance: every registered model trains one epoch on Fashion-MNIST and its sound
# certificates are audited (`violations: 0`).  Usage: [MODELS="..."] experiments/backbones_1epoch.sh OUT [PARALLEL]
# The default preset (digits-cll) trains in float64; the runs here use float32 so that the
# XL backbones (180M / 360M parameters) fit a 10-minute GPU slot.  Big models get a smaller audit.
# THREADS (default 2) sets torch's CPU threads per run.
set -uo pipefail
out=${1:?usage: backbones_1epoch.sh OUT [PARALLEL]}
parallel=${2:-4}
lm=${LIPMARGIN:-lipmargin}
mkdir -p "$out"
one() {
  m=$1; out=$2; lm=$3
  case $m in
    cpl-xl|sll-xl|lipconvnet-*) audit=(--n 200 --pgd-steps 20 --pgd-restarts 1 --lobo-pairs 50 --lobo-steps 50) ;;
    *) audit=(--n 1000) ;;
  esac
  # AUDIT_ARGS="..." replaces the audit settings (e.g. a smaller audit on a CPU).
  if [ -n "${AUDIT_ARGS:-}" ]; then read -r -a audit <<< "$AUDIT_ARGS"; fi
  start=$(date +%s)
  $lm --threads "${THREADS:-2}" train --set model.name="$m" --set data.name=fashion-mnist --set train.epochs=1 \
      --set train.precision=fp32 --out "$out/$m" --quiet > "$out/$m.train.log" 2>&1 || { echo "$m: train failed"; tail -3 "$out/$m.train.log"; return; }
  $lm --threads "${THREADS:-2}" audit "$out/$m" "${audit[@]}" > "$out/$m.audit.log" 2>&1
  echo "$m: audit exit $?, $(( $(date +%s) - start )) s; $(grep -h 'violations' "$out/$m.audit.log")"
}
export -f one
export AUDIT_ARGS THREADS
# MODELS="a b c" restricts the run to those models, in that order.
models=${MODELS:-$($lm models | awk '{print $1}')}
printf '%s\n' $models | xargs -P "$parallel" -I{} bash -c 'one "$@"' _ {} "$out" "$lm"
