"""Run folders are never overwritten: what a folder holds, and moving an old run aside.

A leaf module (no torch): ``fit``, ``run_sweep`` and the CLI's ``report --out`` use it before
they write into a folder that already holds results.  Nothing here deletes anything.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

__all__ = ["RUN_FILES", "RunExistsError", "run_files", "move_aside", "report_files", "move_report_aside"]

#: What makes a folder a run folder (written by :func:`lipmargin.train.fit`).
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "certificates.csv", "checkpoints")


class RunExistsError(RuntimeError):
    """``path`` already holds results that writing there would destroy; one-line message.

    ``found`` names what is there (``config.yaml``, ``checkpoints``, ...), so that a caller can
    offer the right way out (resume, overwrite, another folder).
    """

    def __init__(self, message: str, path: Path, found: list[str]) -> None:
        super().__init__(message)
        self.path = path
        self.found = found


def run_files(path: str | Path) -> list[str]:
    """The entries of :data:`RUN_FILES` present in ``path`` (an empty ``checkpoints/`` does not count)."""
    folder = Path(path)
    found = []
    for name in RUN_FILES:
        entry = folder / name
        if name == "checkpoints":
            if entry.is_dir() and any(entry.iterdir()):
                found.append(name)
        elif entry.exists():
            found.append(name)
    return found


def move_aside(path: str | Path, *, stamp: str | None = None) -> Path:
    """Rename ``path`` to ``<path>.old-<YYYYmmdd-HHMMSS>`` (``-2``, ``-3``, ... if taken); returns the new path.

    A rename in the same folder: nothing is copied or deleted, and it is atomic.
    """
    src = Path(path)
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    base = src.with_name(f"{src.name}.old-{stamp}")
    dest, k = base, 1
    while dest.exists() or dest.is_symlink():
        k += 1
        dest = base.with_name(f"{base.name}-{k}")
    os.rename(src, dest)  # fails (OSError) rather than replace anything
    return dest


def report_files(folder: str | Path) -> list[str]:
    """The files of an earlier ``lipmargin report`` in ``folder`` (relative paths; empty if none).

    A report is ``report.md`` with its PNG figures beside it, and for a sweep also the runs'
    reports under ``cells/``.  Without a top-level ``report.md`` the folder holds no report.
    """
    root = Path(folder)
    if not (root / "report.md").is_file():
        return []
    found = ["report.md"] + sorted(p.name for p in root.glob("*.png") if p.is_file())
    cells = root / "cells"
    if cells.is_dir():
        found += sorted(
            str(p.relative_to(root)) for p in cells.rglob("*") if p.is_file() and (p.name == "report.md" or p.suffix == ".png")
        )
    return found


def move_report_aside(folder: str | Path, files: list[str], *, stamp: str | None = None) -> Path:
    """Move ``files`` (from :func:`report_files`) into ``folder/previous-report-<time>/``, keeping
    their relative paths; returns that folder.  Renames only: nothing is deleted."""
    root = Path(folder)
    stamp = stamp or time.strftime("%Y%m%d-%H%M%S")
    dest, k = root / f"previous-report-{stamp}", 1
    while dest.exists():
        k += 1
        dest = root / f"previous-report-{stamp}-{k}"
    for rel in files:
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(root / rel, target)
    return dest
