"""Tiny ImageNet (200 classes of 64x64 JPEGs), decoded once with Pillow and cached as .npz."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lipmargin.data.arrays import ArrayDataset
from lipmargin.data.augment import Augment
from lipmargin.data.images import decode_images, read_npz_cache, require_pillow, write_npz_cache
from lipmargin.data.registry import DatasetError, register_dataset

__all__ = ["TINY_FOLDER", "TINY_SIZE"]

TINY_FOLDER = "tiny-imagenet-200"
TINY_SIZE = 64
_TINY_HINT = "unzip tiny-imagenet-200.zip from http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_TINY_LAYOUT = "{wnids.txt,train/<wnid>/images/*.JPEG,val/val_annotations.txt,val/images/*.JPEG}"
_JPEG_SUFFIXES = (".jpeg", ".jpg")


def _tiny_folder(root: Path | None) -> Path:
    if root is None:
        raise DatasetError(
            f"tiny-imagenet: no root given; pass root=<folder containing {TINY_FOLDER}/{_TINY_LAYOUT}> ({_TINY_HINT})"
        )
    for base in (root / TINY_FOLDER, root):
        if (base / "wnids.txt").is_file():
            return base
    raise DatasetError(
        f"tiny-imagenet: no {TINY_FOLDER!r} folder with wnids.txt under {root}; "
        f"expected {root}/{TINY_FOLDER}/{_TINY_LAYOUT} ({_TINY_HINT})"
    )


def _tiny_wnids(base: Path) -> list[str]:
    path = base / "wnids.txt"
    try:
        wnids = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"tiny-imagenet: cannot read {path} ({type(err).__name__}: {err})") from err
    if not wnids or len(set(wnids)) != len(wnids):
        raise DatasetError(f"tiny-imagenet: {path} must list distinct class ids, one per line ({_TINY_HINT})")
    return sorted(wnids)


def _tiny_listing(base: Path, split: str, wnids: list[str]) -> tuple[list[Path], list[int], list[Path]]:
    """(image paths, labels, paths whose mtimes the cache must be newer than)."""
    index = {w: i for i, w in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    sources: list[Path] = [base / "wnids.txt"]
    if split == "train":
        for wnid in wnids:
            folder = base / "train" / wnid / "images"
            if not folder.is_dir():
                raise DatasetError(f"tiny-imagenet: missing folder {folder}; expected {base}/{_TINY_LAYOUT} ({_TINY_HINT})")
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in _JPEG_SUFFIXES)
            if not files:
                raise DatasetError(f"tiny-imagenet: no JPEG images in {folder} ({_TINY_HINT})")
            paths += files
            labels += [index[wnid]] * len(files)
            sources.append(folder)
        return paths, labels, sources
    annotations = base / "val" / "val_annotations.txt"
    images = base / "val" / "images"
    if not annotations.is_file() or not images.is_dir():
        raise DatasetError(
            f"tiny-imagenet: missing {annotations} or {images}; expected {base}/{_TINY_LAYOUT} ({_TINY_HINT})"
        )
    try:
        lines = annotations.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DatasetError(f"tiny-imagenet: cannot read {annotations} ({type(err).__name__}: {err})") from err
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise DatasetError(
                f"tiny-imagenet: {annotations} line {lineno} is {line[:80]!r}; expected "
                f"'<file>\\t<wnid listed in wnids.txt>\\t<bbox>'"
            )
        paths.append(images / fields[0])
        labels.append(index[fields[1]])
    if not paths:
        raise DatasetError(f"tiny-imagenet: {annotations} lists no images ({_TINY_HINT})")
    sources += [annotations, images]
    return paths, labels, sources


def _read_tiny_cache(cache: Path, wnids: list[str], n: int) -> tuple[np.ndarray, np.ndarray] | None:
    cached = read_npz_cache(cache, "tiny-imagenet")
    if cached is None or not {"images", "labels", "wnids"} <= cached.keys():
        return None
    images, labels, cached_wnids = cached["images"], cached["labels"], cached["wnids"]
    if (
        images.dtype != np.uint8
        or images.shape != (n, 3, TINY_SIZE, TINY_SIZE)
        or labels.shape != (n,)
        or list(cached_wnids) != wnids
    ):
        return None
    return images, labels.astype(np.int64)


_TINY_AUGMENT = Augment(crop_padding=8, hflip=True, brightness=0.25, contrast=0.25, saturation=0.25, rotation=2.0)


@register_dataset(
    "tiny-imagenet",
    augment=_TINY_AUGMENT,
    description="Tiny ImageNet 64x64 RGB, 200 classes; split 'test' is the official val set (needs Pillow)",
)
def _load_tiny_imagenet(root: Path | None, split: str) -> ArrayDataset:
    """Decoded once, then cached as ``<tiny-imagenet-200>/lipmargin-cache-<split>.npz``.

    The cache is reused while it is newer than wnids.txt and the split's
    annotation file / image folders, and lists the same classes.
    """
    base = _tiny_folder(root)
    wnids = _tiny_wnids(base)
    paths, label_list, sources = _tiny_listing(base, split, wnids)
    n = len(paths)
    cache = base / f"lipmargin-cache-{split}.npz"
    if cache.is_file() and cache.stat().st_mtime_ns >= max(p.stat().st_mtime_ns for p in sources):
        cached = _read_tiny_cache(cache, wnids, n)
        if cached is not None:
            images, labels = cached
            return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), len(wnids), "tiny-imagenet")
    require_pillow("tiny-imagenet", f"decoding the JPEGs under {base}")
    images = decode_images(paths, "tiny-imagenet", size=(TINY_SIZE, TINY_SIZE), rgb=True)  # (N, 3, H, W)
    labels = np.asarray(label_list, dtype=np.int64)  # (N,)
    write_npz_cache(cache, "tiny-imagenet", {"images": images, "labels": labels, "wnids": np.array(wnids)})
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), len(wnids), "tiny-imagenet")
