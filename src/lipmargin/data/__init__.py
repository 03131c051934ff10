"""Datasets, batched on-device augmentation and a device-resident batch loader.

Everything a training run needs from its data lives here:

* :class:`ArrayDataset` -- a whole dataset as two tensors (inputs, labels);
* a registry of dataset loaders (:data:`DATASETS`, :func:`register_dataset`,
  :func:`load_dataset`) reading the standard on-disk formats without any download;
* :class:`Augment` and pure, batched augmentation functions that run on the
  tensor's own device (CPU or CUDA) with an explicit :class:`torch.Generator`;
* :class:`DeviceLoader`, which keeps the dataset as one tensor on the training
  device and slices (optionally distributed) batches from it.

Randomness is always explicit: shuffling and augmentation derive only from
``(seed, epoch[, rank, batch])``, so a resumed run reproduces them exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import importlib
import math
import os
import pickle
import struct
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lipmargin._io import default_file_mode

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "Augment",
    "DatasetError",
    "DatasetSpec",
    "DeviceLoader",
    "augment_batch",
    "color_jitter",
    "list_datasets",
    "load_dataset",
    "parse_idx",
    "random_crop",
    "random_hflip",
    "random_rotation",
    "register_dataset",
    "rotate",
    "stratified_subset",
    "to_float",
    "train_val_split",
]

SPLITS: tuple[str, ...] = ("train", "test")


class DatasetError(ValueError):
    """A dataset is missing or malformed.

    The message is a single line naming the path, what was expected there and
    how to obtain it.
    """

    def __init__(self, message: str) -> None:
        super().__init__(_one_line(message))


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


# --------------------------------------------------------------------------------------
# ArrayDataset
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ArrayDataset:
    """A whole dataset held as two tensors.

    ``inputs`` is either ``(N, C, H, W)`` uint8 images in 0..255 (converted to
    float in [0, 1] per batch by :func:`to_float`) or a float32 tensor
    (``(N, D)`` or ``(N, C, H, W)``) already in its final range.
    ``labels`` is ``(N,)`` int64 with values in ``0..num_classes-1``.
    """

    inputs: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    name: str

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, torch.Tensor) or not isinstance(self.labels, torch.Tensor):
            raise TypeError(
                f"ArrayDataset {self.name!r}: inputs and labels must be torch.Tensor, got "
                f"{type(self.inputs).__name__} and {type(self.labels).__name__}"
            )
        if self.inputs.dtype not in (torch.uint8, torch.float32):
            raise TypeError(
                f"ArrayDataset {self.name!r}: inputs must be uint8 (images in 0..255) or float32, "
                f"got {self.inputs.dtype}; convert with .to(torch.float32)"
            )
        if self.inputs.dim() < 2:
            raise ValueError(
                f"ArrayDataset {self.name!r}: inputs must have shape (N, ...) with at least 2 dims, "
                f"got {tuple(self.inputs.shape)}"
            )
        if self.inputs.dtype == torch.uint8 and self.inputs.dim() != 4:
            raise ValueError(
                f"ArrayDataset {self.name!r}: uint8 inputs must be images (N, C, H, W), "
                f"got shape {tuple(self.inputs.shape)}"
            )
        if self.labels.dtype != torch.int64 or self.labels.dim() != 1:
            raise TypeError(
                f"ArrayDataset {self.name!r}: labels must be a (N,) int64 tensor, "
                f"got {self.labels.dtype} of shape {tuple(self.labels.shape)}"
            )
        if self.labels.shape[0] != self.inputs.shape[0]:
            raise ValueError(
                f"ArrayDataset {self.name!r}: {self.inputs.shape[0]} inputs but "
                f"{self.labels.shape[0]} labels"
            )
        if self.inputs.device != self.labels.device:
            raise ValueError(
                f"ArrayDataset {self.name!r}: inputs on {self.inputs.device} but labels on "
                f"{self.labels.device}"
            )
        if not isinstance(self.num_classes, int) or self.num_classes < 1:
            raise ValueError(
                f"ArrayDataset {self.name!r}: num_classes must be a positive int, got {self.num_classes!r}"
            )
        if self.labels.numel() > 0:
            lo, hi = int(self.labels.min()), int(self.labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(
                    f"ArrayDataset {self.name!r}: labels must lie in 0..{self.num_classes - 1}, "
                    f"found values in {lo}..{hi}"
                )

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one input, ``inputs.shape[1:]``."""
        return tuple(self.inputs.shape[1:])

    def __len__(self) -> int:
        return int(self.inputs.shape[0])

    def to(self, device: torch.device | str) -> ArrayDataset:
        """The same dataset on ``device`` (dtypes unchanged: uint8 stays uint8)."""
        device = torch.device(device)
        return dataclasses.replace(self, inputs=self.inputs.to(device), labels=self.labels.to(device))

    def subset(self, index: torch.Tensor) -> ArrayDataset:
        """The samples selected by ``index`` (an int64 index tensor or a (N,) bool mask)."""
        index = torch.as_tensor(index, device=self.inputs.device)
        if index.dtype == torch.bool:
            if index.shape != (len(self),):
                raise ValueError(
                    f"subset of {self.name!r}: a bool mask must have shape ({len(self)},), "
                    f"got {tuple(index.shape)}"
                )
            index = index.nonzero().squeeze(1)  # (K,)
        elif index.dtype not in (torch.int64, torch.int32) or index.dim() != 1:
            raise TypeError(
                f"subset of {self.name!r}: index must be a 1-D int64 tensor or a bool mask, "
                f"got {index.dtype} of shape {tuple(index.shape)}"
            )
        index = index.long()
        return dataclasses.replace(
            self, inputs=self.inputs.index_select(0, index), labels=self.labels.index_select(0, index)
        )


