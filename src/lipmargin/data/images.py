"""Image files decoded with Pillow, and .npz caches of decoded arrays (shared by the image formats).

Pillow is an optional dependency, imported only when an image is actually decoded; a cache hit
needs no Pillow.  Caches are written atomically through :mod:`lipmargin._io`; a cache that cannot be
written only warns (the images are decoded again next time).
"""

from __future__ import annotations

import io
import os
import warnings
import zipfile
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from lipmargin._io import atomic_write_bytes
from lipmargin.data.registry import DatasetError

__all__ = ["decode_image", "decode_images", "read_npz_cache", "require_pillow", "write_npz_cache"]

GRAY_MODES = ("1", "L", "LA")  # Pillow modes decoded as one channel; every other 8-bit mode becomes RGB


def require_pillow(name: str, what: str) -> None:
    """Raise :class:`DatasetError` ("pip install pillow") when Pillow is missing; ``what`` needs it."""
    try:
        import PIL  # noqa: F401  (availability check only)
    except ImportError as err:
        raise DatasetError(f"{name}: {what} needs Pillow, which is not installed: pip install pillow") from err


def decode_image(path: Path, name: str, rgb: bool) -> np.ndarray:
    """(H, W, 3) uint8 RGB pixels of one image file, or (H, W, 1) for a grayscale one unless ``rgb``.

    Grayscale means Pillow modes 1, L and LA; other 8-bit modes (palette, RGBA, CMYK, ...) are
    converted to RGB by Pillow (an alpha channel is dropped).  16-bit and float images are refused
    rather than clipped.  Any failure raises :class:`DatasetError` naming the file.
    """
    from PIL import Image  # imported lazily: Pillow is optional

    pixels: np.ndarray | None = None
    try:
        with Image.open(path) as img:
            mode = img.mode
            if not (mode.startswith("I") or mode == "F"):
                gray = mode in GRAY_MODES and not rgb
                pixels = np.asarray(img.convert("L" if gray else "RGB"), dtype=np.uint8)  # (H, W) or (H, W, 3)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        # PIL.UnidentifiedImageError and "image file is truncated" are OSErrors
        raise DatasetError(f"{name}: cannot decode {path} ({type(err).__name__}: {err}); replace the file") from err
    if pixels is None:
        raise DatasetError(f"{name}: {path} has {mode} pixels (16-bit or floating point); save it as 8-bit RGB or grayscale")
    return pixels.reshape(pixels.shape[0], pixels.shape[1], -1)


def decode_images(
    paths: Sequence[Path], name: str, *, size: tuple[int, int] | None = None, rgb: bool = False
) -> np.ndarray:
    """(N, C, H, W) uint8 pixels of ``paths`` (N >= 1), decoded in a few threads, in order.

    C is 1 when every image is grayscale (and ``rgb`` is false), else 3 (grayscale images then
    repeat their one channel, exactly as Pillow's L -> RGB conversion does).  ``size=(H, W)``
    requires that size of every image; without it all images must have the first one's size
    (the error names both files: nothing is ever resized).
    """
    if not paths:
        raise ValueError(f"{name}: no images to decode")
    out: np.ndarray | None = None  # (N, H, W, 3)
    all_gray = True
    pool = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1))
    try:
        decoded = pool.map(lambda p: decode_image(p, name, rgb), paths)
        for i, (path, pixels) in enumerate(zip(paths, decoded)):
            h, w = pixels.shape[:2]
            if size is not None and (h, w) != size:
                raise DatasetError(f"{name}: {path} is {w}x{h}, expected {size[1]}x{size[0]}")
            if out is None:
                out = np.empty((len(paths), h, w, 3), dtype=np.uint8)
            elif (h, w) != out.shape[1:3]:
                raise DatasetError(
                    f"{name}: images differ in size: {paths[0]} is {out.shape[2]}x{out.shape[1]} but {path} "
                    f"is {w}x{h}; resize them all to one size first"
                )
            out[i] = pixels  # a (H, W, 1) grayscale image broadcasts to its 3 channels
            all_gray = all_gray and pixels.shape[2] == 1
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    assert out is not None  # paths is not empty
    if all_gray:
        out = out[..., :1]
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))  # (N, C, H, W)


def read_npz_cache(path: Path, name: str) -> dict[str, np.ndarray] | None:
    """The arrays stored in the cache ``path``; None when it is missing or unreadable (the latter warns)."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        warnings.warn(f"{name}: ignoring unreadable cache {path} ({type(err).__name__}: {err})", stacklevel=3)
        return None


def write_npz_cache(path: Path, name: str, arrays: dict[str, np.ndarray]) -> None:
    """Store ``arrays`` as the .npz ``path``, atomically; a failure only warns."""
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    try:
        atomic_write_bytes(path, buffer.getvalue())
    except OSError as err:
        warnings.warn(f"{name}: could not write cache {path} ({err}); decoding again next time", stacklevel=3)
