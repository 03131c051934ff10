#!/usr/bin/env bash
# Issue 15: accuracy parity of bf16 and fp32 training on the CPU.  fmnist-4c3f-cll for 3 epochs,
# seeds 0, 1, 2, in fp32 and in bf16 (`train.device=cpu`): six runs at once, `--threads 2` each
# (a 16-core machine holds them with room for the OS), then `lipmargin certify` of each (sound
# bound, the preset's radii) and a table of clean accuracy and CRA per precision (mean ± std over
# seeds) in OUT/parity.md, plus the training seconds (a bf16 run is only faster on a CPU with
# AMX / AVX512-BF16; the table says which flags the machine has).
#
#   FMNIST_ROOT=/path/to/fashion-mnist-idx [PYTHON=.venv/bin/python] experiments/bf16_parity.sh OUT
#
# Runs from a fresh checkout: the package is imported from this checkout's src/ (no install
# needed), with PYTHON (default: python3) from a venv that has torch and PyYAML.  FMNIST_ROOT is
# the folder with the four Fashion-MNIST IDX files (.gz or not).  EPOCHS, SEEDS, THREADS override
# the defaults (3, "0 1 2", 2); EXTRA="data.train_size=256 ..." adds --set overrides (a smoke test).  Each run logs to OUT/<precision>-s<seed>.train.log / .certify.json.
set -euo pipefail
out=${1:?usage: FMNIST_ROOT=DIR bf16_parity.sh OUT}
: "${FMNIST_ROOT:?set FMNIST_ROOT to the Fashion-MNIST IDX folder}"
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${PYTHON:-python3}
epochs=${EPOCHS:-3}
seeds=${SEEDS:-0 1 2}
threads=${THREADS:-2}
extra=()
for item in ${EXTRA:-}; do extra+=(--set "$item"); done
export PYTHONPATH="$repo/src${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$out"
"$py" -c "import lipmargin, torch; print('lipmargin', lipmargin.__version__, 'torch', torch.__version__)" | tee "$out/versions.txt"

pids=()
names=()
for precision in fp32 bf16; do
  for seed in $seeds; do
    name="$precision-s$seed"
    OMP_NUM_THREADS=$threads MKL_NUM_THREADS=$threads "$py" -m lipmargin --threads "$threads" train \
      --preset fmnist-4c3f-cll --set "data.root=$FMNIST_ROOT" --set train.device=cpu \
      --set "train.precision=$precision" --set "train.epochs=$epochs" --set "train.seed=$seed" \
      "${extra[@]}" --out "$out/$name" --quiet > "$out/$name.train.log" 2>&1 &
    pids+=($!)
    names+=("$name")
  done
done
failed=0
for i in "${!pids[@]}"; do
  if ! wait "${pids[$i]}"; then
    echo "${names[$i]}: training failed; see $out/${names[$i]}.train.log" >&2
    tail -3 "$out/${names[$i]}.train.log" >&2
    failed=1
  fi
done
[ "$failed" = 0 ] || exit 1

for name in "${names[@]}"; do
  OMP_NUM_THREADS=$threads "$py" -m lipmargin --threads "$threads" certify "$out/$name" --device cpu --json \
    > "$out/$name.certify.json" 2> "$out/$name.certify.log"
done

"$py" - "$out" $seeds > "$out/parity.md" <<'EOF'
import json, statistics, sys
from pathlib import Path

out, seeds = Path(sys.argv[1]), sys.argv[2:]
flags = set()
try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
except OSError:
    pass
rows, eps_keys = {}, None
for precision in ("fp32", "bf16"):
    recs = []
    for seed in seeds:
        cert = json.loads((out / f"{precision}-s{seed}.certify.json").read_text())
        summary = json.loads((out / f"{precision}-s{seed}" / "summary.json").read_text())
        recs.append((cert, summary))
    eps_keys = eps_keys or list(recs[0][0]["certified_accuracy"])
    rows[precision] = recs

def ms(values):
    values = [100 * v for v in values]
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.1f} ± {sd:.1f}"

fast = sorted(flags & {"amx_bf16", "avx512_bf16"})
print(f"CPU bf16 flags: {', '.join(fast) or 'none'}; seeds {', '.join(seeds)}; sound certificates on the test set\n")
print("| precision | runs | clean % | " + " | ".join(f"CRA@{e} %" for e in eps_keys) + " | train s (mean) | layout |")
print("|---" * (5 + len(eps_keys)) + "|")
for precision, recs in rows.items():
    clean = ms([c["clean_accuracy"] for c, _ in recs])
    cras = [ms([c["certified_accuracy"][e] for c, _ in recs]) for e in eps_keys]
    secs = statistics.mean(s["train_seconds"] for _, s in recs)
    layout = "channels-last" if recs[0][1].get("channels_last") else "NCHW"
    print(f"| {precision} | {len(recs)} | {clean} | " + " | ".join(cras) + f" | {secs:.0f} | {layout} |")
EOF
cat "$out/parity.md"