def to_float(inputs: torch.Tensor) -> torch.Tensor:
    """uint8 images in 0..255 -> float32 in [0, 1]; floating inputs pass through as float32."""
    if inputs.dtype == torch.uint8:
        return inputs.to(torch.float32).div_(255.0)
    if inputs.is_floating_point():
        return inputs.to(torch.float32)
    raise TypeError(f"to_float: expected a uint8 or floating tensor, got {inputs.dtype}")


def input_box(inputs: torch.Tensor) -> tuple[float, float] | None:
    """The valid input range for attacks: ``(0, 1)`` for images, ``None`` for unbounded features.

    uint8 images become [0, 1] pixels; float data already inside [0, 1] (the digits) is treated as
    pixels too; anything else (two moons) has no box.
    """
    if inputs.dtype == torch.uint8:
        return (0.0, 1.0)
    if inputs.numel() and float(inputs.min()) >= 0.0 and float(inputs.max()) <= 1.0:
        return (0.0, 1.0)
    return None


def train_val_split(
    ds: ArrayDataset, val_fraction: float, seed: int = 0
) -> tuple[ArrayDataset, ArrayDataset]:
    """Deterministic (train, validation) split of ``ds`` for hyper-parameter sweeps.

    ``round(len(ds) * val_fraction)`` samples chosen by a permutation drawn from
    ``seed`` form the validation part; both parts keep the original sample order.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"train_val_split: val_fraction must be in (0, 1), got {val_fraction}")
    n = len(ds)
    n_val = int(round(n * val_fraction))
    if not 1 <= n_val <= n - 1:
        raise ValueError(
            f"train_val_split: val_fraction={val_fraction} of {n} samples gives {n_val} validation "
            f"samples; need at least one sample in each part"
        )
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_derive_seed(seed, 0x5A11))
    perm = torch.randperm(n, generator=gen)  # (N,)
    val_idx, _ = perm[:n_val].sort()
    train_idx, _ = perm[n_val:].sort()
    return ds.subset(train_idx), ds.subset(val_idx)


def stratified_subset(ds: ArrayDataset, size: int, seed: int, *, stream: int = 0) -> ArrayDataset:
    """``size`` samples of ``ds``, drawn per class and deterministic in ``(seed, stream)``.

    Each class ``c`` with ``n_c`` of the ``N`` samples contributes ``floor(size n_c / N)`` samples;
    the ``size - sum`` left over go one each to the classes with the largest fractional parts
    (ties: the lower class index), so the class proportions match the full set to within one
    sample.  Within a class the samples come from a permutation drawn from ``(seed, stream, c)``.
    The result keeps the original sample order.  ``size == len(ds)`` returns every sample.
    """
    n = len(ds)
    if not isinstance(size, int) or isinstance(size, bool) or not 1 <= size <= n:
        raise ValueError(f"a subset of {ds.name!r} must have 1..{n} samples, got {size!r}")
    labels = ds.labels.cpu()
    counts = torch.bincount(labels, minlength=ds.num_classes).tolist()  # (num_classes,)
    exact = [size * c / n for c in counts]
    quota = [int(math.floor(q)) for q in exact]
    left = size - sum(quota)
    order = sorted(range(len(counts)), key=lambda c: (-(exact[c] - quota[c]), c))
    for c in order[:left]:
        quota[c] += 1
    picked: list[torch.Tensor] = []
    for c, k in enumerate(quota):
        if k == 0:
            continue
        members = (labels == c).nonzero().squeeze(1)  # (n_c,) in dataset order
        gen = torch.Generator(device="cpu")
        gen.manual_seed(_derive_seed(seed, stream, 0x5B5E7, c))
        picked.append(members[torch.randperm(members.numel(), generator=gen)[:k]])
    index, _ = torch.cat(picked).sort()
    return ds.subset(index)


def _derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative integers (numpy SeedSequence hashing)."""
    for p in parts:
        if p < 0:
            raise ValueError(f"seeds and epochs must be non-negative integers, got {p}")
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)
    return int(state[0]) & 0x7FFF_FFFF_FFFF_FFFF


