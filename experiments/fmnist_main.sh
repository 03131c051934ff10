#!/usr/bin/env bash
# Issue 8, step 1: Fashion-MNIST 4C3F, CLL vs GloRo vs CE + Lipschitz penalty, 3 seeds, one budget
# recipe for all (EPOCHS epochs, batch 256, AdamW 1e-3 with x0.1 at MILESTONES), sound
# certificates on the 10,000 test images, then `lipmargin audit` of every run (first 1,000 test images).
#
#   experiments/fmnist_main.sh OUT pval   CLL p chosen on a validation split (data.val_fraction 0.1)
#   experiments/fmnist_main.sh OUT cll    CLL at eps 0.15 and 0.5 with the chosen p (reads OUT/p_choice.json)
#   experiments/fmnist_main.sh OUT gloro  GloRo at eps 0.15 and 0.5
#   experiments/fmnist_main.sh OUT gloro-authors  the same with the authors' two gradient variants
#                                         (loss.gloro_head_gradient, train.power_grad unrolled; issue 19)
#   experiments/fmnist_main.sh OUT gloro-variants  each of those two variants alone (gloro-head: the head
#                                         gradient; gloro-unrolled: the power-iteration gradient), SEEDS (3) seeds
#   experiments/fmnist_main.sh OUT ce     CE + Lipschitz penalty (no training eps)
#   experiments/fmnist_main.sh OUT hkr    HKR through deel-torchlip (experiments/fmnist_hkr.py): alpha / margin
#                                         chosen on the validation split for eps 0.15 and 0.5, then 3 seeds each
#   experiments/fmnist_main.sh OUT audit  audit every sweep in OUT but pval (after stages run with NO_AUDIT=1)
#   experiments/fmnist_main.sh OUT audit-runs  audit each finished final run at its own training radius
#                                         (36/255 for eps 0.15, 0.5 for eps 0.5, both for CE) and at each
#                                         sample's certified radius, seed 0 of every loss first (issue 19)
#   experiments/fmnist_main.sh OUT backbone  CLL on a 1-Lipschitz backbone (BACKBONE, default aol-s) at eps 0.5
#                                         with the 4C3F's chosen p (reads OUT/p_choice.json)
#
# Environment: EPOCHS (6), MILESTONES ([4,5]), BATCH (256), TRAIN_SIZE (all: a class-stratified subset of
# the training images, data.train_size), P_GRID (0.3,0.03,0.003: the p values the pval stage tries),
# JOBS (2: runs trained at once), LIPMARGIN (lipmargin), BACKBONE (aol-s; its preset fmnist-BACKBONE-cll
# must exist), PYTHON (python3: the one with lipmargin and deel-torchlip, for the hkr stage),
# AUDIT_N (1000: test images audited per run), AUTOATTACK (0; 1: the audits also run
# APGD-CE / APGD-T through torchattacks), AUDIT_EPS (the radii attacked, comma-separated; default every
# evaluation radius; each sample's own certified radius is always attacked too), LOBO_PAIRS (200),
# AUDIT_ONLY (audit-runs: the losses audited, space-separated, of cll gloro gloro-authors gloro-variants
# backbone hkr ce; default all).
# Every stage can be stopped and started again: a sweep continues where it stopped, and an audit
# already written for a run (audit.json) is not redone.
set -euo pipefail
out=${1:?usage: fmnist_main.sh OUT pval|cll|gloro|gloro-authors|gloro-variants|ce|backbone|hkr|audit|audit-runs}
stage=${2:?usage: fmnist_main.sh OUT pval|cll|gloro|gloro-authors|gloro-variants|ce|backbone|hkr|audit|audit-runs}
lm=${LIPMARGIN:-lipmargin}
epochs=${EPOCHS:-6}; milestones=${MILESTONES:-[4,5]}; jobs=${JOBS:-2}
common=(--set train.epochs="$epochs" --set optim.milestones="$milestones" --set train.batch_size="${BATCH:-256}" --set eval.every=0)
if [[ -n ${TRAIN_SIZE:-} ]]; then common+=(--set data.train_size="$TRAIN_SIZE"); fi
# The p chosen by the pval stage for training eps $1.
chosen_p() { python3 -c "import json,sys; print(json.load(open(sys.argv[1]))[sys.argv[2]]['p'])" "$out/p_choice.json" "$1"; }
audit=(--n "${AUDIT_N:-1000}" --pgd-steps 20 --pgd-restarts 2 --lobo-pairs "${LOBO_PAIRS:-200}" --lobo-steps 100)
if [[ ${AUTOATTACK:-0} == 1 ]]; then audit+=(--autoattack); fi
if [[ -n ${AUDIT_EPS:-} ]]; then audit+=(--eps "$AUDIT_EPS"); fi
# HKR runs: the runner takes the same budget; its audits are the same attacks (experiments/fmnist_hkr.py).
py=${PYTHON:-python3}
hkr_common=(--epochs "$epochs" --milestones "$(tr -d '[] ' <<< "$milestones")" --batch-size "${BATCH:-256}" --threads 1)
if [[ -n ${TRAIN_SIZE:-} ]]; then hkr_common+=(--train-size "$TRAIN_SIZE"); fi
hkr_audit=(--audit-n "${AUDIT_N:-1000}" --lobo-pairs "${LOBO_PAIRS:-200}")
if [[ ${AUTOATTACK:-0} == 1 ]]; then hkr_audit+=(--autoattack); fi
if [[ -n ${AUDIT_EPS:-} ]]; then hkr_audit+=(--audit-eps "$AUDIT_EPS"); fi
# alpha:min_margin tried per training eps; min_margin from sqrt(2) eps (the margin a 1-Lipschitz net with
# orthogonal head rows needs for radius eps) up (docs in experiments/fmnist_hkr.py). The first four of
# each were the first grid; its best settings lay at its edges (margin 0.5 for eps 0.15; alpha 0.9 and
# margin 1.5 for eps 0.5), so the grid goes on past them.
hkr_grid() { case $1 in
  0.15) echo "0.99:0.25 0.99:0.5 0.9:0.25 0.9:0.5 0.99:1.0 0.9:1.0" ;;
  0.5) echo "0.99:0.75 0.99:1.5 0.9:0.75 0.9:1.5 0.9:3.0 0.7:1.5 0.7:3.0" ;;
