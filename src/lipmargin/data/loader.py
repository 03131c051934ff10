"""A device-resident batch loader: :class:`DeviceLoader` (shuffling, augmentation, DDP slicing)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import torch

from lipmargin.data.arrays import ArrayDataset, derive_seed, to_float
from lipmargin.data.augment import Augment, augment_batch

__all__ = ["DeviceLoader"]


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

    >>> ds = ArrayDataset(torch.arange(10.0).reshape(10, 1), torch.zeros(10, dtype=torch.int64), 1, "toy")
    >>> [x.flatten().tolist() for x, _ in DeviceLoader(ds, 4)]
    [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0]]
    >>> loader = DeviceLoader(ds, 5, shuffle=True, seed=1)
    >>> sorted(v for x, _ in loader for v in x.flatten().tolist()) == [float(i) for i in range(10)]
    True
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
            cpu_gen.manual_seed(derive_seed(self.seed, epoch, 0))
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
                aug_gen.manual_seed(derive_seed(self.seed, epoch, 1, r, i))
                x = augment_batch(x, self.augment, aug_gen)
            yield x, y