# --------------------------------------------------------------------------------------
# Augmentation (pure, batched, on x's device)
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Augment:
    """Training augmentation, applied per batch on the training device.

    Order in :func:`augment_batch`: random crop -> horizontal flip -> colour
    jitter (brightness, contrast, saturation, in that fixed order) -> rotation.
    """

    crop_padding: int = 0  # random crop back to the original size after zero padding by this many pixels
    hflip: bool = False
    brightness: float = 0.0  # jitter factors, torchvision semantics: factor ~ U[max(0, 1-b), 1+b]
    contrast: float = 0.0
    saturation: float = 0.0
    rotation: float = 0.0  # max degrees: angle ~ U[-r, r], bilinear, zero fill

    def __post_init__(self) -> None:
        if not isinstance(self.crop_padding, int) or self.crop_padding < 0:
            raise ValueError(f"Augment.crop_padding must be a non-negative int, got {self.crop_padding!r}")
        for field in ("brightness", "contrast", "saturation", "rotation"):
            value = getattr(self, field)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"Augment.{field} must be a finite number >= 0, got {value!r}")

    @property
    def is_identity(self) -> bool:
        """True when no transformation is enabled."""
        return (
            self.crop_padding == 0
            and not self.hflip
            and self.brightness == 0
            and self.contrast == 0
            and self.saturation == 0
            and self.rotation == 0
        )


def _check_images(x: torch.Tensor, who: str) -> None:
    if x.dim() != 4 or not x.is_floating_point():
        raise ValueError(
            f"{who}: expected a float (B, C, H, W) batch, got {x.dtype} of shape {tuple(x.shape)}"
        )


def _check_generator(x: torch.Tensor, generator: torch.Generator, who: str) -> None:
    gd, xd = generator.device, x.device
    same = gd.type == xd.type and (gd.index is None or xd.index is None or gd.index == xd.index)
    if not same:
        raise ValueError(
            f"{who}: the generator lives on {gd} but the batch is on {xd}; "
            f"create it with torch.Generator(device=x.device)"
        )


