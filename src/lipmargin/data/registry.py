"""The dataset registry: :class:`DatasetSpec`, :data:`DATASETS`, :func:`register_dataset`, :func:`load_dataset`.

A dataset is a loader ``(root, split) -> ArrayDataset`` registered under a name by a decorator; the
format modules of this package (synthetic, idx, cifar, tiny_imagenet, folder) fill the registry
when :mod:`lipmargin.data` is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lipmargin.data.arrays import ArrayDataset
from lipmargin.data.augment import Augment

__all__ = ["DATASETS", "SPLITS", "DatasetError", "DatasetSpec", "Loader", "list_datasets", "load_dataset", "register_dataset"]

SPLITS: tuple[str, ...] = ("train", "test")


class DatasetError(ValueError):
    """A dataset is missing or malformed.

    The message is a single line naming the path, what was expected there and
    how to obtain it.

    >>> str(DatasetError("mnist: no files\\n  under /data"))
    'mnist: no files under /data'
    """

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))


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
    """Decorator registering ``loader(root, split) -> ArrayDataset`` under ``name``.

    >>> import torch
    >>> @register_dataset("doc-zeros", description="three zero points")
    ... def _zeros(root, split):
    ...     return ArrayDataset(torch.zeros(3, 2), torch.zeros(3, dtype=torch.int64), 1, "doc-zeros")
    >>> len(load_dataset("doc-zeros"))
    3
    >>> del DATASETS["doc-zeros"]  # leave the registry as it was
    """

    def decorator(loader: Loader) -> Loader:
        if name in DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        DATASETS[name] = DatasetSpec(
            name=name, loader=loader, default_root=default_root, augment=augment, description=description
        )
        return loader

    return decorator


def list_datasets() -> list[str]:
    """Names of the registered datasets, sorted.

    >>> import lipmargin.data  # importing the package registers the built-in formats
    >>> {"moons", "digits", "mnist", "cifar10", "folder"} <= set(list_datasets())
    True
    """
    return sorted(DATASETS)


def load_dataset(name: str, root: str | Path | None = None, split: str = "train") -> ArrayDataset:
    """Load split ``"train"`` or ``"test"`` of a registered dataset (``root`` defaults per dataset).

    >>> import lipmargin.data  # importing the package registers the built-in formats
    >>> moons = load_dataset("moons", split="train")
    >>> len(moons), moons.input_shape, moons.num_classes
    (2000, (2,), 2)
    """
    spec = DATASETS.get(name)
    if spec is None:
        raise ValueError(f"unknown dataset {name!r}; registered datasets: {', '.join(list_datasets())}")
    if split not in SPLITS:
        raise ValueError(f"{name}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if root is None and spec.default_root is not None:
        root = spec.default_root
    path = None if root is None else Path(root).expanduser()
    return spec.loader(path, split)