esac; }
hkr_final() {  # eps seed [audit args...]: one final HKR run with the validated alpha / margin
  local eps=$1 seed=$2; shift 2
  read -r a m < <($py -c "import json,sys; c=json.load(open(sys.argv[1]))[sys.argv[2]]; print(c['alpha'], c['margin'])" "$out/hkr_choice.json" "$eps")
  $py experiments/fmnist_hkr.py "$out/hkr-eps$eps/seed-$seed" --alpha "$a" --margin "$m" --seed "$seed" "${hkr_common[@]}" "$@"
}
# Whether RUN/audit.json exists with these radii and AUDIT_N / AUTOATTACK, for the checkpoint
# `lipmargin audit` would load now (the newest; same sha256, as the sweep audit checks); any other
# audit is redone.
audited() {
  $py - "$1" "$2" "${AUDIT_N:-1000}" "${AUTOATTACK:-0}" <<'PY'
import json, sys
from pathlib import Path
from lipmargin.checkpoint import CheckpointError, resolve_checkpoint
run, eps, n, aa = sys.argv[1:]
try:
    audit = json.loads((Path(run) / "audit.json").read_text())
    s = audit["settings"]
    if resolve_checkpoint(Path(run) / "checkpoints").ref.sha256 != audit["checkpoint"]["sha256"]:
        sys.exit(1)
except (OSError, ValueError, KeyError, TypeError, CheckpointError):
    sys.exit(1)
got = s.get("eps", s.get("audit_eps"))
got = ",".join(f"{float(e):g}" for e in (got.split(",") if isinstance(got, str) else got or []))
sys.exit(0 if got == ",".join(f"{float(e):g}" for e in eps.split(",")) and int(s.get("n", s.get("audit_n", -1))) == int(n)
         and bool(s["autoattack"]) == (aa == "1") else 1)
PY
}
radius_of() { case $1 in 0.15) echo 0.1411765 ;; 0.5) echo 0.5 ;; esac; }  # 36/255 is the paper's radius
# NO_AUDIT=1: train only; the `audit` stage audits every finished sweep in OUT afterwards.
audit_sweep() { if [[ ${NO_AUDIT:-0} != 1 ]]; then $lm audit "$1" "${audit[@]}"; fi; }
mkdir -p "$out"
case $stage in
  pval)
    $lm sweep --preset fmnist-4c3f-cll "${common[@]}" --set data.val_fraction=0.1 \
      --grid loss.eps=0.15,0.5 --grid loss.p="${P_GRID:-0.3,0.03,0.003}" --seeds 1 --jobs "$jobs" --out "$out/pval" --quiet
    # The chosen p maximises validation CRA at the evaluation radius nearest the training eps
    # (36/255 for eps 0.15, 0.5 for eps 0.5).
    python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
