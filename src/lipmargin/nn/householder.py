"""The HouseHolder activation (Singla, Singla & Feizi, ICLR 2022)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lipmargin.lipschitz import register_layer_rule
from lipmargin.nn._common import _check_positive

__all__ = ["HouseHolder"]


class HouseHolder(nn.Module):
    """HouseHolder activation (Singla, Singla & Feizi, ICLR 2022), the order-1 ('HH1') version.

    Channel ``i`` is paired with channel ``i + C/2``.  Each pair ``z`` is reflected across the
    line with unit normal ``v = (sin(theta/2), -cos(theta/2))`` when ``v.z > 0`` and kept
    otherwise: ``z - 2 relu(v.z) v``.  ``theta`` (one per pair) starts at ``pi/2``, where the
    activation sorts each pair ascending (MaxMin up to the order of the halves).

    1-Lipschitz: the map is continuous (on ``v.z = 0`` the reflection is the identity) and on each
    side of that line an orthogonal map.  A segment from ``a`` to ``b`` crosses the line at most
    once, at ``c``; then ``||f(a) - f(b)|| <= ||f(a) - f(c)|| + ||f(c) - f(b)|| = ||a - b||``.

    >>> import torch
    >>> act = HouseHolder(2)  # at initialisation each pair (a, b) becomes (min, max)
    >>> torch.allclose(act(torch.tensor([[3.0, 1.0]])), torch.tensor([[1.0, 3.0]]))
    True
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        c = _check_positive(channels, "channels", "HouseHolder")
        if c % 2:
            raise ValueError(f"HouseHolder needs an even number of channels, got {channels}")
        self.channels = c
        self.theta = nn.Parameter(torch.full((c // 2,), math.pi / 2))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() < 2 or x.shape[1] != self.channels:
            raise ValueError(f"HouseHolder expects {self.channels} channels in dim 1, got shape {tuple(x.shape)}")
        a, b = x.chunk(2, dim=1)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        s, c = torch.sin(self.theta / 2).view(shape), torch.cos(self.theta / 2).view(shape)
        r = F.relu(a * s - b * c)  # relu(v . z)
        return torch.cat([a - 2 * r * s, b + 2 * r * c], dim=1)

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


# 1-Lipschitz: proof in the class docstring.
register_layer_rule(HouseHolder, constant=lambda m: 1.0)
