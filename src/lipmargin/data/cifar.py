"""CIFAR-10 and CIFAR-100 from their python pickles, read with a restricted unpickler.

The unpickler resolves only the few numpy globals needed to rebuild arrays, so a malicious
"CIFAR batch" cannot run code.
"""

from __future__ import annotations

import functools
import importlib
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lipmargin.data.arrays import ArrayDataset
from lipmargin.data.augment import Augment
from lipmargin.data.registry import DatasetError, register_dataset

__all__: list[str] = []


def _numpy_attr(modules: tuple[str, ...], attr: str) -> Any:
    for module in modules:
        try:
            return getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
    return None


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """Stand-in for ``_codecs.encode`` (used by protocol-2 pickles of bytes), latin-1 only."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


@functools.lru_cache(maxsize=1)
def _pickle_allowlist() -> dict[tuple[str, str], Any]:
    reconstruct = _numpy_attr(("numpy._core.multiarray", "numpy.core.multiarray"), "_reconstruct")
    frombuffer = _numpy_attr(("numpy._core.numeric", "numpy.core.numeric"), "_frombuffer")
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
    }
    # numpy >= 2 pickles name numpy._core, older ones numpy.core: accept both spellings.
    for prefix in ("numpy.core", "numpy._core"):
        if reconstruct is not None:
            allowed[(f"{prefix}.multiarray", "_reconstruct")] = reconstruct
        if frombuffer is not None:
            allowed[(f"{prefix}.numeric", "_frombuffer")] = frombuffer
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the few globals needed to rebuild numpy arrays."""

    def find_class(self, module: str, name: str) -> Any:
        obj = _pickle_allowlist().get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return obj


def _load_pickle(path: Path, name: str, hint: str) -> Any:
    try:
        with path.open("rb") as fh:
            return _RestrictedUnpickler(fh, encoding="bytes").load()
    except pickle.UnpicklingError as err:
        raise DatasetError(f"{name}: {path} is not a valid CIFAR batch: {err} ({hint})") from err
    except (OSError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            struct.error, MemoryError, OverflowError, RecursionError) as err:
        raise DatasetError(
            f"{name}: cannot unpickle {path} ({type(err).__name__}: {err}); the file is corrupt or "
            f"truncated, replace it ({hint})"
        ) from err


def _cifar_batch(path: Path, name: str, label_key: str, num_classes: int, hint: str) -> tuple[np.ndarray, np.ndarray]:
    """(images (n, 3, 32, 32) uint8, labels (n,) int64) from one CIFAR pickle."""
    if not path.is_file():
        raise DatasetError(f"{name}: missing file {path} ({hint})")
    batch = _load_pickle(path, name, hint)
    if not isinstance(batch, dict):
        raise DatasetError(f"{name}: {path} holds a {type(batch).__name__}, expected a dict ({hint})")

    def get(key: str) -> Any:
        for k in (key.encode(), key):
            if k in batch:
                return batch[k]
        raise DatasetError(f"{name}: {path} has no key {key!r}; expected keys 'data' and {label_key!r} ({hint})")

    data, labels = get("data"), get(label_key)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(f"{name}: {path} 'data' is a {desc}; expected a uint8 array of shape (N, 3072)")
    try:
        labels_arr = np.asarray(labels)
    except (ValueError, TypeError) as err:
        raise DatasetError(f"{name}: {path} {label_key!r} is not a list of integers") from err
    if labels_arr.ndim != 1 or labels_arr.shape[0] != data.shape[0] or not np.issubdtype(labels_arr.dtype, np.integer):
        raise DatasetError(
            f"{name}: {path} {label_key!r} has shape {labels_arr.shape} and dtype {labels_arr.dtype}; "
            f"expected {data.shape[0]} integer labels"
        )
    if labels_arr.size and (int(labels_arr.min()) < 0 or int(labels_arr.max()) >= num_classes):
        raise DatasetError(
            f"{name}: {path} {label_key!r} has values in {int(labels_arr.min())}..{int(labels_arr.max())}; "
            f"expected 0..{num_classes - 1}"
        )
    # Each row is 1024 red, 1024 green, 1024 blue values, each a row-major 32x32 plane.
    return data.reshape(-1, 3, 32, 32), labels_arr.astype(np.int64)  # (n, 3, 32, 32), (n,)


def _cifar_folder(root: Path | None, name: str, folder: str, layout: str, hint: str) -> Path:
    if root is None:
        raise DatasetError(f"{name}: no root given; pass root=<folder containing {folder}/{layout}> ({hint})")
    if root.name == folder and root.is_dir():
        return root
    if (root / folder).is_dir():
        return root / folder
    raise DatasetError(f"{name}: no {folder!r} folder under {root}; expected {root}/{folder}/{layout} ({hint})")


_CIFAR_AUGMENT = Augment(crop_padding=4, hflip=True, brightness=0.25, contrast=0.25, saturation=0.25, rotation=2.0)
_CIFAR_HINT = "the python version from https://www.cs.toronto.edu/~kriz/cifar.html"


def _load_cifar(
    name: str, root: Path | None, folder: str, files: list[str], layout: str, label_key: str, num_classes: int
) -> ArrayDataset:
    base = _cifar_folder(root, name, folder, layout, _CIFAR_HINT)
    parts = [_cifar_batch(base / f, name, label_key, num_classes, _CIFAR_HINT) for f in files]
    images = np.concatenate([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]  # (N, 3, 32, 32)
    labels = np.concatenate([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]  # (N,)
    return ArrayDataset(
        torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels), num_classes, name
    )


@register_dataset(
    "cifar10",
    augment=_CIFAR_AUGMENT,
    description="CIFAR-10 32x32 RGB from cifar-10-batches-py (python pickles)",
)
def _load_cifar10(root: Path | None, split: str) -> ArrayDataset:
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    return _load_cifar(
        "cifar10", root, "cifar-10-batches-py", files, "{data_batch_1..5,test_batch}", "labels", 10
    )


@register_dataset(
    "cifar100",
    augment=_CIFAR_AUGMENT,
    description="CIFAR-100 32x32 RGB, 100 fine classes, from cifar-100-python (python pickles)",
)
def _load_cifar100(root: Path | None, split: str) -> ArrayDataset:
    return _load_cifar("cifar100", root, "cifar-100-python", [split], "{train,test}", "fine_labels", 100)

