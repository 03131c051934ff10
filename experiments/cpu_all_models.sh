#!/usr/bin/env bash
# Issue 15: every registered model trains one epoch on a Fashion-MNIST subset on the CPU and its
# sound certificates are audited (`violations: 0`).  One model at a time, `--threads 1`.
#
#   experiments/cpu_all_models.sh OUT            # all models, in `lipmargin models` order
#   MODELS="4C3F lipconvnet-5" experiments/cpu_all_models.sh OUT
#
# Settings (environment): TRAIN_SIZE (2048) and TEST_SIZE (1000) training / test images, drawn
# class-stratified from the seed (data.train_size / data.test_size); AUDIT_N (100) audited test
# images; AUDIT_ARGS (a modest PGD / LOBO) the other audit options; PRECISION (fp32);
# FMNIST_ROOT (default: the loader's search path, e.g. /usr/share/datasets/fashion-mnist);
# LIPMARGIN (default: lipmargin) the command.  The XL models and the SOC LipConvNets run at a reduced
# `model.width` (the table below; WIDTHS="model=width ..." overrides it) so that one epoch and the float64 audit fit a shared 2-core machine.
# Each model writes OUT/MODEL/ (the run), OUT/MODEL.train.log, OUT/MODEL.audit.json and a line of
# OUT/results.tsv: model, width, parameters, seconds (train / audit), clean, CRA@36/255, K, violations.
set -euo pipefail
out=${1:?usage: cpu_all_models.sh OUT}
read -r -a lm <<< "${LIPMARGIN:-lipmargin}"
train_size=${TRAIN_SIZE:-2048}
test_size=${TEST_SIZE:-1000}
audit_n=${AUDIT_N:-100}
read -r -a audit_args <<< "${AUDIT_ARGS:---pgd-steps 20 --pgd-restarts 1 --lobo-pairs 50 --lobo-steps 50}"
precision=${PRECISION:-fp32}
declare -A widths=([cpl-xl]=16 [sll-xl]=16 [lipconvnet-5]=16 [lipconvnet-10]=16 [lipconvnet-20]=8)
for item in ${WIDTHS:-}; do widths[${item%%=*}]=${item#*=}; done  # WIDTHS="lipconvnet-20=8 cpl-xl=32"
mkdir -p "$out"
[ -f "$out/results.tsv" ] || printf 'model\twidth\tparameters\ttrain_s\taudit_s\tclean\tcra_36\tK_sound\tviolations\taudited\n' > "$out/results.tsv"
models=${MODELS:-$("${lm[@]}" models | awk '{print $1}')}
root=()
[ -n "${FMNIST_ROOT:-}" ] && root=(--set "data.root=$FMNIST_ROOT")
for m in $models; do
  width=${widths[$m]:-default}
  opts=(--set "model.name=$m" --set data.name=fashion-mnist --set train.epochs=1 --set "train.precision=$precision"
        --set "data.train_size=$train_size" --set "data.test_size=$test_size" --set train.device=cpu "${root[@]}")
  [ "$width" != default ] && opts+=(--set "model.width=$width")
  t0=$(date +%s)
  if ! "${lm[@]}" --threads 1 train "${opts[@]}" --out "$out/$m" --quiet > "$out/$m.train.log" 2>&1; then
    echo "$m: training failed (see $out/$m.train.log)"; tail -3 "$out/$m.train.log"; continue
  fi
  t1=$(date +%s)
  rc=0
  "${lm[@]}" --threads 1 audit "$out/$m" --n "$audit_n" "${audit_args[@]}" --json > "$out/$m.audit.json" 2> "$out/$m.audit.log" || rc=$?
  t2=$(date +%s)
  python3 - "$out" "$m" "$width" $((t1 - t0)) $((t2 - t1)) "$rc" >> "$out/results.tsv" <<'EOF'
import json, sys
out, m, width, train_s, audit_s, rc = sys.argv[1:]
s = json.load(open(f"{out}/{m}/summary.json"))
try:
    a = json.load(open(f"{out}/{m}.audit.json"))
    viol, audited = a.get("violations", "?"), a.get("num_samples", a.get("n", "?"))
except (OSError, ValueError):
    viol, audited = f"audit failed (exit {rc})", 0
cra = next(iter(s["certified_accuracy"].values()))
print("\t".join(str(v) for v in (m, width, s["num_parameters"], train_s, audit_s, f"{100 * s['clean_accuracy']:.1f}",
                                  f"{100 * cra:.1f}", f"{s['lipschitz']:.3g}", viol, audited)))
EOF
  tail -1 "$out/results.tsv"
done
