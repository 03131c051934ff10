"""Pooling with a proven Lipschitz constant: window sums scaled by ``1 / sqrt(window size)``."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from lipmargin.lipschitz import register_layer_rule

__all__ = ["ScaledAvgPool2d"]


def _int_pair(v: int | Sequence[int]) -> tuple[int, ...]:
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(x) for x in v)


class ScaledAvgPool2d(nn.Module):
    """Window sums divided by ``sqrt(k_h k_w)``: ``sqrt(k_h k_w) * avg_pool2d(x, kernel, stride)``.

    With ``stride = kernel`` (the default) this is the 1-Lipschitz pooling of the CPL / SLL nets
    (``AvgPool2d(4, divisor_override=4)``).  Lipschitz constant, proven: by Cauchy-Schwarz
    ``y_o^2 <= sum_{p in window o} x_p^2``, and each pixel lies in at most
    ``ceil(k_h/s_h) ceil(k_w/s_w)`` windows, so ``||y|| <= sqrt(ceil(k_h/s_h) ceil(k_w/s_w)) ||x||``
    (exactly 1 for non-overlapping windows, attained by a constant image).

    >>> import torch
    >>> ScaledAvgPool2d(2)(torch.ones(1, 1, 2, 2)).item()  # 4 ones, divided by sqrt(4)
    2.0
    >>> ScaledAvgPool2d(3, stride=1).lipschitz_constant()  # each pixel in up to 9 windows
    3.0
    """

    def __init__(self, kernel_size: int | Sequence[int], stride: int | Sequence[int] | None = None) -> None:
        super().__init__()
        k = _int_pair(kernel_size)
        s = k if stride is None else _int_pair(stride)
        if len(k) != 2 or len(s) != 2 or min(k) < 1 or min(s) < 1:
            raise ValueError(f"ScaledAvgPool2d: bad kernel_size {kernel_size!r} or stride {stride!r}")
        self.kernel_size: tuple[int, int] = (k[0], k[1])
        self.stride: tuple[int, int] = (s[0], s[1])

    def forward(self, x: Tensor) -> Tensor:
        return F.avg_pool2d(x, self.kernel_size, self.stride) * math.sqrt(self.kernel_size[0] * self.kernel_size[1])

    def lipschitz_constant(self) -> float:
        """``sqrt(ceil(k_h/s_h) ceil(k_w/s_w))``, rounded up."""
        n = math.prod(-(-k // s) for k, s in zip(self.kernel_size, self.stride))
        root = math.isqrt(n)
        return float(root) if root * root == n else math.nextafter(math.sqrt(n), math.inf)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}"


register_layer_rule(ScaledAvgPool2d, constant=lambda m: m.lipschitz_constant())  # type: ignore[operator]
