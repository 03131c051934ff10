"""1-Lipschitz reshaping: space-to-depth (a permutation) and zero padding (isometric embeddings)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from lipmargin.lipschitz import register_layer_rule
from lipmargin.nn._common import _check_positive

__all__ = ["InvertibleDownsample", "ChannelPad", "ZeroPadding"]


class InvertibleDownsample(nn.Module):
    """Space-to-depth (``pixel_unshuffle``): ``(C, H, W) -> (C f^2, H/f, W/f)``, a permutation (norm 1).

    The 'invertible downsampling' of the SOC LipConvNets and the AOL nets ('concatenation pooling').

    >>> import torch
    >>> InvertibleDownsample(2)(torch.arange(4.0).view(1, 1, 2, 2)).shape
    torch.Size([1, 4, 1, 1])
    """

    def __init__(self, factor: int = 2) -> None:
        super().__init__()
        self.factor = _check_positive(factor, "factor", "InvertibleDownsample")

    def forward(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        if h % self.factor or w % self.factor:
            raise ValueError(
                f"InvertibleDownsample({self.factor}) needs H and W divisible by it, got shape {tuple(x.shape)}"
            )
        return F.pixel_unshuffle(x, self.factor)

    def extra_repr(self) -> str:
        return f"factor={self.factor}"


class ChannelPad(nn.Module):
    """Append zero channels up to ``channels``: an isometric embedding (norm 1).

    >>> import torch
    >>> ChannelPad(3)(torch.ones(1, 1, 2)).tolist()
    [[[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]]
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = _check_positive(channels, "channels", "ChannelPad")

    def forward(self, x: Tensor) -> Tensor:
        extra = self.channels - x.shape[1]
        if extra < 0:
            raise ValueError(f"ChannelPad({self.channels}) got {x.shape[1]} channels, more than it pads to")
        return F.pad(x, (0, 0) * (x.dim() - 2) + (0, extra))

    def extra_repr(self) -> str:
        return f"channels={self.channels}"


class ZeroPadding(nn.Module):
    """Zero-pad the two spatial dims by ``(left, right, top, bottom)``: an isometric embedding.

    >>> import torch
    >>> ZeroPadding(1, 0, 0, 1)(torch.ones(1, 1, 1, 1)).tolist()
    [[[[0.0, 1.0], [0.0, 0.0]]]]
    """

    def __init__(self, left: int, right: int, top: int, bottom: int) -> None:
        super().__init__()
        self.padding = (int(left), int(right), int(top), int(bottom))
        if min(self.padding) < 0:
            raise ValueError(f"ZeroPadding takes non-negative padding, got {self.padding}")

    def forward(self, x: Tensor) -> Tensor:
        return F.pad(x, self.padding)

    def extra_repr(self) -> str:
        return "left={}, right={}, top={}, bottom={}".format(*self.padding)


# Space-to-depth is a permutation; zero padding of channels or pixels is an isometric embedding.
register_layer_rule(InvertibleDownsample, ChannelPad, ZeroPadding, constant=lambda m: 1.0)
