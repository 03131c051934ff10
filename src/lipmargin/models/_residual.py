"""The layout shared by the CPL and SLL nets: channel padding, residual convs, pooling, residual dense layers."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from lipmargin.models.lipnet import LipschitzNet, _image_shape, _with_head
from lipmargin.nn import ChannelPad, ScaledAvgPool2d

#: The options of every CPL / SLL size.
RESIDUAL_OPTIONS = ("width", "depth", "conv_inner", "dense_depth", "dense_features")


def residual_net(
    name: str,
    conv: Callable[[int, int, tuple[int, int]], nn.Module],
    dense: Callable[[int, int], nn.Module],
    input_shape: Sequence[int],
    num_classes: int,
    width: int,
    depth: int,
    conv_inner: int,
    dense_depth: int,
    dense_features: int,
) -> LipschitzNet:
    """Zero channel padding to ``width``, ``depth`` ``conv(width, conv_inner, (H, W))`` layers,
    window-sum pooling 4x4 / 4 (norm 1), ``dense_depth`` ``dense(d, dense_features)`` layers and
    the linear head."""
    c, h, w = _image_shape(input_shape, name)
    if width < c:
        raise ValueError(f"{name}: width {width} is below the {c} input channels")
    if h < 4 or w < 4:
        raise ValueError(f"{name}: input {tuple(input_shape)} is too small for the 4x4 pooling")
    if min(depth, dense_depth) < 0 or min(conv_inner, dense_features) < 1:
        raise ValueError(f"{name}: depths must be >= 0 and inner widths >= 1")
    layers: list[nn.Module] = [ChannelPad(width)] if width > c else []
    layers += [conv(width, conv_inner, (h, w)) for _ in range(depth)]
    layers += [ScaledAvgPool2d(4), nn.Flatten()]
    d = width * (h // 4) * (w // 4)
    layers += [dense(d, dense_features) for _ in range(dense_depth)]
    return _with_head(nn.Sequential(*layers), d, num_classes, input_shape)
