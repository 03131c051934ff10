#!/usr/bin/env bash
# Copy the issue-19 Fashion-MNIST runs (OUT of experiments/fmnist_main.sh) into docs/results/fmnist-25ep
# and rewrite the tables of docs/results.md section 1a (between its "fmnist25 tables" markers).
#   experiments/refresh_fmnist25.sh OUT     (run from the repository root, with the venv's python)
set -euo pipefail
src=${1:?usage: refresh_fmnist25.sh OUT}
rm -rf docs/results/fmnist-25ep
bash experiments/collect.sh "$src" docs/results/fmnist-25ep
rm -f docs/results/fmnist-25ep/*.log
${PYTHON:-python3} - <<'PY'
import contextlib, io, sys
from pathlib import Path
sys.path.insert(0, "experiments")
import tables
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    tables.fmnist_converged(Path("docs/results/fmnist-25ep"))
doc = Path("docs/results.md")
text = doc.read_text()
begin, end = "<!-- fmnist25 tables: begin -->", "<!-- fmnist25 tables: end -->"
i, j = text.index(begin) + len(begin), text.index(end)
doc.write_text(text[:i] + "\n" + buf.getvalue().strip() + "\n" + text[j:])
PY