res = json.load(open(f"{out}/pval/results.json"))
radius = {0.15: "0.141177", 0.5: "0.5"}
choice = {}
for eps, key in radius.items():
    cells = [c for c in res["cells"] if c["params"]["loss.eps"] == eps]
    best = max(cells, key=lambda c: c["certified_accuracy"][key]["mean"])
    choice[str(eps)] = {"p": best["params"]["loss.p"], "radius": key,
                        "val_cra": {str(c["params"]["loss.p"]): c["certified_accuracy"][key]["mean"] for c in cells}}
json.dump(choice, open(f"{out}/p_choice.json", "w"), indent=1)
print(json.dumps(choice))
PY
    ;;
  cll)
    for eps in 0.15 0.5; do
      p=$(chosen_p "$eps")
      $lm sweep --preset fmnist-4c3f-cll "${common[@]}" --set loss.eps="$eps" --set loss.p="$p" \
        --seeds 3 --jobs "$jobs" --out "$out/cll-eps$eps" --quiet
      audit_sweep "$out/cll-eps$eps" "${audit[@]}"
    done
    ;;
  gloro)
    $lm sweep --preset fmnist-4c3f-gloro "${common[@]}" --grid loss.eps=0.15,0.5 --seeds 3 --jobs "$jobs" --out "$out/gloro" --quiet
    audit_sweep "$out/gloro" "${audit[@]}"
    ;;
  gloro-authors)
    $lm sweep --preset fmnist-4c3f-gloro "${common[@]}" --set loss.gloro_head_gradient=true --set train.power_grad=unrolled \
      --grid loss.eps=0.15,0.5 --seeds 3 --jobs "$jobs" --out "$out/gloro-authors" --quiet
    audit_sweep "$out/gloro-authors" "${audit[@]}"
    ;;
  gloro-variants)
    # Which of the authors' two gradient variants changes GloRo (issue 19): each alone, same budget.
    for v in "head:loss.gloro_head_gradient=true" "unrolled:train.power_grad=unrolled"; do
      $lm sweep --preset fmnist-4c3f-gloro "${common[@]}" --set "${v#*:}" \
        --grid loss.eps=0.15,0.5 --seeds "${SEEDS:-3}" --jobs "$jobs" --out "$out/gloro-${v%%:*}" --quiet
      audit_sweep "$out/gloro-${v%%:*}" "${audit[@]}"
    done
    ;;
  ce)
    $lm sweep --preset fmnist-4c3f-ce "${common[@]}" --seeds 3 --jobs "$jobs" --out "$out/ce" --quiet
    audit_sweep "$out/ce" "${audit[@]}"
    ;;
  backbone)
    bb=${BACKBONE:-aol-s}
    p=$(chosen_p 0.5)
    $lm sweep --preset "fmnist-$bb-cll" "${common[@]}" --set loss.eps=0.5 --set loss.p="$p" \
      --seeds 3 --jobs "$jobs" --out "$out/$bb-cll-eps0.5" --quiet
    audit_sweep "$out/$bb-cll-eps0.5" "${audit[@]}"
    ;;
  hkr)
    for eps in 0.15 0.5; do
      for am in $(hkr_grid $eps); do
        $py experiments/fmnist_hkr.py "$out/hkr-val/eps$eps-a${am%:*}-m${am#*:}/seed-0" --alpha "${am%:*}" --margin "${am#*:}" \
          --seed 0 --val-fraction 0.1 "${hkr_common[@]}"
      done
    done
    # As for CLL's p: the best validation CRA at the evaluation radius nearest the training eps. HKR has
    # no eps of its own, so every validation run competes for both eps (the grids only say where to look).
    $py - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
