"""Atomic file writes: a temporary file in the same folder, flushed, fsynced and renamed.

A leaf module (standard library only), so that every package that writes a file can use it
without importing the checkpoint machinery.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_many", "atomic_write_text", "default_file_mode", "fsync_directory"]


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file private (0600); give it the mode open() would have (0666 - umask),
        # so that checkpoints and logs are as readable as the user's other files.
        os.fchmod(fd, default_file_mode())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_directory(path.parent)


def default_file_mode() -> int:
    """The mode a new file gets from ``open(path, "w")``: 0o666 without the process's umask."""
    try:  # Linux reports the umask without changing it (safe next to other threads)
        with open("/proc/self/status") as f:
            mask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)  # elsewhere, reading it means setting it; restored at once
        os.umask(mask)
    return 0o666 & ~mask


def fsync_directory(folder: Path) -> None:
    """Make a rename inside ``folder`` durable (best effort: not every filesystem allows it)."""
    try:
        dfd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_many(files: Sequence[tuple[Path, bytes]]) -> None:
    """:func:`atomic_write_bytes` for several files, with their fsyncs and renames done together."""
    if len(files) == 1:
        atomic_write_bytes(*files[0])
        return
    pending: list[tuple[str, Path]] = []
    try:
        for path, data in files:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            pending.append((tmp, path))
            os.fchmod(fd, default_file_mode())
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        for tmp, _ in pending:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        for tmp, path in pending:
            os.replace(tmp, path)
    except BaseException:
        for tmp, _ in pending:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
    for folder in dict.fromkeys(path.parent for path, _ in files):
        fsync_directory(folder)
