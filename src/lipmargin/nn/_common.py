"""Helpers shared by the 1-Lipschitz layer families: safe reciprocals, argument checks, rule helpers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipmargin.lipschitz import ROUNDING_MARGIN

f64 = torch.float64


def _safe_rsqrt(x: Tensor) -> Tensor:
    """``x^{-1/2}`` where ``x > 0`` and 0 elsewhere (an all-zero row or column stays zero).

    The clamp keeps the unused branch finite, so ``torch.where`` never sees an ``inf`` whose
    gradient would turn into NaN.
    """
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).rsqrt(), torch.zeros_like(x))


def _safe_reciprocal(x: Tensor) -> Tensor:
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).reciprocal(), torch.zeros_like(x))


def _conv_gram(kernel: Tensor) -> Tensor:
    """All-shift Gram of a conv kernel over its output channels: ``(C_out, C_out, 2k-1, 2k-1)``.

    Entry ``[a, b, s]`` is ``sum_{i, p} K[a, i, p + s] K[b, i, p]``: the kernel of ``C C^T`` for the
    convolution ``C`` on an unbounded (or large enough) image.
    """
    kh, kw = kernel.shape[-2:]
    return F.conv2d(kernel, kernel, padding=(kh - 1, kw - 1))


def _unit_estimate(m: nn.Module) -> Tensor:
    """A constant 1 on the layer's device and dtype (the training estimate of a 1-Lipschitz layer)."""
    p = next(m.parameters())
    return torch.ones((), dtype=p.dtype, device=p.device)


def _check_odd(kernel_size: int, name: str) -> int:
    k = int(kernel_size)
    if k < 1 or k % 2 == 0:
        raise ValueError(f"{name}: kernel_size must be odd and >= 1 ('same' padding), got {kernel_size}")
    return k


def _check_positive(value: int, what: str, name: str) -> int:
    v = int(value)
    if v < 1:
        raise ValueError(f"{name}: {what} must be >= 1, got {value}")
    return v


def _max_one(value: float) -> float:
    """``max(1, value)`` with a relative margin for the float64 arithmetic before and inside the layer.

    The margin also covers the float64 rounding of the layer's own forward pass (a map that is
    exactly 1-Lipschitz in real arithmetic measures ``1 + 1e-16`` in float64).
    """
    return max(1.0, value) * (1.0 + ROUNDING_MARGIN)

