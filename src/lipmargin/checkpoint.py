"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a pair ``epoch-NNNNNN.safetensors`` + ``epoch-NNNNNN.json`` in a folder.  The JSON is
written last and records the SHA-256 of the tensor file, so it is the commit marker: a checkpoint
counts as intact only when its JSON parses and the tensor file's hash matches.  Both files are
written to a temporary name, flushed, fsynced and renamed, so a kill at any moment leaves every
earlier checkpoint intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

__all__ = [
    "CheckpointError",
    "Checkpoint",
    "atomic_write_bytes",
    "atomic_write_text",
    "default_file_mode",
    "fsync_directory",
    "save_checkpoint",
    "save_checkpoints",
    "PendingCheckpoint",
    "atomic_write_many",
    "load_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A missing, corrupt or mismatching checkpoint; the message is one line."""


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


# --------------------------------------------------------------------------------------------
# Optimizer / scheduler state <-> (tensors, JSON)
# --------------------------------------------------------------------------------------------


def _split_state(prefix: str, state: Any, tensors: dict[str, Tensor]) -> Any:
    """Replace tensors in a nested structure by ``{"__tensor__": key}`` and collect them."""
    if isinstance(state, Tensor):
        key = f"{prefix}"
        tensors[key] = state.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(state, Counter):
        return {"__counter__": [[k, v] for k, v in state.items()]}
    if isinstance(state, dict):
        return {"__dict__": [[k, _split_state(f"{prefix}.{k}", v, tensors)] for k, v in state.items()]}
    if isinstance(state, (list, tuple)):
        kind = "__tuple__" if isinstance(state, tuple) else "__list__"
        return {kind: [_split_state(f"{prefix}.{i}", v, tensors) for i, v in enumerate(state)]}
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise CheckpointError(f"cannot store a {type(state).__name__} in a checkpoint without pickle ({prefix})")


def _join_state(obj: Any, tensors: dict[str, Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            key = obj["__tensor__"]
            if key not in tensors:
                raise CheckpointError(f"checkpoint metadata refers to a missing tensor {key!r}")
            return tensors[key]
        if "__counter__" in obj:
            return Counter({k: v for k, v in obj["__counter__"]})
        if "__dict__" in obj:
            return {k: _join_state(v, tensors) for k, v in obj["__dict__"]}
        if "__tuple__" in obj:
            return tuple(_join_state(v, tensors) for v in obj["__tuple__"])
        if "__list__" in obj:
            return [_join_state(v, tensors) for v in obj["__list__"]]
        raise CheckpointError("checkpoint metadata holds an unknown structure")
    return obj


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


@dataclass
class Checkpoint:
    epoch: int
    model_state: dict[str, Tensor]
    extra_state: dict[str, Any]  # optimizer / scheduler / rng, already re-assembled
    meta: dict[str, Any]  # config, metrics, anything JSON
    path: Path


def _name(epoch: int) -> str:
    return f"epoch-{epoch:06d}"


def save_checkpoint(
    folder: Path,
    epoch: int,
    model_state: dict[str, Tensor],
    extra_state: dict[str, Any],
    meta: dict[str, Any],
    *,
    keep: int = 2,
) -> Path:
    """Write checkpoint ``epoch`` into ``folder`` and prune all but the newest ``keep``."""
    return save_checkpoints([PendingCheckpoint(Path(folder), epoch, model_state, extra_state, meta, keep)])[0]


@dataclass(frozen=True)
class PendingCheckpoint:
    """The arguments of :func:`save_checkpoint`, for writing several checkpoints at once."""

    folder: Path
    epoch: int
    model_state: dict[str, Tensor]
    extra_state: dict[str, Any]
    meta: dict[str, Any]
    keep: int = 2


def save_checkpoints(items: Sequence[PendingCheckpoint]) -> list[Path]:
    """:func:`save_checkpoint` for several folders (the runs of a batched sweep) at once.

    The files are the same; the tensor files of all items are written first and made durable
    together, then all JSON files (each still after its tensor file), which costs a couple of
    fsync rounds instead of a couple per checkpoint.
    """
    blobs: list[tuple[Path, bytes]] = []
    records: list[tuple[Path, bytes]] = []
    for item in items:
        if item.keep < 1:
            raise ValueError(f"keep must be >= 1 (the checkpoint just written is always kept); got {item.keep}")
        folder = Path(item.folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, Tensor] = {f"model.{k}": v.detach().cpu().contiguous() for k, v in item.model_state.items()}
        structure = _split_state("extra", item.extra_state, tensors)
        blob = st_save(tensors)
        base = folder / _name(item.epoch)
        record = {
            "format_version": FORMAT_VERSION,
            "epoch": item.epoch,
            "sha256": hashlib.sha256(blob).hexdigest(),
            "bytes": len(blob),
            "model_keys": sorted(item.model_state),
            "extra_state": structure,
            "meta": item.meta,
        }
        blobs.append((base.with_suffix(".safetensors"), blob))
        records.append((base.with_suffix(".json"), json.dumps(record, indent=1, sort_keys=True).encode("utf-8")))
    atomic_write_many(blobs)
    atomic_write_many(records)
    for item in items:
        for old in list_checkpoints(item.folder)[: -item.keep]:
            for suffix in (".json", ".safetensors"):
                try:
                    old.with_suffix(suffix).unlink()
                except FileNotFoundError:
                    pass
    return [path for path, _ in records]


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


def list_checkpoints(folder: Path) -> list[Path]:
    """Checkpoint JSON paths in ``folder``, oldest first (intact or not)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("epoch-*.json") if p.stem[6:].isdigit())


def load_checkpoint(path: Path) -> Checkpoint:
    """Load and verify one checkpoint (its ``.json`` path); never unpickles anything."""
    path = Path(path)
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise CheckpointError(f"checkpoint metadata {path} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(record, dict) or record.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint metadata {path} is not a lipmargin checkpoint (format {FORMAT_VERSION})")
    tensor_path = path.with_suffix(".safetensors")
    try:
        blob = tensor_path.read_bytes()
    except OSError:
        raise CheckpointError(f"checkpoint weights {tensor_path} are missing") from None
    if hashlib.sha256(blob).hexdigest() != record.get("sha256"):
        raise CheckpointError(
            f"checkpoint weights {tensor_path} do not match the SHA-256 recorded in {path.name} "
            f"(truncated or modified file; {len(blob)} bytes, expected {record.get('bytes')})"
        )
    try:
        tensors = st_load(blob)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint weights {tensor_path} are not a valid safetensors file: {e}") from None
    model_state = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        extra = _join_state(record.get("extra_state", {}), tensors)
        epoch = record["epoch"]
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"checkpoint metadata {path} is malformed: {type(e).__name__}: {e}") from None
    meta = record.get("meta", {})
    if not isinstance(epoch, int) or isinstance(epoch, bool) or epoch < 0 or not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint metadata {path} is malformed: 'epoch' must be an int >= 0 and 'meta' an object")
    return Checkpoint(epoch=epoch, model_state=model_state, extra_state=extra, meta=meta, path=path)


def latest_checkpoint(folder: Path) -> Checkpoint | None:
    """The newest checkpoint in ``folder`` that loads and verifies; ``None`` if there is none."""
    for path in reversed(list_checkpoints(folder)):
        try:
            return load_checkpoint(path)
        except CheckpointError:
            continue
    return None


def torch_rng_state() -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def set_torch_rng_state(state: dict[str, Tensor]) -> None:
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    if torch.cuda.is_available():
        cuda = [state[k] for k in sorted(state) if k.startswith("cuda")]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
