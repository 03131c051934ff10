"""AOL nets (Prach & Lampert, ECCV 2022): almost-orthogonal convolutions, MaxMin, a linear head."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from lipmargin.models._registry import register_variant
from lipmargin.models.lipnet import LipschitzNet, _image_shape, _with_head
from lipmargin.nn import AOLConv2d, AOLLinear, InvertibleDownsample, MaxMin

__all__ = ["AOL_NETS", "aol_net"]

#: name -> (description, default options).  aol-s is CPU-sized (see :func:`aol_net` for the
#: deviations from the paper's AOL-S).
AOL_NETS: dict[str, tuple[str, dict[str, int]]] = {
    "aol-s": (
        "CPU-sized AOL net: 2 stages (16, 64 ch) of 5 AOL convs, dense AOL 256, MaxMin",
        {"width": 16, "depth": 5, "stages": 2, "reduce_channels": 16, "dense_features": 256},
    ),
}
def aol_net(
    input_shape: Sequence[int],
    num_classes: int,
    *,
    width: int = 16,
    depth: int = 5,
    stages: int = 2,
    reduce_channels: int = 16,
    dense_features: int = 256,
) -> LipschitzNet:
    """AOL convolutional net (Prach & Lampert, ECCV 2022), MaxMin activations.

    Each stage: space-to-depth (x4 channels), a 1x1 AOL conv to the stage width and ``depth - 1``
    3x3 AOL convs; widths ``width``, ``4 width``, ...  Then a 1x1 AOL conv to ``reduce_channels``,
    flatten, one dense AOL layer of ``dense_features`` and the linear head.

    Deviations from the paper's AOL-S (base width 16, five stages down to 1x1, then 1x1 AOL convs
    and a truncation to the class scores): ``stages`` stages only (2 by default: 28x28 -> 7x7),
    the channel reduction + dense AOL layer in place of the 1x1 tail, and a plain linear head.

    >>> net = aol_net((1, 4, 4), 2, width=2, depth=2, stages=1, reduce_channels=2, dense_features=2)
    >>> [type(m).__name__ for m in net.features]
    ['InvertibleDownsample', 'AOLConv2d', 'MaxMin', 'AOLConv2d', 'MaxMin', 'AOLConv2d', 'MaxMin', 'Flatten', 'AOLLinear', 'MaxMin']
    """
    c, h, w = _image_shape(input_shape, "aol")
    if stages < 1 or depth < 1:
        raise ValueError(f"aol: stages and depth must be >= 1, got {stages}, {depth}")
    if h % 2**stages or w % 2**stages:
        raise ValueError(f"aol: input sides {h}x{w} must be divisible by 2**stages = {2**stages}")
    for name, v in (("width", width), ("reduce_channels", reduce_channels), ("dense_features", dense_features)):
        if v < 2 or v % 2:
            raise ValueError(f"aol: {name} must be even (MaxMin) and >= 2, got {v}")
    layers: list[nn.Module] = []
    planes = int(width)
    for _ in range(stages):
        layers += [InvertibleDownsample(2), AOLConv2d(4 * c, planes, 1), MaxMin()]
        for _ in range(depth - 1):
            layers += [AOLConv2d(planes, planes, 3), MaxMin()]
        c, h, w = planes, h // 2, w // 2
        planes *= 4
    layers += [AOLConv2d(c, reduce_channels, 1), MaxMin(), nn.Flatten()]
    d = reduce_channels * h * w
    layers += [AOLLinear(d, dense_features), MaxMin()]
    return _with_head(nn.Sequential(*layers), dense_features, num_classes, input_shape)


for _name, (_description, _defaults) in AOL_NETS.items():
    register_variant(_name, _description, aol_net, defaults=_defaults)
