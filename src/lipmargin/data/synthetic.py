"""Datasets without files: two moons (generated) and scikit-learn's 8x8 digits (bundled)."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import torch

from lipmargin.data.arrays import ArrayDataset
from lipmargin.data.registry import DatasetError, register_dataset

__all__ = ["DIGITS_TEST_SIZE", "MOONS_NOISE_RADIUS", "MOONS_SEEDS", "MOONS_SIZES", "make_moons"]

MOONS_SIZES: dict[str, int] = {"train": 2000, "test": 20000}
MOONS_SEEDS: dict[str, int] = {"train": 0, "test": 1}
MOONS_NOISE_RADIUS = 0.1


def make_moons(n: int, seed: int, noise_radius: float = MOONS_NOISE_RADIUS) -> tuple[np.ndarray, np.ndarray]:
    """Two moons: ``(points (n, 2) float32, labels (n,) int64)``, balanced, shuffled.

    Class 0 lies on (cos t, sin t), class 1 on (1 - cos t, 0.5 - sin t), t ~ U[0, pi];
    each point is moved uniformly within a disk of radius ``noise_radius``.
    The draws come from a local generator seeded by ``seed`` (the global RNG is untouched).

    >>> points, labels = make_moons(6, seed=0)
    >>> points.shape, points.dtype, sorted(labels.tolist())
    ((6, 2), dtype('float32'), [0, 0, 0, 1, 1, 1])
    >>> bool((make_moons(6, seed=0)[0] == points).all())
    True
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

