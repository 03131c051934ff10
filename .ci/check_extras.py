"""CI: installing any extra of lipmargin must leave the installed torch alone.

For each extra in pyproject.toml: ask pip what it would install (``--dry-run --report``) and refuse,
without installing, when that includes torch, torchvision or a CUDA runtime; otherwise install it and
compare ``torch.__version__`` and torch's location before and after.  Prints one line per extra and
exits 1 when any extra would change torch.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUARDED = ("torch", "torchvision", "torchaudio", "triton")


def torch_identity() -> str:
    code = "import torch, os; print(torch.__version__, os.path.dirname(torch.__file__))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def would_install(spec: str) -> list[str]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--dry-run", "--report", str(report), spec],
                       cwd=ROOT, check=True)
        data = json.loads(report.read_text())
    return [f"{item['metadata']['name']}=={item['metadata']['version']}" for item in data.get("install", [])]


def main() -> int:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    failed = False
    for extra in extras:
        before = torch_identity()
        planned = would_install(f".[{extra}]")
        touched = [p for p in planned if p.split("==")[0].lower() in GUARDED or p.lower().startswith("nvidia-")]
        if touched:
            print(f"extra [{extra}]: REFUSED, pip would install {', '.join(touched)} (torch {before})")
            failed = True
            continue
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f".[{extra}]"], cwd=ROOT, check=True)
        after = torch_identity()
        status = "unchanged" if after == before else "CHANGED"
        failed |= after != before
        print(f"extra [{extra}]: torch.__version__ {before.split()[0]} -> {after.split()[0]} ({status})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
