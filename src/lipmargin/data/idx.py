"""MNIST and Fashion-MNIST from their IDX files (plain or gzipped): :func:`parse_idx` and the loaders."""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from lipmargin.data.arrays import ArrayDataset
from lipmargin.data.augment import Augment
from lipmargin.data.registry import DatasetError, register_dataset

__all__ = ["IDX_IMAGES_MAGIC", "IDX_LABELS_MAGIC", "parse_idx"]

IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dims
IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dim
_IDX_STEMS: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_LAYOUT = (
    "{train-images-idx3-ubyte,train-labels-idx1-ubyte,t10k-images-idx3-ubyte,t10k-labels-idx1-ubyte}[.gz]"
)


def _read_file(path: Path, name: str, hint: str) -> bytes:
    """Bytes of ``path``, gunzipped when it ends in .gz; failures -> DatasetError naming the file."""
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as fh:
                return fh.read()
        return path.read_bytes()
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DatasetError(
            f"{name}: cannot read {path} ({type(err).__name__}: {err}); the file is corrupt or truncated, "
            f"replace it ({hint})"
        ) from err


def parse_idx(data: bytes, expected_magic: int, path: Path | str, name: str = "idx") -> np.ndarray:
    """Parse an IDX (unsigned byte) file's bytes into a uint8 array shaped as its header says.

    Raises :class:`DatasetError` naming ``path`` on a wrong magic number, a
    truncated header or a size that disagrees with the header's dimensions.

    >>> header = IDX_LABELS_MAGIC.to_bytes(4, "big") + (3).to_bytes(4, "big")
    >>> parse_idx(header + bytes([7, 0, 9]), IDX_LABELS_MAGIC, "labels.idx").tolist()
    [7, 0, 9]
    """
    if len(data) < 4:
        raise DatasetError(
            f"{name}: {path} has {len(data)} bytes, too short for an IDX file "
            f"(expected magic number 0x{expected_magic:08x})"
        )
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise DatasetError(
            f"{name}: {path} has magic number 0x{magic:08x}, expected 0x{expected_magic:08x} "
            f"(IDX unsigned-byte data with {expected_magic & 0xFF} dims); wrong or corrupt file"
        )
    ndim = expected_magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DatasetError(
            f"{name}: {path} is truncated: {len(data)} bytes, but its header alone needs {header} bytes"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = header + math.prod(dims)
    if len(data) != expected:
        raise DatasetError(
            f"{name}: {path} has {len(data)} bytes but its header (dims {dims}) implies {expected} bytes; "
            f"the file is truncated or corrupt"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()


def _find_idx_dir(root: Path, stems: tuple[str, str], torchvision_name: str) -> Path | None:
    """First of root, root/raw, root/<torchvision_name>/raw holding both files of a split."""
    for folder in (root, root / "raw", root / torchvision_name / "raw"):
        if all((folder / s).is_file() or (folder / f"{s}.gz").is_file() for s in stems):
            return folder
    return None


def _idx_file(folder: Path, stem: str) -> Path:
    plain = folder / stem
    return plain if plain.is_file() else folder / f"{stem}.gz"


def _load_idx_dataset(name: str, root: Path | None, split: str, torchvision_name: str, hint: str) -> ArrayDataset:
    if root is None:
        raise DatasetError(
            f"{name}: no root given and no default; pass root=<folder> holding {_IDX_LAYOUT} ({hint})"
        )
    if not root.is_dir():
        raise DatasetError(f"{name}: root {root} does not exist; expected {root}/{_IDX_LAYOUT} ({hint})")
    stems = _IDX_STEMS[split]
    folder = _find_idx_dir(root, stems, torchvision_name)
    if folder is None:
        raise DatasetError(
            f"{name}: no {stems[0]}[.gz] and {stems[1]}[.gz] under {root}; expected {root}/{_IDX_LAYOUT} ({hint})"
        )
    image_path, label_path = _idx_file(folder, stems[0]), _idx_file(folder, stems[1])
    images = parse_idx(_read_file(image_path, name, hint), IDX_IMAGES_MAGIC, image_path, name)  # (N, H, W)
    labels = parse_idx(_read_file(label_path, name, hint), IDX_LABELS_MAGIC, label_path, name)  # (N,)
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"{name}: {image_path} holds {images.shape[0]} images but {label_path} holds "
            f"{labels.shape[0]} labels; expected equal counts (mismatched or corrupt files)"
        )
    if labels.size and int(labels.max()) > 9:
        raise DatasetError(f"{name}: {label_path} has label {int(labels.max())}; expected labels 0..9")
    inputs = torch.from_numpy(images).unsqueeze(1)  # (N, 1, H, W) uint8
    return ArrayDataset(inputs, torch.from_numpy(labels.astype(np.int64)), 10, name)


# lipmargin's choice (the paper uses no augmentation on these): small random translations.
_MNIST_AUGMENT = Augment(crop_padding=2)
_MNIST_HINT = "MNIST's four IDX files from https://yann.lecun.com/exdb/mnist/ or a mirror"
_FASHION_HINT = (
    "from https://github.com/zalandoresearch/fashion-mnist, or on Debian: apt install dataset-fashion-mnist"
)


@register_dataset(
    "mnist",
    augment=_MNIST_AUGMENT,
    description="MNIST 28x28 digits from the four IDX files (plain or .gz)",
)
def _load_mnist(root: Path | None, split: str) -> ArrayDataset:
    return _load_idx_dataset("mnist", root, split, "MNIST", _MNIST_HINT)


@register_dataset(
    "fashion-mnist",
    default_root="/usr/share/datasets/fashion-mnist",
    augment=_MNIST_AUGMENT,
    description="Fashion-MNIST 28x28 from the four IDX files (plain or .gz)",
)
def _load_fashion_mnist(root: Path | None, split: str) -> ArrayDataset:
    return _load_idx_dataset("fashion-mnist", root, split, "FashionMNIST", _FASHION_HINT)