def _uniform(n: int, low: float, high: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """(n,) float32 samples of U[low, high]."""
    u = torch.rand(n, generator=generator, device=device, dtype=torch.float32)
    return low + (high - low) * u


def random_crop(x: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """Zero-pad each side by ``padding`` pixels and crop back to (H, W) at a random offset per sample."""
    _check_images(x, "random_crop")
    if padding < 0:
        raise ValueError(f"random_crop: padding must be >= 0, got {padding}")
    if padding == 0:
        return x
    _check_generator(x, generator, "random_crop")
    b, c, h, w = x.shape
    padded = F.pad(x, (padding, padding, padding, padding))  # (B, C, H+2p, W+2p)
    offsets = torch.randint(0, 2 * padding + 1, (2, b), generator=generator, device=x.device)  # (2, B)
    rows = offsets[0, :, None] + torch.arange(h, device=x.device)  # (B, H)
    cols = offsets[1, :, None] + torch.arange(w, device=x.device)  # (B, W)
    out = padded.gather(2, rows[:, None, :, None].expand(b, c, h, w + 2 * padding))  # (B, C, H, W+2p)
    return out.gather(3, cols[:, None, None, :].expand(b, c, h, w))  # (B, C, H, W)


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Mirror each sample left-right with probability ``p``."""
    _check_images(x, "random_hflip")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"random_hflip: p must be in [0, 1], got {p}")
    _check_generator(x, generator, "random_hflip")
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p  # (B,)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 1, H, W) luminance (ITU-R 601 weights for RGB, channel mean otherwise)."""
    if x.shape[1] == 3:
        r, g, b = x.unbind(1)
        return (0.299 * r + 0.587 * g + 0.114 * b).unsqueeze(1)
    return x.mean(dim=1, keepdim=True)


def color_jitter(
    x: torch.Tensor,
    brightness: float,
    contrast: float,
    saturation: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Random brightness, contrast and saturation per sample (torchvision semantics, fixed order).

    Each factor is drawn from U[max(0, 1-f), 1+f]; a zero ``f`` skips that step.
    Brightness scales the image, contrast blends it with its mean luminance,
    saturation blends it with its own grayscale (RGB only: skipped when C != 3).
    Each step clamps to [0, 1], as torchvision does.
    """
    _check_images(x, "color_jitter")
    for label, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"color_jitter: {label} must be a finite number >= 0, got {value}")
    if brightness == 0 and contrast == 0 and (saturation == 0 or x.shape[1] != 3):
        return x
    _check_generator(x, generator, "color_jitter")
    b = x.shape[0]
    if brightness > 0:
        f = _uniform(b, max(0.0, 1.0 - brightness), 1.0 + brightness, generator, x.device)  # (B,)
        x = (x * f[:, None, None, None]).clamp(0.0, 1.0)
    if contrast > 0:
        f = _uniform(b, max(0.0, 1.0 - contrast), 1.0 + contrast, generator, x.device)[:, None, None, None]
        mean = _grayscale(x).mean(dim=(1, 2, 3), keepdim=True)  # (B, 1, 1, 1)
        x = (f * x + (1.0 - f) * mean).clamp(0.0, 1.0)
    if saturation > 0 and x.shape[1] == 3:
        f = _uniform(b, max(0.0, 1.0 - saturation), 1.0 + saturation, generator, x.device)[:, None, None, None]
        x = (f * x + (1.0 - f) * _grayscale(x)).clamp(0.0, 1.0)
    return x


def rotate(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate each sample about its centre by ``angles`` (B,) degrees; bilinear, zero fill."""
    _check_images(x, "rotate")
    b, _, h, w = x.shape
    if angles.shape != (b,):
        raise ValueError(f"rotate: angles must have shape ({b},), got {tuple(angles.shape)}")
    rad = torch.deg2rad(angles.to(device=x.device, dtype=x.dtype))  # (B,)
    cos, sin = rad.cos(), rad.sin()
    zero = torch.zeros_like(cos)
    # Rotation in pixel space, expressed in grid_sample's normalised [-1, 1] coordinates
    # (the aspect factors keep non-square images undistorted).
    theta = torch.stack(
        [
            torch.stack([cos, -sin * (h / w), zero], dim=1),
            torch.stack([sin * (w / h), cos, zero], dim=1),
        ],
        dim=1,
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_rotation(x: torch.Tensor, degrees: float, generator: torch.Generator) -> torch.Tensor:
    """Rotate each sample by an angle ~ U[-degrees, degrees] (bilinear, zero fill)."""
    _check_images(x, "random_rotation")
    if not math.isfinite(degrees) or degrees < 0:
        raise ValueError(f"random_rotation: degrees must be a finite number >= 0, got {degrees}")
    if degrees == 0:
        return x
    _check_generator(x, generator, "random_rotation")
    angles = _uniform(x.shape[0], -degrees, degrees, generator, x.device)  # (B,)
    return rotate(x, angles)


def augment_batch(x: torch.Tensor, aug: Augment, generator: torch.Generator) -> torch.Tensor:
    """Apply ``aug`` to a (B, C, H, W) float batch in [0, 1]; output in [0, 1], same shape.

    All per-sample parameters are drawn in one call per transformation from
    ``generator``, which must live on ``x.device``; the result is deterministic
    given the generator state.
    """
    _check_images(x, "augment_batch")
    if aug.is_identity:
        return x
    _check_generator(x, generator, "augment_batch")
    x = random_crop(x, aug.crop_padding, generator)
    if aug.hflip:
        x = random_hflip(x, generator)
    x = color_jitter(x, aug.brightness, aug.contrast, aug.saturation, generator)
    x = random_rotation(x, aug.rotation, generator)
    return x.clamp(0.0, 1.0)


# --------------------------------------------------------------------------------------
# DeviceLoader
# --------------------------------------------------------------------------------------


class DeviceLoader:
    """Batches sliced from a dataset that lives as one tensor on the training device.

    The dataset is moved to ``device`` once (uint8 images stay uint8 there);
    each batch is converted to float32 with :func:`to_float` and augmented on
    the device.

    Shuffling uses a permutation drawn on the CPU from ``(seed, epoch)`` (so it
    is the same on every device and every rank); augmentation of batch ``i`` on
    rank ``r`` uses a generator on ``device`` seeded from ``(seed, epoch, r, i)``.
    Nothing else influences either, so a run resumed at an epoch boundary
    (``set_epoch``) reproduces them exactly. Iterating again without
    ``set_epoch`` repeats the same epoch.

    Distributed use (``world_size > 1``): ``batch_size`` is the global batch and
    must be divisible by ``world_size``; every rank walks the same global
    batches and keeps the contiguous slice
    ``[start + r*b // W, start + (r+1)*b // W)`` of each, where ``b`` is that
    global batch's size. For full batches this is exactly ``[r*B/W, (r+1)*B/W)``.
    With ``drop_last=False`` the last global batch may be smaller: its slices
    then differ in size by at most one sample, and are empty (shape ``(0, ...)``)
    only for ranks ``r`` with ``r*b // W == (r+1)*b // W``, which happens only
    when ``b < world_size`` (a warning is issued at construction). Every rank
    always yields the same number of batches, ``len(loader)``.
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        *,
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        augment: Augment | None = None,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"DeviceLoader: batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(world_size, int) or world_size < 1:
            raise ValueError(f"DeviceLoader: world_size must be a positive int, got {world_size!r}")
        if not isinstance(rank, int) or not 0 <= rank < world_size:
            raise ValueError(f"DeviceLoader: rank must be in 0..{world_size - 1}, got {rank!r}")
        if batch_size % world_size != 0:
            raise ValueError(
                f"DeviceLoader: the global batch_size ({batch_size}) must be divisible by "
                f"world_size ({world_size})"
            )
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"DeviceLoader: seed must be a non-negative int, got {seed!r}")
        if augment is not None and not augment.is_identity and dataset.inputs.dim() != 4:
            raise ValueError(
                f"DeviceLoader: augmentation needs image inputs (N, C, H, W), dataset "
                f"{dataset.name!r} has inputs of shape {tuple(dataset.inputs.shape)}"
            )
        self.device = torch.device(device)
        self.dataset = dataset.to(self.device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = None if augment is None or augment.is_identity else augment
        self.drop_last = drop_last
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._epoch = 0
        remainder = len(self.dataset) % batch_size
        if world_size > 1 and not drop_last and 0 < remainder < world_size:
            warnings.warn(
                f"DeviceLoader: the last global batch has {remainder} samples for {world_size} ranks; "
                f"some ranks get an empty final batch (use drop_last=True to avoid it)",
                stacklevel=2,
            )

    @property
    def epoch(self) -> int:
        return self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose shuffle order and augmentation the next iteration uses."""
        if not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"DeviceLoader.set_epoch: epoch must be a non-negative int, got {epoch!r}")
        self._epoch = epoch

    def __len__(self) -> int:
        n = len(self.dataset)
        if self.drop_last:
            return n // self.batch_size
        return -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        # Resolve everything now, so a later set_epoch() cannot affect this pass.
        return self._batches(self._epoch)

    def _batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds = self.dataset
        n = len(ds)
        perm: torch.Tensor | None = None
        if self.shuffle:
            cpu_gen = torch.Generator(device="cpu")
            cpu_gen.manual_seed(_derive_seed(self.seed, epoch, 0))
            perm = torch.randperm(n, generator=cpu_gen).to(self.device)  # (N,)
        aug_gen = torch.Generator(device=self.device) if self.augment is not None else None
        w, r = self.world_size, self.rank
        for i in range(len(self)):
            start = i * self.batch_size
            b = min(self.batch_size, n - start)  # this global batch's size
            lo = start + (r * b) // w
            hi = start + ((r + 1) * b) // w
            if perm is None:
                x, y = ds.inputs[lo:hi], ds.labels[lo:hi]
            else:
                idx = perm[lo:hi]  # (b_r,)
                x, y = ds.inputs.index_select(0, idx), ds.labels.index_select(0, idx)
            x = to_float(x)  # (b_r, ...) float32
            if self.augment is not None and aug_gen is not None:
                aug_gen.manual_seed(_derive_seed(self.seed, epoch, 1, r, i))
                x = augment_batch(x, self.augment, aug_gen)
            yield x, y


# --------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------

Loader = Callable[[Path | None, str], ArrayDataset]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: how to load it and its default training augmentation."""

    name: str
    loader: Loader  # (root, split in {"train", "test"}) -> dataset
    default_root: str | None
    augment: Augment | None  # default training augmentation (None = none)
    description: str


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(
    name: str,
    *,
    default_root: str | None = None,
    augment: Augment | None = None,
    description: str = "",
) -> Callable[[Loader], Loader]:
    """Decorator registering ``loader(root, split) -> ArrayDataset`` under ``name``."""

    def decorator(loader: Loader) -> Loader:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        DATASETS[name] = DatasetSpec(
            name=name, loader=loader, default_root=default_root, augment=augment, description=description
        )
        return loader

    return decorator


def list_datasets() -> list[str]:
    """Names of the registered datasets, sorted."""
    return sorted(DATASETS)


def load_dataset(name: str, root: str | Path | None = None, split: str = "train") -> ArrayDataset:
    """Load split ``"train"`` or ``"test"`` of a registered dataset (``root`` defaults per dataset)."""
    spec = DATASETS.get(name)
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; registered datasets: {', '.join(list_datasets())}")
    if split not in SPLITS:
        raise ValueError(f"{name}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if root is None and spec.default_root is not None:
        root = spec.default_root
    path = None if root is None else Path(root).expanduser()
    return spec.loader(path, split)


# --------------------------------------------------------------------------------------
# moons and digits (generated / bundled, no files)
# --------------------------------------------------------------------------------------

MOONS_SIZES: dict[str, int] = {"train": 2000, "test": 20000}
MOONS_SEEDS: dict[str, int] = {"train": 0, "test": 1}
MOONS_NOISE_RADIUS = 0.1


def make_moons(n: int, seed: int, noise_radius: float = MOONS_NOISE_RADIUS) -> tuple[np.ndarray, np.ndarray]:
    """Two moons: ``(points (n, 2) float32, labels (n,) int64)``, balanced, shuffled.

    Class 0 lies on (cos t, sin t), class 1 on (1 - cos t, 0.5 - sin t), t ~ U[0, pi];
    each point is moved uniformly within a disk of radius ``noise_radius``.
    """
    rng = np.random.default_rng(seed)
    n0 = n // 2
    labels = np.concatenate([np.zeros(n0, np.int64), np.ones(n - n0, np.int64)])  # (n,)
    t = rng.uniform(0.0, math.pi, n)
    px = np.where(labels == 0, np.cos(t), 1.0 - np.cos(t))
    py = np.where(labels == 0, np.sin(t), 0.5 - np.sin(t))
    r = noise_radius * np.sqrt(rng.uniform(0.0, 1.0, n))
    phi = rng.uniform(0.0, 2.0 * math.pi, n)
    points = np.stack([px + r * np.cos(phi), py + r * np.sin(phi)], axis=1)  # (n, 2)
    order = rng.permutation(n)
    return points[order].astype(np.float32), labels[order]


@register_dataset(
    "moons",
    description="two moons, 2000 train / 20 000 test points, uniform disk noise of radius 0.1 (generated)",
)
def _load_moons(root: Path | None, split: str) -> ArrayDataset:
    del root  # generated data: no files
    points, labels = make_moons(MOONS_SIZES[split], MOONS_SEEDS[split])
    return ArrayDataset(torch.from_numpy(points), torch.from_numpy(labels), 2, "moons")


DIGITS_TEST_SIZE = 360


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise DatasetError(
            "digits: the 8x8 digits ship with scikit-learn, which is not installed; "
            "install it with: pip install scikit-learn (or pip install -e '.[digits]' in a lipmargin checkout)"
        ) from err
    bunch = load_digits()
    images = (np.asarray(bunch.data, dtype=np.float64) / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


@register_dataset(
    "digits",
    description="scikit-learn's 8x8 digits in [0, 1], fixed split: 360 test / 1437 train",
)
def _load_digits(root: Path | None, split: str) -> ArrayDataset:
    del root  # bundled with scikit-learn
    images, labels = _digits_arrays()
    order = np.random.default_rng(0).permutation(len(labels))
    idx = order[:DIGITS_TEST_SIZE] if split == "test" else order[DIGITS_TEST_SIZE:]
    return ArrayDataset(
        torch.from_numpy(images[idx].copy()), torch.from_numpy(labels[idx].copy()), 10, "digits"
    )


# --------------------------------------------------------------------------------------
# MNIST / Fashion-MNIST (IDX files)
# --------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (python pickles, restricted unpickling)
# --------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------
# Tiny ImageNet (JPEG folders, decoded once and cached as .npz)
# --------------------------------------------------------------------------------------

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


def _decode_jpeg(path: Path) -> np.ndarray:
    """(64, 64, 3) uint8 RGB pixels of one image (grayscale converted to RGB)."""
    from PIL import Image  # imported lazily: Pillow is optional

    try:
        with Image.open(path) as img:
            pixels = np.asarray(img.convert("RGB"), dtype=np.uint8)  # (H, W, 3)
    except (OSError, ValueError, SyntaxError) as err:  # PIL.UnidentifiedImageError is an OSError
        raise DatasetError(f"tiny-imagenet: cannot decode {path} ({type(err).__name__}: {err}); replace the file") from err
    if pixels.shape != (TINY_SIZE, TINY_SIZE, 3):
        raise DatasetError(
            f"tiny-imagenet: {path} is {pixels.shape[1]}x{pixels.shape[0]}, expected {TINY_SIZE}x{TINY_SIZE}"
        )
    return pixels


def _read_tiny_cache(cache: Path, wnids: list[str], n: int) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        with np.load(cache, allow_pickle=False) as npz:
            images, labels, cached_wnids = npz["images"], npz["labels"], npz["wnids"]
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as err:
        warnings.warn(f"tiny-imagenet: ignoring unreadable cache {cache} ({type(err).__name__}: {err})", stacklevel=3)
        return None
    if (
        images.dtype != np.uint8
        or images.shape != (n, 3, TINY_SIZE, TINY_SIZE)
        or labels.shape != (n,)
        or list(cached_wnids) != wnids
    ):
        return None
    return images, labels.astype(np.int64)


def _write_tiny_cache(cache: Path, images: np.ndarray, labels: np.ndarray, wnids: list[str]) -> None:
    """Write the cache atomically (temporary file + os.replace); failures only warn."""
    tmp_name: str | None = None
    try:
        with tempfile.NamedTemporaryFile(
            dir=cache.parent, prefix=f".{cache.stem}-", suffix=".tmp", delete=False
        ) as fh:
            tmp_name = fh.name
            os.fchmod(fh.fileno(), default_file_mode())  # NamedTemporaryFile is private (0600)
            np.savez(fh, images=images, labels=labels, wnids=np.array(wnids))
        os.replace(tmp_name, cache)
        tmp_name = None
    except OSError as err:
        warnings.warn(f"tiny-imagenet: could not write cache {cache} ({err}); decoding again next time", stacklevel=3)
    finally:
        if tmp_name is not None:
            try:
                os.unlink(tmp_name)
            except OSError:
                pass


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
    try:
        import PIL  # noqa: F401  (availability check only)
    except ImportError as err:
        raise DatasetError(
            f"tiny-imagenet: decoding the JPEGs under {base} needs Pillow, which is not installed: pip install pillow"
        ) from err
    images = np.empty((n, TINY_SIZE, TINY_SIZE, 3), dtype=np.uint8)  # (N, H, W, 3)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for i, pixels in enumerate(pool.map(_decode_jpeg, paths)):
            images[i] = pixels
    images = np.ascontiguousarray(images.transpose(0, 3, 1, 2))  # (N, 3, H, W)
    labels = np.asarray(label_list, dtype=np.int64)  # (N,)
    _write_tiny_cache(cache, images, labels, wnids)
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), len(wnids), "tiny-imagenet")