radius = {"0.15": "0.141177", "0.5": "0.5"}
choice = {}
runs = {d.name: json.loads((d / "seed-0" / "summary.json").read_text()) for d in sorted((out / "hkr-val").glob("eps*-a*"))}
for eps, key in radius.items():
    best = max(runs.values(), key=lambda s: s["certified_accuracy"][key])
    choice[eps] = {"alpha": best["params"]["alpha"], "margin": best["params"]["margin"], "radius": key,
                   "val_cra": {name: s["certified_accuracy"][key] for name, s in runs.items()}}
(out / "hkr_choice.json").write_text(json.dumps(choice, indent=1))
print(json.dumps(choice))
PY
    for eps in 0.15 0.5; do
      for seed in 0 1 2; do
        if [[ ${NO_AUDIT:-0} == 1 ]]; then hkr_final "$eps" "$seed"; else hkr_final "$eps" "$seed" "${hkr_audit[@]}"; fi
      done
    done
    ;;
  audit)
    for sweep in "$out"/*/; do
      if [[ -f $sweep/sweep.json && ${sweep%/} != "$out/pval" ]]; then $lm audit "${sweep%/}" "${audit[@]}"; fi
    done
    if [[ -f $out/hkr_choice.json ]]; then
      for eps in 0.15 0.5; do for seed in 0 1 2; do hkr_final "$eps" "$seed" "${hkr_audit[@]}"; done; done
    fi
    ;;
  audit-runs)
    # A failed audit (a violation: exit 1; anything else) does not stop the others; the stage exits 1 after.
    base=("${audit[@]}"); failed=0
    if [[ -n ${AUDIT_EPS:-} ]]; then echo "audit-runs picks each run's radius; unset AUDIT_EPS" >&2; exit 2; fi
    bb=${BACKBONE:-aol-s}
    only=" ${AUDIT_ONLY:-cll gloro gloro-authors gloro-variants backbone hkr ce} "
    for l in $only; do
      case $l in cll|gloro|gloro-authors|gloro-variants|backbone|hkr|ce) ;;
        *) echo "AUDIT_ONLY: unknown loss '$l' (allowed: cll gloro gloro-authors gloro-variants backbone hkr ce)" >&2; exit 2 ;;
      esac
    done
    wanted() { [[ $only == *" $1 "* ]]; }
    for seed in 0 1 2; do
      for eps in 0.15 0.5; do
        r=$(radius_of "$eps")
        for lr in "cll:$out/cll-eps$eps/cells/base/seed-$seed" "gloro:$out/gloro/cells/loss.eps=$eps/seed-$seed" \
                  "gloro-authors:$out/gloro-authors/cells/loss.eps=$eps/seed-$seed" \
                  "gloro-variants:$out/gloro-head/cells/loss.eps=$eps/seed-$seed" \
                  "gloro-variants:$out/gloro-unrolled/cells/loss.eps=$eps/seed-$seed" \
                  "backbone:$out/$bb-cll-eps$eps/cells/base/seed-$seed"; do
          run=${lr#*:}
          if wanted "${lr%%:*}" && [[ -f $run/summary.json ]] && ! audited "$run" "$r"; then
            $lm audit "$run" "${base[@]}" --eps "$r" || failed=1
          fi
        done
        if wanted hkr && [[ -f $out/hkr-eps$eps/seed-$seed/summary.json ]]; then
          hkr_final "$eps" "$seed" "${hkr_audit[@]}" --audit-eps "$r" || failed=1
        fi
      done
      run=$out/ce/cells/base/seed-$seed
      if wanted ce && [[ -f $run/summary.json ]] && ! audited "$run" 0.1411765,0.5; then
        $lm audit "$run" "${base[@]}" --eps 0.1411765,0.5 || failed=1
      fi
    done
    exit "$failed"
    ;;
  *) echo "unknown stage $stage (pval, cll, gloro, gloro-authors, gloro-variants, ce, backbone, hkr, audit, audit-runs)" >&2; exit 2 ;;
esac
