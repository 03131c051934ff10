"""An image-folder dataset: ``data.name=folder`` with ``data.root=DIR``, one sub-folder per class.

Layout (checked in this order):

* ``DIR/train/<class>/<image>`` with ``DIR/test/<class>/<image>`` (or ``DIR/val/...`` when there
  is no ``DIR/test``): the split is the one on disk; both parts must hold the same class folders,
  and other folders beside them are not read.
* ``DIR/<class>/<image>``: the split is drawn here, deterministically and per class: of a class
  with ``n`` images, the ``floor(n / 5)`` whose file names have the smallest SHA-256 digests are
  the test split (20 %), the others the training split.  The split depends only on the file
  names inside each class folder, never on a seed or on other classes; a class needs at least 5
  images to contribute test images, and at least one class must.

Class names are the sorted sub-folder names; label ``i`` is the ``i``-th name (see
:func:`folder_classes`).  Images are PNG or JPEG files (suffix .png, .jpg or .jpeg in any case),
decoded with Pillow (``pip install pillow``); pixels are RGB, or one grayscale channel when every
image of both splits is grayscale.  All images must have one size: nothing is resized.  Names
starting with "." are ignored, and so are plain files beside the class folders (a README in ``DIR``
or ``DIR/train``); any other file or folder inside a class folder is an error naming it (skipping
it silently would change the dataset unnoticed).  The dataset holds uint8 ``(N, C, H, W)``
images, so its input shape is the images'.  There is no default augmentation: flips or crops may
not suit arbitrary images.

Cache: when ``DIR`` is writable, the decoded images are stored in ``DIR/.lipmargin-folder-cache.npz``
(an atomic write) and reused while the listing -- every image's path, size in bytes and mtime -- is
unchanged; a read-only ``DIR`` is decoded at every load and nothing is written anywhere else.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lipmargin.data.arrays import ArrayDataset
from lipmargin.data.images import decode_images, read_npz_cache, require_pillow, write_npz_cache
from lipmargin.data.registry import DatasetError, register_dataset

__all__ = ["FOLDER_CACHE", "IMAGE_SUFFIXES", "folder_classes"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
FOLDER_CACHE = ".lipmargin-folder-cache.npz"
TEST_EVERY = 5  # the flat layout puts floor(n / TEST_EVERY) images of each class into the test split
_CACHE_VERSION = 1
_LAYOUT = "<class>/<image>.png|.jpg, or train/<class>/... with test/<class>/... (or val/)"


@dataclass(frozen=True)
class _Listing:
    """Every image of a folder dataset, in dataset order (class, then file name)."""

    classes: tuple[str, ...]
    paths: tuple[Path, ...]
    labels: np.ndarray  # (N,) int64
    is_test: np.ndarray  # (N,) bool
    fingerprint: str  # SHA-256 of every path, size and mtime: the cache key


def _visible(folder: Path) -> list[Path]:
    """The entries of ``folder`` whose names do not start with ".", sorted by name."""
    try:
        return sorted((p for p in folder.iterdir() if not p.name.startswith(".")), key=lambda p: p.name)
    except OSError as err:
        raise DatasetError(f"folder: cannot list {folder} ({type(err).__name__}: {err})") from err


def _class_folders(folder: Path) -> list[Path]:
    classes = [p for p in _visible(folder) if p.is_dir()]
    if not classes:
        raise DatasetError(f"folder: no class folders in {folder}; expected {folder}/{_LAYOUT}")
    return classes


def _class_images(folder: Path) -> list[Path]:
    images = _visible(folder)
    for p in images:
        if p.is_dir():
            raise DatasetError(f"folder: {p} is a folder inside the class folder {folder}; images must lie directly in it")
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise DatasetError(
                f"folder: {p} is not a PNG or JPEG file (suffixes {', '.join(IMAGE_SUFFIXES)}); "
                f"remove it or move it out of the dataset"
            )
    if not images:
        raise DatasetError(f"folder: the class folder {folder} holds no images")
    return images


def _split_folders(root: Path) -> tuple[Path, Path] | None:
    """(train folder, test folder) of the split layout, or None for the flat layout."""
    if not (root / "train").is_dir():
        return None
    for name in ("test", "val"):
        if (root / name).is_dir():
            return root / "train", root / name
    raise DatasetError(f"folder: {root}/train exists but neither {root}/test nor {root}/val; add one of them")


def _is_test_by_name(names: list[str]) -> np.ndarray:
    """(n,) bool: the floor(n / TEST_EVERY) names with the smallest SHA-256 digests."""
    digests = [hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest() for name in names]
    chosen = set(sorted(range(len(names)), key=lambda i: (digests[i], names[i]))[: len(names) // TEST_EVERY])
    return np.array([i in chosen for i in range(len(names))], dtype=bool)


def _listing(root: Path) -> _Listing:
    split = _split_folders(root)
    parts = [(split[0], False), (split[1], True)] if split else [(root, False)]
    classes = [p.name for p in _class_folders(parts[0][0])]
    paths: list[Path] = []
    labels: list[int] = []
    is_test: list[np.ndarray] = []
    for folder, test in parts:
        names = [p.name for p in _class_folders(folder)]
        if names != classes:
            missing, extra = sorted(set(classes) - set(names)), sorted(set(names) - set(classes))
            raise DatasetError(
                f"folder: {folder} and {parts[0][0]} must hold the same class folders; "
                f"{folder} lacks {missing} and has extra {extra}"
            )
        for label, name in enumerate(classes):
            files = _class_images(folder / name)
            paths += files
            labels += [label] * len(files)
            is_test.append(np.full(len(files), test) if split else _is_test_by_name([f.name for f in files]))
    test_mask = np.concatenate(is_test)
    return _Listing(tuple(classes), tuple(paths), np.asarray(labels, dtype=np.int64), test_mask, _fingerprint(root, paths))


def _fingerprint(root: Path, paths: list[Path]) -> str:
    entries = []
    for p in paths:
        try:
            st = p.stat()
        except OSError as err:
            raise DatasetError(f"folder: cannot read {p} ({type(err).__name__}: {err})") from err
        entries.append([str(p.relative_to(root)), st.st_size, st.st_mtime_ns])
    text = json.dumps([_CACHE_VERSION, TEST_EVERY, entries], ensure_ascii=True)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def _root(root: Path | None) -> Path:
    if root is None:
        raise DatasetError(f"folder: no root given; pass root=DIR (config: data.root=DIR) holding DIR/{_LAYOUT}")
    if not root.is_dir():
        raise DatasetError(f"folder: root {root} does not exist or is not a folder; expected {root}/{_LAYOUT}")
    return root


def _images(root: Path, listing: _Listing) -> np.ndarray:
    """(N, C, H, W) uint8 images of ``listing``, from the cache when it matches the listing."""
    cache = root / FOLDER_CACHE
    cached = read_npz_cache(cache, "folder")
    if cached is not None and "images" in cached and "fingerprint" in cached:
        images = cached["images"]
        if str(cached["fingerprint"]) == listing.fingerprint and images.dtype == np.uint8 and images.ndim == 4 \
                and images.shape[0] == len(listing.paths):
            return images
    require_pillow("folder", f"decoding the images under {root}")
    images = decode_images(listing.paths, "folder")
    if os.access(root, os.W_OK):
        write_npz_cache(cache, "folder", {"images": images, "fingerprint": np.array(listing.fingerprint)})
    return images


def folder_classes(root: str | Path) -> list[str]:
    """The class names of the image folder ``root``, in label order (label ``i`` is the ``i``-th).

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     for name in ("dog", "cat"):
    ...         os.makedirs(os.path.join(tmp, name))
    ...         open(os.path.join(tmp, name, "0.png"), "wb").close()  # listed, not decoded
    ...     folder_classes(tmp)
    ['cat', 'dog']
    """
    return list(_listing(_root(Path(root).expanduser())).classes)


@register_dataset(
    "folder",
    description="PNG/JPEG images in data.root=DIR: DIR/<class>/*, or DIR/train and DIR/test (needs Pillow)",
)
def _load_folder(root: Path | None, split: str) -> ArrayDataset:
    root = _root(root)
    listing = _listing(root)
    if not listing.is_test.any():
        raise DatasetError(
            f"folder: no test images: every class folder in {root} has fewer than {TEST_EVERY} images; add images "
            f"or give {root}/train and {root}/test folders"
        )
    images = _images(root, listing)  # (N, C, H, W)
    keep = listing.is_test if split == "test" else ~listing.is_test  # (N,)
    return ArrayDataset(
        torch.from_numpy(images[keep]), torch.from_numpy(listing.labels[keep]), len(listing.classes), "folder"
    )
