"""Small helpers shared by the run and sweep reports: JSON and metrics reading, Markdown cells and links."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

if TYPE_CHECKING:
    from matplotlib.figure import Figure

REPORT_NAME = "report.md"
_DPI = 130


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill; fit rewrites the file on resume the same way
        if isinstance(rec, dict) and "epoch" in rec:
            records.append(rec)
    return records


def _eval_eps(summary: Mapping[str, Any]) -> list[float]:
    return sorted(float(k) for k in summary.get("certified_accuracy", {}))


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path, dpi=_DPI)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt(x) for x in v) + "]"
    return str(v)


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _link(target: Path, base: Path) -> str:
    """A Markdown link target for ``target`` relative to the folder ``base`` (URL-quoted)."""
    rel = Path(os.path.relpath(target.resolve(), base.resolve())).as_posix()
    return quote(rel, safe="/=.-_~")


def _require_matplotlib() -> None:
    # Checked before any work, so a missing extra fails at once, not after a recomputation.
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ImportError("lipmargin reports need matplotlib: pip install matplotlib (or pip install -e '.[plot]' in a lipmargin checkout)") from None
