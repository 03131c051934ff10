"""Checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a pair ``epoch-NNNNNN.safetensors`` + ``epoch-NNNNNN.json`` in a folder.  The JSON is
written last and records the SHA-256 of the tensor file, so it is the commit marker: a checkpoint
counts as intact only when its JSON parses and the tensor file's hash matches.  Both files are
written to a temporary name, flushed, fsynced and renamed, so a kill at any moment leaves every
earlier checkpoint intact.

Two ways to pick a checkpoint: :func:`resolve_checkpoint` (certify, audit, export, report) loads
the newest one or exactly the one named, and never another; :func:`newest_intact_checkpoint`
(resuming training) skips damaged newer ones and returns them, so the caller can say so.  A loaded
checkpoint's :attr:`Checkpoint.ref` (:class:`CheckpointRef`) names its ``.safetensors`` file, its
epoch and the SHA-256 of that file's bytes, for results to record.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
import warnings
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

from lipmargin._io import atomic_write_bytes, atomic_write_many, atomic_write_text, default_file_mode, fsync_directory

__all__ = [
    "CheckpointError",
    "DamagedCheckpointError",
    "Checkpoint",
    "CheckpointRef",
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
    "newest_intact_checkpoint",
    "resolve_checkpoint",
    "read_checkpoint_ref",
    "FORMAT_VERSION",
]

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A missing, corrupt or mismatching checkpoint; the message is one line."""


class DamagedCheckpointError(CheckpointError):
    """The checkpoint asked for (by default a run's newest) is damaged; nothing falls back to another.

    ``damaged`` is the file that failed, ``reason`` the one-line cause, ``intact`` the names of the
    folder's checkpoints that verify (oldest first), any of which the caller may choose explicitly.
    """

    def __init__(self, message: str, *, damaged: Path, reason: str, intact: list[str]) -> None:
        super().__init__(message)
        self.damaged, self.reason, self.intact = damaged, reason, list(intact)


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


@dataclass(frozen=True)
class CheckpointRef:
    """Which weights a result belongs to: enough to check them with ``sha256sum``.

    ``path`` is the checkpoint's tensor file ``epoch-NNNNNN.safetensors`` and ``sha256`` the
    SHA-256 (hex) of that file's bytes, exactly as written -- ``sha256sum path`` prints the same
    digest.  The file holds the model's weights and buffers plus the optimizer / scheduler / RNG
    tensors of the same epoch; the companion ``.json`` (config, metrics) is not part of the hash.
    """

    path: Path
    epoch: int
    sha256: str

    @property
    def name(self) -> str:
        """The checkpoint's name, ``epoch-NNNNNN`` (what ``--checkpoint`` accepts)."""
        return self.path.stem

    def to_dict(self, relative_to: Path | None = None) -> dict[str, Any]:
        """JSON form ``{"path", "epoch", "sha256"}``; ``path`` relative to ``relative_to`` when inside it."""
        path = self.path
        if relative_to is not None:
            base = Path(relative_to)
            for p, b in ((self.path, base), (self.path.resolve(), base.resolve())):
                try:
                    path = p.relative_to(b)
                    break
                except ValueError:
                    continue
            else:
                path = self.path.resolve()
        return {"path": path.as_posix(), "epoch": self.epoch, "sha256": self.sha256}


@dataclass
class Checkpoint:
    epoch: int
    model_state: dict[str, Tensor]
    extra_state: dict[str, Any]  # optimizer / scheduler / rng, already re-assembled
    meta: dict[str, Any]  # config, metrics, anything JSON
    path: Path
    sha256: str = ""  # of the .safetensors file's bytes, verified when loaded

    @property
    def ref(self) -> CheckpointRef:
        return CheckpointRef(self.path.with_suffix(".safetensors"), self.epoch, self.sha256)


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
    digest = str(record["sha256"])
    return Checkpoint(epoch=epoch, model_state=model_state, extra_state=extra, meta=meta, path=path, sha256=digest)


def read_checkpoint_ref(path: Path) -> CheckpointRef:
    """The :class:`CheckpointRef` recorded in a checkpoint's ``.json`` (the hash is read, not recomputed).

    For a checkpoint just written by :func:`save_checkpoint`; use :func:`load_checkpoint` to verify one.
    """
    path = Path(path)
    try:
        record = json.loads(path.read_text())
        return CheckpointRef(path.with_suffix(".safetensors"), int(record["epoch"]), str(record["sha256"]))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint metadata {path} is unreadable ({type(e).__name__})") from None


