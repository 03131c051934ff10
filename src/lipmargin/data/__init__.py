"""Datasets, batched on-device augmentation and a device-resident batch loader.

Everything a training run needs from its data lives here, one module per job:

* :mod:`~lipmargin.data.arrays` -- :class:`ArrayDataset` (a whole dataset as two tensors),
  :func:`to_float`, :func:`input_box`, :func:`train_val_split`, :func:`stratified_subset`;
* :mod:`~lipmargin.data.registry` -- the dataset registry (:data:`DATASETS`,
  :func:`register_dataset`, :func:`list_datasets`, :func:`load_dataset`, :class:`DatasetError`);
* :mod:`~lipmargin.data.augment` -- :class:`Augment` and pure, batched augmentation functions that
  run on the tensor's own device with an explicit :class:`torch.Generator`;
* :mod:`~lipmargin.data.loader` -- :class:`DeviceLoader`, which keeps the dataset as one tensor on
  the training device and slices (optionally distributed) batches from it;
* one module per format, each registering its datasets (no download ever):
  :mod:`~lipmargin.data.synthetic` (moons, digits), :mod:`~lipmargin.data.idx` (mnist,
  fashion-mnist), :mod:`~lipmargin.data.cifar` (cifar10, cifar100),
  :mod:`~lipmargin.data.tiny_imagenet` (tiny-imagenet), :mod:`~lipmargin.data.folder` (folder: a
  folder of PNG/JPEG images per class), with :mod:`~lipmargin.data.images` (Pillow decoding and
  .npz caches) shared by the image formats.

Randomness is always explicit: shuffling and augmentation derive only from
``(seed, epoch[, rank, batch])``, so a resumed run reproduces them exactly; nothing here touches
the global RNG.
"""

from __future__ import annotations

from lipmargin.data import cifar, folder, idx, synthetic, tiny_imagenet  # noqa: F401  (fill the registry)
from lipmargin.data.arrays import ArrayDataset, input_box, stratified_subset, to_float, train_val_split
from lipmargin.data.augment import (
    Augment,
    augment_batch,
    color_jitter,
    random_crop,
    random_hflip,
    random_rotation,
    rotate,
)
from lipmargin.data.folder import folder_classes
from lipmargin.data.idx import parse_idx
from lipmargin.data.loader import DeviceLoader
from lipmargin.data.registry import DATASETS, DatasetError, DatasetSpec, list_datasets, load_dataset, register_dataset
from lipmargin.data.synthetic import make_moons

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "Augment",
    "DatasetError",
    "DatasetSpec",
    "DeviceLoader",
    "augment_batch",
    "color_jitter",
    "folder_classes",
    "input_box",
    "list_datasets",
    "load_dataset",
    "make_moons",
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
