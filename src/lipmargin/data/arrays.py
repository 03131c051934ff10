"""A whole dataset as two tensors, and the pure operations on it.

:class:`ArrayDataset` holds inputs and labels; :func:`to_float` turns uint8 images into [0, 1]
floats per batch; :func:`input_box` names the valid input range for attacks;
:func:`train_val_split` and :func:`stratified_subset` draw deterministic parts of a dataset from
local generators seeded by :func:`derive_seed` (never the global RNG).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["ArrayDataset", "derive_seed", "input_box", "stratified_subset", "to_float", "train_val_split"]


@dataclass(frozen=True)
class ArrayDataset:
    """A whole dataset held as two tensors.

    ``inputs`` is either ``(N, C, H, W)`` uint8 images in 0..255 (converted to
    float in [0, 1] per batch by :func:`to_float`) or a float32 tensor
    (``(N, D)`` or ``(N, C, H, W)``) already in its final range.
    ``labels`` is ``(N,)`` int64 with values in ``0..num_classes-1``.

    >>> ds = ArrayDataset(torch.zeros(4, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 1, 1, 0]), 2, "toy")
    >>> len(ds), ds.input_shape
    (4, (1, 2, 2))
    >>> ds.subset(ds.labels == 1).labels.tolist()
    [1, 1]
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
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input, ``inputs.shape[1:]``."""
        return tuple(self.inputs.shape[1:])

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Old name of :attr:`input_shape`: raises an AttributeError pointing to it."""
        raise AttributeError("ArrayDataset.in_shape was renamed input_shape; use dataset.input_shape")

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
    """uint8 images in 0..255 -> float32 in [0, 1]; floating inputs pass through as float32.

    >>> to_float(torch.tensor([0, 51, 255], dtype=torch.uint8)).tolist()
    [0.0, 0.20000000298023224, 1.0]
    """
    if inputs.dtype == torch.uint8:
        return inputs.to(torch.float32).div_(255.0)
    if inputs.is_floating_point():
        return inputs.to(torch.float32)
    raise TypeError(f"to_float: expected a uint8 or floating tensor, got {inputs.dtype}")


def input_box(inputs: torch.Tensor) -> tuple[float, float] | None:
    """The valid input range for attacks: ``(0, 1)`` for images, ``None`` for unbounded features.

    uint8 images become [0, 1] pixels; float data already inside [0, 1] (the digits) is treated as
    pixels too; anything else (two moons) has no box.

    >>> input_box(torch.zeros(2, 1, 3, 3, dtype=torch.uint8)), input_box(torch.tensor([[-0.5, 1.5]]))
    ((0.0, 1.0), None)
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

    >>> ds = ArrayDataset(torch.arange(10.0).reshape(10, 1), torch.zeros(10, dtype=torch.int64), 1, "toy")
    >>> train, val = train_val_split(ds, 0.2)
    >>> len(train), len(val), sorted(train.inputs[:, 0].tolist() + val.inputs[:, 0].tolist()) == list(range(10))
    (8, 2, True)
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
    gen.manual_seed(derive_seed(seed, 0x5A11))
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

    >>> labels = torch.tensor([0] * 6 + [1] * 3)
    >>> ds = ArrayDataset(torch.zeros(9, 1), labels, 2, "toy")
    >>> torch.bincount(stratified_subset(ds, 3, seed=0).labels).tolist()
    [2, 1]
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
        gen.manual_seed(derive_seed(seed, stream, 0x5B5E7, c))
        picked.append(members[torch.randperm(members.numel(), generator=gen)[:k]])
    index, _ = torch.cat(picked).sort()
    return ds.subset(index)


def derive_seed(*parts: int) -> int:
    """A 63-bit seed mixed from non-negative integers (numpy SeedSequence hashing).

    >>> derive_seed(0, 1) == derive_seed(0, 1) != derive_seed(1, 0)
    True
    """
    for p in parts:
        if p < 0:
            raise ValueError(f"seeds and epochs must be non-negative integers, got {p}")
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(1, dtype=np.uint64)
    return int(state[0]) & 0x7FFF_FFFF_FFFF_FFFF