def _candidates(folder: Path) -> list[Path]:
    """The ``.json`` path of every checkpoint in ``folder``, oldest first, including those whose
    ``.json`` is missing beside a ``.safetensors`` (an interrupted save or a deleted commit marker)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stems = {p.stem for p in folder.glob("epoch-*.json")} | {p.stem for p in folder.glob("epoch-*.safetensors")}
    return [folder / f"{stem}.json" for stem in sorted(s for s in stems if s[6:].isdigit())]


def _damaged_file(path: Path, reason: str) -> Path:
    """The file of checkpoint ``path`` (its .json) that ``reason`` (load_checkpoint's message) blames."""
    weights = path.with_suffix(".safetensors")
    return weights if reason.startswith("checkpoint weights") or not path.exists() else path


def _short_reason(path: Path, reason: str) -> str:
    """``load_checkpoint``'s message for ``path`` without the file name (said beside it already)."""
    return (
        reason.replace(f"checkpoint weights {path.with_suffix('.safetensors')} ", "its weights ")
        .replace(f"checkpoint metadata {path} ", "its metadata ")
        .replace(f"checkpoint {path} ", f"its metadata {path.name} ")
    )


def newest_intact_checkpoint(folder: Path) -> tuple[Checkpoint | None, list[tuple[Path, str]]]:
    """The newest checkpoint in ``folder`` that verifies, and the newer ones skipped as damaged.

    Returns ``(checkpoint or None, [(damaged file, one-line reason, e.g. "its weights do not match
    ..."), ...])`` (newest first).  Meant for
    resuming training, where an older intact checkpoint is a fine place to continue from; whoever
    calls it must tell the user about every skipped file.  Certification must not fall back: use
    :func:`resolve_checkpoint`.
    """
    skipped: list[tuple[Path, str]] = []
    for path in reversed(_candidates(folder)):
        try:
            return load_checkpoint(path), skipped
        except CheckpointError as e:
            skipped.append((_damaged_file(path, str(e)), _short_reason(path, str(e))))
    return None, skipped


def latest_checkpoint(folder: Path) -> Checkpoint | None:
    """The newest checkpoint in ``folder`` that loads and verifies; ``None`` if there is none.

    Damaged newer checkpoints are skipped silently; see :func:`newest_intact_checkpoint` for the list.
    """
    return newest_intact_checkpoint(folder)[0]


_NAME = re.compile(r"epoch-\d+")


def _chosen_path(folder: Path, choice: str | Path) -> Path:
    """The ``.json`` path named by ``choice``: ``epoch-000001`` (or ``1``) in ``folder``, or a file path."""
    text = str(choice)
    path = Path(text)
    if len(path.parts) == 1 and path.suffix in ("", ".json", ".safetensors"):
        stem = path.stem if path.suffix else text
        if stem.isdigit():
            stem = _name(int(stem))
        if _NAME.fullmatch(stem):
            candidate = Path(folder) / f"{stem}.json"
            if not candidate.exists() and not candidate.with_suffix(".safetensors").exists():
                names = [p.stem for p in _candidates(folder)]
                there = f"there are: {', '.join(names)}" if names else "it holds none"
                raise CheckpointError(f"no checkpoint {stem} in {folder} ({there})")
            return candidate
        if not path.exists():
            raise CheckpointError(f"checkpoint {text!r} is neither a name like epoch-000001 nor an existing file")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path} is a folder; give a checkpoint file (epoch-NNNNNN.json or .safetensors)")
    if path.suffix == ".safetensors":
        return path.with_suffix(".json")
    if path.suffix == ".json":
        return path
    raise CheckpointError(f"checkpoint {path} is not a checkpoint file (epoch-NNNNNN.json or .safetensors)")


def resolve_checkpoint(folder: Path, choice: str | Path | None = None) -> Checkpoint:
    """Load exactly one checkpoint: the newest in ``folder``, or the one ``choice`` names; never another.

    ``choice`` is a name (``epoch-000001``, also ``epoch-000001.json`` or just ``1``) looked up in
    ``folder``, or a path to a checkpoint's ``.json`` or ``.safetensors`` file.  Raises
    :class:`DamagedCheckpointError` when the newest checkpoint is damaged (the message names it, the
    intact ones, and how to choose one) and :class:`CheckpointError` when the chosen one is damaged
    or missing or ``folder`` holds no checkpoint.
    """
    folder = Path(folder)
    if choice is not None:
        return load_checkpoint(_chosen_path(folder, choice))
    candidates = _candidates(folder)
    if not candidates:
        raise CheckpointError(f"no checkpoint in {folder}")
    newest = candidates[-1]
    try:
        return load_checkpoint(newest)
    except CheckpointError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        intact = []
        for path in candidates[:-1]:
            try:
                load_checkpoint(path)
            except CheckpointError:
                continue
            intact.append(path.stem)
        damaged = _damaged_file(newest, reason)
        short = _short_reason(newest, reason)
        if intact:
            advice = (f"intact: {', '.join(intact)}; no older checkpoint is used unless chosen: "
                      f"--checkpoint {intact[-1]} or a path to its file")
        else:
            advice = f"there is no intact checkpoint in {folder}"
        raise DamagedCheckpointError(
            f"the newest checkpoint {damaged} is damaged: {short}; {advice}",
            damaged=damaged, reason=reason, intact=intact,
        ) from None


def torch_rng_state() -> dict[str, Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            state[f"cuda{i}"] = s
    return state


def _cuda_index(key: str) -> int | None:
    """``"cuda10"`` -> 10; ``None`` for keys that are not a CUDA device's state."""
    return int(key[4:]) if key.startswith("cuda") and key[4:].isdigit() else None


def set_torch_rng_state(state: dict[str, Tensor]) -> None:
    """Restore :func:`torch_rng_state`'s RNG states.

    CUDA states are restored device by device in numeric order (``cuda2`` before ``cuda10``).  When
    the checkpoint holds the states of a different number of CUDA devices than this machine has,
    the devices present in both are restored and a ``UserWarning`` says the restore is partial, so
    that the resumed run is known not to repeat the uninterrupted one exactly.
    """
    if "cpu" in state:
        torch.set_rng_state(state["cpu"])
    cuda = sorted((i, s) for k, s in state.items() if (i := _cuda_index(k)) is not None)
    if not cuda:
        return
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    saved = [i for i, _ in cuda]
    if saved != list(range(available)):
        warnings.warn(
            f"the checkpoint holds the CUDA RNG states of {len(saved)} device(s) (cuda{saved[0]}..cuda{saved[-1]}) "
            f"but this machine has {available}; only the devices present in both are restored, so random "
            f"numbers drawn on the GPU will differ from those of an uninterrupted run",
            UserWarning,
            stacklevel=2,
        )
    for i, s in cuda:
        if i < available:
            torch.cuda.set_rng_state(s, i)
